"""``pyro-swag compare``'s refusals that need no fitting: they come before any method runs."""

import pytest

from pyro_swag.cli import _config, _parser, main
from pyro_swag.compare import CompareConfig, compare


def test_an_unwritable_out_dir_is_refused_before_fitting(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        compare("diabetes", afile)
    with pytest.raises(ValueError, match="cannot be written"):
        compare("diabetes", afile / "sub")
    assert main(["compare", "--out", str(afile), "--quiet"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_repeated_methods_and_a_stray_data_dir_are_refused(capsys):
    with pytest.raises(ValueError, match="names a method twice"):
        CompareConfig(methods=("map", "map"))
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--data-dir", "/tmp", "--quiet"])
    assert exc.value.code == 2
    assert "--data-dir: only used with --uci" in capsys.readouterr().err
    assert main(["compare", "--dataset", "yacht", "--data-dir", "/nonexistent", "--quiet"]) == 2
    assert "--data-dir: only used" not in capsys.readouterr().err  # a UCI name: it is used


def test_rmse_checkpoints_on_categorical_data_and_bad_network_widths_are_refused():
    from pyro_swag.compare import quick_config
    from pyro_swag.models import BayesianMLP

    config = quick_config(pretrain_checkpoints=("ll", "rmse"), methods=("swag",))
    with pytest.raises(ValueError, match="'rmse' needs a mean to score"):
        compare("digits", None, config=config, quiet=True)
    for kwargs, match in (({"hidden": (0,)}, "hidden must be a tuple of layer widths"),
                          ({"hidden": 50}, "hidden must be a tuple"),
                          ({"hidden": (True,)}, "hidden must be a tuple"),
                          ({"in_features": 0}, "in_features must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            BayesianMLP(**{"in_features": 3, **kwargs})
    assert len(BayesianMLP(3, hidden=()).layers) == 1  # a Bayesian linear model
    with pytest.raises(ValueError, match="likelihood='gausian' is not one of"):
        BayesianMLP(3, likelihood="gausian")


def test_calibration_and_nuts_flags_reach_the_config(capsys):
    assert _config(_parser().parse_args(["compare"])).calibration == "elbo"
    args = _parser().parse_args(["compare", "--calibration", "psis", "--quick"])
    assert _config(args).calibration == "psis"
    args = _parser().parse_args(["compare", "--nuts-warmup", "300", "--nuts-samples", "400"])
    assert (_config(args).nuts_warmup, _config(args).nuts_samples) == (300, 400)
    args = _parser().parse_args(["compare", "--nuts-depth", "8"])
    assert _config(args).nuts_max_tree_depth == 8
    with pytest.raises(ValueError, match="nuts_samples must be an int >= 1"):
        _config(_parser().parse_args(["compare", "--nuts-samples", "0"]))
    args = _parser().parse_args(["compare", "--swa-c", "0.3", "0.03", "0.1"])
    assert _config(args).swa_c_grid == (0.03, 0.1, 0.3)
    one = _config(_parser().parse_args(["compare", "--swa-c", "0.05"]))
    assert (one.swa_c, one.swa_c_grid) == (0.05, None)
    with pytest.raises(ValueError, match="swa_c_grid must be None or a non-empty tuple of pos"):
        _config(_parser().parse_args(["compare", "--swa-c", "0.1", "-1"]))
    with pytest.raises(SystemExit):
        _parser().parse_args(["compare", "--calibration", "laplace"])
    assert "invalid choice: 'laplace'" in capsys.readouterr().err


def test_recipes_are_the_benchmark_settings_and_the_cli_keeps_them():
    from pyro_swag.data import load_dataset
    from pyro_swag.recipes import LARGE_N, SCALE_GRID, recipe_config

    data = load_dataset("diabetes")  # 353 training points: a small set
    e = recipe_config("e", data)
    assert e.swa_scale_grid == SCALE_GRID and e.pretrain_select == "swag"
    assert e.pretrain_batch_grid == (128, 353) and e.pretrain_checkpoints == ("ll", "rmse")
    assert e.pretrain_steps == 10000 and e.patience == 30 and not e.heteroscedastic
    c_large = recipe_config("c", data, large=True)
    assert (c_large.pretrain_steps, c_large.patience, c_large.pretrain_batch_size) == (
        40000, None, 512) and c_large.swa_c_grid == (0.01, 0.03, 0.1, 0.3)
    assert recipe_config("b", data, large=True).pretrain_steps == 20000  # b: not longer
    assert recipe_config("a", data).nuts_samples == 250 and LARGE_N > 1439  # wine: small
    assert recipe_config("e", load_dataset("digits")).pretrain_checkpoints == ("ll",)
    assert recipe_config("e", data, seed=3, methods=("swag",)).seed == 3
    with pytest.raises(ValueError, match="recipe='h' is not one of"):
        recipe_config("h", data)
    with pytest.raises(TypeError, match="data must be a pyro_swag.data.Dataset"):
        recipe_config("e", "diabetes")
    g = _config(_parser().parse_args(["compare", "--recipe", "g", "--svi-steps", "5"]), data)
    assert g.heteroscedastic and g.pretrain_beta == 0.5 and g.svi_steps == 5  # CLI overrides
    assert g.swa_scale_grid == SCALE_GRID  # the rest is the recipe's


def test_recipe_with_quick_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--recipe", "e", "--quick"])
    assert exc.value.code == 2 and "not with --recipe" in capsys.readouterr().err
