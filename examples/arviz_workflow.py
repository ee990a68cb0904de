"""SWAG, AutoNormal SVI and NUTS on one linear regression, exported to ArviZ and compared.

Writes ``forest.png`` (all three methods), ``ppc.png`` and ``loo_pit.png`` (SWAG),
``energy.png`` (NUTS) and the SWAG DataTree ``swag.nc`` into ``--out``, and prints naive vs
corrected PSIS-LOO, NUTS's own checks and SWAG's posterior summary raw and p/q-weighted.

    python examples/arviz_workflow.py --out /tmp/arviz            # N=200, 1000 draws
    python examples/arviz_workflow.py --smoke --out /tmp/arviz    # tiny, < 20 s
"""

import argparse
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import arviz_stats  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

from pyro_swag import SWAGCollector
from pyro_swag.datatree import (  # noqa: E402
    RecordingNUTS,
    compare,
    loo,
    mcmc_health,
    plot_energy,
    plot_forest,
    plot_loo_pit,
    plot_ppc,
    psis_diagnostic,
    summary,
    to_datatree,
)
from pyro_swag.train import fit  # noqa: E402

D = 3


def model(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(x @ w + b, sigma), obs=y)


def fit_swag(x, y, lr, epochs, batch):
    """Adam to the mode, then constant-lr SGD with one SWAG snapshot per epoch."""
    collector = SWAGCollector(model, rank=10)
    # pyro_swag.fit's learning rate is per datum: lr on the summed loss is lr * N there.
    guide, _ = fit(model, collector, (x, y), epochs=sum(epochs), swa_start=epochs[0],
                   swa_lr=lr * x.shape[0], swa_momentum=0.0, batch_size=batch,
                   optim=pyro.optim.Adam({"lr": 0.05}), quiet=True)
    return guide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("arviz_out"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, < 20 s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        n, draws, warmup, epochs = 60, 100, 60, (25, 20)
    else:
        n, draws, warmup, epochs = 200, 1000, 500, (40, 60)
    x = torch.randn(n, D)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(n)
    data = ((x,), {"y": y})

    t0 = time.time()
    mcmc = MCMC(RecordingNUTS(model), num_samples=draws, warmup_steps=warmup,
                disable_progbar=True)
    mcmc.run(x, y)
    t_nuts = time.time() - t0
    t0 = time.time()
    swag = fit_swag(x, y, lr=0.2 / n, epochs=epochs, batch=max(n // 8, 10))
    t_swag = time.time() - t0
    t0 = time.time()
    pyro.clear_param_store()
    svi_guide = AutoNormal(model)
    svi = SVI(model, svi_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(150 if args.smoke else 2000):
        svi.step(x, y)
    t_svi = time.time() - t0

    dts = {
        "NUTS": to_datatree(mcmc, *data, num_chains=1, num_draws=draws),
        "SWAG": to_datatree(swag, *data, num_chains=1, num_draws=draws),
        "SVI": to_datatree(svi_guide, *data, num_chains=1, num_draws=draws),
    }
    print(f"fit seconds: NUTS {t_nuts:.1f}, SWAG {t_swag:.1f}, SVI {t_svi:.1f}")
    print(f"{'method':<6} {'naive elpd_loo':>15} {'corrected':>10} {'guide khat':>11} {'ESS':>7}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto-k warnings: the table reports them
        for name, dt in dts.items():
            naive = loo(dt, corrected=False).elpd
            stats = dt["sample_stats"]
            if "log_q" in stats:
                khat, ess = psis_diagnostic(stats["log_p"], stats["log_q"])
                corr = loo(dt).elpd
                print(f"{name:<6} {naive:>15.2f} {corr:>10.2f} {khat:>11.2f} {ess:>7.0f}")
            else:
                print(f"{name:<6} {naive:>15.2f} {'n/a':>10} {'':>11} {'':>7}")
        print(compare(dts)[["rank", "elpd", "p", "elpd_diff", "weight"]].round(2).to_string())
        ess = {name: arviz_stats.ess(dt)  # one chain each here: R-hat needs several chains
               for name, dt in dts.items()}
        print("bulk ESS of", draws, "draws: " + "; ".join(
            f"{name} " + ", ".join(f"{v}={float(e[v].min()):.0f}" for v in e.data_vars)
            for name, e in ess.items()))
        plot_forest(dts, args.out / "forest.png", var_names=["w", "b", "sigma"])
        plot_ppc(dts["SWAG"], args.out / "ppc.png", num_samples=50)
        plot_loo_pit(dts["SWAG"], args.out / "loo_pit.png")
        plot_energy(dts["NUTS"], args.out / "energy.png")
        health = mcmc_health(dts["NUTS"])
    print("NUTS checks: " + ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in health.items()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-hat is printed with the table
        tables = {"SWAG raw": summary(dts["SWAG"], corrected=False, var_names=["b", "sigma"]),
                  "SWAG p/q-weighted": summary(dts["SWAG"], var_names=["b", "sigma"]),
                  "NUTS": summary(dts["NUTS"], var_names=["b", "sigma"])}
    khat = tables["SWAG p/q-weighted"].attrs["khat"]
    print(f"posterior mean (sd) of b and sigma (SWAG guide k-hat {khat:.2f}):")
    for name, table in tables.items():
        print(f"  {name:<18} " + ", ".join(f"{i} {r['mean']:.3f} ({r['sd']:.3f})"
                                            for i, r in table.iterrows()))
    dts["SWAG"].to_netcdf(args.out / "swag.nc", engine="h5netcdf")
    print(f"wrote forest.png, ppc.png, loo_pit.png, energy.png, swag.nc to {args.out}")


if __name__ == "__main__":
    main()
