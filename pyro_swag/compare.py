r"""The main job: SWAG against SGD/MAP, SWA, MultiSWAG, SVI and NUTS on one model, one report.

:func:`compare` fits every method on the training split of a :class:`~pyro_swag.data.Dataset`,
scores each one on the test split with the same code (:mod:`pyro_swag.report`), and writes an
output directory (``report.md``, ``results.json``, PNG plots, one netCDF DataTree per method).

Every method yields posterior draws ``{site: (S, ...)}`` of the model's latent sites; the test
predictive is the mixture :math:`p(y \mid x) \approx \frac1S \sum_s p(y \mid x, \theta_s)`.
The model contract is the one of :class:`~pyro_swag.models.BayesianMLP`:
``model(x, y=None, num_data=None)`` with the observed site ``"obs"`` in a data plate of size
``num_data``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from . import compare_report as report
from ._checks import is_positive_finite
from .compare_methods import METHODS, MethodResult, run_method
from .data import Dataset, load_dataset
from .models import HETEROSCEDASTIC, BayesianMLP

__all__ = ["CompareConfig", "METHODS", "compare", "make_model", "quick_config"]


@dataclass
class CompareConfig:
    """Settings of :func:`compare` (defaults: the README's ≤ 5-minute run on 2 cores).

    Attributes
    ----------
    hidden : tuple of int
        Hidden widths of the default :class:`~pyro_swag.models.BayesianMLP`.
    heteroscedastic : bool
        Regression only: the default network predicts a noise sd per input
        (``BayesianMLP(noise="heteroscedastic")``) instead of learning one precision.
    pretrain_beta : float or None
        Heteroscedastic network only: pre-train on the beta-NLL loss
        (:class:`~pyro_swag.models.BetaNLL`, 0.5 is the usual value) so that points given a
        large noise sd still pull the mean; held-out choices, SWA and scores use the model's
        own likelihood. None: the plain likelihood.
    batch_size : int
        Minibatch size of SGD/SVI.
    pretrain_steps : int
        Adam (MAP) steps before the SWA phase.
    pretrain_lr : float
        Adam learning rate at the start of pre-training.
    pretrain_lr_decay : float
        The Adam rate decays geometrically to ``pretrain_lr * pretrain_lr_decay`` over
        ``pretrain_steps`` (in ``(0, 1]``; 1: constant).
    pretrain_batch_size : int
        Minibatch size of the Adam phases (MAP pre-training and the SVI baselines).
    pretrain_val_fraction : float
        Early stopping of pre-training: this share of the training data is held out and
        the pre-training point with the best held-out log-likelihood (checked every
        ``eval_every`` steps) is kept; pre-training stops after ``patience`` checks
        without improvement (``patience=None``: it runs all ``pretrain_steps``, still keeping
        the best held-out point). The SWA phase then uses all training data. 0: off.
    pretrain_batch_grid : tuple of int or None
        When set (and ``pretrain_val_fraction > 0``), pre-training runs once per batch size
        of this grid (same seed and start) and keeps the run whose early-stopped point has
        the best held-out log-likelihood. ``None``: ``pretrain_batch_size``.
    pretrain_select : {"map", "swag"}
        How the pre-training run is chosen among ``pretrain_batch_grid``'s runs: by its
        early-stopped MAP's held-out log-likelihood (``"map"``), or, with ``swa_c_grid``
        set, jointly with ``swa_c`` by the held-out log-likelihood of the SWAG predictive
        that each (run, rate) pair gives (``"swag"``: one short SWA phase per pair).
    pretrain_checkpoints : tuple of {"ll", "rmse"}
        The points of each pre-training run kept as candidates: the best by held-out
        log-likelihood (``"ll"``) and/or by held-out squared error (``"rmse"``, which a noise
        precision following the training residuals cannot mislead). With
        ``pretrain_select="swag"`` every candidate enters the joint choice; otherwise the one
        with the best held-out log-likelihood is kept. Patience counts checks where none of
        them improved.
    jit : bool
        Use ``JitTrace_ELBO`` in the Adam phases (~3x faster on small nets).
    swa_c : float
        SWA learning rate per datum is ``swa_c / tau_hat`` (``tau_hat`` the learned noise
        precision after pre-training, for a heteroscedastic network the mean of
        ``1 / sigma(x)**2`` over the training inputs; 1 for classification).
    swa_c_grid : tuple of float or None
        When set (and ``pretrain_val_fraction > 0``), ``swa_c`` is chosen per run from this
        grid: each rate runs the SWA phase on the pre-training part from the MAP and the one
        whose SWAG predictive has the best log-likelihood on the held-out part wins; the SWA
        phase is then rerun on all training data at that rate. ``None``: ``swa_c``.
    swa_scale_grid : tuple of float or None
        With ``swa_c_grid``: SWAG's covariance ``scale`` is chosen with ``swa_c`` (and the
        pre-training run), by the held-out log-likelihood of each short SWA phase's predictive
        at every scale of this grid (:func:`~pyro_swag.calibrate.calibrate_validation`, shared
        draws); the final SWAG guide gets the chosen scale, recorded in its ``calibration``.
        ``None``: scale 1.
    swa_stability : float or None
        Cap the SWA rate at ``swa_stability * 2 (1 + 0.9) / lambda_max`` (``lambda_max``: the
        largest eigenvalue of the per-datum loss Hessian at the MAP, by power iteration), a
        fraction of SGD-with-momentum's stability limit. ``None``: no cap.
    swa_retries : int
        When the SWA phase diverges, restart it from the MAP with a 3x smaller rate, at most
        this many times (then the method is reported as failed).
    swa_snapshots : int
        Snapshots collected in the SWA phase (one per epoch, or per ``max_collect_every``
        steps when epochs are longer).
    rank : int
        SWAG rank ``K``.
    num_samples : int
        Posterior draws per method for the test predictive.
    multiswag_runs : int
        Independent SWAG runs of MultiSWAG (the SWAG run is the first).
    svi_steps, svi_lr : int, float
        SVI baselines' Adam steps and learning rate.
    nuts_warmup, nuts_samples, nuts_max_tree_depth : int
        NUTS budget in iterations.
    nuts_budget_s : float
        NUTS is stopped and reported as skipped when it runs longer than this.
    calibration : {"elbo", "psis", "validation"}
        Scale selection of calibrated SWAG (:func:`pyro_swag.calibrate.calibrate`);
        ``"validation"`` scores the pre-training hold-out (``pretrain_val_fraction``): an
        extra SWA phase on the pre-training part, at the chosen rate, gives the scale
        that the final guide then takes (the paper's way).
    methods : tuple of str
        Subset of :data:`METHODS` to run.
    seed : int
        Base seed.
    """

    hidden: tuple[int, ...] = (50,)
    heteroscedastic: bool = False
    pretrain_beta: float | None = None
    batch_size: int = 32
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-2
    pretrain_lr_decay: float = 0.1
    pretrain_batch_size: int = 128
    pretrain_val_fraction: float = 0.1
    pretrain_batch_grid: tuple[int, ...] | None = None
    pretrain_select: str = "map"
    pretrain_checkpoints: tuple[str, ...] = ("ll",)
    eval_every: int = 100
    patience: int | None = 10
    jit: bool = True
    swa_c: float = 0.1
    swa_c_grid: tuple[float, ...] | None = None
    swa_scale_grid: tuple[float, ...] | None = None
    swa_snapshots: int = 50
    swa_retries: int = 2
    swa_stability: float | None = 0.5
    max_collect_every: int = 50
    rank: int = 20
    num_samples: int = 100
    multiswag_runs: int = 3
    svi_steps: int = 3000
    svi_lr: float = 1e-2
    nuts_warmup: int = 100
    nuts_samples: int = 100
    nuts_max_tree_depth: int = 6
    nuts_budget_s: float = 150.0
    calibration: str = "elbo"
    methods: tuple[str, ...] = METHODS
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(
                f"methods={list(self.methods)} has unknown {unknown}; choose from {METHODS}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={list(self.methods)} names a method twice; name each once")
        for name in ("batch_size", "pretrain_steps", "swa_snapshots", "rank", "num_samples",
                     "multiswag_runs", "svi_steps", "nuts_samples", "max_collect_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        if isinstance(self.hidden, list):
            self.hidden = tuple(self.hidden)
        if (not isinstance(self.hidden, tuple) or not self.hidden
                or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                           for h in self.hidden)):
            raise ValueError(f"hidden must be a non-empty tuple of ints >= 1 (layer widths), "
                             f"got hidden={self.hidden!r}; e.g. hidden=(50,)")
        for name in ("pretrain_lr", "svi_lr", "swa_c"):
            value = getattr(self, name)
            if not is_positive_finite(value):
                raise ValueError(f"{name} must be a positive finite number, got "
                                 f"{name}={value!r}")
        budget = self.nuts_budget_s
        if not isinstance(budget, (int, float)) or not 0 <= budget < math.inf:
            raise ValueError(f"nuts_budget_s must be a finite number of seconds >= 0 (0 skips "
                             f"NUTS), got nuts_budget_s={self.nuts_budget_s!r}")
        if not 0 <= self.pretrain_val_fraction < 1:
            raise ValueError(f"pretrain_val_fraction must be in [0, 1), got "
                             f"pretrain_val_fraction={self.pretrain_val_fraction!r}")
        for name, low in (("nuts_warmup", 0), ("nuts_max_tree_depth", 1), ("swa_retries", 0),
                          ("eval_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got seed={self.seed!r}")
        if self.swa_stability is not None and not 0 < self.swa_stability <= 1:
            raise ValueError(f"swa_stability must be None or in (0, 1], got "
                             f"swa_stability={self.swa_stability!r}")
        if self.calibration not in ("elbo", "psis", "validation"):
            raise ValueError(f"calibration must be 'elbo', 'psis' or 'validation', got "
                             f"calibration={self.calibration!r}")
        if self.patience is not None and (not isinstance(self.patience, int)
                                          or self.patience < 1):
            raise ValueError(f"patience must be None or an int >= 1, got "
                             f"patience={self.patience!r}")
        if self.pretrain_beta is not None:
            if not self.heteroscedastic:
                raise ValueError(f"pretrain_beta={self.pretrain_beta!r} only changes a "
                                 f"heteroscedastic network's fit; set heteroscedastic=True or "
                                 f"pretrain_beta=None")
            beta = self.pretrain_beta
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
                raise ValueError(f"pretrain_beta must be None or a number in (0, 1], got "
                                 f"pretrain_beta={self.pretrain_beta!r} (0.5 is the usual value)")
        if self.pretrain_select not in ("map", "swag"):
            raise ValueError(f"pretrain_select must be 'map' or 'swag', got "
                             f"pretrain_select={self.pretrain_select!r}")
        if (not isinstance(self.pretrain_checkpoints, tuple) or not self.pretrain_checkpoints
                or not set(self.pretrain_checkpoints) <= {"ll", "rmse"}
                or len(set(self.pretrain_checkpoints)) < len(self.pretrain_checkpoints)):
            raise ValueError(f"pretrain_checkpoints must be a tuple of distinct 'll' and "
                             f"'rmse', got pretrain_checkpoints={self.pretrain_checkpoints!r}")
        if not 0 < self.pretrain_lr_decay <= 1:
            raise ValueError(
                f"pretrain_lr_decay must be in (0, 1], got "
                f"pretrain_lr_decay={self.pretrain_lr_decay!r}"
            )
        if self.swa_snapshots < 2:
            raise ValueError(f"swa_snapshots must be >= 2, got swa_snapshots={self.swa_snapshots}")
        grids = (
            ("pretrain_batch_grid", lambda v: isinstance(v, int) and v >= 1, "positive ints"),
            ("swa_c_grid", lambda v: isinstance(v, (int, float)) and 0 < v < math.inf,
             "positive numbers"),
            ("swa_scale_grid", lambda v: isinstance(v, (int, float)) and 0 < v < math.inf,
             "positive numbers"),
        )
        for name, ok, what in grids:
            grid = getattr(self, name)
            if grid is not None and (not grid or not all(ok(v) for v in grid)):
                raise ValueError(
                    f"{name} must be None or a non-empty tuple of {what}, got {name}={grid!r}"
                )
        if self.swa_scale_grid is not None and self.swa_c_grid is None:
            raise ValueError(
                f"swa_scale_grid={self.swa_scale_grid!r} is chosen with swa_c on held-out data; "
                f"set swa_c_grid too (e.g. swa_c_grid=({self.swa_c},))"
            )


def quick_config(**overrides) -> CompareConfig:
    """Tiny settings for smoke runs and tests (every method, seconds instead of minutes)."""
    values = dict(
        pretrain_steps=300, swa_snapshots=10, rank=5, num_samples=30, multiswag_runs=2,
        svi_steps=300, nuts_warmup=30, nuts_samples=30, nuts_max_tree_depth=5,
        nuts_budget_s=30.0, jit=False,
    )
    values.update(overrides)
    return CompareConfig(**values)


def make_model(data: Dataset, hidden: Sequence[int] = (50,), seed: int = 0,
               heteroscedastic: bool = False) -> BayesianMLP:
    """The default model: a :class:`BayesianMLP` with the dataset's likelihood (with
    ``heteroscedastic``, a regression network that also predicts the noise sd)."""
    if heteroscedastic and not data.is_regression:
        raise ValueError(f"heteroscedastic=True needs a regression dataset; {data.name!r} has "
                         f"likelihood={data.likelihood!r} (drop heteroscedastic)")
    torch.manual_seed(seed)  # the network's own fan-in init depends on it
    noise = HETEROSCEDASTIC if heteroscedastic else None
    return BayesianMLP(data.in_features, data.out_features, tuple(hidden), data.likelihood,
                       noise=noise)


def compare(
    data: Dataset | str = "diabetes",
    out_dir: str | Path | None = "out/compare",
    *,
    model: Callable | None = None,
    model_factory: Callable[[int], Callable] | None = None,
    config: CompareConfig | None = None,
    split: int = 0,
    data_dir: str | Path | None = None,
    quiet: bool = False,
) -> dict:
    """Run every method of ``config.methods`` on ``data`` and write a report to ``out_dir``.

    Parameters
    ----------
    data : Dataset or str
        A dataset, or a name for :func:`~pyro_swag.data.load_dataset`.
    out_dir : path or None
        Output directory; files are written to a temporary sibling and moved in at the end,
        ``results.json`` last (its presence marks a complete report). ``None``: no files.
    model : callable, optional
        A Pyro model ``model(x, y=None, num_data=None)``; default :func:`make_model`.
    model_factory : callable, optional
        ``seed -> model``, used for MultiSWAG's independent initialisations (default: the
        default model with a new seed, or ``model`` itself when one is given).
    config : CompareConfig, optional
        Method settings.
    split : int
        Split index when ``data`` is a name.
    data_dir : path, optional
        UCI data directory when ``data`` names a UCI set.
    quiet : bool
        No progress bars.

    Returns
    -------
    dict
        The content of ``results.json``: ``{"dataset": ..., "config": ..., "methods":
        {name: {metric: value, ...}}}``.
    """
    config = config or CompareConfig()
    if isinstance(data, str):
        data = load_dataset(data, split, data_dir=data_dir)  # bad input fails before any file
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a Dataset or a dataset name, got data={type(data).__name__}")
    if "rmse" in config.pretrain_checkpoints and data.likelihood == "categorical":
        raise ValueError(
            f"pretrain_checkpoints={config.pretrain_checkpoints!r}: 'rmse' needs a mean to "
            f"score, and {data.name!r} is categorical; use pretrain_checkpoints=('ll',)"
        )
    out = None if out_dir is None else report.check_out_dir(out_dir)  # before any fitting
    if model is None:
        model = make_model(data, config.hidden, config.seed, config.heteroscedastic)
        if model_factory is None:
            def model_factory(seed):
                return make_model(data, config.hidden, seed, config.heteroscedastic)
    elif model_factory is None:
        def model_factory(seed):
            return model

    results: dict[str, MethodResult] = {}
    state: dict = {}
    bar = tqdm(config.methods, desc="compare", disable=quiet, leave=True)
    for name in bar:
        bar.set_postfix_str(name)
        pyro.set_rng_seed(config.seed)
        start = time.perf_counter()
        try:
            res = run_method(name, model, model_factory, data, config, state, quiet)
        except (ValueError, RuntimeError) as err:  # a diverged fit is a result, not a crash
            res = MethodResult(name, status="failed", note=f"{type(err).__name__}: {err}")
        if res.wall_s is None:
            res.wall_s = time.perf_counter() - start
        results[name] = res

    summary, evals = report.summarise(model, data, results, config)
    summary["config"] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in asdict(config).items()}
    if out is not None:
        report.save(out, model, data, results, summary, evals)
    return summary
