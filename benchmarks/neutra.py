"""NUTS plain against NUTS whitened by a SWAG Gaussian (``NeuTraReparam``), on two models.

Cases: ``bnn``, the 1x50 BNN of ``pyro-swag compare`` on diabetes split 0 with the main job's
SWAG; ``corr``, a Bayesian linear regression with 6 nearly collinear features (correlation
about 0.998, N = 500), with SWAG from ``pyro_swag.fit`` with a plain and with a
``precondition="full"`` SWA phase. Every sampler of a case gets the same model, data,
budget and start (the SWA mean): ``--chains`` chains of ``--warmup`` + ``--samples`` draws
(one after the other in this process), tree depth at most ``--depth``, Pyro's step-size and
diagonal mass-matrix adaptation. The whitened sampler runs in z with ``theta = T(z)``, ``T``
the guide's ``get_transform()``. Reported: the guide's PSIS k-hat (1000 draws), wall time,
leapfrog steps per draw, divergences, minimum bulk ESS over the latent coordinates and per
second, the worst R-hat, and for the BNN the test LL and 90 % coverage. Writes
``benchmarks/results/neutra.json`` and the tables into ``docs/results/neutra.md``.

    python benchmarks/neutra.py                # both cases, about 20 minutes on one core
    python benchmarks/neutra.py --cases corr --no-write
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from pyro.infer.reparam import NeuTraReparam

from pyro_swag import RecordingNUTS, SWAGCollector, fit
from pyro_swag.compare import CompareConfig, make_model
from pyro_swag.compare_swag import train_swag
from pyro_swag.data import load_dataset
from pyro_swag.datatree import mcmc_health, psis_diagnostic, to_datatree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_bnn_nuts import score  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "neutra.json"
DOC = ROOT / "docs" / "results" / "neutra.md"
CORR_D = 6


def corr_model(x, y=None, num_data=None):
    """``w ~ N(0, I)``, ``s ~ HalfNormal(1)``, ``y ~ N(x w, s)``."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([CORR_D]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(x @ w, s), obs=y)


def corr_data(seed: int, n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g) + 0.05 * torch.randn(n, CORR_D, generator=g)
    y = x @ torch.linspace(-1, 1, CORR_D) + 0.5 * torch.randn(n, generator=g)
    return x, y


def khat(guide, x, y) -> float:
    dt = to_datatree(guide, (x,), {"y": y}, num_draws=1000)
    return psis_diagnostic(dt["sample_stats"]["log_p"], dt["sample_stats"]["log_q"])[0]


def run_nuts(model, x, y, args, guide, whiten: bool) -> tuple[dict, object]:
    """One sampler's chains: (diagnostics, DataTree)."""
    pyro.set_rng_seed(args.seed)
    if whiten:  # z = 0 is the SWA mean
        kernel_model, init = NeuTraReparam(guide).reparam(model), init_to_median
    else:
        kernel_model = model
        init = init_to_value(values={k: v.detach() for k, v in guide.median().items()})
    kernel = RecordingNUTS(kernel_model, max_tree_depth=args.depth, init_strategy=init,
                           jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=args.samples, warmup_steps=args.warmup,
                num_chains=args.chains, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(x, y)
    wall = time.perf_counter() - start
    dt = to_datatree(mcmc, (x,), {"y": y})
    health = mcmc_health(dt)
    return {
        "wall_s": wall,
        "steps_per_draw": float(dt["sample_stats"]["n_steps"].mean()),
        "divergences": int(health["divergences"]),
        "ess_min": float(health["min_ess_bulk"]),
        "ess_min_per_s": float(health["min_ess_bulk"]) / wall,
        "rhat_max": float(health["max_rhat"]),
    }, dt


def case_bnn(args) -> dict:
    data = load_dataset("diabetes", 0)
    model = make_model(data, seed=args.seed)
    guide = train_swag(model, data, CompareConfig(methods=("swag",), seed=args.seed),
                       args.seed, quiet=True)["guide"]
    x, y = data.x_train, data.y_train
    out = {}
    for name, whiten in (("NUTS", False), ("NUTS whitened by SWAG", True)):
        r, dt = run_nuts(model, x, y, args, guide, whiten)
        draws = {k: torch.as_tensor(dt["posterior"][k].values).flatten(0, 1)
                 for k in dt["posterior"].data_vars}
        ev = score(model, data, draws)
        out[name] = r | {"khat": khat(guide, x, y) if whiten else None,
                         "test_ll": ev["ll"], "cov90": ev["cov90"]}
        print("bnn", name, json.dumps(out[name]), flush=True)
    return out


def case_corr(args) -> dict:
    x, y = corr_data(args.seed)
    out = {}
    guides = {}
    for prec in (None, "full"):
        guides[prec] = fit(corr_model, SWAGCollector(corr_model, rank=10), (x, y), epochs=200,
                           swa_start=100, swa_lr="auto", batch_size=50, precondition=prec,
                           quiet=True, seed=args.seed).guide
    runs = (("NUTS", None, False), ("NUTS whitened by SWAG", None, True),
            ("NUTS whitened by SWAG, precondition='full'", "full", True))
    for name, prec, whiten in runs:
        r, _ = run_nuts(corr_model, x, y, args, guides[prec], whiten)
        out[name] = r | {"khat": khat(guides[prec], x, y) if whiten else None}
        print("corr", name, json.dumps(out[name]), flush=True)
    return out


TITLES = {"bnn": "1x50 BNN, diabetes split 0 (SWAG: the main job's recipe)",
          "corr": f"linear regression, {CORR_D} features of correlation about 0.998, N = 500"}


def table(name: str, rows: dict) -> str:
    bnn = name == "bnn"
    head = ("| sampler | guide k-hat | wall s | leapfrog steps / draw | divergences | min bulk "
            "ESS | min ESS / s | max R-hat |" + (" test LL | 90 % coverage |" if bnn else ""))
    lines = [f"### {TITLES[name]}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for sampler, r in rows.items():
        k = "–" if r["khat"] is None else f"{r['khat']:.2f}"
        line = (f"| {sampler} | {k} | {r['wall_s']:.0f} | {r['steps_per_draw']:.1f} | "
                f"{r['divergences']} | {r['ess_min']:.0f} | {r['ess_min_per_s']:.2f} | "
                f"{r['rhat_max']:.3f} |")
        if bnn:
            line += f" {r['test_ll']:.3f} | {r['cov90']:.3f} |"
        lines.append(line)
    plain = rows["NUTS"]["ess_min_per_s"]
    ratios = ", ".join(f"{s}: {r['ess_min_per_s'] / plain:.2f}x" for s, r in rows.items()
                       if s != "NUTS")
    return "\n".join(lines) + f"\n\nMinimum ESS per second over plain NUTS's: {ratios}.\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=("bnn", "corr"), default=["bnn", "corr"])
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = {"bnn": case_bnn, "corr": case_corr}
    results = {name: cases[name](args) for name in args.cases}
    text = (
        f"# NUTS whitened by SWAG\n\nGenerated by `python benchmarks/neutra.py "
        f"{' '.join(sys.argv[1:])}` ({platform.machine()}, torch {torch.__version__}, 1 "
        f"thread). Each sampler: {args.chains} chains of {args.warmup} warm-up + "
        f"{args.samples} draws, tree depth <= {args.depth}, from the SWA mean; the SWAG fit "
        "is not counted.\n\n" + "\n".join(table(n, r) for n, r in results.items()))
    print(text)
    if not args.no_write:
        RESULTS.write_text(json.dumps({"args": vars(args), **results}, indent=1))
        DOC.write_text(text)
    return results


if __name__ == "__main__":
    main()
