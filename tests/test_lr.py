"""suggest_swa_lr / gradient_noise against closed forms on a conjugate linear regression."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import SGD

from pyro_swag import SWAGCollector
from pyro_swag.lr import gradient_noise, suggest_swa_lr

N, D, B, SIGMA, PRIOR = 120, 3, 12, 0.5, 1.0


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    x[:, 1] += 0.5 * x[:, 0]  # correlated, unequal scales
    x[:, 2] *= 2.0
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + SIGMA * torch.randn(N, generator=g)
    return x, y


def model(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(0.0, PRIOR).expand([D]).to_event(1))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(x @ w, SIGMA), obs=y)


def pyro_grad(w, x, y):
    """Gradient of Pyro's minibatch loss -log p(w) - (N/B) sum log p(y_i | w), by hand."""
    resid = y - (x @ w[..., None]).squeeze(-1)
    return w / PRIOR**2 - (N / x.shape[-2]) * (x * resid[..., None]).sum(-2) / SIGMA**2


def setup(x, y, point):
    collector = SWAGCollector(model)
    collector(x[:B], y[:B], num_data=N)
    with torch.no_grad():
        collector.loc.copy_(point)
    return collector


def batches(x, y, perm):
    return [(x[idx], y[idx]) for idx in perm.split(B)]


def test_gradient_noise_matches_hand_computed_variance():
    x, y = make_data()
    point = torch.tensor([0.8, -0.2, 0.1])
    collector = setup(x, y, point)
    data = batches(x, y, torch.randperm(N))
    stats = gradient_noise(
        model, collector, data, num_data=N, curvature_iters=50, curvature_batches=None
    )
    # per example: N^2/B (N-B)/N Tr Cov_i[grad log p(y_i | w)] (unbiased Cov)
    per = torch.stack([pyro_grad(point, x[i : i + 1], y[i : i + 1]) for i in range(N)]) / N
    expected = N**2 / B * (N - B) / N * float(per.var(0).sum())
    assert stats.method == "per_example"
    assert stats.trace == pytest.approx(expected, rel=1e-4)
    # across batches
    grads = torch.stack([pyro_grad(point, xb, yb) for xb, yb in data])
    batch = gradient_noise(model, collector, data, num_data=N, per_example=False)
    assert batch.method == "batch"
    # the batches of one epoch: their variance is N/(N-B) times a batch's, corrected
    assert batch.trace == pytest.approx(float(grads.var(0).sum()) * (N - B) / N, rel=1e-4)
    assert stats.dim == D and stats.num_batches == N // B and stats.batch_size == B
    assert stats.grad_norm == pytest.approx(float(grads.mean(0).norm()), rel=1e-4)
    hessian = torch.eye(D) / PRIOR**2 + x.T @ x / SIGMA**2
    assert stats.max_curvature == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-3)
    assert torch.equal(collector.loc.detach(), point)  # untouched


def test_rate_formula_per_datum_momentum_and_cap():
    x, y = make_data()
    collector = setup(x, y, torch.tensor([1.0, -0.5, 0.3]))
    data = batches(x, y, torch.randperm(N))
    trace = gradient_noise(model, collector, data, num_data=N).trace
    plain = suggest_swa_lr(model, collector, data, num_data=N, stability_fraction=None)
    assert plain == pytest.approx(2 * D / trace, rel=1e-5)
    mom = suggest_swa_lr(model, collector, data, num_data=N, momentum=0.9, stability_fraction=None)
    assert mom == pytest.approx(0.1 * plain, rel=1e-5)
    per_datum = suggest_swa_lr(
        model, collector, data, num_data=N, per_datum=True, stability_fraction=None
    )
    assert per_datum == pytest.approx(N * plain, rel=1e-5)
    lam = float(torch.linalg.eigvalsh(torch.eye(D) + x.T @ x / SIGMA**2)[-1])
    capped = suggest_swa_lr(model, collector, data, num_data=N, stability_fraction=1e-3)
    assert capped == pytest.approx(1e-3 * 2 / lam, rel=0.15)  # lambda from 8 of 10 batches
    assert capped < plain


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_stationary_covariance_at_suggested_rate(momentum):
    """At eps*, SGD's iterates satisfy Tr(A Sigma) = D: the defining property of the rate.

    The SGD recursion (heavy ball, torch.optim.SGD convention) runs on 200 independent chains
    with independent minibatches (drawn without replacement, as the estimate assumes), using
    Pyro's gradient (checked above) written by hand. The tolerance covers the O(eps * lambda)
    discrete-time terms that the first-order Lyapunov equation drops.
    """
    x, y = make_data(1)
    hessian = torch.eye(D) / PRIOR**2 + x.T @ x / SIGMA**2
    mode = torch.linalg.solve(hessian, x.T @ y / SIGMA**2)
    collector = setup(x, y, mode)
    data = batches(x, y, torch.randperm(N))
    lr = suggest_swa_lr(model, collector, data, num_data=N, momentum=momentum)
    chains, steps = 200, 400
    w = mode.expand(chains, D).clone()
    buf = torch.zeros_like(w)
    g = torch.Generator().manual_seed(2)
    draws = []
    for t in range(steps):
        idx = torch.rand(chains, N, generator=g).argsort(-1)[:, :B]
        buf = momentum * buf + pyro_grad(w, x[idx], y[idx])
        w = w - lr * buf
        if t >= steps // 2 and t % 10 == 0:
            draws.append(w)
    w = torch.cat(draws)
    cov = torch.cov(w.T)
    ratio = float(torch.trace(hessian @ cov)) / D
    assert ratio == pytest.approx(1.0, abs=0.25)


def test_svi_sgd_runs_stably_at_suggested_rate():
    x, y = make_data()
    collector = SWAGCollector(model)
    svi = SVI(model, collector, SGD({"lr": 1e-4}), Trace_ELBO())
    for _ in range(100):
        svi.step(x[:B], y[:B], num_data=N)
    lr = suggest_swa_lr(model, collector, batches(x, y, torch.randperm(N)), num_data=N)
    svi = SVI(model, collector, SGD({"lr": lr}), Trace_ELBO())
    for _ in range(200):
        idx = torch.randint(0, N, (B,))
        svi.step(x[idx], y[idx], num_data=N)
    assert torch.isfinite(collector.loc).all()
    assert (collector.loc.detach() - torch.tensor([1.0, -0.5, 0.3])).abs().max() < 0.3


def test_errors():
    x, y = make_data()
    fresh = SWAGCollector(model)
    data = batches(x, y, torch.arange(N))
    with pytest.raises(RuntimeError, match="not set up"):
        suggest_swa_lr(model, fresh, data, num_data=N)
    collector = setup(x, y, torch.zeros(D))
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        suggest_swa_lr(model, collector, data, num_data=0)
    with pytest.raises(ValueError, match="momentum must be in"):
        suggest_swa_lr(model, collector, data, num_data=N, momentum=1.0)
    with pytest.raises(ValueError, match="stability_fraction"):
        suggest_swa_lr(model, collector, data, num_data=N, stability_fraction=2.0)
    with pytest.raises(ValueError, match="at least 2 minibatches"):
        suggest_swa_lr(model, collector, data[:1], num_data=N)
    with pytest.raises(TypeError, match="tuples of tensors"):
        suggest_swa_lr(model, collector, [{"x": x}], num_data=N)
    with pytest.raises(RuntimeError, match="zero gradient noise"):
        suggest_swa_lr(model, collector, [(x, y), (x, y)], num_data=N)
    assert math.isfinite(suggest_swa_lr(model, collector, data, num_data=N))


def model_n(x, y=None, n=None):
    """``model`` taking its data size as ``n``."""
    return model(x, y, num_data=n)


def test_num_data_arg_names_the_models_keyword():
    x, y = make_data()
    point = torch.tensor([0.9, -0.4, 0.35])
    data = batches(x, y, torch.randperm(N, generator=torch.Generator().manual_seed(0)))
    ref_collector = setup(x, y, point)
    pyro.set_rng_seed(1)  # the power iteration's start
    ref = gradient_noise(model, ref_collector, data, num_data=N, curvature_iters=3)
    pyro.clear_param_store()
    collector = SWAGCollector(model_n)
    collector(x[:B], y[:B], n=N)
    with torch.no_grad():
        collector.loc.copy_(point)
    pyro.set_rng_seed(1)
    got = gradient_noise(model_n, collector, data, num_data=N, num_data_arg="n",
                         curvature_iters=3)
    assert got.method == ref.method == "per_example"
    assert got.trace == pytest.approx(ref.trace, rel=1e-6)
    assert got.max_curvature == pytest.approx(ref.max_curvature, rel=1e-6)
    assert suggest_swa_lr(model_n, collector, data, num_data=N, num_data_arg="n") == (
        pytest.approx(suggest_swa_lr(model, setup(x, y, point), data, num_data=N), rel=1e-6)
    )
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'num_data'"):
        gradient_noise(model_n, collector, data, num_data=N)  # the default keyword
    with pytest.raises(TypeError, match="num_data_arg must be a str or None, got num_data_arg=3"):
        gradient_noise(model_n, collector, data, num_data=N, num_data_arg=3)


@pytest.mark.parametrize("swa_batches", ["epoch", "independent"])
def test_fit_at_the_auto_rate_with_momentum_needs_independent_batches(swa_batches):
    """Through ``fit`` (momentum 0.9, one snapshot per epoch): independent batches give
    Tr(A Sigma) ~ D as derived; reshuffled epochs cancel most of an epoch's noise."""
    from pyro_swag.train import fit

    x, y = make_data(1)
    hessian = torch.eye(D) / PRIOR**2 + x.T @ x / SIGMA**2
    pyro.clear_param_store()
    collector = SWAGCollector(model, rank=2)
    guide, _ = fit(model, collector, (x, y), epochs=460, swa_start=60, swa_lr="auto",
                   batch_size=B, swa_batches=swa_batches, seed=0, quiet=True)
    ratio = float(torch.trace(hessian @ torch.diag(collector.moments.variance()))) / D
    # the diagonal of Sigma against the full A: compare the same quantity for both modes
    if swa_batches == "independent":
        assert 0.6 < ratio < 1.6
    else:
        assert ratio < 0.45


def test_gradient_noise_is_unbiased_for_one_batch_without_replacement():
    """Oracle: Pyro's loss gradient on b of N points drawn without replacement has
    covariance trace N^2/b (N-b)/N Tr S^2 (S^2 the per-example covariance, n-1 divisor).
    The across-batch estimate must average to it over random epochs (the batches of one
    epoch are disjoint, so their raw variance is N/(N-b) = 1.5 times too large with 3 an
    epoch) and the per-example one must equal it (it was N/(N-1) too large)."""
    b = 40
    x, y = make_data()
    point = torch.tensor([0.8, -0.2, 0.1])
    collector = setup(x, y, point)
    per = torch.stack([pyro_grad(point, x[i : i + 1], y[i : i + 1]) for i in range(N)]) / N
    exact = N**2 / b * (N - b) / N * float(per.double().var(0).sum())
    epochs = [[(x[i], y[i]) for i in torch.randperm(N, generator=torch.Generator()
               .manual_seed(s)).split(b)] for s in range(150)]
    assert gradient_noise(model, collector, epochs[0], num_data=N).trace == pytest.approx(
        exact, rel=1e-4)
    raw = [gradient_noise(model, collector, e, num_data=N, per_example=False).trace
           for e in epochs]
    assert sum(raw) / len(raw) == pytest.approx(exact, rel=0.2)  # MC sd ~7 %; the bias was 50 %
    indep = gradient_noise(model, collector, epochs[0], num_data=N, per_example=False,
                           independent_batches=True).trace
    assert indep == pytest.approx(raw[0] * N / (N - b), rel=1e-6)


def test_rate_arguments_are_checked():
    import numpy as np

    from pyro_swag.precondition import preconditioned_lr

    x, y = make_data()
    collector = setup(x, y, torch.zeros(D))
    data = batches(x, y, torch.randperm(N))
    with pytest.raises(ValueError, match=f"num_data=6 is smaller than the batch size {B}"):
        gradient_noise(model, collector, data, num_data=6)
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        gradient_noise(model, collector, data, num_data=True)
    assert suggest_swa_lr(model, collector, data, num_data=np.int64(N),
                          momentum=np.float32(0.5)) > 0
    pre = type("Pre", (), {"noise_trace": 1.0, "dim": D})()
    for kwargs, match in (({"momentum": 1.5}, "momentum must be in"),
                          ({"stability_fraction": -1.0}, "stability_fraction must be in"),
                          ({"batch_size": 0}, "batch_size must be a positive int")):
        with pytest.raises(ValueError, match=match):
            preconditioned_lr(pre, **{"num_data": N, "batch_size": B, **kwargs})
