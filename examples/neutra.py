"""NUTS whitened by SWAG: the SWAG Gaussian as the transport map of Pyro's ``NeuTraReparam``.

Fits SWAG to a 1x50 Bayesian MLP on scikit-learn's diabetes data with ``pyro_swag.fit``,
then runs NUTS on the same model in the coordinates z of ``theta = T(z)``, ``T`` the
guide's ``get_transform()`` (``z ~ N(0, I)`` is exactly the SWAG Gaussian). NUTS still
targets the exact posterior; SWAG only sets its geometry and its start (z = 0, the SWA
mean). Prints NUTS's own checks, the test log predictive density per point of both, and
writes both DataTrees' forest plot to ``--out``.

    python examples/neutra.py --out /tmp/neutra             # 2 chains x (200 + 200)
    python examples/neutra.py --smoke --out /tmp/neutra     # tiny, < 30 s
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_median  # noqa: E402
from pyro.infer.reparam import NeuTraReparam  # noqa: E402

from pyro_swag import BayesianMLP, SWAGCollector, fit, log_likelihood  # noqa: E402
from pyro_swag.data import load_dataset  # noqa: E402
from pyro_swag.datatree import RecordingNUTS, mcmc_health, plot_forest, to_datatree  # noqa: E402


def test_lpd(model, dt, data) -> float:
    """Mean over test points of log mean_s p(y | theta_s), in standardised units."""
    draws = {k: torch.as_tensor(dt["posterior"][k].values).flatten(0, 1)
             for k in dt["posterior"].data_vars}
    ll = log_likelihood(model, draws, data.x_test, data.y_test)["obs"]
    return float((ll.logsumexp(0) - math.log(ll.shape[0])).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("neutra_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, < 30 s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    hidden, epochs, (warmup, draws, chains, depth) = (
        (8, 40, (30, 30, 2, 5)) if args.smoke else (50, 600, (200, 200, 2, 8)))
    data = load_dataset("diabetes")
    x, y = data.x_train, data.y_train
    pyro.set_rng_seed(args.seed)
    model = BayesianMLP(x.shape[1], hidden=(hidden,))

    t0 = time.perf_counter()
    guide, _ = fit(model, SWAGCollector(model, rank=20), (x, y), epochs=epochs,
                   swa_start=epochs - epochs // 6, swa_lr="auto", batch_size=32, quiet=True,
                   seed=args.seed)
    t_swag = time.perf_counter() - t0

    neutra = NeuTraReparam(guide)
    kernel = RecordingNUTS(neutra.reparam(model), max_tree_depth=depth,
                           init_strategy=init_to_median)  # z = 0: the SWA mean
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, num_chains=chains,
                disable_progbar=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "chains will be drawn sequentially"
        mcmc.run(x, y)
    t_nuts = time.perf_counter() - t0

    dts = {"SWAG": to_datatree(guide, (x,), {"y": y}, num_chains=chains, num_draws=draws),
           "NUTS, SWAG-whitened": to_datatree(mcmc, (x,), {"y": y})}  # the model's sites
    health = mcmc_health(dts["NUTS, SWAG-whitened"])
    lpd = {name: test_lpd(model, dt, data) for name, dt in dts.items()}
    print(f"seconds: SWAG {t_swag:.1f}, NUTS {t_nuts:.1f} ({chains} x {warmup} + {draws})")
    print("NUTS checks: " + ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in health.items()))
    print("test log predictive density / point: " + ", ".join(
        f"{name} {v:.3f}" for name, v in lpd.items()))
    plot_forest(dts, args.out / "forest.png", var_names=["precision"])
    return {"health": health, "lpd": lpd}


if __name__ == "__main__":
    main()
