"""SWAG for a plain torch MLP with BatchNorm on scikit-learn digits, via ``ModuleSWAG``.

A user's own training loop (SGD with momentum) trains the network; from ``swa_start`` on it
runs at a high constant learning rate and ``ModuleSWAG.collect()`` records one snapshot per
epoch. The script compares, on the test set, the final SGD network, SWAG (30 draws,
BatchNorm statistics re-estimated per draw) and SWAG *without* the BatchNorm refresh, and
the same through the Pyro route (``to_pyro`` + ``Predictive``), with BatchNorm statistics of
the SWA mean or re-estimated per draw (``bn_per_draw=True``).

    python examples/digits_batchnorm.py
    python examples/digits_batchnorm.py --smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_swag.data import load_dataset
from pyro_swag.module import ModuleSWAG


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top label, ``bins`` equal-width confidence bins."""
    conf, pred = probs.max(-1)
    hit = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.float().mean().item() * (hit[m].mean() - conf[m].mean()).abs().item()
    return total


def metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test NLL, accuracy and ECE of class probabilities ``probs`` (N, C)."""
    nll = -probs.clamp_min(1e-12).log().gather(-1, y[:, None]).mean().item()
    acc = (probs.argmax(-1) == y).float().mean().item()
    return {"nll": nll, "acc": acc, "ece": ece(probs, y)}


def make_net(hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def run(seed: int = 0, epochs: int = 60, swa_start: int = 30, lr: float = 0.05,
        swa_lr: float = 0.3, hidden: int = 256, num_samples: int = 30,
        pyro_route: bool = True) -> dict:
    """Train with a plain loop, collect with ModuleSWAG; metrics of each predictor."""
    torch.manual_seed(seed)
    ds = load_dataset("digits", split=seed, test_fraction=0.7)  # 539 train, 1258 test
    x, y, x_test, y_test = ds.x_train, ds.y_train.long(), ds.x_test, ds.y_test.long()
    net = make_net(hidden)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    bn_loader = DataLoader(TensorDataset(x, y), batch_size=256)  # for the BatchNorm refresh
    swag = ModuleSWAG(net, rank=20)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if epoch == swa_start:
            for group in opt.param_groups:
                group["lr"] = swa_lr
        net.train()
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
        if epoch >= swa_start:
            swag.collect()
    out = {"train_seconds": time.perf_counter() - t0}
    net.eval()
    with torch.no_grad():
        out["sgd"] = metrics(net(x_test).softmax(-1), y_test)
    out["swag"] = metrics(
        swag.predict(x_test, num_samples, loader=bn_loader).softmax(-1).mean(0), y_test
    )
    out["swag_no_bn_refresh"] = metrics(
        swag.predict(x_test, num_samples, bn_update=False).softmax(-1).mean(0), y_test
    )
    if pyro_route:
        from pyro.infer import Predictive

        model, guide = swag.to_pyro(prior_scale=1.0, likelihood="categorical", data=bn_loader)
        with torch.no_grad():
            logits = Predictive(model, guide=guide, num_samples=num_samples,
                                return_sites=["_RETURN"])(x_test)["_RETURN"]
        out["pyro_route"] = metrics(logits.softmax(-1).mean(0), y_test)
        model, guide = swag.to_pyro(likelihood="categorical", data=bn_loader, bn_per_draw=True)
        with torch.no_grad():
            logits = Predictive(model, guide=guide, num_samples=num_samples,
                                return_sites=["_RETURN"])(x_test)["_RETURN"]
        out["pyro_route_bn_per_draw"] = metrics(logits.softmax(-1).mean(0), y_test)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run (< 20 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = dict(epochs=4, swa_start=2, hidden=32, num_samples=3) if args.smoke else {}
    result = run(seed=args.seed, **sizes)
    print(f"training took {result['train_seconds']:.1f} s")
    print(f"{'predictor':<22} {'test NLL':>9} {'accuracy':>9} {'ECE':>7}")
    for name in ("sgd", "swag", "swag_no_bn_refresh", "pyro_route", "pyro_route_bn_per_draw"):
        m = result[name]
        print(f"{name:<22} {m['nll']:>9.4f} {m['acc']:>9.4f} {m['ece']:>7.4f}")


if __name__ == "__main__":
    main()
