"""Checks of guides, posterior draws and site selection for :mod:`pyro_swag.predictive`.

``_select_sites`` follows ``pyro.infer.Predictive``'s ``return_sites`` rules; ``_shape_draws``
brings draws of any layout with the right number of entries per draw (``MCMC.get_samples()``
``(S, *shape)``, ``Predictive``'s ``(S, 1, *shape)`` with singleton plate dims) to
``(S, *site_shape)``, the shape of the site in the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoContinuous
from torch.distributions import LowRankMultivariateNormal
from torch.distributions.utils import _standard_normal

from ._vectorize import _num_draws, _numel, _prototype


def _select_sites(trace, return_sites, given: dict, guide: bool) -> list[str]:
    """Sites to return, as ``pyro.infer.Predictive`` picks them (Pyro 1.9).

    ``None``: every sample site. Empty (``()``, ``[]``, ``set()``): every sample site with a
    guide, else the sites not in ``given`` (the posterior samples). Otherwise the named sites,
    in model order, ``"_RETURN"`` last. Unlike Pyro, a name that is no sample site of the model
    is an error rather than silently dropped.
    """
    known = trace.stochastic_nodes + trace.observation_nodes
    if return_sites is not None and (
        isinstance(return_sites, str) or not isinstance(return_sites, (list, tuple, set))
    ):
        raise TypeError(f"return_sites must be a list of site names, got {return_sites!r}")
    if not return_sites:
        if return_sites is None or guide:
            return list(known)
        return [s for s in known if s not in given]
    unknown = sorted(set(return_sites) - set(known) - {"_RETURN"})
    if unknown:
        raise ValueError(f"return_sites has {unknown}, not sample sites of the model {known}")
    return [s for s in known if s in return_sites] + (
        ["_RETURN"] if "_RETURN" in return_sites else []
    )


def _shape_draws(values: dict, proto, name: str) -> dict[str, torch.Tensor]:
    """Draws of the model's sample sites in ``proto``, reshaped to ``(S, *site_shape)``.

    Keys that are no sample site of the model are dropped (``poutine.condition`` ignores
    them too); a draw whose size per draw is not the site's raises a ``ValueError``.
    """
    num = _num_draws(values, name)
    out = {}
    for k, v in values.items():
        site = proto.nodes.get(k)
        if site is None or site["type"] != "sample":
            continue
        shape = tuple(site["value"].shape)
        if v.numel() != num * _numel(shape):
            raise ValueError(
                f"{name} {k!r} has shape {tuple(v.shape)}, expected (S, *{shape}) "
                f"with S={num}: the site's shape in the model"
            )
        out[k] = v.reshape((num,) + shape)
    return out


def _missing_sites(what: str, names: list[str]) -> ValueError:
    return ValueError(
        f"{what}: sites {names} are neither in samples nor observed; pass the draws of these "
        "latent sites in samples (or the data of an observed site to the model, e.g. y=...)"
    )


def _shaped_samples(model: Callable, values: dict, args: tuple, kwargs: dict, what: str) -> dict:
    """Draws of every latent site of ``model``, reshaped by :func:`_shape_draws` against a
    prior trace (the RNG state is kept); a latent site without draws is a ``ValueError``.
    Draws of sites the data observe (``Predictive`` returns them) are dropped: conditioning
    on them would score replicated data instead of the data passed in."""
    _num_draws(values, "samples")
    rng = pyro.util.get_rng_state()
    try:
        proto = _prototype(model, args, kwargs)
    finally:
        pyro.util.set_rng_state(rng)
    observed = set(proto.observation_nodes)
    out = _shape_draws({k: v for k, v in values.items() if k not in observed}, proto, "samples")
    missing = [s for s in proto.stochastic_nodes if s not in out]
    if missing:
        raise _missing_sites(what, missing)
    return out


def _require_continuous(guide: Any, what: str) -> None:
    if not isinstance(guide, AutoContinuous):
        raise TypeError(
            f"{what} needs an AutoContinuous guide (SWAGGuide, AutoLowRankMultivariateNormal, "
            f"AutoLaplaceApproximation, ...), got guide={type(guide).__name__}; for other "
            "guides use predictive(model, guide, ...) which runs the guide itself"
        )
    if getattr(guide, "prototype_trace", None) is None:
        raise RuntimeError(
            f"{what}: guide={type(guide).__name__} has not been set up; call "
            "guide(*model_args) once, or pass the model arguments to sample_latents"
        )


def _low_rank_sample(posterior: LowRankMultivariateNormal, num: int) -> torch.Tensor:
    """``posterior.rsample((num,))`` with the low-rank term as one matmul.

    The same standard-normal draws as ``LowRankMultivariateNormal.rsample`` (``eps_W`` (S, K),
    then ``eps_D`` (S, P)); ``loc + eps_W W^T + sqrt(D) * eps_D`` is then one ``addmm`` instead
    of torch's S matrix-vector products over an expanded copy of ``W`` (S x P x K floats).
    """
    loc, factor = posterior.loc, posterior.cov_factor
    eps_w = _standard_normal((num, factor.shape[-1]), dtype=loc.dtype, device=loc.device)
    eps_d = _standard_normal((num, loc.shape[-1]), dtype=loc.dtype, device=loc.device)
    return torch.addcmul(torch.addmm(loc, eps_w, factor.T), posterior.cov_diag.sqrt(), eps_d)
