"""The UCI benchmark's recipes as :class:`~pyro_swag.compare.CompareConfig` presets.

``pyro-swag compare --recipe e`` (or ``compare(data, config=recipe_config("e", data))``) runs
a dataset with the settings of a column of ``docs/results/uci.md``; ``benchmarks/uci.py``
builds its configurations here too. Every choice a recipe makes per run is made on the 10 %
of the training split that pre-training holds out, never on test data.

- ``a``: Adam pre-training (up to 3000 steps, early stopping with patience 10), then the SWA
  phase at ``swa_c = 0.1``; 30 snapshots, 2 MultiSWAG runs, NUTS 250 + 250.
- ``b``: longer pre-training (10000 Adam steps on small sets, 20000 on large ones, patience
  30); on small sets the pre-training batch (128 or full batch) is chosen by the early-stopped
  point's held-out log-likelihood; ``swa_c`` from {0.03, 0.1, 0.3} by the SWAG predictive's.
- ``c``: ``b`` with, on large sets, 40000 Adam steps decayed to 1 % of the start, no early
  stop (the best held-out point is kept), and 0.01 added to the rates.
- ``d``: ``c`` with, on small sets, the pre-training run chosen jointly with ``swa_c`` by the
  SWAG predictive's held-out log-likelihood.
- ``e``: ``d`` with SWAG's covariance scale chosen jointly too, from :data:`SCALE_GRID`; on
  small sets each pre-training run also offers its point of best held-out squared error.
- ``f``: ``e`` with a heteroscedastic network (a second output gives the noise sd per input).
- ``g``: ``f`` pre-trained on the beta-NLL loss, beta = 0.5.

A set is *large* from :data:`LARGE_N` training points (the UCI sets kin8nm, naval, power and
protein; the other five have at most 1439): larger Adam batches (512) and shorter SWA epochs.
"""

from __future__ import annotations

from typing import Any

from .compare import CompareConfig
from .data import Dataset

__all__ = ["LARGE_N", "RECIPES", "SCALE_GRID", "recipe_config"]

RECIPES = ("a", "b", "c", "d", "e", "f", "g")
SCALE_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # recipe E's held-out choice of the scale
LARGE_N = 5000


def recipe_config(recipe: str, data: Dataset, *, large: bool | None = None,
                  **overrides: Any) -> CompareConfig:
    """The :class:`~pyro_swag.compare.CompareConfig` of a benchmark recipe for ``data``.

    Parameters
    ----------
    recipe : {"a", "b", "c", "d", "e", "f", "g"}
        See the module's description.
    data : Dataset
        The dataset the recipe runs on (its training size; a categorical likelihood keeps
        only the log-likelihood checkpoint, having no mean to score by squared error).
    large : bool, optional
        Treat the set as large (default: from :data:`LARGE_N` training points).
    **overrides
        Other ``CompareConfig`` fields (``methods``, ``seed``, ``svi_steps``, ...).
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is not one of {RECIPES}; e.g. recipe='e'")
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a pyro_swag.data.Dataset, got {type(data).__name__}")
    num_train = int(data.x_train.shape[0])
    large = num_train >= LARGE_N if large is None else bool(large)
    common: dict[str, Any] = dict(
        pretrain_batch_size=512 if large else 128, pretrain_val_fraction=0.1, svi_steps=2000,
        swa_snapshots=30, max_collect_every=20 if large else 50, multiswag_runs=2,
        num_samples=100, seed=0,
    )
    if recipe == "a":
        values = dict(common, pretrain_steps=3000, nuts_warmup=250, nuts_samples=250,
                      nuts_budget_s=300.0)
        return CompareConfig(**{**values, **overrides})
    longer = large and recipe != "b"
    e_like = recipe in ("e", "f", "g")
    checkpoints = ("ll", "rmse") if e_like and not large else ("ll",)
    if data.likelihood == "categorical":
        checkpoints = ("ll",)
    values = dict(
        common,
        heteroscedastic=recipe in ("f", "g"),
        pretrain_beta=0.5 if recipe == "g" else None,
        pretrain_steps=40000 if longer else 20000 if large else 10000,
        pretrain_lr_decay=0.01 if longer else 0.1,
        pretrain_batch_grid=None if large else (128, max(num_train, 128)),
        patience=None if longer else 30,
        pretrain_select="swag" if recipe in ("d", "e", "f", "g") and not large else "map",
        swa_c_grid=(0.01, 0.03, 0.1, 0.3) if longer else (0.03, 0.1, 0.3),
        swa_scale_grid=SCALE_GRID if e_like else None,
        pretrain_checkpoints=checkpoints,
    )
    return CompareConfig(**{**values, **overrides})
