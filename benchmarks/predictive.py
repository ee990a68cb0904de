"""Benchmark: vectorized ``pyro_swag.predictive`` vs sequential Pyro ``Predictive`` vs a
load-parameters-then-forward loop (the reference SWAG implementation's way).

S posterior draws of a SWAG guide on BayesianMLP(8 -> hidden -> 1) BNNs, N inputs. All
three methods run in the same process, one thread, best of ``--repeats``; ratios are
relative to ours. Peak memory against ``chunk_size`` is measured in fresh subprocesses
(peak resident set size above the level just before the call, /proc VmHWM).

Run: ``python benchmarks/predictive.py`` (writes docs/results/predictive.md);
``--quick`` for a small smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyro
import torch
from pyro.infer import Predictive
from torch import nn
from torch.nn.utils import vector_to_parameters

from pyro_swag import SWAGCollector
from pyro_swag.models import BayesianMLP
from pyro_swag.predictive import forward_draws, predictive

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "predictive.md"


def make(hidden, activation, n, rank=10, snapshots=12, seed=0):
    """BNN, inputs and a SWAG guide (snapshots scattered around the fan-in init)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = BayesianMLP(8, hidden=hidden, activation=activation, noise=None)
    x, y = torch.randn(n, 8), torch.randn(n)
    collector = SWAGCollector(model, rank=rank, init_loc_fn=model.init_loc_fn())
    collector(x, y)
    for _ in range(snapshots):
        collector.collect(collector.loc.detach() + 0.01 * torch.randn_like(collector.loc))
    return model, x, collector.swag_guide()


def plain_net(hidden, activation):
    sizes = [8, *hidden, 1]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh() if activation == "tanh" else nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def loop_forward(guide, net, x, num):
    """Draw S vectors, then for each: write it into the net's parameters and run forward."""
    with torch.no_grad():
        thetas = guide.get_posterior().sample((num,))
        params = list(net.parameters())
        size = sum(p.numel() for p in params)  # weights/biases first; "precision" is last
        return torch.stack([(vector_to_parameters(t[:size], params), net(x))[1] for t in thetas])


def vectorized_forward(guide, net, x, num):
    """The same per-draw networks through ``forward_draws`` (torch-module route, vmapped)."""
    with torch.no_grad():
        thetas = guide.get_posterior().sample((num,))
    params, i = {}, 0
    for name, p in net.named_parameters():
        params[name] = thetas[:, i : i + p.numel()].reshape(num, *p.shape)
        i += p.numel()
    return forward_draws(net, params, x)


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_config(hidden, activation, num, n, repeats) -> dict:
    model, x, guide = make(hidden, activation, n)
    net = plain_net(hidden, activation)
    ours = best(lambda: predictive(model, guide, x, num_samples=num), repeats)
    seq = best(lambda: Predictive(model, guide=guide, num_samples=num)(x), max(1, repeats - 1))
    loop = best(lambda: loop_forward(guide, net, x, num), repeats)
    fwd = best(lambda: vectorized_forward(guide, net, x, num), repeats)
    pyro.set_rng_seed(2)
    v = vectorized_forward(guide, net, x, num)
    pyro.set_rng_seed(2)
    fwd_diff = (v - loop_forward(guide, net, x, num)).abs().max().item()
    try:
        Predictive(model, guide=guide, num_samples=num, parallel=True)(x)
        par = "runs"
    except RuntimeError as err:
        par = "fails: " + str(err).splitlines()[0][:40]
    # same seed, same guide draws -> same predictive draws as the sequential path
    pyro.set_rng_seed(1)
    a = predictive(model, guide, x, num_samples=num)
    pyro.set_rng_seed(1)
    b = predictive(model, guide, x, num_samples=num, parallel=False)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    name = f"{len(hidden)}x{hidden[0]} {activation}"
    return dict(
        model=name, ours=ours, seq=seq, loop=loop, fwd=fwd, par=par, diff=diff, fwd_diff=fwd_diff
    )


def timing_rows(num, n, repeats, configs):
    rows = []
    for hidden, activation in configs:
        rows.append(time_config(hidden, activation, num, n, repeats))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_child(num, n, chunk):
    """Run in a subprocess: peak RSS increase (MiB) of one predictive call."""
    torch.set_num_threads(1)
    model, x, guide = make((50,), "tanh", n)
    predictive(model, guide, x, num_samples=2, chunk_size=1)  # warm up code paths
    Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM peak
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    before = int(status["VmRSS"].split()[0])
    start = time.perf_counter()
    predictive(model, guide, x, num_samples=num, chunk_size=chunk)
    wall = time.perf_counter() - start
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    peak = int(status["VmHWM"].split()[0])
    print(json.dumps({"chunk": chunk, "peak_mib": (peak - before) / 1024, "wall": wall}))


def memory_rows(num, n, chunks):
    rows = []
    for chunk in chunks:
        arg = "none" if chunk is None else str(chunk)
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", arg, "--num", str(num), "--n", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


HEADER = [
    "| model | ours | sequential Predictive | loop | forward_draws | Predictive / ours "
    "| loop / ours | loop / forward_draws | max abs diff ours vs sequential "
    "| Predictive(parallel=True) |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def _row(r: dict) -> str:
    return (
        f"| {r['model']} | {1e3 * r['ours']:.1f} | {1e3 * r['seq']:.1f} | "
        f"{1e3 * r['loop']:.1f} | {1e3 * r['fwd']:.1f} | {r['seq'] / r['ours']:.1f}x "
        f"| {r['loop'] / r['ours']:.2f}x | {r['loop'] / r['fwd']:.2f}x | {r['diff']:.1e} "
        f"| {r['par']} |"
    )


def table(rows, mem, num, n, mem_num, small=()):
    load = os.getloadavg()
    lines = [
        "# Predictive benchmark (generated by `python benchmarks/predictive.py`)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'CPU'}, "
        f"{os.cpu_count()} cores shared with other jobs (load average {load[0]:.1f} at the end), "
        f"torch {torch.__version__}, pyro {pyro.__version__}, 1 thread.",
        "",
        f"S = {num} draws of a SWAG guide (rank 10), BayesianMLP 8 -> hidden -> 1 with learned "
        f"noise precision, N = {n} inputs. Best of repeats, wall time in ms. `loop` draws the S "
        "vectors, then per draw writes one into a plain `nn.Sequential`'s parameters and runs "
        "forward (network outputs only, no observation noise drawn); `forward_draws` computes the "
        "same S network outputs vectorized (torch-module route; max abs diff to the loop "
        "printed by the script). `ours` = `predictive(model, guide, x, num_samples=S)`: guide "
        "draws, the model vmapped over draws, observation noise drawn per draw as Pyro does.",
        "",
        *HEADER,
        *[_row(r) for r in rows],
    ]
    if small:
        lines += ["", "Context, same S, N = 100 inputs (less arithmetic per draw):", ""]
        lines += [*HEADER, *[_row(r) for r in small]]
    lines += [
        "",
        f"Peak memory of one call against `chunk_size` (S = {mem_num}, N = {n}, 1x50 tanh; "
        "peak resident memory above the level before the call, fresh process each):",
        "",
        "| chunk_size | peak MiB | wall ms |",
        "|---|---|---|",
    ]
    for r in mem:
        lines.append(f"| {r['chunk']} | {r['peak_mib']:.1f} | {1e3 * r['wall']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, write nothing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child is not None:
        chunk = None if args.memory_child == "none" else int(args.memory_child)
        return memory_child(args.num, args.n, chunk)
    if args.quick:
        rows = timing_rows(10, 100, 1, [((50,), "tanh")])
        mem = memory_rows(50, 100, [None, 10])
        print(table(rows, mem, 10, 100, 50))
        return
    configs = [((50,), "tanh"), ((50, 50), "tanh"), ((50,), "relu"), ((50, 50), "relu")]
    rows = timing_rows(args.num, args.n, args.repeats, configs)
    small = timing_rows(args.num, 100, args.repeats, configs[:2])  # context: Pyro-overhead regime
    mem_num = 10 * args.num
    mem = memory_rows(mem_num, args.n, [None, 250, 50, 10])
    text = table(rows, mem, args.num, args.n, mem_num, small)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
