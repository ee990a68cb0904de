"""Smoke-run the foundation example (other examples are smoke-run by their feature's tests)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_swag_basics_example_runs():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "swag_basics.py"), "--smoke"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "snapshots: 3" in out and "test RMSE" in out
