r"""SWAG under ``torch.distributed``: data-parallel collection and MultiSWAG across ranks.

Data parallel SGD keeps one parameter vector :math:`\theta_t \in \mathbb{R}^P` on every rank:
each rank computes the ELBO gradient of its own microbatch, the gradients are averaged with
one ``all_reduce``, and every rank takes the same optimiser step. With :math:`W` ranks that
each pass an equal microbatch and the full data size to the model's plate, the averaged
gradient is the gradient of the global batch, so the trajectory — and its SWAG moments —
are those of single-process training on the same data order, up to the order of the
floating-point reductions.

Since :math:`\theta_t` is replicated, the moments (mean, second moment, ``K`` deviations:
:math:`(K + 2) P` numbers) need to be kept only once. :class:`DistributedSWAG` either keeps
them on group rank 0 (``shard=False``) or splits the :math:`P` entries into ``W`` contiguous
slices and keeps each slice's moments on its rank (``shard=True``, about
:math:`(K + 2) P / W` per rank, and no communication at collection time). The slices are
gathered into one :class:`~pyro_swag.SWAGGuide` at the end.

MultiSWAG runs independent trajectories: :func:`split_runs` cuts the world into groups, one
run per group (data parallel inside it), and :func:`gather_runs` brings every run's guide to
one rank.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pyro.infer import ELBO, Trace_ELBO

from ._distributed_comm import (
    agree,
    assemble,
    check_runs,
    close_distributed,
    comm_device,
    default_backend,
    global_rank,
    init_distributed,
    rank_size,
)
from ._distributed_state import (
    apply_checkpoint,
    check_checkpoint,
    model_params,
    read_checkpoint,
    write_checkpoint,
)
from ._fitted import _adopt_prototype, _layout
from .autoguide import SWAGCollector, SWAGGuide, _warn_unmoved
from .moments import SWAGMoments

__all__ = [
    "DistributedSWAG",
    "Runs",
    "close_distributed",
    "default_backend",
    "gather_runs",
    "init_distributed",
    "split_runs",
]


def _guide_from(source, loc, variance, deviations, scale: float, diagonal: bool) -> SWAGGuide:
    """A :class:`SWAGGuide` set up with the latent layout of ``source`` (collector or guide)."""
    guide = SWAGGuide(source.model, loc, variance, deviations, scale, diagonal, _layout(source))
    return _adopt_prototype(guide, source)


class DistributedSWAG:
    """Data-parallel SVI on a :class:`~pyro_swag.SWAGCollector` with SWAG moments kept once.

    Parameters
    ----------
    collector : SWAGCollector
        The point-mass guide SGD moves; its own ``moments`` are not used.
    optimizer : callable
        ``params -> torch.optim.Optimizer``, e.g.
        ``functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9)``; it is built on the
        first :meth:`step` (once the collector knows its parameters).
    loss : pyro.infer.ELBO, optional
        The objective, ``Trace_ELBO()`` by default; its ``differentiable_loss`` is used.
    shard : bool
        ``True``: every rank keeps the moments of its slice of the ``P`` latent entries;
        ``False``: group rank 0 keeps all of them.
    group : ProcessGroup, optional
        The ranks that train this trajectory (default: the whole world).

    Notes
    -----
    Every rank calls :meth:`step` with its own microbatch and the *full* data size for the
    model's plate (``num_data``), with equal microbatch sizes; gradients are averaged. The
    model's own parameters (``pyro.param``, non-latent ``PyroModule`` parameters) are trained
    with the collector's point, as ``SVI`` would, and checkpointed with it.
    :meth:`step`, :meth:`swag_guide`, :meth:`save` and :meth:`resume` are collective: call
    them on every rank of the group, in the same order. :meth:`collect` communicates nothing.
    """

    def __init__(
        self,
        collector: SWAGCollector,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        loss: ELBO | None = None,
        *,
        shard: bool = True,
        group: Any = None,
    ) -> None:
        if not isinstance(collector, SWAGCollector):
            raise TypeError(
                f"collector must be a pyro_swag.SWAGCollector, got {type(collector).__name__}"
            )
        if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a factory params -> torch.optim.Optimizer, e.g. "
                f"functools.partial(torch.optim.SGD, lr=1e-3), got {optimizer!r}"
            )
        self.collector = collector
        self.loss = Trace_ELBO() if loss is None else loss
        self.shard = bool(shard)
        self.group = group
        self.rank, self.world_size = rank_size(group)
        self._make_optimizer = optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self.model_params: dict[str, torch.Tensor] = {}
        m = collector.moments
        self.moments = SWAGMoments(m.rank, m.min_var, m.deviation_dtype, m.device)
        self.num_steps = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, *args, **kwargs) -> None:
        """Trace the model once, copy group rank 0's starting point to every rank, make the
        optimiser. Called by the first :meth:`step`; collective."""
        if self.optimizer is not None:
            return
        if self.collector.prototype_trace is None:
            with torch.no_grad():
                self.collector(*args, **kwargs)
        loc = self.collector.loc
        extra = model_params(self.loss, self.collector, args, kwargs)
        if self.world_size > 1:
            layout = repr(_layout(self.collector)).encode()
            agree({"latent size": loc.numel(), "latent layout (crc32)": zlib.crc32(layout),
                   "dtype (crc32)": zlib.crc32(str(loc.dtype).encode()),
                   "rank (deviations kept)": self.moments.rank, "shard": int(self.shard),
                   "model parameters": len(extra),
                   "model parameter entries": sum(p.numel() for p in extra.values())},
                  self.group, "build the same model and collector (rank, dtype) on every rank")
            for value in (loc, *extra.values()):
                buf = value.detach().to(comm_device(self.group))
                dist.broadcast(buf, src=global_rank(self.group, 0), group=self.group)
                with torch.no_grad():
                    value.copy_(buf)
        self.model_params = extra
        self.optimizer = self._make_optimizer([*self.collector.parameters(), *extra.values()])

    @property
    def bounds(self) -> tuple[int, int]:
        """The slice ``[start, stop)`` of the latent vector whose moments this rank keeps."""
        self.collector._require_setup("bounds")
        widths = self._widths()
        start = sum(widths[: self.rank])
        return start, start + widths[self.rank]

    def _widths(self) -> list[int]:
        p, w = self.collector.loc.numel(), self.world_size
        if not self.shard:
            return [p] + [0] * (w - 1)
        return [p // w + (r < p % w) for r in range(w)]

    # --------------------------------------------------------------- training
    def step(self, *args, **kwargs) -> float:
        """One SGD step on the global batch; returns the loss averaged over the group.

        ``args``/``kwargs`` are this rank's microbatch, passed to the model and the guide.
        """
        self.setup(*args, **kwargs)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.optimizer.zero_grad()
        loss = self.loss.differentiable_loss(self.collector.model, self.collector, *args, **kwargs)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        if self.world_size > 1:
            buf = flat.to(comm_device(self.group))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            flat = buf.to(flat.device) / self.world_size
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()
        self.num_steps += 1
        return float(flat[-1])

    @torch.no_grad()
    def collect(self) -> None:
        """Record the current point: each rank updates the moments of its slice."""
        self.collector._require_setup("collect()")
        loc = self.collector.loc.detach()
        # Same answer on every rank (loc is replicated); a finite sum proves all entries finite.
        if not torch.isfinite(loc.sum()) and not bool(torch.isfinite(loc).all()):
            raise ValueError(
                "the parameters contain NaN or Inf; the trajectory diverged (lower the learning "
                "rate or clip gradients); nothing was collected"
            )
        start, stop = self.bounds
        self.moments.update(loc[start:stop])

    @property
    def num_snapshots(self) -> int:
        return self.moments.count

    def memory_bytes(self) -> int:
        """Bytes of the moment buffers held by this rank."""
        return sum(b.numel() * b.element_size() for b in self.moments.buffers())

    # --------------------------------------------------------------- gathering
    def _agree_snapshots(self) -> None:
        if self.world_size > 1:  # collect() is local: a rank may have missed one
            agree({"snapshots collected": self.moments.count}, self.group,
                  "call collect() on every rank after the same steps")

    def gather_moments(self, dst: int | None = 0) -> SWAGMoments | None:
        """The full moments (a :class:`~pyro_swag.SWAGMoments`, e.g. to save one
        single-process store) on group rank ``dst`` (every rank when ``None``), ``None``
        elsewhere; collective."""
        m = self.moments
        self._agree_snapshots()
        m._require(1)
        parts = [torch.stack([m.mean, m.m2]), m.deviations]
        full = assemble(parts, self._widths(), self.rank, dst, self.group)
        if full is None:
            return None
        out = SWAGMoments(m.rank, m.min_var, m.deviation_dtype, m.device)
        state = {"mean": full[0][0], "m2": full[0][1], "deviations": full[1]}
        out.load_state_dict({**state, "_extra_state": m.get_extra_state()})
        return out

    def swag_guide(
        self, scale: float = 1.0, diagonal: bool = False, dst: int | None = 0
    ) -> SWAGGuide | None:
        """The :class:`~pyro_swag.SWAGGuide` of the whole trajectory on group rank ``dst``
        (every rank when ``None``), ``None`` elsewhere; collective.

        Each rank computes the SWAG quantities of its slice (mean, clamped variance,
        deviations oldest first) and sends them once; the receiver writes them straight
        into the guide's tensors, so its peak is about one full store plus one slice.
        """
        m = self.moments
        self._agree_snapshots()
        if m.count < 2:
            raise RuntimeError(
                f"swag_guide() needs at least 2 snapshots, {m.count} collected; "
                "call collect() during training (collect more snapshots first)"
            )
        parts = [torch.stack([m.mean, m.variance()]), m.deviation_matrix()]
        full = assemble(parts, self._widths(), self.rank, dst, self.group)
        if full is None:
            return None
        device = self.collector.loc.device  # the guide lives with the model
        loc, var, devs = (t.to(device) for t in (full[0][0], full[0][1], full[1]))
        guide = _guide_from(self.collector, loc, var, devs, scale, diagonal)
        _warn_unmoved(guide, m.count)
        return guide

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: point, optimiser, moment slice, RNG, step count."""
        if self.optimizer is None:
            raise RuntimeError("state_dict() needs a first step(...) (or setup(...)) to be run")
        state = {
            "loc": self.collector.loc.detach().clone(),
            "params": {k: v.detach().clone() for k, v in self.model_params.items()},
            "optimizer": self.optimizer.state_dict(),
            "moments": self.moments.state_dict(),
            "rng": torch.get_rng_state(),
            "meta": {
                "rank": self.rank,
                "world_size": self.world_size,
                "shard": self.shard,
                "num_steps": self.num_steps,
                "layout": _layout(self.collector),
            },
        }
        if self.collector.loc.is_cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(self.collector.loc.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (of the same rank, group size, mode, model and dtype);
        a checkpoint that does not fit is refused before anything changes."""
        if self.optimizer is None:
            raise RuntimeError("load_state_dict() needs setup(*model_args) to be run first")
        check_checkpoint(self, state)
        apply_checkpoint(self, state)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write this rank's :meth:`state_dict` to ``directory`` (atomically, keeping the
        previous file as ``*.prev.pt``); collective."""
        return write_checkpoint(self, directory)

    def resume(self, directory: str | os.PathLike, *args, **kwargs) -> bool:
        """Load the newest checkpoint in ``directory`` that every rank has; collective.

        ``args``/``kwargs`` are a microbatch, used to trace the model. Returns whether a
        checkpoint was loaded. A save interrupted on some ranks leaves them one step ahead:
        all ranks then resume from their previous files, with a warning. Raises
        ``RuntimeError`` when no step is held by every rank.
        """
        self.setup(*args, **kwargs)
        state = read_checkpoint(self, directory)
        if state is None:
            return False
        self.load_state_dict(state)
        return True


@dataclass(frozen=True)
class Runs:
    """How the world is split for MultiSWAG (see :func:`split_runs`).

    Attributes
    ----------
    run : int
        The run this rank trains.
    num_runs : int
        Number of independent runs.
    group : ProcessGroup or None
        The ranks of this run (pass it to :class:`DistributedSWAG`).
    leaders : ProcessGroup or None
        Group rank 0 of every run; ``None`` on the other ranks.
    """

    run: int
    num_runs: int
    group: Any
    leaders: Any


def split_runs(num_runs: int) -> Runs:
    """Split the world into ``num_runs`` equal groups of consecutive ranks; collective."""
    rank, world = rank_size(None)
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be an integer >= 1, got num_runs={num_runs!r}")
    if world % num_runs:
        raise ValueError(
            f"num_runs={num_runs} does not divide the world size {world}; launch a multiple "
            f"of {num_runs} processes or pick a divisor of {world}"
        )
    if world == 1:
        return Runs(0, 1, None, None)
    size = world // num_runs
    groups = [dist.new_group(list(range(i * size, (i + 1) * size))) for i in range(num_runs)]
    leaders = dist.new_group([i * size for i in range(num_runs)])
    return Runs(rank // size, num_runs, groups[rank // size], leaders if rank % size == 0 else None)


def gather_runs(
    swag: DistributedSWAG, runs: Runs, scale: float = 1.0, diagonal: bool = False
) -> list[SWAGGuide] | None:
    """Every run's :class:`~pyro_swag.SWAGGuide`, ordered by run, on global rank 0.

    Collective over the world; other ranks get ``None``. Runs must share the model (the same
    latent size); they may hold different numbers of deviations.
    """
    if runs.num_runs > 1:
        check_runs(swag.group, runs.group, swag.num_snapshots, swag.collector.loc.numel())
    guide = swag.swag_guide(scale=scale, diagonal=diagonal, dst=0)
    rank = rank_size(None)[0]
    if runs.num_runs == 1 or guide is None:
        return [guide] if guide is not None and rank == 0 else None
    group, me = runs.leaders, dist.get_rank(runs.leaders)
    comm = comm_device(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(runs.num_runs)]
    dist.all_gather(sizes, torch.tensor([guide.rank], device=comm), group=group)
    if me != 0:
        for t in (torch.stack([guide.loc, guide.variance]), guide.deviations):
            dist.send(t.contiguous().to(comm), dst=global_rank(group, 0), group=group)
        return None
    guides = []
    for run, k in enumerate(int(s) for s in sizes):
        if run == 0:
            guides.append(guide)
            continue
        vec = torch.empty(2, guide.loc.numel(), dtype=guide.loc.dtype, device=comm)
        devs = torch.empty(k, guide.loc.numel(), dtype=guide.deviations.dtype, device=comm)
        for t in (vec, devs):
            dist.recv(t, src=global_rank(group, run), group=group)
        vec, devs = vec.to(guide.loc.device), devs.to(guide.loc.device)
        guides.append(_guide_from(guide, vec[0], vec[1], devs, scale, diagonal))
    return guides
