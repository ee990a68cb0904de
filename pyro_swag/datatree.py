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
(:math:`\hat k < 0.7`); :func:`summary` weights the draws by these smoothed ratios.
"""

from __future__ import annotations

import warnings
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
from scipy.special import logsumexp

from ._nuts import RecordingNUTS
from ._sources import collect, constant_data_of, constant_dims, scale_attrs, site_dims
from ._weighted import warn_khat, weighted_table

__all__ = [
    "RecordingNUTS", "compare", "loo", "loo_pit", "mcmc_health", "plot_energy", "plot_forest",
    "plot_loo_pit", "plot_ppc", "plot_trace", "psis_diagnostic", "summary", "to_datatree",
]


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
        What to export. MultiSWAG with equal weights gives one chain per run; other guides
        (MultiSWAG with unequal weights included: draws of the weighted mixture) give
        ``num_chains * num_draws`` independent draws split into chains. An MCMC run on
        ``NeuTraReparam(guide).reparam(model)`` is exported with the model's own sites.
    args, kwargs : tuple, dict
        The model's arguments *with the observed data*, e.g. ``args=(x,), kwargs={"y": y}``.
    model : callable, optional
        Defaults to ``source.model`` (guides) or ``source.kernel.model`` (MCMC).
    num_chains, num_draws : int, optional
        Layout of the draws. Guides default to 1 x 100 (equal-weight MultiSWAG: runs x 100); MCMC
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

    Raises
    ------
    ValueError
        If a plate of the model draws a random subsample (``subsample_size`` without
        ``subsample=``): pass ``subsample=torch.arange(N)`` for the export.
    """
    kwargs = dict(kwargs or {})
    col = collect(source, args, kwargs, model, num_chains, num_draws, chunk_size)
    c, d, info, values = col.num_chains, col.num_draws, col.info, col.values
    pred, stats, obs_names = col.predicted, dict(col.stats), list(col.info["observed"])
    model = col.model

    def chains(x: torch.Tensor, shape: tuple | None = None) -> np.ndarray:
        x = x.detach().cpu()
        return x.reshape(c, d, *(x.shape[1:] if shape is None else shape)).numpy()

    def shape_of(k: str) -> tuple:
        kind = "observed" if k in info["observed"] else "deterministic"
        return tuple(info[kind][k]["value"].shape)

    stats["log_p"] = chains(col.log_p)
    if col.log_q is not None:
        stats["log_q"] = chains(col.log_q)
    var_dims = {k: site_dims(k, s) for kind in info.values() for k, s in kind.items()}
    const = dict(constant_data) if constant_data is not None else constant_data_of(
        model, args, kwargs, info["observed"]
    )
    var_dims = constant_dims(const, var_dims, info["observed"]) | var_dims
    var_dims.update({k: list(v) for k, v in (dims or {}).items()})
    data = {
        "posterior": {k: chains(values[k]) for k in info["latent"]}
        | {k: chains(pred[k], shape_of(k)) for k in info["deterministic"]},
        "posterior_predictive": {k: chains(pred[k], shape_of(k)) for k in obs_names},
        "log_likelihood": {k: chains(col.log_likelihood[k]) for k in obs_names},
        "observed_data": {k: info["observed"][k]["value"].detach().cpu().numpy()
                          for k in obs_names},
        "constant_data": {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v))
                          for k, v in const.items()},
        "sample_stats": stats,
    }
    attrs = {"/": {"inference_library": "pyro", "inference_library_version": pyro.__version__,
                   "method": col.method} | scale_attrs(source)}
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
        (``-inf`` when all ratios are equal, i.e. :math:`q \propto p` at the draws; ``inf``
        when they span so many nats that the tail underflows and the Pareto fit breaks down,
        the ESS then that of the raw ratios, about 1).
    """
    w, khat = _psis_weights(log_p, log_q)
    return khat, float(1.0 / np.sum(w**2))


def _psis_weights(log_p, log_q) -> tuple[np.ndarray, float]:
    """Normalised Pareto-smoothed weights of the ratios p/q (flattened) and their k-hat."""
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
        return np.full(lw.size, 1.0 / lw.size), float("-inf")  # q = p up to a constant
    with np.errstate(divide="ignore", invalid="ignore"):
        smoothed, khat = array_stats.psislw(-lw)  # arviz smooths the negated input's ratios
    if not (np.isfinite(smoothed).all() and np.isfinite(khat)):
        # The tail, relative to the largest ratio, underflows (the ratios span hundreds of
        # nats): the Pareto fit breaks down (NaN weights beside a finite, meaningless k-hat).
        # The largest draws carry all the weight, which no tail shape could correct.
        w = np.exp(lw - lw.max())
        return w / w.sum(), float("inf")
    return np.exp(smoothed - logsumexp(smoothed)), float(khat)


def mcmc_health(dt: xr.DataTree) -> dict[str, float | int]:
    """The usual checks of an MCMC export: is it fit to serve as the reference?

    Returns ``{"draws", "divergences", "max_rhat", "min_ess_bulk", "min_ess_tail"}`` over all
    posterior entries (rank-normalised split R-hat, so one chain works too), the bulk ESS of
    the log joint ``"ess_log_p"`` (identifiable where single weights of a network are not),
    and ``"min_bfmi"`` when ``sample_stats`` has ``energy`` (:class:`RecordingNUTS`). Rules of
    thumb: no divergences, R-hat < 1.01, ESS > 100 per quantity, E-BFMI > 0.3.
    """
    if "posterior" not in dt.children:
        raise ValueError("mcmc_health needs a DataTree with a posterior group (to_datatree(mcmc))")
    post = dt["posterior"].to_dataset()
    chain, draw = post.sizes.get("chain", 0), post.sizes.get("draw", 0)
    if draw < 4:
        raise ValueError(f"mcmc_health needs at least 4 draws per chain, got {draw}")
    halves = post
    if chain == 1:  # R-hat needs chains: the two halves of the one chain (split R-hat)
        half = draw // 2
        halves = xr.concat([post.isel(draw=slice(0, half)),
                            post.isel(draw=slice(draw - half, draw)).assign_coords(
                                draw=post.draw[:half])], dim="chain").assign_coords(chain=[0, 1])
    worst = {}
    for key, fn in (("max_rhat", lambda: arviz_stats.rhat(halves)),
                    ("min_ess_bulk", lambda: arviz_stats.ess(post, method="bulk")),
                    ("min_ess_tail", lambda: arviz_stats.ess(post, method="tail"))):
        with warnings.catch_warnings():  # a constant entry gives NaN, skipped
            warnings.simplefilter("ignore", RuntimeWarning)
            vals = np.concatenate([np.ravel(v.values) for v in fn().data_vars.values()])
        vals = vals[np.isfinite(vals)]
        pick = np.max if key.startswith("max") else np.min
        worst[key] = float(pick(vals)) if vals.size else float("nan")
    stats = dt["sample_stats"].to_dataset() if "sample_stats" in dt.children else xr.Dataset()
    out: dict[str, float | int] = {"draws": int(chain * draw)}
    if "diverging" in stats:
        out["divergences"] = int(stats["diverging"].values.sum())
    out.update(worst)
    if "log_p" in stats:  # identifiable where single weights are not (a BNN's symmetries)
        out["ess_log_p"] = float(arviz_stats.ess(stats[["log_p"]])["log_p"])
    if "energy" in stats:
        out["min_bfmi"] = float(np.min(arviz_stats.bfmi(dt)["energy"].values))
    return out


def _corrected(dt: xr.DataTree, corrected: bool | None) -> bool:
    has = "sample_stats" in dt.children and {"log_p", "log_q"} <= set(dt["sample_stats"].data_vars)
    if corrected and not has:
        raise ValueError(
            "corrected=True needs sample_stats.log_p and sample_stats.log_q (exports of a "
            "guide by to_datatree have them); pass corrected=False for draws from the posterior"
        )
    return has if corrected is None else bool(corrected)


def _point_mass(dt: xr.DataTree) -> bool:
    """Whether every posterior draw is the same point (an AutoDelta export)."""
    post = list(dt["posterior"].data_vars.values()) if "posterior" in dt.children else []
    return bool(post) and all(bool((v == v.isel(chain=0, draw=0)).all()) for v in post)


def _float64(dt: xr.DataTree) -> xr.DataTree:
    r"""A copy whose log-likelihood and sample stats are float64, refused below 25 draws:
    the importance ratios :math:`\log p - \log q` of a wide guide span thousands of nats,
    where float32 weights come out NaN with a meaningless constant k-hat."""
    if "log_likelihood" not in dt.children:
        raise ValueError("PSIS needs a log_likelihood group; export with to_datatree(...)")
    ll = dt["log_likelihood"].to_dataset()
    draws = ll.sizes.get("chain", 1) * ll.sizes.get("draw", 1)
    if draws < 25:  # PSIS fits its Pareto tail to the largest min(S / 5, 3 sqrt(S)) ratios
        raise ValueError(
            f"PSIS needs at least 25 draws (its Pareto tail takes the largest S/5, at least "
            f"5), got S = {draws}; export more draws, to_datatree(..., num_draws=100)"
        )
    if _point_mass(dt):
        raise ValueError(
            "every posterior draw is the same point (a point-mass guide such as AutoDelta, "
            "i.e. a MAP): PSIS-LOO needs draws from a posterior with spread; export a "
            "SWAGGuide, an AutoNormal or an MCMC run instead"
        )
    out = dt.copy()
    for group in ("log_likelihood", "sample_stats"):
        if group in out.children:
            ds = out[group].to_dataset()
            wide = {k: v.astype("float64") for k, v in ds.data_vars.items() if v.dtype.kind == "f"}
            out[group] = xr.DataTree(ds.assign(wide))
    return out


def loo(dt: xr.DataTree, corrected: bool | None = None, pointwise: bool = True,
        var_name: str | None = None):
    """PSIS-LOO; importance-corrected for guides (``loo_approximate_posterior``).

    ``corrected=None`` corrects whenever ``sample_stats`` has ``log_p`` and ``log_q``;
    ``corrected=False`` is the naive ``arviz_stats.loo`` (draws treated as posterior).
    Computed in float64. The correction reweights the guide's draws by ``p / q``: when the
    guide as a whole is a poor proposal (:func:`psis_diagnostic` k-hat > 0.7) a
    ``RuntimeWarning`` says so, since the estimate can then be far off.
    """
    dt = _float64(dt)
    if _corrected(dt, corrected):  # weights p / (q p(y_i | theta)) vary even where ll does not
        ss = dt["sample_stats"]
        warn_khat(*psis_diagnostic(ss["log_p"], ss["log_q"]), ss["log_p"].size, "corrected LOO")
        return arviz_stats.loo_approximate_posterior(
            dt, ss["log_p"], ss["log_q"], pointwise=pointwise, var_name=var_name
        )
    for name, ll in dt["log_likelihood"].data_vars.items():
        flat = ll.stack(_s=("chain", "draw"))
        same = (flat == flat.isel(_s=0)).all("_s")
        if flat.sizes["_s"] > 1 and bool(same.any()) and var_name in (None, name):
            raise ValueError(
                f"log_likelihood[{name!r}] is the same in every draw at {int(same.sum())} "
                "point(s) (masked, or independent of the latents): PSIS-LOO cannot weight "
                "them; export without those points"
            )
    return arviz_stats.loo(dt, pointwise=pointwise, var_name=var_name)


def summary(dt: xr.DataTree, corrected: bool | None = None, var_names=None,
            ci_prob: float = 0.9, round_to: int | None = None):
    """Posterior summary table (pandas). For a guide's export (``corrected=None`` with
    ``log_p``/``log_q``) the draws are weighted by their Pareto-smoothed ratios p/q, so the
    mean, sd and ``ci_prob`` interval are the posterior's, not the guide's (reliable while
    the guide's k-hat <= 0.7; ``attrs`` holds ``khat`` and ``ess``); ``corrected=False``
    (and MCMC) is ``arviz_stats.summary`` of the draws as they are. Unrounded by default."""
    if not _corrected(dt, corrected) or _point_mass(dt):  # one point: nothing to weight
        return arviz_stats.summary(dt, var_names=var_names, ci_prob=ci_prob,
                                   round_to="none" if round_to is None else round_to)
    ss = dt["sample_stats"]
    w, khat = _psis_weights(ss["log_p"], ss["log_q"])
    ess = float(1.0 / np.sum(w**2))
    warn_khat(khat, ess, w.size, "corrected summary")
    post = dt["posterior"]
    names = [var_names] if isinstance(var_names, str) else list(var_names or post.data_vars)
    if set(names) - set(post.data_vars):
        raise KeyError(f"var_names {sorted(set(names) - set(post.data_vars))} are not in the "
                       f"posterior; it has {sorted(post.data_vars)}")
    values = {k: post[k].values.reshape(-1, *post[k].shape[2:]) for k in names}
    table = weighted_table(values, w, ci_prob)
    table.attrs.update(khat=khat, ess=ess)
    return table if round_to is None else table.round(round_to)


def compare(dts: Mapping[str, xr.DataTree], corrected: bool | None = None, **kwargs):
    """``arviz_stats.compare`` of several exports, each with :func:`loo` (corrected for guides)."""
    return arviz_stats.compare({k: loo(v, corrected) for k, v in dts.items()}, **kwargs)


def loo_pit(dt: xr.DataTree, corrected: bool | None = None) -> xr.Dataset:
    """LOO-PIT values; for guides weighted by :math:`p / (q\\, p(y_i \\mid \\theta))` (PSIS)."""
    dt = _float64(dt)
    if not _corrected(dt, corrected):
        return arviz_stats.loo_pit(dt)
    ss = dt["sample_stats"]
    ratio = ss["log_p"] - ss["log_q"]
    lw, khat = {}, {}
    for name, ll in dt["log_likelihood"].data_vars.items():
        lw[name], khat[name] = (ll - ratio).azstats.psislw(dim=["chain", "draw"])
    return arviz_stats.loo_pit(dt, log_weights=xr.Dataset(lw), pareto_k=xr.Dataset(khat))


# ----------------------------------------------------------------------------- plots
def _save(pc, path):
    if path is not None:
        pc.savefig(path)
    return pc


def plot_ppc(dt: xr.DataTree, path=None, **kwargs):
    """Posterior predictive check (``arviz_plots.plot_ppc_dist``); saved to ``path`` if given."""
    return _save(arviz_plots.plot_ppc_dist(dt, backend="matplotlib", **kwargs), path)


def plot_trace(dt: xr.DataTree, path=None, **kwargs):
    """Trace and marginal per variable (``arviz_plots.plot_trace_dist``): chains of MCMC, runs
    of MultiSWAG; saved to ``path`` if given."""
    return _save(arviz_plots.plot_trace_dist(dt, backend="matplotlib", **kwargs), path)


def plot_energy(dt: xr.DataTree, path=None, **kwargs):
    """Marginal and transition energy of an MCMC export with ``energy``
    (:class:`RecordingNUTS`; ``arviz_plots.plot_energy``); saved to ``path`` if given."""
    if "sample_stats" not in dt.children or "energy" not in dt["sample_stats"].data_vars:
        raise ValueError("plot_energy needs sample_stats.energy: run MCMC with RecordingNUTS")
    return _save(arviz_plots.plot_energy(dt, backend="matplotlib", **kwargs), path)


def plot_forest(dts: Mapping[str, xr.DataTree] | xr.DataTree, path=None, **kwargs):
    """Forest plot, one colour per method for a dict of exports (same chain/draw sizes)."""
    kwargs.setdefault("combined", True)
    pc = arviz_plots.plot_forest(dts, backend="matplotlib", **kwargs)
    if not isinstance(dts, xr.DataTree):  # a dict of methods: colour legend
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
