"""SWAG in two objects: a collector that SGD moves, and the frozen posterior guide.

Fits a 1x50 Bayesian neural net to scikit-learn's diabetes data: Adam pre-training, then
constant-rate SGD while the collector records one snapshot per epoch; the SWAG guide then
feeds ``pyro.infer.Predictive``. Run ``python examples/swag_basics.py`` (``--smoke``: tiny).
"""

from __future__ import annotations

import argparse

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

from pyro_swag import SWAGCollector
from pyro_swag.models import BayesianMLP


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few epochs, for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pretrain, swa_epochs = (2, 3) if args.smoke else (300, 50)

    pyro.set_rng_seed(args.seed)
    X, y = load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=args.seed)
    mu, sd, ym, ys = Xtr.mean(0), Xtr.std(0), ytr.mean(), ytr.std()
    xtr, xte = (torch.tensor((a - mu) / sd, dtype=torch.float32) for a in (Xtr, Xte))
    ytr_t = torch.tensor((ytr - ym) / ys, dtype=torch.float32)
    n, batch = len(xtr), 32

    model = BayesianMLP(xtr.shape[1], hidden=(50,))
    collector = SWAGCollector(model, rank=20, init_loc_fn=model.init_loc_fn())

    def epoch(svi: SVI) -> float:
        perm, loss = torch.randperm(n), 0.0
        for idx in perm.split(batch):
            loss += svi.step(xtr[idx], ytr_t[idx], num_data=n)
        return loss / n

    svi = SVI(model, collector, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(pretrain):
        epoch(svi)
    swa = SVI(model, collector, pyro.optim.SGD({"lr": 1e-4, "momentum": 0.9}), Trace_ELBO())
    for _ in range(swa_epochs):
        epoch(swa)
        collector.collect()

    guide = collector.swag_guide()
    print(
        f"snapshots: {collector.num_snapshots}, latent size P = {guide.loc.numel()}, "
        f"rank K' = {guide.rank}"
    )
    q = guide.quantiles([0.05, 0.5, 0.95])
    noise = q["precision"].rsqrt() * ys
    print(
        f"noise sd (original units): median {noise[1]:.1f}, 90% interval "
        f"[{noise[2]:.1f}, {noise[0]:.1f}]"
    )

    samples = Predictive(model, guide=guide, num_samples=100, return_sites=["obs"])(xte)
    draws = samples["obs"] * ys + ym  # (S, N_test) in original units
    mean = draws.mean(0)
    yte_t = torch.tensor(yte, dtype=torch.float32)
    rmse = float((mean - yte_t).pow(2).mean().sqrt())
    lo, hi = draws.quantile(0.05, 0), draws.quantile(0.95, 0)
    coverage = float(((yte_t >= lo) & (yte_t <= hi)).float().mean())
    print(f"test RMSE {rmse:.1f}, 90% predictive-interval coverage {coverage:.2f}")
    return {"rmse": rmse, "coverage": coverage}


if __name__ == "__main__":
    main()
