"""compare's SWAG training: divergence retries, the stability cap, the selection grids
of pre-training and the SWA phase, and early stopping."""

import math
import warnings

import pytest
import torch
from _compare_cases import small, tiny

from pyro_swag.compare import compare, make_model


def test_diverging_swa_phase_is_retried_then_reported_failed():
    res = compare(small(), None, config=tiny(methods=("swag",), swa_c=1e6, swa_retries=1,
                                              swa_stability=None),
                  quiet=True)
    row = res["methods"]["swag"]
    assert row["status"] == "failed"
    assert "diverged" in row["note"] and "after 1 retries" in row["note"]


def test_swa_rate_is_capped_by_the_curvature():
    from pyro_swag.compare_methods import run_method

    data = small()
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

    data = small()
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
    data = small()
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
    data = small()
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
    data = small()
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
    data = small()
    cfg = tiny(swa_c_grid=(0.03, 0.3), swa_scale_grid=(0.25, 1.0, 4.0))
    run = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True)
    assert run["swa_c"] == 0.3 and run["swa_c_selection"] == {0.03: 0.5, 0.3: 0.9}
    guide = run["guide"]
    assert guide.scale == 4.0 and guide.calibration["curve"]["log_likelihood"] == [0.3, 0.4, 0.9]
    with pytest.raises(ValueError, match="swa_scale_grid.*swa_c_grid"):
        tiny(swa_scale_grid=(1.0, 2.0))
    with pytest.raises(ValueError, match="swa_scale_grid"):
        tiny(swa_c_grid=(0.1,), swa_scale_grid=(1.0, -2.0))


def test_validation_calibration_scores_the_pretraining_hold_out(monkeypatch):
    import pyro_swag.calibrate as cal
    import pyro_swag.compare_swag as cs

    data, cfg = small(), tiny()
    plain = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True)
    assert plain["heldout_calibration"] is None and plain["heldout_s"] == 0.0
    seen = {}
    real = cal.calibrate_validation

    def spy(model, guide, *args, **kwargs):
        seen["x"], seen["guide_mean"] = args[0], guide.loc.detach().clone()
        return real(model, guide, *args, **kwargs)

    monkeypatch.setattr(cal, "calibrate_validation", spy)
    run = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True, heldout_scale=True)
    _, val = cs._holdout(data.x_train.shape[0], cfg.pretrain_val_fraction, 0)
    torch.testing.assert_close(seen["x"], data.x_train[val])  # held-out points, not training
    result = run["heldout_calibration"]
    assert result.method == "validation" and result.scale > 0 and run["heldout_s"] > 0
    # the scored guide was trained without the held-out part; the final one with it, on the
    # same batches as without the extra phase (the RNG state is restored)
    assert not torch.allclose(seen["guide_mean"], run["guide"].loc)
    torch.testing.assert_close(run["guide"].loc, plain["guide"].loc)


def test_validation_calibration_in_compare_and_without_a_hold_out():
    cfg = tiny(methods=("swag", "calibrated_swag"), calibration="validation")
    rows = compare(small(), None, config=cfg, quiet=True)["methods"]
    row = rows["calibrated_swag"]
    assert row["status"] == "ok" and "pre-training hold-out" in row["note"]
    assert row["wall_s"] > rows["swag"]["wall_s"]
    none = tiny(methods=("calibrated_swag",), calibration="validation", pretrain_val_fraction=0)
    row = compare(small(), None, config=none, quiet=True)["methods"]["calibrated_swag"]
    assert row["status"] == "failed" and "pretrain_val_fraction=0" in row["note"]


def test_report_says_what_the_held_out_part_chose():
    cfg = tiny(methods=("swag", "swag_diag"), pretrain_batch_grid=(16, 90),
               swa_c_grid=(0.03, 0.3), swa_scale_grid=(0.5, 2.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = compare(small(), None, config=cfg, quiet=True)["methods"]
    assert not [w for w in caught if "the best scale" in str(w.message)]  # said in the note
    row = rows["swag"]
    assert row["swa_c"] in (0.03, 0.3) and row["pretrain_batch"] in (16, 90)
    assert math.isfinite(row["heldout_ll"]) and row["pretrain_checkpoint"] == "ll"
    note = row["note"]
    assert note.startswith("chosen on the pre-training hold-out: swa_c=")
    assert f"pre-training batch {row['pretrain_batch']} (ll checkpoint)" in note
    assert "scale=0.5 (an end of swa_scale_grid" in note or "scale=2 (an end of" in note
    assert f"{row['heldout_ll']:.3f} per point" in note
    assert rows["swag_diag"]["note"] == ""  # the diagonal guide keeps scale 1
    plain = compare(small(), None, config=tiny(methods=("swag",)), quiet=True)["methods"]
    assert plain["swag"]["note"] == "" and "heldout_ll" not in plain["swag"]


def test_validation_calibration_reuses_the_scale_grid_choice():
    import pyro_swag.compare_swag as cs

    data = small()
    cfg = tiny(swa_c_grid=(0.03, 0.3), swa_scale_grid=(0.5, 2.0))
    run = cs.train_swag(make_model(data), data, cfg, seed=0, quiet=True, heldout_scale=True)
    assert run["heldout_s"] == 0.0  # no extra SWA phase: the grid's choice is the held-out one
    assert run["heldout_calibration"].scale == run["guide"].scale
    rows = compare(data, None, config=tiny(methods=("swag", "calibrated_swag"),
                                           calibration="validation", swa_c_grid=(0.03, 0.3),
                                           swa_scale_grid=(0.5, 2.0)), quiet=True)["methods"]
    assert rows["calibrated_swag"]["scale"] == run["guide"].scale
    assert rows["calibrated_swag"]["test_ll"] == rows["swag"]["test_ll"]  # the same guide
