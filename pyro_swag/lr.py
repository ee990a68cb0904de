r"""A constant SWA learning rate from gradient-noise statistics (Mandt, Hoffman & Blei 2017).

Pyro's loss on a minibatch :math:`\mathcal{B}` of size :math:`B` out of :math:`N` data is the
negative log joint with the likelihood scaled up by :math:`N/B` (the data plate's
``subsample`` scaling), in the unconstrained latent space :math:`\theta \in \mathbb{R}^D`:

.. math::

    \hat L(\theta) = -\log p(\theta) - \frac{N}{B} \sum_{i \in \mathcal{B}} \log p(y_i \mid
    \theta), \qquad \mathbb{E}\,\hat L = L = -\log p(\theta, y).

Near a mode :math:`\theta^*` with Hessian :math:`A = \nabla^2 L` (the Laplace posterior is
:math:`\mathcal{N}(\theta^*, A^{-1})`), SGD :math:`\theta_{t+1} = \theta_t - \epsilon
\nabla\hat L(\theta_t)` has minibatch noise of covariance :math:`\Sigma_g = \operatorname{Cov}
\nabla \hat L \approx (N^2/B)\, C`, with :math:`C` the per-example gradient covariance. Its
stationary covariance :math:`\Sigma_\epsilon` solves, to first order in :math:`\epsilon`, the
Lyapunov equation :math:`A\Sigma_\epsilon + \Sigma_\epsilon A = \epsilon\,\Sigma_g`, so
:math:`\Sigma_\epsilon = \epsilon\,\Sigma_1` and :math:`\operatorname{Tr}(A\Sigma_\epsilon) =
\tfrac{\epsilon}{2}\operatorname{Tr}\Sigma_g`. Then

.. math::

    \mathrm{KL}\big(\mathcal{N}(\theta^*, \Sigma_\epsilon)\,\|\,\mathcal{N}(\theta^*,
    A^{-1})\big) = \tfrac{\epsilon}{4}\operatorname{Tr}\Sigma_g - \tfrac{D}{2}\log\epsilon
    + \text{const},

minimised by

.. math::

    \epsilon^* = \frac{2D}{\operatorname{Tr}\Sigma_g} = \frac{2 B D}{N^2 \operatorname{Tr} C},

which is Mandt et al.'s :math:`2 (B/N)\, D / \operatorname{Tr} C` for their per-datum loss
(:math:`L/N`, whose rate is :math:`N` times larger). With heavy-ball momentum :math:`\mu`
(``torch.optim.SGD(momentum=mu)``) the stationary covariance is that of plain SGD with rate
:math:`\epsilon / (1 - \mu)`, so the rate is multiplied by :math:`1 - \mu`. At
:math:`\epsilon^*`, :math:`\operatorname{Tr}(A\Sigma_\epsilon) = D`, as for the posterior.

:math:`\operatorname{Tr}\Sigma_g` is estimated from per-example gradients of the observed
sites' log-density (see :func:`gradient_noise`), or else as the summed across-batch variance
of minibatch gradients of Pyro's loss at the current point (the prior's gradient is the same
on every batch and cancels), so no assumption on the loss scaling enters the estimate. The
small-:math:`\epsilon` expansion needs :math:`\epsilon\lambda_{\max}(A)` well inside SGD's
stability region :math:`\epsilon\lambda < 2(1 + \mu)`; :func:`suggest_swa_lr` caps the rate
at ``stability_fraction`` of that limit, with :math:`\lambda_{\max}` from power iteration on
Hessian-vector products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO

from ._checks import is_int, is_real

__all__ = ["GradientNoise", "gradient_noise", "suggest_swa_lr"]


@dataclass
class GradientNoise:
    """Gradient-noise statistics of Pyro's minibatch loss at one point.

    Attributes
    ----------
    trace : float
        :math:`\\operatorname{Tr}\\Sigma_g`, the trace of a minibatch gradient's covariance.
    dim : int
        Unconstrained latent dimension :math:`D`.
    num_batches : int
        Number of minibatches the estimate used.
    batch_size : int
        Their (common) size :math:`B`.
    grad_norm : float
        Norm of the mean minibatch gradient (≈ 0 at a mode).
    max_curvature : float or None
        Estimate of :math:`\\lambda_{\\max}(A)` (power iteration), when asked for.
    method : str
        ``"per_example"`` or ``"batch"`` (see :func:`gradient_noise`).
    """

    trace: float
    dim: int
    num_batches: int
    batch_size: int
    grad_norm: float
    max_curvature: float | None = None
    method: str = "per_example"


def _data_kwargs(num_data: int, num_data_arg: str | None) -> dict:
    """The keyword arguments that pass the full data size to the model (as ``fit`` does)."""
    if num_data_arg is not None and not isinstance(num_data_arg, str):
        raise TypeError(
            f"num_data_arg must be a str or None, got num_data_arg={num_data_arg!r}; pass the "
            f"name of the model's data-size argument (default 'num_data')"
        )
    return {} if num_data_arg is None else {num_data_arg: num_data}


def _loss_fn(
    model: Callable, collector, num_data: int, num_data_arg: str | None = "num_data"
) -> Callable:
    elbo = Trace_ELBO()
    kwargs = _data_kwargs(num_data, num_data_arg)

    def loss(batch):
        return elbo.differentiable_loss(model, collector, *batch, **kwargs)

    return loss


def _collect_batches(batches: Iterable, max_batches: int) -> list[tuple]:
    out = []
    for batch in islice(batches, max_batches):
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        if not isinstance(batch, (tuple, list)) or not batch:
            raise TypeError(
                f"batches must yield tuples of tensors passed as model(*batch, num_data=N), got "
                f"{type(batch).__name__}; yield (x, y) tuples"
            )
        out.append(tuple(batch))
    size = out[0][0].shape[0] if out else 0
    out = [b for b in out if b[0].shape[0] == size]  # a short last batch is noisier: drop it
    if len(out) < 2:
        raise ValueError(
            f"need at least 2 minibatches of equal size to estimate gradient noise, got "
            f"{len(out)}; pass more batches (max_batches={max_batches}) or a smaller batch size"
        )
    return out


def _per_example_grads(
    model, collector, batch, num_data: int, num_data_arg: str | None = "num_data"
) -> torch.Tensor | None:
    """(B, D) gradients of each example's log-likelihood w.r.t. ``collector.loc``.

    ``None`` when an observed site's log-density is not indexed by the batch's first dim.
    """
    size = batch[0].shape[0]
    kwargs = _data_kwargs(num_data, num_data_arg)
    guide_tr = poutine.trace(collector).get_trace(*batch, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*batch, **kwargs)
    terms = []
    for site in model_tr.nodes.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        if site["infer"].get("_deterministic"):
            continue  # pyro.deterministic: an observed Delta, no data
        lp = site["fn"].log_prob(site["value"])
        if lp.dim() == 0 or lp.shape[0] != size:
            if site["infer"].get("is_auxiliary"):
                continue  # a pyro.factor outside the data plate: a prior term
            return None
        # per-point weights (e.g. BetaNLL's) relative to their mean: the callers apply the
        # plate's N / B factor, so a uniform scale gives weight 1
        scale = torch.as_tensor(site["scale"], dtype=lp.dtype, device=lp.device)
        lp = scale_and_mask(lp, scale=scale / scale.mean(), mask=site["mask"])
        terms.append(lp.reshape(size, -1).sum(-1))
    if not terms:
        return None
    ll = sum(terms)
    loc = collector.loc
    try:
        (jac,) = torch.autograd.grad(
            ll,
            loc,
            grad_outputs=torch.eye(size, dtype=ll.dtype, device=ll.device),
            is_grads_batched=True,
        )
    except RuntimeError:  # an op without a batching rule: one backward pass per example
        jac = torch.stack(
            [torch.autograd.grad(ll[i], loc, retain_graph=True)[0] for i in range(size)]
        )
    return jac.detach()


def _batch_hvp(loss_fn, loc, batches, v: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product of ``loss_fn`` w.r.t. ``loc``, averaged over ``batches``."""
    hv = torch.zeros_like(loc)
    for batch in batches:
        (g,) = torch.autograd.grad(loss_fn(batch), loc, create_graph=True)
        (h,) = torch.autograd.grad(g, loc, grad_outputs=v)
        hv += h.detach()
    return hv / len(batches)


def _max_curvature(loss_fn, loc, batches, iters: int) -> float:
    """Power iteration on the batch-averaged Hessian of the loss w.r.t. ``loc``."""
    v = torch.randn_like(loc)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = _batch_hvp(loss_fn, loc, batches, v)
        lam = float(hv @ v)
        norm = hv.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        v = hv / norm
    return abs(lam)


def gradient_noise(
    model: Callable,
    collector,
    batches: Iterable,
    *,
    num_data: int,
    max_batches: int = 32,
    curvature_iters: int = 0,
    curvature_batches: int | None = 8,
    per_example: bool = True,
    num_data_arg: str | None = "num_data",
    independent_batches: bool = False,
) -> GradientNoise:
    """Estimate :math:`\\operatorname{Tr}\\Sigma_g` (and optionally :math:`\\lambda_{\\max}`).

    Parameters
    ----------
    model : callable
        The Pyro model, called as ``model(*batch, num_data=num_data)`` (the keyword is
        ``num_data_arg``).
    collector : SWAGCollector
        Set up (called once) and at the point of interest; its ``loc`` is not changed.
    batches : iterable of tuple of torch.Tensor
        Minibatches drawn as in training (e.g. a shuffled epoch); batches of a size other
        than the first one's are skipped.
    num_data : int
        Full data size :math:`N`.
    max_batches : int
        Read at most this many batches.
    curvature_iters : int
        Power-iteration steps for :math:`\\lambda_{\\max}(A)`; 0 skips it.
    curvature_batches : int, optional
        Batches averaged in each Hessian-vector product (``None``: all of them; one
        shuffled epoch then gives the full-data Hessian).
    per_example : bool
        Estimate from per-example gradients of the observed sites' log-density (``B`` times
        more samples than batches):
        :math:`\\operatorname{Tr}\\Sigma_g = \\frac{N^2}{B}\\frac{N-B}{N}
        \\operatorname{Tr}\\hat C` with :math:`\\hat C` the unbiased (:math:`n - 1`)
        covariance of the per-example gradients: the covariance of a batch of ``B`` drawn
        without replacement. Falls back to the across-batch variance of the minibatch
        gradients (``method="batch"``) when an observed site is not indexed by the batch
        dimension.
    num_data_arg : str or None
        Keyword through which the model (and the collector) receive ``num_data``, as in
        :func:`pyro_swag.train.fit`; ``None`` never passes it.
    independent_batches : bool
        Whether the batches were drawn independently of each other (``fit``'s
        ``swa_batches="independent"``) rather than cut from one shuffled epoch. Disjoint
        batches of an epoch sum to the full-data gradient, so their across-batch variance
        is :math:`N/(N-B)` times a batch's; ``method="batch"`` corrects for that unless
        this is set.
    """
    if not is_int(num_data):
        raise ValueError(f"num_data must be a positive int (the full data size), got {num_data!r}")
    num_data = int(num_data)
    if getattr(collector, "prototype_trace", None) is None:
        raise RuntimeError(
            "the collector is not set up: call collector(*batch, num_data=N) or svi.step once first"
        )
    _data_kwargs(num_data, num_data_arg)
    data = _collect_batches(batches, max_batches)
    loc = collector.loc
    loss_fn = _loss_fn(model, collector, num_data, num_data_arg)
    grads = []
    for batch in data:
        (g,) = torch.autograd.grad(loss_fn(batch), loc)
        grads.append(g.detach())
    g = torch.stack(grads)
    size = int(data[0][0].shape[0])
    if size > num_data:
        raise ValueError(
            f"num_data={num_data} is smaller than the batch size {size}; pass the full data "
            "size as num_data"
        )
    finite = (num_data - size) / num_data  # without replacement, with an unbiased C-hat
    method = "per_example" if per_example else "batch"
    examples = (
        [_per_example_grads(model, collector, b, num_data, num_data_arg) for b in data]
        if per_example
        else []
    )
    if examples and all(e is not None for e in examples):
        # Tr Cov of a batch gradient of Pyro's loss, B examples drawn without replacement
        per = torch.cat(examples)
        trace = float(per.var(0, unbiased=True).sum()) * num_data**2 / size * finite
    else:
        method = "batch"
        trace = float(g.var(0, unbiased=True).sum()) * (1.0 if independent_batches else finite)
    if not (torch.isfinite(g).all() and math.isfinite(trace)):
        raise RuntimeError(
            "non-finite minibatch gradient at the collector's point; pre-train to a finite loss"
        )
    lam = None
    if curvature_iters > 0:
        used = data[:curvature_batches] if curvature_batches else data
        lam = _max_curvature(loss_fn, loc, used, curvature_iters)
    return GradientNoise(
        trace=trace,
        dim=loc.numel(),
        num_batches=len(data),
        batch_size=size,
        grad_norm=float(g.mean(0).norm()),
        max_curvature=lam,
        method=method,
    )


def check_rate_args(momentum: float, stability_fraction: float | None) -> None:
    """Refuse a heavy-ball momentum outside [0, 1) or a stability fraction outside (0, 1]."""
    if not (is_real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}; e.g. 0.9")
    if stability_fraction is not None and not (
        is_real(stability_fraction) and 0 < stability_fraction <= 1
    ):
        raise ValueError(
            f"stability_fraction must be in (0, 1] or None, got "
            f"stability_fraction={stability_fraction!r}; e.g. 0.5"
        )


def suggest_swa_lr(
    model: Callable,
    collector,
    batches: Iterable,
    *,
    num_data: int,
    momentum: float = 0.0,
    per_datum: bool = False,
    max_batches: int = 32,
    stability_fraction: float | None = 0.5,
    curvature_iters: int = 10,
    num_data_arg: str | None = "num_data",
    independent_batches: bool = False,
) -> float:
    """The constant SWA rate :math:`\\epsilon^* = 2(1-\\mu) D / \\operatorname{Tr}\\Sigma_g`.

    See the module docstring for the derivation; the rate is for Pyro's loss (likelihood
    scaled by ``num_data / B``) and ``torch.optim.SGD`` with ``momentum``.

    Parameters
    ----------
    model, collector, batches, num_data, max_batches, num_data_arg, independent_batches
        As in :func:`gradient_noise`; the collector should sit at its pre-trained point.
    momentum : float
        SGD momentum :math:`\\mu \\in [0, 1)` the SWA phase will use.
    per_datum : bool
        Return the rate for the per-datum loss :math:`\\hat L / N` (as
        :func:`pyro_swag.train.fit` optimises), i.e. :math:`N\\epsilon^*`; default: the rate
        for Pyro's loss :math:`\\hat L` (``SVI(model, collector, SGD, Trace_ELBO())``).
    stability_fraction : float or None
        Cap :math:`\\epsilon \\le f \\cdot 2(1+\\mu)/\\lambda_{\\max}`; ``None`` disables the cap.
    curvature_iters : int
        Power-iteration steps for :math:`\\lambda_{\\max}` (only used with the cap).

    Returns
    -------
    float
        The suggested learning rate.
    """
    check_rate_args(momentum, stability_fraction)
    iters = curvature_iters if stability_fraction is not None else 0
    stats = gradient_noise(
        model,
        collector,
        batches,
        num_data=num_data,
        max_batches=max_batches,
        curvature_iters=iters,
        num_data_arg=num_data_arg,
        independent_batches=independent_batches,
    )
    if not stats.trace > 0:
        raise RuntimeError(
            "minibatch gradients are identical (zero gradient noise): SWAG needs minibatch noise; "
            "use a batch size smaller than the data"
        )
    lr = 2.0 * (1.0 - momentum) * stats.dim / stats.trace
    if stability_fraction is not None and stats.max_curvature:
        lr = min(lr, stability_fraction * 2.0 * (1.0 + momentum) / stats.max_curvature)
    if per_datum:
        lr *= num_data
    if not math.isfinite(lr) or lr <= 0:
        raise RuntimeError(f"could not suggest a learning rate (got {lr}); pre-train first")
    return float(lr)
