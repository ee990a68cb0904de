r"""Importance-weighted posterior summaries (NumPy): with normalised weights :math:`w_s`,
mean :math:`\sum_s w_s\theta_s`, sd :math:`(\sum_s w_s(\theta_s - \bar\theta)^2)^{1/2}`, and
the equal-tailed interval from the weighted empirical CDF."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

#: Pareto k-hat above which importance weights p/q are unreliable (Vehtari et al. 2024).
KHAT_MAX = 0.7


def warn_khat(khat: float, ess: float, draws: int, what: str) -> None:
    """Warn when the guide's PSIS k-hat is above :data:`KHAT_MAX`."""
    if khat > KHAT_MAX:
        warnings.warn(
            f"the guide's Pareto k-hat is {khat:.2f} > {KHAT_MAX} (ESS {ess:.0f} of "
            f"{draws} draws): its p/q weights are unreliable, and so is this "
            f"{what}; widen or calibrate the guide (pyro_swag.calibrate), or compare "
            "methods on held-out data",
            RuntimeWarning,
            stacklevel=3,
        )


def _quantile(values: np.ndarray, w: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cdf = np.cumsum(w[order]) - 0.5 * w[order]  # mid-point rule: symmetric in the draws
    return float(np.interp(q, cdf, values[order]))


def weighted_table(values: dict[str, np.ndarray], w: np.ndarray, ci_prob: float) -> pd.DataFrame:
    """One row per scalar of ``values`` (``{name: (S, *shape)}``), named like ArviZ's
    summary (``w[0]``, ``L[1, 2]``): ``mean``, ``sd`` and the ``ci_prob`` equal-tailed
    interval ``eti<p>_lb`` / ``eti<p>_ub`` under the weights ``w`` (S,), summing to 1."""
    pct = f"{100 * ci_prob:g}"
    lo, hi = (1 - ci_prob) / 2, (1 + ci_prob) / 2
    rows, index = [], []
    for name, v in values.items():
        flat = np.asarray(v, dtype=float).reshape(v.shape[0], -1)
        shape = v.shape[1:]
        for j in range(flat.shape[1]):
            col = flat[:, j]
            mean = float(w @ col)
            rows.append([mean, float(np.sqrt(w @ (col - mean) ** 2)),
                         _quantile(col, w, lo), _quantile(col, w, hi)])
            idx = np.unravel_index(j, shape) if shape else ()
            index.append(name + (f"[{', '.join(map(str, idx))}]" if shape else ""))
    return pd.DataFrame(rows, index=index,
                        columns=["mean", "sd", f"eti{pct}_lb", f"eti{pct}_ub"])
