"""SWAG of a Bayesian MLP trained data-parallel with torch.distributed (and MultiSWAG).

Launch with torchrun (CPU: gloo; GPUs: nccl, one per process)::

    torchrun --standalone --nproc_per_node=2 examples/distributed.py            # one SWAG run
    torchrun --standalone --nproc_per_node=2 examples/distributed.py --runs 2   # MultiSWAG
    torchrun --standalone --nproc_per_node=2 --max-restarts=3 examples/distributed.py \\
        --checkpoint ckpt/   # resumes from the last epoch after a crash
    python examples/distributed.py --smoke   # also runs as one plain process

Every run of ``W / runs`` processes trains one trajectory on the built-in diabetes data:
each process takes its share of every global batch (``DistributedSampler``), gradients are
averaged, and each process keeps the SWAG moments of its slice of the parameters.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyro_swag import SWAGCollector
from pyro_swag.data import load_dataset
from pyro_swag.distributed import (
    DistributedSWAG,
    close_distributed,
    gather_runs,
    init_distributed,
    split_runs,
)
from pyro_swag.models import BayesianMLP
from pyro_swag.multiswag import MultiSWAG
from pyro_swag.predictive import predictive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1, help="independent SWAG runs (MultiSWAG)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--swa-start", type=int, default=20, help="first epoch that is collected")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all ranks of a run)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=20, help="SWAG deviations K")
    p.add_argument("--no-shard", action="store_true", help="keep all moments on rank 0")
    p.add_argument("--checkpoint", default=None, help="directory for per-rank checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    if p.parse_args().smoke:  # tiny defaults; explicit flags still win
        p.set_defaults(epochs=6, swa_start=3, rank=3)
    args = p.parse_args()
    torch.set_num_threads(1)

    device = init_distributed()
    runs = split_runs(args.runs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    data = load_dataset("diabetes").to(device)
    torch.manual_seed(args.seed + runs.run)  # each run: its own initialisation and data order

    model = BayesianMLP(data.in_features, hidden=(50,), noise=0.7).to(device)
    collector = SWAGCollector(model, rank=args.rank, init_loc_fn=model.init_loc_fn())
    optim = functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9)
    swag = DistributedSWAG(collector, optim, shard=not args.no_shard, group=runs.group)

    n = len(data.y_train)
    sampler = DistributedSampler(
        TensorDataset(data.x_train, data.y_train),
        num_replicas=swag.world_size,
        rank=swag.rank,
        shuffle=True,
        seed=args.seed + runs.run,
        drop_last=True,
    )
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=args.batch_size // swag.world_size,
        sampler=sampler,
        drop_last=True,
    )
    first_epoch, loss = 0, float("nan")
    if args.checkpoint:
        xb, yb = next(iter(loader))
        if swag.resume(args.checkpoint, xb, yb, num_data=n):
            first_epoch = swag.num_steps // len(loader)
            if rank == 0:
                print(f"resumed from {args.checkpoint} at epoch {first_epoch}")
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = swag.step(xb, yb, num_data=n)
        if epoch >= args.swa_start:
            swag.collect()
        if args.checkpoint:
            swag.save(args.checkpoint)
    sys.stdout.write(  # one write per line: the processes share the terminal
        f"rank {rank} (run {runs.run}): moments of entries {swag.bounds} of "
        f"P={collector.loc.numel()}: {swag.memory_bytes() / 1024:.1f} KiB, last loss {loss:.1f}\n"
    )
    sys.stdout.flush()

    guides = gather_runs(swag, runs)
    if guides is not None:
        guide = guides[0] if len(guides) == 1 else MultiSWAG(guides)
        out = predictive(model, guide, data.x_test, num_samples=100, return_sites=["_RETURN"])
        mean = out["_RETURN"].mean(0).squeeze(-1)
        rmse = float((mean - data.y_test).pow(2).mean().sqrt()) * data.y_std
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"world size {world}, {len(guides)} run(s), {swag.num_snapshots} snapshots each")
        print(f"{type(guide).__name__} test RMSE (original units): {rmse:.2f}")
    close_distributed()


if __name__ == "__main__":
    main()
