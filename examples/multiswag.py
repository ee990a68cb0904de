"""MultiSWAG: four independent SWAG runs as one mixture guide, one ArviZ chain per run.

Two models: a linear regression (one posterior mode: R-hat across runs ~ 1) and
``y ~ N(w^2 x, 0.5^2)``, whose posterior over ``w`` has two mirror modes (runs started at
``w = +1`` and ``w = -1`` find different modes: R-hat >> 1). Prints R-hat, the share of
MultiSWAG's predictive draws in each mode, and writes ``multiswag_chains.png`` (per-run
intervals) and ``multiswag_modes.png`` (histogram of w) into ``--out``.

    python examples/multiswag.py --out /tmp/ms
    python examples/multiswag.py --smoke --out /tmp/ms        # tiny, < 20 s
    python examples/multiswag.py --processes 2 --out /tmp/ms  # runs in 2 worker processes
"""

import argparse
import functools
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import arviz_stats  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import Predictive  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_value  # noqa: E402

from pyro_swag import SWAGCollector  # noqa: E402
from pyro_swag.datatree import plot_forest, to_datatree  # noqa: E402
from pyro_swag.multiswag import fit_runs  # noqa: E402
from pyro_swag.train import fit  # noqa: E402

D = 3
STARTS = {"linear": (-2.0, -1.0, 1.0, 2.0), "squared": (1.0, -1.0, 1.0, -1.0)}


def linear(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(x @ w + b, sigma), obs=y)


def squared(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 2.0))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(w**2 * x, 0.5), obs=y)


MODELS = {"linear": linear, "squared": squared}


def make_data(name, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "linear":
        x = torch.randn(n, D, generator=g)
        return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(n, generator=g)
    x = torch.randn(n, generator=g)
    return x, 2.25 * x + 0.5 * torch.randn(n, generator=g)


def fit_run(seed, name, n, epochs, lr):
    """One SWAG run (module level: picklable for --processes)."""
    model, (x, y) = MODELS[name], make_data(name, n)
    start = STARTS[name][seed % 4]
    init = {"w": torch.full((D,), start) if name == "linear" else torch.tensor(start)}
    collector = SWAGCollector(model, rank=10, init_loc_fn=init_to_value(values=init))
    batch = max(n // 4, 10)
    # pyro_swag.fit's learning rate is per datum: lr on the summed loss is lr * N there.
    guide, _ = fit(model, collector, (x, y), epochs=sum(epochs), swa_start=epochs[0],
                   swa_lr=lr * x.shape[0], swa_momentum=0.0, batch_size=batch,
                   optim=pyro.optim.Adam({"lr": 0.05}), quiet=True)
    return guide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("multiswag_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, < 20 s")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    n, epochs, draws = (40, (30, 15), 50) if args.smoke else (200, (60, 50), 500)
    trees, guides = {}, {}
    for name, lr in (("linear", 0.2 / n), ("squared", 0.01 / n)):
        t0 = time.time()
        guides[name] = fit_runs(
            functools.partial(fit_run, name=name, n=n, epochs=epochs, lr=lr), 4,
            model=MODELS[name], processes=args.processes, progress=False,
        )
        x, y = make_data(name, n)
        trees[name] = to_datatree(guides[name], (x,), {"y": y}, num_draws=draws)
        rhat = arviz_stats.rhat(trees[name])
        worst = max(float(rhat[v].max()) for v in rhat.data_vars)
        print(f"{name:<8} 4 runs in {time.time() - t0:5.1f} s   max R-hat across runs "
              f"{worst:.3f}   " + ", ".join(f"{v}: {rhat[v].values.round(3).tolist()}"
                                            for v in rhat.data_vars))
    x, _ = make_data("squared", n)
    w = Predictive(squared, guide=guides["squared"], num_samples=4 * draws)(x)["w"]
    print(f"squared: MultiSWAG predictive draws with w > 0: {(w > 0).float().mean():.3f}, "
          f"mode locations {w[w > 0].mean():.3f} / {w[w < 0].mean():.3f}")
    plot_forest(trees["squared"], args.out / "multiswag_chains.png", combined=False)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(w.numpy(), bins=60)
    ax.set(xlabel="w", ylabel="draws", title="MultiSWAG on y ~ N(w^2 x, 0.25): both modes")
    fig.tight_layout()
    fig.savefig(args.out / "multiswag_modes.png", dpi=100)
    print(f"wrote multiswag_chains.png, multiswag_modes.png to {args.out}")


if __name__ == "__main__":
    main()
