r"""Datasets for the comparison job and the UCI benchmark, standardised with train statistics.

Every loader returns a :class:`Dataset`: float tensors ``x_train, y_train, x_test, y_test``
whose inputs are standardised with the *training* mean and sd (columns constant up to
rounding become 0), and, for regression, targets standardised the same way;
``y_mean``/``y_std`` map the standardised scale back to original units,
:math:`y = \bar y + s_y \tilde y`, so a log-likelihood per point in original units is the
standardised one minus :math:`\log s_y`.

Built-in sets (scikit-learn, no download): ``diabetes`` (regression, the default),
``breast_cancer`` (Bernoulli), ``digits`` (categorical, 10 classes), ``moons`` (Bernoulli,
``make_moons``), ``friedman`` (regression, ``make_friedman1``: 1500 points, 10 inputs of
which 5 matter, Gaussian noise of sd 1, so a homoscedastic Gaussian BNN is well specified
and the best possible test log-likelihood is known, :math:`-\tfrac12\log(2\pi e) \approx
-1.419` nats per point). Their split ``i`` is a random split seeded by ``i``: 80 % train /
20 % test, except ``friedman``'s 20 / 80 (300 training points, and 1200 test points that
measure interval coverage to about ±0.01).

UCI sets follow the standard protocol layout (Hernández-Lobato & Adams 2015; Gal & Ghahramani
2016): ``<data_dir>/<set>/data/{data.txt, index_features.txt, index_target.txt,
index_train_<i>.txt, index_test_<i>.txt, n_splits.txt}``. The data directory is the
``data_dir`` argument, else ``$PYRO_SWAG_DATA``, else ``../shared/data/UCI_Datasets`` next to
the repository when it exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "SKLEARN_DATASETS",
    "UCI_DATASETS",
    "default_data_dir",
    "load_dataset",
    "load_uci",
    "uci_num_splits",
]

#: Built-in datasets and their task.
SKLEARN_DATASETS = {
    "diabetes": "gaussian",
    "breast_cancer": "bernoulli",
    "digits": "categorical",
    "moons": "bernoulli",
    "friedman": "gaussian",
}

#: Test share of each built-in set's random split when ``test_fraction`` is not given.
DEFAULT_TEST_FRACTION = {"friedman": 0.8}

#: Short UCI names -> directory names of the standard splits.
UCI_DATASETS = {
    "boston": "bostonHousing",
    "concrete": "concrete",
    "energy": "energy",
    "kin8nm": "kin8nm",
    "naval": "naval-propulsion-plant",
    "power": "power-plant",
    "protein": "protein-tertiary-structure",
    "wine": "wine-quality-red",
    "yacht": "yacht",
}


@dataclass
class Dataset:
    """A train/test split with standardised inputs (and standardised targets for regression).

    Attributes
    ----------
    name : str
        Dataset name.
    likelihood : {"gaussian", "bernoulli", "categorical"}
        Observation model that fits the targets.
    x_train, y_train, x_test, y_test : torch.Tensor
        Inputs ``(N, D)`` float; targets ``(N,)`` float (regression, Bernoulli) or long
        (categorical).
    y_mean, y_std : float
        Target standardisation (0 and 1 for classification).
    num_classes : int
        Number of classes (1 for regression and Bernoulli).
    split : int
        Split index.
    """

    name: str
    likelihood: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_mean: float = 0.0
    y_std: float = 1.0
    num_classes: int = 1
    split: int = 0
    feature_names: list[str] = field(default_factory=list)

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def out_features(self) -> int:
        return self.num_classes if self.likelihood == "categorical" else 1

    @property
    def is_regression(self) -> bool:
        return self.likelihood == "gaussian"

    def to_original(self, y: torch.Tensor) -> torch.Tensor:
        """Map standardised targets (or predictive means) back to original units."""
        return y * self.y_std + self.y_mean

    def to(self, device=None, dtype: torch.dtype | None = None) -> Dataset:
        """A copy with float tensors moved/cast (integer targets keep their dtype)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Dataset(
            self.name, self.likelihood, move(self.x_train), move(self.y_train),
            move(self.x_test), move(self.y_test), self.y_mean, self.y_std,
            self.num_classes, self.split, list(self.feature_names),
        )


def _moments(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and sd; a column constant up to rounding gets its value as mean and sd 1."""
    mean, std = a.mean(0), a.std(0)
    # the sd of a constant column can come out as a rounding error (1e-16 in naval), and
    # dividing by it would turn the column into a constant 1 and any test deviation into 1e9
    const = std <= 1e-12 * np.maximum(1.0, np.abs(mean))
    return np.where(const, a[0], mean), np.where(const, 1.0, std)


def _standardise(x_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = _moments(x_tr)
    return (x_tr - mean) / std, (x_te - mean) / std


def _build(name, likelihood, x_tr, y_tr, x_te, y_te, split, num_classes=1, names=None):
    x_tr, x_te = _standardise(np.asarray(x_tr, float), np.asarray(x_te, float))
    y_mean, y_std = 0.0, 1.0
    if likelihood == "gaussian":
        y_tr = np.asarray(y_tr, float)
        y_te = np.asarray(y_te, float)
        y_mean, y_std = (float(v) for v in _moments(y_tr))
        y_tr, y_te = (y_tr - y_mean) / y_std, (y_te - y_mean) / y_std
    f32 = torch.get_default_dtype()
    ydt = torch.long if likelihood == "categorical" else f32
    return Dataset(
        name, likelihood,
        torch.as_tensor(x_tr, dtype=f32), torch.as_tensor(np.asarray(y_tr), dtype=ydt),
        torch.as_tensor(x_te, dtype=f32), torch.as_tensor(np.asarray(y_te), dtype=ydt),
        y_mean, y_std, num_classes, split, list(names or []),
    )


def _check_split(split, num_splits: int, where: str) -> int:
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)):
        raise TypeError(f"split must be an int, got split={split!r}")
    if not 0 <= split < num_splits:
        raise ValueError(
            f"split={split} is out of range for {where}: it has {num_splits} splits, "
            f"use 0 <= split <= {num_splits - 1}"
        )
    return int(split)


def _load_sklearn(name: str, split: int, test_fraction: float | None) -> Dataset:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION.get(name, 0.2)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got test_fraction={test_fraction!r}")
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or split < 0:
        raise ValueError(f"split must be an int >= 0 (the split's seed), got split={split!r}")
    if name == "moons":
        x, y = datasets.make_moons(n_samples=500, noise=0.2, random_state=0)
        names = ["x0", "x1"]
    elif name == "friedman":
        x, y = datasets.make_friedman1(n_samples=1500, n_features=10, noise=1.0, random_state=0)
        names = [f"x{i}" for i in range(10)]
    else:
        bunch = getattr(datasets, f"load_{name}")()
        x, y = bunch.data, bunch.target
        names = [str(n) for n in getattr(bunch, "feature_names", [])]
    likelihood = SKLEARN_DATASETS[name]
    strat = y if likelihood != "gaussian" else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=int(split), stratify=strat
    )
    k = int(np.max(y)) + 1 if likelihood == "categorical" else 1
    return _build(name, likelihood, x_tr, y_tr, x_te, y_te, int(split), k, names)


def default_data_dir() -> Path | None:
    """``$PYRO_SWAG_DATA``, else ``../shared/data/UCI_Datasets`` beside the repository."""
    env = os.environ.get("PYRO_SWAG_DATA")
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "UCI_Datasets"
    return guess if guess.is_dir() else None


def _uci_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    if name not in UCI_DATASETS:
        raise ValueError(
            f"unknown UCI dataset name={name!r}; choose one of {sorted(UCI_DATASETS)}"
        )
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None:
        raise FileNotFoundError(
            "no UCI data directory: pass data_dir=... (--data-dir DIR) or set PYRO_SWAG_DATA "
            "to a directory holding <set>/data/data.txt"
        )
    path = root / UCI_DATASETS[name] / "data"
    if not (path / "data.txt").is_file():
        raise FileNotFoundError(
            f"data_dir={str(root)!r} has no {UCI_DATASETS[name]}/data/data.txt for "
            f"dataset {name!r}; point data_dir (--data-dir or PYRO_SWAG_DATA) at the "
            "UCI_Datasets directory of the standard splits"
        )
    return path


def uci_num_splits(name: str, data_dir: str | os.PathLike | None = None) -> int:
    """Number of standard splits of a UCI set (20; 5 for protein)."""
    path = _uci_dir(name, data_dir)
    n_file = path / "n_splits.txt"
    if n_file.is_file():
        return int(float(n_file.read_text().split()[0]))
    count = len(list(path.glob("index_train_*.txt")))
    if count == 0:
        raise FileNotFoundError(
            f"{str(path)!r} has data.txt but no n_splits.txt or index_train_<i>.txt files, so "
            f"it holds no standard splits of {name!r}; point data_dir at the UCI_Datasets "
            "directory of the standard splits"
        )
    return count


def load_uci(name: str, split: int = 0, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load split ``split`` of UCI set ``name`` (see :data:`UCI_DATASETS`)."""
    path = _uci_dir(name, data_dir)
    split = _check_split(split, uci_num_splits(name, data_dir), f"UCI dataset {name!r}")
    data = np.loadtxt(path / "data.txt")
    feats = np.loadtxt(path / "index_features.txt", dtype=int, ndmin=1)
    target = int(np.loadtxt(path / "index_target.txt"))
    for part in ("train", "test"):
        if not (path / f"index_{part}_{split}.txt").is_file():
            raise FileNotFoundError(
                f"{str(path)!r} has no index_{part}_{split}.txt for split={split} of {name!r}; "
                "the standard splits directory is incomplete"
            )
    tr = np.loadtxt(path / f"index_train_{split}.txt", dtype=int)
    te = np.loadtxt(path / f"index_test_{split}.txt", dtype=int)
    x, y = data[:, feats], data[:, target]
    return _build(name, "gaussian", x[tr], y[tr], x[te], y[te], split)


def load_dataset(
    name: str = "diabetes",
    split: int = 0,
    *,
    data_dir: str | os.PathLike | None = None,
    test_fraction: float | None = None,
) -> Dataset:
    """Load a built-in (:data:`SKLEARN_DATASETS`) or UCI (:data:`UCI_DATASETS`) dataset.

    Parameters
    ----------
    name : str
        Dataset name; ``"uci:NAME"`` is accepted for UCI sets too.
    split : int
        Split index: the seed of the random split for built-in sets; the standard split for
        UCI sets.
    data_dir : path, optional
        UCI data directory (default :func:`default_data_dir`).
    test_fraction : float, optional
        Test share of the built-in sets' random split (default 0.2; 0.8 for ``friedman``).

    Raises
    ------
    ValueError
        Unknown name, or split out of range.
    FileNotFoundError
        Missing UCI data directory.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got name={name!r}")
    key = name.removeprefix("uci:")
    if key in SKLEARN_DATASETS and not name.startswith("uci:"):
        return _load_sklearn(key, split, test_fraction)
    if key in UCI_DATASETS:
        return load_uci(key, split, data_dir)
    raise ValueError(
        f"unknown dataset name={name!r}; choose one of {sorted(SKLEARN_DATASETS)} (built in) "
        f"or the UCI sets {sorted(UCI_DATASETS)} (with a data directory)"
    )
