r"""Choosing SWAG's covariance ``scale`` three ways, each returning the curve it optimised.

For a SWAG guide :math:`q_s = \mathcal{N}(\mu, s\,\Sigma)` (``guide.scale`` :math:`= s`) one set
of draws at the guide's current scale :math:`s_0` is reused for every scale (common random
numbers), so each curve is a smooth deterministic function of :math:`s`:

.. math::

    \theta_j(s) = \mu + \sqrt{s / s_0}\,(\theta_j - \mu), \qquad
    \log q_s(\theta_j(s)) = \log q_{s_0}(\theta_j) - \tfrac{D}{2}\log(s / s_0).

The criteria, all in the unconstrained latent space (:math:`\log p` includes the Jacobian of
the constraining transforms):

* ``"validation"`` — log pointwise predictive density of held-out data,
  :math:`\frac1n\sum_i \log \frac1S\sum_j p(y_i \mid \theta_j(s))` (the paper's way);
* ``"elbo"`` — :math:`\mathrm{ELBO}(s) = \mathbb{E}_{q_s}[\log p(\theta, y)] + H[q_s]
  = \log p(y) - \mathrm{KL}(q_s \,\|\, p(\theta \mid y))`, Monte Carlo in the first term,
  exact entropy; needs no held-out data;
* ``"psis"`` — Pareto-smoothed importance sampling of :math:`w = p(\theta, y) / q_s(\theta)`:
  the chosen scale maximises the PSIS effective sample size among scales with Pareto
  :math:`\hat k \le 0.7` (the guide's current scale, with a warning, if none qualifies).

Each search evaluates a log-spaced grid (extended by factors of 2 while the best value sits at
an end of it), then refines around the best grid point by golden-section search in
:math:`\log s` (``refine``). With ``apply=True`` (default) the chosen
scale is set on the guide and the result recorded as ``guide.calibration`` (a plain dict,
saved in the guide's ``state_dict`` and exported to DataTree attributes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ._checks import is_int
from ._weighted import KHAT_MAX
from .autoguide import SWAGGuide
from .datatree import psis_diagnostic
from .predictive import log_joint, log_likelihood, sample_latents, unpack_latents

__all__ = [
    "Calibration",
    "calibrate",
    "calibrate_elbo",
    "calibrate_psis",
    "calibrate_validation",
    "default_scales",
]

METHODS = ("validation", "elbo", "psis")
#: PSIS fits a generalised Pareto to the largest ``num_samples // 5`` ratios (arviz-stats,
#: up to 225 draws) and needs at least 5 of them.
PSIS_MIN_SAMPLES = 25
SCALE_RANGE = (2.0**-20, 2.0**12)
_GOLDEN = (math.sqrt(5) - 1) / 2


def default_scales() -> list[float]:
    """The default grid: :math:`2^{-6}, 2^{-5.5}, \\dots, 2^{4}` (21 values)."""
    return [2.0 ** (k / 2) for k in range(-12, 9)]


@dataclass
class Calibration:
    """The scale chosen by one criterion and the curve it optimised.

    Attributes
    ----------
    method : str
        ``"validation"``, ``"elbo"`` or ``"psis"``.
    scale : float
        The chosen scale.
    scales : list of float
        Scales evaluated (grid plus refinement), increasing.
    curve : dict of str to list of float
        The criterion and its companions at each of ``scales``: ``log_likelihood``
        (validation, nats per point); ``elbo`` and ``elbo_se`` (Monte Carlo standard error);
        ``khat`` and ``ess`` (PSIS).
    criterion : str
        The key of ``curve`` that was optimised.
    num_samples : int
        Draws per scale.
    initial_scale : float
        The guide's scale before calibration.
    """

    method: str
    scale: float
    scales: list[float]
    curve: dict[str, list[float]]
    criterion: str
    num_samples: int
    initial_scale: float

    def to_dict(self) -> dict:
        """Plain Python (floats, lists, str) for ``state_dict`` and DataTree attributes."""
        return asdict(self)

    def best(self) -> float:
        """The criterion's value at the chosen scale."""
        return self.curve[self.criterion][self.scales.index(self.scale)]

    def plot(self, ax=None, path=None):
        """The curve against the scale, the choice marked (matplotlib axes; ``path``: also
        save it as an image)."""
        from ._plotting import calibration_curve

        return calibration_curve(self, ax=ax, path=path)


# ------------------------------------------------------------------ model evaluations
def _pointwise_log_lik(model, guide, latents, *args, **kwargs) -> torch.Tensor:
    """(S, n): log-likelihood of each data point, summed over the observed sites."""
    out = log_likelihood(model, unpack_latents(guide, latents), *args, **kwargs)
    return sum(v.reshape(v.shape[0], -1) for v in out.values())


def _psis(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[float, float]:
    """Pareto k-hat and PSIS effective sample size of ``exp(log_p - log_q)``."""
    if not torch.isfinite(log_p - log_q).all():
        return math.inf, 0.0  # the model's density underflows/overflows at this scale
    return psis_diagnostic(log_p, log_q)


# ------------------------------------------------------------------ search
def _check(guide, scales, num_samples, refine_iters: int = 0) -> list[float]:
    if not isinstance(guide, SWAGGuide):
        raise TypeError(
            f"guide must be a SWAGGuide (a Gaussian with a settable scale), got "
            f"{type(guide).__name__}; make one with collector.swag_guide()"
        )
    if not is_int(num_samples, 2):
        raise ValueError(f"num_samples must be an int >= 2, got num_samples={num_samples!r}")
    if not is_int(refine_iters, 0):
        raise ValueError(f"refine_iters must be an int >= 0, got refine_iters={refine_iters!r}")
    if scales is not None and not isinstance(scales, (list, tuple, torch.Tensor)):
        raise TypeError(
            f"scales must be a list of scales, got scales={scales!r}; e.g. scales=[{scales!r}]"
        )
    scales = default_scales() if scales is None else [float(s) for s in scales]
    if not scales or not all(0 < s < math.inf for s in scales):
        raise ValueError(
            f"scales must be a non-empty list of positive finite numbers, got scales={scales}; "
            "omit it for the default grid"
        )
    return sorted(set(scales))


def _search(objective: Callable[[float], float], scales: list[float], refine: bool, iters: int):
    """Maximise ``objective`` over ``scales``, then golden-section in log s around the best.

    When the best scale is an end of the grid, the grid is extended by factors of 2 (within
    ``SCALE_RANGE``) until the criterion turns.

    Returns the best scale and ``{scale: value}`` of every evaluation.
    """
    values: dict[float, float] = {}

    def f(s: float) -> float:
        if s not in values:
            values[s] = objective(s)
        return values[s]

    def best() -> float:
        finite = {s: v for s, v in values.items() if math.isfinite(v)}
        if not finite:
            raise RuntimeError(
                "the calibration criterion is not finite at any scale; check the model and data"
            )
        return max(finite, key=finite.get)

    for s in scales:
        f(s)
    while refine:  # the optimum at an end of the grid: extend it by factors of 2
        top, low, s = max(values), min(values), best()
        if s == top and top < SCALE_RANGE[1]:
            f(top * 2)
        elif s == low and low > SCALE_RANGE[0]:
            f(low / 2)
        else:
            break
    scales = sorted(values)
    i = scales.index(best())
    if len(scales) > 1 and i in (0, len(scales) - 1):
        warnings.warn(
            f"the best scale, {scales[i]:.3g}, is the {'smallest' if i == 0 else 'largest'} "
            f"one evaluated: the criterion may still improve beyond it; pass a wider scales= "
            + ("grid" if refine else "grid or refine=True (which extends the grid)"),
            stacklevel=3,
        )
    if refine and 0 < i < len(scales) - 1:
        lo, hi = math.log(scales[i - 1]), math.log(scales[i + 1])
        a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        for _ in range(iters):
            if f(math.exp(a)) >= f(math.exp(b)):
                hi, b = b, a
                a = hi - _GOLDEN * (hi - lo)
            else:
                lo, a = a, b
                b = lo + _GOLDEN * (hi - lo)
    return best(), dict(sorted(values.items()))


class _Draws:
    """Common random numbers: draws at the guide's scale, rescaled about ``guide.loc``."""

    def __init__(self, guide: SWAGGuide, num_samples: int, args, kwargs) -> None:
        self.s0 = guide.scale
        self.base = sample_latents(guide, num_samples, *args, **kwargs)
        with torch.no_grad():
            q = guide.get_posterior()
            self.log_q0 = q.log_prob(self.base)
            self.entropy0 = float(q.entropy())
        self.loc = guide.loc
        self.dim = guide.loc.numel()

    def at(self, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = s / self.s0
        latents = self.loc + math.sqrt(ratio) * (self.base - self.loc)
        return latents, self.log_q0 - 0.5 * self.dim * math.log(ratio)

    def entropy(self, s: float) -> float:
        return self.entropy0 + 0.5 * self.dim * math.log(s / self.s0)


def _finish(guide, result: Calibration, apply: bool) -> Calibration:
    if apply:
        guide.scale = result.scale
        guide.calibration = result.to_dict()
    return result


def calibrate_validation(
    model: Callable,
    guide: SWAGGuide,
    *args,
    scales: list[float] | None = None,
    num_samples: int = 100,
    refine: bool = True,
    refine_iters: int = 6,
    apply: bool = True,
    **kwargs,
) -> Calibration:
    """Choose the scale maximising the held-out log predictive density per point.

    Parameters
    ----------
    model : callable
        The Pyro model.
    guide : SWAGGuide
        The SWAG posterior; its scale is changed when ``apply``.
    *args, **kwargs
        Validation data as the model takes it, observations included, e.g. ``x_val, y_val``.
    scales : list of float, optional
        Grid of scales (default :func:`default_scales`).
    num_samples : int
        Posterior draws, shared by all scales.
    refine : bool
        Extend the grid past an end holding the optimum, then golden-section refinement
        between the best point's neighbours; ``False`` evaluates the grid only.
    refine_iters : int
        Refinement steps.
    apply : bool
        Set ``guide.scale`` and ``guide.calibration``.

    Returns
    -------
    Calibration
        ``curve["log_likelihood"]`` in nats per validation point.
    """
    grid = _check(guide, scales, num_samples, refine_iters)
    num_samples = int(num_samples)
    draws = _Draws(guide, num_samples, args, kwargs)

    def lppd(s: float) -> float:
        latents, _ = draws.at(s)
        with torch.no_grad():
            ll = _pointwise_log_lik(model, guide, latents, *args, **kwargs)
        return float((ll.logsumexp(0) - math.log(ll.shape[0])).mean())

    chosen, values = _search(lppd, grid, refine, refine_iters)
    curve = {"log_likelihood": list(values.values())}
    result = Calibration(
        "validation", chosen, list(values), curve, "log_likelihood", num_samples, draws.s0
    )
    return _finish(guide, result, apply)


def calibrate_elbo(
    model: Callable,
    guide: SWAGGuide,
    *args,
    scales: list[float] | None = None,
    num_samples: int = 100,
    refine: bool = True,
    refine_iters: int = 6,
    apply: bool = True,
    **kwargs,
) -> Calibration:
    """Choose the scale maximising the ELBO of the SWAG Gaussian (no held-out data).

    ``*args, **kwargs`` are the *training* data as the model takes them (the full data set,
    not a minibatch, so that :math:`\\log p(\\theta, y)` is the whole joint). Other
    parameters as in :func:`calibrate_validation`; ``curve`` holds ``elbo`` and its Monte
    Carlo standard error ``elbo_se`` (the entropy term is exact).
    """
    grid = _check(guide, scales, num_samples, refine_iters)
    num_samples = int(num_samples)
    draws = _Draws(guide, num_samples, args, kwargs)
    se: dict[float, float] = {}

    def elbo(s: float) -> float:
        latents, _ = draws.at(s)
        with torch.no_grad():
            lp = log_joint(model, guide, latents, *args, **kwargs)
        se[s] = float(lp.std() / math.sqrt(lp.numel()))
        return float(lp.mean()) + draws.entropy(s)

    chosen, values = _search(elbo, grid, refine, refine_iters)
    curve = {"elbo": list(values.values()), "elbo_se": [se[s] for s in values]}
    result = Calibration("elbo", chosen, list(values), curve, "elbo", num_samples, draws.s0)
    return _finish(guide, result, apply)


def calibrate_psis(
    model: Callable,
    guide: SWAGGuide,
    *args,
    scales: list[float] | None = None,
    num_samples: int = 200,
    apply: bool = True,
    **kwargs,
) -> Calibration:
    """Choose the scale with the largest PSIS effective sample size of ``p / q``.

    Among scales whose Pareto :math:`\\hat k \\le 0.7`, the one with the largest PSIS ESS;
    if none qualifies, no scale makes the Gaussian a reliable proposal (nor its ESS a
    reliable estimate): the guide's scale is kept, with a warning. The guide's current scale
    is always added to the grid. ``*args, **kwargs`` are the training
    data, as in :func:`calibrate_elbo`; the grid is not refined (:math:`\\hat k` is not
    smooth in the scale). ``curve`` holds ``khat`` and ``ess`` (draws, out of
    ``num_samples``, which must be at least ``PSIS_MIN_SAMPLES`` = 25: the Pareto tail is
    fitted to ``num_samples // 5`` draws and needs 5).
    """
    grid = sorted(set(_check(guide, scales, num_samples)) | {guide.scale})
    num_samples = int(num_samples)
    if num_samples < PSIS_MIN_SAMPLES:
        raise ValueError(
            f"calibrate_psis needs num_samples >= {PSIS_MIN_SAMPLES} (PSIS fits its Pareto tail "
            f"to num_samples // 5 >= 5 draws), got num_samples={num_samples}; pass "
            f"num_samples={PSIS_MIN_SAMPLES} or more (default 200)"
        )
    draws = _Draws(guide, num_samples, args, kwargs)
    khat, ess = [], []
    for s in grid:
        latents, log_q = draws.at(s)
        with torch.no_grad():
            log_p = log_joint(model, guide, latents, *args, **kwargs)
        k, e = _psis(log_p, log_q)
        khat.append(float(k))
        ess.append(float(e) if math.isfinite(e) else 0.0)
    ok = [i for i, k in enumerate(khat) if k <= KHAT_MAX]
    if ok:
        i = max(ok, key=lambda j: ess[j])
    else:  # k-hat > 0.7 everywhere: ESS is unreliable too, so keep the current scale
        i = grid.index(draws.s0)
        warnings.warn(
            f"no scale gives Pareto k-hat <= {KHAT_MAX} (smallest {min(khat):.2f}): the SWAG "
            f"Gaussian is a poor importance proposal for this posterior; keeping "
            f"scale={draws.s0:.3g}. Use method='elbo' or 'validation'",
            stacklevel=2,
        )
    curve = {"khat": khat, "ess": ess}
    result = Calibration("psis", grid[i], grid, curve, "ess", num_samples, draws.s0)
    return _finish(guide, result, apply)


def calibrate(model: Callable, guide: SWAGGuide, *args, method: str = "elbo", **kwargs):
    """Dispatch to :func:`calibrate_validation`, :func:`calibrate_elbo` or :func:`calibrate_psis`.

    ``method="validation"`` needs held-out data as ``*args``; the others the training data.
    """
    funcs = {"validation": calibrate_validation, "elbo": calibrate_elbo, "psis": calibrate_psis}
    if method not in funcs:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    unused = sorted({"refine", "refine_iters"} & set(kwargs)) if method == "psis" else []
    if unused:
        raise TypeError(
            f"method='psis' does not refine its grid (k-hat is not smooth in the scale), so "
            f"{unused} would reach the model; drop {', '.join(unused)}"
        )
    return funcs[method](model, guide, *args, **kwargs)
