"""Network forward passes: ``forward_draws`` (BatchNorm refresh, dropout) against the
per-draw ``update_bn`` loop, and BayesianMLP's forward against the plain network."""

import copy

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn
from torch.optim.swa_utils import update_bn

from pyro_swag._forward import _refresh_norms
from pyro_swag.models import BayesianMLP
from pyro_swag.predictive import forward_draws


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [(7,), (6, 5)])
def test_bnn_forward_is_the_plain_network(activation, hidden):
    # BayesianMLP's forward (transposed layout, tanh = 2 (sigmoid(2z) - 1/2), in place
    # without autograd) against nn.functional.linear + torch.tanh/relu, values and gradients
    model = BayesianMLP(3, 2, hidden=hidden, likelihood="categorical", activation=activation)
    x = torch.randn(40, 3)
    trace = poutine.trace(model).get_trace(x)
    weights = {k: v["value"].detach() for k, v in trace.nodes.items() if k.startswith("layers")}

    def plain(w):
        h = x
        for i in range(len(hidden) + 1):
            h = torch.nn.functional.linear(h, w[f"layers.{i}.weight"], w[f"layers.{i}.bias"])
            if i < len(hidden):
                h = torch.tanh(h) if activation == "tanh" else torch.relu(h)
        return h

    with torch.no_grad():
        out = poutine.condition(model, weights)(x)
    torch.testing.assert_close(out, plain(weights), atol=2e-6, rtol=1e-5)
    leaves = {k: v.clone().requires_grad_() for k, v in weights.items()}
    ours = poutine.condition(model, leaves)(x)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in weights.items()}
    ref = plain(ref_leaves)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    (ours**2).sum().backward()
    (ref**2).sum().backward()
    for k in weights:
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(5, 4))



def bn_net():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(3, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 2),
    )


def refreshed_draws(net, params, loader):
    """A copy of ``net`` per draw, loaded with it and (``loader``) its BN stats refreshed."""
    for s in range(next(iter(params.values())).shape[0]):
        work = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in work.named_parameters():
                p.copy_(params[name][s])
        if loader is not None:
            update_bn(loader, work)
        yield work


def reference_loop(net, params, x, loader):
    """The reference implementation's way: load each draw, update_bn, forward in eval."""
    outs = []
    for work in refreshed_draws(net, params, loader):
        work.eval()
        with torch.no_grad():
            outs.append(work(x))
    return torch.stack(outs)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_draws_batchnorm_refresh(chunk_size):
    net = bn_net()
    params = {k: v.detach() + 0.2 * torch.randn(5, *v.shape) for k, v in net.named_parameters()}
    loader = [(torch.randn(16, 3) * 2 + 1, torch.zeros(16)) for _ in range(3)]
    x = torch.randn(7, 3)
    state = copy.deepcopy(net.state_dict())
    out = forward_draws(net, params, x, loader=loader, chunk_size=chunk_size)
    assert out.shape == (5, 7, 2)
    torch.testing.assert_close(out, reference_loop(net, params, x, loader), atol=1e-5, rtol=1e-5)
    # the net itself is untouched
    assert net.training and net[1].momentum == 0.1
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=0, rtol=0)
    # without the refresh, the statistics differ (the test above can fail)
    stale = forward_draws(net, params, x, bn_update=False)
    assert (stale - out).abs().max() > 1e-2
    with pytest.raises(ValueError, match="loader"):
        forward_draws(net, params, x)
    with pytest.raises(ValueError, match="not parameters"):
        forward_draws(net, {"nope": torch.zeros(5, 2)}, x, bn_update=False)


def dropout_bn_net(dropout_first):
    torch.manual_seed(2)
    if dropout_first:  # the BatchNorm statistics depend on the dropout masks
        return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.ReLU(),
                             nn.Linear(8, 2))
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 2))


def update_bn_buffers(net, params, loader):
    """Per-draw ``update_bn`` loop: {buffer name: (S, ...)} of the BatchNorm statistics."""
    rows = []
    for work in refreshed_draws(net, params, loader):
        rows.append({k: v for k, v in work.state_dict().items() if "running" in k})
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_forward_draws_with_dropout_and_batchnorm():
    net = dropout_bn_net(dropout_first=False)
    params = {k: v.detach() + 0.2 * torch.randn(4, *v.shape) for k, v in net.named_parameters()}
    loader = [torch.randn(16, 3) * 2 + 1 for _ in range(3)]
    x = torch.randn(5, 3)
    out = forward_draws(net, params, x, loader=loader)
    torch.testing.assert_close(out, reference_loop(net, params, x, loader), atol=1e-5, rtol=1e-5)
    ref = update_bn_buffers(net, params, loader)
    ours = _refresh_norms(net, params, loader)
    assert set(ours) >= set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-5)
    assert net.training


def test_forward_draws_dropout_is_active_in_the_refresh_as_in_update_bn():
    # Dropout before BatchNorm: update_bn's statistics include the dropout noise (train
    # mode), so they match in law only; with Dropout off the variance would be far smaller
    net = dropout_bn_net(dropout_first=True)
    params = {k: v.detach() + 0.2 * torch.randn(3, *v.shape) for k, v in net.named_parameters()}
    loader = [torch.randn(256, 3) * 2 + 1 for _ in range(20)]
    pyro.set_rng_seed(0)
    ref = update_bn_buffers(net, params, loader)["2.running_var"]
    ours = _refresh_norms(net, params, loader)["2.running_var"]
    torch.testing.assert_close(ours, ref, rtol=0.1, atol=0.01)
    off = copy.deepcopy(net)
    off[1].p = 0.0
    without = _refresh_norms(off, params, loader)["2.running_var"]
    assert ((without - ref).abs() > 0.2 * ref).all()  # the check above can fail


def test_forward_draws_matches_module_swag():
    module = pytest.importorskip("pyro_swag.module")
    net = bn_net()
    swag = module.ModuleSWAG(net, rank=3)
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        swag.collect()
    loader = [torch.randn(16, 3) for _ in range(2)]
    x = torch.randn(4, 3)
    torch.manual_seed(9)
    ref = swag.predict(x, 6, loader=loader)
    torch.manual_seed(9)
    thetas = swag.posterior().sample((6,))
    out = forward_draws(net, swag.unflatten(thetas), x, loader=loader)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
