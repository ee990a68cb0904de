"""Tests of the UCI benchmark's tables (benchmarks/uci_report.py) on a synthetic cache."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from pyro_swag.data import default_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import uci_report as report  # noqa: E402


def _cache(rows: dict[tuple[str, str], list[float]]) -> dict:
    """``{(set, method): [test LL per split]}`` -> the benchmark's cache layout."""
    return {f"{name}/{i}/{method}": {"status": "ok", "test_ll": ll}
            for (name, method), lls in rows.items() for i, ll in enumerate(lls)}


def test_verdict_uses_the_newest_recipe_run_on_every_split():
    cache = _cache({
        ("yacht", "swag_d"): [-0.5] * 20,
        ("yacht", "swag_e"): [-0.3] * 19,  # one split short: recipe D counts
        ("concrete", "swag_e"): [-3.0] * 20,
        ("power", "swag_c"): [-2.81] * 20,
    })
    lines = report.verdict(cache)
    yacht = next(line for line in lines if line.startswith("- yacht"))
    assert "recipe D" in yacht and "-0.500" in yacht and "(**short**)" in yacht
    concrete = next(line for line in lines if line.startswith("- concrete"))
    assert "recipe E" in concrete and "≥ published SWAG -3.013" in concrete
    assert "< MC dropout -2.93" in concrete
    assert "- boston: no SWAG result yet." in lines
    # yacht (-0.5 >= -1.25) is the only set at or above MC dropout
    assert lines[-1] == "- SWAG ≥ MC dropout on 1 of 9 sets (target: ≥ 5)."


def test_heteroscedastic_recipes_alone_never_enter_the_verdict():
    # F and G are another model: fixed before they ran, the targets keep E (and C);
    # only recipe H's per-split choice between the two (next test) replaces them
    cache = _cache({
        ("yacht", "swag_e"): [-0.5] * 20,
        ("yacht", "swag_f"): [-0.1] * 20,
        ("yacht", "swag_g"): [0.2] * 20,
    })
    yacht = next(line for line in report.verdict(cache) if line.startswith("- yacht"))
    assert "recipe E" in yacht and "-0.500" in yacht and "(**short**)" in yacht
    (line,) = report.against_published(cache, "swag_g", "SWAG (recipe G)")
    assert "0.200" in line and "≥ published SWAG -0.404" in line
    (line,) = report.paired(cache, "G", "F")
    assert "G − F = +0.300" in line


def test_recipe_h_chooses_the_noise_model_per_split_on_held_out_data():
    def row(test_ll, heldout, wall=10.0):
        return {"status": "ok", "test_ll": test_ll, "wall_s": wall,
                "swa_c_val_ll": {"0.03": heldout - 1.0, "0.1": heldout}}

    cache = {
        "yacht/0/swag_e": row(-0.5, 2.0), "yacht/0/swag_g": row(0.1, 2.5, wall=30.0),
        "yacht/1/swag_e": row(-0.6, 2.0), "yacht/1/swag_g": row(-3.0, 2.0),  # tie: E
        "yacht/2/swag_e": row(-0.7, 1.0),  # no G row: no H row
        "naval/0/swag_c": row(7.0, 3.0), "naval/0/swag_g": row(7.4, 2.9),
        "naval/0/swag_e": row(9.9, 9.9),  # E is not naval's homoscedastic recipe
    }
    out = report.with_heldout_choice(cache)
    assert out["yacht/0/swag_h"]["test_ll"] == 0.1 and out["yacht/0/swag_h"]["chosen"] == "G"
    assert out["yacht/0/swag_h"]["wall_s"] == 40.0
    assert out["yacht/0/swag_h"]["heldout"] == {"E": 2.0, "G": 2.5}
    assert out["yacht/1/swag_h"]["test_ll"] == -0.6 and out["yacht/1/swag_h"]["chosen"] == "E"
    assert "yacht/2/swag_h" not in out
    assert out["naval/0/swag_h"]["chosen"] == "C" and out["naval/0/swag_h"]["test_ll"] == 7.0
    assert all(out[k] == v for k, v in cache.items())  # the cached rows are unchanged
    full = report.with_heldout_choice({
        **{f"yacht/{i}/swag_e": row(-0.5, 2.0) for i in range(20)},
        **{f"yacht/{i}/swag_g": row(-0.2, 2.1) for i in range(20)},
    })
    yacht = next(line for line in report.verdict(full) if line.startswith("- yacht"))
    assert "recipe H" in yacht and "-0.200" in yacht and "≥ published SWAG" in yacht
    (line,) = report.h_choices(full)
    assert "G chosen on 20 of 20 splits" in line and "+0.100" in line


def test_paired_differences_match_by_split():
    cache = _cache({
        ("yacht", "swag_e"): [-0.5, -0.4, -0.6],
        ("yacht", "multiswag_e"): [-0.3, -0.45, -0.2],
    })
    (line,) = report.paired(cache, "MultiSWAG E", "E")
    diffs = [0.2, -0.05, 0.4]
    mean, se = report._mean_se(diffs)
    assert line.startswith("- yacht:") and f"{mean:+.3f} ± {se:.3f}" in line
    assert "better on 2 of 3 splits" in line


def test_against_published_needs_every_split():
    cache = _cache({
        ("yacht", "multiswag_e"): [-0.3] * 20,
        ("wine", "multiswag_e"): [-0.9] * 3,
    })
    lines = report.against_published(cache, "multiswag_e", "MultiSWAG (E)")
    assert lines == ["- yacht: MultiSWAG (E) -0.300 over 20 split(s), ≥ published SWAG "
                     "-0.404, ≥ MC dropout -1.25."]
    assert report.against_published({}, "multiswag_e", "M") == [
        "- M: no set with every split run yet."]


def test_mean_se_is_the_standard_error_of_the_mean():
    assert report._mean_se([1.0, 3.0]) == (2.0, 1.0)  # sd sqrt(2), over sqrt(2) splits
    mean, se = report._mean_se([1.0])
    assert mean == 1.0 and math.isnan(se)


def test_baseline_rows_do_not_carry_the_swag_runs_settings(tmp_path):
    root = default_data_dir()
    if root is None or not (root / "yacht").is_dir():
        pytest.skip("UCI data directory absent (set PYRO_SWAG_DATA)")
    import uci  # benchmarks/ is on sys.path (above)

    cache = tmp_path / "cache.json"
    uci.main(["--sets", "yacht", "--splits", "1", "--methods", "swag", "svi_normal",
              "--pretrain-steps", "100", "--svi-steps", "50", "--snapshots", "3",
              "--cache", str(cache), "--out", str(tmp_path / "uci.md")])
    rows = json.loads(cache.read_text())
    assert "swa_c" in rows["yacht/0/swag"] and "pretrain_s" in rows["yacht/0/swag"]
    assert not {"swa_c", "pretrain_s", "swa_s"} & set(rows["yacht/0/svi_normal"])
