"""Cost of one SWAG snapshot: pyro_swag's moments against a concatenate-and-slice store.

For each parameter count P and rank K, three stores run in separate processes (so that
peak memory is each one's own):

* ``pyro_swag`` — :class:`pyro_swag.SWAGMoments` (Welford update, preallocated ring buffer);
* ``concat`` — the reference implementation's way: running mean and mean of squares
  rebuilt out of place, and the deviation matrix grown with ``torch.cat`` and sliced;
* ``floor`` — a plain copy of 3·P floats, the memory traffic no snapshot can avoid
  (read θ, μ and the second moment; write μ, the second moment and one deviation row).

Seconds per snapshot are the median over steady-state snapshots (after the buffer is full).
Peak memory is the process's peak resident size above what it held before the store
was created. Run ``python benchmarks/collect.py`` (``--quick`` for a smoke run); the table is
printed and written to ``docs/results/collect.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class ConcatStore:
    """The reference implementation's update, reduced to one flat tensor."""

    def __init__(self, rank: int) -> None:
        self.rank, self.n = rank, 0
        self.mean = self.sq_mean = self.cov_mat_sqrt = None

    def update(self, theta: torch.Tensor) -> None:
        if self.mean is None:
            self.mean = torch.zeros_like(theta)
            self.sq_mean = torch.zeros_like(theta)
            self.cov_mat_sqrt = theta.new_empty(0, theta.numel())
        n = self.n
        self.mean = self.mean * n / (n + 1.0) + theta / (n + 1.0)
        self.sq_mean = self.sq_mean * n / (n + 1.0) + theta**2 / (n + 1.0)
        dev = (theta - self.mean).view(1, -1)
        self.cov_mat_sqrt = torch.cat((self.cov_mat_sqrt, dev), dim=0)
        if n + 1 > self.rank:
            self.cov_mat_sqrt = self.cov_mat_sqrt[1:, :]
        self.n += 1


class CopyFloor:
    """A plain copy of 3·P floats: the traffic floor of one snapshot."""

    def __init__(self, rank: int) -> None:
        self.src = self.dst = None

    def update(self, theta: torch.Tensor) -> None:
        if self.src is None:
            self.src = torch.randn(3 * theta.numel(), dtype=theta.dtype)
            self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(method: str, size: int, rank: int, snapshots: int) -> dict:
    """Time ``snapshots`` steady-state updates of one store (run in a fresh process)."""
    from pyro_swag import SWAGMoments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    theta = torch.randn(size)
    noise = torch.empty(size).normal_(0.0, 1e-3)
    before = _peak_bytes()
    store = {"pyro_swag": SWAGMoments, "concat": ConcatStore, "floor": CopyFloor}[method](rank)
    times = []
    for i in range(rank + 1 + snapshots):
        theta.add_(noise)
        t0 = time.perf_counter()
        store.update(theta)
        if i > rank:
            times.append(time.perf_counter() - t0)
    return {
        "method": method,
        "P": size,
        "rank": rank,
        "sec_per_snapshot": statistics.median(times),
        "peak_bytes": _peak_bytes() - before,
    }


def _child(method: str, size: int, rank: int, snapshots: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(size), str(rank), str(snapshots)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| P | rank | store | ms / snapshot | peak MiB | (rank+2)·P·4 B, MiB | "
        "concat / this (time) | this / floor (time) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["P"], r["method"]): r for r in rows}
    for r in rows:
        conc, flo = by[(r["P"], "concat")], by[(r["P"], "floor")]
        budget = (r["rank"] + 2) * r["P"] * 4 / 2**20
        lines.append(
            f"| {r['P']:,} | {r['rank']} | {r['method']} | {1e3 * r['sec_per_snapshot']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {budget:.0f} | "
            f"{conc['sec_per_snapshot'] / r['sec_per_snapshot']:.1f}x | "
            f"{r['sec_per_snapshot'] / flo['sec_per_snapshot']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--snapshots", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="P=1e5, few snapshots; no docs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "collect.md")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, size, rank, snaps = args.child
        print(json.dumps(run_one(method, int(size), int(rank), int(snaps))))
        return
    if args.quick:
        args.sizes, args.snapshots = [1e5], 3
    rows = []
    for size in args.sizes:
        for method in ("pyro_swag", "concat", "floor"):
            rows.append(_child(method, int(size), args.rank, args.snapshots))
            print(f"  P={int(size):,} {method}: {1e3 * rows[-1]['sec_per_snapshot']:.2f} ms")
    text = table(rows)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = (
            "# Snapshot cost: pyro_swag against concatenate-and-slice\n\n"
            f"Written by `{' '.join(['python', 'benchmarks/collect.py', *(argv or [])])}` "
            "(float32, one thread, CPU; median "
            f"over {args.snapshots} steady-state snapshots; each store in its own process).\n\n"
        )
        args.out.write_text(header + text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
