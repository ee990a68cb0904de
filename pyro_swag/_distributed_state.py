"""State of :class:`pyro_swag.distributed.DistributedSWAG` beyond the collector's point (the
model's own parameters), and its checkpoints: file names, and the checks that refuse a
checkpoint before any of a rank's state changes.

Private: the public API is ``DistributedSWAG.save`` / ``resume`` / ``load_state_dict``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pyro import poutine

from ._distributed_comm import group_min, rank_size
from ._fitted import _layout

_NAME = re.compile(r"swag-rank(\d+)-of-(\d+)\.pt")


def checkpoint_path(directory: str | os.PathLike, rank: int, world: int) -> Path:
    """The file of global rank ``rank`` in a world of ``world`` processes."""
    return Path(directory) / f"swag-rank{rank}-of-{world}.pt"


def other_world(directory: str | os.PathLike, world: int) -> int:
    """The largest world size other than ``world`` with a checkpoint file in ``directory``
    (0 when there is none)."""
    found = [int(m.group(2)) for p in Path(directory).glob("swag-rank*-of-*.pt")
             if (m := _NAME.fullmatch(p.name))]
    return max((w for w in found if w != world), default=0)


def model_params(loss: Any, collector: Any, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The unconstrained tensors of the param sites the loss uses besides the collector's own
    (``pyro.param``, ``PyroModule`` and ``pyro.module`` parameters of the model), in trace
    order, as Pyro's ``SVI`` finds what it trains. The random state is left as it was."""
    own = {id(p) for p in collector.parameters()}
    loc = collector.loc
    with torch.random.fork_rng(devices=[loc.device] if loc.is_cuda else []), torch.no_grad():
        with poutine.trace(param_only=True) as capture:
            loss.differentiable_loss(collector.model, collector, *args, **kwargs)
    found = {}
    for name, site in capture.trace.nodes.items():
        value = site["value"].unconstrained()
        if id(value) not in own and value.requires_grad:
            found[name] = value
    return found


def check_checkpoint(swag: Any, state: dict[str, Any]) -> None:
    """Raise when ``state`` cannot restore ``swag`` (a ``DistributedSWAG``); changes nothing."""
    meta = state["meta"]
    mine = {"rank": swag.rank, "world_size": swag.world_size, "shard": swag.shard}
    theirs = {k: meta[k] for k in mine}
    if mine != theirs:
        raise ValueError(
            f"the checkpoint was written by {theirs} but this process is {mine}; relaunch "
            "with the same number of processes and the same shard setting"
        )
    if [(n, tuple(s)) for n, s in meta["layout"]] != _layout(swag.collector):
        raise ValueError("the checkpoint belongs to another model (its latent layout differs)")
    loc = swag.collector.loc
    swag.moments.check_state(state["moments"], dtype=loc.dtype)
    saved = state["loc"]
    if saved.shape != loc.shape or saved.dtype != loc.dtype:
        raise TypeError(
            f"the checkpoint's point has shape {tuple(saved.shape)} and dtype={saved.dtype}, "
            f"the model's {tuple(loc.shape)} and dtype={loc.dtype}; load it into the model it "
            "was written from (same parameters and dtype)"
        )
    saved_params = state.get("params", {})
    want = {k: (tuple(v.shape), v.dtype) for k, v in swag.model_params.items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in saved_params.items()}
    if got != want:
        raise ValueError(
            f"the checkpoint's model parameters {got} are not this model's {want}; load it "
            "into the model it was written from"
        )
    for key in ("rng", "cuda_rng"):
        rng = state.get(key)
        if rng is not None and (not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8):
            raise TypeError(f"the checkpoint's {key!r} is not an RNG state (a uint8 tensor)")


def apply_checkpoint(swag: Any, state: dict[str, Any]) -> None:
    """Restore ``swag`` from a ``state`` that :func:`check_checkpoint` accepted."""
    swag.optimizer.load_state_dict(state["optimizer"])  # checks its own groups first
    swag.moments.load_state_dict(state["moments"])
    loc = swag.collector.loc
    with torch.no_grad():
        loc.copy_(state["loc"])
        for name, value in state.get("params", {}).items():
            swag.model_params[name].copy_(value)
    torch.set_rng_state(state["rng"].cpu())  # map_location may have moved it to the GPU
    if "cuda_rng" in state and loc.is_cuda:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), loc.device)
    swag.num_steps = int(state["meta"]["num_steps"])


def _previous(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".pt") + ".prev.pt")


def write_checkpoint(swag: Any, directory: str | os.PathLike) -> Path:
    """Write ``swag``'s state to its rank's file, the file before it kept as ``*.prev.pt``
    (so a save cut short on some ranks leaves a step that every rank holds); collective."""
    path = checkpoint_path(directory, *rank_size(None))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(swag.state_dict(), tmp)
    if path.exists():
        os.replace(path, _previous(path))
    os.replace(tmp, path)
    if swag.world_size > 1:
        dist.barrier(group=swag.group)
    return path


def read_checkpoint(swag: Any, directory: str | os.PathLike) -> dict[str, Any] | None:
    """The state of the newest step that every rank's files hold (``None``: no rank has a
    file); collective. Raises when the ranks hold no common step, or only files of another
    world size."""
    world = rank_size(None)[1]
    path = checkpoint_path(directory, rank_size(None)[0], world)
    where = swag.collector.loc.device
    files = [f for f in (path, _previous(path)) if f.exists()]
    state = torch.load(files[0], weights_only=True, map_location=where) if files else None
    step = -1 if state is None else int(state["meta"]["num_steps"])
    other = other_world(directory, world) if state is None else 0
    lo, neg_hi, neg_other = group_min([step, -step, -other], swag.group)
    hi, other = -neg_hi, -neg_other
    if hi == -1 and other:
        raise ValueError(
            f"{str(directory)!r} holds checkpoints of a {other}-process run but this run "
            f"has {world} processes; relaunch with {other} processes, or pass an empty "
            "directory to start afresh"
        )
    if lo != hi and lo >= 0 and step != lo and len(files) == 2:
        del state  # this rank saved a step the others did not reach: take its file before
        state = torch.load(files[1], weights_only=True, map_location=where)
    held = state is not None and int(state["meta"]["num_steps"]) == lo
    if lo != hi and not group_min([int(held)], swag.group)[0]:
        raise RuntimeError(
            f"the ranks' checkpoints in {directory} are from different steps ({lo}..{hi}, "
            "-1 = missing); a save was interrupted: delete the directory or restore it"
        )
    if lo != hi:
        warnings.warn(
            f"the ranks' newest checkpoints in {directory} are from steps {lo}..{hi} (a save "
            f"was interrupted); every rank resumes from step {lo}",
            RuntimeWarning,
            stacklevel=3,
        )
    return state
