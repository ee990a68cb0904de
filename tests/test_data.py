import numpy as np
import pytest
import torch

from pyro_swag.data import (
    SKLEARN_DATASETS,
    UCI_DATASETS,
    default_data_dir,
    load_dataset,
    load_uci,
    uci_num_splits,
)

UCI_ROOT = default_data_dir()
needs_uci = pytest.mark.skipif(
    UCI_ROOT is None or not (UCI_ROOT / "yacht").is_dir(), reason="UCI data directory absent"
)


@pytest.mark.parametrize("name", sorted(SKLEARN_DATASETS))
def test_builtin_sets_are_standardised_with_train_statistics(name):
    d = load_dataset(name, split=1)
    assert d.likelihood == SKLEARN_DATASETS[name]
    assert torch.allclose(d.x_train.mean(0), torch.zeros(d.in_features), atol=1e-5)
    sd = d.x_train.std(0, unbiased=False)
    assert torch.all((sd - 1).abs() < 1e-4) or torch.all((sd < 1e-6) | ((sd - 1).abs() < 1e-4))
    assert d.x_test.shape[1] == d.in_features and d.x_test.shape[0] > 0
    if d.is_regression:
        assert abs(float(d.y_train.mean())) < 1e-5
        assert abs(float(d.y_train.std(unbiased=False)) - 1) < 1e-4
    elif d.likelihood == "categorical":
        assert d.y_train.dtype == torch.long and d.num_classes == 10 and d.out_features == 10
    else:
        assert set(d.y_train.unique().tolist()) == {0.0, 1.0} and d.out_features == 1


def test_friedman_is_a_small_training_set_with_many_test_points():
    d = load_dataset("friedman", split=0)
    assert d.x_train.shape == (300, 10) and d.x_test.shape == (1200, 10)
    assert load_dataset("friedman", split=0, test_fraction=0.2).x_train.shape == (1200, 10)
    assert load_dataset("diabetes", split=0).x_test.shape[0] == 89  # others keep 80/20
    assert not torch.equal(d.y_test, load_dataset("friedman", split=1).y_test)


def test_diabetes_round_trip_to_original_units():
    from sklearn.datasets import load_diabetes

    d = load_dataset("diabetes", split=0)
    y = np.sort(load_diabetes().target)
    back = np.sort(torch.cat([d.to_original(d.y_train), d.to_original(d.y_test)]).numpy())
    np.testing.assert_allclose(back, y, rtol=1e-5)
    assert d.y_std == pytest.approx(
        float(np.std(d.to_original(d.y_train).numpy().astype(float))), rel=1e-5
    )


def test_splits_differ_by_seed_and_repeat():
    a, b, c = load_dataset("diabetes", 0), load_dataset("diabetes", 1), load_dataset("diabetes", 0)
    assert torch.equal(a.y_test, c.y_test)
    assert not torch.equal(a.y_test, b.y_test)


@needs_uci
def test_uci_matches_index_files_and_train_statistics():
    d = load_uci("yacht", split=3, data_dir=UCI_ROOT)
    path = UCI_ROOT / "yacht" / "data"
    raw = np.loadtxt(path / "data.txt")
    tr = np.loadtxt(path / "index_train_3.txt", dtype=int)
    te = np.loadtxt(path / "index_test_3.txt", dtype=int)
    assert d.x_train.shape == (len(tr), 6) and d.x_test.shape == (len(te), 6)
    y_tr = raw[tr, -1]
    assert d.y_mean == pytest.approx(y_tr.mean()) and d.y_std == pytest.approx(y_tr.std())
    np.testing.assert_allclose(d.to_original(d.y_test).numpy(), raw[te, -1], rtol=1e-5, atol=1e-5)
    mu, sd = raw[tr, :6].mean(0), raw[tr, :6].std(0)
    np.testing.assert_allclose(d.x_test.numpy(), (raw[te, :6] - mu) / sd, rtol=1e-4, atol=1e-4)
    assert uci_num_splits("yacht", UCI_ROOT) == 20
    assert uci_num_splits("protein", UCI_ROOT) == 5


@needs_uci
def test_uci_constant_columns_stay_finite_and_env_var(monkeypatch):
    monkeypatch.setenv("PYRO_SWAG_DATA", str(UCI_ROOT))
    d = load_dataset("uci:naval", split=0)
    assert torch.isfinite(d.x_train).all() and torch.isfinite(d.x_test).all()
    # columns 8 and 11 hold one value each; 11's sd comes out as 1e-16, not 0
    for col in (8, 11):
        assert (d.x_train[:, col] == 0).all() and (d.x_test[:, col] == 0).all()


def test_a_column_constant_up_to_rounding_is_centred_not_blown_up():
    from pyro_swag.data import _standardise

    x = np.full((100, 2), 0.998)
    x[:, 1] = np.arange(100.0)
    assert x[:, 0].std() > 0  # the rounding error the loader has to see through
    tr, te = _standardise(x, x[:3] + [1e-9, 0.0])
    assert np.abs(tr[:, 0]).max() == 0 and np.abs(te[:, 0]).max() < 1e-8
    np.testing.assert_allclose(tr[:, 1], (x[:, 1] - x[:, 1].mean()) / x[:, 1].std())


def _partial_uci(tmp_path, files):
    src = UCI_ROOT / "yacht" / "data"
    dst = tmp_path / "yacht" / "data"
    dst.mkdir(parents=True)
    for f in files:
        (dst / f).write_text((src / f).read_text())
    return tmp_path


@needs_uci
def test_a_data_dir_without_split_files_says_so(tmp_path):
    root = _partial_uci(tmp_path, ["data.txt", "index_features.txt", "index_target.txt"])
    with pytest.raises(FileNotFoundError, match=r"no n_splits.txt or index_train_<i>.txt"):
        load_uci("yacht", 0, data_dir=root)
    (root / "yacht" / "data" / "index_train_0.txt").write_text(
        (UCI_ROOT / "yacht" / "data" / "index_train_0.txt").read_text())
    with pytest.raises(FileNotFoundError, match=r"no index_test_0.txt for split=0 of 'yacht'"):
        load_uci("yacht", 0, data_dir=root)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown dataset name='nope'.*diabetes"):
        load_dataset("nope")
    with pytest.raises(ValueError, match=r"unknown UCI dataset name='nope'.*yacht"):
        load_uci("nope")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_dir=.*no yacht/data/data.txt"):
        load_dataset("yacht", data_dir=tmp_path)


def test_missing_default_dir(monkeypatch):
    import pyro_swag.data as data

    monkeypatch.delenv("PYRO_SWAG_DATA", raising=False)
    monkeypatch.setattr(data, "default_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="PYRO_SWAG_DATA"):
        data.load_uci("boston")


@needs_uci
def test_split_out_of_range():
    with pytest.raises(ValueError, match=r"split=20 is out of range.*0 <= split <= 19"):
        load_uci("boston", split=20, data_dir=UCI_ROOT)
    with pytest.raises(ValueError, match=r"split=5 is out of range.*protein"):
        load_uci("protein", split=5, data_dir=UCI_ROOT)
    with pytest.raises(TypeError, match="split must be an int"):
        load_uci("boston", split="0", data_dir=UCI_ROOT)


def test_builtin_bad_split_and_fraction():
    with pytest.raises(ValueError, match="split must be an int >= 0"):
        load_dataset("diabetes", split=-1)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("diabetes", test_fraction=1.5)


def test_all_uci_names_have_dirs():
    assert len(UCI_DATASETS) == 9
