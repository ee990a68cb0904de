"""Compare SWAG with SGD/MAP, SWA, MultiSWAG, SVI and NUTS on your own Pyro model.

The console command ``pyro-swag compare`` does this for a Bayesian MLP; from Python any model
with the signature ``model(x, y=None, num_data=None)`` and its observed site ``"obs"`` in a
``pyro.plate("data", size=num_data, subsample=...)`` works. Here: Bayesian linear regression
on scikit-learn's diabetes data.

    python examples/compare.py            # a few minutes on 2 cores
    python examples/compare.py --smoke    # seconds: tiny settings, a few methods
"""

import argparse

import pyro
import pyro.distributions as dist
import torch

from pyro_swag.compare import CompareConfig, compare, quick_config
from pyro_swag.data import load_dataset


def linear_model(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    index = torch.arange(x.shape[0])
    with pyro.plate("data", size=num_data or x.shape[0], subsample=index):
        pyro.sample("obs", dist.Normal(x @ w + b, sigma), obs=y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (< 20 s)")
    parser.add_argument("--out", default="out/compare-linear")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("diabetes")
    if args.smoke:
        config = quick_config(methods=("map", "swag", "svi_normal", "nuts"), pretrain_steps=150,
                              svi_steps=150, num_samples=30, nuts_warmup=20, nuts_samples=30)
    else:
        config = CompareConfig(pretrain_steps=2000, svi_steps=2000, multiswag_runs=2)
    summary = compare(data, args.out, model=linear_model, config=config, quiet=args.smoke)
    for row in summary["methods"].values():
        if row["status"] == "ok":
            print(f"{row['label']:>20}: test LL {row['test_ll']:.3f}  RMSE {row['rmse']:.2f}  "
                  f"90% coverage {row['coverage_90']:.2f}  {row['wall_s']:.1f} s")
        else:
            print(f"{row['label']:>20}: {row['status']} ({row['note']})")
    print(f"report: {args.out}/report.md")


if __name__ == "__main__":
    main()
