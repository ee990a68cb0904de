"""MultiSWAG: mixture density against its components, chains, R-hat across runs, fit_runs."""

import os
import subprocess
import sys
from pathlib import Path

import arviz_stats
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide.initialization import init_to_value

from pyro_swag import SWAGCollector, SWAGGuide
from pyro_swag.datatree import to_datatree
from pyro_swag.multiswag import MultiSWAG, fit_runs
from pyro_swag.train import fit

ROOT = Path(__file__).resolve().parents[1]
N, D = 100, 3


def linreg(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(x @ w + b, sigma), obs=y)


def squared(x, y=None, num_data=None):
    """y ~ N(w^2 x, 0.5^2): the posterior of w has two mirror modes at +-sqrt(slope)."""
    w = pyro.sample("w", dist.Normal(0.0, 2.0))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(w**2 * x, 0.5), obs=y)


def fit_swag(model, x, y, init, lr=2e-3, epochs=(25, 40), batch=25):
    """Adam to a mode, then constant-lr SGD collecting one snapshot per epoch."""
    col = SWAGCollector(model, rank=10, init_loc_fn=init)
    # pyro_swag.fit's learning rate is per datum: lr on the summed loss is lr * N there.
    guide, _ = fit(model, col, (x, y), epochs=sum(epochs), swa_start=epochs[0],
                   swa_lr=lr * x.shape[0], swa_momentum=0.0, batch_size=batch,
                   optim=pyro.optim.Adam({"lr": 0.05}), quiet=True)
    return guide


def synthetic_guides(ranks=(2, 4), diagonal=(False, True, False)):
    """SWAG guides of ``linreg`` from made-up moments (no training)."""
    g = torch.Generator().manual_seed(0)
    guides = []
    for i, diag in enumerate(diagonal):
        k = ranks[i % len(ranks)]
        guides.append(SWAGGuide(
            linreg,
            loc=torch.randn(D + 2, generator=g) + 3 * i,
            variance=torch.rand(D + 2, generator=g) + 0.1,
            deviations=torch.randn(k, D + 2, generator=g),
            scale=0.5 + i,
            diagonal=diag,
            layout=[("w", (D,)), ("b", ()), ("sigma", ())],
        ))
    return guides


def test_mixture_density_is_weighted_sum_of_components():
    guides = synthetic_guides()
    weights = torch.tensor([1.0, 2.0, 3.0])
    ms = MultiSWAG(guides, weights=weights)
    theta = torch.randn(50, D + 2) * 3 + 3
    comp = torch.stack([g.get_posterior().log_prob(theta) for g in guides], -1)
    expected = torch.logsumexp(comp + (weights / weights.sum()).log(), -1)
    torch.testing.assert_close(ms.get_posterior().log_prob(theta), expected, rtol=1e-5, atol=1e-4)
    # each padded component keeps its covariance; the mixture variance by total variance
    for r, g in enumerate(guides):
        post = g.get_posterior()
        cov = torch.diag(g.marginal_variance()) if g.diagonal else post.covariance_matrix
        torch.testing.assert_close(ms.components().covariance_matrix[r], cov, rtol=1e-5, atol=1e-6)
    w = weights / weights.sum()
    means = torch.stack([g.loc for g in guides])
    second = torch.stack([g.marginal_variance() + g.loc**2 for g in guides])
    torch.testing.assert_close(ms.marginal_variance(), w @ second - (w @ means) ** 2)


def test_state_dict_round_trip(tmp_path):
    ms = MultiSWAG(synthetic_guides(), weights=[1.0, 2.0, 3.0])
    torch.save(ms.state_dict(), tmp_path / "ms.pt")
    back = MultiSWAG.from_state_dict(linreg, torch.load(tmp_path / "ms.pt", weights_only=True))
    theta = torch.randn(20, D + 2)
    torch.testing.assert_close(back.get_posterior().log_prob(theta),
                               ms.get_posterior().log_prob(theta))
    assert back.layout == ms.layout
    out = Predictive(linreg, guide=back, num_samples=5)(torch.randn(4, D))
    assert out["obs"].shape == (5, 4)
    with pytest.raises(ValueError, match=r"state_dict lacks \['weights'\]"):
        MultiSWAG.from_state_dict(linreg, {k: v for k, v in ms.state_dict().items()
                                           if k != "weights"})


def test_sample_chains_draw_each_run():
    guides = synthetic_guides()
    ms = MultiSWAG(guides)
    chains = ms.sample_chains(4000)
    assert chains.shape == (3, 4000, D + 2)
    for r, g in enumerate(guides):
        sd = g.marginal_variance().sqrt()
        assert ((chains[r].mean(0) - g.loc).abs() < 5 * sd / 4000**0.5).all()


def test_sample_mixture_follows_the_weights():
    guides = synthetic_guides()  # component means ~3 apart per entry
    ms = MultiSWAG(guides, weights=[1.0, 2.0, 5.0])
    pyro.set_rng_seed(0)
    draws = ms.sample_mixture(20000)
    assert draws.shape == (20000, D + 2)
    # the mixture's own sampler draws the same law: compare means and marginal variances
    ref = ms.get_posterior().sample((20000,))
    sd = ms.marginal_variance().sqrt()
    assert ((draws.mean(0) - ms.weights @ ms.loc).abs() < 5 * sd / 20000**0.5).all()
    assert ((ref.mean(0) - draws.mean(0)).abs() < 7 * sd / 20000**0.5).all()
    torch.testing.assert_close(draws.var(0), ms.marginal_variance(), rtol=0.05, atol=0)


def conjugate(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.95, 0.05]])
def test_export_log_q_is_the_density_of_the_draws(weights):
    # importance weights log_p - log_q of the export recover the exact posterior mean only if
    # the exported draws follow log_q; the posterior group is the weighted mixture
    guides = [SWAGGuide(conjugate, torch.tensor([m]), torch.tensor([0.5]), torch.zeros(0, 1),
                        layout=[("w", ())]) for m in (0.5, 1.5)]
    ms = MultiSWAG(guides, weights=weights)
    x = torch.linspace(-1, 1, 10)
    y = x.clone()
    exact = float((x * y).sum() / ((x**2).sum() + 1 / 9))  # 0.9735
    pyro.set_rng_seed(0)
    dt = to_datatree(ms, (x,), {"y": y}, num_draws=20000)
    lw = torch.tensor((dt["sample_stats"]["log_p"] - dt["sample_stats"]["log_q"]).values.ravel())
    w = torch.tensor(dt["posterior"]["w"].values.ravel(), dtype=lw.dtype)
    p = torch.softmax(lw.double(), 0)
    mean = float((p * w).sum())
    se = float((p**2 * (w - mean) ** 2).sum().sqrt())
    assert abs(mean - exact) < 5 * se, (mean, exact, se)  # 1.38 when the draws were equal
    assert dt["posterior"].sizes["chain"] == (2 if weights[0] == weights[1] else 1)
    mix_mean = float(ms.weights @ ms.loc[:, 0])
    mix_sd = float(ms.marginal_variance().sqrt())
    assert abs(float(w.mean()) - mix_mean) < 5 * mix_sd / w.numel() ** 0.5
    theta = torch.tensor(dt["posterior"]["w"].values).reshape(-1, 1)
    torch.testing.assert_close(
        torch.tensor(dt["sample_stats"]["log_q"].values.ravel()),
        ms.get_posterior().log_prob(theta), rtol=1e-5, atol=1e-5,
    )


def test_usable_in_predictive():
    x = torch.randn(7, D)
    ms = MultiSWAG(synthetic_guides())
    out = Predictive(linreg, guide=ms, num_samples=30)(x)
    assert out["obs"].shape == (30, 7) and out["w"].shape[-1] == D
    assert (out["sigma"] > 0).all()


def test_errors():
    guides = synthetic_guides()
    with pytest.raises(ValueError, match="guides is empty"):
        MultiSWAG([])
    with pytest.raises(TypeError, match=r"guides\[1\] is a str"):
        MultiSWAG([guides[0], "nope"])
    other = SWAGGuide(linreg, torch.zeros(4), torch.ones(4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="num_chains=2 but a MultiSWAG guide"):
        to_datatree(MultiSWAG(guides), (torch.randn(5, D),), {"y": torch.randn(5)},
                    num_chains=2)
    with pytest.raises(ValueError, match=r"guides\[1\] has 4 latent entries"):
        MultiSWAG([guides[0], other])
    with pytest.raises(ValueError, match="weights must be 3 positive"):
        MultiSWAG(guides, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="num_draws must be a positive int"):
        MultiSWAG(guides).sample_chains(0)
    with pytest.raises(ValueError, match="num_draws must be a positive int"):
        MultiSWAG(guides).sample_mixture(0)
    with pytest.raises(TypeError, match="expected a SWAGGuide"):
        fit_runs(lambda seed: None, 2, progress=False)
    with pytest.raises(ValueError, match="pass model=the model"):
        fit_runs(_synthetic_run, 2, processes=2, progress=False)


def _synthetic_run(seed):
    """Module level, so spawn workers can unpickle it."""
    return synthetic_guides(diagonal=(False,))[0] if seed == 0 else synthetic_guides()[seed]


@pytest.mark.slow  # two spawned interpreters import torch and pyro: ~10 s of CPU
def test_fit_runs_in_processes_equals_in_process():
    seq = fit_runs(_synthetic_run, [0, 1, 2], progress=False)
    par = fit_runs(_synthetic_run, [0, 1, 2], model=linreg, processes=2, progress=False)
    for name in ("loc", "cov_factor", "cov_diag", "weights"):
        torch.testing.assert_close(getattr(par, name), getattr(seq, name))


@pytest.fixture(scope="module")
def runs():
    pyro.set_rng_seed(3)
    x = torch.randn(N, D)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(N)
    inits = [init_to_value(values={"w": torch.full((D,), v)}) for v in (-2.0, -1.0, 1.0, 2.0)]
    uni = fit_runs(lambda s: fit_swag(linreg, x, y, inits[s], epochs=(50, 40)), 4, progress=False)
    x1 = torch.randn(N)
    y1 = 2.25 * x1 + 0.5 * torch.randn(N)
    signs = [init_to_value(values={"w": torch.tensor(v)}) for v in (1.0, -1.0, 1.0, -1.0)]
    bi = fit_runs(lambda s: fit_swag(squared, x1, y1, signs[s], lr=1e-4), 4, progress=False)
    return {
        "uni": to_datatree(uni, (x,), {"y": y}, num_draws=200),
        "bi": to_datatree(bi, (x1,), {"y": y1}, num_draws=200),
        "bi_guide": bi, "x1": x1,
    }


def test_rhat_near_one_on_unimodal_model(runs):
    dt = runs["uni"]
    assert dt["posterior"].sizes["chain"] == 4
    rhat = arviz_stats.rhat(dt)
    assert max(float(rhat[v].max()) for v in ("w", "b", "sigma")) < 1.1


def test_rhat_flags_two_modes_and_predictive_covers_both(runs):
    rhat = float(arviz_stats.rhat(runs["bi"])["w"])
    assert rhat > 1.1
    w = Predictive(squared, guide=runs["bi_guide"], num_samples=400)(runs["x1"])["w"]
    frac = (w > 0).float().mean().item()
    assert 0.3 < frac < 0.7, frac
    assert (w.abs() - 1.5).abs().max() < 0.3  # both draws sit at the modes +-1.5


def test_example_smoke(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multiswag.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "R-hat" in proc.stdout
    assert (tmp_path / "multiswag_chains.png").exists()



def _fixed_run(model, points):
    """A SWAGGuide whose snapshots are exactly ``points`` (model called without data)."""
    c = SWAGCollector(model, rank=2)
    c()
    for p in points:
        c.collect(torch.tensor([p]))
    return c.swag_guide()


def test_quantiles_and_median_are_the_mixtures():
    def one():
        pyro.sample("w", dist.Normal(0.0, 10.0))

    runs = [_fixed_run(one, [m + 0.1 * (k - 2) for k in range(5)]) for m in (-3.0, 3.0)]
    mix = MultiSWAG(runs, weights=[0.25, 0.75])
    levels = [0.1, 0.2, 0.5, 0.9]  # not 0.25: the whole gap between the runs is its quantile
    got = mix.quantiles(levels)["w"]
    torch.manual_seed(0)
    want = torch.quantile(mix.sample_mixture(200_000)[:, 0], torch.tensor(levels))
    torch.testing.assert_close(got, want, atol=0.02, rtol=0)  # the moment match was 2-4 off
    assert float(mix.median()["w"]) == pytest.approx(float(got[2]), abs=1e-6)
    fresh = MultiSWAG.from_state_dict(one, mix.state_dict())
    torch.testing.assert_close(fresh.quantiles(levels)["w"], got)


def test_members_of_other_dtypes_or_layouts_and_bad_state_are_refused():
    def one():
        pyro.sample("w", dist.Normal(0.0, 10.0))

    g32 = _fixed_run(one, [0.0, 0.1, -0.1])
    g64 = SWAGGuide(one, g32.loc.double(), g32.variance.double(), g32.deviations.double(),
                    layout=g32.layout)
    with pytest.raises(TypeError, match=r"guides\[1\] has dtype=torch.float64"):
        MultiSWAG([g32, g64])
    bare = SWAGGuide(one, g32.loc, g32.variance, g32.deviations)
    other = SWAGGuide(one, g32.loc, g32.variance, g32.deviations, layout=[("v", ())])
    with pytest.raises(ValueError, match=r"guides\[2\] has latent layout"):
        MultiSWAG([bare, g32, other])
    state = MultiSWAG([g32, g32]).state_dict()
    with pytest.raises(ValueError, match="weights must be 2 positive finite numbers"):
        MultiSWAG.from_state_dict(one, {**state, "weights": torch.tensor([-1.0, 2.0])})
    with pytest.raises(ValueError, match=r"must be \(R, P\), \(R, P, K\) and \(R, P\)"):
        MultiSWAG.from_state_dict(one, {**state, "loc": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="weights must be 2 positive finite numbers"):
        MultiSWAG([g32, g32], weights=["a", "b"])


def test_bool_draw_counts_and_fractional_seed_counts_are_refused():
    def one():
        pyro.sample("w", dist.Normal(0.0, 10.0))

    mix = MultiSWAG([_fixed_run(one, [0.0, 0.1, -0.1])])
    for method in (mix.sample_chains, mix.sample_mixture):
        with pytest.raises(ValueError, match="num_draws must be a positive int"):
            method(True)
    with pytest.raises(TypeError, match="seeds must be a number of runs or a list"):
        fit_runs(lambda seed: None, seeds=2.5)
