"""Checkpoints of :class:`pyro_swag.distributed.DistributedSWAG`: file names, and the checks
that refuse a checkpoint before any of a rank's state changes.

Private: the public API is ``DistributedSWAG.save`` / ``resume`` / ``load_state_dict``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

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
    torch.set_rng_state(state["rng"].cpu())  # map_location may have moved it to the GPU
    if "cuda_rng" in state and loc.is_cuda:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), loc.device)
    swag.num_steps = int(state["meta"]["num_steps"])
