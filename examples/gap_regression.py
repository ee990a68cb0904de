"""1-D regression with a gap in the inputs: a 1x50 Bayesian MLP trained with ``pyro_swag.fit``.

Inputs lie in [-1, -0.3] U [0.3, 1], y = cos(4x) + 0.05 eps; the model is a 1x50 ReLU
``BayesianMLP`` (N(0, 1) priors, learned noise precision). The script fits MultiSWAG (``--runs``
independent ``fit`` runs, 5 by default; 1 is plain SWAG), each with 800 epochs of Adam
pre-training and a preconditioned SWA phase (``--precondition none`` for plain SGD), reports
the mean width of the 95 % predictive interval inside the gap and over the data, their ratio
and the coverage of held-out in-range points, and writes ``gap_regression.png`` into
``--out``, with the exact posterior's band (NUTS, cached in
``benchmarks/results/gap_nuts.json``; ``--nuts`` recomputes it, slow).

    python examples/gap_regression.py --out docs/img
    python examples/gap_regression.py --smoke --out /tmp/gap
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Predictive

from pyro_swag import SWAGCollector
from pyro_swag.models import BayesianMLP
from pyro_swag.multiswag import fit_runs
from pyro_swag.train import fit

NOISE = 0.05
ACTIVATION = "relu"
NUTS_CACHE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gap_nuts.json"
GRID = torch.linspace(-1.2, 1.2, 241)


def gap_data(n: int, seed: int, noise: float = NOISE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points with x uniform on [-1, -0.3] U [0.3, 1], y = cos(4x) + noise * eps."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) * 1.4 - 0.7
    x = torch.where(u < 0, u - 0.3, u + 0.3)
    y = torch.cos(4 * x) + noise * torch.randn(n, generator=g)
    return x[:, None], y


def make_model(activation: str = ACTIVATION) -> BayesianMLP:
    """The 1x50 network: N(0, 1) priors, noise precision ~ Gamma(1, 0.01)."""
    return BayesianMLP(1, 1, hidden=(50,), activation=activation)


def fit_one(seed: int, x: torch.Tensor, y: torch.Tensor, *, epochs: int, swa_start: int,
            swa_lr: float | str, lr: float = 0.01, batch_size: int = 20,
            activation: str = ACTIVATION, quiet: bool | None = True,
            model: BayesianMLP | None = None, **fit_kw):
    """One SWAG run: Adam(``lr``) pre-training, then SGD at ``swa_lr``; returns the guide.

    Predict with the bare ``model`` (``guide.model`` is wrapped in the collector's
    ``InitMessenger``, which would replace the unobserved ``obs`` by a median).
    """
    pyro.clear_param_store()
    model = make_model(activation) if model is None else model
    collector = SWAGCollector(model, rank=20)
    guide, history = fit(
        model, collector, (x, y), epochs=epochs, swa_start=swa_start, swa_lr=swa_lr,
        batch_size=batch_size, optim=pyro.optim.Adam({"lr": lr}), seed=seed, quiet=quiet,
        **fit_kw,
    )
    guide.history = history
    return guide


def interval_widths(draws: torch.Tensor, grid: torch.Tensor) -> tuple[float, float]:
    """Mean 95 % interval width of ``draws`` (S, len(grid)) in the gap and over the data."""
    width = draws.quantile(0.975, 0) - draws.quantile(0.025, 0)
    in_gap = grid.abs() < 0.3
    on_data = (grid.abs() >= 0.3) & (grid.abs() <= 1.0)
    return width[in_gap].mean().item(), width[on_data].mean().item()


def evaluate(draws: torch.Tensor, y_test: torch.Tensor) -> dict:
    """Widths, their ratio, held-out coverage and the 95 % band on :data:`GRID`, from
    predictive ``draws`` at ``GRID`` followed by the test inputs."""
    n = len(GRID)
    gap_width, data_width = interval_widths(draws[:, :n], GRID)
    lo, hi = draws.quantile(0.025, 0), draws.quantile(0.975, 0)
    return {
        "gap_width": gap_width, "data_width": data_width, "ratio": gap_width / data_width,
        "coverage": ((y_test >= lo[n:]) & (y_test <= hi[n:])).float().mean().item(),
        "lo": lo[:n].tolist(), "hi": hi[:n].tolist(),
    }


def run(seed: int = 0, runs: int = 5, epochs: int = 900, swa_start: int = 800,
        swa_lr: float | str = "auto", precondition: str | None = "full", num_samples: int = 400,
        quiet: bool | None = True, processes: int = 1, activation: str = ACTIVATION,
        **fit_kw) -> dict:
    """Fit SWAG (``runs=1``) or MultiSWAG on the data of ``seed`` and evaluate it.

    The default recipe: per run, 800 epochs of Adam pre-training, then 100 epochs of the
    preconditioned SWA phase at the automatic rate; 5 runs (MultiSWAG). ``precondition=None``
    with ``swa_lr=2.5e-4`` is the plain-SGD SWA phase.

    Returns the widths in the gap and over the data, the held-out in-range coverage, the
    guide and the predictive draws on :data:`GRID` for the plot.
    """
    x, y = gap_data(100, seed)
    x_test, y_test = gap_data(200, seed + 1000)
    fit_run = functools.partial(fit_one, x=x, y=y, epochs=epochs, swa_start=swa_start,
                                swa_lr=swa_lr, activation=activation, quiet=quiet,
                                precondition=precondition, **fit_kw)
    t0 = time.perf_counter()
    model = make_model(activation)
    if runs == 1:
        guide = fit_run(seed, model=model)
    else:
        guide = fit_runs(fit_run, [100 * seed + r for r in range(runs)], model=model,
                         processes=processes, progress=not quiet)
    seconds = time.perf_counter() - t0
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=num_samples)(
            torch.cat([GRID[:, None], x_test]))["obs"]
    summary = evaluate(draws, y_test)
    del summary["lo"], summary["hi"]
    return {**summary, "seconds": seconds, "guide": guide, "model": model,
            "plot": (x, y, draws[:, : len(GRID)])}


def nuts_samples(seed: int = 0, warmup: int = 200, num_samples: int = 200,
                 map_steps: int = 3000) -> dict:
    """Exact-posterior reference: Pyro NUTS (tree depth 8) on the data of ``seed``.

    Started at a MAP point (``map_steps`` full-batch Adam(0.01) steps on a
    :class:`~pyro_swag.SWAGCollector` from the network's init). Slow: about 15-30 min.
    """
    from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
    from pyro.infer.autoguide.initialization import init_to_value
    from torch.distributions import biject_to

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    x, y = gap_data(100, seed)
    model = make_model()
    collector = SWAGCollector(model, rank=2, init_loc_fn=model.init_loc_fn())
    svi = SVI(model, collector, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(map_steps):
        svi.step(x, y)
    init = {site["name"]: biject_to(site["fn"].support)(value)
            for site, value in collector._unpack_latent(collector.loc.detach())}
    kernel = NUTS(model, max_tree_depth=8, jit_compile=True, ignore_jit_warnings=True,
                  init_strategy=init_to_value(values=init))
    mcmc = MCMC(kernel, warmup_steps=warmup, num_samples=num_samples)
    mcmc.run(x, y)
    return {k: v.detach() for k, v in mcmc.get_samples().items()}


def summarize_nuts(samples: dict, seed: int = 0) -> dict:
    """Widths, ratio, coverage and the 95 % band on :data:`GRID` of NUTS ``samples``."""
    model = make_model()
    x_test, y_test = gap_data(200, seed + 1000)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        draws = Predictive(model, posterior_samples=samples)(
            torch.cat([GRID[:, None], x_test]))["obs"]
    return {**evaluate(draws, y_test), "noise_sd": samples["precision"].rsqrt().mean().item(),
            "num_draws": draws.shape[0]}


def load_nuts(path: Path = NUTS_CACHE) -> dict | None:
    """The cached NUTS reference (widths, band on :data:`GRID`), or ``None``."""
    return json.loads(path.read_text()) if path.exists() else None


def plot(result: dict, path: Path, nuts: dict | None = None, label: str = "SWAG") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, draws = result["plot"]
    g = GRID
    lo, hi = draws.quantile(0.025, 0), draws.quantile(0.975, 0)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.axvspan(-0.3, 0.3, color="0.92", label="gap (no data)")
    if nuts is not None:
        ax.plot(g, nuts["lo"], "C3-", lw=1, label=f"NUTS 95% (ratio {nuts['ratio']:.2f})")
        ax.plot(g, nuts["hi"], "C3-", lw=1)
    ax.fill_between(g, lo, hi, alpha=0.35, label=f"{label} 95% (ratio {result['ratio']:.2f})")
    ax.plot(g, draws.mean(0), lw=1.5, label=f"{label} predictive mean")
    ax.plot(g, torch.cos(4 * g), "k--", lw=1, label="truth cos(4x)")
    ax.scatter(x[:, 0], y, s=8, c="k", label="training data")
    ax.set(xlabel="x", ylabel="y", ylim=(-2.5, 1.8))
    ax.set_title(f"{label}: 95% interval width gap / data = {result['ratio']:.2f}, "
                 f"held-out coverage = {result['coverage']:.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=5,
                        help="independent SWAG runs (MultiSWAG); 1: plain SWAG")
    parser.add_argument("--processes", type=int, default=2, help="worker processes for the runs")
    parser.add_argument("--epochs", type=int, default=900)
    parser.add_argument("--swa-start", type=int, default=800)
    parser.add_argument("--precondition", choices=["none", "diag", "full"], default="full",
                        help="preconditioned SWA phase at swa_lr='auto'; none: plain SGD at 2.5e-4")
    parser.add_argument("--smoke", action="store_true", help="tiny run (< 20 s)")
    parser.add_argument("--nuts", action="store_true",
                        help=f"recompute the NUTS reference into {NUTS_CACHE.name} (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.nuts:
        NUTS_CACHE.write_text(json.dumps(summarize_nuts(nuts_samples(args.seed), args.seed)))
    sizes = dict(epochs=args.epochs, swa_start=args.swa_start)
    if args.precondition == "none":
        sizes.update(precondition=None, swa_lr=2.5e-4)
    else:
        sizes.update(precondition=args.precondition, swa_lr="auto")
    sizes["runs"] = args.runs
    if args.smoke:
        sizes.update(epochs=12, swa_start=6, num_samples=30, runs=2)
        args.processes = 1
    result = run(seed=args.seed, processes=args.processes,
                 quiet=True if args.smoke else None, **sizes)
    nuts = load_nuts() if args.seed == 0 else None
    label = "SWAG" if sizes["runs"] == 1 else f"MultiSWAG x{sizes['runs']}"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / "gap_regression.png", nuts, label)
    print(f"{label}: 95% interval width: gap {result['gap_width']:.3f}, "
          f"data {result['data_width']:.3f}")
    print(f"gap width / data width = {result['ratio']:.2f}")
    print(f"held-out in-range coverage = {result['coverage']:.3f}")
    if nuts is not None:
        print(f"NUTS (cached): gap {nuts['gap_width']:.3f}, data {nuts['data_width']:.3f}, "
              f"ratio {nuts['ratio']:.2f}, coverage {nuts['coverage']:.3f}")
    print(f"fit took {result['seconds']:.1f} s; wrote {args.out / 'gap_regression.png'}")


if __name__ == "__main__":
    main()
