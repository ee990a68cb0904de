"""Figures and netCDF files of :func:`pyro_swag.compare` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._plotting import pyplot as _plt

__all__ = ["calibration_plot", "forest_plot", "predictive_plot"]


def _grid(n: int):
    plt = _plt()
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, list(axes.flat)


def predictive_plot(path: Path, data, evals: dict, summary: dict) -> None:
    """Regression: predictive mean ± 2 sd against observed (original units).

    Classification: histogram of the predictive probability of the observed class.
    """
    names = list(evals)
    if not names:
        return
    plt, fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        ev = evals[name]
        label = summary["methods"][name]["label"]
        if data.is_regression:
            y = data.to_original(data.y_test).numpy()
            m = data.to_original(ev["_mean"]).numpy()
            s = (ev["_sd"] * data.y_std).numpy()
            ax.errorbar(y, m, yerr=2 * s, fmt="o", ms=2, lw=0.5, alpha=0.6)
            lo, hi = float(y.min()), float(y.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xlabel("observed")
            ax.set_ylabel("predicted (± 2 sd)")
        else:
            probs = ev["_probs"]
            p_obs = probs.gather(-1, data.y_test.long().unsqueeze(-1)).squeeze(-1).numpy()
            ax.hist(p_obs, bins=20, range=(0, 1))
            ax.set_xlabel("predictive probability of the observed class")
        ax.set_title(f"{label}: LL {summary['methods'][name]['test_ll']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def calibration_plot(path: Path, data, evals: dict, results, model, summary: dict) -> None:
    """Regression: coverage of central intervals against nominal (from the PIT values).

    Classification: reliability diagram (accuracy against confidence, 10 bins).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="ideal")
    levels = np.linspace(0.05, 0.95, 19)
    for name, ev in evals.items():
        label = summary["methods"][name]["label"]
        if data.is_regression:
            pit = ev["_pit"].numpy()
            cover = [np.mean(np.abs(pit - 0.5) <= lev / 2) for lev in levels]
            ax.plot(levels, cover, marker=".", label=label)
        else:
            conf, pred = ev["_probs"].max(-1)
            correct = (pred == data.y_test.long()).float()
            edges = torch.linspace(0, 1, 11)
            xs, ys = [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                mask = (conf > lo) & (conf <= hi)
                if mask.sum() > 0:
                    xs.append(float(conf[mask].mean()))
                    ys.append(float(correct[mask].mean()))
            ax.plot(xs, ys, marker=".", label=label)
    if data.is_regression:
        ax.set_xlabel("nominal central interval level")
        ax.set_ylabel("observed coverage (test)")
    else:
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _scalars(draws: dict[str, torch.Tensor], k: int = 6) -> list[tuple[str, int]]:
    """A few latent scalars: the sites with fewest entries first."""
    picked = []
    for name, v in sorted(draws.items(), key=lambda kv: (kv[1][0].numel(), kv[0])):
        for j in range(min(v[0].numel(), k - len(picked))):
            picked.append((name, j))
        if len(picked) >= k:
            break
    return picked


def forest_plot(path: Path, results: dict, summary: dict) -> None:
    """Median and 90 % interval of a few latent scalars, one row per method."""
    ok = {n: r for n, r in results.items() if r.status == "ok" and r.draws}
    if not ok:
        return
    ref = ok.get("nuts") or ok.get("swag") or next(iter(ok.values()))
    scalars = _scalars(ref.draws)
    plt, fig, axes = _grid(len(scalars))
    for ax, (site, j) in zip(axes, scalars):
        for row, res in enumerate(ok.values()):
            if site not in res.draws:
                continue
            v = res.draws[site].reshape(res.draws[site].shape[0], -1)[:, j].double()
            q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=v.dtype)).numpy()
            ax.plot([q[0], q[2]], [row, row], lw=2)
            ax.plot(q[1], row, "ko", ms=3)
        ax.set_yticks(range(len(ok)))
        ax.set_yticklabels([summary["methods"][n]["label"] for n in ok], fontsize=7)
        ax.set_title(f"{site}[{j}]", fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
