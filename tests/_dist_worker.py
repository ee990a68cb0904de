"""Worker launched by tests/test_distributed.py with ``torchrun --nproc_per_node=2``.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=1
tests/_dist_worker.py OUT``. The first attempt runs ``ddp`` (sharded and rank-0 collection,
then 2-run MultiSWAG), then ``crash`` (checkpoints every few steps; rank 1 dies once);
torchrun restarts the group, and the second attempt resumes ``crash`` from the checkpoint.
The helpers below are also imported by the test to build the single-process reference.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import constraints

from pyro_swag import SWAGCollector
from pyro_swag.models import BayesianMLP

N, BATCH, STEPS, SWA_START, RANK, LR, MOMENTUM = 64, 16, 30, 10, 5, 5e-4, 0.9
CRASH_AT, SAVE_EVERY = 20, 8


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.2 * torch.randn(N, generator=g)
    return x, y


def make_collector(
    seed: int,
    deviation_dtype: torch.dtype | None = None,
    rank: int = RANK,
    dtype: torch.dtype = torch.float32,
) -> SWAGCollector:
    pyro.clear_param_store()  # collectors share the param name "SWAGCollector.loc"
    torch.manual_seed(seed)
    model = BayesianMLP(1, hidden=(8,), noise=0.3).to(dtype)
    init = model.init_loc_fn()
    return SWAGCollector(model, rank=rank, init_loc_fn=init, deviation_dtype=deviation_dtype)


def batch(step: int, seed: int) -> torch.Tensor:
    """The global batch of one step: the same on every rank and in the reference."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(1000 * seed + step))[:BATCH]


optimizer = functools.partial(torch.optim.SGD, lr=LR, momentum=MOMENTUM)


def reference(seed: int, deviation_dtype: torch.dtype | None = None):
    """The SWAG guide of single-process SVI with plain Pyro on the same data order."""
    return reference_collector(seed, deviation_dtype).swag_guide()


def reference_collector(seed: int, deviation_dtype: torch.dtype | None = None) -> SWAGCollector:
    """Single-process SVI with plain Pyro on the same data order."""
    x, y = make_data()
    collector = make_collector(seed, deviation_dtype)
    svi = SVI(
        collector.model, collector, pyro.optim.SGD({"lr": LR, "momentum": MOMENTUM}), Trace_ELBO()
    )
    for t in range(STEPS):
        idx = batch(t, seed)
        svi.step(x[idx], y[idx], num_data=N)
        if t >= SWA_START:
            collector.collect()
    return collector


def microbatch(t, seed, rank, world, x, y):
    idx = batch(t, seed)[rank::world]
    return (x[idx], y[idx]), {"num_data": N}


def train(swag, seed, rank, world, first=0, on_step=None):
    x, y = make_data()
    for t in range(first, STEPS):
        args, kwargs = microbatch(t, seed, rank, world, x, y)
        swag.step(*args, **kwargs)
        if t >= SWA_START:
            swag.collect()
        if on_step is not None:
            on_step(t)


def torn_checkpoint(swag, directory: Path, rank: int, world: int) -> str:
    """Save, lose rank 1's file (a save cut short), resume: every rank must refuse."""
    import torch.distributed as dist

    from pyro_swag._distributed_state import checkpoint_path
    from pyro_swag.distributed import DistributedSWAG

    swag.save(directory)
    if rank == 1:
        checkpoint_path(directory, rank, world).unlink()
    dist.barrier()
    fresh = DistributedSWAG(make_collector(0), optimizer)
    args, kwargs = microbatch(0, 0, rank, world, *make_data())
    try:
        fresh.resume(directory, *args, **kwargs)
    except RuntimeError as err:
        return str(err)
    return "resumed"


def interrupted_save(directory: Path, rank: int, world: int) -> dict:
    """Saves after steps 12 and 14; rank 1's second save is cut short (its file is the first
    again): every rank must resume from step 12, with a warning."""
    import torch.distributed as dist

    from pyro_swag._distributed_state import checkpoint_path
    from pyro_swag.distributed import DistributedSWAG

    swag = DistributedSWAG(make_collector(0), optimizer)
    x, y = make_data()
    for t in range(14):
        swag.step(*microbatch(t, 0, rank, world, x, y)[0], num_data=N)
        if t in (11, 13):
            swag.save(directory)
        if t == 11:
            first = swag.collector.loc.detach().clone()
    if rank == 1:
        path = checkpoint_path(directory, rank, world)
        os.replace(path.with_name(path.name.replace(".pt", ".prev.pt")), path)
    dist.barrier()
    fresh = DistributedSWAG(make_collector(0), optimizer)
    args, kwargs = microbatch(0, 0, rank, world, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fresh.resume(directory, *args, **kwargs)
    return {"resumed": resumed, "step": fresh.num_steps,
            "same_point": torch.equal(fresh.collector.loc.detach(), first),
            "warnings": [str(m.message) for m in caught]}


def mismatched_ranks(rank: int, world: int) -> dict[str, str]:
    """Ranks built with different K, or that collected different numbers of snapshots:
    every rank must raise before tensors of different sizes meet in a collective."""
    from pyro_swag.distributed import DistributedSWAG

    errors = {}
    args, kwargs = microbatch(0, 0, rank, world, *make_data())
    for name, swag in (("rank", DistributedSWAG(make_collector(0, rank=RANK + rank), optimizer)),
                       ("snapshots", DistributedSWAG(make_collector(0), optimizer))):
        try:
            swag.step(*args, **kwargs)
            for _ in range(2 + rank):
                swag.collect()
            swag.swag_guide()
        except ValueError as err:
            errors[name] = str(err)
    return errors


def param_model(x, y=None, num_data=None):
    """A model with a parameter that is not latent: SVI trains it along with the point."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", num_data, subsample_size=x.shape[0]):
        pyro.sample("y", dist.Normal(torch.sin(2 * x[:, 0]) * w, sigma), obs=y)


def train_param_model(rank: int, world: int) -> list[float]:
    """(sigma, w) after DistributedSWAG on ``param_model``; rank 1 starts from another sigma
    (set-up copies rank 0's)."""
    from pyro_swag.distributed import DistributedSWAG

    pyro.clear_param_store()
    torch.manual_seed(0)
    if rank == 1:
        pyro.param("sigma", torch.tensor(3.0), constraint=constraints.positive)
    swag = DistributedSWAG(SWAGCollector(param_model, rank=2), optimizer)
    x, y = make_data()
    for t in range(STEPS):
        swag.step(*microbatch(t, 0, rank, world, x, y)[0], num_data=N)
    return [float(pyro.param("sigma").detach()), float(swag.collector.loc[0].detach())]


def misused_runs(runs, rank: int, world: int) -> dict[str, str]:
    """gather_runs on a trajectory of the wrong group, and with a run short of snapshots:
    every rank must raise (none left waiting in a collective)."""
    from pyro_swag.distributed import DistributedSWAG, gather_runs

    errors = {}
    whole = DistributedSWAG(make_collector(0), optimizer)  # group=runs.group forgotten
    train(whole, 0, rank, world)
    short = DistributedSWAG(make_collector(100 + runs.run), optimizer, group=runs.group)
    args, kwargs = microbatch(0, 100 + runs.run, 0, 1, *make_data())
    short.step(*args, **kwargs)
    for _ in range(3 if rank == 0 else 1):  # run 1 has 1 snapshot
        short.collect()
    for name, swag in (("group", whole), ("snapshots", short)):
        try:
            gather_runs(swag, runs)
        except (ValueError, RuntimeError) as err:
            errors[name] = f"{type(err).__name__}: {err}"
    return errors


def ddp(out: Path) -> None:
    import torch.distributed as dist

    from pyro_swag.distributed import DistributedSWAG, gather_runs, split_runs

    rank, world = dist.get_rank(), dist.get_world_size()
    info = {}
    for shard in (True, False):
        swag = DistributedSWAG(make_collector(0), optimizer, shard=shard)
        train(swag, 0, rank, world)
        info[f"shard={shard}"] = {
            "bytes": swag.memory_bytes(),
            "bounds": list(swag.bounds),
            "P": swag.collector.loc.numel(),
        }
        guide = swag.swag_guide(dst=0)
        assert (guide is None) == (rank != 0)
        if guide is not None:
            torch.save(guide.state_dict(), out / f"guide-shard{shard}.pt")
        if shard:
            moments = swag.gather_moments(dst=1)
            assert (moments is None) == (rank == 0)
            if moments is not None:
                torch.save(moments.state_dict(), out / "moments-rank1.pt")
            everywhere = swag.swag_guide(dst=None)
            torch.save(everywhere.state_dict(), out / f"guide-all-rank{rank}.pt")
            info["torn_checkpoint"] = torn_checkpoint(swag, out / "torn", rank, world)
    (out / f"info-rank{rank}.json").write_text(json.dumps(info))

    swag = DistributedSWAG(make_collector(0, torch.bfloat16), optimizer)  # bf16 deviations
    train(swag, 0, rank, world)
    guide = swag.swag_guide(dst=0)
    if guide is not None:
        torch.save(guide.state_dict(), out / "guide-bf16.pt")

    swag.save(out / "two-rank-ckpt")  # resumed by one process in the tests: refused

    info["interrupted_save"] = interrupted_save(out / "interrupted", rank, world)
    info["mismatched"] = mismatched_ranks(rank, world)
    info["param_model"] = train_param_model(rank, world)
    runs = split_runs(2)
    info["misuse"] = misused_runs(runs, rank, world)
    (out / f"info-rank{rank}.json").write_text(json.dumps(info))
    swag = DistributedSWAG(make_collector(100 + runs.run), optimizer, group=runs.group)
    train(swag, 100 + runs.run, 0, 1)  # one rank per run: the run's whole batch
    guides = gather_runs(swag, runs)
    if rank != 0:
        assert guides is None
        return
    for i, g in enumerate(guides):
        torch.save(g.state_dict(), out / f"run{i}.pt")
    result = {"num_guides": len(guides)}
    try:
        from pyro_swag.datatree import to_datatree
        from pyro_swag.multiswag import MultiSWAG
    except ImportError as err:
        result["missing"] = str(err)
    else:
        x, y = make_data()
        tree = to_datatree(MultiSWAG(guides), (x,), {"y": y}, num_draws=20)
        result["posterior_sizes"] = dict(tree["posterior"].sizes)
        chain_means = tree["posterior"]["layers.0.weight"].mean(("draw",)).values
        result["chain_mean_gap"] = float(abs(chain_means[0] - chain_means[1]).max())
    (out / "multiswag.json").write_text(json.dumps(result))


def crash(out: Path) -> None:
    import torch.distributed as dist

    from pyro_swag.distributed import DistributedSWAG

    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    swag = DistributedSWAG(make_collector(0), optimizer, shard=True)
    x, y = make_data()
    args, kwargs = microbatch(0, 0, rank, world, x, y)
    resumed = swag.resume(out / "ckpt", *args, **kwargs)
    first = swag.num_steps

    def on_step(t):
        if (t + 1) % SAVE_EVERY == 0:
            swag.save(out / "ckpt")
        if attempt == 0 and rank == 1 and t == CRASH_AT:
            os._exit(3)  # a crash: no clean-up, the peer is left waiting in a collective

    train(swag, 0, rank, world, first=first, on_step=on_step)
    guide = swag.swag_guide(dst=0)
    if guide is not None:
        torch.save(guide.state_dict(), out / "guide-crash.pt")
        info = {"attempt": attempt, "resumed": resumed, "first_step": first}
        (out / "crash.json").write_text(json.dumps(info))


if __name__ == "__main__":
    torch.set_num_threads(1)
    from pyro_swag.distributed import close_distributed, init_distributed

    init_distributed()
    out = Path(sys.argv[1])
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        ddp(out)
    crash(out)
    close_distributed()
