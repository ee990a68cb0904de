"""Importance-corrected posterior summaries of a guide against the exact conjugate posterior."""

import math
import warnings

import pandas as pd
import pytest
import torch
from test_calibrate import data, gaussian_guide, model, posterior

from pyro_swag.datatree import summary, to_datatree


def export(guide, x, y, draws):
    return to_datatree(guide, (x, y), model=model, num_draws=draws)


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_corrected_summary_recovers_the_exact_posterior(shift):
    x, y = data()
    mean, cov = posterior(x, y)
    sd = cov.diagonal().sqrt()
    # a guide twice as wide as the posterior, its mean shifted by `shift` posterior sds
    guide = gaussian_guide(x, y, mean + shift * sd, cov)
    guide.scale = 2.0
    torch.manual_seed(0)
    dt = export(guide, x, y, 4000)
    raw = summary(dt, corrected=False)
    fixed = summary(dt)
    assert list(fixed.index) == ["w[0]", "w[1]", "w[2]"] == list(raw.index)
    assert fixed.attrs["khat"] < 0.7
    se = sd.numpy() / math.sqrt(fixed.attrs["ess"])  # Monte Carlo error of a weighted mean
    assert abs(raw["sd"].to_numpy() / sd.numpy() - math.sqrt(2)).max() < 0.1  # the guide's
    assert abs(fixed["sd"].to_numpy() / sd.numpy() - 1).max() < 0.1  # the posterior's
    assert abs(fixed["mean"].to_numpy() - mean.numpy()).max() < 5 * se.max()
    # the 90 % interval of the exact Gaussian: mean ± 1.645 sd
    half = (fixed["eti90_ub"] - fixed["eti90_lb"]).to_numpy() / 2
    assert abs(half / (1.645 * sd.numpy()) - 1).max() < 0.12


def test_summary_warns_when_the_guide_is_a_poor_proposal():
    x, y = data()
    mean, cov = posterior(x, y)
    guide = gaussian_guide(x, y, mean, cov)
    guide.scale = 0.05  # far too narrow: p/q has a heavy tail
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="k-hat .* corrected summary"):
        table = summary(export(guide, x, y, 400))
    assert isinstance(table, pd.DataFrame) and table.attrs["khat"] > 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain summary does not weight, nor warn
        plain = summary(export(guide, x, y, 400), corrected=False, var_names="w", ci_prob=0.8)
    assert {"mean", "sd", "eti80_lb", "ess_bulk"} <= set(plain.columns)
    with pytest.raises(KeyError, match=r"var_names \['nope'\] are not in the posterior; it has"):
        summary(export(guide, x, y, 400), var_names=["w", "nope"])


def test_summary_of_a_far_too_wide_guide_is_finite_and_warns():
    # at 300x the posterior's width log p - log q spans thousands of nats: the Pareto fit
    # breaks down, which must read as k-hat = inf (a warning), not as NaN numbers
    x, y = data()
    mean, cov = posterior(x, y)
    guide = gaussian_guide(x, y, mean, cov)
    guide.scale = 300.0**2
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="k-hat"):
        table = summary(export(guide, x, y, 200))
    assert table.attrs["khat"] == math.inf and table.attrs["ess"] < 1.5
    assert table.notna().all().all()
