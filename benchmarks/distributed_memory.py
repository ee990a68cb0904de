"""Per-rank memory of distributed SWAG moments against the single-process store.

Usage: ``python benchmarks/distributed_memory.py [--worlds 2 4] [--rank 20] [--hidden 1000 500]``.

For every world size W it launches ``torchrun --nproc_per_node=W`` on this file, builds a
Bayesian MLP with P latent entries, and collects ``rank + 1`` snapshots (the ring buffer is
full) with :class:`pyro_swag.distributed.DistributedSWAG` in sharded and rank-0 mode; the
peer is one plain process with ``SWAGCollector.collect()``. Per rank it records the bytes of
the moment buffers and the growth of the resident set size (``VmRSS``) from before the first
snapshot to after the last one, and the peak RSS growth (``VmHWM``) of rank 0 during
``swag_guide()``, where the gather assembles the full moments. Prints a markdown table and
writes it to ``docs/results/distributed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def rss(field: str = "VmRSS") -> int:
    """Resident set size (or its peak, ``VmHWM``) of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status; this benchmark needs Linux")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def build(args):
    import pyro

    from pyro_swag import SWAGCollector
    from pyro_swag.models import BayesianMLP

    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianMLP(args.inputs, hidden=tuple(args.hidden), noise=1.0)
    collector = SWAGCollector(model, rank=args.rank, init_loc_fn=model.init_loc_fn())
    x, y = torch.randn(8, args.inputs), torch.randn(8)
    return collector, (x, y)


def snapshots(collector, collect, args) -> int:
    """Collect ``rank + 1`` perturbed points (identical on every rank); RSS growth."""
    g = torch.Generator().manual_seed(1)
    noise = torch.empty_like(collector.loc)  # allocated before measuring: no temporaries
    before = rss()
    for _ in range(args.rank + 1):
        with torch.no_grad():
            collector.loc.add_(torch.randn(noise.shape, generator=g, out=noise), alpha=1e-3)
        collect()
    return rss() - before


def worker(args) -> None:
    import torch.distributed as dist

    from pyro_swag.distributed import DistributedSWAG, close_distributed, init_distributed

    init_distributed()
    shard = args.mode == "sharded"  # one mode per launch: a fresh process measures RSS cleanly
    collector, batch = build(args)
    swag = DistributedSWAG(collector, lambda p: torch.optim.SGD(p, lr=0.0), shard=shard)
    swag.setup(*batch)
    grown = snapshots(collector, swag.collect, args)
    before, peak_ok = rss(), reset_peak()
    guide = swag.swag_guide(dst=0)
    peak = rss("VmHWM") - before if peak_ok and guide is not None else float("nan")
    rows = [
        {
            "mode": args.mode,
            "rank": dist.get_rank(),
            "P": collector.loc.numel(),
            "bytes": swag.memory_bytes(),
            "rss": grown,
            "gather_peak": peak,
        }
    ]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps([r for rs in gathered for r in rs]))
    close_distributed()


def single(args) -> dict:
    collector, batch = build(args)
    collector(*batch)
    grown = snapshots(collector, collector.collect, args)
    m = collector.moments
    nbytes = sum(b.numel() * b.element_size() for b in m.buffers())
    before, peak_ok = rss(), reset_peak()
    guide = collector.swag_guide()
    peak = rss("VmHWM") - before if peak_ok else float("nan")
    del guide
    return {"P": collector.loc.numel(), "bytes": nbytes, "rss": grown, "gather_peak": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--inputs", type=int, default=200)
    p.add_argument("--hidden", type=int, nargs="+", default=[1000, 500])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="sharded", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        return worker(args)
    if args.single:
        Path(args.out).write_text(json.dumps(single(args)))
        return
    common = ["--rank", str(args.rank), "--inputs", str(args.inputs), "--hidden"]
    common += [str(h) for h in args.hidden]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "single.json"
        cmd = [sys.executable, __file__, "--single", "--out", str(out), *common]
        subprocess.run(cmd, check=True, env=env)
        base = json.loads(out.read_text())
        results = {}
        for w in args.worlds:
            results[w] = []
            for mode in ("sharded", "rank 0"):
                out = Path(tmp) / f"w{w}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={w}",
                    __file__,
                    "--worker",
                    "--mode",
                    mode,
                    "--out",
                    str(out),
                    *common,
                ]
                subprocess.run(cmd, check=True, env=env, capture_output=True)
                results[w] += json.loads(out.read_text())
    lines = [
        f"P = {base['P']:,} latent entries, rank K = {args.rank}, float32: the single-process "
        f"store holds (K + 2) P = {base['bytes'] / MiB:.1f} MiB of moments.",
        "",
        "| processes | mode | moments / rank, max (MiB) | RSS growth / rank, max (MiB) "
        "| ratio to 1 process (RSS) | 1/W | peak RSS growth of rank 0 making the guide (MiB) |",
        "|---|---|---|---|---|---|---|",
        f"| 1 | SWAGCollector.collect() | {base['bytes'] / MiB:.1f} | {base['rss'] / MiB:.1f} "
        f"| 1.00 | 1.00 | {base['gather_peak'] / MiB:.1f} |",
    ]
    for w, rows in results.items():
        for mode in ("sharded", "rank 0"):
            rs = [r for r in rows if r["mode"] == mode]
            nbytes, grown = max(r["bytes"] for r in rs), max(r["rss"] for r in rs)
            gather = next(r["gather_peak"] for r in rs if r["rank"] == 0)
            lines.append(
                f"| {w} | {mode} | {nbytes / MiB:.1f} | {grown / MiB:.1f} "
                f"| {grown / base['rss']:.2f} | {1 / w:.2f} | {gather / MiB:.1f} |"
            )
    table = "\n".join(lines)
    print(table)
    dest = ROOT / "docs" / "results" / "distributed.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmdline = "python benchmarks/distributed_memory.py " + " ".join(sys.argv[1:])
    dest.write_text(
        "# Distributed SWAG: memory per rank\n\n"
        f"Written by `{cmdline.strip()}` (CPU, gloo, torch {torch.__version__}).\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
