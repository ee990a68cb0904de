"""Process-group plumbing for :mod:`pyro_swag.distributed`: set-up, tear-down, and the
collectives that assemble column-sharded tensors.

Private: import the public names from :mod:`pyro_swag.distributed`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def default_backend(device: torch.device | str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(
    device: torch.device | str | None = None, backend: str | None = None
) -> torch.device:
    """Join the process group that ``torchrun`` describes and return this rank's device.

    The device defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; the
    backend follows it (:func:`default_backend`). Outside ``torchrun`` (no ``WORLD_SIZE`` in
    the environment) nothing is initialised and the code runs as a single process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    backend = backend or default_backend(device)
    kwargs = {}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts (--max-restarts), so a restarted
        # group would read the dead workers' addresses: give every attempt its own keys.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
        )
        kwargs = {
            "store": dist.PrefixStore(f"pyro_swag/attempt{attempt}", store),
            "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"]),
        }
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, **kwargs)
    return device


def close_distributed() -> None:
    """Wait for every rank, then destroy the process groups (no-op without them).

    The barrier keeps a rank from tearing down while a peer still finishes a collective.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_size(group) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; (0, 1) without a process group."""
    if not dist.is_initialized():
        if group is not None:
            raise RuntimeError(
                "a process group was passed but torch.distributed is not initialised; "
                "call pyro_swag.distributed.init_distributed() under torchrun first"
            )
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of group={group!r}; "
            "pass the group this rank belongs to (see split_runs)"
        )
    return rank, dist.get_world_size(group)


def comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def assemble(
    parts: list[torch.Tensor], widths: list[int], rank: int, dst: int | None, group
) -> list[torch.Tensor] | None:
    """Concatenate every rank's column block of each ``parts[i]`` (rows x width_r) on group
    rank ``dst`` (on every rank when ``None``, by one broadcast per block; otherwise by
    point-to-point sends). Receivers hold the full result plus one block, never a list of
    all blocks; the others get ``None``."""
    if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int)
                            or not 0 <= dst < len(widths)):
        raise ValueError(
            f"dst must be None (every rank) or a group rank in [0, {len(widths)}), got "
            f"dst={dst!r}"
        )
    if len(widths) == 1:
        return list(parts)
    receive = dst is None or rank == dst
    total = sum(widths)
    mine_only = receive and widths[rank] == total  # rank-0 mode: use own blocks as they are
    full = list(parts) if mine_only else None
    if receive and not mine_only:
        full = [t.new_empty(t.shape[0], total) for t in parts]
    comm = comm_device(group)
    start = 0
    for src, width in enumerate(widths):
        cols = slice(start, start + width)
        start += width
        if width == 0 or (dst is not None and rank not in (src, dst)):
            continue
        for i, t in enumerate(parts):
            if src == rank:
                if receive and not mine_only:
                    full[i][:, cols] = t
                if dst is None:
                    dist.broadcast(
                        t.contiguous().to(comm), src=global_rank(group, src), group=group
                    )
                elif src != dst:
                    dist.send(t.contiguous().to(comm), dst=global_rank(group, dst), group=group)
                continue
            buf = torch.empty(t.shape[0], width, dtype=t.dtype, device=comm)
            if dst is None:
                dist.broadcast(buf, src=global_rank(group, src), group=group)
            else:
                dist.recv(buf, src=global_rank(group, src), group=group)
            full[i][:, cols] = buf
    return full


def group_min(values: list[int], group) -> list[int]:
    """Element-wise minimum of integers over the ranks of ``group`` (``-min(-v)`` is the
    maximum); collective, and the values themselves without a process group or alone."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(values)
    buf = torch.tensor(values, dtype=torch.long, device=comm_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=group)
    return buf.tolist()


def agree(values: dict[str, int], group, fix: str) -> None:
    """Raise ``ValueError`` on every rank of ``group`` together unless all of them pass the
    same ``values`` (names to integers); collective. Without the check, tensors of different
    sizes meet in a collective: gloo aborts, or a short message fills part of a buffer."""
    mine = list(values.values())
    both = group_min(mine + [-v for v in mine], group)
    lo, hi = both[: len(mine)], [-v for v in both[len(mine) :]]
    differ = [f"{name} (from {a} to {b}, here {values[name]})"
              for name, a, b in zip(values, lo, hi) if a != b]
    if differ:
        raise ValueError(f"the ranks disagree on {', '.join(differ)}; {fix}")


def check_runs(swag_group, runs_group, num_snapshots: int, size: int) -> None:
    """Refuse, on every rank together, a gather of runs that would hang or mix up data: a
    trajectory not trained on its run's group, runs of different latent sizes, or a run
    with fewer than 2 snapshots; collective."""
    mine = dist.get_process_group_ranks(runs_group)
    theirs = (list(range(dist.get_world_size())) if swag_group is None
              else dist.get_process_group_ranks(swag_group))
    flags = group_min([num_snapshots, -int(mine != theirs), size, -size], None)
    if flags[1]:  # raised on every rank; the details are those of this rank
        raise ValueError(
            f"a trajectory is not trained on its run's group (here: swag on ranks {theirs}, "
            f"run on ranks {mine}); build DistributedSWAG(..., group=runs.group) with the "
            "Runs from split_runs"
        )
    if flags[2] != -flags[3]:
        raise ValueError(
            f"the runs' latent sizes differ (from {flags[2]} to {-flags[3]}, this run "
            f"{size}); every run of gather_runs must train the same model"
        )
    if flags[0] < 2:
        raise RuntimeError(
            f"gather_runs() needs at least 2 snapshots in every run, one run has "
            f"{int(flags[0])}; call collect() during every run's training"
        )
