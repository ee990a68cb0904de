r"""Preconditioned constant SGD for the SWA phase (Mandt, Hoffman & Blei 2017, sec. 4).

With :func:`pyro_swag.train.fit`'s per-datum loss :math:`\ell = L/N` (Hessian
:math:`A_1 = A/N`, posterior :math:`\mathcal{N}(\theta^*, A^{-1}) = \mathcal{N}(\theta^*,
(N A_1)^{-1})`) and minibatch gradient noise :math:`\operatorname{Cov}\hat g = \frac{N-B}{N-1}
C/B` (:math:`C` the per-example gradient covariance), the preconditioned iteration
:math:`\theta \leftarrow \theta - \epsilon P \hat g` has, to first order in :math:`\epsilon`,
a stationary covariance :math:`\Sigma` solving

.. math::

    P A_1 \Sigma + \Sigma A_1 P = \epsilon\, P \operatorname{Cov}\hat g\, P .

With :math:`P = A_1^{-1}` and a well-specified model (:math:`C \approx A_1`),
:math:`\Sigma = \frac{\epsilon}{2B} A_1^{-1}` — *proportional to the posterior*, matched at
:math:`\epsilon = 2B/N`. Plain SGD (:math:`P = I`) gives :math:`\Sigma \propto I` instead,
a shape no scalar ``scale`` can repair. For any symmetric positive-definite :math:`P`,
multiplying the equation by :math:`P^{-1}` and taking the trace gives
:math:`\operatorname{Tr}(A\Sigma) = \frac{N\epsilon}{2}\operatorname{Tr}(P\operatorname{Cov}
\hat g)`, so the KL-optimal rate is

.. math::

    \epsilon^* = \frac{2 (1-\mu) D}{N \operatorname{Tr}(P \operatorname{Cov}\hat g)}
    = \frac{2(1-\mu) D B}{N \frac{N-B}{N-1}\operatorname{Tr}(P \hat C)},

(:math:`\mu` the heavy-ball momentum), which reduces to :func:`pyro_swag.lr.suggest_swa_lr`
at :math:`P = I` and to the *matched* rate :math:`2B(1-\mu)/(N\frac{N-B}{N-1})` when
:math:`P^{-1} = C`. :func:`preconditioned_lr` returns the matched rate by default (the KL
rate over-widens when the Fisher is rank-deficient), capped by
:math:`|\lambda|_{\max}(P A_1)` from :func:`preconditioned_curvature`.

:math:`A_1` is estimated at the pre-trained point as :math:`F + H_0/N + \delta I`: the
empirical Fisher :math:`F = \frac1n\sum_i g_i g_i^\top` of the per-example log-likelihood
gradients over one epoch, the Hessian :math:`H_0` of the negative log prior (with the
unconstrained transform's Jacobian) from Hessian-vector products, and a damping
:math:`\delta` = ``damping`` × the mean diagonal (``1e-3`` suits models the data inform in
every direction; networks with fewer examples than weights need far more, which
:func:`choose_preconditioner` finds by a stability criterion; see docs/calibration.md).
``"full"`` keeps the Cholesky factor of :math:`A_1` (``P g`` is a triangular solve);
``"diag"`` keeps its diagonal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import pyro
import torch
from pyro.optim.optim import normalize_param_name
from torch.optim.swa_utils import SWALR

from ._checks import is_int
from ._curvature import (
    Preconditioner,
    _curvature_parts,
    _factor,
    _validate,
)
from .lr import _batch_hvp, _loss_fn, check_rate_args, suggest_swa_lr

__all__ = [
    "Preconditioner",
    "PreconditionedSGD",
    "choose_preconditioner",
    "estimate_preconditioner",
    "preconditioned_curvature",
    "preconditioned_lr",
]

#: Relative dampings tried by ``damping="auto"``, smallest first.
DAMPING_LADDER = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def estimate_preconditioner(
    model: Callable,
    collector,
    batches: Iterable,
    *,
    num_data: int,
    kind: str = "full",
    damping: float = 1e-3,
    num_data_arg: str | None = "num_data",
) -> Preconditioner:
    """Estimate :math:`P = (F + H_0/N + \\delta I)^{-1}` at the collector's point.

    Parameters
    ----------
    model : callable
        The Pyro model, ``model(*batch, num_data=num_data)``; its observed sites must be
        indexed by the batch dimension (per-example gradients).
    collector : SWAGCollector
        Set up and at the (pre-trained) point; not changed.
    batches : iterable of tuple of torch.Tensor
        One pass over the data (e.g. a shuffled epoch); every example is used.
    num_data : int
        Full data size :math:`N`.
    kind : {"full", "diag"}
        Dense Cholesky factor (D ≤ 4096) or the diagonal.
    damping : float
        :math:`\\delta` relative to the mean diagonal of :math:`F + H_0/N`.
    num_data_arg : str or None
        Keyword through which the model receives ``num_data`` (as in
        :func:`pyro_swag.train.fit`); ``None`` never passes it.

    Returns
    -------
    Preconditioner
    """
    _validate(collector, num_data, kind, damping)
    g, prior = _curvature_parts(model, collector, batches, num_data, kind, num_data_arg)
    return _factor(kind, g, prior, damping)


def choose_preconditioner(
    model: Callable,
    collector,
    batches: list,
    *,
    num_data: int,
    kind: str,
    batch_size: int,
    momentum: float = 0.0,
    damping: float | str = "auto",
    lr: float | None = None,
    limit: float = 0.5,
    num_data_arg: str | None = "num_data",
) -> Preconditioner:
    """The preconditioner ``fit`` uses: a given ``damping``, or the smallest of
    :data:`DAMPING_LADDER` whose effective preconditioned step stays below ``limit``,
    :math:`\\frac{\\epsilon}{1-\\mu}|\\lambda|_{\\max}(P A_1) \\le` ``limit``, with
    :math:`\\epsilon` = ``lr`` (default: the matched rate). Records
    :math:`|\\lambda|_{\\max}(P A_1)` as ``max_curvature``. ``num_data_arg`` as in
    :func:`estimate_preconditioner`.
    """
    check_rate_args(momentum, None)
    auto = damping == "auto"
    ladder = DAMPING_LADDER if auto else (damping,)
    if lr is None:
        lr = _matched_lr(num_data, batch_size, momentum)
    g = prior = None
    for d in ladder:
        if g is None:
            _validate(collector, num_data, kind, d)
            g, prior = _curvature_parts(model, collector, batches, num_data, kind, num_data_arg)
        pre = _factor(kind, g, prior, d)
        pre.max_curvature = preconditioned_curvature(
            model, collector, batches, pre, num_data=num_data, num_data_arg=num_data_arg
        )
        if not auto or lr * pre.max_curvature / (1.0 - momentum) <= limit:
            return pre
    warnings.warn(
        f"precondition_damping='auto': even damping {ladder[-1]} leaves the effective step "
        f"{lr * pre.max_curvature / (1.0 - momentum):.3g} above {limit}; the rate is capped, "
        f"but watch the loss (or use precondition=None)",
        stacklevel=3,
    )
    return pre


_NO_NOISE = (
    "zero preconditioned gradient noise (full batches or identical gradients); SWAG "
    "needs minibatch noise: use a batch size smaller than the data"
)


def _matched_lr(num_data: int, batch_size: int, momentum: float) -> float:
    """The matched rate :math:`2B(1-\\mu)/(N\\frac{N-B}{N-1})`."""
    finite = (num_data - batch_size) / max(num_data - 1, 1)
    if finite <= 0:
        raise RuntimeError(_NO_NOISE)
    return 2.0 * (1.0 - momentum) * batch_size / (num_data * finite)


def preconditioned_lr(
    pre: Preconditioner,
    *,
    num_data: int,
    batch_size: int,
    momentum: float = 0.0,
    rule: str = "matched",
    max_curvature: float | None = None,
    stability_fraction: float = 0.5,
) -> float:
    """Per-datum rate of the preconditioned SWA phase.

    ``rule="matched"``: :math:`\\epsilon = 2B(1-\\mu)/(N\\frac{N-B}{N-1})`, which makes the
    stationary covariance equal the posterior when :math:`P^{-1} \\approx C` (how ``P`` is
    built); ``rule="kl"``: the KL-optimal :math:`\\epsilon^*` of the module docstring (it
    counts every one of the ``D`` directions, so when the Fisher is rank-deficient, e.g. a
    network with fewer examples than weights, it inflates the rate to widen directions the
    noise never reaches). ``max_curvature`` (:math:`|\\lambda|_{\\max}(P A_1)`, see
    :func:`preconditioned_curvature`) caps the rate at ``stability_fraction`` of heavy-ball
    SGD's stability limit :math:`2(1+\\mu)/\\lambda`.
    """
    if rule not in ("matched", "kl"):
        raise ValueError(f"rule must be 'matched' or 'kl', got rule={rule!r}")
    check_rate_args(momentum, stability_fraction)
    if not is_int(batch_size):
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
    if rule == "kl" and not pre.noise_trace > 0:
        raise RuntimeError(_NO_NOISE)
    lr = _matched_lr(num_data, batch_size, momentum)
    if rule == "kl":
        lr *= pre.dim / pre.noise_trace
    if max_curvature:
        lr = min(lr, stability_fraction * 2.0 * (1.0 + momentum) / max_curvature)
    return lr


def preconditioned_curvature(
    model: Callable,
    collector,
    batches: list,
    pre: Preconditioner,
    *,
    num_data: int,
    iters: int = 20,
    max_batches: int = 8,
    num_data_arg: str | None = "num_data",
) -> float:
    """:math:`|\\lambda|_{\\max}(P A_1)`, :math:`A_1` the per-datum loss Hessian (power iteration
    on Hessian-vector products averaged over ``max_batches`` batches). Unlike :math:`F`, the
    Hessian sees the cross-curvature of directions the Fisher calls flat (e.g. a hidden unit's
    input and output weights when the output weight is near 0), which ``P`` amplifies.
    ``num_data_arg`` as in :func:`estimate_preconditioner`.
    """
    loss_fn = _loss_fn(model, collector, num_data, num_data_arg)
    loc = collector.loc
    used = [tuple(b) for b in batches[:max_batches]]
    gen = torch.Generator(device=loc.device).manual_seed(0)
    v = torch.randn(loc.shape, generator=gen, device=loc.device, dtype=loc.dtype)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = _batch_hvp(loss_fn, loc, used, v) / num_data
        w = pre.apply(hv)
        lam = float(w.norm())
        if not math.isfinite(lam) or lam == 0:
            break
        v = w / lam
    return lam


class PreconditionedSGD(torch.optim.Optimizer):
    """Heavy-ball SGD on :math:`P\\hat g`: :math:`b \\leftarrow \\mu b + P\\hat g`,
    :math:`\\theta \\leftarrow \\theta - \\epsilon b` (``torch.optim.SGD``'s convention).

    Parameters whose size differs from the preconditioner's dimension get plain SGD.
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.0, preconditioner: Preconditioner | None = None
    ) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.preconditioner = preconditioner

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        pre = self.preconditioner
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if pre is not None and p.numel() == pre.dim:
                    d = pre.apply(d.reshape(-1)).reshape(p.shape)
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = buf
                p.add_(d, alpha=-group["lr"])
        return loss


def swa_optimizer(
    lr: float,
    *,
    momentum: float,
    anneal_from: float | None,
    anneal_epochs: int,
    anneal_strategy: str,
    clip: dict,
    preconditioner: Preconditioner | None,
    target: str | None,
) -> pyro.optim.PyroLRScheduler:
    """SWALR over SGD (``preconditioner=None``) or :class:`PreconditionedSGD` on ``target``."""
    if preconditioner is None:
        optimizer, optim_args = torch.optim.SGD, {"lr": anneal_from or lr, "momentum": momentum}
    else:

        def optim_args(name):
            use = preconditioner if target is None or name == target else None
            return {"lr": anneal_from or lr, "momentum": momentum, "preconditioner": use}

        optimizer = PreconditionedSGD
    return pyro.optim.PyroLRScheduler(
        SWALR,
        {
            "optimizer": optimizer,
            "optim_args": optim_args,
            "swa_lr": lr,
            "anneal_epochs": anneal_epochs,
            "anneal_strategy": anneal_strategy,
        },
        dict(clip),
    )


def loc_name(collector) -> str | None:
    """Normalised param-store name of ``collector.loc`` (what per-param optim args receive)."""
    store = pyro.get_param_store()
    try:
        return normalize_param_name(store.param_name(collector.loc))
    except Exception:  # not in the param store (e.g. a plain tensor): match by size only
        return None


def auto_swa_lr(
    model: Callable,
    collector,
    batches: list[tuple],
    num_data: int,
    momentum: float,
    pre: Preconditioner | None = None,
    num_data_arg: str | None = "num_data",
    independent_batches: bool = False,
) -> float:
    """``fit(swa_lr="auto")``'s rate: :func:`preconditioned_lr` with ``pre``, else
    :func:`pyro_swag.lr.suggest_swa_lr` (per datum); the model receives ``num_data`` as
    ``num_data_arg``, and ``independent_batches`` says how ``batches`` were drawn."""
    if pre is not None:
        lam = pre.max_curvature
        if not math.isfinite(lam):
            lam = preconditioned_curvature(
                model, collector, batches, pre, num_data=num_data, num_data_arg=num_data_arg
            )
        lr = preconditioned_lr(
            pre,
            num_data=num_data,
            batch_size=int(batches[0][0].shape[0]),
            momentum=momentum,
            max_curvature=lam,
        )
    else:
        lr = suggest_swa_lr(
            model,
            collector,
            batches,
            num_data=num_data,
            momentum=momentum,
            per_datum=True,
            num_data_arg=num_data_arg,
            independent_batches=independent_batches,
        )
    lr = float(lr)
    if not 0 < lr < math.inf:
        raise RuntimeError(f"the automatic SWA learning rate is {lr}; pass swa_lr explicitly")
    return lr
