import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.optim.swa_utils import SWALR
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from pyro_swag import SWAGCollector
from pyro_swag.models import BayesianMLP
from pyro_swag.train import fit

ROOT = Path(__file__).resolve().parents[1]
ALL_DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
SIGMA = 0.5


def linreg(x, y=None, num_data=None):
    """Bayesian linear regression, w ~ N(0, I), y ~ N(x w, SIGMA^2); declares num_data."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    index = torch.arange(x.shape[0], device=x.device)
    with pyro.plate("data", size=num_data or x.shape[0], subsample=index):
        pyro.sample("obs", dist.Normal(x @ w, SIGMA), obs=y)


def unscaled(x, y=None):
    """Forgets the full data size: a minibatch likelihood is not scaled by N / B."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, SIGMA), obs=y)


def make_data(n=200, d=3, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5])[:d]
    y = x @ w + SIGMA * torch.randn(n, generator=g)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_fit_linear_regression_mean_matches_map(device):
    x, y = make_data(device=device)
    collector = SWAGCollector(linreg, rank=5, moments_device="cpu")
    guide, history = fit(
        linreg, collector, (x, y), epochs=30, swa_start=10, swa_lr=0.01, batch_size=20,
        seed=0, quiet=True,
    )
    # oracle: the MAP of the Gaussian posterior, (X'X / s^2 + I)^-1 X'y / s^2
    xc, yc = x.cpu().double(), y.cpu().double()
    map_w = torch.linalg.solve(xc.T @ xc / SIGMA**2 + torch.eye(3, dtype=xc.dtype), xc.T @ yc)
    assert collector.moments.mean.device.type == "cpu"
    torch.testing.assert_close(guide.loc.double(), map_w / SIGMA**2, atol=0.02, rtol=0)
    assert history["phase"] == ["pretrain"] * 10 + ["swa"] * 20
    assert history["snapshots"][-1] == collector.num_snapshots == 20
    assert history["lr"][10:] == pytest.approx([0.01] * 20)
    assert all(math.isfinite(v) for v in history["loss"])
    # per-datum loss: near the Gaussian negative log-likelihood per point at the end
    nll = 0.5 * math.log(2 * math.pi * SIGMA**2) + 0.5
    assert abs(history["loss"][-1] - nll) < 0.3


def test_swalr_schedule_matches_torch():
    x, y = make_data()
    collector = SWAGCollector(linreg, rank=3)
    _, history = fit(
        linreg, collector, (x, y), epochs=8, swa_start=2, swa_lr=0.01, batch_size=50,
        anneal_epochs=3, anneal_strategy="linear", anneal_from=0.05, quiet=True,
    )
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    sched = SWALR(opt, swa_lr=0.01, anneal_epochs=3, anneal_strategy="linear")
    expected = []
    for _ in range(6):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert history["lr"][2:] == pytest.approx(expected)
    assert history["lr"][2] > history["lr"][-1] == pytest.approx(0.01)


def test_collect_every_steps_and_epochs():
    x, y = make_data()
    c1 = SWAGCollector(linreg)
    fit(linreg, c1, (x, y), epochs=5, swa_start=1, swa_lr=0.01, batch_size=40,
        collect_every_steps=3, quiet=True)
    assert c1.num_snapshots == (4 * 5) // 3
    pyro.clear_param_store()
    c2 = SWAGCollector(linreg)
    fit(linreg, c2, (x, y), epochs=7, swa_start=1, swa_lr=0.01, batch_size=40,
        collect_every=2, quiet=True)
    assert c2.num_snapshots == 3


def test_dataloader_and_user_optim_clip():
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=25, shuffle=True)
    optim = pyro.optim.Adam({"lr": 0.05})
    collector = SWAGCollector(linreg)
    guide, history = fit(linreg, collector, loader, epochs=6, swa_start=2, swa_lr=0.01,
                         optim=optim, clip_norm=10.0, quiet=True)
    assert optim.pt_clip_args == {"clip_norm": 10.0}
    assert guide.loc.shape == (3,) and len(history["loss"]) == 6


def test_user_scheduler_stepped_per_pretraining_epoch():
    x, y = make_data()
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "gamma": 0.5}
    )
    _, history = fit(linreg, SWAGCollector(linreg), (x, y), epochs=5, swa_start=3, swa_lr=0.01,
                     batch_size=50, optim=optim, quiet=True)
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.025, 0.01, 0.01])


def test_quiet_prints_nothing_and_bar_shows(capsys):
    x, y = make_data(n=60)
    fit(linreg, SWAGCollector(linreg), (x, y), epochs=3, swa_start=1, swa_lr=0.01,
        batch_size=20, quiet=True)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    pyro.clear_param_store()
    fit(linreg, SWAGCollector(linreg), (x, y), epochs=3, swa_start=1, swa_lr=0.01,
        batch_size=20, quiet=False)
    _, err = capsys.readouterr()
    assert "fit" in err and "loss=" in err and "3/3" in err


def test_network_init_and_pretrained_start():
    torch.manual_seed(0)
    x = torch.randn(40, 2)
    y = x.sum(-1)
    model = BayesianMLP(2, 1, (8,), noise=0.5)
    collector = SWAGCollector(model)
    stop = lambda epoch, history: True  # noqa: E731
    fit(model, collector, (x, y), epochs=3, swa_start=1, swa_lr=0.01, batch_size=20,
        optim=pyro.optim.SGD({"lr": 0.0}), callback=stop, quiet=True)
    unpacked = {site["name"]: v for site, v in collector._unpack_latent(collector.loc.detach())}
    w0 = unpacked["layers.0.weight"]
    torch.testing.assert_close(w0, model._initial["layers.0.weight"])  # fan-in init, not zeros
    # continue from this (already set up) point with a tiny SWA rate: the mean stays there
    start = collector.loc.detach().clone()
    with pytest.warns(UserWarning, match="full-batch SGD"):
        guide, _ = fit(model, collector, (x, y), epochs=3, swa_start=0, swa_lr=1e-9,
                       batch_size=40, quiet=True)
    torch.testing.assert_close(guide.loc, start, atol=1e-6, rtol=0)


def test_errors():
    x, y = make_data(n=50)
    c = SWAGCollector(linreg)
    kw = dict(epochs=4, swa_start=1, swa_lr=0.01, quiet=True)
    with pytest.raises(ValueError, match="swa_start=4 must be < epochs=4"):
        fit(linreg, c, (x, y), **{**kw, "swa_start": 4})
    with pytest.raises(ValueError, match="collect_every must be an integer >= 1"):
        fit(linreg, c, (x, y), **kw, collect_every=0)
    with pytest.raises(ValueError, match="SWAG needs at least 2"):
        fit(linreg, c, (x, y), **{**kw, "swa_start": 3})
    with pytest.raises(ValueError, match="swa_lr must be a positive float"):
        fit(linreg, c, (x, y), **{**kw, "swa_lr": -1.0})
    with pytest.raises(ValueError, match="loader is empty"):
        fit(linreg, c, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=5), **kw)
    with pytest.raises(ValueError, match="batch_size=5 applies to tensor data only"):
        fit(linreg, c, DataLoader(TensorDataset(x, y)), batch_size=5, **kw)
    with pytest.raises(ValueError, match="not the model the collector was built on"):
        fit(unscaled, c, (x, y), **kw)
    cu = SWAGCollector(unscaled)
    with pytest.raises(ValueError, match="does not declare the full data size"):
        fit(unscaled, cu, (x, y), batch_size=10, **kw)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(x, y)

    with pytest.raises(ValueError, match="pass num_data=N"):
        fit(linreg, c, DataLoader(Stream(), batch_size=10), **kw)

    class Empty(IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="yielded no batches"):
        fit(linreg, c, DataLoader(Empty(), batch_size=10), num_data=50, **kw)
    with pytest.raises(RuntimeError, match="lower the learning rate"):
        fit(linreg, c, (x * 1e3, y), **{**kw, "swa_lr": 10.0}, batch_size=10)


def test_auto_swa_lr():
    lr_mod = pytest.importorskip("pyro_swag.lr", reason="pyro_swag.lr (suggest_swa_lr) not there")
    if not hasattr(lr_mod, "suggest_swa_lr"):
        pytest.skip("pyro_swag.lr has no suggest_swa_lr yet")
    x, y = make_data()
    guide, history = fit(linreg, SWAGCollector(linreg), (x, y), epochs=6, swa_start=2,
                         swa_lr="auto", batch_size=20, quiet=True)
    assert history["swa_lr"] > 0 and history["lr"][-1] == pytest.approx(history["swa_lr"])


RESUME = """
import sys, torch, pyro
sys.path.insert(0, {tests!r})
from test_train import linreg, make_data
from pyro_swag import SWAGCollector
from pyro_swag.train import fit
x, y = make_data()
c = SWAGCollector(linreg, rank=4)
guide, h = fit(linreg, c, (x, y), epochs=9, swa_start=3, swa_lr=0.02, batch_size=32, seed=5,
               quiet=True, checkpoint={ckpt!r}, resume=True)
torch.save({{"guide": guide.state_dict(), "loss": h["loss"]}}, {out!r})
"""


@pytest.mark.parametrize("stop_at", [1, 5])  # stopped in the pre-training or in the SWA phase
def test_resume_in_new_process_reproduces(tmp_path, stop_at):
    x, y = make_data()
    kw = dict(epochs=9, swa_start=3, swa_lr=0.02, batch_size=32, seed=5, quiet=True)
    full, hist = fit(linreg, SWAGCollector(linreg, rank=4), (x, y), **kw)
    pyro.clear_param_store()
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    stop = lambda epoch, history: epoch == stop_at  # noqa: E731
    fit(linreg, SWAGCollector(linreg, rank=4), (x, y), **kw, checkpoint=ckpt, callback=stop)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == stop_at + 1
    code = RESUME.format(tests=str(ROOT / "tests"), ckpt=str(ckpt), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    resumed = torch.load(out, weights_only=True)
    assert resumed["loss"] == pytest.approx(hist["loss"], rel=1e-5)
    ref = full.state_dict()
    for key in ("loc", "variance", "deviations"):
        torch.testing.assert_close(resumed["guide"][key], ref[key], rtol=1e-5, atol=1e-7)


def linreg_n(x, y=None, n=None):
    """``linreg`` taking its data size as ``n``."""
    return linreg(x, y, num_data=n)


@pytest.mark.parametrize("kw", [dict(swa_lr="auto"), dict(swa_lr=0.01, precondition="diag"),
                                dict(swa_lr="auto", precondition="full")])
def test_num_data_arg_reaches_the_rate_and_curvature_estimates(kw):
    x, y = make_data()
    common = dict(epochs=5, swa_start=2, batch_size=20, seed=0, quiet=True, **kw)
    ref, h_ref = fit(linreg, SWAGCollector(linreg), (x, y), **common)
    pyro.clear_param_store()
    got, h = fit(linreg_n, SWAGCollector(linreg_n), (x, y), num_data_arg="n", **common)
    assert h["swa_lr"] == pytest.approx(h_ref["swa_lr"], rel=1e-6)
    assert h["loss"] == pytest.approx(h_ref["loss"], rel=1e-6)
    torch.testing.assert_close(got.loc, ref.loc)
    torch.testing.assert_close(got.deviations, ref.deviations)


@pytest.mark.parametrize("bad, match", [
    (dict(anneal_strategy="cosine"), "anneal_strategy must be 'cos' or 'linear', got "
                                     "anneal_strategy='cosine'"),
    (dict(swa_momentum=-0.1), r"swa_momentum must be a number in \[0, 1\), got swa_momentum=-0.1"),
    (dict(swa_momentum=1.0), r"swa_momentum must be a number in \[0, 1\), got swa_momentum=1.0"),
    (dict(swa_momentum=2), r"got swa_momentum=2 "),
    (dict(anneal_from=-1.0, anneal_epochs=2), "anneal_from must be None or a positive finite "
                                              "learning rate, got anneal_from=-1.0"),
    (dict(anneal_from=math.inf), "got anneal_from=inf"),
    (dict(clip_norm=-1.0), "clip_norm must be None or a positive finite gradient norm, got "
                           "clip_norm=-1.0"),
    (dict(clip_norm=float("nan")), "got clip_norm=nan"),
    (dict(clip_norm=0.0), "got clip_norm=0.0"),
    (dict(swa_batches="iid"), r"swa_batches must be one of \('epoch', 'independent'\)"),
    (dict(swa_lr="auto", batch_size=150), "swa_lr='auto' estimates gradient noise from at "
                                          "least 2 full batches, but 200 rows an epoch give 1"),
])
def test_swa_phase_arguments_are_checked_before_any_training(bad, match):
    x, y = make_data()
    kw = dict(epochs=4, swa_start=2, swa_lr=0.01, batch_size=20, quiet=True)
    collector = SWAGCollector(linreg)
    collector(x[:20], y[:20], num_data=200)
    with torch.no_grad():
        collector.loc.copy_(torch.tensor([0.3, -0.2, 0.1]))
    before = collector.loc.detach().clone()
    with pytest.raises(ValueError, match=match):
        fit(linreg, collector, (x, y), **{**kw, **bad})
    assert torch.equal(collector.loc.detach(), before) and collector.num_snapshots == 0
    fresh = SWAGCollector(linreg)
    with pytest.raises(ValueError, match=match):
        fit(linreg, fresh, (x, y), **{**kw, **bad})
    assert fresh.prototype_trace is None  # not even set up


def test_too_few_step_snapshots_are_refused_up_front_or_warned():
    x, y = make_data()
    kw = dict(epochs=3, swa_start=1, swa_lr=0.01, quiet=True, collect_every_steps=15)
    collector = SWAGCollector(linreg)
    with pytest.raises(ValueError, match=r"collect_every_steps=15 with epochs=3, swa_start=1 and "
                                         r"10 steps per epoch collects 1 snapshot\(s\); SWAG "
                                         r"needs at least 2"):
        fit(linreg, collector, (x, y), batch_size=20, **kw)
    assert collector.prototype_trace is None
    guide, _ = fit(linreg, collector, (x, y), batch_size=20, **{**kw, "collect_every_steps": 10})
    assert guide is not None and collector.num_snapshots == 2
    pyro.clear_param_store()
    loader = DataLoader(TensorDataset(x, y), batch_size=20)  # step count not checked up front
    with pytest.warns(UserWarning, match=r"collect_every_steps=15 collected 1 snapshot\(s\) over "
                                         r"the SWA phase, so fit returns no guide"):
        guide, history = fit(linreg, SWAGCollector(linreg), loader, **kw)
    assert guide is None and history["snapshots"][-1] == 1


@pytest.mark.parametrize("num_data", [-200, 0, 200.7, True, "200"])
def test_loader_num_data_must_be_a_positive_int(num_data):
    x, y = make_data()
    collector = SWAGCollector(linreg)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    with pytest.raises(ValueError, match=f"num_data must be an integer >= 1 \\(the full data "
                                         f"size\\), got num_data={num_data!r}"):
        fit(linreg, collector, loader, num_data=num_data, epochs=4, swa_start=2, swa_lr=0.01,
            quiet=True)
    assert collector.prototype_trace is None


@pytest.mark.parametrize("kw, match", [
    (dict(noise=-0.1), "noise must be a positive finite sd, None .* got noise=-0.1"),
    (dict(noise=0.0), "got noise=0.0"),
    (dict(noise=math.inf), "got noise=inf"),
    (dict(noise_prior=(-1.0, 0.01)), r"noise_prior must be \(concentration, rate\), both > 0 "
                                     r"and finite, got noise_prior=\(-1.0, 0.01\)"),
    (dict(noise_prior=(1.0, math.nan)), r"got noise_prior=\(1.0, nan\)"),
    (dict(prior_scale=math.inf), "prior_scale must be > 0 and finite, got prior_scale=inf"),
    (dict(prior_scale=0.0), "got prior_scale=0.0"),
    (dict(likelihood="bernoulli", noise=0.3), "a fixed noise applies to likelihood='gaussian' "
                                              "only, got noise=0.3 with likelihood='bernoulli'"),
    (dict(likelihood="categorical", out_features=3, noise=0.3), "likelihood='categorical'"),
    (dict(out_features=2), "likelihood='gaussian' needs out_features=1 .* got out_features=2"),
    (dict(likelihood="categorical"), "categorical needs out_features >= 2"),
])
def test_bayesian_mlp_refuses_bad_arguments_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        BayesianMLP(2, **{"out_features": 1, **kw})


def test_independent_batches_need_tensor_data():
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    with pytest.raises(ValueError, match="swa_batches='independent' .* needs \\(x, y\\) tensors"):
        fit(linreg, SWAGCollector(linreg), loader, epochs=4, swa_start=2, swa_lr=0.01,
            swa_batches="independent", quiet=True)


def test_resume_with_other_swa_settings_is_refused(tmp_path):
    x, y = make_data()
    ckpt = tmp_path / "fit.pt"
    kw = dict(epochs=6, swa_start=2, batch_size=32, seed=0, quiet=True, checkpoint=ckpt)
    fit(linreg, SWAGCollector(linreg, rank=4), (x, y), swa_lr=0.02,
        callback=lambda epoch, h: epoch == 3, **kw)
    for other in (dict(swa_lr=0.002), dict(swa_lr=0.02, swa_momentum=0.5),
                  dict(swa_lr=0.02, swa_batches="independent")):
        pyro.clear_param_store()
        with pytest.raises(ValueError, match="resume with the same arguments"):
            fit(linreg, SWAGCollector(linreg, rank=4), (x, y), resume=True, **{**kw, **other})
