r"""ArviZ export and diagnostics: one ``xarray.DataTree`` schema for SWAG, SVI and NUTS.

:func:`to_datatree` turns a fitted guide (SWAG, MultiSWAG, any Pyro autoguide) or a
``pyro.infer.MCMC`` run into an ArviZ 1.x DataTree with the groups ``posterior``,
``posterior_predictive``, ``log_likelihood`` (pointwise, per observed site),
``observed_data``, ``constant_data`` and ``sample_stats``, all laid out ``(chain, draw, ...)``
with dimensions named after the model's plates. This is the only module of the package that
imports ``arviz_base``, ``arviz_stats`` and ``arviz_plots``.

For a guide :math:`q` the draws come from :math:`q`, not from the posterior :math:`p`, so a
plain PSIS-LOO treats them wrongly. ``sample_stats`` therefore holds, per draw and in the
unconstrained space :math:`\theta` of :mod:`pyro_swag.predictive`,

.. math::

    \texttt{log\_p} = \log p(T(\theta), \mathcal{D}) + \log|\det J_T(\theta)|,
    \qquad \texttt{log\_q} = \log q(\theta),

and :func:`loo` uses ``arviz_stats.loo_approximate_posterior``, whose importance ratios
for leaving out point :math:`i` are :math:`p(\theta)\,/\,(q(\theta)\,p(y_i \mid \theta))`.
:func:`psis_diagnostic` smooths :math:`\log p - \log q` as a whole: its Pareto
:math:`\hat k` says whether :math:`q` can stand in for the posterior at all
(:math:`\hat k < 0.7`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import arviz_base
import arviz_plots
import arviz_stats
import numpy as np
import pyro
import torch
import xarray as xr
from arviz_stats.base import array_stats
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoDiagonalNormal
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites
from scipy.special import logsumexp
from torch.distributions import biject_to

from .multiswag import MultiSWAG
from .predictive import log_joint, log_likelihood, predictive, sample_latents, unpack_latents

__all__ = [
    "RecordingNUTS", "compare", "loo", "loo_pit", "plot_forest", "plot_loo_pit", "plot_ppc",
    "psis_diagnostic", "to_datatree",
]

_SAMPLE_DIMS = ("chain", "draw")


class RecordingNUTS(NUTS):
    """``pyro.infer.NUTS`` that also records, per kept draw, what ArviZ reports.

    Pyro's MCMC keeps only the indices of divergent draws; with this kernel
    :func:`to_datatree` adds ``tree_depth``, ``n_steps`` (leapfrog steps) and the per-draw
    ``step_size`` to ``sample_stats``. Only for chains run in this process (one chain, or
    several with ``mp_context=None`` and sequential chains).
    """

    def setup(self, warmup_steps, *args, **kwargs):
        self.draw_stats: list[tuple[int, int, float]] = []
        self._nest = self._depth = self._leaves = 0
        return super().setup(warmup_steps, *args, **kwargs)

    def _build_basetree(self, *args, **kwargs):
        self._leaves += 1
        return super()._build_basetree(*args, **kwargs)

    def _build_tree(self, *args, **kwargs):
        self._depth += self._nest == 0  # one top-level call per doubling
        self._nest += 1
        try:
            return super()._build_tree(*args, **kwargs)
        finally:
            self._nest -= 1

    def sample(self, params):
        self._depth = self._leaves = 0
        step_size = float(self.step_size)
        out = super().sample(params)
        if self._t > self._warmup_steps:
            self.draw_stats.append((self._depth, self._leaves, step_size))
        return out


# ----------------------------------------------------------------------------- sites
class _Unobserve(UnconditionMessenger):
    """``poutine.uncondition`` restricted to the named sites (not ``pyro.deterministic``)."""

    def __init__(self, names) -> None:
        super().__init__()
        self.names = set(names)

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.names:
            super()._pyro_sample(msg)


def _site_info(model: Callable, args: tuple, kwargs: dict) -> dict[str, dict]:
    """Latent, observed and deterministic sites of one prior run: ``{kind: {name: site}}``."""
    with torch.random.fork_rng(), torch.no_grad():
        trace = prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))
    info: dict[str, dict] = {"latent": {}, "observed": {}, "deterministic": {}}
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["infer"].get("_deterministic"):
            info["deterministic"][name] = site
        elif site["is_observed"]:
            info["observed"][name] = site
        else:
            info["latent"][name] = site
    if not info["observed"]:
        raise ValueError(
            "the model has no observed site with these arguments; pass the observed data "
            "through args/kwargs (e.g. kwargs={'y': y}) so log_likelihood can be computed"
        )
    return info


def _site_dims(name: str, site: dict) -> list[str]:
    """Dimension names of a site's value: plate names where a plate sits, else defaults."""
    value = site["value"]
    # pyro.deterministic declares every dim an event dim; its plates still index the value
    deterministic = site["infer"].get("_deterministic")
    nb = value.dim() - (0 if deterministic else site["fn"].event_dim)
    dims: list[str | None] = [None] * value.dim()
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and frame.dim is not None and 0 <= nb + frame.dim < nb:
            dims[nb + frame.dim] = frame.name
    return [d or f"{name}_dim_{i}" for i, d in enumerate(dims)]


def _guide_model(guide) -> Callable | None:
    """The model an autoguide was built on, without the guide's ``InitMessenger`` wrappers."""
    model = getattr(guide, "model", None)
    while (isinstance(model, functools.partial) and len(model.args) == 2
           and isinstance(model.args[0], InitMessenger)):
        model = model.args[1]
    return model


def _constant_data(model, args, kwargs, observed: dict) -> dict[str, torch.Tensor]:
    """Tensor arguments of the model, by parameter name, that are not observed values."""
    fn = model
    while isinstance(fn, functools.partial) and fn.args:  # poutine wrappers
        fn = fn.args[-1]
    fn = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {f"arg_{i}": a for i, a in enumerate(args)} | dict(kwargs)
    obs_values = [s["value"] for s in observed.values()]
    return {
        k: v for k, v in bound.items()
        if torch.is_tensor(v) and not any(v is o or (v.shape == o.shape and torch.equal(v, o))
                                          for o in obs_values)
    }


def _pack(guide, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconstrained latents ``(S, P)`` in ``guide``'s layout and ``log|det J_T|`` per draw."""
    cols, logdet = [], 0.0
    for name in guide._unconstrained_shapes:
        site = guide.prototype_trace.nodes[name]
        x = values[name]
        t = biject_to(site["fn"].support)
        u = t.inv(x)
        ld = torch.as_tensor(t.log_abs_det_jacobian(u, x), dtype=x.dtype)
        logdet = logdet + ld.expand(x.shape[0], *ld.shape[1:]).reshape(x.shape[0], -1).sum(-1)
        cols.append(u.reshape(x.shape[0], -1))
    return torch.cat(cols, -1), logdet


# ----------------------------------------------------------------------------- draws
def _check_count(name: str, value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {name}={value!r}")
    return value


def _mcmc_draws(mcmc: MCMC, num_chains, num_draws):
    samples = mcmc.get_samples(group_by_chain=True)
    c_all, d_all = next(iter(samples.values())).shape[:2]
    c = _check_count("num_chains", num_chains, c_all)
    d = _check_count("num_draws", num_draws, d_all)
    if c > c_all or d > d_all:
        raise ValueError(
            f"num_chains={c}, num_draws={d} asked but the MCMC run has {c_all} chains of "
            f"{d_all} draws; ask for at most that many or run MCMC longer"
        )
    keep = np.linspace(0, d_all - 1, d).round().astype(int)  # evenly thinned
    values = {k: v[:c, keep].reshape(c * d, *v.shape[2:]) for k, v in samples.items()}
    stats: dict[str, np.ndarray] = {}
    diags = getattr(mcmc, "_diagnostics", None) or []
    if len(diags) >= c and all(isinstance(g, dict) and "divergences" in g for g in diags[:c]):
        div = np.zeros((c, d_all), bool)
        for i in range(c):
            div[i, np.asarray(diags[i]["divergences"], int)] = True
        stats["diverging"] = div[:, keep]
    kernel = mcmc.kernel
    recorded = getattr(kernel, "draw_stats", None)
    if recorded is not None and len(recorded) == c_all * d_all:
        arr = np.asarray(recorded, float).reshape(c_all, d_all, 3)[:c, keep]
        stats["tree_depth"] = arr[..., 0].astype(int)
        stats["n_steps"] = arr[..., 1].astype(int)
        stats["step_size"] = arr[..., 2]
    elif c_all == 1 and hasattr(kernel, "step_size"):
        stats["step_size"] = np.full((c, d), float(kernel.step_size))
    return c, d, values, stats


def _guide_draws(guide, model, args, kwargs, info, num_chains, num_draws):
    """Draws of a guide: ``(C, D, values, latents or None, log_q_u or None, layout)``."""
    if getattr(guide, "prototype_trace", None) is None and hasattr(guide, "_setup_prototype"):
        with torch.random.fork_rng():
            guide._setup_prototype(*args, **kwargs)
    if isinstance(guide, MultiSWAG):
        if num_chains not in (None, guide.num_runs):
            raise ValueError(
                f"num_chains={num_chains} but a MultiSWAG guide is exported with one chain per "
                f"run ({guide.num_runs}); pass num_chains=None"
            )
        c, d = guide.num_runs, _check_count("num_draws", num_draws, 100)
        latents = guide.sample_chains(d).reshape(c * d, -1)
    elif hasattr(guide, "_unconstrained_shapes") and hasattr(guide, "get_posterior"):
        c = _check_count("num_chains", num_chains, 1)
        d = _check_count("num_draws", num_draws, 100)
        latents = sample_latents(guide, c * d, *args, **kwargs)
    else:  # any other guide: one vectorized run of the guide itself
        c = _check_count("num_chains", num_chains, 1)
        d = _check_count("num_draws", num_draws, 100)
        nest = max([-f.dim for s in info["latent"].values() for f in s["cond_indep_stack"]
                    if f.vectorized] + [0])
        with torch.no_grad(), pyro.plate("_num_draws", c * d, dim=-nest - 1):
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        log_q = sum(
            s["log_prob"].expand(c * d, *s["log_prob"].shape[1:]).reshape(c * d, -1).sum(-1)
            for s in trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]
        )
        values = {
            k: trace.nodes[k]["value"].reshape(c * d, *s["value"].shape)
            for k, s in info["latent"].items()
        }
        return c, d, values, None, log_q, None
    with torch.no_grad():
        log_q = guide.get_posterior(*args, **kwargs).log_prob(latents)
    return c, d, unpack_latents(guide, latents), latents, log_q, guide


def _layout_guide(model, args, kwargs):
    """An AutoContinuous guide set up on ``model``, used only for its latent layout."""
    layout = AutoDiagonalNormal(model)
    with torch.random.fork_rng(), torch.no_grad():
        layout._setup_prototype(*args, **kwargs)
    return layout


# ----------------------------------------------------------------------------- export
def to_datatree(
    source: Any,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    model: Callable | None = None,
    num_chains: int | None = None,
    num_draws: int | None = None,
    coords: Mapping[str, Sequence] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
) -> xr.DataTree:
    """Export a fitted guide or an MCMC run, with its model and data, as an ArviZ DataTree.

    Parameters
    ----------
    source : SWAGGuide, MultiSWAG, Pyro autoguide or pyro.infer.MCMC
        What to export. MultiSWAG gives one chain per run; other guides give
        ``num_chains * num_draws`` independent draws split into chains.
    args, kwargs : tuple, dict
        The model's arguments *with the observed data*, e.g. ``args=(x,), kwargs={"y": y}``.
    model : callable, optional
        Defaults to ``source.model`` (guides) or ``source.kernel.model`` (MCMC).
    num_chains, num_draws : int, optional
        Layout of the draws. Guides default to 1 x 100 (MultiSWAG: runs x 100); MCMC
        defaults to its own chains and draws, and fewer draws are evenly thinned.
    coords, dims : dict, optional
        ArviZ coordinate values per dimension, and dimension names per variable
        (overriding the plate names, ``{var}_dim_{i}`` elsewhere).
    constant_data : dict, optional
        Variables of the ``constant_data`` group; default: the model's tensor arguments
        that are not observed values, by parameter name.
    chunk_size : int, optional
        Draws per vectorized model pass (memory bound), see :mod:`pyro_swag.predictive`.

    Returns
    -------
    xarray.DataTree
        Groups ``posterior``, ``posterior_predictive``, ``log_likelihood``,
        ``observed_data``, ``constant_data``, ``sample_stats``. ``sample_stats`` holds
        ``log_p`` (all sources) and ``log_q`` (guides); MCMC adds ``diverging`` and
        ``step_size`` (and ``tree_depth``, ``n_steps`` with :class:`RecordingNUTS`).
    """
    kwargs = dict(kwargs or {})
    args = tuple(args)
    is_mcmc = isinstance(source, MCMC)
    if model is None:
        model = source.kernel.model if is_mcmc else _guide_model(source)
    if not callable(model):
        raise TypeError(
            f"could not find the model of source={type(source).__name__}; pass model=..."
        )
    info = _site_info(model, args, kwargs)
    stats: dict[str, np.ndarray] = {}
    if is_mcmc:
        c, d, values, stats = _mcmc_draws(source, num_chains, num_draws)
        latents, log_q, layout = None, None, None
    elif callable(source):
        c, d, values, latents, log_q, layout = _guide_draws(
            source, model, args, kwargs, info, num_chains, num_draws
        )
    else:
        raise TypeError(
            f"source must be a Pyro guide or a pyro.infer.MCMC, got {type(source).__name__}"
        )
    missing = set(info["latent"]) - set(values)
    if missing:
        raise ValueError(f"source has no draws of the model's latent sites {sorted(missing)}")
    values = {k: values[k].detach() for k in info["latent"]}
    if layout is None:  # pack constrained draws in a layout the log density understands
        layout = _layout_guide(model, args, kwargs)
        latents, logdet = _pack(layout, values)
        if log_q is not None:
            log_q = log_q + logdet  # constrained guide density -> unconstrained
    log_p = log_joint(model, layout, latents, *args, chunk_size=chunk_size, **kwargs)
    obs_names = list(info["observed"])
    sites = obs_names + list(info["deterministic"])
    pred = predictive(
        _Unobserve(obs_names)(model), None, *args, posterior_samples=values,
        return_sites=sites, chunk_size=chunk_size, **kwargs,
    )
    loglik = log_likelihood(model, values, *args, chunk_size=chunk_size, **kwargs)

    def chains(x: torch.Tensor, shape: tuple | None = None) -> np.ndarray:
        x = x.detach().cpu()
        return x.reshape(c, d, *(x.shape[1:] if shape is None else shape)).numpy()

    def shape_of(k: str) -> tuple:
        kind = "observed" if k in info["observed"] else "deterministic"
        return tuple(info[kind][k]["value"].shape)

    stats["log_p"] = chains(log_p)
    if log_q is not None:
        stats["log_q"] = chains(log_q)
    var_dims = {k: _site_dims(k, s) for kind in info.values() for k, s in kind.items()}
    const = dict(constant_data) if constant_data is not None else _constant_data(
        model, args, kwargs, info["observed"]
    )
    plate_sizes = {}
    for name in obs_names:
        for dim, size in zip(var_dims[name], info["observed"][name]["value"].shape):
            plate_sizes.setdefault(size, set()).add(dim)
    for k, v in const.items():
        shape = np.shape(v)
        named = plate_sizes.get(shape[0], set()) if shape else set()
        var_dims.setdefault(k, [
            next(iter(named)) if i == 0 and len(named) == 1 else f"{k}_dim_{i}"
            for i in range(len(shape))
        ])
    var_dims.update({k: list(v) for k, v in (dims or {}).items()})
    data = {
        "posterior": {k: chains(values[k]) for k in info["latent"]}
        | {k: chains(pred[k], shape_of(k)) for k in info["deterministic"]},
        "posterior_predictive": {k: chains(pred[k], shape_of(k)) for k in obs_names},
        "log_likelihood": {k: chains(loglik[k]) for k in obs_names},
        "observed_data": {k: info["observed"][k]["value"].detach().cpu().numpy()
                          for k in obs_names},
        "constant_data": {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v))
                          for k, v in const.items()},
        "sample_stats": stats,
    }
    method = type(source.kernel if is_mcmc else source).__name__
    attrs = {"/": {"inference_library": "pyro", "inference_library_version": pyro.__version__,
                   "method": method}}
    return arviz_base.from_dict(data, dims=var_dims, coords=dict(coords or {}), attrs=attrs)


# ----------------------------------------------------------------------------- diagnostics
def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
    return np.asarray(x, dtype=float)


def psis_diagnostic(log_p, log_q) -> tuple[float, float]:
    r"""Pareto :math:`\hat k` and effective sample size of the guide as a whole.

    Importance ratios :math:`\log r = \log p - \log q` are Pareto-smoothed (PSIS); the
    ESS is :math:`1 / \sum_s \tilde w_s^2` of the normalised smoothed weights.

    Parameters
    ----------
    log_p, log_q : array-like, torch.Tensor or DataArray
        Target and proposal log densities at the same draws, any (equal) shape.

    Returns
    -------
    (float, float)
        ``(khat, ess)``; :math:`\hat k < 0.7` means the guide is a usable proposal
        (``-inf`` when all ratios are equal, i.e. :math:`q \propto p` at the draws).
    """
    lp, lq = _np(log_p), _np(log_q)
    if lp.shape != lq.shape or lp.size < 10:
        raise ValueError(
            f"log_p {lp.shape} and log_q {lq.shape} must have the same shape with at least "
            "10 draws; pass both densities evaluated at the same draws"
        )
    lw = (lp - lq).ravel()
    if not np.isfinite(lw).all():
        raise ValueError("log_p - log_q has NaN/Inf entries; check the densities")
    if np.ptp(lw) <= 1e-9 * max(1.0, float(np.abs(lw).max())):
        return float("-inf"), float(lw.size)  # q = p up to a constant: bounded, equal weights
    smoothed, khat = array_stats.psislw(-lw)  # arviz smooths the ratios of the negated input
    w = np.exp(smoothed - logsumexp(smoothed))
    return float(khat), float(1.0 / np.sum(w**2))


def _corrected(dt: xr.DataTree, corrected: bool | None) -> bool:
    has = "sample_stats" in dt.children and {"log_p", "log_q"} <= set(dt["sample_stats"].data_vars)
    if corrected and not has:
        raise ValueError(
            "corrected=True needs sample_stats.log_p and sample_stats.log_q (exports of a "
            "guide by to_datatree have them); pass corrected=False for draws from the posterior"
        )
    return has if corrected is None else bool(corrected)


def loo(dt: xr.DataTree, corrected: bool | None = None, pointwise: bool = True,
        var_name: str | None = None):
    """PSIS-LOO; importance-corrected for guides (``loo_approximate_posterior``).

    ``corrected=None`` corrects whenever ``sample_stats`` has ``log_p`` and ``log_q``;
    ``corrected=False`` is the naive ``arviz_stats.loo`` (draws treated as posterior).
    """
    if _corrected(dt, corrected):
        ss = dt["sample_stats"]
        return arviz_stats.loo_approximate_posterior(
            dt, ss["log_p"], ss["log_q"], pointwise=pointwise, var_name=var_name
        )
    return arviz_stats.loo(dt, pointwise=pointwise, var_name=var_name)


def compare(dts: Mapping[str, xr.DataTree], corrected: bool | None = None, **kwargs):
    """``arviz_stats.compare`` of several exports, each with :func:`loo` (corrected for guides)."""
    return arviz_stats.compare({k: loo(v, corrected) for k, v in dts.items()}, **kwargs)


def loo_pit(dt: xr.DataTree, corrected: bool | None = None) -> xr.Dataset:
    """LOO-PIT values; for guides weighted by :math:`p / (q\\, p(y_i \\mid \\theta))` (PSIS)."""
    if not _corrected(dt, corrected):
        return arviz_stats.loo_pit(dt)
    ss = dt["sample_stats"]
    ratio = ss["log_p"] - ss["log_q"]
    lw, khat = {}, {}
    for name, ll in dt["log_likelihood"].data_vars.items():
        lw[name], khat[name] = (ll - ratio).azstats.psislw(dim=list(_SAMPLE_DIMS))
    return arviz_stats.loo_pit(dt, log_weights=xr.Dataset(lw), pareto_k=xr.Dataset(khat))


# ----------------------------------------------------------------------------- plots
def _save(pc, path):
    if path is not None:
        pc.savefig(path)
    return pc


def plot_ppc(dt: xr.DataTree, path=None, **kwargs):
    """Posterior predictive check (``arviz_plots.plot_ppc_dist``); saved to ``path`` if given."""
    return _save(arviz_plots.plot_ppc_dist(dt, backend="matplotlib", **kwargs), path)


def plot_forest(dts: Mapping[str, xr.DataTree] | xr.DataTree, path=None, **kwargs):
    """Forest plot, one colour per method for a dict of exports (same chain/draw sizes)."""
    kwargs.setdefault("combined", True)
    pc = arviz_plots.plot_forest(dts, backend="matplotlib", **kwargs)
    if isinstance(dts, Mapping):
        pc.add_legend("model")
    return _save(pc, path)


def plot_loo_pit(dt: xr.DataTree, path=None, corrected: bool | None = None, **kwargs):
    """LOO-PIT ECDF; uses the guide-corrected weights of :func:`loo_pit` when available."""
    values = loo_pit(dt, corrected)
    pit_dt = arviz_base.convert_to_datatree(values, group="loo_pit")
    kwargs.setdefault("visuals", {"xlabel": {"text": "LOO-PIT"}, "ylabel": {}})
    pc = arviz_plots.plot_ecdf_pit(
        pit_dt, group="loo_pit", sample_dims=list(values.dims), backend="matplotlib", **kwargs
    )
    return _save(pc, path)
