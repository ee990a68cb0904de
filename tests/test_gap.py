"""Acceptance of issue #3: 1-D regression with a gap in the inputs (examples/gap_regression.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gap_regression_example_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gap_regression.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "gap_regression.png").stat().st_size > 1000
    assert "gap width / data width" in proc.stdout


def _gap_run(**kw):
    sys.path.insert(0, str(ROOT / "examples"))
    from gap_regression import run

    return run(seed=0, epochs=80, swa_start=40, num_samples=60, **kw)


def test_gap_regression_in_range_coverage():
    result = _gap_run()
    assert 0.85 <= result["coverage"] <= 1.0


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="known SWAG limitation: SGD noise lives in the span of the data gradients, so the "
    "interval in the gap is about as wide as over the data (ratio ~1.0, see docs/training.md)",
)
def test_gap_regression_gap_interval_twice_as_wide():
    result = _gap_run()
    assert result["gap_width"] >= 2 * result["data_width"]
