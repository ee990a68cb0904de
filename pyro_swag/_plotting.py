"""Headless matplotlib for the package's own figures (ArviZ's figures: :mod:`.datatree`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend unless one was chosen already."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def calibration_curve(result, ax: Any = None, path: str | Path | None = None):
    """The criterion of a :class:`~pyro_swag.calibrate.Calibration` against the scale (log
    axis), the chosen scale marked; the ELBO with a band of ±2 Monte Carlo standard errors,
    PSIS's ESS with k̂ on a second axis (threshold 0.7). Returns the axes."""
    from ._weighted import KHAT_MAX

    plt = pyplot()
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(5, 3.4))
    s, y = result.scales, result.curve[result.criterion]
    ax.plot(s, y, "o-", ms=3, color="C0", label=result.criterion)
    if "elbo_se" in result.curve:
        se = result.curve["elbo_se"]
        ax.fill_between(s, [v - 2 * e for v, e in zip(y, se)], [v + 2 * e for v, e in zip(y, se)],
                        color="C0", alpha=0.2, lw=0, label="± 2 MC se")
    if "khat" in result.curve:
        ax.set_ylim(0, result.num_samples)  # ESS out of the draws
        twin = ax.twinx()
        khat = result.curve["khat"]
        twin.plot(s, khat, "s-", ms=3, color="C1", label="k̂")
        off = [i for i, k in enumerate(khat) if k == math.inf]  # the tail fit broke down
        if off:
            top = max([k for k in khat if math.isfinite(k)] + [KHAT_MAX]) * 1.2
            twin.plot([s[i] for i in off], [top] * len(off), "^", ms=5, color="C1",
                      label="k̂ = ∞ (plotted at the top)")
        twin.axhline(KHAT_MAX, color="C1", ls=":", lw=1)
        twin.set_ylabel("Pareto k̂", color="C1")
    ax.axvline(result.scale, color="k", ls="--", lw=1, label=f"chosen {result.scale:.3g}")
    ylabel = f"ESS (of {result.num_samples} draws)" if "khat" in result.curve else result.criterion
    ax.set(xscale="log", xlabel="scale", ylabel=ylabel,
           title=f"{result.method}: scale {result.scale:.3g}")
    ax.legend(fontsize="small", loc="best")
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    if own and path is not None:
        plt.close(ax.figure)
    return ax
