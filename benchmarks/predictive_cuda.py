"""Benchmark :mod:`predictive` on a GPU: vectorized ``pyro_swag.predictive`` vs sequential
Pyro ``Predictive`` vs the load-parameters-then-forward loop, the same nets and sizes as the
CPU run; wall times after ``torch.cuda.synchronize``, peak memory against ``chunk_size`` from
``torch.cuda.max_memory_allocated``. No thread counts and no CPU arithmetic floor.

Run: ``python benchmarks/predictive_cuda.py`` (writes docs/results/predictive_cuda.md);
``--quick`` for a small smoke run that writes nothing.
"""

from __future__ import annotations

import json
import os
import time

import torch
from predictive import CONFIGS, ROOT, _sync, make, parser_for, table, timing_rows, write

from pyro_swag.predictive import predictive

OUT = ROOT / "docs" / "results" / "predictive_cuda.md"


def memory_rows_cuda(num, n, chunks, device):
    """Peak CUDA memory allocated (MiB) above the level before one predictive call."""
    model, x, guide = make((50,), "tanh", n, device=device)
    predictive(model, guide, x, num_samples=2, chunk_size=1)  # warm up code paths
    rows = []
    for chunk in chunks:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        predictive(model, guide, x, num_samples=num, chunk_size=chunk)
        _sync(device)
        wall = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        rows.append({"chunk": "none" if chunk is None else chunk, "peak_mib": peak, "wall": wall})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = parser_for(__doc__, OUT)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:i")
    args = parser.parse_args()
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    load, dev = os.getloadavg(), args.device
    num, n, reps = (10, 100, 1) if args.quick else (args.num, args.n, args.repeats)
    runs = [(1, timing_rows(num, n, reps, CONFIGS[: 4 - 3 * args.quick], 1, device=dev))]
    small = timing_rows(num, 100, reps, CONFIGS[:2], 1, device=dev)
    mem = memory_rows_cuda(10 * num, n, [None, 250, 50, 10], dev)
    text = table(runs, mem, num, n, 10 * num, small, load, device=dev)
    if args.quick:
        return print(text)
    write(text, args.out)


if __name__ == "__main__":
    main()
