"""Acceptance of issue #3: 1-D regression with a gap in the inputs (examples/gap_regression.py).

The setting (1x50 ReLU BayesianMLP, N(0, 1) priors, learned noise, y = cos(4x) + 0.05 eps,
x in [-1, -0.3] U [0.3, 1]) was chosen with NUTS as the oracle: the exact posterior's 95 %
interval is 2.96x wider in the gap than over the data (benchmarks/results/gap_nuts.json).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from gap_regression import GRID, NUTS_CACHE, run  # noqa: E402

# A short single-run schedule for the fast test (the example's recipe: 500 epochs, 5 runs).
SHORT_EPOCHS, SHORT_SWA_START = 150, 100


def test_gap_regression_example_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gap_regression.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "gap_regression.png").stat().st_size > 1000
    assert "gap width / data width" in proc.stdout


def test_nuts_reference_widens_in_the_gap():
    """The cached exact-posterior band: its widths follow from the band, and it widens >= 2x."""
    nuts = json.loads(NUTS_CACHE.read_text())
    lo, hi = torch.tensor(nuts["lo"]), torch.tensor(nuts["hi"])
    assert lo.shape == hi.shape == GRID.shape
    width = hi - lo
    gap = width[GRID.abs() < 0.3].mean().item()
    data = width[(GRID.abs() >= 0.3) & (GRID.abs() <= 1.0)].mean().item()
    assert gap == pytest.approx(nuts["gap_width"], rel=1e-5)
    assert data == pytest.approx(nuts["data_width"], rel=1e-5)
    assert gap >= 2 * data
    assert 0.85 <= nuts["coverage"] <= 1.0


def test_gap_regression_swag_in_range_coverage():
    """One SWAG run (short schedule): held-out in-range points covered at 0.85-1.

    Measured coverage 0.995 / 1.0 / 0.975 on data seeds 0 / 1 / 2 (its intervals are 2-4x
    wider than NUTS's over the data: the short pre-training under-fits).
    """
    result = run(seed=0, runs=1, epochs=SHORT_EPOCHS, swa_start=SHORT_SWA_START,
                 swa_lr=2.5e-4, precondition=None, num_samples=200)
    assert 0.85 <= result["coverage"] <= 1.0


@pytest.fixture(scope="module")
def multiswag():
    """The example's recipe (about 3 min): 5 runs, 800 Adam epochs, preconditioned SWA phase.

    Measured ratios 2.12 / 2.34 / 2.70 and coverage 0.925 / 0.965 / 0.975 on data seeds
    0 / 1 / 2 (seed 0 on the current machine, 1 and 2 on an earlier one; NUTS on seed 0:
    2.96, 0.935).
    """
    return run(seed=0, runs=5, processes=2, num_samples=400)


@pytest.mark.slow
def test_gap_regression_multiswag_in_range_coverage(multiswag):
    assert 0.85 <= multiswag["coverage"] <= 1.0


@pytest.mark.slow
def test_gap_regression_multiswag_gap_interval_twice_as_wide(multiswag):
    assert multiswag["gap_width"] >= 2 * multiswag["data_width"]
