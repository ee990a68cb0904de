"""1-D regression with a gap in the inputs: a 1x50 Bayesian MLP trained with ``pyro_swag.fit``.

Inputs lie in [-1, -0.3] U [0.3, 1]; the script reports the mean width of the 95 % predictive
interval inside the gap and over the data, the coverage of held-out in-range points, and
writes ``gap_regression.png`` into ``--out``.

    python examples/gap_regression.py --out docs/img
    python examples/gap_regression.py --smoke --out /tmp/gap
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Predictive

from pyro_swag import SWAGCollector
from pyro_swag.models import BayesianMLP
from pyro_swag.train import fit


def gap_data(n: int, seed: int, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points with x uniform on [-1, -0.3] U [0.3, 1], y = cos(4x) + noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) * 1.4 - 0.7
    x = torch.where(u < 0, u - 0.3, u + 0.3)
    y = torch.cos(4 * x) + noise * torch.randn(n, generator=g)
    return x[:, None], y


def run(seed: int = 0, epochs: int = 200, swa_start: int = 100, swa_lr: float = 3e-3,
        num_samples: int = 200, quiet: bool = True) -> dict:
    """Fit and evaluate; returns widths, coverage, the guide and plot data."""
    pyro.clear_param_store()
    x, y = gap_data(100, seed)
    x_test, y_test = gap_data(200, seed + 1000)
    model = BayesianMLP(1, 1, hidden=(50,))  # learned noise precision
    collector = SWAGCollector(model, rank=20)
    t0 = time.perf_counter()
    guide, history = fit(
        model, collector, (x, y), epochs=epochs, swa_start=swa_start, swa_lr=swa_lr,
        batch_size=20, optim=pyro.optim.Adam({"lr": 0.03}), seed=seed, quiet=quiet,
    )
    seconds = time.perf_counter() - t0
    grid = torch.linspace(-1.2, 1.2, 241)[:, None]
    predictive = Predictive(model, guide=guide, num_samples=num_samples)
    with torch.no_grad():
        draws = predictive(torch.cat([grid, x_test]))["obs"]
    lo, hi = draws.quantile(0.025, 0), draws.quantile(0.975, 0)
    g = grid[:, 0]
    width = (hi - lo)[: len(g)]
    in_gap = g.abs() < 0.3
    on_data = (g.abs() >= 0.3) & (g.abs() <= 1.0)
    lo_t, hi_t = lo[len(g):], hi[len(g):]
    return {
        "gap_width": width[in_gap].mean().item(),
        "data_width": width[on_data].mean().item(),
        "coverage": ((y_test >= lo_t) & (y_test <= hi_t)).float().mean().item(),
        "seconds": seconds,
        "history": history,
        "plot": (x, y, g, draws[:, : len(g)]),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, g, draws = result["plot"]
    lo, hi = draws.quantile(0.025, 0), draws.quantile(0.975, 0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.axvspan(-0.3, 0.3, color="0.92", label="gap (no data)")
    ax.fill_between(g, lo, hi, alpha=0.35, label="SWAG 95% predictive interval")
    ax.plot(g, draws.mean(0), lw=1.5, label="predictive mean")
    ax.plot(g, torch.cos(4 * g), "k--", lw=1, label="truth")
    ax.scatter(x[:, 0], y, s=8, c="k", label="training data")
    ax.set(xlabel="x", ylabel="y", title=(
        f"gap width / data width = {result['gap_width'] / result['data_width']:.2f}, "
        f"coverage = {result['coverage']:.2f}"))
    ax.legend(fontsize=7, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run (< 20 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = dict(epochs=12, swa_start=6, num_samples=30) if args.smoke else {}
    result = run(seed=args.seed, quiet=True if args.smoke else None, **sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / "gap_regression.png")
    ratio = result["gap_width"] / result["data_width"]
    print(f"95% interval width: gap {result['gap_width']:.3f}, data {result['data_width']:.3f}")
    print(f"gap width / data width = {ratio:.2f}")
    print(f"held-out in-range coverage = {result['coverage']:.3f}")
    print(f"fit took {result['seconds']:.1f} s; wrote {args.out / 'gap_regression.png'}")


if __name__ == "__main__":
    main()
