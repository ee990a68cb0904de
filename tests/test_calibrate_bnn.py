"""Tests of the BNN-vs-NUTS calibration benchmark's helpers (benchmarks/calibration_bnn.py)."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import calibration_bnn as bench  # noqa: E402

from pyro_swag import SWAGCollector  # noqa: E402
from pyro_swag.compare import make_model  # noqa: E402
from pyro_swag.data import load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data():
    full = load_dataset("diabetes", 0)
    return replace(full, x_train=full.x_train[:40], y_train=full.y_train[:40],
                   x_test=full.x_test[:15], y_test=full.y_test[:15])


def test_pack_inverts_the_collectors_unpacking(data):
    # _pack(constrained site values) must give back the flat unconstrained vector: the
    # precision site is positive (log transform), the weights are unconstrained.
    model = make_model(data)
    collector = SWAGCollector(model, init_loc_fn=model.init_loc_fn())
    collector(data.x_train, data.y_train, num_data=40)
    with torch.no_grad():
        collector.loc.add_(0.1 * torch.randn_like(collector.loc))
        values = collector(data.x_train, data.y_train, num_data=40)
    assert values["precision"] > 0
    torch.testing.assert_close(bench._pack(collector, values), collector.loc.detach())


def test_score_is_the_mixture_log_density_in_original_units(data):
    model = make_model(data)
    collector = SWAGCollector(model, init_loc_fn=model.init_loc_fn())
    draws = []
    for _ in range(3):
        collector(data.x_train, data.y_train, num_data=40)
        with torch.no_grad():
            collector.loc.add_(0.05 * torch.randn_like(collector.loc))
            values = collector(data.x_train, data.y_train, num_data=40)
            draws.append({k: v.detach().clone() for k, v in values.items()})
    samples = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    ev = bench.score(model, data, samples)
    # direct: log (1/S) sum_s N(y | f_s(x), 1/sqrt(tau_s)) per point, minus log y_std
    dens = []
    for d in draws:
        h = torch.tanh(data.x_test @ d["layers.0.weight"].T + d["layers.0.bias"])
        f = (h @ d["layers.1.weight"].T + d["layers.1.bias"]).squeeze(-1)
        sd = d["precision"].rsqrt()
        dens.append(torch.distributions.Normal(f, sd).log_prob(data.y_test))
    lpd = torch.stack(dens).logsumexp(0) - math.log(3)
    assert ev["ll"] == pytest.approx(float(lpd.mean()) - math.log(data.y_std), abs=1e-4)
    assert 0.0 <= ev["cov90"] <= 1.0


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ValueError, match="recipe='fast' is not one of"):
        bench.recipe_config("fast")


def test_table_without_nuts_reference_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CACHE", tmp_path / "nuts.json")
    args = argparse.Namespace(split=0, recipes=["main"], seeds=1)
    with pytest.raises(RuntimeError, match="--nuts-only --datasets diabetes"):
        bench.dataset_table("diabetes", args, {}, {})


def test_splits_counts_a_case_only_when_both_conditions_hold():
    import calibration_bnn_splits as splits

    ref = -5.5
    assert splits.meets({"ll": -5.54, "cov90": 0.90}, ref)
    assert not splits.meets({"ll": -5.56, "cov90": 0.90}, ref)  # LL 0.06 below NUTS
    assert not splits.meets({"ll": -5.50, "cov90": 0.94}, ref)  # coverage outside the band
    assert not splits.meets({"ll": -5.50, "cov90": 0.86}, ref)


def test_splits_without_nuts_reference_says_how_to_make_it(monkeypatch):
    import calibration_bnn_splits as splits

    monkeypatch.setattr(splits, "load_cache", dict)
    monkeypatch.setattr(sys, "argv", ["calibration_bnn_splits.py", "--splits", "7"])
    with pytest.raises(SystemExit, match="--nuts-only --datasets diabetes:7 --chains 0 1"):
        splits.main()
