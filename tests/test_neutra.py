"""SWAGGuide.get_transform: the bijection onto the SWAG Gaussian, and NUTS whitened by it."""

import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.reparam import NeuTraReparam
from test_autoguide import _collector_with, _conjugate, linreg

from pyro_swag import MultiSWAG, SWAGCollector
from pyro_swag.datatree import to_datatree


@pytest.mark.parametrize("diagonal, rank, n", [(False, 4, 9), (True, 4, 9), (False, 2, 3),
                                               (False, 0, 2)])
def test_transform_maps_the_base_onto_the_posterior(diagonal, rank, n):
    torch.manual_seed(rank + n)
    snaps = [torch.randn(5) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]) for _ in range(n)]
    c = _collector_with(snaps, rank=max(rank, 1))
    guide = c.swag_guide(scale=0.7, diagonal=diagonal)
    if rank == 0:
        guide.deviations = guide.deviations[:0]
    t = guide.get_transform()
    post = guide.get_posterior()
    cov = torch.diag(post.variance) if diagonal or rank == 0 else post.covariance_matrix
    a = (t(torch.eye(5)) - guide.loc).double().T  # column i: T(e_i) - mu = A e_i
    torch.testing.assert_close(a @ a.T, cov.double(), rtol=1e-4, atol=1e-5)
    z = torch.randn(7, 5)
    torch.testing.assert_close(t.inv(t(z)), z, rtol=1e-4, atol=1e-5)
    logdet = t.log_abs_det_jacobian(z, t(z))
    assert logdet.shape == (7,)
    torch.testing.assert_close(logdet.double(), torch.linalg.slogdet(a)[1].expand(7),
                               rtol=1e-4, atol=1e-4)
    pushed = dist.TransformedDistribution(guide.get_base_dist(), t)
    x = post.sample((6,))
    torch.testing.assert_close(pushed.log_prob(x), post.log_prob(x), rtol=1e-4, atol=1e-3)


def test_nuts_whitened_by_swag_samples_the_exact_posterior_and_exports():
    """The transform only changes NUTS's geometry: on the conjugate model the draws still
    have the closed-form posterior's moments, however rough the SWAG fit."""
    x, y, mean, cov = _conjugate()
    c = SWAGCollector(linreg, rank=3)
    c(x, y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # a crude Gaussian: 8 draws of 3x the posterior spread
        c.collect(mean + 3 * torch.randn(3, generator=gen) @ torch.linalg.cholesky(cov).T)
    neutra = NeuTraReparam(c.swag_guide())
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(neutra.reparam(linreg), init_strategy=init_to_median), num_samples=400,
                warmup_steps=200, disable_progbar=True)
    mcmc.run(x, y)
    dt = to_datatree(mcmc, (x,), {"y": y})
    assert list(dt["posterior"].data_vars) == ["w"]  # the model's site, not the whitened one
    assert dt.attrs["method"] == "NUTS whitened by NeuTraReparam(SWAGGuide)"
    w = torch.as_tensor(dt["posterior"]["w"].values).reshape(-1, 3)
    sd = cov.diagonal().sqrt()
    assert ((w.mean(0) - mean).abs() < 4 * sd / 200**0.5).all(), (w.mean(0), mean)  # ESS >= 200
    torch.testing.assert_close(w.std(0), sd, rtol=0.2, atol=0)
    assert dt["log_likelihood"]["y"].shape == (1, 400, len(y))
    # built with poutine.reparam(model, config=...), the draws cannot be mapped back
    other = MCMC(NUTS(pyro.poutine.reparam(linreg, config=lambda _: neutra)), num_samples=3,
                 warmup_steps=3, disable_progbar=True)
    other.run(x, y)
    with pytest.raises(ValueError, match=r"NeuTraReparam draws \(\['w_shared_latent'\]\).*"
                                         r"neutra.reparam\(model\)"):
        to_datatree(other, (x,), {"y": y}, model=linreg)


def test_neutra_example_smoke(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "neutra.py"), "--smoke", "--out",
         str(tmp_path)], check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    assert "NUTS checks: draws 60, divergences" in out and "test log predictive" in out
    assert (tmp_path / "forest.png").stat().st_size > 0


def test_a_multiswag_mixture_is_refused_with_the_way_out():
    snaps = [torch.randn(5) for _ in range(4)]
    multi = MultiSWAG([_collector_with(snaps).swag_guide(), _collector_with(snaps).swag_guide()])
    with pytest.raises(NotImplementedError, match=r"mixture of R Gaussians.*NeuTraReparam\("
                                                  r"guides\[0\]\)"):
        multi.get_transform()
