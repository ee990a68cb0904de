"""A noise sd that grows with the input: SWAG on a heteroscedastic Bayesian network.

Data: x uniform on [-2, 2], y = sin(2x) + (0.05 + 0.3 |x|) eps, so the noise sd grows from
0.05 to 0.65. Two 1x50 tanh ``BayesianMLP`` s, one with a single learned noise precision and
one with ``noise="heteroscedastic"`` (a second output gives sigma(x)), each trained by
:func:`pyro_swag.compare.compare`'s SWAG (Adam to the MAP, then the SWA phase); the script
prints test log-likelihood, RMSE and the SWAG predictive sd against the true noise sd in
bins of |x|.

Second part: y = exp(2.5 x) (1 + 0.05 eps) on [-1, 1], standardised, where the noise grows
with y itself (the shape of UCI yacht). The heteroscedastic network's plain fit may give the
large-y points a large sigma(x) instead of fitting them; pre-training on beta-NLL
(``pretrain_beta=0.5``) keeps them pulling the mean. Printed: test LL and RMSE of both.
Run ``python examples/heteroscedastic.py`` (``--smoke``: tiny sizes).
"""

from __future__ import annotations

import argparse

import pyro
import torch

from pyro_swag.compare import CompareConfig, make_model
from pyro_swag.compare_methods import run_method
from pyro_swag.compare_metrics import pointwise, scores
from pyro_swag.data import Dataset

BINS = (0.0, 0.5, 1.0, 1.5, 2.0)


def noisy_sine(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(n, 1, generator=g) - 2
    noise_sd = 0.05 + 0.3 * x[:, 0].abs()
    return x, torch.sin(2 * x[:, 0]) + noise_sd * torch.randn(n, generator=g)


def exponential(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, 1, generator=g) - 1
    f = torch.exp(2.5 * x[:, 0])
    return x, f * (1 + 0.05 * torch.randn(n, generator=g))


def fit(data: Dataset, cfg: CompareConfig) -> tuple[dict, dict]:
    """SWAG on ``data`` with ``cfg``: the test scores and per-draw terms."""
    pyro.set_rng_seed(cfg.seed)
    model = make_model(data, cfg.hidden, cfg.seed, cfg.heteroscedastic)
    res = run_method("swag", model, None, data, cfg, {}, quiet=True)
    terms = pointwise(model, res.draws, data.x_test, data.y_test, "gaussian")
    return scores(terms, data, data.y_test), terms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n, steps, snapshots = (200, 300, 5) if args.smoke else (1000, 3000, 50)
    x, y = noisy_sine(n, args.seed)
    x_test, y_test = noisy_sine(n, args.seed + 1)
    data = Dataset("noisy_sine", "gaussian", x, y, x_test, y_test, 0.0, 1.0, 1, 0)
    results = {}
    for het in (False, True):
        cfg = CompareConfig(heteroscedastic=het, pretrain_steps=steps, swa_snapshots=snapshots,
                            methods=("swag",), seed=args.seed)
        sc, terms = fit(data, cfg)
        name = "heteroscedastic" if het else "one precision"
        print(f"{name:>15}: test LL {sc['test_ll']:.3f}, RMSE {sc['rmse']:.3f}, "
              f"90% coverage {sc['coverage_90']:.2f}")
        noise_sd = terms["var"].mean(0).sqrt()  # the predictive's noise part, per test point
        cells = []
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            inside = (x_test[:, 0].abs() >= lo) & (x_test[:, 0].abs() < hi)
            true = 0.05 + 0.3 * (lo + hi) / 2
            cells.append(f"|x| {lo}-{hi}: {float(noise_sd[inside].mean()):.2f} (true {true:.2f})")
        print(" " * 17 + "noise sd " + ", ".join(cells))
        results[name] = {**{k: v for k, v in sc.items() if not k.startswith("_")},
                         "noise_sd_by_bin": cells}
    (x, y), (x_test, y_test) = exponential(n, args.seed), exponential(n, args.seed + 1)
    mean, sd = float(y.mean()), float(y.std())
    data = Dataset("exponential", "gaussian", x, (y - mean) / sd, x_test, (y_test - mean) / sd,
                   mean, sd, 1, 0)
    print("y = exp(2.5 x) (1 + 0.05 eps), heteroscedastic:")
    for beta in (None, 0.5):
        cfg = CompareConfig(heteroscedastic=True, pretrain_beta=beta, pretrain_steps=steps,
                            swa_snapshots=snapshots, methods=("swag",), seed=args.seed)
        sc, _ = fit(data, cfg)
        name = "beta-NLL 0.5" if beta else "plain NLL"
        print(f"{name:>15}: test LL {sc['test_ll']:.3f}, RMSE {sc['rmse']:.3f}, "
              f"90% coverage {sc['coverage_90']:.2f}")
        results[name] = {k: v for k, v in sc.items() if not k.startswith("_")}
    return results


if __name__ == "__main__":
    main()
