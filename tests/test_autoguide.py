"""SWAGCollector / SWAGGuide: oracle posterior, conjugate model, Predictive, persistence, errors."""

import subprocess
import sys
import textwrap
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_swag import MultiSWAG, SWAGCollector, SWAGGuide, fit
from pyro_swag.datatree import to_datatree
from pyro_swag.moments import unmoved


def mixed_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w + p[0], s), obs=y)


def _data(n=20):
    x = torch.randn(n, 2)
    return x, x @ torch.tensor([1.0, -0.5]) + 0.3 * torch.randn(n)


def _collector_with(snaps, rank=5, model=mixed_model):
    x, y = _data()
    c = SWAGCollector(model, rank=rank)
    c(x, y)  # sets up the latent layout
    for s in snaps:
        c.collect(s)
    return c


# ------------------------------------------------------------------ oracle posterior
@pytest.mark.parametrize("n", [2, 4, 6, 7, 40])
def test_posterior_covariance_matches_direct_computation(n):
    rank = 6
    torch.manual_seed(n)
    snaps = [torch.randn(5) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]) for _ in range(n)]
    guide = _collector_with(snaps, rank).swag_guide()
    stacked = torch.stack(snaps).double()
    mean = stacked.mean(0)
    var = stacked.var(0, unbiased=False)
    running = torch.cumsum(stacked, 0) / torch.arange(1, n + 1)[:, None]
    D = (stacked - running)[1:][-rank:].T  # P x K'
    k = D.shape[1]
    expected = 0.5 * (torch.diag(var) + D @ D.T / max(k - 1, 1))
    post = guide.get_posterior()
    torch.testing.assert_close(post.loc.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(post.covariance_matrix.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        guide.marginal_variance().double(), expected.diagonal(), rtol=1e-4, atol=1e-6
    )
    guide.scale = 0.3
    torch.testing.assert_close(
        guide.get_posterior().covariance_matrix.double(), 0.3 * expected, rtol=1e-4, atol=1e-5
    )
    diag = _collector_with(snaps, rank).swag_guide(scale=2.0, diagonal=True).get_posterior()
    torch.testing.assert_close(diag.variance.double(), 2.0 * var, rtol=1e-4, atol=1e-6)


def test_median_and_quantiles_in_constrained_space():
    torch.manual_seed(0)
    guide = _collector_with([torch.randn(5) for _ in range(10)]).swag_guide()
    med = guide.median()
    assert med["s"] > 0 and torch.allclose(med["p"].sum(), torch.tensor(1.0))
    q = guide.quantiles([0.1, 0.9])
    assert (q["w"][0] < q["w"][1]).all() and (q["s"] > 0).all()


# ------------------------------------------------------------------ conjugate model
PRIOR_SD, NOISE_SD = 1.0, 0.5


def linreg(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, PRIOR_SD).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("y", dist.Normal(x @ w, NOISE_SD), obs=y)


def _conjugate(n=100, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + NOISE_SD * torch.randn(n, generator=g)
    prec = torch.eye(d) / PRIOR_SD**2 + x.T @ x / NOISE_SD**2
    cov = torch.linalg.inv(prec)
    return x, y, cov @ x.T @ y / NOISE_SD**2, cov


def test_unmoved_coordinates_are_named_by_site_when_the_guide_is_built():
    torch.manual_seed(0)
    snaps = [torch.randn(5) for _ in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every coordinate moved: no warning
        _collector_with(snaps).swag_guide()
    for s in snaps:
        s[3] = -0.7  # one simplex coordinate of "p" never moves
    with pytest.warns(RuntimeWarning, match=r"1 of 5 coordinates did not move over the 6 "
                      r"snapshots \('p': 1\)"):
        guide = _collector_with(snaps).swag_guide()
    assert guide.marginal_variance()[3] < 1e-20  # what the warning is about
    assert unmoved(torch.tensor([0.0, 1e3, 1e3]), torch.tensor([0.0, 1e-8, 1e-4])).tolist() == [
        True, True, False]  # relative to max(|mean|, 1)


def test_a_latent_the_data_never_see_is_flagged_after_fit():
    """The Dirichlet's second and third components enter the likelihood nowhere: SGD's
    gradient along their ratio is the prior's alone, without noise, so SWAG keeps it fixed."""

    def model(y, num_data=None):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
        with pyro.plate("data", num_data or len(y), subsample_size=len(y)):
            pyro.sample("obs", dist.Poisson(6 * w[0]), obs=y)

    y = dist.Poisson(2.0).sample((200,))
    with pytest.warns(RuntimeWarning, match=r"did not move.*\('w': 1\)"):
        fit(model, SWAGCollector(model), (y,), epochs=8, swa_start=4, swa_lr=1e-3,
            batch_size=20, quiet=True, seed=0)


def test_conjugate_exact_draws_give_posterior_mean():
    x, y, mean, cov = _conjugate()
    c = SWAGCollector(linreg, rank=10)
    c(x, y)
    n = 4000
    draws = dist.MultivariateNormal(mean, cov).sample((n,))
    for d in draws:
        c.collect(d)
    guide = c.swag_guide()
    sd = cov.diagonal().sqrt()
    assert ((guide.loc - mean).abs() < 4 * sd / n**0.5).all()
    # Exact draws: the diagonal moment estimates the posterior variance.
    torch.testing.assert_close(c.moments.variance(), cov.diagonal(), rtol=0.1, atol=0)


def test_conjugate_constant_lr_sgd_swag_mean():
    x, y, mean, cov = _conjugate()
    c = SWAGCollector(linreg, rank=10)
    svi = SVI(linreg, c, pyro.optim.SGD({"lr": 2e-4}), Trace_ELBO())
    gen = torch.Generator().manual_seed(1)
    for step in range(3000):
        idx = torch.randint(0, len(x), (10,), generator=gen)
        svi.step(x[idx], y[idx], num_data=len(x))
        if step >= 1000 and step % 10 == 0:
            c.collect()
    guide = c.swag_guide()
    z = (guide.loc - mean).abs() / cov.diagonal().sqrt()
    assert (z < 3).all(), z


# ------------------------------------------------------------------ Predictive
def test_predictive_draws_have_guide_moments_and_shapes():
    torch.manual_seed(0)
    snaps = [torch.randn(5) * 0.3 + torch.tensor([1.0, -1.0, -0.5, 0.2, -0.3]) for _ in range(30)]
    c = _collector_with(snaps)
    guide = c.swag_guide()
    x, _ = _data()
    S = 2000
    samples = Predictive(mixed_model, guide=guide, num_samples=S)(x)
    parts = []
    for name, site in c.prototype_trace.iter_stochastic_nodes():
        value = samples[name].reshape(S, *site["value"].shape)
        parts.append(biject_to(site["fn"].support).inv(value).reshape(S, -1))
    flat = torch.cat(parts, -1)
    post = guide.get_posterior()
    sd = post.variance.sqrt()
    assert ((flat.mean(0) - post.loc).abs() < 5 * sd / S**0.5).all()
    torch.testing.assert_close(torch.cov(flat.T), post.covariance_matrix, rtol=0.1, atol=0.01)
    # Shapes are Pyro's usual ones (the same as for AutoMultivariateNormal).
    ref = AutoMultivariateNormal(mixed_model)
    ref(x, _data()[1])
    ref_samples = Predictive(mixed_model, guide=ref, num_samples=3)(x)
    assert {k: v.shape[1:] for k, v in samples.items()} == {
        k: v.shape[1:] for k, v in ref_samples.items()
    }
    assert samples["y"].shape == (S, len(x))
    assert (samples["s"] > 0).all() and torch.allclose(samples["p"].sum(-1), torch.tensor(1.0))


# ------------------------------------------------------------------ persistence
def test_guide_save_load_identical_posterior(tmp_path):
    torch.manual_seed(0)
    guide = _collector_with([torch.randn(5) for _ in range(9)]).swag_guide(scale=0.7)
    torch.save(guide.state_dict(), tmp_path / "g.pt")
    loaded = SWAGGuide.from_state_dict(
        mixed_model, torch.load(tmp_path / "g.pt", weights_only=True)
    )
    a, b = guide.get_posterior(), loaded.get_posterior()
    assert loaded.scale == 0.7
    assert torch.equal(a.loc, b.loc) and torch.equal(a.cov_factor, b.cov_factor)
    assert torch.equal(a.cov_diag, b.cov_diag)
    x, _ = _data()
    pyro.set_rng_seed(5)
    s1 = Predictive(mixed_model, guide=guide, num_samples=5)(x)
    pyro.set_rng_seed(5)
    s2 = Predictive(mixed_model, guide=loaded, num_samples=5)(x)
    for k in s1:
        assert torch.equal(s1[k], s2[k])


def test_a_guide_loaded_for_a_float64_model_follows_its_dtype():
    torch.manual_seed(0)
    collector = _collector_with([torch.randn(5) for _ in range(9)])
    state = collector.swag_guide().state_dict()
    state["deviations"] = state["deviations"].to(torch.bfloat16)  # kept low precision
    x, _ = _data()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the model's sites are float64 now
    try:
        guide = SWAGGuide.from_state_dict(mixed_model, state)
        draws = Predictive(mixed_model, guide=guide, num_samples=4)(x.double())
        mixture = MultiSWAG([SWAGGuide.from_state_dict(mixed_model, state)] * 2)
        mixed = Predictive(mixed_model, guide=mixture, num_samples=4)(x.double())
    finally:
        torch.set_default_dtype(prev)
    assert guide.loc.dtype == guide.variance.dtype == torch.float64
    assert guide.deviations.dtype == torch.bfloat16
    assert draws["w"].dtype == draws["y"].dtype == mixed["y"].dtype == torch.float64
    torch.testing.assert_close(guide.loc, state["loc"].double())


def test_pickling_a_guide_leaves_it_working(tmp_path):
    # Pyro's AutoGuide.__getstate__ sets the live guide's model to None; ours keep it
    torch.manual_seed(0)
    collector = _collector_with([torch.randn(5) for _ in range(9)])
    guide = collector.swag_guide()
    x, y = _data()
    torch.save(guide, tmp_path / "g.pkl")
    torch.save(collector, tmp_path / "c.pkl")
    assert callable(guide.model) and callable(collector.model)  # (TypeError before)
    dt = to_datatree(guide, (x, y), num_draws=10)  # needs guide.model
    assert dt["posterior"].sizes["draw"] == 10
    loaded = torch.load(tmp_path / "g.pkl", weights_only=False)
    assert torch.equal(loaded.loc, guide.loc)
    with pytest.raises(TypeError, match="torch.load has none.*pass model="):
        to_datatree(loaded, (x, y), num_draws=10)
    assert to_datatree(loaded, (x, y), model=mixed_model, num_draws=10)["posterior"].sizes[
        "draw"] == 10
    with pytest.raises(TypeError, match=r"MultiSWAG\(guides, model=model\)"):
        MultiSWAG([loaded])
    assert callable(MultiSWAG([loaded], model=mixed_model).model)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch, pyro, pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro_swag import SWAGCollector

    def model(x, y=None, num_data=None):
        w = pyro.sample("w", dist.Normal(0., 1.).expand([3]).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(1.))
        with pyro.plate("data", num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
            pyro.sample("y", dist.Normal(x @ w, s), obs=y)

    mode, path = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1., -1., .5]) + .3 * torch.randn(64, generator=g)
    pyro.set_rng_seed(1)
    c = SWAGCollector(model, rank=4)
    optim = pyro.optim.SGD({"lr": 1e-3, "momentum": 0.9})
    svi = SVI(model, c, optim, Trace_ELBO())
    start, stop = {"full": (0, 40), "first": (0, 20), "rest": (20, 40)}[mode]
    if mode == "rest":
        c(x, y, num_data=64)
        ckpt = torch.load(path + ".ckpt", weights_only=True)
        c.load_state_dict(ckpt["collector"])
        optim.set_state(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
    for step in range(start, stop):
        idx = torch.randint(0, 64, (8,))
        svi.step(x[idx], y[idx], num_data=64)
        if step % 3 == 0:
            c.collect()
    if mode == "first":
        torch.save({"collector": c.state_dict(), "optim": optim.get_state(),
                    "rng": torch.get_rng_state()}, path + ".ckpt")
    else:
        torch.save(c.state_dict(), path)
    """
)


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    full, part = str(tmp_path / "full.pt"), str(tmp_path / "part.pt")
    for mode, path in [("full", full), ("first", part), ("rest", part)]:
        subprocess.run([sys.executable, str(script), mode, path], check=True, timeout=120)
    a = torch.load(full, weights_only=True)
    b = torch.load(part, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert a["moments._extra_state"]["count"] == 14


# ------------------------------------------------------------------ bad input
def test_errors_name_argument_and_leave_state_untouched():
    torch.manual_seed(0)
    c = _collector_with([torch.randn(5) for _ in range(3)])
    before = {k: v.clone() for k, v in c.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="NaN or Inf"):
        c.collect(torch.tensor([0.0, float("inf"), 0, 0, 0]))
    with pytest.raises(ValueError, match=r"latent has shape \(4,\), expected \(5,\)"):
        c.collect(torch.zeros(4))
    with pytest.raises(TypeError, match="latent has dtype=torch.float64"):
        c.collect(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="latent is on device=meta"):
        c.collect(torch.empty(5, device="meta"))
    with pytest.raises(TypeError, match="latent must be a torch.Tensor, got list"):
        c.collect([0.0] * 5)
    assert c.num_snapshots == 3
    for k, v in before.items():
        assert torch.equal(c.state_dict()[k], v)


def test_misuse_errors():
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got rank=0"):
        SWAGCollector(mixed_model, rank=0)
    c = SWAGCollector(mixed_model)
    with pytest.raises(RuntimeError, match=r"call collector\(\*model_args\) once first"):
        c.collect()
    c(*_data())
    c.collect()
    with pytest.raises(RuntimeError, match="needs at least 2 snapshots, 1 collected"):
        c.swag_guide()
    c.collect()
    with pytest.raises(ValueError, match="scale must be a positive finite number, got scale=-1"):
        c.swag_guide(scale=-1)


def test_discrete_latent_site_is_rejected():
    def model():
        pyro.sample("k", dist.Categorical(torch.ones(3)))
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="discrete sample site 'k'"):
        SWAGCollector(model)()


def test_changed_latent_structure_and_foreign_checkpoints():
    def other(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w[:2], 1.0), obs=y)

    torch.manual_seed(0)
    c = _collector_with([torch.randn(5) for _ in range(4)])
    state = c.state_dict()
    x, y = _data()
    d = SWAGCollector(other)
    d(x, y)
    with pytest.raises(ValueError, match="latent structure changed"):
        d.load_state_dict(state)
    with pytest.raises(ValueError, match="construct it with rank=5"):
        e = SWAGCollector(mixed_model, rank=3)
        e(x, y)
        e.load_state_dict(state)
    guide = SWAGGuide.from_state_dict(other, c.swag_guide().state_dict())
    with pytest.raises(ValueError, match="latent structure changed"):
        Predictive(other, guide=guide, num_samples=2)(x)
    with pytest.raises(ValueError, match="lacks"):
        SWAGGuide.from_state_dict(mixed_model, {"loc": torch.zeros(5)})


def test_failed_checkpoint_load_changes_nothing():
    torch.manual_seed(0)
    x, y = _data()
    state = _collector_with([torch.randn(5) for _ in range(4)]).state_dict()
    e = _collector_with([torch.randn(5) for _ in range(3)], rank=3)
    before = {k: v.clone() for k, v in e.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="construct it with rank=5"):
        e.load_state_dict(state)
    wide = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in state.items()}
    f = _collector_with([torch.randn(5) for _ in range(3)])
    with pytest.raises(TypeError, match="dtype=torch.float64 but the snapshots have dtype=torch"):
        f.load_state_dict(wide)
    for k, v in before.items():
        assert torch.equal(e.state_dict()[k], v), k
    assert e.num_snapshots == 3 and f.num_snapshots == 3


def test_loading_an_empty_checkpoint_starts_the_moments_afresh():
    torch.manual_seed(0)
    snaps = [torch.randn(5) for _ in range(3)]
    x, y = _data()
    empty = SWAGCollector(mixed_model, rank=5)
    empty(x, y)
    used = _collector_with([torch.randn(5) for _ in range(6)])
    used.load_state_dict(empty.state_dict())
    assert used.num_snapshots == 0
    fresh = _collector_with(snaps)
    for s in snaps:
        used.collect(s)
    assert torch.equal(used.moments.variance(), fresh.moments.variance())
    assert torch.equal(used.moments.deviation_matrix(), fresh.moments.deviation_matrix())


def test_guide_constructor_refuses_malformed_moments():
    with pytest.raises(ValueError, match=r"deviations \(5,\) must be .*torch.zeros\(0, P\)"):
        SWAGGuide(mixed_model, torch.zeros(5), torch.ones(5), torch.zeros(5))
    with pytest.raises(ValueError, match="variance must be finite and > 0"):
        SWAGGuide(mixed_model, torch.zeros(5), -torch.ones(5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="variance must be finite and > 0"):
        SWAGGuide(mixed_model, torch.zeros(5), torch.full((5,), float("nan")), torch.zeros(2, 5))
