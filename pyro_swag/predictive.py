r"""Fast posterior predictive: all S draws of a Pyro model in one vectorized pass.

The model is evaluated for a whole chunk of posterior draws at once with
:func:`torch.func.vmap` over ``poutine.trace(poutine.condition(model, draw))``, so
``PyroModule[nn.Linear]`` layers with ``PyroSample`` weights work unchanged (Pyro's own
``Predictive(parallel=True)`` fails on them). Inside the vectorized pass the sites to
predict (sample sites that are neither conditioned nor observed, e.g. ``"obs"`` called with
``obs=None``) are not sampled: their distributions are recorded, and afterwards each draw's
distribution is rebuilt and sampled in the order sequential ``pyro.infer.Predictive`` uses
(``Normal`` sites: only the standard-normal noise is drawn per draw, by the call Pyro's
``rsample`` makes, and ``loc + eps * scale`` is formed once for all draws). With the same
seed and the same posterior draws the outputs therefore equal sequential ``Predictive``'s
(the random draws bit for bit, network outputs to float rounding).

Assumption of the vectorized path: a predicted site's *value* is not used later in the
model (true of likelihood sites); models that feed sampled values forward, or draw their
own randomness (``torch.randn``, dropout), fall back to the sequential path with a warning.

Output format is that of ``MCMC.get_samples()``: ``{site: tensor (S, *site_shape)}``
(Pyro's ``Predictive`` inserts singleton plate dims, ``(S, 1, *site_shape)``, for latents
of models with plates).

The latent draws of an :class:`~pyro.infer.autoguide.AutoContinuous` guide live in the
unconstrained space :math:`\theta \in \mathbb{R}^P`; site values are
:math:`z = T(\theta)` with :math:`T` = ``biject_to(support)`` per site, and the density of
the unconstrained vector is

.. math::

    \log p_\theta(\theta \mid \mathcal{D}) = \log p(z, \mathcal{D})
        + \log\left|\det \partial T(\theta) / \partial \theta\right| + \text{const},

which :func:`log_joint` returns (``log_p - guide.get_posterior().log_prob(theta)`` are
then valid importance log-weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.poutine.util import site_is_subsample
from torch.distributions import LowRankMultivariateNormal, biject_to

from ._forward import forward_draws
from ._samples import (
    _low_rank_sample,
    _missing_sites,
    _require_continuous,
    _select_sites,
    _shape_draws,
    _shaped_samples,
)
from ._vectorize import (
    _check_not_fed_forward,
    _check_positive_int,
    _chunks,
    _flatten,
    _followed,
    _map_draws,
    _num_draws,
    _numel,
    _prototype,
    _put,
    _run_vmapped,
    _sample_deferred,
    _warn_fallback,
)

__all__ = [
    "forward_draws",
    "log_joint",
    "log_likelihood",
    "predictive",
    "sample_latents",
    "unpack_latents",
]


# ----------------------------------------------------------------------------- latents
def sample_latents(guide: Any, num_samples: int, *args, **kwargs) -> torch.Tensor:
    """Draw unconstrained latent vectors from a guide's posterior in one batched op.

    Parameters
    ----------
    guide : AutoContinuous
        Any guide with ``get_posterior()`` (SWAGGuide, AutoLowRankMultivariateNormal, ...).
    num_samples : int
        Number of draws ``S``.
    *args, **kwargs
        Model arguments; used to set the guide up if it has never run, and passed to
        ``get_posterior``.

    Returns
    -------
    torch.Tensor
        Shape (S, P), on the guide's device and dtype.
    """
    num_samples = _check_positive_int(num_samples, "num_samples")
    if isinstance(guide, AutoContinuous) and guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    _require_continuous(guide, "sample_latents")
    with torch.no_grad():
        posterior = guide.get_posterior(*args, **kwargs)
        low_rank = type(posterior).rsample is LowRankMultivariateNormal.rsample
        if low_rank and not posterior.batch_shape:
            return _low_rank_sample(posterior, num_samples)
        return posterior.sample((num_samples,))


def _unpack(guide: Any, latents: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Constrained site values and the summed log|Jacobian| of ``biject_to``, per draw."""
    _require_continuous(guide, "unpack_latents")
    if not torch.is_tensor(latents) or latents.dim() != 2:
        shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"latents must be a tensor of shape (S, P), got {shape}")
    total = sum(_numel(s) for s in guide._unconstrained_shapes.values())
    if latents.shape[-1] != total:
        raise ValueError(
            f"latents has {latents.shape[-1]} columns but the guide's latent size is {total}; "
            "draw them with sample_latents(guide, S)"
        )
    num = latents.shape[0]
    values, logdet, pos = {}, latents.new_zeros(num), 0
    for name, shape in guide._unconstrained_shapes.items():
        site = guide.prototype_trace.nodes[name]
        size = _numel(shape)
        u = latents[:, pos : pos + size].reshape((num,) + tuple(shape))
        pos += size
        transform = biject_to(site["fn"].support)
        z = transform(u)
        ld = torch.as_tensor(transform.log_abs_det_jacobian(u, z), dtype=latents.dtype)
        logdet = logdet + ld.expand(num, *ld.shape[1:]).reshape(num, -1).sum(-1)
        values[name] = z
    return values, logdet


def unpack_latents(guide: Any, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Map unconstrained draws (S, P) to constrained site values ``{site: (S, *shape)}``.

    Parameters
    ----------
    guide : AutoContinuous
        A set-up guide (it has run once) whose layout the columns of ``latents`` follow.
    latents : torch.Tensor
        Unconstrained draws, e.g. from :func:`sample_latents`.
    """
    return _unpack(guide, latents)[0]


def _guide_draws(guide, num_samples, args, kwargs) -> dict[str, torch.Tensor]:
    """Constrained latent draws ``{site: (S, ...)}`` from any guide."""
    if isinstance(guide, AutoContinuous):
        return unpack_latents(guide, sample_latents(guide, num_samples, *args, **kwargs))
    try:
        return Predictive(guide, num_samples=num_samples, return_sites=None, parallel=True)(
            *args, **kwargs
        )
    except (RuntimeError, ValueError, NotImplementedError) as err:
        _warn_fallback("predictive (guide)", err)
    return Predictive(guide, num_samples=num_samples, return_sites=None)(*args, **kwargs)


def predictive(
    model: Callable,
    guide: Callable | None = None,
    *args,
    num_samples: int = 100,
    posterior_samples: dict[str, torch.Tensor] | None = None,
    return_sites: Sequence[str] | None = (),
    chunk_size: int | None = None,
    parallel: bool = True,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Posterior predictive draws of a Pyro model, vectorized over the S draws.

    Parameters
    ----------
    model : callable
        The Pyro model (``PyroModule`` BNNs included).
    guide : callable, optional
        A guide; AutoContinuous guides (SWAGGuide, AutoLowRankMultivariateNormal, ...) are
        sampled in one batched op, other guides (AutoNormal, ...) through Pyro's
        ``Predictive``. Give either ``guide`` or ``posterior_samples``.
    *args, **kwargs
        Model arguments (e.g. ``x``).
    num_samples : int
        Number of draws ``S`` when a guide is given.
    posterior_samples : dict, optional
        Constrained latent draws ``{site: (S, *site_shape)}``, e.g. ``MCMC.get_samples()``.
    return_sites : list of str or None
        Sites to return (``"_RETURN"`` for the model's return value), chosen as by Pyro's
        ``Predictive``: ``None`` returns every sample site; empty (the default) returns every
        sample site with a guide, else the sites not in ``posterior_samples``.
    chunk_size : int, optional
        Draws evaluated together; bounds peak memory (default: all at once).
    parallel : bool
        ``False`` runs sequential ``pyro.infer.Predictive`` (the reference path).

    Returns
    -------
    dict
        ``{site: tensor (S, *site_shape)}``.
    """
    if isinstance(model, AutoGuide):
        raise TypeError(
            f"predictive takes the model first, then the guide; got a {type(model).__name__} "
            "as the model: call predictive(guide.model, guide, x) (its model's arguments after "
            "the guide)"
        )
    if (guide is None) == (posterior_samples is None):
        raise ValueError("give exactly one of guide=... or posterior_samples=...")
    if guide is not None and not callable(guide):
        raise TypeError(
            f"guide must be a callable Pyro guide, got a {type(guide).__name__}; the model's "
            "arguments come after it: predictive(model, guide, x), or predictive(model, None, "
            "x, posterior_samples=...)"
        )
    if guide is not None:
        num_samples = _check_positive_int(num_samples, "num_samples")
        values = _guide_draws(guide, num_samples, args, kwargs)
    else:
        values = posterior_samples
    num = _num_draws(values, "posterior_samples")
    if chunk_size is not None:
        chunk_size = _check_positive_int(chunk_size, "chunk_size")
    rng = pyro.util.get_rng_state()
    proto = _prototype(model, args, kwargs)
    sites = _select_sites(proto, return_sites, values, guide is not None)
    ret = proto.nodes["_RETURN"]["value"]
    if "_RETURN" in sites and not torch.is_tensor(ret):
        raise TypeError(
            f"return_sites has '_RETURN' but the model returns a {type(ret).__name__}, not a "
            "tensor; return a tensor or record values with pyro.deterministic"
        )
    values = _shape_draws(values, proto, "posterior sample")
    if parallel:
        try:
            return _predict_vectorized(model, values, sites, args, kwargs, chunk_size)
        except (RuntimeError, NotImplementedError, TypeError, IndexError) as err:
            _warn_fallback("predictive", err)
    pyro.util.set_rng_state(rng)
    out = Predictive(model, posterior_samples=values, return_sites=sites)(*args, **kwargs)
    return {
        k: v if k == "_RETURN" else v.reshape((num,) + proto.nodes[k]["value"].shape)
        for k, v in out.items()
    }


def _predict_vectorized(model, values, sites, args, kwargs, chunk_size) -> dict:
    num = next(iter(values.values())).shape[0]
    spec: dict[str, Any] = {}

    def body(trace, deferred, ret):
        flat: list[torch.Tensor] = []
        spec["deferred"] = [
            (m["name"], _flatten((m["fn"], m["args"], m["kwargs"]), flat)) for m in deferred
        ]
        names = {m["name"] for m in deferred}
        spec["fixed"] = [s for s in sites if s not in names]
        # the return value may use a predicted value too (NaN placeholders miss `y > 0`)
        spec["followed"] = _followed(trace, names) or bool(names) and "_RETURN" in sites
        fixed = [ret if s == "_RETURN" else trace.nodes[s]["value"] for s in spec["fixed"]]
        return tuple(fixed), tuple(flat)

    out: dict[str, torch.Tensor] = {}
    for c in _chunks(num, chunk_size):
        fixed, flat = _run_vmapped(model, {k: v[c] for k, v in values.items()}, args, kwargs, body)
        # placeholders of predicted sites are NaN: a NaN downstream means the model used one
        if any(t.is_floating_point() and torch.isnan(t).any() for t in (*fixed, *flat)):
            raise RuntimeError("the model uses a predicted site's value (or produced NaN)")
        sampled = _sample_deferred(spec["deferred"], flat, c.stop - c.start)
        if spec["followed"]:
            _check_not_fed_forward(model, {k: v[c] for k, v in values.items()}, sampled,
                                   [n for n, _ in spec["deferred"]], spec["fixed"],
                                   (*fixed, *flat), args, kwargs)
        for name, value in zip(spec["fixed"], fixed):
            _put(out, name, num, c, value)
        for name, value in sampled.items():
            if name in sites:
                _put(out, name, num, c, value)
    return {s: out[s] for s in sites}


def log_likelihood(
    model: Callable,
    samples: dict[str, torch.Tensor],
    *args,
    chunk_size: int | None = None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Pointwise log-likelihood ``log p(y_n | z_s)`` of every observed site, per draw.

    Parameters
    ----------
    model : callable
        The Pyro model; observed data go in ``args``/``kwargs`` (e.g. ``x, y``).
    samples : dict
        Constrained draws of every latent site, ``{site: (S, *site_shape)}``; any layout with
        the site's size per draw is accepted, as in :func:`predictive` (e.g. Pyro
        ``Predictive``'s ``(S, 1, *site_shape)``).
    chunk_size : int, optional
        Draws evaluated together.

    Returns
    -------
    dict
        ``{observed_site: tensor (S, *batch_shape)}``, e.g. (S, N) for a data plate;
        unscaled by subsampling, masked entries 0.

    Raises
    ------
    ValueError
        If a latent site of the model has no draws in ``samples``.
    """
    samples = _shaped_samples(model, samples, args, kwargs, "log_likelihood")
    names: list[str] = []
    plates: list[str] = []  # subsampled plates: their indices must not change across draws

    def body(trace, deferred, ret):
        if deferred:  # a site the prior trace did not have (control flow)
            raise _missing_sites("log_likelihood", [m["name"] for m in deferred])
        names.clear()
        out = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or not site["is_observed"] or name in samples:
                continue
            if site["infer"].get("_deterministic") or site["infer"].get("is_auxiliary"):
                continue  # pyro.deterministic, pyro.factor: no observation
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            names.append(name)
            out.append(scale_and_mask(lp, mask=site["mask"]))
        plates.clear()
        plates.extend(n for n, s in trace.nodes.items() if site_is_subsample(s))
        return tuple(out) + tuple(trace.nodes[n]["value"] for n in plates)

    stacked = _map_draws(model, samples, args, kwargs, body, chunk_size, "log_likelihood")
    for plate, idx in zip(plates, stacked[len(names):]):
        if not (idx == idx[:1]).all():
            raise ValueError(
                f"log_likelihood: plate {plate!r} draws a new random subsample for every draw "
                "(subsample_size=), so a column would be a different data point in each row; "
                "evaluate on all the data, or pass fixed indices with subsample="
            )
    if not names:
        raise ValueError("the model has no observed sites: pass the observed data (e.g. y=...)")
    return dict(zip(names, stacked[: len(names)]))


def log_joint(
    model: Callable,
    guide: Any,
    latents: torch.Tensor,
    *args,
    chunk_size: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Log density of the unconstrained latent vector, per draw (module docstring).

    ``log p(T(theta), data) + log|det J_T(theta)|``: the log joint of the model at the
    constrained values (all sites, with plate scales and masks) plus the log-Jacobian of
    the bijections. ``log_joint(...) - guide.get_posterior().log_prob(latents)`` are
    importance log-weights.

    Parameters
    ----------
    model, guide : callable
        The model and the AutoContinuous guide whose layout ``latents`` follow.
    latents : torch.Tensor
        Unconstrained draws (S, P).
    *args, **kwargs
        Model arguments including the observed data.

    Returns
    -------
    torch.Tensor
        Shape (S,).
    """
    values, logdet = _unpack(guide, latents)

    def body(trace, deferred, ret):
        if deferred:
            raise ValueError(
                f"log_joint: sites {[m['name'] for m in deferred]} are neither latents of "
                "the guide nor observed; pass their data to the model"
            )
        total = latents.new_zeros(())
        for site in trace.nodes.values():
            if site["type"] != "sample" or site["infer"].get("_deterministic"):
                continue
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            total = total + scale_and_mask(lp, site["scale"], site["mask"]).sum()
        return (total,)

    (lp,) = _map_draws(model, values, args, kwargs, body, chunk_size, "log_joint")
    return lp + logdet
