"""Checkpoint file of :func:`pyro_swag.train.fit`: write atomically, read back and restore."""

from __future__ import annotations

import os
from typing import Any

import pyro
import torch

from .precondition import Preconditioner

FORMAT = "pyro_swag.fit/1"


def _generators(batches) -> list[torch.Generator]:
    """The torch generators a DataLoader shuffles with (its own and its sampler's), if any."""
    found: dict[int, torch.Generator] = {}
    sampler = getattr(batches, "sampler", None)
    inner = getattr(getattr(batches, "batch_sampler", None), "sampler", None)
    for g in (getattr(batches, "generator", None), getattr(sampler, "generator", None),
              getattr(inner, "generator", None)):
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def save(path, config, epoch, swa_steps, collector, optim, swa_optim, history, pre,
         batches=None) -> None:
    """Write the training state to ``path`` (via a temporary file and ``os.replace``),
    the shuffling state of ``batches``' own generators included."""
    state = {
        "format": FORMAT,
        "config": config,
        "epoch": epoch,
        "swa_steps": swa_steps,
        "collector": collector.state_dict(),
        "params": {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()},
        "optim": optim.get_state(),
        "swa_optim": None if swa_optim is None else swa_optim.get_state(),
        "history": history,
        "precondition": None if pre is None else pre.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader_rng": [g.get_state() for g in _generators(batches)],
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore(path, config: dict, collector, optim, batches=None) -> dict[str, Any]:
    """Load ``path`` into the collector, param store, optimiser and RNGs; return the rest.

    Returns a dict with ``swa_state``, ``pre`` (a :class:`Preconditioner` or ``None``),
    ``history``, ``epoch`` and ``swa_steps``.
    """
    state = torch.load(path, weights_only=True, map_location=collector.loc.device)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} is not a pyro_swag.fit checkpoint (format "
            f"{FORMAT!r}); pass checkpoint= a path fit() may write to, or delete the file"
        )
    if state["config"] != config:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} was written with {state.get('config')}, "
            f"not {config}; resume with the same arguments or delete the file"
        )
    gens, saved = _generators(batches), state.get("loader_rng", [])
    if len(gens) != len(saved):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} holds the state of {len(saved)} loader "
            f"generator(s) but this loader shuffles with {len(gens)}; resume with a loader "
            "built as the checkpointed run's was (same generator= / sampler)"
        )
    collector.load_state_dict(state["collector"])
    store = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            store[name].copy_(value)
    optim.set_state(state["optim"])
    torch.set_rng_state(state["rng"].cpu())
    for g, s in zip(gens, saved):
        g.set_state(s.cpu())
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    pre = state.get("precondition")
    return {
        "swa_state": state["swa_optim"],
        "pre": None if pre is None else Preconditioner.from_state_dict(pre),
        "history": state["history"],
        "epoch": state["epoch"],
        "swa_steps": state["swa_steps"],
    }
