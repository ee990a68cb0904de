"""Draws, densities and model passes of a Pyro source, for :mod:`pyro_swag.datatree`.

No ArviZ here: :func:`collect` runs a guide or reads an MCMC run and evaluates the model
(through :mod:`pyro_swag.predictive`); :mod:`pyro_swag.datatree` lays the result out as an
ArviZ DataTree.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC
from pyro.infer.autoguide import AutoDiagonalNormal
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.reparam import NeuTraReparam
from pyro.poutine.messenger import Messenger
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import biject_to

from ._checks import is_int
from ._fitted import model_of
from .autoguide import SWAGCollector
from .multiswag import MultiSWAG
from .predictive import log_joint, log_likelihood, predictive, sample_latents, unpack_latents

__all__ = ["Collected", "collect", "constant_data_of", "constant_dims", "scale_attrs",
           "site_dims"]


# ----------------------------------------------------------------------------- sites
class _Unobserve(UnconditionMessenger):
    """``poutine.uncondition`` restricted to the named sites (not ``pyro.deterministic``)."""

    def __init__(self, names) -> None:
        super().__init__()
        self.names = set(names)

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.names:
            super()._pyro_sample(msg)


class _RandomSubsamples(Messenger):
    """Record the plates that draw a random subsample (``subsample_size`` < size, no
    ``subsample=``): every model pass would index the data differently."""

    def __init__(self) -> None:
        super().__init__()
        self.plates: list[str] = []

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if (site_is_subsample(msg) and msg["value"] is None
                and fn.subsample_size is not None and fn.subsample_size < fn.size):
            self.plates.append(msg["name"])


def _site_info(model: Callable, args: tuple, kwargs: dict) -> dict[str, dict]:
    """Latent, observed and deterministic sites of one prior run: ``{kind: {name: site}}``."""
    with torch.random.fork_rng(), torch.no_grad(), _RandomSubsamples() as random:
        trace = prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))
    if random.plates:
        name = random.plates[0]
        raise ValueError(
            f"plate {name!r} draws a random subsample (subsample_size smaller than its size, "
            "no subsample=), so log_likelihood, observed_data and posterior_predictive would "
            f"each see different data; for the export run the model on all the data: "
            f"pyro.plate({name!r}, N, subsample=torch.arange(N)) or subsample_size=None"
        )
    info: dict[str, dict] = {"latent": {}, "observed": {}, "deterministic": {}}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("is_auxiliary"):  # pyro.factor
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


def site_dims(name: str, site: dict) -> list[str]:
    """Dimension names of a site's value: plate names where a plate sits, else defaults."""
    value = site["value"]
    # pyro.deterministic's default declares every dim an event dim, though its plates still
    # index the value; with event_dim=k the last k are event dims, as for any site. A plate's
    # name goes only to an axis of the plate's size.
    event_dim = site["fn"].event_dim
    deterministic = site["infer"].get("_deterministic") and event_dim == value.dim()
    nb = value.dim() - (0 if deterministic else event_dim)
    dims: list[str | None] = [None] * value.dim()
    for frame in site["cond_indep_stack"]:
        if (frame.vectorized and frame.dim is not None and 0 <= nb + frame.dim < nb
                and value.shape[nb + frame.dim] == frame.size):
            dims[nb + frame.dim] = frame.name
    return [d or f"{name}_dim_{i}" for i, d in enumerate(dims)]


def _guide_model(guide) -> Callable | None:
    """The model an autoguide was built on, without the guide's ``InitMessenger`` wrappers."""
    model = model_of(guide)
    while (isinstance(model, functools.partial) and len(model.args) == 2
           and isinstance(model.args[0], InitMessenger)):
        model = model.args[1]
    return model


def constant_data_of(model, args, kwargs, observed: dict) -> dict[str, torch.Tensor]:
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


def constant_dims(const: dict, var_dims: dict, observed: dict) -> dict[str, list[str]]:
    """Dimension names of constant data: a leading axis whose size is one observed plate's
    takes that plate's name (``x`` of shape (N, D) gets ``data``), others ``{k}_dim_{i}``."""
    plate_sizes: dict[int, set] = {}
    for name, site in observed.items():
        for dim, size in zip(var_dims[name], site["value"].shape):
            plate_sizes.setdefault(size, set()).add(dim)
    out = {}
    for k, v in const.items():
        shape = np.shape(v)
        named = plate_sizes.get(shape[0], set()) if shape else set()
        out[k] = [next(iter(named)) if i == 0 and len(named) == 1 else f"{k}_dim_{i}"
                  for i in range(len(shape))]
    return out


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
    if not is_int(value):
        raise ValueError(f"{name} must be a positive int or None, got {name}={value!r}")
    return int(value)


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
    chains = (getattr(kernel, "chain_stats", None) or [])[-c_all:]  # this run's chains
    if len(chains) == c_all and all(len(r) == d_all for r in chains):
        arr = np.asarray(chains, float).reshape(c_all, d_all, 4)[:c, keep]
        stats["tree_depth"] = arr[..., 0].astype(int)
        stats["n_steps"] = arr[..., 1].astype(int)
        stats["step_size"] = arr[..., 2]
        stats["energy"] = arr[..., 3]
    elif c_all == 1 and hasattr(kernel, "step_size"):
        stats["step_size"] = np.full((c, d), float(kernel.step_size))
    return c, d, values, stats


def _neutra_of(model: Callable) -> NeuTraReparam | None:
    """The :class:`NeuTraReparam` of a model built as ``neutra.reparam(model)``, else None."""
    owner = getattr(getattr(getattr(model, "msngr", None), "config", None), "__self__", None)
    return owner if isinstance(owner, NeuTraReparam) else None


def _guide_draws(guide, model, args, kwargs, info, num_chains, num_draws):
    """Draws of a guide: ``(C, D, values, latents or None, log_q_u or None, layout)``."""
    if getattr(guide, "prototype_trace", None) is None and hasattr(guide, "_setup_prototype"):
        with torch.random.fork_rng():
            guide._setup_prototype(*args, **kwargs)
    equal = isinstance(guide, MultiSWAG) and bool((guide.weights == guide.weights[0]).all())
    if equal:  # d draws of every run: the equal mixture, whose density is log_q
        if num_chains not in (None, guide.num_runs):
            raise ValueError(
                f"num_chains={num_chains} but a MultiSWAG guide with equal weights is exported "
                f"with one chain per run ({guide.num_runs}); pass num_chains=None"
            )
        c, d = guide.num_runs, _check_count("num_draws", num_draws, 100)
        latents = guide.sample_chains(d).reshape(c * d, -1)
    elif isinstance(guide, MultiSWAG):  # unequal weights: i.i.d. draws of the mixture
        c = _check_count("num_chains", num_chains, 1)
        d = _check_count("num_draws", num_draws, 100)
        latents = guide.sample_mixture(c * d)
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


# ----------------------------------------------------------------------------- collect
class Collected(NamedTuple):
    """Everything :func:`pyro_swag.datatree.to_datatree` lays out (tensors as drawn)."""

    num_chains: int
    num_draws: int
    info: dict  # {"latent"|"observed"|"deterministic": {name: prototype site}}
    values: dict  # latent draws (S, *shape), S = num_chains * num_draws
    predicted: dict  # observed-site replicates and deterministic sites (S, ...)
    log_likelihood: dict  # {observed site: (S, *batch_shape)}
    log_p: torch.Tensor  # (S,)
    log_q: torch.Tensor | None  # (S,), guides only
    stats: dict  # MCMC sample stats, numpy (chain, draw)
    method: str
    model: Callable


def collect(
    source: Any,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    model: Callable | None = None,
    num_chains: int | None = None,
    num_draws: int | None = None,
    chunk_size: int | None = None,
) -> Collected:
    """Draws of ``source`` and the model evaluated at them (see ``to_datatree``)."""
    kwargs = dict(kwargs or {})
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"args must be a tuple of the model's positional arguments, got "
            f"{type(args).__name__}; pass e.g. args=(x,)"
        )
    args = tuple(args)
    if isinstance(source, SWAGCollector):
        raise TypeError(
            "source is a SWAGCollector, the point mass that SGD moves (exported, it would be a "
            "posterior of zero width); export its posterior: to_datatree(collector.swag_guide(), "
            "...)"
        )
    is_mcmc = isinstance(source, MCMC)
    neutra = _neutra_of(source.kernel.model) if is_mcmc else None
    if model is None and is_mcmc:  # a NeuTra run's kernel has the reparameterised model
        model = source.kernel.model.fn if neutra else source.kernel.model
    elif model is None:
        model = _guide_model(source)
    if not callable(model):
        raise TypeError(
            f"could not find the model of source={type(source).__name__} (a guide loaded with "
            "torch.load has none: Pyro does not pickle a guide's model); pass model=..."
        )
    info = _site_info(model, args, kwargs)
    stats: dict[str, np.ndarray] = {}
    if is_mcmc:
        c, d, values, stats = _mcmc_draws(source, num_chains, num_draws)
        if neutra is not None:  # draws of the whitened latent: map them to the model's sites
            with torch.no_grad():
                values = neutra.transform_sample(next(iter(values.values())))
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
    if missing and any(k.endswith("_shared_latent") for k in values):
        raise ValueError(
            f"the MCMC run holds NeuTraReparam draws ({sorted(values)}), not the model's latent "
            f"sites {sorted(missing)}: build its model as neutra.reparam(model), which "
            "to_datatree recognises and maps back"
        )
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
    pred = predictive(
        _Unobserve(obs_names)(model), None, *args, posterior_samples=values,
        return_sites=obs_names, chunk_size=chunk_size, **kwargs,
    )
    if info["deterministic"]:  # from the observed data, not from the replicates
        pred |= predictive(model, None, *args, posterior_samples=values, chunk_size=chunk_size,
                           return_sites=list(info["deterministic"]), **kwargs)
    loglik = log_likelihood(model, values, *args, chunk_size=chunk_size, **kwargs)

    return Collected(
        c, d, info, values, pred, loglik, log_p, log_q, stats,
        type(source.kernel if is_mcmc else source).__name__
        + (f" whitened by NeuTraReparam({type(neutra.guide).__name__})" if neutra else ""),
        model,
    )


def scale_attrs(source: Any) -> dict[str, Any]:
    """SWAG's covariance scale and, when calibrated, how it was chosen (flat, netCDF-safe)."""
    if not hasattr(source, "scale") or not hasattr(source, "calibration"):
        return {}
    attrs = {"swag_scale": float(source.scale)}
    record = source.calibration
    if record:
        attrs["calibration_method"] = str(record.get("method"))
        attrs["calibration"] = json.dumps(record, default=float)
    return attrs
