"""The vectorized predictive on less common models, against sequential ``Predictive``:
inverse transforms, return values computed from predicted sites, subsampled plates."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import ExpTransform
from pyro.infer import Predictive

from pyro_swag.predictive import log_likelihood, predictive, sample_latents


def gumbel_model(y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 3):
        pyro.sample("obs", dist.Gumbel(w, 1.0), obs=y)


def inverse_transform_model(y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    flow = [ExpTransform(), ExpTransform().inv]  # the identity, through an inverse transform
    with pyro.plate("data", 3):
        pyro.sample("obs", dist.TransformedDistribution(dist.Normal(w, 1.0), flow), obs=y)


@pytest.mark.parametrize("model", [gumbel_model, inverse_transform_model])
def test_a_predicted_site_with_an_inverse_transform_is_vectorized(model):
    # the inverse of a transform keeps its forward transform (it was dropped as a cache)
    samples = {"w": torch.randn(6)}
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the vectorized path itself
        fast = predictive(model, None, posterior_samples=samples)
    pyro.set_rng_seed(0)
    ref = Predictive(model, posterior_samples=samples)()
    torch.testing.assert_close(fast["obs"], ref["obs"].reshape(6, 3), atol=1e-6, rtol=1e-6)


def test_a_return_value_computed_from_a_predicted_site_is_pyros():
    # NaN placeholders give (NaN > 0) = False: without the second pass _RETURN was all 0
    x = torch.randn(4)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4):
            obs = pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)
        return (obs > 0).float().mean()

    samples = {"w": torch.randn(50)}
    sites = ["obs", "_RETURN"]
    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning, match="uses a predicted site's value"):
        fast = predictive(model, None, x, posterior_samples=samples, return_sites=sites)
    pyro.set_rng_seed(0)
    ref = Predictive(model, posterior_samples=samples, return_sites=sites)(x)
    assert torch.equal(fast["_RETURN"], ref["_RETURN"]) and ref["_RETURN"].max() > 0


def test_a_return_value_of_the_latents_alone_stays_vectorized():
    def model(y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4):
            pyro.sample("obs", dist.Normal(w, 1.0), obs=y)
        return 2 * w

    samples = {"w": torch.randn(8)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = predictive(model, None, posterior_samples=samples, return_sites=["_RETURN"])
    torch.testing.assert_close(out["_RETURN"], 2 * samples["w"])


def subsampled_model(y=None, subsample=None):
    x = torch.arange(10.0)
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 10, subsample_size=4, subsample=subsample) as idx:
        pyro.sample("obs", dist.Normal(w + x[idx], 1.0), obs=None if y is None else y[idx])


def test_log_likelihood_refuses_a_random_subsample_and_takes_fixed_indices():
    y, samples = torch.zeros(10), {"w": torch.zeros(5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # randperm: the per-draw loop
        with pytest.raises(ValueError, match="plate 'data' draws a new random subsample"):
            log_likelihood(subsampled_model, samples, y=y)
    idx = torch.tensor([7, 1, 4, 2])
    ll = log_likelihood(subsampled_model, samples, y=y, subsample=idx)["obs"]
    expected = dist.Normal(idx.float(), 1.0).log_prob(torch.zeros(4))
    torch.testing.assert_close(ll, expected.expand(5, 4))


def test_numpy_counts_are_accepted_as_by_predictive():
    samples = {"w": torch.randn(6)}
    pyro.set_rng_seed(0)
    out = predictive(gumbel_model, None, posterior_samples=samples, chunk_size=np.int64(4))
    pyro.set_rng_seed(0)
    ref = predictive(gumbel_model, None, posterior_samples=samples)
    torch.testing.assert_close(out["obs"], ref["obs"])
    guide = pyro.infer.autoguide.AutoDiagonalNormal(gumbel_model)
    assert sample_latents(guide, np.int64(3), torch.zeros(3)).shape == (3, 1)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got num_samples=T"):
        sample_latents(guide, True)
