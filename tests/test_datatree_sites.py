"""to_datatree on models with deterministic sites, pyro.factor and masks."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pyro.infer.autoguide import AutoDiagonalNormal  # noqa: E402

from pyro_swag.datatree import loo, to_datatree  # noqa: E402

N, C = 6, 3


def _guide(model, *args):
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(model)
    guide(*args)
    return guide


def test_deterministic_with_event_dims_in_a_plate_gets_the_plate_dim():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, C]).to_event(2))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))  # a local latent on "data" too
            probs = pyro.deterministic("probs", torch.softmax(x @ w + z[:, None], -1),
                                       event_dim=1)
            pyro.sample("obs", dist.Categorical(probs), obs=y)

    x, y = torch.randn(N, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    dt = to_datatree(_guide(model, x, y), (x,), {"y": y}, num_draws=4)
    probs = dt["posterior"]["probs"]
    assert probs.dims == ("chain", "draw", "data", "probs_dim_1")
    assert probs.shape == (1, 4, N, C) and not bool(np.isnan(probs.values).any())


def test_deterministics_see_the_observed_data_and_factors_are_not_observations():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", -(w**2))
        with pyro.plate("data", N):
            a = pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)
            pyro.deterministic("resid", a - w * x)

    x = torch.randn(N)
    y = 2 * x + 0.1 * torch.randn(N)
    guide = _guide(model, x, y)
    dt = to_datatree(guide, (x,), {"y": y}, num_draws=100)
    w = torch.as_tensor(dt["posterior"]["w"].values)[..., None]
    want = y - w * x  # the observed y, not a replicate
    np.testing.assert_allclose(dt["posterior"]["resid"].values, want.numpy(), atol=1e-5)
    for group in ("log_likelihood", "observed_data", "posterior_predictive"):
        assert list(dt[group].data_vars) == ["obs"], group
    assert np.isfinite(float(loo(dt).elpd))
    with pytest.raises(TypeError, match=r"args must be a tuple .* args=\(x,\)"):
        to_datatree(guide, x, {"y": y})
    assert to_datatree(guide, (x,), {"y": y}, num_draws=np.int64(3))["posterior"].sizes[
        "draw"] == 3


def test_loo_names_points_whose_log_likelihood_never_changes():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N):
            mask = torch.arange(N) > 0  # point 0 is masked out
            pyro.sample("obs", dist.Normal(w * x, 1.0).mask(mask), obs=y)

    x = torch.randn(N)
    dt = to_datatree(_guide(model, x, x), (x,), {"y": x}, num_draws=100)
    with pytest.raises(ValueError, match=r"the same in every draw at 1 point\(s\) \(masked"):
        loo(dt, corrected=False)  # plain PSIS-LOO: its weights are 1 / p(y_i | theta)
    # corrected: the weights p / (q p(y_i | theta)) still vary, and the masked point adds 0
    assert float(loo(dt).elpd_i.values[0]) == pytest.approx(0.0, abs=1e-9)
