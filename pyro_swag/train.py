r"""Fit a SWAG posterior: pre-train, then SGD at the SWA learning rate, collecting snapshots.

:func:`fit` runs minibatch SVI on a :class:`~pyro_swag.SWAGCollector` (a point mass on the
unconstrained latent vector, so SVI is MAP/SGD) in two phases:

1. epochs ``[0, swa_start)``: the user's optimiser (default ``pyro.optim.Adam``);
2. epochs ``[swa_start, epochs)``: SGD with momentum (or, with ``precondition``, SGD on
   the preconditioned gradient, :mod:`pyro_swag.precondition`) under
   :class:`torch.optim.swa_utils.SWALR` (through :class:`pyro.optim.PyroLRScheduler`),
   constant at ``swa_lr`` or annealed to it over ``anneal_epochs``, recording a snapshot
   every ``collect_every`` epochs (or every ``collect_every_steps`` steps).

The objective is the negative log joint *per datum*,
:math:`\ell(\theta) = -\frac1N\big[\log p(\theta) + \frac{N}{B}\sum_{i \in b}
\log p(y_i \mid x_i, \theta)\big]`, so learning rates have the usual per-datum meaning
whatever the data size. The model must declare the full data size ``N`` so a minibatch of
``B`` points is scaled by ``N/B``: ``fit`` passes ``num_data=N`` when the model accepts it
and checks the scale of the observed sites (``pyro.plate("data", N, subsample=idx)``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro.optim  # binds pyro too
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from tqdm.auto import tqdm

from . import _checkpoint, _fitargs
from ._checks import is_int
from ._curvature import _check_kind
from ._minibatch import (
    _accepts,
    _as_args,
    _batches,
    _check_batch,
    _TensorBatches,
    own_subsample,
)
from .autoguide import SWAGCollector, SWAGGuide
from .precondition import (
    Preconditioner,
    auto_swa_lr,
    choose_preconditioner,
    loc_name,
    swa_optimizer,
)

__all__ = ["FitResult", "fit"]


class FitResult(NamedTuple):
    """What :func:`fit` returns; unpacks as ``guide, history = fit(...)``.

    Attributes
    ----------
    guide : SWAGGuide or None
        The SWAG posterior (``None`` when fewer than 2 snapshots were collected, e.g. a run
        stopped early by its callback).
    history : dict of lists
        Per epoch: ``epoch``, ``phase`` (``"pretrain"``/``"swa"``), ``loss`` (mean per-datum
        negative log joint over the epoch's minibatches), ``lr``, ``snapshots`` (collected so
        far); plus ``swa_lr`` (the resolved SWA learning rate, a float) and ``precondition``
        (``"full"``, ``"diag"`` or ``None``: the SWA phase's preconditioner kind).
    """

    guide: SWAGGuide | None
    history: dict[str, Any]


def _lr(optim) -> float:
    obj = next(iter(optim.optim_objs.values()), None)
    if obj is None:
        return float("nan")
    opt = obj.optimizer if hasattr(obj, "optimizer") else obj
    return float(opt.param_groups[0]["lr"])


def fit(
    model: Callable,
    collector: SWAGCollector,
    data: Any,
    *,
    epochs: int,
    swa_start: int,
    swa_lr: float | str,
    batch_size: int | None = None,
    num_data: int | None = None,
    optim: pyro.optim.PyroOptim | None = None,
    swa_momentum: float = 0.9,
    anneal_epochs: int = 0,
    anneal_strategy: str = "cos",
    anneal_from: float | None = None,
    collect_every: int = 1,
    collect_every_steps: int | None = None,
    clip_norm: float | None = None,
    num_data_arg: str | None = "num_data",
    check_scaling: bool = True,
    seed: int | None = None,
    quiet: bool | None = None,
    callback: Callable[[int, dict], Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    precondition: str | Preconditioner | None = None,
    precondition_damping: float | str = "auto",
    swa_batches: str = "epoch",
) -> FitResult:
    """Train ``collector`` on ``data`` with the SWAG recipe and return the SWAG posterior.

    Parameters
    ----------
    model : callable
        The Pyro model, called as ``model(*batch, num_data=N)`` (``num_data`` only when its
        signature accepts ``num_data_arg``). Must be ``collector.model``.
    collector : SWAGCollector
        The point-mass guide to train. If it has not run yet and was built with the default
        ``init_to_median``, a model with an ``init_loc_fn()`` method (e.g.
        :class:`~pyro_swag.models.BayesianMLP`) supplies the start; a collector already set up
        (e.g. loaded from a MAP checkpoint) starts from its current ``loc``.
    data : tuple of tensors or iterable of batches
        ``(x, y)`` tensors, shuffled into minibatches of ``batch_size`` each epoch, or a
        ``DataLoader`` (then ``N = len(loader.dataset)`` unless ``num_data`` is given) or
        another re-iterable of batches, such as a list of ``(x, y)`` (then pass ``num_data``).
    epochs, swa_start : int
        Total epochs; first epoch of the SWA phase (``0 <= swa_start < epochs``).
    swa_lr : float or "auto"
        Per-datum SGD learning rate of the SWA phase; ``"auto"`` asks
        :func:`pyro_swag.lr.suggest_swa_lr` at ``swa_start`` (with ``precondition``:
        :func:`pyro_swag.precondition.preconditioned_lr`, about ``2 B (1 - swa_momentum) / N``).
    batch_size : int, optional
        Minibatch size for tensor data (default ``min(N, 128)``).
    optim : pyro.optim.PyroOptim, optional
        Pre-training optimiser (default ``Adam(lr=0.01)``); a ``PyroLRScheduler`` is stepped
        once per pre-training epoch.
    swa_momentum : float
        Momentum of the SWA phase's SGD, in ``[0, 1)``.
    anneal_epochs, anneal_strategy, anneal_from : int, {"cos", "linear"}, float
        ``SWALR`` annealing from ``anneal_from`` (positive, default ``swa_lr``) to ``swa_lr``
        over ``anneal_epochs`` epochs (0: constant ``swa_lr``).
    collect_every, collect_every_steps : int
        Snapshot cadence of the SWA phase, in epochs or (when given) in SGD steps. A cadence
        giving fewer than 2 snapshots is refused up front (for a loader, whose step count is
        not known in advance, ``fit`` warns at the end of the run instead).
    clip_norm : float, optional
        Positive gradient norm clipping for both phases (the default optimiser's and the SWA
        phase's; a user ``optim`` keeps its own ``clip_args`` unless it has none).
    num_data_arg : str or None
        Keyword through which the model receives ``N`` (in training and in the ``"auto"``
        rate and ``precondition`` estimates); ``None`` never passes it.
    check_scaling : bool
        Check on the first minibatch that observed sites are scaled by ``N / B`` (a
        per-point scale, e.g. :class:`~pyro_swag.models.BetaNLL`'s, by its mean).
    seed : int, optional
        ``pyro.set_rng_seed(seed)`` first.
    quiet : bool, optional
        ``True`` prints nothing; ``False`` always shows the progress bar; ``None`` shows it
        only on a terminal.
    callback : callable, optional
        ``callback(epoch, history)`` after each epoch; returning ``True`` (also a NumPy or torch
        boolean) stops training.
    checkpoint : path, optional
        Write the training state there every ``checkpoint_every`` epochs (readable with
        ``torch.load(path, weights_only=True)``).
    resume : bool
        Continue from ``checkpoint`` when the file exists (same arguments required).
    precondition : {None, "diag", "full"} or Preconditioner
        SWA-phase steps :math:`\\theta \\leftarrow \\theta - \\epsilon P \\hat g` with
        :math:`P^{-1}` the per-datum curvature (empirical Fisher + prior Hessian / N) estimated
        at ``swa_start`` over one epoch (:mod:`pyro_swag.precondition`), so the iterates'
        covariance has the posterior's shape; ``swa_lr`` is then the rate of the preconditioned
        step. Recorded in ``history["precondition"]`` and the checkpoint.
    precondition_damping : float or "auto"
        Damping added to the curvature, relative to its mean diagonal. ``"auto"``: the
        smallest of ``1e-3, 1e-2, 0.1, 0.3, 1, ..., 100`` whose effective step
        :math:`\\epsilon |\\lambda|_{\\max}(P A_1)/(1-\\mu) \\le 0.5`
        (:func:`pyro_swag.precondition.choose_preconditioner`): ``1e-3`` on well-determined
        models, larger for networks with a rank-deficient Fisher (see docs/calibration.md).
    swa_batches : {"epoch", "independent"}
        SWA-phase minibatches of tensor data: ``"epoch"`` cuts one permutation per epoch
        (the noise of an epoch sums to zero, so the iterates spread less than the rate
        rules assume, by far more with momentum); ``"independent"`` draws each batch afresh,
        as the derivations of ``swa_lr="auto"`` and ``precondition`` assume.

    Returns
    -------
    FitResult
        ``(guide, history)``.
    """
    if not isinstance(collector, SWAGCollector):
        raise TypeError(f"collector must be a SWAGCollector, got {type(collector).__name__}")
    _fitargs.check_model(collector, model)
    _fitargs.check_fit_args(
        epochs=epochs, swa_start=swa_start, swa_lr=swa_lr, swa_momentum=swa_momentum,
        anneal_epochs=anneal_epochs, anneal_strategy=anneal_strategy, anneal_from=anneal_from,
        collect_every=collect_every, collect_every_steps=collect_every_steps,
        clip_norm=clip_norm, checkpoint_every=checkpoint_every,
        precondition_damping=precondition_damping, swa_batches=swa_batches,
    )
    pre = precondition if isinstance(precondition, Preconditioner) else None
    kind = pre.kind if pre else (precondition and _check_kind(precondition))
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH, the file to resume from")
    _fitargs.check_fit_objects(collector, optim, callback, checkpoint, resume)
    batches, n = _batches(data, batch_size, num_data)
    _fitargs.check_step_snapshots(batches, epochs, swa_start, collect_every_steps)
    if seed is not None:
        if not is_int(seed, 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got seed={seed!r}")
        pyro.set_rng_seed(int(seed))
    clip = {} if clip_norm is None else {"clip_norm": float(clip_norm)}
    if optim is None:
        optim = pyro.optim.Adam({"lr": 1e-2}, dict(clip))
    elif clip and not optim.pt_clip_args:
        optim.pt_clip_args = dict(clip)
    kwargs = {num_data_arg: n} if _accepts(model, num_data_arg) else {}
    n_arg = num_data_arg if kwargs else None  # the curvature and rate estimates call it alike

    first = next(iter(batches), None)
    if first is None:
        raise ValueError("the loader yielded no batches; pass a loader that yields data")
    args = _as_args(first)
    trace = _check_batch(model, args, kwargs, n, check_scaling)
    own = own_subsample(trace)  # a plate the model subsamples itself
    _fitargs.check_swa_batches(batches, swa_batches, swa_lr, own)
    if collector.prototype_trace is None:
        _fitargs.use_network_init(collector, model)
        collector(*args, **kwargs)
    _fitargs.warn_model_params(trace, collector.latent_dim)
    if isinstance(batches, _TensorBatches) and batches.batch_size == n > 1 and own is None:
        warnings.warn(
            f"full-batch SGD (batch_size{' defaults to min(N, 128)' if batch_size is None else ''}"
            f" = N = {n}): SWAG's covariance then reflects only the deterministic drift of "
            "the iterates; pass batch_size < N",
            stacklevel=2,
        )

    config = _fitargs.plain({
        "epochs": epochs,
        "swa_start": swa_start,
        "collect_every": collect_every,
        "collect_every_steps": collect_every_steps,
        "num_data": n,
        # the SWA phase's settings: a resumed run must not mix them with others
        "swa_lr": swa_lr,
        "swa_momentum": float(swa_momentum),
        "batch_size": batch_size,
        "anneal": [anneal_epochs, anneal_strategy, anneal_from],
        "swa_batches": swa_batches,
    })
    if kind:
        damping = pre.damping if pre else precondition_damping
        config.update(precondition=kind, precondition_damping=_fitargs.plain(damping))
    history: dict[str, Any] = {
        "epoch": [],
        "phase": [],
        "loss": [],
        "lr": [],
        "snapshots": [],
        "swa_lr": None if swa_lr == "auto" else float(swa_lr),
        "precondition": kind,
    }
    start, swa_steps, swa_state = 0, 0, None
    if resume and os.path.exists(checkpoint):
        got = _checkpoint.restore(checkpoint, config, collector, optim, batches)
        swa_state, history = got["swa_state"], got["history"]
        start, swa_steps, pre = got["epoch"], got["swa_steps"], got["pre"] or pre

    def scaled(fn):
        return poutine.scale(fn, scale=1.0 / n)

    svi = SVI(scaled(model), scaled(collector), optim, Trace_ELBO())
    swa_optim = None
    bar = tqdm(
        total=epochs,
        initial=start,
        desc="fit",
        unit="epoch",
        disable=True if quiet else (None if quiet is None else False),
    )
    try:
        for epoch in range(start, epochs):
            swa = epoch >= swa_start
            if isinstance(batches, _TensorBatches):
                batches.independent = swa and swa_batches == "independent"
            if swa and swa_optim is None:
                if kind and pre is None:
                    epoch_batches = [_as_args(b) for b in batches]
                    pre = choose_preconditioner(
                        model,
                        collector,
                        epoch_batches,
                        num_data=n,
                        kind=kind,
                        batch_size=int(epoch_batches[0][0].shape[0]),
                        momentum=swa_momentum,
                        damping=precondition_damping,
                        lr=history["swa_lr"],
                        num_data_arg=n_arg,
                    )
                if history["swa_lr"] is None:
                    epoch_batches = [_as_args(b) for b in batches]
                    history["swa_lr"] = auto_swa_lr(
                        model, collector, epoch_batches, n, swa_momentum, pre, num_data_arg=n_arg,
                        independent_batches=getattr(batches, "independent", False),
                    )
                swa_optim = swa_optimizer(
                    history["swa_lr"],
                    momentum=swa_momentum,
                    anneal_from=anneal_from,
                    anneal_epochs=anneal_epochs,
                    anneal_strategy=anneal_strategy,
                    clip=clip,
                    preconditioner=pre,
                    target=loc_name(collector),
                )
                if swa_state is not None:
                    swa_optim.set_state(swa_state)
                svi = SVI(scaled(model), scaled(collector), swa_optim, Trace_ELBO())
            total, count = 0.0, 0
            for batch in batches:
                loss = svi.step(*_as_args(batch), **kwargs)
                if not math.isfinite(loss):
                    raise RuntimeError(
                        f"the loss became {loss} in epoch {epoch} (phase "
                        f"{'swa' if swa else 'pretrain'}); lower the learning rate or set clip_norm"
                        + (" or raise precondition_damping" if swa and pre else "")
                        + "; the collector now holds the diverged point: build a new "
                        "SWAGCollector (or resume from a checkpoint) before retrying"
                    )
                total, count = total + loss, count + 1
                if swa and collect_every_steps:
                    swa_steps += 1
                    if swa_steps % collect_every_steps == 0:
                        collector.collect()
            if count == 0:
                raise ValueError(f"the loader yielded no batches in epoch {epoch}")
            cur = swa_optim if swa else optim
            lr_used = _lr(cur)
            if swa:
                if not collect_every_steps and (epoch - swa_start + 1) % collect_every == 0:
                    collector.collect()
                swa_optim.step()
            else:
                _step_scheduler(optim, total / count)
            for key, value in (
                ("epoch", epoch),
                ("phase", "swa" if swa else "pretrain"),
                ("loss", total / count),
                ("lr", lr_used),
                ("snapshots", collector.num_snapshots),
            ):
                history[key].append(value)
            bar.update(1)
            bar.set_postfix(
                loss=f"{total / count:.4g}", lr=f"{lr_used:.3g}", snapshots=collector.num_snapshots
            )
            done = epoch + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == epochs):
                _checkpoint.save(checkpoint, config, done, swa_steps, collector, optim,
                                 swa_optim, history, pre, batches)
            if callback is not None and _fitargs.stops(callback(epoch, history)):
                break
        else:
            if not isinstance(batches, _TensorBatches):  # a loader: the step count was unknown
                _fitargs.warn_few_snapshots(collector.num_snapshots, collect_every_steps)
    finally:
        bar.close()
    guide = collector.swag_guide() if collector.num_snapshots >= 2 else None
    return FitResult(guide, history)


def _step_scheduler(optim, loss: float) -> None:
    """Step a user ``PyroLRScheduler`` once per pre-training epoch (plain optimisers: no-op)."""
    sched = next(iter(optim.optim_objs.values()), None)
    if sched is None or not hasattr(sched, "optimizer"):
        return
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        optim.step(loss)
    else:
        optim.step()

