"""Preconditioned SWA phase against closed forms on a conjugate linear regression."""

import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_swag._curvature as curvature
from pyro_swag import SWAGCollector
from pyro_swag.precondition import (
    DAMPING_LADDER,
    PreconditionedSGD,
    choose_preconditioner,
    estimate_preconditioner,
    preconditioned_curvature,
    preconditioned_lr,
)
from pyro_swag.train import fit

N, D, B, SIGMA, PRIOR = 200, 3, 20, 0.5, 2.0


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    x[:, 1] = 0.8 * x[:, 0] + 0.6 * x[:, 1]  # correlated, unequal scales
    x[:, 2] *= 3.0
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + SIGMA * torch.randn(N, generator=g)
    return x, y


def model(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([D]).to_event(1))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(x @ w, SIGMA), obs=y)


def posterior(x, y):
    prec = torch.eye(D) / PRIOR**2 + x.T @ x / SIGMA**2
    cov = torch.linalg.inv(prec)
    return cov @ x.T @ y / SIGMA**2, cov


def at_point(x, y, point):
    collector = SWAGCollector(model)
    collector(x[:B], y[:B], num_data=N)
    with torch.no_grad():
        collector.loc.copy_(point)
    return collector


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_curvature_is_fisher_plus_prior_over_n(kind):
    x, y = make_data()
    point = torch.tensor([0.9, -0.4, 0.35])
    collector = at_point(x, y, point)
    epoch = [(x[i], y[i]) for i in torch.randperm(N).split(B)]
    pre = estimate_preconditioner(model, collector, epoch, num_data=N, kind=kind, damping=1e-3)
    grads = x * ((y - x @ point) / SIGMA**2)[:, None]  # d/dw log p(y_i | w)
    fisher = grads.T @ grads / N + torch.eye(D) / PRIOR**2 / N
    if kind == "diag":
        fisher = torch.diag(fisher.diagonal())
    delta = 1e-3 * float(fisher.diagonal().mean())
    assert pre.damping == pytest.approx(delta, rel=1e-5)
    torch.testing.assert_close(pre.curvature(), fisher + delta * torch.eye(D), rtol=1e-4, atol=1e-6)
    g = torch.randn(D)
    torch.testing.assert_close(
        pre.apply(g), torch.linalg.solve(pre.curvature(), g), rtol=1e-4, atol=1e-6
    )
    centred = grads - grads.mean(0)
    expected = torch.trace(torch.linalg.solve(pre.curvature(), centred.T @ centred)) / (N - 1)
    assert pre.noise_trace == pytest.approx(float(expected), rel=1e-4)
    assert torch.equal(collector.loc.detach(), point)


def test_rates_and_stability_cap_against_closed_forms():
    x, y = make_data()
    collector = at_point(x, y, torch.tensor([0.9, -0.4, 0.35]))
    epoch = [(x[i], y[i]) for i in torch.randperm(N).split(B)]
    pre = estimate_preconditioner(model, collector, epoch, num_data=N, kind="diag")
    hessian = (torch.eye(D) / PRIOR**2 + x.T @ x / SIGMA**2) / N  # per-datum, exact
    lam = preconditioned_curvature(
        model, collector, epoch, pre, num_data=N, iters=50, max_batches=10
    )
    exact = torch.linalg.eigvals(torch.diag(1 / pre.factor) @ hessian).real.max()
    assert lam == pytest.approx(float(exact), rel=1e-3)
    finite = (N - B) / (N - 1)
    matched = preconditioned_lr(pre, num_data=N, batch_size=B, momentum=0.5)
    assert matched == pytest.approx(2 * B * 0.5 / (N * finite))
    kl = preconditioned_lr(pre, num_data=N, batch_size=B, rule="kl")
    assert kl == pytest.approx(2 * D * B / (N * finite * pre.noise_trace))
    capped = preconditioned_lr(pre, num_data=N, batch_size=B, max_curvature=100.0)
    assert capped == pytest.approx(0.5 * 2 / 100.0)
    with pytest.raises(ValueError, match="rule must be 'matched' or 'kl'"):
        preconditioned_lr(pre, num_data=N, batch_size=B, rule="mandt")


def test_auto_damping_ladder():
    x, y = make_data()
    collector = at_point(x, y, torch.tensor([0.9, -0.4, 0.35]))
    epoch = [(x[i], y[i]) for i in torch.randperm(N).split(B)]
    kw = dict(num_data=N, kind="full", batch_size=B, momentum=0.5)
    pre = choose_preconditioner(model, collector, epoch, **kw)
    direct = estimate_preconditioner(model, collector, epoch, num_data=N, damping=DAMPING_LADDER[0])
    assert pre.damping == pytest.approx(direct.damping)  # well-determined: the smallest damping
    assert pre.max_curvature == pytest.approx(1.0, abs=0.2)  # P A ≈ I
    # a limit no damping meets: every rung is tried, the last is kept, with a warning
    with pytest.warns(UserWarning, match="watch the loss"):
        last = choose_preconditioner(model, collector, epoch, **kw, limit=1e-9)
    top = estimate_preconditioner(model, collector, epoch, num_data=N, damping=DAMPING_LADDER[-1])
    assert last.damping == pytest.approx(top.damping)
    assert last.max_curvature < pre.max_curvature  # more damping, smaller P


def test_optimizer_step_is_preconditioned_heavy_ball():
    x, y = make_data()
    pre = estimate_preconditioner(
        model, at_point(x, y, torch.zeros(D)), [(x, y)], num_data=N, kind="full"
    )
    p = torch.nn.Parameter(torch.zeros(D))
    other = torch.nn.Parameter(torch.zeros(2))  # a different size: plain SGD
    opt = PreconditionedSGD([p, other], lr=0.1, momentum=0.5, preconditioner=pre)
    g1, g2 = torch.randn(D), torch.randn(D)
    for g in (g1, g2):
        p.grad, other.grad = g.clone(), torch.ones(2)
        opt.step()
    buf = 0.5 * pre.apply(g1) + pre.apply(g2)
    torch.testing.assert_close(p.detach(), -0.1 * pre.apply(g1) - 0.1 * buf)
    torch.testing.assert_close(other.detach(), -0.1 * torch.ones(2) * 2.5)


def shape_error(guide, cov):
    """max/min over coefficients of the sd ratio q/p (1 = right shape up to one scale)."""
    ratio = guide.marginal_variance().sqrt() / cov.diagonal().sqrt()
    return float(ratio.max() / ratio.min()), ratio


def test_preconditioned_swag_has_the_posterior_shape_and_sgd_does_not():
    """The oracle: per-coefficient sds vs the exact posterior, same budget for both phases."""
    x, y = make_data()
    _, cov = posterior(x, y)
    kw = dict(
        epochs=130,
        swa_start=10,
        swa_lr="auto",
        batch_size=B,
        swa_momentum=0.0,
        collect_every_steps=4,
        seed=1,
        quiet=True,
        optim=pyro.optim.Adam({"lr": 0.05}),
    )
    guide, hist = fit(model, SWAGCollector(model, rank=20), (x, y), precondition="full", **kw)
    assert hist["precondition"] == "full"
    # the matched rate 2B/(N (N-B)/(N-1)): P ≈ A^-1, so the curvature cap does not bind
    assert hist["swa_lr"] == pytest.approx(2 * B / (N * (N - B) / (N - 1)))
    pyro.clear_param_store()
    plain, hist_plain = fit(model, SWAGCollector(model, rank=20), (x, y), **kw)
    assert hist_plain["precondition"] is None
    spread, ratio = shape_error(guide, cov)
    spread_plain, _ = shape_error(plain, cov)
    assert spread < 1.35, ratio
    assert spread_plain > 2.0 * spread
    # epoch reshuffling lowers the noise (an epoch's gradients sum to the full gradient):
    # sds come out somewhat small, by one common factor that calibration removes
    assert 0.45 < float(ratio.min()) and float(ratio.max()) < 1.3


def test_resume_reproduces_preconditioned_run(tmp_path):
    x, y = make_data()
    kw = dict(
        epochs=8, swa_start=3, swa_lr="auto", batch_size=B, seed=3, quiet=True, precondition="diag"
    )
    full, hist = fit(model, SWAGCollector(model, rank=4), (x, y), **kw)
    pyro.clear_param_store()
    ckpt = tmp_path / "ckpt.pt"
    fit(
        model,
        SWAGCollector(model, rank=4),
        (x, y),
        **kw,
        checkpoint=ckpt,
        callback=lambda epoch, history: epoch == 4,
    )
    state = torch.load(ckpt, weights_only=True)
    assert state["precondition"]["kind"] == "diag" and state["config"]["precondition"] == "diag"
    pyro.clear_param_store()
    # stopped inside the SWA phase: the checkpoint's preconditioner is reused (re-estimating
    # it at the epoch-5 point would give other steps)
    resumed, hist2 = fit(
        model, SWAGCollector(model, rank=4), (x, y), **kw, checkpoint=ckpt, resume=True
    )
    assert hist2["loss"] == pytest.approx(hist["loss"], rel=1e-5)
    assert hist2["swa_lr"] == hist["swa_lr"]
    for key in ("loc", "variance", "deviations"):
        torch.testing.assert_close(resumed.state_dict()[key], full.state_dict()[key])
    with pytest.raises(ValueError, match="written with"):
        fit(
            model,
            SWAGCollector(model, rank=4),
            (x, y),
            **{**kw, "precondition": "full"},
            checkpoint=ckpt,
            resume=True,
        )


def test_errors(monkeypatch):
    x, y = make_data()
    kw = dict(epochs=4, swa_start=1, swa_lr=0.1, batch_size=B, quiet=True)
    with pytest.raises(ValueError, match="precondition must be None, 'diag' or 'full'"):
        fit(model, SWAGCollector(model), (x, y), precondition="kfac", **kw)
    with pytest.raises(ValueError, match="precondition_damping must be a positive"):
        fit(model, SWAGCollector(model), (x, y), precondition="full", precondition_damping=-1, **kw)
    collector = at_point(x, y, torch.zeros(D))
    with pytest.raises(ValueError, match="damping must be a positive"):
        estimate_preconditioner(model, collector, [(x, y)], num_data=N, damping=0.0)
    with pytest.raises(RuntimeError, match="not set up"):
        estimate_preconditioner(model, SWAGCollector(model), [(x, y)], num_data=N)
    monkeypatch.setattr(curvature, "MAX_DENSE", 2)
    with pytest.raises(ValueError, match="use precondition='diag'"):
        estimate_preconditioner(model, collector, [(x, y)], num_data=N, kind="full")
    pre = estimate_preconditioner(model, collector, [(x, y)], num_data=N, kind="diag")
    with pytest.raises(RuntimeError, match="batch size smaller than the data"):
        preconditioned_lr(pre, num_data=N, batch_size=N)


def test_example_smoke():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "precondition.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "precondition='full'" in out and "precondition=None" in out


def test_num_data_arg_names_the_models_keyword():
    def model_n(x, y=None, n=None):
        return model(x, y, num_data=n)

    x, y = make_data()
    point = torch.tensor([0.9, -0.4, 0.35])
    epoch = [(x[i], y[i]) for i in torch.arange(N).split(B)]
    ref = estimate_preconditioner(model, at_point(x, y, point), epoch, num_data=N, kind="full")
    pyro.clear_param_store()
    collector = SWAGCollector(model_n)
    collector(x[:B], y[:B], n=N)
    with torch.no_grad():
        collector.loc.copy_(point)
    got = estimate_preconditioner(model_n, collector, epoch, num_data=N, kind="full",
                                  num_data_arg="n")
    torch.testing.assert_close(got.factor, ref.factor)
    lam = preconditioned_curvature(model_n, collector, epoch, got, num_data=N, num_data_arg="n")
    assert lam == pytest.approx(
        preconditioned_curvature(model, at_point(x, y, point), epoch, ref, num_data=N), rel=1e-5
    )
    chosen = choose_preconditioner(model_n, collector, epoch, num_data=N, kind="diag",
                                   batch_size=B, num_data_arg="n")
    assert chosen.kind == "diag" and chosen.max_curvature > 0
