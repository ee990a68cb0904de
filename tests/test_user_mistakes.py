"""Ordinary mistakes of a Pyro/ArviZ user get a clear error or warning, not a wrong result."""

import subprocess
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from test_fit_inputs import linreg  # w ~ N(0, I), obs ~ N(x w, 0.5)

from pyro_swag import MultiSWAG, SWAGCollector
from pyro_swag.datatree import loo, to_datatree
from pyro_swag.lr import gradient_noise
from pyro_swag.predictive import log_likelihood, predictive
from pyro_swag.train import fit

ROOT = Path(__file__).resolve().parents[1]


def make_data(n=60):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=g)
    return x, x @ torch.tensor([1.0, -0.5]) + 0.5 * torch.randn(n, generator=g)


def swag(lr, epochs=30, **kw):
    x, y = make_data()
    pyro.clear_param_store()
    collector = SWAGCollector(linreg, rank=4)
    guide, _ = fit(linreg, collector, (x, y), epochs=epochs, swa_start=10, swa_lr=lr,
                   batch_size=10, seed=0, quiet=True, **kw)
    return guide, collector


@pytest.mark.parametrize("data, err, match", [
    ("x only", ValueError, "the model observes nothing"),  # obs would become a latent
    ("dict", TypeError, r"got a dict with keys \['x', 'y'\]"),
    ("numpy", TypeError, r"got \(ndarray, ndarray\); convert arrays with torch.as_tensor"),
    ("column y", ValueError, r"(?s)invalid log_prob shape.*position\(s\) \[1\] have shape "
                             r"\(N, 1\).*y.squeeze\(-1\)"),  # would broadcast to (N, N)
])
def test_fit_refuses_data_in_the_wrong_form(data, err, match):
    x, y = make_data()
    given = {"x only": (x,), "dict": {"x": x, "y": y}, "numpy": (x.numpy(), y.numpy()),
             "column y": (x, y[:, None])}[data]
    collector = SWAGCollector(linreg, rank=2)
    with pytest.raises(err, match=match):
        fit(linreg, collector, given, epochs=3, swa_start=1, swa_lr=1e-3, quiet=True)
    assert collector.prototype_trace is None and collector.moments.count == 0


def test_fit_seed_and_default_full_batch_warning():
    x, y = make_data(20)
    with pytest.raises(ValueError, match="seed must be an integer >= 0 or None, got seed='0'"):
        fit(linreg, SWAGCollector(linreg, rank=2), (x, y), epochs=3, swa_start=1,
            swa_lr=1e-3, seed="0", quiet=True)
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match=r"batch_size defaults to min\(N, 128\) = N = 20"):
        fit(linreg, SWAGCollector(linreg, rank=2), (x, y), epochs=3, swa_start=1,
            swa_lr=1e-3, quiet=True)


def test_log_likelihood_scores_the_data_not_predictives_replicates():
    guide, _ = swag(1e-3)
    x, y = make_data()
    pyro.set_rng_seed(0)
    draws = Predictive(linreg, guide=guide, num_samples=20)(x)  # holds "obs" replicates too
    assert "obs" in draws
    with_obs = log_likelihood(linreg, draws, x, y)["obs"]
    latents = log_likelihood(linreg, {"w": draws["w"]}, x, y)["obs"]
    torch.testing.assert_close(with_obs, latents)
    w = draws["w"].reshape(20, 2)
    torch.testing.assert_close(latents, dist.Normal(w @ x.T, 0.5).log_prob(y))


def test_guides_given_the_wrong_way_are_refused():
    guide, collector = swag(1e-3)
    x, y = make_data()
    with pytest.raises(TypeError, match="source is a SWAGCollector.*collector.swag_guide"):
        to_datatree(collector, (x,), {"y": y})
    with pytest.raises(TypeError, match="guides must be a list of SWAGGuides"):
        MultiSWAG(guide)
    with pytest.raises(TypeError, match=r"guide must be a callable Pyro guide, got a Tensor"):
        predictive(linreg, x, num_samples=3)
    with pytest.raises(TypeError, match=r"model first.*SWAGGuide.*predictive\(guide.model, guide"):
        predictive(guide, num_samples=3, x=x)
    with pytest.raises(TypeError, match=r"samples must be a dict of draws.*got a SWAGGuide: "
                       r"draw them first, e.g. samples=predictive\(model, guide"):
        log_likelihood(linreg, guide, x, y)
    with pytest.raises(TypeError, match="posterior_samples must be a dict.*pass a guide as guide="):
        predictive(linreg, None, x, posterior_samples=guide)


def test_corrected_loo_warns_when_the_guide_is_a_poor_proposal():
    x, y = make_data()
    good, _ = swag(2e-3)
    narrow, _ = swag(1e-6)  # the learning rate sets the spread: far too narrow
    kinds = {}
    for name, guide in (("good", good), ("narrow", narrow)):
        dt = to_datatree(guide, (x,), {"y": y}, num_draws=400)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loo(dt)
        kinds[name] = [str(m.message) for m in caught if m.category is RuntimeWarning]
    assert not any("k-hat" in m for m in kinds["good"]), kinds["good"]
    assert any("guide's Pareto k-hat is" in m for m in kinds["narrow"]), kinds["narrow"]


def test_fit_runs_in_an_unguarded_script_raises_instead_of_hanging(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pyro_swag.multiswag import fit_runs\n"
        "def fit_run(seed):\n"
        "    raise AssertionError('not reached')\n"
        "fit_runs(fit_run, seeds=2, model=print, processes=2, progress=False)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(ROOT),
                                                          "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert 'must guard its top level with `if __name__ == "__main__":`' in proc.stderr


def test_local_latents_of_a_subsampled_plate_are_refused():
    def schools(sigma, y=None, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("school", num_data or len(sigma), subsample=torch.arange(len(sigma))):
            theta = pyro.sample("theta", dist.Normal(mu, 2.0))  # one latent per school
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    sigma, y = torch.full((8,), 10.0), torch.linspace(-5.0, 20.0, 8)
    collector = SWAGCollector(schools, rank=2)
    with pytest.raises(ValueError, match="'theta' lies in plate 'school', subsampled to 4 of 8"):
        fit(schools, collector, (sigma, y), epochs=2, swa_start=0, swa_lr=1e-3, batch_size=4,
            quiet=True)
    assert collector.prototype_trace is None  # not half set up
    # the whole plate in every batch: the same collector then works
    with pytest.warns(UserWarning, match="full-batch SGD"):
        guide, _ = fit(schools, collector, (sigma, y), epochs=6, swa_start=2, swa_lr=1e-3,
                       batch_size=8, quiet=True)
    assert guide.median()["theta"].shape == (8,)


def test_a_model_that_subsamples_its_own_plate():
    """Pyro's own idiom, pyro.plate(..., subsample_size=B): fit passes all the data in every
    step, the plate's subsampling gives the gradient noise, and no full-batch warning."""

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(w * x[idx], 1.0), obs=y[idx])

    x = torch.randn(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide, _ = fit(model, SWAGCollector(model), (x, x), epochs=6, swa_start=2,
                       swa_lr=1e-2, batch_size=100, quiet=True, seed=0)
    assert guide.marginal_variance() > 1e-6  # the plate's subsamples moved it
    with pytest.raises(ValueError, match=r"subsamples plate 'data' itself.*batch_size=100"):
        fit(model, SWAGCollector(model), (x, x), epochs=2, swa_start=0, swa_lr=1e-2,
            batch_size=20, quiet=True)
    with pytest.raises(ValueError, match=r"swa_lr='auto'.*subsamples plate 'data' itself.*"
                                         r"float swa_lr"):
        fit(model, SWAGCollector(model), (x, x), epochs=2, swa_start=0, swa_lr="auto",
            batch_size=100, quiet=True)
    with pytest.raises(RuntimeError, match=r"per-example gradients.*subsamples its own plate"):
        fit(model, SWAGCollector(model), (x, x), epochs=2, swa_start=0, swa_lr=1e-2,
            batch_size=100, precondition="diag", quiet=True)


def test_a_network_of_pyro_params_is_said_not_to_be_swag_latent():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def model(x, y=None, num_data=None):
        pyro.module("net", net)  # point-estimated weights: SWAG would cover only "s"
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            pyro.sample("obs", dist.Normal(net(x).squeeze(-1), s), obs=y)

    x = torch.randn(40, 3)
    with pytest.warns(UserWarning, match=r"21 parameter entries \('net\$\$\$0.weight'.*against 1 "
                                         r"latent.*ModuleSWAG"):
        fit(model, SWAGCollector(model), (x, x[:, 0]), epochs=3, swa_start=1, swa_lr=1e-3,
            batch_size=10, quiet=True)
    with warnings.catch_warnings():  # a few hyper-parameters beside many latents: no warning
        warnings.simplefilter("error")
        fit(linreg_with_sigma, SWAGCollector(linreg_with_sigma), (x, x[:, 0]), epochs=3,
            swa_start=1, swa_lr=1e-3, batch_size=10, quiet=True)


def linreg_with_sigma(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
        pyro.sample("obs", dist.Normal(x @ w, sigma), obs=y)


def test_an_obs_mask_under_minibatches_points_to_poutine_mask():
    def model(x, y=None, mask=None, num_data=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y, obs_mask=mask)

    x = torch.randn(40)
    with pytest.raises(ValueError, match=r"'obs_unobserved' lies in plate 'data'.*obs_mask "
                                         r"made the masked entries latent.*poutine.mask"):
        fit(model, SWAGCollector(model), (x, x, x > -1), epochs=2, swa_start=0, swa_lr=1e-3,
            batch_size=10, quiet=True)


def test_deterministic_and_factor_sites_are_not_taken_for_unscaled_data():
    def model(x, y=None, num_data=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.deterministic("w_norm", w.norm())  # outside the data plate, scale 1
        pyro.factor("shrink", -0.1 * (w ** 2).sum())  # a prior term, outside the plate
        with pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)

    x, y = make_data()
    guide, _ = fit(model, SWAGCollector(model, rank=2), (x, y), epochs=8, swa_start=2,
                   swa_lr="auto", batch_size=10, quiet=True)
    collector = SWAGCollector(model, rank=2)
    collector(x, y, num_data=60)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 60, 10)]
    # per-example gradients exist (the Delta of pyro.deterministic is no observation)
    assert gradient_noise(model, collector, batches, num_data=60).method == "per_example"
    fit(model, SWAGCollector(model, rank=2), (x, y), epochs=6, swa_start=2, swa_lr="auto",
        batch_size=10, precondition="diag", quiet=True)
    dt = to_datatree(guide, (x, y), model=model, num_draws=40)  # kwargs left out
    assert set(dt.log_likelihood.data_vars) == {"obs"}
    assert "w_norm" in dt.posterior.data_vars and "x" in dt.constant_data.data_vars
