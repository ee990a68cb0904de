r"""SWAG as Pyro autoguides: a point-mass collector and the frozen Gaussian posterior.

Both guides live in the model's *unconstrained* latent space, the space of
:class:`~pyro.infer.autoguide.AutoContinuous`: every latent site is mapped through
``biject_to(site.support).inv`` and the pieces are concatenated into one vector
:math:`\theta \in \mathbb{R}^P`. SGD runs there, so that is where its iterates — and
SWAG's Gaussian — live; constrained sites (scales, simplices) are mapped back through
their bijections when the guide is sampled.

With the moments of :mod:`pyro_swag.moments` (mean :math:`\mu`, diagonal variance
:math:`\Sigma_{\rm diag}`, deviation matrix :math:`D \in \mathbb{R}^{P \times K'}`) the
SWAG posterior is

.. math::

    q(\theta) = \mathcal{N}\!\left(\mu,\; \tfrac{s}{2}\Big(\Sigma_{\rm diag}
                + \frac{D D^\top}{\max(K' - 1, 1)}\Big)\right),

with ``scale`` :math:`s` (1 in the paper). SWAG-Diag is
:math:`\mathcal{N}(\mu, s\, \Sigma_{\rm diag})`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoLaplaceApproximation
from pyro.infer.autoguide.initialization import init_to_median

from ._checks import is_positive_finite
from ._fitted import (
    FittedContinuous,
    KeepsModelWhenPickled,
    _adopt_prototype,
    _check_layout,
    _layout,
)
from ._lowrank import LowRankAffine
from .moments import SWAGMoments, unmoved, warn_unmoved

__all__ = ["FittedContinuous", "SWAGCollector", "SWAGGuide"]


class SWAGCollector(KeepsModelWhenPickled, AutoLaplaceApproximation):
    """A point-mass guide that SGD moves and that records SWAG moments of its path.

    ``SVI(model, collector, optim, Trace_ELBO())`` is MAP/SGD on the unconstrained latent
    vector ``collector.loc``; call :meth:`collect` to record the current point (once per
    epoch, or every few steps) and :meth:`swag_guide` to freeze the posterior.

    Parameters
    ----------
    model : callable
        A Pyro model with continuous latent sites.
    rank : int
        Number of deviations kept for the low-rank term (``K``).
    init_loc_fn : callable
        Per-site initialisation, see :mod:`pyro.infer.autoguide.initialization`.
    min_var : float
        Lower clamp of the diagonal variance, > 0 (the guide's Gaussian needs every variance
        positive).
    deviation_dtype : torch.dtype, optional
        Storage dtype of the deviation buffer (e.g. ``torch.bfloat16``).
    moments_device : torch.device or str, optional
        Keep the moments on another device (e.g. ``"cpu"`` while training on CUDA).
    """

    def __init__(
        self,
        model: Callable,
        rank: int = 20,
        *,
        init_loc_fn: Callable = init_to_median,
        min_var: float = 1e-30,
        deviation_dtype: torch.dtype | None = None,
        moments_device: torch.device | str | None = None,
    ) -> None:
        if not is_positive_finite(min_var):
            raise ValueError(
                f"min_var must be a positive finite number, got min_var={min_var!r}; the guide's "
                "Gaussian needs every variance > 0 (the default is 1e-30)"
            )
        moments = SWAGMoments(rank, min_var, deviation_dtype, moments_device)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.moments = moments

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.full_size not in (None, frame.size):
                    self.prototype_trace = None  # not set up: a fixed model can try again
                    raise ValueError(
                        f"latent site {name!r} lies in plate {frame.name!r}, subsampled to "
                        f"{frame.size} of {frame.full_size}: the SWAG posterior is one global "
                        "vector and cannot hold local latents of a subsampled plate (it would "
                        "mix whichever rows each batch holds). Pass the whole plate in every "
                        "batch, or move the latent out of the subsampled plate" + (
                            "; here obs_mask made the masked entries latent: drop them from "
                            "the likelihood with poutine.mask(mask=...) instead"
                            if name.endswith("_unobserved") else "")
                    )
        self.loc = torch.nn.Parameter(self._init_loc())

    def _require_setup(self, what: str) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}.{what} needs the model's latent layout: run "
                "svi.step(...) or call collector(*model_args) once first"
            )

    @property
    def rank(self) -> int:
        return self.moments.rank

    @property
    def num_snapshots(self) -> int:
        """Number of snapshots collected so far."""
        return self.moments.count

    @torch.no_grad()
    def collect(self, latent: torch.Tensor | None = None) -> None:
        """Record the current point, or ``latent``, a flat unconstrained latent vector.

        Raises ``ValueError``/``TypeError`` on a vector of the wrong size, dtype or device,
        or one holding NaN/Inf, and then leaves the collected moments untouched.
        """
        self._require_setup("collect()")
        loc = self.loc.detach()
        if latent is None:
            latent = loc
        else:
            if not isinstance(latent, torch.Tensor):
                raise TypeError(
                    f"latent must be a torch.Tensor, got {type(latent).__name__}; "
                    "pass a flat unconstrained latent vector"
                )
            if latent.shape != loc.shape:
                raise ValueError(
                    f"latent has shape {tuple(latent.shape)}, expected ({loc.numel()},), "
                    "the model's unconstrained latent size"
                )
            if latent.dtype != loc.dtype:
                raise TypeError(
                    f"latent has dtype={latent.dtype}, expected dtype={loc.dtype} (the model's); "
                    f"convert it with .to({loc.dtype})"
                )
            if latent.device != loc.device:
                raise ValueError(
                    f"latent is on device={latent.device}, expected device={loc.device} "
                    "(the model's); move it with .to(device)"
                )
        self.moments.update(latent)

    def swag_guide(self, scale: float = 1.0, diagonal: bool = False) -> SWAGGuide:
        """Freeze the collected moments into a :class:`SWAGGuide` (a copy), set up already."""
        self._require_setup("swag_guide()")
        if self.num_snapshots < 2:
            raise RuntimeError(
                f"swag_guide() needs at least 2 snapshots, {self.num_snapshots} collected; "
                "call collect() during training"
            )
        m, device = self.moments, self.loc.device  # the guide lives with the model
        guide = SWAGGuide(
            self.model,
            loc=m.mean.to(device, copy=True),
            variance=m.variance().to(device),
            deviations=m.deviation_matrix().to(device),
            scale=scale,
            diagonal=diagonal,
            layout=_layout(self),
        )
        guide = _adopt_prototype(guide, self)
        _warn_unmoved(guide, self.num_snapshots)
        return guide

    # ------------------------------------------------------------- persistence
    def get_extra_state(self) -> dict[str, Any]:
        self._require_setup("state_dict()")
        return {"layout": _layout(self)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        _check_layout(state["layout"], _layout(self), "the checkpoint")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Restore a collector exactly; its model must have been set up (called) first.

        Every key is checked before anything changes; with ``strict=False`` a missing
        ``loc`` keeps the current point, missing moments keep the current moments (a
        point-only state loads just the point), and unknown keys are reported, not refused.
        """
        self._require_setup("load_state_dict()")
        known = {"loc", "_extra_state"} | {
            f"moments.{k}" for k in ("_extra_state", "mean", "m2", "deviations")
        }
        unexpected = sorted(set(state_dict) - known)
        missing = sorted({"loc", "_extra_state", "moments._extra_state"} - set(state_dict))
        if (strict and (missing or unexpected)) or "_extra_state" in missing:
            raise ValueError(
                f"state_dict lacks {missing} and has unexpected keys {unexpected}; pass the "
                "output of SWAGCollector.state_dict()"
            )
        _check_layout(state_dict["_extra_state"]["layout"], _layout(self), "the checkpoint")
        if any(k.startswith("moments.") for k in state_dict):
            self.moments.check_state(state_dict, "moments.", dtype=self.loc.dtype)
        loc = state_dict.get("loc")
        if loc is not None and loc.shape != self.loc.shape:
            raise ValueError(
                f"the checkpoint's loc has shape {tuple(loc.shape)}, expected "
                f"{tuple(self.loc.shape)}; the checkpoint belongs to another model"
            )
        if loc is not None:
            with torch.no_grad():
                self.loc.copy_(loc)  # in place: optimiser state stays attached
        rest = {k: v for k, v in state_dict.items() if k in known - {"loc"}}
        result = super().load_state_dict(rest, strict=False, assign=assign)
        return result._replace(missing_keys=missing, unexpected_keys=unexpected)


def _warn_unmoved(guide: SWAGGuide, snapshots: int) -> None:
    """:func:`~pyro_swag.moments.warn_unmoved` with the guide's unmoved coordinates by site."""
    mask = unmoved(guide.loc, guide.variance)
    if mask.any():
        counts = {site["name"]: int(part.sum())
                  for site, part in guide._unpack_latent(mask.to(guide.loc.dtype))}
        warn_unmoved(counts, mask.numel(), snapshots, stacklevel=4)


class SWAGGuide(FittedContinuous):
    """The SWAG Gaussian over the model's unconstrained latent vector.

    Usually made by :meth:`SWAGCollector.swag_guide`; usable anywhere an autoguide is,
    e.g. ``pyro.infer.Predictive(model, guide=swag_guide, num_samples=100)``.

    Parameters
    ----------
    model : callable
        The Pyro model.
    loc : torch.Tensor
        SWA mean ``mu`` (P,).
    variance : torch.Tensor
        Diagonal variance ``Sigma_diag`` (P,).
    deviations : torch.Tensor
        Deviation rows ``D^T`` (K', P), possibly in a lower-precision dtype; ``(0, P)`` for
        none, which with ``diagonal=False`` leaves the covariance ``scale/2 * Sigma_diag``
        (SWAG-Diag needs ``diagonal=True``).
    scale : float
        Multiplier of the covariance; may be changed later (``guide.scale = 0.5``).
    diagonal : bool
        SWAG-Diag: ``N(mu, scale * Sigma_diag)``.
    layout : list of (str, tuple), optional
        Site names and unconstrained shapes, checked against the model when the guide
        first runs.
    """

    def __init__(
        self,
        model: Callable,
        loc: torch.Tensor,
        variance: torch.Tensor,
        deviations: torch.Tensor,
        scale: float = 1.0,
        diagonal: bool = False,
        layout: list | None = None,
    ) -> None:
        super().__init__(model)
        for name, value in (("loc", loc), ("variance", variance), ("deviations", deviations)):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                got = f"dtype={value.dtype}" if isinstance(value, torch.Tensor) else type(
                    value).__name__
                raise TypeError(
                    f"{name} must be a floating-point torch.Tensor, got {got}; pass e.g. the "
                    "collector's SWAGMoments tensors"
                )
        if (loc.dim() != 1 or variance.shape != loc.shape or deviations.dim() != 2
                or deviations.shape[-1:] != loc.shape):
            raise ValueError(
                f"loc {tuple(loc.shape)}, variance {tuple(variance.shape)} and deviations "
                f"{tuple(deviations.shape)} must be (P,), (P,) and (K, P); pass "
                f"deviations=torch.zeros(0, P) for none"
            )
        if variance.dtype != loc.dtype:
            raise TypeError(
                f"variance has dtype={variance.dtype} but loc has dtype={loc.dtype}; convert "
                f"it with .to({loc.dtype})"
            )
        if not (bool(torch.isfinite(loc).all()) and bool(torch.isfinite(deviations).all())):
            raise ValueError(
                "loc and deviations must be finite in every entry; the trajectory they came "
                "from diverged"
            )
        if not bool(torch.isfinite(variance).all()) or not bool((variance > 0).all()):
            raise ValueError(
                "variance must be finite and > 0 in every entry; pass the diagonal variance "
                "Sigma_diag, e.g. SWAGMoments.variance() with min_var > 0"
            )
        if not isinstance(diagonal, bool):
            raise TypeError(f"diagonal must be True or False, got diagonal={diagonal!r}")
        self.register_buffer("loc", loc)
        self.register_buffer("variance", variance)
        self.register_buffer("deviations", deviations)
        self.scale = scale
        self.diagonal = diagonal
        self.layout = layout
        #: How ``scale`` was chosen (a plain dict from :mod:`pyro_swag.calibrate`), or None.
        self.calibration: dict | None = None

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if not is_positive_finite(value):
            raise ValueError(
                f"scale must be a positive finite number, got scale={value!r}; e.g. scale=1.0"
            )
        self._scale = float(value)

    @property
    def rank(self) -> int:
        """Number of deviations held, ``K'``."""
        return self.deviations.shape[0]

    def cov_factor(self) -> torch.Tensor:
        r"""Low-rank factor :math:`W = D \sqrt{s / (2 \max(K'-1, 1))}`, shape (P, K')."""
        k = self.rank
        w = self.deviations.to(self.loc.dtype).T
        return w * (self.scale / (2 * max(k - 1, 1))) ** 0.5

    def get_posterior(self, *args, **kwargs) -> dist.TorchDistribution:
        """``LowRankMultivariateNormal`` (SWAG) or ``Normal(...).to_event(1)`` (SWAG-Diag)."""
        if self.diagonal or self.rank == 0:
            factor = 1.0 if self.diagonal else 0.5
            return dist.Normal(self.loc, (factor * self.scale * self.variance).sqrt()).to_event(1)
        return dist.LowRankMultivariateNormal(
            self.loc, self.cov_factor(), self.scale * self.variance / 2
        )

    def get_base_dist(self) -> dist.TorchDistribution:
        """``N(0, I_P)``, the base of :meth:`get_transform`."""
        return dist.Normal(torch.zeros_like(self.loc), 1.0).to_event(1)

    def get_transform(self, *args, **kwargs) -> LowRankAffine:
        """The affine bijection that maps :meth:`get_base_dist` onto :meth:`get_posterior`,
        at :math:`O(PK')` per point (:mod:`pyro_swag._lowrank`); what
        :class:`~pyro.infer.reparam.NeuTraReparam` uses to whiten the model for HMC/NUTS."""
        self._create_plates(*args, **kwargs)  # NeuTraReparam reads guide.plates next
        post = self.get_posterior()
        if isinstance(post, dist.LowRankMultivariateNormal):
            return LowRankAffine(post.loc, post.cov_diag, post.cov_factor)
        return LowRankAffine(self.loc, post.base_dist.scale.square(),
                             self.loc.new_zeros(self.loc.numel(), 0))

    def marginal_variance(self) -> torch.Tensor:
        """Diagonal of the posterior covariance, without forming it."""
        if self.diagonal:
            return self.scale * self.variance
        var = self.scale * self.variance / 2
        if self.rank:
            var = var + self.cov_factor().pow(2).sum(-1)
        return var

    def _loc_scale(self, *args, **kwargs):
        return self.loc, self.marginal_variance().sqrt()

    # ------------------------------------------------------------- persistence
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "diagonal": self.diagonal,
            "layout": self.layout,
            "calibration": self.calibration,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.scale = state["scale"]
        self.diagonal = bool(state["diagonal"])
        self.layout = state["layout"]
        self.calibration = state.get("calibration")

    @classmethod
    def from_state_dict(cls, model: Callable, state_dict: dict[str, Any]) -> SWAGGuide:
        """Rebuild a guide saved with ``torch.save(guide.state_dict(), path)``.

        Load the file with ``torch.load(path, weights_only=True)``.
        """
        missing = {"loc", "variance", "deviations", "_extra_state"} - set(state_dict)
        if missing:
            raise ValueError(
                f"state_dict lacks {sorted(missing)}; pass the output of SWAGGuide.state_dict()"
            )
        extra = state_dict["_extra_state"]
        guide = cls(
            model,
            loc=state_dict["loc"],
            variance=state_dict["variance"],
            deviations=state_dict["deviations"],
            scale=extra["scale"],
            diagonal=extra["diagonal"],
            layout=[(n, tuple(s)) for n, s in extra["layout"]] if extra["layout"] else None,
        )
        guide.calibration = extra.get("calibration")
        return guide
