"""Curvature estimates behind :mod:`pyro_swag.precondition`: the Fisher, the prior's
Hessian, and the :class:`Preconditioner` they make."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine

from .lr import _data_kwargs, _per_example_grads

KINDS = ("diag", "full")
MAX_DENSE = 4096


@dataclass
class Preconditioner:
    """:math:`P = A_1^{-1}`, from a per-datum curvature estimate :math:`A_1`.

    Attributes
    ----------
    kind : {"diag", "full"}
    factor : torch.Tensor
        ``"diag"``: the diagonal of :math:`A_1`, shape (D,); ``"full"``: the lower Cholesky
        factor of :math:`A_1`, shape (D, D).
    damping : float
        The absolute damping :math:`\\delta` added to the diagonal.
    noise_trace : float
        :math:`\\operatorname{Tr}(P\\hat C)` of the per-example gradients it was built from
        (``nan`` when unknown).
    num_examples : int
        Examples the Fisher estimate used.
    max_curvature : float
        :math:`|\\lambda|_{\\max}(P A_1)` when measured (``nan`` otherwise).
    """

    kind: str
    factor: torch.Tensor
    damping: float
    noise_trace: float = math.nan
    num_examples: int = 0
    max_curvature: float = math.nan

    @property
    def dim(self) -> int:
        return self.factor.shape[0]

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """:math:`P g` for a flat gradient (or a batch of them in the last dimension)."""
        if self.kind == "diag":
            return g / self.factor
        rhs = g.reshape(-1, self.dim).T
        return torch.cholesky_solve(rhs, self.factor).T.reshape(g.shape)

    def curvature(self) -> torch.Tensor:
        """The dense :math:`A_1` (for tests and diagnostics)."""
        if self.kind == "diag":
            return torch.diag(self.factor)
        return self.factor @ self.factor.T

    def trace(self, centred: torch.Tensor) -> float:
        """:math:`\\operatorname{Tr}(P \\hat C)`, :math:`\\hat C` the covariance of the rows."""
        quad = (centred * self.apply(centred)).sum()
        return float(quad) / max(centred.shape[0] - 1, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "factor": self.factor,
            "damping": self.damping,
            "noise_trace": self.noise_trace,
            "num_examples": self.num_examples,
            "max_curvature": self.max_curvature,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Preconditioner:
        return cls(**state)


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(
            f"precondition must be None, 'diag' or 'full' (or a Preconditioner), got "
            f"precondition={kind!r}"
        )
    return kind


def _neg_log_prior(model, collector, batch, num_data, num_data_arg="num_data") -> torch.Tensor:
    """:math:`-\\log p(\\theta)` of the unconstrained latent (prior + Jacobian), unscaled."""
    kwargs = _data_kwargs(num_data, num_data_arg)
    guide_tr = poutine.trace(collector).get_trace(*batch, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*batch, **kwargs)
    latent = model_tr.log_prob_sum(lambda name, site: not site["is_observed"])
    return guide_tr.log_prob_sum() - latent


def _prior_hessian(
    model, collector, batch, num_data, kind: str, probes: int = 16, num_data_arg="num_data"
):
    """Dense Hessian (D, D), or its diagonal (exact up to MAX_DENSE, else Hutchinson)."""
    loc = collector.loc
    dim = loc.numel()
    (grad,) = torch.autograd.grad(
        _neg_log_prior(model, collector, batch, num_data, num_data_arg), loc, create_graph=True
    )
    if not grad.requires_grad:  # the prior is flat or linear in loc
        zeros = torch.zeros(dim, dtype=loc.dtype, device=loc.device)
        return zeros if kind == "diag" else torch.diag(zeros)
    if dim > MAX_DENSE:
        gen = torch.Generator(device=loc.device).manual_seed(0)
        est = torch.zeros_like(loc)
        for _ in range(probes):
            v = torch.randint(0, 2, loc.shape, generator=gen, device=loc.device) * 2.0 - 1.0
            v = v.to(loc.dtype)
            (hv,) = torch.autograd.grad(grad, loc, grad_outputs=v, retain_graph=True)
            est += v * hv / probes
        return est.detach()
    rows = []
    eye = torch.eye(dim, dtype=loc.dtype, device=loc.device)
    for chunk in eye.split(256):
        (h,) = torch.autograd.grad(
            grad, loc, grad_outputs=chunk, retain_graph=True, is_grads_batched=True
        )
        rows.append(h.detach() if kind == "full" else (h * chunk).sum(-1).detach())
    out = torch.cat(rows)
    return 0.5 * (out + out.T) if kind == "full" else out


def _validate(collector, num_data, kind: str, damping) -> None:
    _check_kind(kind)
    if not (isinstance(num_data, int) and num_data > 0):
        raise ValueError(f"num_data must be a positive int (the full data size), got {num_data!r}")
    if not (isinstance(damping, (int, float)) and 0 < damping < math.inf):
        raise ValueError(f"damping must be a positive float, got damping={damping!r}")
    if getattr(collector, "prototype_trace", None) is None:
        raise RuntimeError(
            "the collector is not set up: call collector(*batch, num_data=N) or svi.step once first"
        )
    dim = collector.loc.numel()
    if kind == "full" and dim > MAX_DENSE:
        raise ValueError(
            f"precondition='full' needs a dense {dim}x{dim} matrix (latent dimension {dim} > "
            f"{MAX_DENSE}); use precondition='diag'"
        )


def _curvature_parts(
    model, collector, batches, num_data: int, kind: str, num_data_arg: str | None = "num_data"
):
    """Per-example log-likelihood gradients (n, D) and the prior's Hessian / N."""
    batches = [b if isinstance(b, (tuple, list)) else (b,) for b in batches]
    if not batches:
        raise ValueError("batches is empty; pass one epoch of minibatches")
    grads = []
    for batch in batches:
        g = _per_example_grads(model, collector, tuple(batch), num_data, num_data_arg)
        if g is None:
            raise RuntimeError(
                "precondition needs per-example gradients, but an observed site's log-density "
                "is not indexed by the batch's first dimension (e.g. the model subsamples "
                "its own plate with subsample_size); use precondition=None"
            )
        grads.append(g)
    first = tuple(batches[0])
    prior = _prior_hessian(
        model, collector, first, num_data, kind, num_data_arg=num_data_arg
    ) / num_data
    return torch.cat(grads), prior


def _factor(kind: str, g: torch.Tensor, prior: torch.Tensor, damping: float) -> Preconditioner:
    n, dim = g.shape
    if kind == "diag":
        curv = g.pow(2).mean(0) + prior
        delta = damping * float(curv.mean().clamp_min(1e-30))
        factor = curv.clamp_min(0) + delta
    else:
        curv = g.T @ g / n + prior
        delta = damping * float(curv.diagonal().mean().clamp_min(1e-30))
        eye = torch.eye(dim, dtype=g.dtype, device=g.device)
        for _ in range(8):  # the prior's Hessian may be indefinite: raise the damping
            factor, info = torch.linalg.cholesky_ex(curv + delta * eye)
            if int(info) == 0:
                break
            delta *= 10.0
        else:
            raise RuntimeError("could not factor the curvature estimate; use precondition='diag'")
    if not torch.isfinite(factor).all():
        raise RuntimeError(
            "non-finite curvature estimate at the collector's point; pre-train first"
        )
    pre = Preconditioner(kind, factor.detach(), delta, num_examples=n)
    pre.noise_trace = pre.trace(g - g.mean(0))
    return pre
