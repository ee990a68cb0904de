"""Up-front checks of :func:`pyro_swag.train.fit`'s arguments (raised before any training),
and the collector's wrapped model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro.optim
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median

from ._checks import is_int, is_positive_finite
from ._minibatch import _TensorBatches

ANNEAL_STRATEGIES = ("cos", "linear")
SWA_BATCHES = ("epoch", "independent")


def _check_int(name: str, value, low: int) -> None:
    if not is_int(value, low):
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")


def check_fit_args(
    *,
    epochs,
    swa_start,
    swa_lr,
    swa_momentum,
    anneal_epochs,
    anneal_strategy,
    anneal_from,
    collect_every,
    collect_every_steps,
    clip_norm,
    checkpoint_every,
    precondition_damping,
    swa_batches="epoch",
) -> None:
    """Raise ``ValueError`` naming the first bad argument of ``fit`` (no state is touched)."""
    if swa_batches not in SWA_BATCHES:
        raise ValueError(
            f"swa_batches must be one of {SWA_BATCHES}, got swa_batches={swa_batches!r}"
        )
    _check_int("epochs", epochs, 1)
    _check_int("swa_start", swa_start, 0)
    if swa_start >= epochs:
        raise ValueError(
            f"swa_start={swa_start} must be < epochs={epochs}: SWAG collects during epochs "
            f"[swa_start, epochs); lower swa_start or raise epochs"
        )
    _check_int("collect_every", collect_every, 1)
    _check_int("anneal_epochs", anneal_epochs, 0)
    _check_int("checkpoint_every", checkpoint_every, 1)
    if collect_every_steps is not None:
        _check_int("collect_every_steps", collect_every_steps, 1)
    elif (epochs - swa_start) // collect_every < 2:
        raise ValueError(
            f"epochs={epochs}, swa_start={swa_start}, collect_every={collect_every} give "
            f"{(epochs - swa_start) // collect_every} snapshot(s); SWAG needs at least 2"
        )
    if not (swa_lr == "auto" or is_positive_finite(swa_lr)):
        raise ValueError(f"swa_lr must be a positive float or 'auto', got swa_lr={swa_lr!r}")
    if isinstance(swa_momentum, bool) or not (
        isinstance(swa_momentum, (int, float)) and 0 <= swa_momentum < 1
    ):
        raise ValueError(
            f"swa_momentum must be a number in [0, 1), got swa_momentum={swa_momentum!r} "
            f"(0.9 is the usual value; 0 for plain SGD)"
        )
    if anneal_strategy not in ANNEAL_STRATEGIES:
        raise ValueError(
            f"anneal_strategy must be 'cos' or 'linear', got anneal_strategy={anneal_strategy!r}"
        )
    if anneal_from is not None and not is_positive_finite(anneal_from):
        raise ValueError(
            f"anneal_from must be None or a positive finite learning rate, got "
            f"anneal_from={anneal_from!r}; pass None to start the SWA phase at swa_lr"
        )
    if clip_norm is not None and not is_positive_finite(clip_norm):
        raise ValueError(
            f"clip_norm must be None or a positive finite gradient norm, got "
            f"clip_norm={clip_norm!r}; pass None for no clipping"
        )
    if precondition_damping != "auto" and not is_positive_finite(precondition_damping):
        raise ValueError(
            f"precondition_damping must be a positive float (relative to the curvature's mean "
            f"diagonal) or 'auto', got precondition_damping={precondition_damping!r}; try 'auto'"
        )


def check_fit_objects(collector, optim, callback, checkpoint, resume: bool) -> None:
    """Refuse, before any training, an optimiser that is not Pyro's, a callback that cannot
    be called, a checkpoint in a missing directory, and a collector that already holds
    snapshots of an earlier run (a second ``fit`` would merge the two trajectories)."""
    if optim is not None and not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(
            f"optim must be a pyro.optim optimiser instance, got {optim!r}; e.g. "
            "pyro.optim.Adam({'lr': 0.01})"
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable(epoch, history) or None, got {callback!r}")
    if checkpoint is not None:
        folder = os.path.dirname(os.fspath(checkpoint)) or "."
        if not os.path.isdir(folder):
            raise ValueError(
                f"checkpoint={os.fspath(checkpoint)!r}: its directory {folder!r} does not "
                "exist; create it first"
            )
    resuming = resume and checkpoint is not None and os.path.exists(checkpoint)
    if collector.num_snapshots and not resuming:
        raise ValueError(
            f"the collector already holds {collector.num_snapshots} snapshots of an earlier "
            "run, which this fit would merge with its own; build a new SWAGCollector(model) "
            "(copy the point over with new.loc.data.copy_(old.loc.data) after calling it once)"
        )


def stops(value) -> bool:
    """Whether a callback's return value asks to stop: ``True``, or a NumPy/torch boolean."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    return value is True or (isinstance(value, np.bool_) and bool(value))


def check_step_snapshots(batches, epochs: int, swa_start: int, collect_every_steps) -> None:
    """With tensor data the SWA phase's step count is known: refuse fewer than 2 snapshots."""
    if collect_every_steps is None or not isinstance(batches, _TensorBatches):
        return
    per_epoch = len(batches)
    count = (epochs - swa_start) * per_epoch // collect_every_steps
    if count < 2:
        raise ValueError(
            f"collect_every_steps={collect_every_steps} with epochs={epochs}, "
            f"swa_start={swa_start} and {per_epoch} steps per epoch collects {count} "
            f"snapshot(s); SWAG needs at least 2: lower collect_every_steps or raise epochs"
        )


def check_swa_batches(batches, swa_batches: str, swa_lr, own_plate: str | None = None) -> None:
    """Data-dependent SWA-phase checks: independent batches need tensor data, the ``"auto"``
    rate two full batches (its noise estimate compares batches of one size); ``own_plate``:
    a plate the model subsamples itself."""
    tensors = isinstance(batches, _TensorBatches)
    if swa_batches == "independent" and not tensors:
        raise ValueError(
            "swa_batches='independent' draws the batches itself and needs (x, y) tensors; for "
            "a DataLoader use a sampler with replacement (RandomSampler(..., replacement=True))"
        )
    size = batches.batch_size if tensors else getattr(batches, "batch_size", None)
    try:  # what a loader's sampler draws an epoch (with replacement: maybe more than N)
        rows = batches.n if tensors else len(batches.sampler)
    except (AttributeError, TypeError):  # a loader of unknown size: checked when it runs
        return
    if swa_lr == "auto" and isinstance(size, int) and size > 0 and rows // size < 2:
        smaller = "batch_size" if tensors else "loader batch size"
        raise ValueError(
            f"swa_lr='auto' estimates gradient noise from at least 2 full batches, but "
            f"{rows} rows an epoch give {rows // size} of batch size {size}; pass a smaller "
            f"{smaller} or a float swa_lr" + ("" if own_plate is None else
            f" (the model subsamples plate {own_plate!r} itself, which the estimate cannot "
            "see: pass a float swa_lr, or drop subsample_size and let fit make the minibatches)")
        )


def plain(value):
    """``value`` with NumPy scalars turned into Python ones (checkpoints load with
    ``weights_only=True``, which refuses NumPy objects)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


def warn_few_snapshots(num_snapshots: int, collect_every_steps, stacklevel: int = 3) -> None:
    """After a full run on a loader (step count unknown up front): warn when no guide results."""
    if collect_every_steps is not None and num_snapshots < 2:
        warnings.warn(
            f"collect_every_steps={collect_every_steps} collected {num_snapshots} snapshot(s) "
            f"over the SWA phase, so fit returns no guide (SWAG needs at least 2): lower "
            f"collect_every_steps or raise epochs",
            stacklevel=stacklevel,
        )


def unwrap(collector: Any) -> tuple[Any, Callable]:
    """(InitMessenger, model) of the collector's ``InitMessenger(init_loc_fn)(model)``."""
    wrapped = collector.model
    args = getattr(wrapped, "args", ())
    if len(args) == 2 and isinstance(args[0], InitMessenger):
        return args[0], args[1]
    return None, wrapped


def check_model(collector: Any, model: Callable) -> None:
    if unwrap(collector)[1] is not model:
        raise ValueError(
            "model is not the model the collector was built on; build it as "
            "SWAGCollector(model) with the model passed to fit"
        )


def use_network_init(collector: Any, model: Callable) -> None:
    """Start from the network's own init when the collector kept the default init_to_median."""
    messenger, _ = unwrap(collector)
    init = getattr(model, "init_loc_fn", None)
    if messenger is not None and messenger.init_fn is init_to_median and callable(init):
        collector._model = (InitMessenger(init())(model),)


def warn_model_params(trace, latent_dim: int) -> None:
    """Warn when the model's own parameters (``pyro.param``, ``pyro.module``, plain
    ``PyroModule`` parameters; the param sites of its ``trace``) outnumber its latent
    coordinates: SWAG covers only the latter, and the SWA phase keeps training the former as
    point estimates."""
    sizes = {name: site["value"].numel() for name, site in trace.nodes.items()
             if site["type"] == "param"}
    total = sum(sizes.values())
    if total <= latent_dim:
        return
    names = ", ".join(repr(n) for n in list(sizes)[:3]) + (", ..." if len(sizes) > 3 else "")
    warnings.warn(
        f"the model has {total} parameter entries ({names}) against {latent_dim} latent "
        "coordinate(s): SWAG's posterior covers the latent sites only, and the SWA phase "
        "keeps training the parameters as point estimates (their last value is used, not "
        "averaged). For a Bayesian network, make its weights latent (PyroSample priors, as "
        "in pyro_swag.models.BayesianMLP), or use pyro_swag.ModuleSWAG for a plain nn.Module",
        UserWarning,
        stacklevel=3,
    )
