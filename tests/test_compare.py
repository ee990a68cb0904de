import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyro_swag.compare_report as compare_report
from pyro_swag.cli import main
from pyro_swag.compare import METHODS, compare, make_model, quick_config
from pyro_swag.compare_metrics import _ece, _set_coverage, agreement, scores
from pyro_swag.data import Dataset, load_dataset

ROOT = Path(__file__).resolve().parent.parent


def tiny(**overrides):
    values = dict(pretrain_steps=60, swa_snapshots=5, rank=4, num_samples=30,
                  multiswag_runs=2, svi_steps=60, nuts_warmup=10, nuts_samples=30,
                  nuts_max_tree_depth=3, nuts_budget_s=60.0)
    values.update(overrides)
    return quick_config(**values)


def _small(name="diabetes", n=100, n_test=40):
    d = load_dataset(name)
    return Dataset(d.name, d.likelihood, d.x_train[:n], d.y_train[:n], d.x_test[:n_test],
                   d.y_test[:n_test], d.y_mean, d.y_std, d.num_classes, d.split)


def test_compare_end_to_end_writes_every_output(tmp_path):
    out = tmp_path / "report"
    summary = compare(_small(), out, config=tiny(), quiet=True)
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
    assert summary["methods"]["swag"]["test_ll"] == results["methods"]["swag"]["test_ll"]
    first = (out / "report.md").read_text()
    assert "| SWAG |" in first and "Agreement with NUTS" in first
    # a second run into the same directory replaces the report, leaving no stale method files
    (out / "nuts.nc").write_text("stale")
    compare(_small(), out, config=tiny(methods=("map",)), quiet=True)
    assert not (out / "nuts.nc").exists()
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["map"]
    text = (out / "report.md").read_text()
    assert "| SGD/MAP |" in text and "| SWAG |" not in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.partial")]


def test_classification_reports_accuracy_and_ece(tmp_path):
    d = _small("breast_cancer", 150)
    res = compare(d, None, config=tiny(methods=("map", "swag")), quiet=True)
    for row in res["methods"].values():
        assert 0.5 < row["accuracy"] <= 1 and 0 <= row["ece"] <= 1
        assert "rmse" not in row


def test_nuts_over_budget_is_skipped_with_a_note():
    res = compare(_small(), None, config=tiny(methods=("nuts",), nuts_budget_s=0.0), quiet=True)
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
        compare(_small(), out, config=tiny(methods=("map",)), quiet=True)
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


def test_diverging_swa_phase_is_retried_then_reported_failed():
    res = compare(_small(), None, config=tiny(methods=("swag",), swa_c=1e6, swa_retries=1,
                                               swa_stability=None),
                  quiet=True)
    row = res["methods"]["swag"]
    assert row["status"] == "failed"
    assert "diverged" in row["note"] and "after 1 retries" in row["note"]


def test_swa_rate_is_capped_by_the_curvature():
    from pyro_swag.compare_methods import run_method

    data = _small()
    model = make_model(data)
    loose = run_method("swag", model, None, data, tiny(swa_stability=None), {}, quiet=True)
    assert "curvature" not in loose.extra
    assert loose.extra["swa_lr"] == loose.extra["swa_lr_uncapped"]
    capped = run_method("swag", model, None, data, tiny(swa_stability=1e-4), {}, quiet=True)
    curvature = capped.extra["curvature"]
    assert curvature > 0
    assert capped.extra["swa_lr"] == pytest.approx(1e-4 * 2 * 1.9 / curvature)
    assert capped.extra["swa_lr"] < capped.extra["swa_lr_uncapped"]


def test_per_run_selection_picks_the_best_held_out_setting():
    from pyro_swag.compare_swag import train_swag

    data = _small()
    cfg = tiny(pretrain_batch_grid=(16, 90), swa_c_grid=(0.03, 0.3))
    run = train_swag(make_model(data), data, cfg, seed=0, quiet=True)
    assert run["pretrain_batch"] in (16, 90) and math.isfinite(run["pretrain_val_ll"])
    pre = run["pretrain_selection"]
    assert len(pre) == 2 and run["pretrain_val_ll"] == max(pre.values())
    assert pre[f"batch={run['pretrain_batch']}"] == max(pre.values())
    selection = run["swa_c_selection"]
    assert set(selection) == {0.03, 0.3}
    assert run["swa_c"] == pytest.approx(max(selection, key=selection.get))
    assert run["snapshots"] == cfg.swa_snapshots  # the final phase ran on all training data
    default = train_swag(make_model(data), data, tiny(), seed=0, quiet=True)
    assert default["swa_c_selection"] is None and default["swa_c"] == pytest.approx(0.1)


@pytest.mark.parametrize("grid", [dict(swa_c_grid=()), dict(swa_c_grid=(0.1, -1.0)),
                                  dict(pretrain_batch_grid=(0,))])
def test_bad_selection_grid_names_the_argument(grid):
    name = next(iter(grid))
    with pytest.raises(ValueError, match=f"{name} must be None or a non-empty tuple"):
        tiny(**grid)


@pytest.mark.parametrize("patience, checks", [(None, 6), (1, 2)])
def test_patience_none_runs_every_step_and_keeps_the_best_point(monkeypatch, patience, checks):
    import pyro_swag.compare_swag as cs

    scores_seen = iter([0.5, 0.1, 0.2, 0.3, 0.9, 0.4])  # best at the 5th check
    seen, points = [], []

    def fake_val_scores(model, collector, x, y, val, mse):
        seen.append(next(scores_seen))
        points.append(collector.loc.detach().clone())
        return seen[-1], -math.inf

    monkeypatch.setattr(cs, "_val_scores", fake_val_scores)
    data = _small()
    cfg = tiny(pretrain_steps=60, eval_every=10, patience=patience, swa_c_grid=None)
    run = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True)
    assert len(seen) == checks and run["pretrain_val_ll"] == max(seen)
    collector = run["collector"]
    with torch.no_grad():  # the MAP handed to the SWA phase is the best held-out point
        collector.loc.copy_(points[seen.index(max(seen))])
        kept = collector(data.x_train, data.y_train, num_data=data.x_train.shape[0])
    for name, value in run["map"].items():
        torch.testing.assert_close(value, kept[name])


@pytest.mark.parametrize("select", ["map", "swag"])
def test_joint_selection_scores_every_pretraining_run_with_the_swag_predictive(monkeypatch,
                                                                             select):
    import pyro_swag.compare_swag as cs

    scores_seen = iter([0.1, 0.2, 0.9, 0.3])  # (best MAP run: c=0.03, 0.3), (other run: ...)
    monkeypatch.setattr(cs, "_val_predictive", lambda *a: next(scores_seen))
    data = _small()
    cfg = tiny(pretrain_batch_grid=(16, 90), swa_c_grid=(0.03, 0.3), pretrain_select=select)
    run = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True)
    pre = run["pretrain_selection"]
    worse = min(pre, key=pre.get)
    if select == "swag":  # the worse MAP gave the best SWAG predictive: it wins, with c=0.03
        assert run["pretrain_val_ll"] == pre[worse] and worse == f"batch={run['pretrain_batch']}"
        assert run["swa_c"] == 0.03 and run["swa_c_selection"] == {0.03: 0.9, 0.3: 0.3}
    else:  # the best MAP's run only; its better rate
        assert run["pretrain_val_ll"] == max(pre.values()) and run["swa_c"] == 0.3
        assert run["swa_c_selection"] == {0.03: 0.1, 0.3: 0.2}
    with pytest.raises(ValueError, match="pretrain_select='nope'"):
        tiny(pretrain_select="nope")


def test_rmse_checkpoint_is_a_second_candidate_of_the_joint_selection(monkeypatch):
    import pyro_swag.compare_swag as cs

    # held-out (LL, -MSE) per check: LL is best at check 2, squared error at check 4
    checks = iter([(0.1, -9.0), (0.8, -5.0), (0.3, -4.0), (0.2, -1.0), (0.0, -2.0)])
    points = []

    def fake_val_scores(model, collector, x, y, val, mse):
        assert mse  # the squared error is only computed when a checkpoint needs it
        points.append(collector.loc.detach().clone())
        return next(checks)

    monkeypatch.setattr(cs, "_val_scores", fake_val_scores)
    swag_scores = iter([0.1, 0.2, 0.9, 0.3])  # (LL point: c=0.03, 0.3), (RMSE point: ...)
    monkeypatch.setattr(cs, "_val_predictive", lambda *a: next(swag_scores))
    data = _small()
    cfg = tiny(pretrain_steps=50, eval_every=10, patience=None, swa_c_grid=(0.03, 0.3),
               pretrain_select="swag", pretrain_checkpoints=("ll", "rmse"))
    run = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True)
    size = cfg.pretrain_batch_size
    assert run["pretrain_selection"] == {f"batch={size}": 0.8, f"batch={size},rmse": 0.2}
    # the RMSE point's SWAG predictive won, with c = 0.03; its held-out LL is recorded
    assert run["pretrain_checkpoint"] == "rmse" and run["swa_c"] == 0.03
    assert run["pretrain_val_ll"] == 0.2
    collector = run["collector"]
    with torch.no_grad():  # the MAP handed to the SWA phase is the 4th check's point
        collector.loc.copy_(points[3])
        kept = collector(data.x_train, data.y_train, num_data=data.x_train.shape[0])
    for name, value in run["map"].items():
        torch.testing.assert_close(value, kept[name])


@pytest.mark.parametrize("bad", [("ll", "mae"), (), ("ll", "ll"), "ll"])
def test_bad_pretrain_checkpoints_name_the_argument(bad):
    with pytest.raises(ValueError, match="pretrain_checkpoints"):
        tiny(pretrain_checkpoints=bad)


def test_scale_grid_chooses_the_scale_with_the_rate_on_held_out_data(monkeypatch):
    import pyro_swag.calibrate as cal
    import pyro_swag.compare_swag as cs

    curves = iter([[0.1, 0.5, 0.2], [0.3, 0.4, 0.9]])  # c=0.03: best 0.5 at s=1; c=0.3: s=4

    def fake_validation(model, guide, *args, scales, num_samples, refine, apply):
        assert not refine and not apply and scales == [0.25, 1.0, 4.0]
        curve = next(curves)
        return cal.Calibration("validation", scales[curve.index(max(curve))], scales,
                               {"log_likelihood": curve}, "log_likelihood", num_samples, 1.0)

    monkeypatch.setattr(cal, "calibrate_validation", fake_validation)
    data = _small()
    cfg = tiny(swa_c_grid=(0.03, 0.3), swa_scale_grid=(0.25, 1.0, 4.0))
    run = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True)
    assert run["swa_c"] == 0.3 and run["swa_c_selection"] == {0.03: 0.5, 0.3: 0.9}
    guide = run["guide"]
    assert guide.scale == 4.0 and guide.calibration["curve"]["log_likelihood"] == [0.3, 0.4, 0.9]
    with pytest.raises(ValueError, match="swa_scale_grid.*swa_c_grid"):
        tiny(swa_scale_grid=(1.0, 2.0))
    with pytest.raises(ValueError, match="swa_scale_grid"):
        tiny(swa_c_grid=(0.1,), swa_scale_grid=(1.0, -2.0))


# ------------------------------------------------- methods independent of each other
def test_svi_leaves_the_models_initial_weights_alone():
    data, cfg = _small(), tiny(methods=("svi_lowrank",))
    model = make_model(data, cfg.hidden, cfg.seed)
    before = {k: v.clone() for k, v in model._initial.items()}
    alone = compare(data, None, config=cfg, quiet=True)["methods"]["svi_lowrank"]["test_ll"]
    after = compare(data, None, model=model, quiet=True,
                    config=tiny(methods=("svi_normal", "svi_lowrank")))["methods"]
    assert all(model._initial[k].equal(v) for k, v in before.items())
    assert after["svi_lowrank"]["test_ll"] == pytest.approx(alone, abs=1e-6)


def test_a_methods_numbers_do_not_depend_on_the_methods_before_it():
    data = _small()
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
        rows = compare(_small(), tmp_path / "r", config=cfg, quiet=True)["methods"]
    finally:
        cs._pretrain = real
    assert rows["map"]["status"] == "ok" and rows["nuts"]["status"] == "ok"
    for name in ("swag", "swa"):
        assert rows[name]["status"] == "failed" and "SWA phase diverged" in rows[name]["note"]
    assert len(calls) == 1  # pre-trained once, the failure kept rather than retrained


def test_regression_loo_is_in_original_units(tmp_path):
    import xarray as xr

    from pyro_swag.datatree import loo

    data = _small()
    rows = compare(data, tmp_path / "r", config=tiny(methods=("swag",)), quiet=True)["methods"]
    raw = float(loo(xr.open_datatree(tmp_path / "r" / "swag.nc", engine="h5netcdf")).elpd)
    n = data.x_train.shape[0]
    assert rows["swag"]["loo_elpd"] == pytest.approx(raw - n * math.log(data.y_std), rel=1e-6)
    assert rows["swag"]["loo_elpd"] / n == pytest.approx(rows["swag"]["test_ll"], abs=1.0)


def test_extreme_importance_ratios_give_a_real_loo_not_nan(tmp_path):
    data = _small("digits", n=300, n_test=100)
    out = tmp_path / "r"
    rows = compare(data, out, config=tiny(methods=("calibrated_swag", "nuts")),
                   quiet=True)["methods"]
    row = rows["calibrated_swag"]
    assert row["scale"] > 100  # ratios p/q spanning thousands of nats
    assert math.isfinite(row["loo_elpd"]) and row["loo_max_k"] > 0.7
    text = (out / "report.md").read_text()
    assert "`pred_prob_err`: mean absolute difference" in text and "pred_sd_err" not in text
