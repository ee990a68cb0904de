"""beta-NLL pre-training: the weighted loss against a hand-written oracle, errors, effect."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_swag.compare import CompareConfig
from pyro_swag.models import BetaNLL


def _site(mu, sd, y):
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(mu, sd), obs=y)


def _loss(beta, mu, sd, y):
    trace = poutine.trace(BetaNLL(beta)(_site)).get_trace(mu, sd, y)
    return -trace.log_prob_sum()


def test_loss_and_gradient_match_the_detached_weights_oracle():
    torch.manual_seed(0)
    y = torch.randn(12)
    mu = torch.randn(12, requires_grad=True)
    raw = torch.randn(12, requires_grad=True)
    for beta in (0.5, 1.0):
        sd = torch.nn.functional.softplus(raw) + 0.1
        loss = _loss(beta, mu, sd, y)
        grads = torch.autograd.grad(loss, (mu, raw))
        # oracle: w_i = sg(sd_i^(2 beta)) / mean, times the Gaussian NLL
        sd2 = torch.nn.functional.softplus(raw) + 0.1
        w = sd2.detach() ** (2 * beta)
        w = w / w.mean()
        nll = -torch.distributions.Normal(mu, sd2).log_prob(y)
        expected = (w * nll).sum()
        torch.testing.assert_close(loss, expected)
        for g, e in zip(grads, torch.autograd.grad(expected, (mu, raw))):
            torch.testing.assert_close(g, e)
        # on the mean: w_i (mu_i - y_i) / sd_i^2, so at beta=1 the sd drops out up to w's mean
        torch.testing.assert_close(grads[0], w * (mu - y).detach() / sd2.detach() ** 2)
    # the weights carry no gradient: differentiating them too gives another answer
    def sd_of():
        return torch.nn.functional.softplus(raw) + 0.1

    sd = sd_of()
    w = sd / sd.mean()
    undetached = torch.autograd.grad((w * -dist.Normal(mu, sd).log_prob(y)).sum(), raw)[0]
    assert not torch.allclose(undetached, torch.autograd.grad(_loss(0.5, mu, sd_of(), y), raw)[0])


def test_constant_noise_or_beta_zero_leaves_the_likelihood_unchanged():
    torch.manual_seed(1)
    y, mu = torch.randn(7), torch.randn(7)
    plain = -poutine.trace(_site).get_trace(mu, torch.full((7,), 0.3), y).log_prob_sum()
    torch.testing.assert_close(_loss(0.5, mu, torch.full((7,), 0.3), y), plain)
    sd = torch.rand(7) + 0.1
    plain = -poutine.trace(_site).get_trace(mu, sd, y).log_prob_sum()
    torch.testing.assert_close(_loss(0.0, mu, sd, y), plain)


def test_other_sites_are_not_weighted():
    def model(sd):
        pyro.sample("w", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))
        _site(torch.zeros(3), sd, torch.ones(3))

    sd = torch.tensor([0.1, 1.0, 10.0])
    trace = poutine.trace(BetaNLL(0.5)(model)).get_trace(sd)
    trace.compute_log_prob()
    assert trace.nodes["w"]["scale"] == 1.0
    torch.testing.assert_close(trace.nodes["obs"]["scale"], sd / sd.mean())


@pytest.mark.parametrize("beta", [-0.1, 1.5, "0.5", None, True, float("nan")])
def test_bad_beta_names_the_argument(beta):
    with pytest.raises(ValueError, match=f"beta must be a number in \\[0, 1\\], got beta={beta!r}"):
        BetaNLL(beta)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pretrain_beta=0.5), "only changes a heteroscedastic network's fit"),
    (dict(pretrain_beta=0.0, heteroscedastic=True), "pretrain_beta must be None or a number"),
    (dict(pretrain_beta=2, heteroscedastic=True), "got pretrain_beta=2"),
    (dict(pretrain_beta=True, heteroscedastic=True), "got pretrain_beta=True"),
])
def test_bad_pretrain_beta_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompareConfig(**kwargs)


def _exponential(n: int, seed: int):
    """y = exp(2.5 x) (1 + 0.05 eps) on [-1, 1], standardised: a noise sd growing with y,
    the shape of UCI yacht, where a heteroscedastic network's plain fit gives up the mean."""
    from pyro_swag.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    f = torch.exp(2.5 * x[:, 0])
    y = f * (1 + 0.05 * torch.randn(n, generator=g))
    z = (y - y.mean()) / y.std()
    return Dataset("exp", "gaussian", x, z, x[::3], z[::3], float(y.mean()), float(y.std()), 1, 0)


def test_beta_nll_keeps_the_mean_where_the_plain_fit_gives_it_up():
    from pyro_swag.compare import compare, quick_config

    data, rmse = _exponential(300, 0), {}
    for beta in (None, 0.5):
        cfg = quick_config(pretrain_steps=600, methods=("map",), heteroscedastic=True,
                           pretrain_beta=beta, num_samples=10, pretrain_val_fraction=0.0)
        pyro.set_rng_seed(0)
        rmse[beta] = compare(data, None, config=cfg, quiet=True)["methods"]["map"]["rmse"]
    assert rmse[None] > 1.0  # the plain fit's mean misses the large-y points ...
    assert rmse[0.5] < 0.3 * rmse[None]  # ... beta-NLL's does not


def test_cli_refuses_beta_without_a_heteroscedastic_network(tmp_path, capsys):
    from pyro_swag.cli import main

    code = main(["compare", "--pretrain-beta", "0.5", "--quick", "--out", str(tmp_path / "o"),
                 "--quiet"])
    assert code == 2 and "set heteroscedastic=True" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("likelihood, out, y", [
    ("categorical", 3, torch.tensor([0, 1, 2, 0])),
    ("bernoulli", 1, torch.tensor([0.0, 1.0, 1.0, 0.0])),
])
def test_non_gaussian_likelihoods_are_refused(likelihood, out, y):
    from pyro_swag.models import BayesianMLP

    m = BetaNLL(0.5)(BayesianMLP(2, out, hidden=(4,), likelihood=likelihood))
    name = "Categorical" if likelihood == "categorical" else "Bernoulli"
    with pytest.raises(ValueError, match=f"BetaNLL: site 'obs' has a {name} likelihood; beta-NLL "
                                         f"applies to Gaussian likelihoods"):
        poutine.trace(m).get_trace(torch.randn(4, 2), y)
    with pytest.raises(ValueError, match="non-finite variance likelihood"):
        poutine.trace(BetaNLL(0.5)(_site)).get_trace(torch.zeros(3), torch.tensor(math.inf),
                                                     torch.zeros(3))


def _unscaled(x, y=None):
    """Forgets the full data size: BetaNLL's per-point scale then has mean 1, not N / B."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x.sum(-1), x.abs().sum(-1) + 0.1), obs=y)


def test_fit_checks_the_mean_of_beta_nll_per_point_scale():
    from pyro_swag import SWAGCollector
    from pyro_swag.models import BayesianMLP
    from pyro_swag.train import fit

    torch.manual_seed(0)
    x, y = torch.randn(100, 2), torch.randn(100)
    m = BetaNLL(0.5)(BayesianMLP(2, 1, hidden=(8,), noise="heteroscedastic"))
    guide, history = fit(m, SWAGCollector(m, rank=3), (x, y), epochs=4, swa_start=2,
                         swa_lr=1e-3, batch_size=20, quiet=True)  # check_scaling=True
    assert guide is not None and all(math.isfinite(v) for v in history["loss"])
    trace = poutine.trace(m).get_trace(x[:20], y[:20], num_data=100)  # per point, mean N / B
    assert trace.nodes["obs"]["scale"].shape == (20,)
    assert float(trace.nodes["obs"]["scale"].mean()) == pytest.approx(5.0)
    pyro.clear_param_store()
    bad = BetaNLL(0.5)(_unscaled)
    with pytest.raises(ValueError, match="'obs' has likelihood scale 1 \\(mean over the batch\\) "
                                         "instead of 5: the model does not declare"):
        fit(bad, SWAGCollector(bad), (x, y), epochs=4, swa_start=2, swa_lr=1e-3, batch_size=20,
            quiet=True)


def test_gradient_noise_weights_each_point_by_its_beta_nll_weight():
    """Per-example gradients carry BetaNLL's per-point weights (relative to their mean)."""
    from pyro_swag import SWAGCollector
    from pyro_swag.lr import _per_example_grads

    def model(x, y=None, num_data=None):
        m = pyro.sample("m", dist.Normal(0.0, 10.0))
        with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(len(x))):
            pyro.sample("obs", dist.Normal(m, x), obs=y)  # x: a per-point sd

    x = torch.tensor([0.1, 0.5, 1.0, 4.0])
    y = torch.tensor([0.3, -0.2, 1.0, 2.0])
    weights = {0.0: torch.ones(4), 1.0: x**2 / (x**2).mean()}  # sd^(2 beta), mean 1
    for beta, weight in weights.items():
        pyro.clear_param_store()
        wrapped = BetaNLL(beta)(model)
        collector = SWAGCollector(wrapped)
        collector(x, y, num_data=40)
        grads = _per_example_grads(wrapped, collector, (x, y), 40)[:, 0]
        m = float(collector.loc.detach())
        plain = (y - m) / x**2  # d/dm log N(y | m, x)
        torch.testing.assert_close(grads, plain * weight)
