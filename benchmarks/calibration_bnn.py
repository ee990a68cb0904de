"""Calibrated SWAG on a 1x50 BNN against NUTS; writes the ``bnn`` section of
docs/results/calibration.md.

Acceptance (issue 7): after calibration, 90 % predictive-interval coverage on test data within
±3 % of nominal and test log-likelihood within 0.05 nats/point of NUTS.

Data sets, fixed before any SWAG number was seen: the main job's default (scikit-learn
diabetes, split 0, :func:`pyro_swag.data.load_dataset`) and UCI yacht split 0 (the hard
case). The model is :func:`pyro_swag.compare.make_model` (1x50 tanh, N(0, 1) weights,
learned noise precision).

NUTS reference (``benchmarks/calibration_bnn_nuts.py``): two chains, each from its own MAP
(full-batch Adam from the network init of seed ``chain``), metrics cached in
``benchmarks/results/calibration_bnn_nuts.json``. SWAG: several seeds of each recipe, each
scored raw and calibrated (ELBO and PSIS on the training data; validation: the same recipe
trained on 90 % of the training data, scale chosen on the other 10 %), plus the MultiSWAG
mixture of the seeds. Metrics are :mod:`pyro_swag.compare_metrics`'s (exact mixture
quantiles for coverage).

    python benchmarks/calibration_bnn.py --nuts-only --datasets yacht --chains 0  # one chain
    python benchmarks/calibration_bnn.py                    # SWAG runs + table (NUTS cached)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyro
import torch
from torch.distributions import biject_to

from pyro_swag.calibrate import calibrate
from pyro_swag.compare import CompareConfig, make_model
from pyro_swag.compare_methods import guide_draws
from pyro_swag.compare_swag import train_swag
from pyro_swag.data import load_dataset
from pyro_swag.precondition import (
    estimate_preconditioner,
    preconditioned_curvature,
    preconditioned_lr,
)
from pyro_swag.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration import write_section  # noqa: E402  (benchmarks/ is not a package)
from calibration_bnn_nuts import (  # noqa: E402
    CACHE,
    _pool,
    _spec,
    load_cache,
    nuts_chain,
    save_chain,
    score,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "calibration.md"
DATASETS = ("diabetes", "yacht")
CALIBRATIONS = ("elbo", "psis", "validation")
RECIPES = ("main", "long", "precond", "rate", "rate_wide")
PRECONDITION = "full"
#: Relative damping of the preconditioner: 1e-3 diverged on BNNs (rank-deficient Fisher, see
#: docs/calibration.md "Damping, and networks"); 0.3 is that section's guidance for networks.
DAMPING = 0.3


# ----------------------------------------------------------------------------- SWAG
def recipe_config(recipe: str) -> CompareConfig:
    """The SWAG recipes (the same for every data set)."""
    base = CompareConfig(methods=("swag",))
    if recipe == "main":  # the main job's SWAG (README default)
        return base
    if recipe == "rate":  # the main job's, with the SWA rate c chosen on held-out data
        return replace(base, swa_c_grid=(0.03, 0.1, 0.3))
    if recipe == "rate_wide":  # `rate` one step further up: it chose c = 0.3, its top, on
        return replace(base, swa_c_grid=(0.1, 0.3, 1.0))  # 46 of 50 friedman runs
    if recipe in ("long", "precond"):  # longer pre-training (early stopping still decides)
        return replace(base, pretrain_steps=20000, patience=30, swa_snapshots=150)
    raise ValueError(f"recipe={recipe!r} is not one of {RECIPES}")


def _pack(collector, values: dict) -> torch.Tensor:
    """The collector's flat unconstrained vector of constrained site ``values``."""
    parts = []
    for name, site in collector.prototype_trace.iter_stochastic_nodes():
        value = biject_to(site["fn"].support).inv(values[name])
        parts.append(value.reshape(-1))
    return torch.cat(parts)


def train(model, data, recipe: str, seed: int) -> dict:
    """:func:`pyro_swag.compare_swag.train_swag` with ``recipe``'s settings; ``"precond"``
    replaces the SWA phase by a preconditioned one from the pre-trained MAP (``P`` estimated
    there with damping :data:`DAMPING`; the matched rate ``2B(1 - mu)/N`` capped at half the
    stability limit of ``P H``, :func:`pyro_swag.precondition.preconditioned_lr`)."""
    cfg = replace(recipe_config(recipe), seed=seed)
    if recipe != "precond":
        return train_swag(model, data, cfg, seed, quiet=True)
    run = train_swag(model, data, replace(cfg, swa_snapshots=2), seed, quiet=True)
    collector = run["collector"]
    old = collector.moments
    x, y, n = data.x_train, data.y_train, data.x_train.shape[0]
    start = time.perf_counter()
    map_loc = _pack(collector, run["map"])
    with torch.no_grad():
        collector.loc.copy_(map_loc)
    epoch = [(x[i], y[i]) for i in torch.randperm(n).split(cfg.batch_size)]
    pre = estimate_preconditioner(model, collector, epoch, num_data=n, kind=PRECONDITION,
                                  damping=DAMPING)
    lam = preconditioned_curvature(model, collector, epoch, pre, num_data=n)
    lr = preconditioned_lr(pre, num_data=n, batch_size=cfg.batch_size, momentum=0.9,
                           max_curvature=lam)
    for retry in range(cfg.swa_retries + 1):  # compare's rule: diverged -> 3x smaller rate
        collector.moments = type(old)(old.rank, old.min_var, old.deviation_dtype, old.device)
        with torch.no_grad():
            collector.loc.copy_(map_loc)
        try:
            guide, history = fit(model, collector, (x, y), epochs=cfg.swa_snapshots,
                                 swa_start=0, swa_lr=lr, batch_size=cfg.batch_size,
                                 swa_momentum=0.9, precondition=pre, quiet=True)
            if torch.isfinite(guide.loc).all():
                break
        except (ValueError, RuntimeError):
            if retry == cfg.swa_retries:
                raise
        lr /= 3
    run["swa_retries"] = retry
    run.update(guide=guide, swa_lr=history["swa_lr"], swa_s=time.perf_counter() - start)
    return run


def swag_seed(data, recipe: str, seed: int, draws: int) -> dict:
    """One SWAG run of ``recipe``: raw and calibrated scores, and the draws per variant."""
    model = make_model(data, seed=seed)
    start = time.perf_counter()
    run = train(model, data, recipe, seed)
    out = {"seed": seed, "swa_lr": run["swa_lr"], "tau": run["tau_hat"],
           "train_s": time.perf_counter() - start, "rows": {}, "draws": {}}
    guide = run["guide"]
    x, y = data.x_train, data.y_train

    def record(label, g, scale):
        pyro.set_rng_seed(seed)
        d = guide_draws(g, data, draws)
        ev = score(model, data, d)
        ev.pop("terms")
        out["rows"][label] = dict(ev, scale=scale)
        out["draws"][label] = d

    record("raw", guide, 1.0)
    for method in ("elbo", "psis"):
        guide.scale = 1.0
        res = calibrate(model, guide, x, y, method=method, num_samples=200)
        record(method, guide, res.scale)
    # validation: the same recipe on 90 % of the training data, scale from the other 10 %
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))
    val, tr = perm[: n // 10], perm[n // 10:]
    sub = replace(data, x_train=x[tr], y_train=y[tr])
    model_v = make_model(data, seed=seed)
    try:
        run_v = train(model_v, sub, recipe, seed)
    except (ValueError, RuntimeError) as err:
        out["validation_failed"] = f"{type(err).__name__}: {str(err)[:160]}"
        return out
    res = calibrate(model_v, run_v["guide"], x[val], y[val], method="validation", num_samples=200)
    pyro.set_rng_seed(seed)
    d = guide_draws(run_v["guide"], sub, draws)
    ev = score(model, data, d)
    ev.pop("terms")
    out["rows"]["validation"] = dict(ev, scale=res.scale)
    out["draws"]["validation"] = d
    return out


# ----------------------------------------------------------------------------- table
def _summary(values: list[float], fmt: str = "+.3f") -> str:
    """``mean [min, max]``, or the value alone when there is one."""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}–{hi:.3g}"


def _task(job: tuple) -> Path:
    """Run (or reuse) one SWAG seed; results in an uncommitted .pt file."""
    name, split, recipe, seed, draws, reuse = job
    torch.set_num_threads(1)
    path = CACHE.with_name(f"calibration_bnn_swag_{name}{split}_{recipe}_s{seed}.pt")
    config = repr(recipe_config(recipe)) + f" draws={draws}" + (
        f" precondition={PRECONDITION} damping={DAMPING}" if recipe == "precond" else "")
    if reuse and path.exists() and torch.load(path, weights_only=True)["config"] == config:
        return path
    start = time.perf_counter()
    try:
        out = swag_seed(load_dataset(name, split), recipe, seed, draws)
    except (ValueError, RuntimeError) as err:  # a diverged SWA phase is a result
        out = {"failed": f"{type(err).__name__}: {str(err)[:160]}", "rows": {}}
    out["config"] = config
    torch.save(out, path)
    print(f"{name} {recipe} seed {seed}: {time.perf_counter() - start:.0f} s, "
          + ", ".join(f"{k} LL {v['ll']:.3f} cov {v['cov90']:.3f}" for k, v in out["rows"].items()),
          flush=True)
    return path


def run_swag(args) -> dict:
    specs = [_spec(spec, args.split) for spec in args.datasets]
    jobs = [(name, split, recipe, seed, args.draws, not args.rerun)
            for name, split in specs for recipe in args.recipes for seed in range(args.seeds)]
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            paths = pool.map(_task, jobs, chunksize=1)
    else:
        paths = [_task(job) for job in jobs]
    return {job[:4]: torch.load(path, weights_only=True) for job, path in zip(jobs, paths)}


def dataset_table(spec: str, args, cache: dict, results: dict) -> tuple[str, list[dict]]:
    name, split = _spec(spec, args.split)
    data = load_dataset(name, split)
    key = f"{name}{split}"
    nuts = cache.get(key, {})
    if "pooled" not in nuts:
        raise RuntimeError(
            f"no pooled NUTS reference for {key} in {CACHE}; run "
            f"`python benchmarks/calibration_bnn.py --nuts-only --datasets {spec} --chains 0 1`"
        )
    ref = nuts["pooled"]["ll"]
    lines = [
        f"### {name} split {split} (N = {data.x_train.shape[0]}, test "
        f"{data.x_test.shape[0]}; one test point = {1 / data.x_test.shape[0]:.3f} of coverage)",
        "",
        "NUTS: " + "; ".join(
            f"chain {c[-1]}: LL {v['ll']:.3f}, coverage {v['cov90']:.3f}, RMSE {v['rmse']:.3g} "
            f"({v['warmup']}+{v['samples']}, depth {v['depth']}, {v['wall_s']:.0f} s)"
            for c, v in sorted(nuts.items()) if c.startswith("chain")
        ) + f"; pooled: LL **{ref:.3f}**, coverage {nuts['pooled']['cov90']:.3f}, "
        f"RMSE {nuts['pooled']['rmse']:.3g}.",
        "",
        "| recipe | variant | scale | test LL − NUTS: mean [min, max] | 90 % coverage | "
        "RMSE | LL within 0.05 | coverage within ±0.03 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    records = []
    model = make_model(data)
    for recipe in args.recipes:
        runs = [results[(name, split, recipe, s)] for s in range(args.seeds)]
        failed = [f"seed {s}: {r['failed']}" for s, r in enumerate(runs) if "failed" in r]
        runs = [r for r in runs if "failed" not in r]
        if failed:
            lines.append(f"| {recipe} | failed ({len(failed)}/{args.seeds}): "
                         + "; ".join(failed).replace("|", "/") + " | | | | | | |")
        if not runs:
            continue
        for variant in ("raw", *CALIBRATIONS):
            have = [r for r in runs if variant in r["rows"]]
            if not have:
                continue
            rows = [r["rows"][variant] for r in have]
            mixed = score(model, data, _pool([r["draws"][variant] for r in have]))
            for label, evs in ((f"SWAG, {len(have)} seeds", rows), ("MultiSWAG", [mixed])):
                d_ll = [e["ll"] - ref for e in evs]
                cov = [e["cov90"] for e in evs]
                ok_ll = sum(abs(v) <= 0.05 for v in d_ll)
                ok_cov = sum(abs(c - 0.9) <= 0.03 for c in cov)
                scale = "" if label == "MultiSWAG" else _range([e["scale"] for e in evs])
                lines.append(
                    f"| {recipe} | {label} {variant} | {scale} | {_summary(d_ll)} | "
                    f"{_summary(cov, '.3f')} | "
                    f"{sum(e['rmse'] for e in evs) / len(evs):.3g} | {ok_ll}/{len(evs)} | "
                    f"{ok_cov}/{len(evs)} |"
                )
                records.append({"dataset": name, "recipe": recipe, "label": label,
                                "variant": variant, "d_ll": d_ll, "cov": cov})
        lines.append(
            f"| {recipe} | SWA lr {_range([r['swa_lr'] for r in runs])}; τ̂ "
            + ", ".join(f"{r['tau']:.3g}" for r in runs)
            + "; train s " + ", ".join(f"{r['train_s']:.0f}" for r in runs) + " | | | | | | |"
        )
    return "\n".join(lines), records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS),
                   help="names, or name:split (default split: --split)")
    p.add_argument("--split", type=int, default=0)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES[:3]), choices=RECIPES)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--draws", type=int, default=200, help="posterior draws per SWAG variant")
    p.add_argument("--workers", type=int, default=1, help="SWAG seeds run in parallel")
    p.add_argument("--rerun", action="store_true", help="ignore cached SWAG seed results")
    p.add_argument("--nuts-only", action="store_true", help="run NUTS chains, no table")
    p.add_argument("--chains", type=int, nargs="+", default=[0, 1])
    p.add_argument("--map-steps", type=int, default=3000)
    p.add_argument("--nuts-warmup", type=int, default=300)
    p.add_argument("--nuts-samples", type=int, default=300)
    p.add_argument("--nuts-depth", type=int, default=8)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--swag-only", action="store_true", help="run/cache SWAG seeds, no table")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.swag_only:
        run_swag(args)
        return
    if args.nuts_only:
        for name in args.datasets:
            for chain in args.chains:
                ev = nuts_chain(name, chain, args)
                save_chain("".join(map(str, _spec(name, args.split))), chain, ev)
                print(f"{name} chain {chain}: {ev}", flush=True)
        return
    env = (f"torch {torch.__version__}, pyro {pyro.__version__}, 1 thread, load average "
           f"{os.getloadavg()[0]:.1f} at start")
    cache = load_cache()
    results = run_swag(args)
    tables = []
    for name in args.datasets:
        table, _ = dataset_table(name, args, cache, results)
        print(table, flush=True)
        tables.append(table)
    cmd = "python benchmarks/calibration_bnn.py " + " ".join(sys.argv[1:])
    legend = (
        "Recipes (`recipe_config`): `main` = the main job's SWAG (`compare_swag.train_swag`, "
        "default `CompareConfig`); `long` = ≤ 20000 pre-training steps (early stopping, patience "
        "30 checks) and 150 SWA epochs; `precond` = `long`'s pre-training, then a preconditioned "
        f"SWA phase (P {PRECONDITION}, damping {DAMPING}). Variants: raw (scale 1), ELBO and PSIS "
        "calibration on the training data, validation (same recipe on 90 % of the training data, "
        "scale from the other 10 %); MultiSWAG = the equal mixture of the seeds' draws. Target: "
        "LL within 0.05 of NUTS's pooled LL and coverage within 0.87–0.93. NUTS chains and SWAG "
        "seeds are reused from their cache files under benchmarks/results/ when present (`--rerun` "
        "redoes the SWAG seeds); their wall times are from the load at the time they ran."
    )
    write_section(args.out, "bnn", "## 1x50 BNN against NUTS\n\nMeasured with `"
                  + cmd.strip() + f"` ({env}).\n\n" + legend + "\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
