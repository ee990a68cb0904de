"""Calibrated SWAG on a small BNN: suggested SWA learning rate, then the scale three ways.

    python examples/calibration.py            # diabetes (scikit-learn), 1x50 BNN
    python examples/calibration.py --smoke    # tiny sizes, < 20 s

Trains a SWAG posterior with ``fit`` at the learning rate of :func:`pyro_swag.lr.
suggest_swa_lr`, then chooses ``guide.scale`` by validation log-likelihood, by the ELBO and
by PSIS, printing each curve, the test log-likelihood at each chosen scale, and writing a
plot of the curves (``--plot``).
"""

from __future__ import annotations

import argparse
import math

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_swag import SWAGCollector
from pyro_swag.calibrate import calibrate
from pyro_swag.data import load_dataset
from pyro_swag.lr import suggest_swa_lr
from pyro_swag.models import BayesianMLP
from pyro_swag.predictive import log_likelihood, sample_latents, unpack_latents
from pyro_swag.train import fit


def test_ll(model, guide, x, y, y_std, num_samples=200) -> float:
    samples = unpack_latents(guide, sample_latents(guide, num_samples))
    ll = log_likelihood(model, samples, x, y)["obs"]
    return float((ll.logsumexp(0) - math.log(num_samples)).mean()) - math.log(y_std)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    p.add_argument("--plot", default=None, help="write the three curves to this PNG")
    args = p.parse_args()
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    pretrain, epochs, batch = (300, 8, 32) if args.smoke else (4000, 100, 32)

    data = load_dataset("diabetes", split=0)
    n_val = data.x_train.shape[0] // 10
    x, y = data.x_train[n_val:], data.y_train[n_val:]
    xv, yv = data.x_train[:n_val], data.y_train[:n_val]
    n = x.shape[0]
    model = BayesianMLP(x.shape[1], 1, (50,))
    collector = SWAGCollector(model, rank=20, init_loc_fn=model.init_loc_fn())

    # pre-train (per-datum loss, Adam), then ask for the SWA learning rate at that point
    svi = SVI(
        pyro.poutine.scale(model, 1 / n),
        pyro.poutine.scale(collector, 1 / n),
        pyro.optim.Adam({"lr": 0.01}),
        Trace_ELBO(),
    )
    for _ in range(pretrain):
        idx = torch.randperm(n)[:batch]
        svi.step(x[idx], y[idx], num_data=n)
    epoch = [(x[i], y[i]) for i in torch.randperm(n).split(batch)]
    lr = suggest_swa_lr(model, collector, epoch, num_data=n, momentum=0.9, per_datum=True)
    print(f"suggested SWA learning rate (per datum, momentum 0.9): {lr:.4g}")
    guide, _ = fit(
        model,
        collector,
        (x, y),
        epochs=epochs,
        swa_start=0,
        swa_lr=lr,
        batch_size=batch,
        swa_momentum=0.9,
        quiet=True,
    )
    print(f"scale 1: test LL {test_ll(model, guide, data.x_test, data.y_test, data.y_std):.3f}")

    curves = {}
    for method in ("validation", "elbo", "psis"):
        guide.scale = 1.0
        held = (xv, yv) if method == "validation" else (x, y)
        res = calibrate(model, guide, *held, method=method, num_samples=50 if args.smoke else 200)
        curves[method] = res
        ll = test_ll(model, guide, data.x_test, data.y_test, data.y_std)
        curve = ", ".join(f"{s:.3g}:{v:.3g}" for s, v in zip(res.scales, res.curve[res.criterion]))
        print(f"{method}: chosen scale {res.scale:.3g}, test LL {ll:.3f}")
        print(f"  {res.criterion} over scale: {curve}")
    print("guide.calibration records:", sorted(guide.calibration))

    if args.plot:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for ax, res in zip(axes, curves.values()):
            res.plot(ax=ax)  # Calibration.plot: the curve, the chosen scale marked
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
