"""Calibrated SWAG acceptance comparisons; writes docs/results/calibration.md.

Part ``conjugate``: Bayesian linear regression with known noise (exact Gaussian posterior).
SWAG at the suggested learning rate (4000 steps on independent minibatches, a snapshot every
5 steps, rank 10), its
KL(q || p) and per-coefficient sd ratio before and after each calibration, against SVI
AutoLowRankMultivariateNormal (ClippedAdam, lr 0.02 decaying 10x over 4000 steps) run for the
same wall time as SWAG (training + lr suggestion + ELBO calibration). Several seeds.

Part ``bnn``: a 1x50 tanh BNN on a UCI split against NUTS: test log-likelihood per point
(original units) and 90 % predictive-interval coverage, for SWAG at the suggested rate,
raw and calibrated three ways (validation: a second SWAG trained on 90 % of the training
set, scale chosen on the other 10 %).

    python benchmarks/calibration.py                      # both parts
    python benchmarks/calibration.py --part conjugate --seeds 5
    python benchmarks/calibration.py --part bnn --dataset yacht --split 0
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal
from pyro.infer.autoguide.initialization import init_to_value

from pyro_swag import SWAGCollector
from pyro_swag.calibrate import calibrate
from pyro_swag.data import load_uci
from pyro_swag.lr import suggest_swa_lr
from pyro_swag.models import BayesianMLP
from pyro_swag.predictive import log_likelihood, predictive, sample_latents, unpack_latents
from pyro_swag.train import fit

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "calibration.md"
METHODS = ("validation", "elbo", "psis")


# ----------------------------------------------------------------------------- conjugate
def conjugate_problem(seed: int, n: int = 200, d: int = 4, sigma: float = 0.5, rho: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky((1 - rho) * torch.eye(d) + rho * torch.ones(d, d))
    x = torch.randn(n + 100, d, generator=g) @ chol.T
    y = x @ torch.randn(d, generator=g) + sigma * torch.randn(n + 100, generator=g)

    def model(x, y=None, num_data=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Normal(x @ w, sigma), obs=y)

    xt, yt = x[:n], y[:n]
    prec = torch.eye(d) + xt.T @ xt / sigma**2
    cov = torch.linalg.inv(prec)
    post = dist.MultivariateNormal(cov @ xt.T @ yt / sigma**2, cov)
    return model, (xt, yt), (x[n:], y[n:]), post


def kl_to(post, q) -> float:
    q = dist.MultivariateNormal(q.loc, q.covariance_matrix)
    return float(torch.distributions.kl_divergence(q, post))


def sd_ratio(post, q) -> torch.Tensor:
    return q.covariance_matrix.diagonal().sqrt() / post.covariance_matrix.diagonal().sqrt()


def conjugate_seed(seed: int, batch: int = 20, swa_steps: int = 4000) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, (x, y), (xv, yv), post = conjugate_problem(seed)
    n = x.shape[0]

    def minibatch():
        idx = torch.randperm(n)[:batch]
        return x[idx], y[idx]

    start = time.perf_counter()
    collector = SWAGCollector(model, rank=10)
    svi = SVI(model, collector, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(*minibatch(), num_data=n)
    epoch = [(x[i], y[i]) for i in torch.randperm(n).split(batch)]
    lr = suggest_swa_lr(model, collector, epoch, num_data=n)
    svi = SVI(model, collector, pyro.optim.SGD({"lr": lr}), Trace_ELBO())
    for t in range(swa_steps):
        svi.step(*minibatch(), num_data=n)
        if t % 5 == 4:
            collector.collect()
    guide = collector.swag_guide()
    row = {"seed": seed, "lr": lr, "kl_raw": kl_to(post, guide.get_posterior())}
    row["ratio_raw"] = sd_ratio(post, guide.get_posterior())
    for method in METHODS:
        guide.scale = 1.0
        args = (xv, yv) if method == "validation" else (x, y)
        res = calibrate(model, guide, *args, method=method, num_samples=200)
        row[f"scale_{method}"] = res.scale
        row[f"kl_{method}"] = kl_to(post, guide.get_posterior())
        row[f"ratio_{method}"] = sd_ratio(post, guide.get_posterior())
        if method == "elbo":
            row["swag_s"] = time.perf_counter() - start
    # SVI AutoLowRankMultivariateNormal for the same wall time
    pyro.clear_param_store()
    svi_guide = AutoLowRankMultivariateNormal(model)
    # Adam decaying 10x over as many steps as SWAG's SGD phase (then on): a fair schedule
    optim = pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.1 ** (1 / swa_steps)})
    svi = SVI(model, svi_guide, optim, Trace_ELBO())
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < row["swag_s"]:
        svi.step(*minibatch(), num_data=n)
        steps += 1
    with torch.no_grad():
        q = svi_guide.get_posterior()
        row["kl_svi"], row["ratio_svi"], row["svi_steps"] = kl_to(post, q), sd_ratio(post, q), steps
    return row


def conjugate_table(rows: list[dict]) -> str:
    def rng(t):
        return f"{float(t.min()):.2f}–{float(t.max()):.2f}"

    lines = [
        "| seed | SWA lr | KL raw | KL validation (s) | KL ELBO (s) | KL PSIS (s) | KL SVI LowRank "
        "(steps) | sd ratio raw | sd ratio ELBO | sd ratio PSIS | sd ratio SVI | SWAG wall s |",
        "|---" * 12 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['lr']:.2e} | {r['kl_raw']:.3f} | "
            f"{r['kl_validation']:.3f} ({r['scale_validation']:.2g}) | "
            f"{r['kl_elbo']:.3f} ({r['scale_elbo']:.2g}) | {r['kl_psis']:.3f} "
            f"({r['scale_psis']:.2g}) | {r['kl_svi']:.3f} ({r['svi_steps']}) | "
            f"{rng(r['ratio_raw'])} | {rng(r['ratio_elbo'])} | {rng(r['ratio_psis'])} | "
            f"{rng(r['ratio_svi'])} | {r['swag_s']:.1f} |"
        )
    lines.append("")
    k = len(rows)
    for m in ("elbo", "psis", "validation"):
        lower = sum(r[f"kl_{m}"] < r["kl_raw"] for r in rows)
        beats = sum(r[f"kl_{m}"] < r["kl_svi"] for r in rows)
        within = sum(bool(((r[f"ratio_{m}"] - 1).abs() <= 0.25).all()) for r in rows)
        lines.append(
            f"- {m}: KL lower than raw SWAG in {lower}/{k} seeds, lower than SVI LowRank at "
            f"equal wall time in {beats}/{k}, every coefficient sd within ±25 % in {within}/{k}."
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- BNN
def evaluate(model, samples: dict, data) -> dict:
    ll = log_likelihood(model, samples, data.x_test, data.y_test)["obs"]
    lppd = float((ll.logsumexp(0) - math.log(ll.shape[0])).mean()) - math.log(data.y_std)
    y_draws = predictive(model, None, data.x_test, posterior_samples=samples)["obs"]
    lo, hi = torch.quantile(y_draws, torch.tensor([0.05, 0.95]), dim=0)
    cover = float(((data.y_test >= lo) & (data.y_test <= hi)).float().mean())
    return {"ll": lppd, "coverage": cover}


def train_swag(x, y, seed, batch, pretrain_steps, swa_epochs, quiet=True):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    n = x.shape[0]
    model = BayesianMLP(x.shape[1], 1, (50,))
    collector = SWAGCollector(model, rank=20, init_loc_fn=model.init_loc_fn())
    optim = pyro.optim.ClippedAdam(
        {"lr": 0.01, "clip_norm": 10.0, "lrd": 0.1 ** (1 / pretrain_steps)}
    )
    svi = SVI(
        pyro.poutine.scale(model, 1 / n), pyro.poutine.scale(collector, 1 / n), optim, Trace_ELBO()
    )
    start = time.perf_counter()
    for _ in range(pretrain_steps):
        idx = torch.randperm(n)[:batch]
        svi.step(x[idx], y[idx], num_data=n)
    epoch = [(x[i], y[i]) for i in torch.randperm(n).split(batch)]
    lr = suggest_swa_lr(model, collector, epoch, num_data=n, momentum=0.9, per_datum=True)
    with torch.no_grad():
        tau = float(collector(x, y, num_data=n)["precision"])
    guide, _ = fit(
        model,
        collector,
        (x, y),
        epochs=swa_epochs,
        swa_start=0,
        swa_lr=lr,
        batch_size=batch,
        swa_momentum=0.9,
        quiet=quiet,
    )
    return model, collector, guide, {"lr": lr, "lr_tau": lr * tau, "s": time.perf_counter() - start}


def bnn(args) -> str:
    data = load_uci(args.dataset, args.split)
    x, y, n = data.x_train, data.y_train, data.x_train.shape[0]
    rows = []
    model, collector, guide, info = train_swag(
        x, y, 0, args.batch, args.pretrain_steps, args.swa_epochs
    )
    print(f"SWAG: lr={info['lr']:.3g} (lr*tau={info['lr_tau']:.3g}), {info['s']:.0f} s")

    def draws(g):
        return unpack_latents(g, sample_latents(g, args.draws))

    rows.append(("SWAG (scale 1)", 1.0, info["s"], evaluate(model, draws(guide), data)))
    for method in ("elbo", "psis"):
        start = time.perf_counter()
        guide.scale = 1.0
        res = calibrate(model, guide, x, y, method=method, num_samples=200)
        wall = info["s"] + time.perf_counter() - start
        rows.append((f"SWAG + {method}", res.scale, wall, evaluate(model, draws(guide), data)))
    # validation: SWAG on 90 %, scale chosen on the held-out 10 %
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    val, tr = perm[: n // 10], perm[n // 10 :]
    model_v, _, guide_v, info_v = train_swag(
        x[tr], y[tr], 0, args.batch, args.pretrain_steps, args.swa_epochs
    )
    start = time.perf_counter()
    res = calibrate(model_v, guide_v, x[val], y[val], method="validation", num_samples=200)
    rows.append(
        (
            "SWAG(90 %) + validation",
            res.scale,
            info_v["s"] + time.perf_counter() - start,
            evaluate(model_v, draws(guide_v), data),
        )
    )
    # NUTS from the MAP-ish pre-trained point of the full-data SWAG run (its SWA mean)
    pyro.set_rng_seed(0)
    init = {k: v.detach() for k, v in guide.median().items()}
    kernel = NUTS(model, max_tree_depth=args.nuts_depth, init_strategy=init_to_value(values=init))
    mcmc = MCMC(
        kernel, num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup, disable_progbar=True
    )
    start = time.perf_counter()
    mcmc.run(x, y)
    nuts_s = time.perf_counter() - start
    ref = evaluate(model, mcmc.get_samples(), data)
    rows.append(
        (
            f"NUTS ({args.nuts_warmup}+{args.nuts_samples}, depth {args.nuts_depth})",
            None,
            nuts_s,
            ref,
        )
    )
    lines = [
        f"{args.dataset} split {args.split} (N={n}, test {data.x_test.shape[0]}), 1x50 tanh, "
        f"batch {args.batch}, {args.pretrain_steps} Adam pre-training steps, "
        f"{args.swa_epochs} SWA epochs (momentum 0.9, suggested lr {info['lr']:.3g} per datum, "
        f"lr·τ̂ = {info['lr_tau']:.3g}), {args.draws} posterior draws.",
        "",
        "| method | scale | test LL / point | LL − NUTS | 90 % coverage | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, scale, wall, ev in rows:
        sc = "" if scale is None else f"{scale:.3g}"
        lines.append(
            f"| {name} | {sc} | {ev['ll']:.3f} | {ev['ll'] - ref['ll']:+.3f} | "
            f"{ev['coverage']:.3f} | {wall:.0f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output
def write_section(out: Path, name: str, body: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.exists() else "# Calibrated SWAG: acceptance measurements\n"
    block = f"<!-- {name} -->\n{body}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    )
    out.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("conjugate", "bnn", "all"), default="all")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--dataset", default="yacht")
    p.add_argument("--split", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=5000)
    p.add_argument("--swa-epochs", type=int, default=150)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--nuts-warmup", type=int, default=250)
    p.add_argument("--nuts-samples", type=int, default=250)
    p.add_argument("--nuts-depth", type=int, default=8)
    p.add_argument("--out", type=Path, default=OUT, help="markdown file to update")
    args = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    env = (
        f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} thread, "
        f"{os.cpu_count()} CPUs at load average {load:.1f} when started"
    )
    if args.part in ("conjugate", "all"):
        rows = [conjugate_seed(s) for s in range(args.seeds)]
        table = conjugate_table(rows)
        print(table)
        write_section(
            args.out,
            "conjugate",
            "## Conjugate linear regression (N=200, D=4, ρ=0.3)\n\n"
            f"Measured with `python benchmarks/calibration.py --part conjugate` ({env}).\n\n"
            + table,
        )
    if args.part in ("bnn", "all"):
        table = bnn(args)
        print(table)
        write_section(
            args.out,
            "bnn",
            f"## 1x50 BNN against NUTS\n\nMeasured with `python "
            f"benchmarks/calibration.py --part bnn` ({env}).\n\n" + table,
        )


if __name__ == "__main__":
    main()
