"""Benchmark: vectorized ``pyro_swag.predictive`` vs sequential Pyro ``Predictive`` vs a
load-parameters-then-forward loop (the reference SWAG implementation's way).

S posterior draws of a SWAG guide on BayesianMLP(8 -> hidden -> 1) BNNs, N inputs. All
methods run in the same process with the same number of torch threads, repeats interleaved
(ours, Predictive, loop, forward_draws, ours, ...) so that they share the machine's load;
best of ``--repeats``; ratios are relative to ours. Run once with 1 thread and once with
torch's default thread count. With 1 thread the CPU time of the process is reported too
(insensitive to other jobs on a shared machine). Peak memory against ``chunk_size`` is
measured in fresh subprocesses (peak resident set size above the level just before the
call, /proc VmHWM).

Run: ``python benchmarks/predictive.py`` (writes docs/results/predictive.md);
``python benchmarks/predictive_cuda.py`` for the same comparisons on a GPU;
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
CONFIGS = [((50,), "tanh"), ((50, 50), "tanh"), ((50,), "relu"), ((50, 50), "relu")]


def make(hidden, activation, n, rank=10, snapshots=12, seed=0, device="cpu"):
    """BNN, inputs and a SWAG guide (snapshots scattered around the fan-in init)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = BayesianMLP(8, hidden=hidden, activation=activation, noise=None).to(device)
    x, y = torch.randn(n, 8, device=device), torch.randn(n, device=device)
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


def _sync(device) -> None:
    """Wait for queued CUDA work, so that wall times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: dict, device="cpu") -> tuple[dict, dict]:
    """Best wall and process-CPU seconds per function, repeats interleaved."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm up
    _sync(device)
    for r in range(max(repeats.values())):
        for k, f in fns.items():
            if r >= repeats[k]:
                continue
            w, c = time.perf_counter(), time.process_time()
            f()
            _sync(device)
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - w)
    return {k: min(v) for k, v in wall.items()}, {k: min(v) for k, v in cpu.items()}


def time_config(hidden, activation, num, n, repeats, check=True, device="cpu") -> dict:
    model, x, guide = make(hidden, activation, n, device=device)
    net = plain_net(hidden, activation).to(device)
    fns = {
        "ours": lambda: predictive(model, guide, x, num_samples=num),
        "seq": lambda: Predictive(model, guide=guide, num_samples=num)(x),
        "loop": lambda: loop_forward(guide, net, x, num),
        "fwd": lambda: vectorized_forward(guide, net, x, num),
    }
    reps = {**dict.fromkeys(fns, repeats), "seq": max(1, repeats - 1)}
    wall, cpu = interleaved(fns, reps, device)
    name = f"{len(hidden)}x{hidden[0]} {activation}"
    row = dict(model=name, threads=torch.get_num_threads(), **wall)
    row.update({f"cpu_{k}": v for k, v in cpu.items()})
    if not check:
        return row
    pyro.set_rng_seed(2)
    v = vectorized_forward(guide, net, x, num)
    pyro.set_rng_seed(2)
    row["fwd_diff"] = (v - loop_forward(guide, net, x, num)).abs().max().item()
    try:  # S != N, else a wrong broadcast of the draws against the data can pass unnoticed
        Predictive(model, guide=guide, num_samples=num + (num == n), parallel=True)(x)
        row["par"] = "runs"
    except (RuntimeError, ValueError) as err:
        row["par"] = "fails: " + str(err).splitlines()[0][:40]
    # same seed, same guide draws -> same predictive draws as the sequential path
    pyro.set_rng_seed(1)
    a = predictive(model, guide, x, num_samples=num)
    pyro.set_rng_seed(1)
    b = predictive(model, guide, x, num_samples=num, parallel=False)
    row["diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
    return row


def floor_row(hidden, activation, num, n, repeats) -> dict:
    """CPU time of the bare arithmetic of S draws at once (1 thread), op by op, no Pyro.

    The operations ``BayesianMLP.net`` performs for all draws under ``vmap`` (first layer one
    matmul, hidden layers batched matmuls, in-place bias and activation), plus the
    observation noise (``loc + eps * scale``). No implementation of the same arithmetic can
    beat the sum; ``sequential Predictive / sum`` bounds the ratio on this CPU.
    """
    sizes = [8, *hidden, 1]
    ws = [torch.randn(num, b, a) / a**0.5 for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(num, b, 1) for b in sizes[1:]]
    x = torch.randn(n, 8)
    ops: dict[str, list[float]] = {}

    def timed(name, fn, *tensors):
        start = time.process_time()
        out = fn(*tensors)
        ops.setdefault(name, []).append(time.process_time() - start)
        return out

    def run():
        h = x.T
        for i, (w, b) in enumerate(zip(ws, bs)):
            last = i == len(ws) - 1
            tag = "out" if last else f"h{i + 1}"
            if i == 0:
                z = timed(
                    f"{tag} matmul", lambda a, c: (a.reshape(-1, 8) @ c).reshape(num, -1, n), w, h
                )
            else:
                z = timed(f"{tag} matmul", torch.bmm, w, h)
            z = timed(f"{tag} bias", torch.Tensor.add_, z, b)
            if not last and activation == "tanh":
                h = timed(f"{tag} tanh", lambda a: a.sigmoid_().sub_(0.5), z)
            elif not last:
                h = timed(f"{tag} relu", torch.Tensor.relu_, z)
        eps = timed("noise draws", torch.randn, num, n)
        timed("loc + eps * scale", lambda a, e: a[:, 0] + e * 0.1, z, eps)

    for _ in range(repeats + 1):
        run()
    best = {k: min(v[1:]) for k, v in ops.items()}
    return dict(model=f"{len(hidden)}x{hidden[0]} {activation}", ops=best, total=sum(best.values()))


def timing_rows(num, n, repeats, configs, threads, check=True, device="cpu"):
    torch.set_num_threads(threads)
    rows = []
    for hidden, activation in configs:
        rows.append(time_config(hidden, activation, num, n, repeats, check, device))
        print(json.dumps(rows[-1]), flush=True)
    torch.set_num_threads(1)
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


def _header(cpu: bool, check: bool) -> list[str]:
    cols = ["model", "ours", "sequential Predictive", "loop", "forward_draws", "Predictive / ours"]
    cols += ["Predictive / ours, CPU time"] if cpu else []
    cols += ["loop / ours", "loop / forward_draws"]
    cols += ["max abs diff ours vs sequential", "Predictive(parallel=True)"] if check else []
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _row(r: dict, cpu: bool, check: bool) -> str:
    cells = [
        r["model"],
        *(f"{1e3 * r[k]:.1f}" for k in ("ours", "seq", "loop", "fwd")),
        f"**{r['seq'] / r['ours']:.1f}x**",
    ]
    cells += [f"{r['cpu_seq'] / r['cpu_ours']:.1f}x"] if cpu else []
    cells += [f"{r['loop'] / r['ours']:.2f}x", f"{r['loop'] / r['fwd']:.2f}x"]
    cells += [f"{r['diff']:.1e}", r["par"]] if check else []
    return "| " + " | ".join(cells) + " |"


def _table(rows, cpu, check) -> list[str]:
    return [*_header(cpu, check), *[_row(r, cpu, check) for r in rows]]


def table(runs, mem, num, n, mem_num, small, load, floors=(), device="cpu"):
    cuda = torch.device(device).type == "cuda"
    where = (
        f"{torch.cuda.get_device_name(device)} (CUDA; wall times after synchronising)"
        if cuda
        else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores shared with other jobs"
    )
    lines = [
        "# Predictive benchmark (generated by `python benchmarks/"
        + (f"predictive_cuda.py --device {device}`)" if cuda else "predictive.py`)"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {where} (load average {load[0]:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, "
        f"pyro {pyro.__version__}.",
        "",
        f"S = {num} draws of a SWAG guide (rank 10), BayesianMLP 8 -> hidden -> 1 with learned "
        f"noise precision, N = {n} inputs. Wall time in ms, best of repeats interleaved "
        "between the methods; every method runs with the same number of torch threads. "
        "`loop` draws the S vectors, then per draw writes one into a plain `nn.Sequential`'s "
        "parameters and runs forward (network outputs only, no observation noise drawn); "
        "`forward_draws` computes the same S network outputs vectorized (torch-module route; "
        "max abs diff to the loop printed by the script). `ours` = `predictive(model, guide, "
        "x, num_samples=S)`: guide draws, the model vmapped over draws, observation noise "
        "drawn per draw as Pyro does. The CPU-time ratio (1 thread only) uses the process's "
        "CPU time, which other jobs on the machine do not inflate.",
    ]
    for threads, rows in runs:
        cpu = threads == 1 and not cuda
        label = "CUDA" if cuda else f"{threads} thread{'s' if threads > 1 else ''}"
        lines += ["", f"**{label}**:", ""]
        lines += _table(rows, cpu, cpu or cuda)
    if floors:
        seq = {r["model"]: r["cpu_seq"] for r in runs[0][1]}
        lines += [
            "",
            "Where the time goes: CPU time (ms, 1 thread, best of repeats) of the bare "
            "arithmetic for all S draws at once, op by op, without Pyro (what `ours` computes "
            "inside `vmap`); sequential `Predictive`'s CPU time divided by their sum is the "
            "largest ratio any implementation of this arithmetic can reach on this CPU:",
            "",
            "| model | first layer matmul (K = 8) | hidden-layer matmuls | bias adds "
            "| activations | output layer | observation noise | sum | Predictive CPU / sum |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for f in floors:
            parts = [0.0] * 6
            for k, v in f["ops"].items():
                if k.startswith("out"):
                    parts[4] += v
                elif "noise" in k or "eps" in k:
                    parts[5] += v
                elif k == "h1 matmul":
                    parts[0] += v
                elif k.endswith("matmul"):
                    parts[1] += v
                elif k.endswith("bias"):
                    parts[2] += v
                else:
                    parts[3] += v
            cells = " | ".join(f"{1e3 * v:.1f}" for v in parts)
            lines.append(
                f"| {f['model']} | {cells} | {1e3 * f['total']:.1f} | "
                f"{seq[f['model']] / f['total']:.1f}x |"
            )
    if small:
        lines += [
            "",
            "Context, same S, N = 100 inputs (less arithmetic per draw)"
            + ("" if cuda else ", 1 thread")
            + ":",
            "",
        ]
        lines += _table(small, not cuda, True)
    peak = (
        "peak CUDA memory allocated above the level before the call"
        if cuda
        else "1 thread; peak resident memory above the level before the call, fresh process each"
    )
    lines += [
        "",
        f"Peak memory of one call against `chunk_size` (S = {mem_num}, N = {n}, 1x50 tanh, "
        f"{peak}):",
        "",
        "| chunk_size | peak MiB | wall ms |",
        "|---|---|---|",
    ]
    for r in mem:
        lines.append(f"| {r['chunk']} | {r['peak_mib']:.1f} | {1e3 * r['wall']:.0f} |")
    return "\n".join(lines) + "\n"


def parser_for(doc: str, out: Path) -> argparse.ArgumentParser:
    """The options this benchmark and ``predictive_cuda.py`` share."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, write nothing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", default=str(out), help="where to write the table")
    return parser


def main() -> None:
    parser = parser_for(__doc__, OUT)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if args.memory_child is not None:
        chunk = None if args.memory_child == "none" else int(args.memory_child)
        return memory_child(args.num, args.n, chunk)
    load = os.getloadavg()
    if args.quick:
        runs = [(t, timing_rows(10, 100, 1, [((50,), "tanh")], t)) for t in (1, default_threads)]
        mem = memory_rows(50, 100, [None, 10])
        floors = [floor_row((50,), "tanh", 10, 100, 1)]
        print(table(runs, mem, 10, 100, 50, (), load, floors))
        return
    runs = [(1, timing_rows(args.num, args.n, args.repeats, CONFIGS, 1))]
    if default_threads > 1:
        rows = timing_rows(args.num, args.n, args.repeats, CONFIGS, default_threads, check=False)
        runs.append((default_threads, rows))
    torch.set_num_threads(1)
    floors = [floor_row(h, a, args.num, args.n, 3 * args.repeats) for h, a in CONFIGS]
    print(json.dumps(floors), flush=True)
    small = timing_rows(args.num, 100, args.repeats, CONFIGS[:2], 1)  # Pyro-overhead regime
    mem_num = 10 * args.num
    mem = memory_rows(mem_num, args.n, [None, 250, 50, 10])
    write(table(runs, mem, args.num, args.n, mem_num, small, load, floors), args.out)


def write(text: str, path) -> None:
    print(text)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
