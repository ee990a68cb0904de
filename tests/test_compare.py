import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _compare_cases import small, tiny

import pyro_swag.compare_report as compare_report
from pyro_swag.cli import main
from pyro_swag.compare import METHODS, compare, make_model
from pyro_swag.compare_metrics import _ece, _set_coverage, agreement, scores
from pyro_swag.data import Dataset

ROOT = Path(__file__).resolve().parent.parent


def test_compare_end_to_end_writes_every_output(tmp_path):
    out = tmp_path / "report"
    summary = compare(small(), out, config=tiny(), quiet=True)
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "results.json", "predictive.png", "calibration.png",
            "forest.png"} <= names
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS)
    for name, row in results["methods"].items():
        assert row["status"] == "ok", (name, row["note"])
        assert f"{name}.nc" in names
        for key in ("test_ll", "rmse", "coverage_90", "coverage_95", "wall_s"):
            assert math.isfinite(row[key]), (name, key)
        assert 0 <= row["coverage_90"] <= row["coverage_95"] <= 1
    for name in ("swag", "svi_normal"):  # corrected PSIS-LOO on the training data
        row = results["methods"][name]
        assert math.isfinite(row["loo_elpd"]) and row["loo_se"] > 0, row
        assert math.isfinite(row["loo_max_k"])
    # SWAG draws spread: more draws than one and a different test LL from its own mean (SWA)
    assert results["methods"]["swag"]["num_draws"] == 30
    assert results["methods"]["swag"]["test_ll"] != results["methods"]["swa"]["test_ll"]
    assert "vs_nuts" in results["methods"]["swag"]
    assert results["methods"]["nuts"].get("vs_nuts") is None
    health = results["methods"]["nuts"]["mcmc_health"]  # the reference's own checks
    assert health["draws"] == 30 and health["divergences"] >= 0 and health["min_bfmi"] > 0
    assert health["max_rhat"] > 0.9 and health["min_ess_bulk"] > 0
    assert summary["methods"]["swag"]["test_ll"] == results["methods"]["swag"]["test_ll"]
    first = (out / "report.md").read_text()
    assert "| SWAG |" in first and "Agreement with NUTS" in first
    assert "- NUTS: 30 draws, " in first and "max split R̂" in first
    # a second run into the same directory replaces the report, leaving no stale method files
    (out / "nuts.nc").write_text("stale")
    compare(small(), out, config=tiny(methods=("map",)), quiet=True)
    assert not (out / "nuts.nc").exists()
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["map"]
    text = (out / "report.md").read_text()
    assert "| SGD/MAP |" in text and "| SWAG |" not in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.partial")]


def test_classification_reports_accuracy_and_ece(tmp_path):
    d = small("breast_cancer", 150)
    res = compare(d, None, config=tiny(methods=("map", "swag")), quiet=True)
    for row in res["methods"].values():
        assert 0.5 < row["accuracy"] <= 1 and 0 <= row["ece"] <= 1
        assert "rmse" not in row


def test_nuts_over_budget_is_skipped_with_a_note():
    res = compare(small(), None, config=tiny(methods=("nuts",), nuts_budget_s=0.0), quiet=True)
    row = res["methods"]["nuts"]
    assert row["status"] == "skipped" and "time budget" in row["note"]


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(data="nope"), ValueError, "unknown dataset name='nope'"),
        (dict(data="yacht", data_dir="/no/such/dir"), FileNotFoundError, "data_dir="),
        (dict(data="diabetes", split=-2), ValueError, "split must be"),
    ],
)
def test_bad_input_fails_before_writing(tmp_path, kwargs, err, match):
    out = tmp_path / "out"
    with pytest.raises(err, match=match):
        compare(out_dir=out, config=tiny(), quiet=True, **kwargs)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_no_complete_looking_report(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(compare_report, "write_outputs", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        compare(small(), out, config=tiny(methods=("map",)), quiet=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_config_names_the_argument():
    with pytest.raises(ValueError, match=r"methods=.*unknown \['bogus'\]"):
        tiny(methods=("bogus",))
    with pytest.raises(ValueError, match="swa_snapshots must be"):
        tiny(swa_snapshots=1)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"pretrain_lr_decay={bad}"):
            tiny(pretrain_lr_decay=bad)
    with pytest.raises(ValueError, match="patience=0"):
        tiny(patience=0)
    for name, bad, match in (
        ("hidden", (0,), r"hidden=\(0,\)"), ("hidden", (-3,), r"hidden=\(-3,\)"),
        ("hidden", (), r"hidden=\(\)"), ("nuts_budget_s", -5.0, "nuts_budget_s=-5.0"),
        ("nuts_budget_s", math.nan, "nuts_budget_s=nan"), ("seed", -1, "seed=-1"),
        ("svi_lr", 0.0, "svi_lr=0.0"), ("swa_c", math.inf, "swa_c=inf"),
        ("calibration", "bogus", "calibration='bogus'"),
        ("pretrain_val_fraction", 1.0, "pretrain_val_fraction=1.0"),
    ):
        with pytest.raises(ValueError, match=match):
            tiny(**{name: bad})


def test_results_json_is_strict_json():
    from pyro_swag.compare_report import json_safe as _json_safe

    value = {"a": [1.5, math.nan, {"b": math.inf}], "c": torch.tensor(-math.inf), "d": "x",
             "e": True, "f": None, "g": 3}
    text = json.dumps(_json_safe(value), allow_nan=False)
    assert json.loads(text) == {"a": [1.5, None, {"b": None}], "c": None, "d": "x", "e": True,
                                "f": None, "g": 3}


def test_cli_errors_exit_2(tmp_path, capsys):
    code = main(["compare", "--dataset", "nope", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "unknown dataset" in capsys.readouterr().err
    code = main(["compare", "--uci", "yacht", "--data-dir", str(tmp_path), "--quiet",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "no yacht/data/data.txt" in capsys.readouterr().err
    for args, match in ((["--hidden", "-3"], "hidden=(-3,)"), (["--seed", "-1"], "seed=-1"),
                        (["--nuts-budget", "nan"], "nuts_budget_s=nan")):
        code = main(["compare", "--quick", "--quiet", "--out", str(tmp_path / "o"), *args])
        assert code == 2 and match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--threads", "0", "--out", str(tmp_path / "o")])
    assert "--threads: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_quick_keeps_an_explicit_num_samples():
    from pyro_swag.cli import _config, _parser

    for argv, expected in ((["--quick"], 30), (["--quick", "--num-samples", "100"], 100),
                           ([], 100), (["--num-samples", "7"], 7)):
        assert _config(_parser().parse_args(["compare", *argv])).num_samples == expected


# ----------------------------------------------------------------- metric oracles
def test_gaussian_scores_match_closed_forms():
    torch.manual_seed(0)
    n = 20000
    y = torch.randn(n)
    data = Dataset("toy", "gaussian", y[:2, None], y[:2], y[:, None], y, 10.0, 2.0)
    terms = {"loglik": torch.distributions.Normal(0.0, 1.0).log_prob(y)[None],
             "mean": torch.zeros(1, n), "var": torch.ones(1, n)}
    sc = scores(terms, data, y)
    expected = float(torch.distributions.Normal(0.0, 1.0).log_prob(y).mean()) - math.log(2.0)
    assert sc["test_ll"] == pytest.approx(expected, abs=1e-5)
    assert sc["rmse"] == pytest.approx(2.0 * float(y.pow(2).mean().sqrt()), rel=1e-5)
    assert sc["coverage_90"] == pytest.approx(0.90, abs=0.01)
    assert sc["coverage_95"] == pytest.approx(0.95, abs=0.01)
    # a two-component mixture: its 95 % interval is wider than either component's
    terms2 = {"loglik": terms["loglik"].repeat(2, 1), "mean": torch.stack([-torch.ones(n),
              torch.ones(n)]), "var": torch.ones(2, n)}
    assert scores(terms2, data, y)["coverage_95"] > 0.98


def test_classification_metric_oracles():
    probs = torch.tensor([[0.8, 0.2]] * 10)
    y = torch.tensor([0] * 8 + [1] * 2)
    assert _ece(probs, y) == pytest.approx(0.0, abs=1e-6)
    assert _ece(probs, torch.zeros(10, dtype=torch.long)) == pytest.approx(0.2, abs=1e-6)
    # sets at level 0.9: {0, 1} always (0.8 < 0.9) -> full coverage; at 0.75: {0}
    assert _set_coverage(probs, y, 0.9) == 1.0
    assert _set_coverage(probs, y, 0.75) == pytest.approx(0.8)


def test_agreement_w2_oracle():
    torch.manual_seed(0)
    ref = {"a": torch.randn(4000, 3)}
    data = Dataset("toy", "gaussian", torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 1),
                   torch.zeros(2))
    ev = {"_mean": torch.zeros(2), "_sd": torch.ones(2)}
    same = agreement(ev, ev, ref, ref, data)
    assert same["w2_marginal"] == pytest.approx(0.0, abs=1e-9)
    assert same["pred_mean_err"] == 0.0
    shifted = agreement(ev, ev, {"a": ref["a"] + 1.0}, ref, data)
    assert shifted["w2_marginal"] == pytest.approx(1.0, rel=0.05)


def test_example_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compare.py"), "--smoke",
         "--out", str(tmp_path / "ex")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SWAG: test LL" in proc.stdout
    assert (tmp_path / "ex" / "results.json").is_file()


# ------------------------------------------------- methods independent of each other
def test_svi_leaves_the_models_initial_weights_alone():
    data, cfg = small(), tiny(methods=("svi_lowrank",))
    model = make_model(data, cfg.hidden, cfg.seed)
    before = {k: v.clone() for k, v in model._initial.items()}
    alone = compare(data, None, config=cfg, quiet=True)["methods"]["svi_lowrank"]["test_ll"]
    after = compare(data, None, model=model, quiet=True,
                    config=tiny(methods=("svi_normal", "svi_lowrank")))["methods"]
    assert all(model._initial[k].equal(v) for k, v in before.items())
    assert after["svi_lowrank"]["test_ll"] == pytest.approx(alone, abs=1e-6)


def test_a_methods_numbers_do_not_depend_on_the_methods_before_it():
    data = small()
    keys = ("test_ll", "coverage_90", "loo_elpd", "loo_max_k")
    alone = compare(data, None, config=tiny(methods=("swag",)), quiet=True)["methods"]["swag"]
    later = compare(data, None, config=tiny(methods=("map", "svi_normal", "swag")),
                    quiet=True)["methods"]["swag"]
    assert {k: later[k] for k in keys} == pytest.approx({k: alone[k] for k in keys}, abs=1e-6)


def test_a_diverged_swa_phase_keeps_the_map_and_nuts(tmp_path):
    import pyro_swag.compare_swag as cs

    calls = []
    real = cs._pretrain
    cs._pretrain = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        cfg = tiny(methods=("map", "swag", "swa", "nuts"), swa_c=1e6, swa_retries=1,
                   swa_stability=None)
        rows = compare(small(), tmp_path / "r", config=cfg, quiet=True)["methods"]
    finally:
        cs._pretrain = real
    assert rows["map"]["status"] == "ok" and rows["nuts"]["status"] == "ok"
    for name in ("swag", "swa"):
        assert rows[name]["status"] == "failed" and "SWA phase diverged" in rows[name]["note"]
    assert len(calls) == 1  # pre-trained once, the failure kept rather than retrained


def test_regression_loo_is_in_original_units(tmp_path):
    import xarray as xr

    from pyro_swag.datatree import loo

    data = small()
    rows = compare(data, tmp_path / "r", config=tiny(methods=("swag",)), quiet=True)["methods"]
    raw = float(loo(xr.open_datatree(tmp_path / "r" / "swag.nc", engine="h5netcdf")).elpd)
    n = data.x_train.shape[0]
    assert rows["swag"]["loo_elpd"] == pytest.approx(raw - n * math.log(data.y_std), rel=1e-6)
    assert rows["swag"]["loo_elpd"] / n == pytest.approx(rows["swag"]["test_ll"], abs=1.0)


def test_extreme_importance_ratios_give_a_real_loo_not_nan(tmp_path):
    data = small("digits", n=300, n_test=100)
    out = tmp_path / "r"
    rows = compare(data, out, config=tiny(methods=("calibrated_swag", "nuts")),
                   quiet=True)["methods"]
    row = rows["calibrated_swag"]
    assert row["scale"] > 100  # ratios p/q spanning thousands of nats
    assert math.isfinite(row["loo_elpd"]) and row["loo_max_k"] > 0.7
    text = (out / "report.md").read_text()
    assert "`pred_prob_err`: mean absolute difference" in text and "pred_sd_err" not in text


def test_coordinates_sgd_never_moved_are_a_report_note_not_a_warning(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = compare(small("digits", n=300, n_test=100), tmp_path / "r",
                       config=tiny(methods=("swag", "calibrated_swag")), quiet=True)["methods"]
    assert not [w for w in caught if "did not move" in str(w.message)]
    for name in ("swag", "calibrated_swag"):
        assert re.search(r"\d+ of 3760 coordinates did not move in the SWA phase",
                         rows[name]["note"])
    assert "did not move" in (tmp_path / "r" / "report.md").read_text()


def test_too_few_draws_for_loo_keep_the_trees_and_say_why(tmp_path):
    cfg = tiny(methods=("swag", "nuts"), num_samples=20, nuts_samples=20)
    rows = compare(small(), tmp_path / "r", config=cfg, quiet=True)["methods"]
    for name in ("swag", "nuts"):
        assert "LOO failed" in rows[name]["loo_note"] and "got S = 20" in rows[name]["loo_note"]
        assert "loo_elpd" not in rows[name] and (tmp_path / "r" / f"{name}.nc").exists()
    assert rows["nuts"]["mcmc_health"]["draws"] == 20
