"""fit: seeded loaders resume exactly, runs do not merge, and bad objects are refused up front."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from pyro_swag import SWAGCollector
from pyro_swag.train import fit

KW = dict(epochs=7, swa_start=3, swa_lr=0.02, seed=5, quiet=True)


def linreg(x, y=None, num_data=None):
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", size=num_data or x.shape[0], subsample=torch.arange(x.shape[0])):
        pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)


def make_data(n=120):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(n, generator=g)


def seeded_loader(x, y):
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True, generator=gen)


@pytest.mark.parametrize("stop_at", [1, 4])
def test_resume_with_a_seeded_loader_is_exact(tmp_path, stop_at):
    x, y = make_data()
    full, hist = fit(linreg, SWAGCollector(linreg, rank=3), seeded_loader(x, y), **KW)
    ckpt = tmp_path / "fit.pt"
    pyro.clear_param_store()
    fit(linreg, SWAGCollector(linreg, rank=3), seeded_loader(x, y), **KW, checkpoint=ckpt,
        callback=lambda epoch, h: epoch == stop_at)
    pyro.clear_param_store()
    resumed, again = fit(linreg, SWAGCollector(linreg, rank=3), seeded_loader(x, y), **KW,
                         checkpoint=ckpt, resume=True)
    assert again["loss"] == hist["loss"]  # the loader's shuffles resumed where they stopped
    assert torch.equal(resumed.loc, full.loc) and torch.equal(resumed.variance, full.variance)
    pyro.clear_param_store()
    plain = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True)
    with pytest.raises(ValueError, match="holds the state of 1 loader generator"):
        fit(linreg, SWAGCollector(linreg, rank=3), plain, **KW, checkpoint=ckpt, resume=True)


def test_a_second_fit_on_a_used_collector_is_refused():
    x, y = make_data()
    collector = SWAGCollector(linreg, rank=3)
    fit(linreg, collector, (x, y), batch_size=20, **KW)
    count = collector.num_snapshots
    with pytest.raises(ValueError, match=f"already holds {count} snapshots"):
        fit(linreg, collector, (x, y), batch_size=20, **KW)
    assert collector.num_snapshots == count


def test_auto_rate_on_a_loader_with_one_full_batch_is_refused_before_training():
    x, y = make_data()
    collector = SWAGCollector(linreg, rank=3)
    one = DataLoader(TensorDataset(x, y), batch_size=100)  # 100 + 20 rows: one full batch
    with pytest.raises(ValueError, match="at least 2 full batches, but 120 rows an epoch give 1"):
        fit(linreg, collector, one, **{**KW, "swa_lr": "auto"})
    assert collector.prototype_trace is None  # nothing ran


def test_a_loader_of_dict_batches_gets_the_fix_and_the_fix_works():
    x, y = make_data()
    rows = [{"x": xi, "y": yi} for xi, yi in zip(x, y)]
    collector = SWAGCollector(linreg, rank=3)
    with pytest.raises(TypeError, match=r"got dict with keys \['x', 'y'\].*collate_fn="):
        fit(linreg, collector, DataLoader(rows, batch_size=20), **KW)
    assert collector.prototype_trace is None
    tuples = DataLoader(rows, batch_size=20,
                        collate_fn=lambda items: tuple(default_collate(items).values()))
    guide, _ = fit(linreg, collector, tuples, **KW)  # the message's fix
    assert guide.loc.shape == (3,)


@pytest.mark.parametrize("flag", [np.bool_(True), torch.tensor(True)])
def test_a_numpy_or_torch_true_from_the_callback_stops(flag):
    x, y = make_data()
    _, hist = fit(linreg, SWAGCollector(linreg, rank=3), (x, y), batch_size=20, **KW,
                  callback=lambda epoch, h: flag if epoch == 4 else np.bool_(False))
    assert hist["epoch"] == [0, 1, 2, 3, 4]


def test_a_list_of_batches_and_numpy_integers_are_accepted():
    x, y = make_data()
    batches = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 120, 20)]
    guide, hist = fit(linreg, SWAGCollector(linreg, rank=3), batches, num_data=120,
                      **{**KW, "epochs": np.int64(7)})
    assert guide is not None and hist["snapshots"][-1] == 4
    with pytest.raises(ValueError, match="cannot tell the full data size"):
        fit(linreg, SWAGCollector(linreg, rank=3), batches, **KW)


def test_bad_objects_are_refused_before_the_collector_is_set_up(tmp_path):
    x, y = make_data()
    collector = SWAGCollector(linreg, rank=3)
    for kwargs, error, match in (
        ({"callback": True}, TypeError, "callback must be callable"),
        ({"optim": torch.optim.Adam}, TypeError, "optim must be a pyro.optim optimiser"),
        ({"checkpoint": tmp_path / "nodir" / "fit.pt"}, ValueError, "does not exist"),
    ):
        with pytest.raises(error, match=match):
            fit(linreg, collector, (x, y), batch_size=20, **KW, **kwargs)
    assert collector.prototype_trace is None


def test_numpy_settings_still_give_a_loadable_checkpoint(tmp_path):
    x, y = make_data()
    ckpt = tmp_path / "fit.pt"
    kw = {**KW, "epochs": np.int64(7), "swa_start": np.int64(3), "swa_lr": np.float32(0.02)}
    fit(linreg, SWAGCollector(linreg, rank=3), (x, y), batch_size=np.int64(20), **kw,
        checkpoint=ckpt, callback=lambda epoch, h: epoch == 4)
    torch.load(ckpt, weights_only=True)  # no NumPy object inside
    pyro.clear_param_store()
    _, hist = fit(linreg, SWAGCollector(linreg, rank=3), (x, y), batch_size=np.int64(20), **kw,
                  checkpoint=ckpt, resume=True)
    assert hist["epoch"] == list(range(7))


def test_auto_rate_counts_what_a_sampler_with_replacement_draws():
    from torch.utils.data import RandomSampler

    x, y = make_data(15)
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=10,
                        sampler=RandomSampler(ds, replacement=True, num_samples=200))
    guide, hist = fit(linreg, SWAGCollector(linreg, rank=3), loader, **{**KW, "swa_lr": "auto"})
    assert hist["swa_lr"] > 0 and guide is not None


def test_a_model_with_a_fixed_plate_size_names_the_minibatch():
    def fixed(x, y=None):  # a plate of the full size: a minibatch no longer fits it
        w = pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
        with pyro.plate("data", 120):
            pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)

    x, y = make_data()
    collector = SWAGCollector(fixed, rank=2)
    with pytest.raises(ValueError, match=r"(?s)plate\('data'\).*minibatch of 20 of "
                                         r"num_data=120 rows.*batch_size=120 \(full batch\)"):
        fit(fixed, collector, (x, y), batch_size=20, **KW)
    assert collector.num_snapshots == 0
    with pytest.warns(UserWarning, match="full-batch SGD"):  # what a fixed plate costs
        guide, _ = fit(fixed, SWAGCollector(fixed, rank=2), (x, y), batch_size=120, **KW)
    assert guide is not None
