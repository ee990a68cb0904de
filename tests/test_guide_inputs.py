"""SWAGCollector / SWAGGuide / SWAGMoments: refused input, partial checkpoints, fresh guides."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive

from pyro_swag import SWAGCollector, SWAGGuide, SWAGMoments


def model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, s), obs=y)


def with_extra_latent(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    b = pyro.sample("b", dist.Normal(100.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w + b, s), obs=y)


def _collector(n=4, rank=3):
    torch.manual_seed(0)
    x = torch.randn(10, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.1 * torch.randn(10)
    c = SWAGCollector(model, rank=rank)
    c(x, y)
    for _ in range(n):
        c.collect(torch.randn(3))
    return c, x


def test_a_reloaded_guide_leaves_sites_outside_its_layout_to_the_model_as_a_fresh_one_does():
    """Pyro's rule for a set-up autoguide: a site it has no entry for is the model's (an
    unobserved y, a prediction-only site); the reloaded guide must agree with the fresh one."""
    c, x = _collector()
    fresh = c.swag_guide()
    reloaded = SWAGGuide.from_state_dict(with_extra_latent, fresh.state_dict())
    pyro.set_rng_seed(0)
    a = Predictive(with_extra_latent, guide=fresh, num_samples=400)(x)
    pyro.set_rng_seed(0)
    b = Predictive(with_extra_latent, guide=reloaded, num_samples=400)(x)
    for draws in (a, b):
        assert abs(float(draws["b"].mean()) - 100.0) < 0.2  # from the model's N(100, 1)
    torch.testing.assert_close(a["w"], b["w"])
    assert set(SWAGGuide.from_state_dict(model, fresh.state_dict()).median(x)) == {"w", "s"}


def test_median_and_quantiles_of_a_fresh_guide_set_it_up():
    c, x = _collector()
    guide = c.swag_guide()
    fresh = SWAGGuide.from_state_dict(model, guide.state_dict())
    for key, value in guide.median(x).items():
        torch.testing.assert_close(fresh.median(x)[key], value)
    q = fresh.quantiles([0.1, 0.9], x)
    assert q["w"].shape == (2, 2) and bool((q["w"][0] < q["w"][1]).all())
    with pytest.raises(RuntimeError, match="needs the model's arguments"):
        SWAGGuide.from_state_dict(model, guide.state_dict()).median()


def test_collector_load_state_dict_checks_every_key_before_changing_anything():
    c, _ = _collector()
    full = c.state_dict()
    target, _ = _collector(n=3)
    before = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
    count = target.num_snapshots
    for drop in ("loc", "moments._extra_state", "moments.deviations", "moments.m2"):
        partial = {k: v for k, v in full.items() if k != drop}
        with pytest.raises(ValueError, match="lacks|not a matching"):
            target.load_state_dict(partial)
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        target.load_state_dict({**full, "extra": torch.zeros(1)})
    for key, value in before.items():
        assert torch.equal(target.state_dict()[key], value), key
    assert target.num_snapshots == count
    result = target.load_state_dict(full)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert target.num_snapshots == c.num_snapshots
    torch.testing.assert_close(target.moments.variance(), c.moments.variance())
    kept = target.loc.detach().clone()
    loose = target.load_state_dict({k: v for k, v in full.items() if k != "loc"}, strict=False)
    assert loose.missing_keys == ["loc"] and torch.equal(target.loc.detach(), kept)
    point = {"loc": torch.full_like(kept, 3.0), "_extra_state": full["_extra_state"]}
    only = target.load_state_dict(point, strict=False)  # the point alone, moments kept
    assert only.missing_keys == ["moments._extra_state"] and target.num_snapshots == c.num_snapshots
    assert bool((target.loc.detach() == 3.0).all())
    with pytest.raises(ValueError, match="lacks \\['moments._extra_state'\\]"):
        target.load_state_dict(point)


def test_fresh_moments_refuse_a_partial_state_with_a_clear_error():
    m = SWAGMoments(rank=2)
    for _ in range(3):
        m.update(torch.randn(4))
    state = m.state_dict()
    fresh = SWAGMoments(rank=2)
    with pytest.raises(ValueError, match="not a matching m2 and deviations"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "deviations"})
    with pytest.raises(ValueError, match="lacks _extra_state"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"})
    assert fresh.mean is None and fresh.count == 0


@pytest.mark.parametrize("bad", ["bfloat16", torch.int32])
def test_deviation_dtype_must_be_a_floating_torch_dtype(bad):
    with pytest.raises(TypeError, match="deviation_dtype must be a floating torch.dtype"):
        SWAGMoments(rank=2, deviation_dtype=bad)
    with pytest.raises(TypeError, match="deviation_dtype"):
        SWAGCollector(model, deviation_dtype=bad)


def test_numpy_numbers_accepted_and_bad_numbers_refused():
    m = SWAGMoments(rank=np.int64(3), min_var=np.float32(1e-8))
    assert m.rank == 3 and isinstance(m.rank, int)
    for bad in (float("inf"), "1e-3", float("nan"), -1.0):
        with pytest.raises(ValueError, match="min_var must be a finite number >= 0"):
            SWAGMoments(min_var=bad)
    with pytest.raises(ValueError, match="min_var must be a positive finite number"):
        SWAGCollector(model, min_var=0.0)
    c, _ = _collector()
    guide = c.swag_guide(scale=np.float32(0.5))
    assert guide.scale == 0.5
    for bad in (True, 0.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            guide.scale = bad
    assert guide.scale == 0.5
    with pytest.raises(TypeError, match="diagonal must be True or False"):
        c.swag_guide(diagonal="no")


def test_guide_constructor_refuses_unusable_moments():
    loc, var, dev = torch.zeros(3), torch.ones(3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="variance must be finite and > 0.*min_var > 0"):
        SWAGGuide(model, loc, torch.tensor([0.0, 1.0, 1.0]), dev)
    with pytest.raises(ValueError, match="loc and deviations must be finite"):
        SWAGGuide(model, torch.tensor([0.0, float("nan"), 0.0]), var, dev)
    with pytest.raises(ValueError, match="loc and deviations must be finite"):
        SWAGGuide(model, loc, var, torch.full((2, 3), float("inf")))
    with pytest.raises(TypeError, match="variance has dtype=torch.float64 but loc"):
        SWAGGuide(model, loc, var.double(), dev)
    with pytest.raises(TypeError, match="loc must be a floating-point torch.Tensor, got list"):
        SWAGGuide(model, [0.0, 0.0, 0.0], var, dev)
    half = SWAGGuide(model, loc, var, dev.bfloat16())  # low-precision deviations are fine
    assert half.cov_factor().dtype == torch.float32


def test_guide_without_layout_says_how_to_give_one():
    c, x = _collector()
    g = c.swag_guide()
    bare = SWAGGuide(model, g.loc, g.variance, g.deviations)
    with pytest.raises(ValueError, match="pass layout="):
        Predictive(model, guide=bare, num_samples=2)(x)
