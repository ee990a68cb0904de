r"""Test-set scores of posterior draws, shared by every method of the comparison.

For draws :math:`\theta_1..\theta_S` the predictive is the mixture
:math:`\bar p(y \mid x) = \frac1S \sum_s p(y \mid x, \theta_s)`. Reported, per test point
and averaged: the log predictive density :math:`\log \bar p(y \mid x)` (regression: in
original units, i.e. minus :math:`\log s_y`), RMSE of the mixture mean (original units) or
accuracy, the expected calibration error (15 equal-width confidence bins) for
classification, and the coverage of central 90 %/95 % predictive intervals (regression:
mixture quantiles by bisection of the mixture CDF; classification: the smallest class set
whose probability reaches the level).
"""

from __future__ import annotations

import math

import torch
from pyro import poutine

from .multiswag import mixture_quantile

__all__ = ["agreement", "pointwise", "scores"]


def _unwrap(fn):
    while hasattr(fn, "base_dist") and not hasattr(fn, "probs") and not hasattr(fn, "loc"):
        fn = fn.base_dist
    return fn


@torch.no_grad()
def pointwise(model, draws: dict[str, torch.Tensor], x, y, likelihood: str) -> dict:
    """Per-draw, per-point log-likelihood and predictive moments of the site ``"obs"``.

    Returns ``{"loglik": (S, N), "mean": (S, N), "var": (S, N)}`` for regression and
    ``{"loglik": (S, N), "probs": (S, N, K)}`` for classification.
    """
    num = next(iter(draws.values())).shape[0]
    out: dict[str, list] = {"loglik": [], "mean": [], "var": [], "probs": []}
    for s in range(num):
        cond = poutine.condition(model, data={k: v[s] for k, v in draws.items()})
        trace = poutine.trace(cond).get_trace(x, y)
        fn = trace.nodes["obs"]["fn"]
        out["loglik"].append(fn.log_prob(y).reshape(-1))
        base = _unwrap(fn)
        if likelihood == "gaussian":
            out["mean"].append(fn.mean.reshape(-1))
            out["var"].append(fn.variance.reshape(-1))
        elif likelihood == "bernoulli":
            p = base.probs.reshape(-1)
            out["probs"].append(torch.stack([1 - p, p], -1))
        else:
            out["probs"].append(base.probs.reshape(y.shape[0], -1))
    return {k: torch.stack(v) for k, v in out.items() if v}


def _ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += float(mask.float().mean() * (conf[mask].mean() - correct[mask].mean()).abs())
    return ece


def _set_coverage(probs: torch.Tensor, y: torch.Tensor, level: float) -> float:
    """Coverage of the smallest class sets holding probability >= level."""
    p, order = probs.sort(-1, descending=True)
    before = p.cumsum(-1) - p  # mass of the classes ranked above each class
    keep = before < level
    rank = (order == y.unsqueeze(-1)).float().argmax(-1)
    return float(keep.gather(-1, rank.unsqueeze(-1)).float().mean())


def scores(terms: dict, data, y: torch.Tensor) -> dict:
    """Test metrics from :func:`pointwise` terms (see the module docstring)."""
    ll = terms["loglik"]
    lpd = torch.logsumexp(ll, 0) - math.log(ll.shape[0])
    out = {"num_draws": ll.shape[0]}
    if data.is_regression:
        mean, var = terms["mean"], terms["var"]
        mix_mean = mean.mean(0)
        mix_var = (var + mean**2).mean(0) - mix_mean**2
        out["test_ll"] = float(lpd.mean()) - math.log(data.y_std)
        out["rmse"] = float(((mix_mean - y) ** 2).mean().sqrt()) * data.y_std
        out["pred_sd"] = float(mix_var.clamp_min(0).sqrt().mean()) * data.y_std
        sd = var.sqrt()
        for level in (0.9, 0.95):
            a = (1 - level) / 2
            lo, hi = mixture_quantile(mean, sd, a), mixture_quantile(mean, sd, 1 - a)
            out[f"coverage_{round(level * 100)}"] = float(((y >= lo) & (y <= hi)).float().mean())
        out["_mean"], out["_sd"] = mix_mean, mix_var.clamp_min(0).sqrt()
        out["_pit"] = torch.distributions.Normal(mean, sd).cdf(y).mean(0)
    else:
        probs = terms["probs"].mean(0)
        y = y.long()
        out["test_ll"] = float(lpd.mean())
        out["accuracy"] = float((probs.argmax(-1) == y).float().mean())
        out["ece"] = _ece(probs, y)
        for level in (0.9, 0.95):
            out[f"coverage_{round(level * 100)}"] = _set_coverage(probs, y, level)
        out["_probs"] = probs
    return out


def _flat(draws: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(v.shape[0], -1) for _, v in sorted(draws.items())], -1)


def agreement(method: dict, reference: dict, draws, ref_draws, data) -> dict:
    """Agreement with a reference (NUTS): predictive mean/sd error and marginal W2.

    ``w2_marginal`` is the mean over latent scalars of the 1-D Wasserstein-2 distance between
    the method's and the reference's marginals (quantile matching at 100 levels), divided by
    the reference marginal sd.
    """
    out = {}
    if data.is_regression:
        out["pred_mean_err"] = float(((method["_mean"] - reference["_mean"]) ** 2).mean().sqrt())
        out["pred_mean_err"] *= data.y_std
        out["pred_sd_err"] = float(((method["_sd"] - reference["_sd"]) ** 2).mean().sqrt())
        out["pred_sd_err"] *= data.y_std
    else:
        out["pred_prob_err"] = float((method["_probs"] - reference["_probs"]).abs().mean())
    a, b = _flat(draws).double(), _flat(ref_draws).double()
    levels = (torch.arange(100, dtype=a.dtype) + 0.5) / 100
    qa, qb = torch.quantile(a, levels, dim=0), torch.quantile(b, levels, dim=0)
    w2 = ((qa - qb) ** 2).mean(0).sqrt()
    out["w2_marginal"] = float((w2 / b.std(0).clamp_min(1e-12)).mean())
    return out
