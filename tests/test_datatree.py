"""to_datatree: one schema for SWAG, AutoNormal SVI and NUTS; corrected LOO; diagnostics; plots."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import arviz_base  # noqa: E402
import arviz_stats  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from pyro.infer import MCMC, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal  # noqa: E402
from pyro.infer.mcmc.util import initialize_model  # noqa: E402
from torch.distributions import biject_to  # noqa: E402

from pyro_swag import SWAGCollector  # noqa: E402
from pyro_swag.datatree import (  # noqa: E402
    RecordingNUTS,
    compare,
    loo,
    loo_pit,
    mcmc_health,
    plot_energy,
    plot_forest,
    plot_loo_pit,
    plot_ppc,
    plot_trace,
    psis_diagnostic,
    summary,
    to_datatree,
)
from pyro_swag.models import BayesianMLP  # noqa: E402
from pyro_swag.train import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, D, DRAWS = 100, 3, 200


def linreg(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        mean = pyro.deterministic("mean", x @ w + b)
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def fit_swag(model, x, y, lr=2e-3, epochs=(25, 40), batch=25, **kw):
    """Adam to the mode, then constant-lr SGD collecting one snapshot per epoch."""
    col = SWAGCollector(model, rank=10, **kw)
    # pyro_swag.fit's learning rate is per datum: lr on the summed loss is lr * N there.
    guide, _ = fit(model, col, (x, y), epochs=sum(epochs), swa_start=epochs[0],
                   swa_lr=lr * x.shape[0], swa_momentum=0.0, batch_size=batch,
                   optim=pyro.optim.Adam({"lr": 0.05}), quiet=True)
    return guide


@pytest.fixture(scope="module")
def fitted():
    pyro.set_rng_seed(1)
    x = torch.randn(N, D)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(N)
    mcmc = MCMC(RecordingNUTS(linreg), num_samples=DRAWS, warmup_steps=150, disable_progbar=True)
    mcmc.run(x, y)
    swag = fit_swag(linreg, x, y)
    pyro.clear_param_store()
    svi_guide = AutoNormal(linreg)
    svi = SVI(linreg, svi_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(600):
        svi.step(x, y)
    args, kwargs = (x,), {"y": y}
    dts = {
        "nuts": to_datatree(mcmc, args, kwargs, num_draws=DRAWS),
        "swag": to_datatree(swag, args, kwargs, num_chains=1, num_draws=DRAWS),
        "svi": to_datatree(svi_guide, args, kwargs, num_chains=1, num_draws=DRAWS),
    }
    return {"x": x, "y": y, "mcmc": mcmc, "swag": swag, "svi": svi_guide, "dts": dts}


def test_schema_identical_across_methods(fitted):
    dts = fitted["dts"]
    groups = {"posterior", "posterior_predictive", "log_likelihood", "observed_data",
              "constant_data", "sample_stats"}
    ref = dts["nuts"]
    for name, dt in dts.items():
        assert set(dt.children) == groups, name
        for group in groups - {"sample_stats"}:
            a, b = dt[group].to_dataset(), ref[group].to_dataset()
            assert set(a.data_vars) == set(b.data_vars), (name, group)
            for var in a.data_vars:
                assert a[var].dims == b[var].dims, (name, group, var)
                assert a[var].shape == b[var].shape, (name, group, var)
    post = ref["posterior"]
    assert post["mean"].dims == ("chain", "draw", "data")  # deterministic site, plate dim
    expected = np.einsum("cdk,nk->cdn", post["w"].values, fitted["x"].numpy())
    np.testing.assert_allclose(post["mean"].values, expected + post["b"].values[..., None],
                               rtol=1e-4, atol=1e-5)
    assert post["w"].dims == ("chain", "draw", "w_dim_0") and post["w"].shape == (1, DRAWS, D)
    assert ref["log_likelihood"]["obs"].dims == ("chain", "draw", "data")
    assert ref["constant_data"]["x"].dims == ("data", "x_dim_1")
    np.testing.assert_array_equal(ref["observed_data"]["obs"].values, fitted["y"].numpy())
    assert {"diverging", "step_size", "tree_depth", "n_steps", "log_p"} <= set(
        ref["sample_stats"].data_vars)
    for name in ("swag", "svi"):
        assert {"log_p", "log_q"} == set(dts[name]["sample_stats"].data_vars)


def test_nuts_export_matches_mcmc_and_potential_energy(fitted):
    mcmc, dt = fitted["mcmc"], fitted["dts"]["nuts"]
    samples = mcmc.get_samples(group_by_chain=True)
    np.testing.assert_array_equal(dt["posterior"]["w"].values, samples["w"].numpy())
    # oracle: log_p is minus Pyro's potential energy at the unconstrained draw
    _, potential_fn, transforms, _ = initialize_model(linreg, (fitted["x"], fitted["y"]))
    for s in (0, 57, DRAWS - 1):
        z = {k: transforms[k](v[0, s]) for k, v in samples.items()}
        expected = -potential_fn(z).item()
        assert dt["sample_stats"]["log_p"].values[0, s] == pytest.approx(expected, rel=1e-4)
    depth, steps = dt["sample_stats"]["tree_depth"].values, dt["sample_stats"]["n_steps"].values
    assert (depth >= 1).all() and (steps <= 2**depth - 1).all()
    assert (steps >= 2 ** (depth - 1)).all()


def test_nuts_energy_is_potential_plus_fresh_kinetic(fitted):
    # oracle: draw s's energy is U(previous draw) + K(r), r ~ N(0, M): K ~ chi2(d) / 2
    stats = fitted["dts"]["nuts"]["sample_stats"]
    energy, log_p = stats["energy"].values[0], stats["log_p"].values[0]
    kinetic = energy[1:] + log_p[:-1]
    d = D + 2  # w, b, sigma
    assert (kinetic >= -1e-4).all()
    assert kinetic.mean() == pytest.approx(d / 2, abs=4 * np.sqrt(d / 2 / kinetic.size))
    assert kinetic.var() == pytest.approx(d / 2, rel=0.35)
    bfmi = arviz_stats.bfmi(fitted["dts"]["nuts"])
    assert 0.3 < float(bfmi["energy"].min()) < 2.0  # a well-mixed linear regression


def test_mcmc_health_oracles():
    rng = np.random.default_rng(0)
    iid = rng.normal(size=(1, 400, 3))
    stats = {"diverging": np.zeros((1, 400), bool), "energy": rng.normal(size=(1, 400)),
             "log_p": rng.normal(size=(1, 400))}
    stats["diverging"][0, [3, 50]] = True
    h = mcmc_health(arviz_base.from_dict({"posterior": {"w": iid}, "sample_stats": stats}))
    assert h["draws"] == 400 and h["divergences"] == 2
    assert h["max_rhat"] < 1.03 and 250 < h["min_ess_bulk"] < 600  # iid: ESS about 400
    assert 1.5 < h["min_bfmi"] < 2.5  # iid energies: E-BFMI about 2
    assert 250 < h["ess_log_p"] < 600
    stuck = iid.copy()
    stuck[0, 200:, 1] += 3.0  # the one chain's halves disagree: split R-hat sees it
    h = mcmc_health(arviz_base.from_dict({"posterior": {"w": stuck}}))
    assert h["max_rhat"] > 1.5 and "divergences" not in h and "min_bfmi" not in h
    with pytest.raises(ValueError, match="at least 4 draws"):
        mcmc_health(arviz_base.from_dict({"posterior": {"w": iid[:, :3]}}))


def test_swag_log_q_is_guide_density(fitted):
    swag, dt = fitted["swag"], fitted["dts"]["swag"]
    post = dt["posterior"]
    sigma = torch.as_tensor(post["sigma"].values[0])
    u = torch.cat([
        torch.as_tensor(post["w"].values[0]),
        torch.as_tensor(post["b"].values[0])[:, None],
        biject_to(dist.HalfNormal(1.0).support).inv(sigma)[:, None],
    ], -1)
    expected = swag.get_posterior().log_prob(u).numpy()
    log_q = dt["sample_stats"]["log_q"].values[0]
    np.testing.assert_allclose(log_q, expected, rtol=1e-4, atol=1e-3)


def test_autonormal_log_q_is_its_unconstrained_density(fitted):
    guide, post = fitted["svi"], fitted["dts"]["svi"]["posterior"]
    expected = 0.0
    for name in ("w", "b", "sigma"):
        u = torch.as_tensor(post[name].values[0])
        u = u.log() if name == "sigma" else u  # biject_to(positive) = exp
        normal = dist.Normal(getattr(guide.locs, name), getattr(guide.scales, name))
        lp = normal.log_prob(u.reshape(DRAWS, -1) if name == "w" else u)
        expected = expected + (lp.sum(-1) if name == "w" else lp)
    np.testing.assert_allclose(fitted["dts"]["svi"]["sample_stats"]["log_q"].values[0],
                               expected.detach().numpy(), rtol=1e-4, atol=1e-3)


def test_corrected_loo_matches_nuts(fitted):
    dts = fitted["dts"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = loo(dts["nuts"]).elpd
        corrected = loo(dts["swag"]).elpd
        naive = loo(dts["swag"], corrected=False).elpd
        table = compare(dts)
    assert abs(corrected - ref) < 2.0, (corrected, ref, naive)
    assert abs(naive - ref) > abs(corrected - ref)
    assert set(table.index) == set(dts)
    with pytest.raises(ValueError, match="corrected=True needs sample_stats.log_p"):
        loo(dts["nuts"], corrected=True)


def test_psis_diagnostic_oracles():
    rng = np.random.default_rng(0)
    z = rng.normal(size=20000)
    khat, ess = psis_diagnostic(-0.5 * z**2 + 3.0, -0.5 * z**2)  # q == p up to a constant
    assert ess == pytest.approx(20000) and khat == -np.inf
    # p = N(0, 1), q = N(0, s^2) with s < 1: the ratios' tail has k = 1 - s^2 = 0.84
    # (the PSIS estimate is shrunk towards smaller k at finite S)
    x = 0.4 * z
    khat, ess = psis_diagnostic(-0.5 * x**2, -0.5 * z**2 - np.log(0.4))
    assert 0.7 < khat < 1.0 and ess < 2000
    x = 1.5 * z  # a wider q has bounded weights (k <= 0)
    khat, _ = psis_diagnostic(-0.5 * x**2, -0.5 * z**2 - np.log(1.5))
    assert khat < 0.3
    with pytest.raises(ValueError, match="same shape"):
        psis_diagnostic(np.zeros(20), np.zeros(21))


def test_psis_diagnostic_when_the_ratios_span_thousands_of_nats():
    # a guide far wider than a sharp posterior: log p - log q spread over ~1e4 nats, so
    # the tail underflows against the largest ratio and the Pareto fit returns NaN
    # weights beside a small finite k-hat unless caught
    lw = -np.abs(np.random.default_rng(1).normal(size=200)) * 3e4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no NumPy warnings from the failed fit
        khat, ess = psis_diagnostic(lw, np.zeros(200))
    assert khat == np.inf and ess == pytest.approx(1.0, abs=1e-6)


def test_netcdf_round_trip_with_dotted_names(tmp_path):
    x = torch.randn(24, 2)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(24)
    model = BayesianMLP(2, hidden=(3,), noise=0.1)
    guide = fit_swag(model, x, y, lr=1e-4, epochs=(5, 4), batch=8,
                     init_loc_fn=model.init_loc_fn())
    dt = to_datatree(guide, (x,), {"y": y}, num_chains=2, num_draws=5,
                     coords={"data": np.arange(100, 124)})
    assert "layers.0.weight" in dt["posterior"].data_vars
    assert dt["posterior"]["layers.0.weight"].shape == (2, 5, 3, 2)
    np.testing.assert_array_equal(dt["log_likelihood"]["data"].values, np.arange(100, 124))
    path = tmp_path / "swag.nc"
    dt.to_netcdf(path, engine="h5netcdf")
    back = xr.open_datatree(path, engine="h5netcdf").load()
    xr.testing.assert_identical(back, dt)


def test_plots_render_headless(fitted, tmp_path):
    dts = fitted["dts"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_ppc(dts["swag"], tmp_path / "ppc.png", num_samples=20)
        plot_forest(dts, tmp_path / "forest.png", var_names=["w", "b", "sigma"])
        plot_loo_pit(dts["swag"], tmp_path / "loo_pit.png")
        plot_trace(dts["nuts"], tmp_path / "trace.png", var_names=["w", "sigma"])
        plot_energy(dts["nuts"], tmp_path / "energy.png")
        pit = loo_pit(dts["swag"])["obs"].values
    assert ((pit >= 0) & (pit <= 1)).all() and pit.shape == (N,)
    with pytest.raises(ValueError, match="needs sample_stats.energy: run MCMC with RecordingNUTS"):
        plot_energy(dts["swag"])
    for name in ("ppc", "forest", "loo_pit", "trace", "energy"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_user_dims_and_coords(fitted):
    dt = to_datatree(fitted["swag"], (fitted["x"],), {"y": fitted["y"]}, num_chains=2,
                     num_draws=3, dims={"w": ["feature"]}, coords={"feature": ["a", "b", "c"]})
    assert dt["posterior"]["w"].dims == ("chain", "draw", "feature")
    assert list(dt["posterior"]["feature"].values) == ["a", "b", "c"]
    assert dt["posterior"]["b"].shape == (2, 3)


def test_errors(fitted):
    args, kwargs = (fitted["x"],), {"y": fitted["y"]}
    with pytest.raises(ValueError, match="num_chains=2, num_draws=200 asked"):
        to_datatree(fitted["mcmc"], args, kwargs, num_chains=2)
    with pytest.raises(ValueError, match="num_draws must be a positive int"):
        to_datatree(fitted["swag"], args, kwargs, num_draws=0)
    with pytest.raises(TypeError, match="source must be a Pyro guide or a pyro.infer.MCMC"):
        to_datatree(42, args, kwargs, model=linreg)
    with pytest.raises(ValueError, match="no observed site"):
        to_datatree(fitted["swag"], args, {}, num_draws=5)
    few = to_datatree(fitted["swag"], args, kwargs, num_draws=24)  # ArviZ: "n_draws_tail"
    for fn in (loo, loo_pit):
        with pytest.raises(ValueError, match="at least 25 draws.*got S = 24.*num_draws=100"):
            fn(few)
    assert np.isfinite(float(loo(to_datatree(fitted["swag"], args, kwargs, num_draws=25)).elpd))


def test_a_point_mass_export_gets_a_clear_loo_error_and_a_plain_summary(fitted):
    args, kwargs = (fitted["x"],), {"y": fitted["y"]}
    pyro.clear_param_store()
    delta = AutoDelta(linreg)
    delta(*args, **kwargs)
    dt = to_datatree(delta, args, kwargs, num_draws=50)
    for fn in (loo, loo_pit):
        with pytest.raises(ValueError, match="every posterior draw is the same point.*AutoDelta"):
            fn(dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's own, about R-hat of constant draws
        table = summary(dt)
    assert (table["sd"] < 1e-6).all() and "khat" not in table.attrs  # float32 round-off


def subsampled(x, y=None, subsample=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 20, subsample_size=5, subsample=subsample) as idx:
        pyro.sample("obs", dist.Normal(w * x[idx], 1.0), obs=None if y is None else y[idx])


def test_subsampling_plates():
    x = torch.arange(20.0)
    y = 2 * x
    guide = AutoDiagonalNormal(subsampled)
    guide(x, y)
    # a random subsample differs in every model pass: refused, naming the plate and the fix
    with pytest.raises(ValueError, match=r"plate 'data' draws a random subsample.*arange"):
        to_datatree(guide, (x,), {"y": y}, num_draws=3)
    # an explicit subsample is the same in every pass: log_likelihood pairs with observed_data
    idx = torch.tensor([3, 7, 11, 12, 19])
    dt = to_datatree(guide, (x,), {"y": y, "subsample": idx}, num_draws=3)
    obs = torch.tensor(dt["observed_data"]["obs"].values)
    torch.testing.assert_close(obs, y[idx])
    w = torch.tensor(dt["posterior"]["w"].values[0])
    expected = dist.Normal(w[:, None] * x[idx], 1.0).log_prob(y[idx])
    got = torch.tensor(dt["log_likelihood"]["obs"].values[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert dt["posterior_predictive"]["obs"].shape == (1, 3, 5)


def test_example_smoke(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "arviz_workflow.py"), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "corrected" in proc.stdout and "NUTS checks: draws 100, divergences " in proc.stdout
    assert (tmp_path / "forest.png").exists() and (tmp_path / "energy.png").exists()


def test_sequential_chains_keep_every_chains_stats():
    import os

    def model(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 5):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    chains = (os.cpu_count() or 1) + 1  # more chains than CPUs: Pyro runs them in turn
    pyro.set_rng_seed(0)
    y = torch.randn(5)
    mcmc = MCMC(RecordingNUTS(model), num_samples=15, warmup_steps=10, num_chains=chains,
                disable_progbar=True)
    mcmc.run(y=y)
    stats = to_datatree(mcmc, (), {"y": y})["sample_stats"]
    assert {"tree_depth", "n_steps", "step_size"} <= set(stats.data_vars)
    assert stats["tree_depth"].shape == (chains, 15)
