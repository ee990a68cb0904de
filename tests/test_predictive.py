"""Vectorized predictive against Pyro's sequential Predictive and direct computation."""

import subprocess
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
from torch.distributions import biject_to

from pyro_swag import SWAGCollector
from pyro_swag.models import BayesianMLP
from pyro_swag.predictive import (
    log_joint,
    log_likelihood,
    predictive,
    sample_latents,
    unpack_latents,
)

ROOT = Path(__file__).resolve().parents[1]


def regression_model(x, y=None):
    """Plate over data, constrained noise scale (positive) and df (interval)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    nu = pyro.sample("nu", dist.Uniform(2.0, 10.0))
    mean = pyro.deterministic("mean", x @ w + b)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.StudentT(nu, mean, sigma), obs=y)
    return mean


def group_model(g, y=None):
    """Hierarchical: group-level latents inside a plate, data plate, positive scale."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.HalfCauchy(1.0))
    with pyro.plate("groups", 4):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("data", g.shape[0]):
        pyro.sample("obs", dist.Normal(theta[g], 0.5), obs=y)


def bnn_case(likelihood="gaussian", hidden=(8,)):
    out = 3 if likelihood == "categorical" else 1
    model = BayesianMLP(2, out, hidden=hidden, likelihood=likelihood)
    x = torch.randn(30, 2)
    y = torch.randint(0, 3, (30,)) if likelihood == "categorical" else torch.randn(30)
    return model, (x,), (x, y)


def regression_case():
    x = torch.randn(25, 3)
    return regression_model, (x,), (x, torch.randn(25))


def group_case():
    g = torch.arange(20) % 4
    return group_model, (g,), (g, torch.randn(20))


CASES = {
    "bnn_gaussian": lambda: bnn_case("gaussian"),
    "bnn_categorical": lambda: bnn_case("categorical", (6, 5)),
    "regression": regression_case,
    "groups": group_case,
}


def draws(model, data, num=12):
    guide = AutoLowRankMultivariateNormal(model, init_scale=0.3)
    guide(*data)
    latents = sample_latents(guide, num)
    return guide, latents, unpack_latents(guide, latents)


def pyro_reference(model, samples, args, seed, return_sites=()):
    pyro.set_rng_seed(seed)
    out = Predictive(model, posterior_samples=samples, return_sites=return_sites)(*args)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_same_draws_as_sequential_predictive(case):
    model, args, data = CASES[case]()
    _, _, samples = draws(model, data)
    pyro.set_rng_seed(7)
    ours = predictive(model, None, *args, posterior_samples=samples, chunk_size=5)
    ref = pyro_reference(model, samples, args, 7)
    assert set(ours) == set(ref) and "obs" in ours
    for name, value in ours.items():
        assert value.shape[0] == 12
        assert value.dtype == ref[name].dtype
        torch.testing.assert_close(value, ref[name].reshape(value.shape), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["bnn_gaussian", "regression"])
def test_all_sites_and_return_value(case):
    model, args, data = CASES[case]()
    _, _, samples = draws(model, data, 6)
    sites = [*samples, "obs", "_RETURN"]
    pyro.set_rng_seed(3)
    ours = predictive(model, None, *args, posterior_samples=samples, return_sites=sites)
    ref = pyro_reference(model, samples, args, 3, return_sites=sites)
    assert set(ours) == set(sites)
    for name, value in ours.items():
        torch.testing.assert_close(value, ref[name].reshape(value.shape), atol=1e-5, rtol=1e-5)
        if name in samples:
            assert value.shape == samples[name].shape  # MCMC.get_samples() format


@pytest.mark.parametrize("return_sites", [(), [], set(), None, ["obs"], ("nu", "_RETURN")])
def test_return_sites_as_pyro_predictive(return_sites):
    model, args, data = regression_case()
    guide, _, samples = draws(model, data, 6)
    pyro.set_rng_seed(4)
    ours = predictive(model, None, *args, posterior_samples=samples, return_sites=return_sites)
    ref = pyro_reference(model, samples, args, 4, return_sites=return_sites)
    assert list(ours) == list(ref) and ours
    for name, value in ours.items():
        torch.testing.assert_close(value, ref[name].reshape(value.shape), atol=1e-5, rtol=1e-5)
    # with a guide Pyro returns every sample site for an empty return_sites too
    ours = predictive(model, guide, *args, num_samples=4, return_sites=return_sites)
    ref = Predictive(model, guide=guide, num_samples=4, return_sites=return_sites)(*args)
    assert list(ours) == list(ref)


def test_log_likelihood_takes_predictive_shaped_samples():
    model, _, data = regression_case()
    guide = AutoNormal(model)
    guide(*data)
    pyro.set_rng_seed(0)
    post = Predictive(model, guide=guide, num_samples=4, return_sites=["w", "b", "sigma", "nu"])(
        data[0]
    )
    assert post["w"].shape == (4, 1, 3)  # singleton plate dim
    ll = log_likelihood(model, post, *data)["obs"]
    assert ll.shape == (4, 25)
    shapes = {"w": (3,), "b": (), "sigma": (), "nu": ()}
    for i in range(4):
        draw = {k: v[i].reshape(shapes[k]) for k, v in post.items()}
        site = poutine.trace(poutine.condition(model, draw)).get_trace(*data).nodes["obs"]
        torch.testing.assert_close(ll[i], site["fn"].log_prob(data[1]))
    with pytest.raises(ValueError, match=r"samples 'w' has shape \(4, 2\)"):
        log_likelihood(model, {**post, "w": torch.zeros(4, 2)}, *data)


def test_log_likelihood_missing_latent_is_an_error():
    model, _, data = regression_case()
    _, _, samples = draws(model, data, 3)
    partial = {k: v for k, v in samples.items() if k != "sigma"}
    for given in (partial, {**partial, "sd": samples["sigma"]}):  # missing, or misspelt
        with pytest.raises(ValueError, match=r"sites \['sigma'\] are neither in samples"):
            log_likelihood(model, given, *data)


def test_unconditioned_model_with_deterministic_site():
    # as the ArviZ export uses it: observed sites resampled, deterministic sites kept
    model, _, data = regression_case()
    _, _, samples = draws(model, data, 6)
    free = poutine.uncondition(model)
    pyro.set_rng_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the sequential path
        ours = predictive(
            free, None, *data, posterior_samples=samples, return_sites=["obs", "mean"]
        )
    ref = pyro_reference(free, samples, data, 3, return_sites=["obs", "mean"])
    for name, value in ours.items():
        torch.testing.assert_close(value, ref[name].reshape(value.shape), atol=1e-5, rtol=1e-5)


def test_sequential_path_and_chunks_agree():
    model, args, data = bnn_case()
    _, _, samples = draws(model, data, 10)
    out = {}
    for key, kw in {"seq": dict(parallel=False), "one": {}, "c3": dict(chunk_size=3)}.items():
        pyro.set_rng_seed(11)
        out[key] = predictive(model, None, *args, posterior_samples=samples, **kw)["obs"]
    torch.testing.assert_close(out["one"], out["seq"], atol=1e-5, rtol=1e-5)
    # chunks of 3 draws give the same values as one pass, up to float32 rounding (BLAS may
    # block a smaller matmul differently); a mixed-up draw order would differ by O(1)
    torch.testing.assert_close(out["c3"], out["one"], atol=1e-6, rtol=1e-5)


def test_swag_guide_draws_and_latent_sites():
    model, args, data = bnn_case()
    collector = SWAGCollector(model, rank=3, init_loc_fn=model.init_loc_fn())
    collector(*data)
    for _ in range(5):
        collector.collect(collector.loc.detach() + 0.1 * torch.randn_like(collector.loc))
    guide = collector.swag_guide()
    pyro.set_rng_seed(5)
    out = predictive(model, guide, *args, num_samples=40)
    pyro.set_rng_seed(5)
    latents = guide.get_posterior().sample((40,))
    expected = unpack_latents(guide, latents)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value)
    assert out["obs"].shape == (40, 30)


def test_sample_latents_is_the_posterior_draw():
    # low rank: the same random numbers as rsample, the low-rank term as one matmul (only
    # the summation order differs); the RNG ends in the same state
    model, _, data = regression_case()
    guide, _, _ = draws(model, data)
    pyro.set_rng_seed(2)
    latents = sample_latents(guide, 9)
    after = torch.randn(3)
    pyro.set_rng_seed(2)
    torch.testing.assert_close(latents, guide.get_posterior().sample((9,)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.randn(3), after, atol=0, rtol=0)
    assert latents.shape == (9, guide.latent_dim)


def test_unpack_matches_per_draw_transform():
    model, _, data = group_case()
    guide, latents, values = draws(model, data, 4)
    for i in range(4):
        for site, u in guide._unpack_latent(latents[i]):
            expected = biject_to(site["fn"].support)(u)
            torch.testing.assert_close(values[site["name"]][i], expected)
    assert values["theta"].shape == (4, 4) and (values["tau"] > 0).all()


def test_autonormal_guide():
    model, args, data = regression_case()
    guide = AutoNormal(model)
    guide(*data)
    out = predictive(model, guide, *args, num_samples=7)
    assert out["w"].shape == (7, 3) and out["obs"].shape == (7, 25)
    assert out["mean"].shape == (7, 25)
    torch.testing.assert_close(out["mean"], out["w"] @ args[0].T + out["b"][:, None])
    with pytest.raises(TypeError, match="AutoContinuous"):
        sample_latents(guide, 3)


@pytest.mark.parametrize("case", ["bnn_gaussian", "bnn_categorical", "regression"])
def test_log_likelihood_oracle(case):
    model, _, data = CASES[case]()
    _, _, samples = draws(model, data, 5)
    ll = log_likelihood(model, samples, *data, chunk_size=2)
    assert set(ll) == {"obs"} and ll["obs"].shape == (5, data[0].shape[0])
    for i in range(5):
        draw = {k: v[i] for k, v in samples.items()}
        site = poutine.trace(poutine.condition(model, draw)).get_trace(*data).nodes["obs"]
        torch.testing.assert_close(ll["obs"][i], site["fn"].log_prob(data[1]))


@pytest.mark.parametrize("case", ["bnn_gaussian", "regression", "groups"])
def test_log_joint_oracle(case):
    model, _, data = CASES[case]()
    guide, latents, samples = draws(model, data, 4)
    lp = log_joint(model, guide, latents, *data)
    assert lp.shape == (4,)
    for i in range(4):
        draw = {k: v[i] for k, v in samples.items()}
        expected = poutine.trace(poutine.condition(model, draw)).get_trace(*data).log_prob_sum()
        # log|dz/du| by autograd, one scalar site entry at a time (all transforms here act
        # elementwise)
        for site, u in guide._unpack_latent(latents[i]):
            t = biject_to(site["fn"].support)
            u = u.detach().clone().requires_grad_()
            (grad,) = torch.autograd.grad(t(u).sum(), u)
            expected = expected + grad.abs().log().sum()
        torch.testing.assert_close(lp[i], expected.detach(), atol=1e-3, rtol=1e-5)
    # importance log-weights are finite
    assert torch.isfinite(lp - guide.get_posterior().log_prob(latents)).all()


def mixed_model(x, y=None):
    """Predicted sites of several kinds, interleaved: Normal in a plate (fast path), StudentT
    (generic path), Independent(Normal) outside the plate (fast path)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("t", dist.StudentT(3.0, w * x, s))
        pyro.sample("obs", dist.Normal(w * x, s), obs=y)
    pyro.sample("vec", dist.Normal(w * x, 1.0).to_event(1))


def test_normal_fast_path_is_the_generic_path(monkeypatch):
    # Normal sites draw their noise per draw, loc + eps * scale once for all draws: bit for
    # bit the per-draw rebuild-and-sample path, and within rounding of sequential Predictive
    vec = pytest.importorskip("pyro_swag._vectorize")
    x = torch.randn(20)
    samples = {"w": torch.randn(9), "s": torch.rand(9) + 0.5}
    plan, spy = vec._normal_plan, []

    def spying(spec, flat):
        spy.append(plan(spec, flat) is not None)
        return plan(spec, flat)

    monkeypatch.setattr(vec, "_normal_plan", spying)
    pyro.set_rng_seed(8)
    fast = predictive(mixed_model, None, x, posterior_samples=samples, chunk_size=4)
    after_fast = torch.randn(2)
    assert spy == [False, True, True] * 3  # t generic; obs, vec fast; 3 chunks
    monkeypatch.setattr(vec, "_normal_plan", lambda spec, flat: None)
    pyro.set_rng_seed(8)
    generic = predictive(mixed_model, None, x, posterior_samples=samples, chunk_size=4)
    assert torch.equal(torch.randn(2), after_fast)  # the same random stream consumed
    ref = pyro_reference(mixed_model, samples, (x,), 8)
    assert set(fast) == {"t", "obs", "vec"}
    for name, value in fast.items():
        torch.testing.assert_close(value, generic[name], atol=0, rtol=0)
        torch.testing.assert_close(value, ref[name].reshape(value.shape), atol=1e-5, rtol=1e-5)


def noisy_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    jitter = 0.01 * torch.randn(x.shape)  # its own randomness: not vectorizable
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(w * x + jitter, 1.0), obs=y)


def feedback_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        obs = pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)
    pyro.deterministic("total", obs.sum())  # uses the predicted value


def chain_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        first = pyro.sample("first", dist.Normal(w * x, 1.0))
        pyro.sample("obs", dist.Normal(first, 0.1), obs=y)


@pytest.mark.parametrize("model", [noisy_model, feedback_model, chain_model])
def test_fallback_to_sequential_with_warning(model):
    x = torch.randn(6)
    samples = {"w": torch.randn(5)}
    with pytest.warns(RuntimeWarning, match="sequential"):
        pyro.set_rng_seed(4)
        ours = predictive(model, None, x, posterior_samples=samples)
    ref = pyro_reference(model, samples, (x,), 4)
    for name, value in ours.items():
        torch.testing.assert_close(value, ref[name].reshape(value.shape))


def test_errors():
    model, args, data = regression_case()
    guide, latents, samples = draws(model, data, 3)
    with pytest.raises(ValueError, match="exactly one"):
        predictive(model, guide, *args, posterior_samples=samples)
    with pytest.raises(ValueError, match="chunk_size"):
        predictive(model, None, *args, posterior_samples=samples, chunk_size=0)
    with pytest.raises(ValueError, match="num_samples"):
        predictive(model, guide, *args, num_samples=-1)
    with pytest.raises(ValueError, match="leading"):
        predictive(
            model, None, *args, posterior_samples={"w": torch.zeros(3, 3), "b": torch.zeros(2)}
        )
    with pytest.raises(ValueError, match="'w' has shape"):
        predictive(model, None, *args, posterior_samples={**samples, "w": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="return_sites"):
        predictive(model, None, *args, posterior_samples=samples, return_sites=["nope"])
    with pytest.raises(TypeError, match="_RETURN"):
        predictive(
            group_model,
            None,
            *group_case()[1],
            posterior_samples={"mu": torch.zeros(2)},
            return_sites=["_RETURN"],
        )
    with pytest.raises(ValueError, match="columns"):
        unpack_latents(guide, latents[:, :-1])
    with pytest.raises(ValueError, match="observed"):
        log_likelihood(model, samples, *args)
    with pytest.raises(RuntimeError, match="set up"):
        unpack_latents(AutoLowRankMultivariateNormal(model), latents)


def test_example_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "predictive.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max |vectorized - sequential|" in proc.stdout


def test_a_predicted_value_fed_forward_through_a_comparison_falls_back():
    def model(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Bernoulli(0.5))  # not in the samples: predicted
            loc = torch.where(z > 0.5, mu + 10.0, mu)  # NaN placeholders vanish here
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)

    samples = {"mu": torch.zeros(500)}
    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning, match="uses a predicted site's value"):
        fast = predictive(model, None, posterior_samples=samples)
    pyro.set_rng_seed(0)
    ref = Predictive(model, posterior_samples=samples)()
    assert torch.equal(fast["obs"], ref["obs"]) and fast["obs"].mean() > 4
