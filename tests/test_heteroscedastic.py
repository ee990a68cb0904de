"""The heteroscedastic Gaussian network: likelihood oracle, tau_hat, errors, end to end."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_swag.cli import main
from pyro_swag.compare import compare, make_model, quick_config
from pyro_swag.compare_swag import _precision
from pyro_swag.data import Dataset, load_dataset
from pyro_swag.models import MIN_SD, BayesianMLP


def _noisy_line(n: int, seed: int) -> Dataset:
    """y = x + (0.05 + 0.6 |x|) eps: the noise sd grows twelve-fold from x = 0 to |x| = 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-2, 2, n).unsqueeze(-1)
    y = x[:, 0] + (0.05 + 0.6 * x[:, 0].abs()) * torch.randn(n, generator=g)
    return Dataset("line", "gaussian", x, y, x[::4], y[::4], 0.0, 1.0, 1, 0)


def test_likelihood_is_the_normal_of_the_two_outputs():
    torch.manual_seed(0)
    model = BayesianMLP(3, 1, (8,), noise="heteroscedastic")
    x, y = torch.randn(20, 3), torch.randn(20)
    trace = poutine.trace(model).get_trace(x, y)
    assert "precision" not in trace.nodes  # the noise is the network's, no latent site
    out = trace.nodes["_RETURN"]["value"]
    assert out.shape == (20, 2)
    sd = torch.nn.functional.softplus(out[:, 1]) + MIN_SD
    expected = torch.distributions.Normal(out[:, 0], sd).log_prob(y)
    fn = trace.nodes["obs"]["fn"]
    torch.testing.assert_close(fn.log_prob(y), expected)
    assert fn.scale.std() > 0  # the sd varies over the inputs


def test_tau_hat_is_the_mean_inverse_noise_variance():
    torch.manual_seed(1)
    data = _noisy_line(40, 0)
    model = make_model(data, (8,), seed=0, heteroscedastic=True)
    values = {k: v["value"] for k, v in poutine.trace(model).get_trace(data.x_train).nodes.items()
              if v["type"] == "sample" and not v["is_observed"]}
    cond = poutine.trace(poutine.condition(model, data=values)).get_trace(data.x_train,
                                                                          data.y_train)
    out = cond.nodes["_RETURN"]["value"]
    sd = torch.nn.functional.softplus(out[:, 1]) + MIN_SD
    tau = _precision(model, values, data.x_train, data.y_train)
    assert tau == pytest.approx(float((1 / sd**2).mean()), rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(likelihood="bernoulli"), "needs likelihood='gaussian'"),
    (dict(out_features=2), "out_features=1"),
    (dict(noise="hetero"), "noise='hetero' is not a number, None or 'heteroscedastic'"),
])
def test_bad_heteroscedastic_models_name_the_argument(kwargs, match):
    kwargs = {"noise": "heteroscedastic", **kwargs}
    with pytest.raises(ValueError, match=match):
        BayesianMLP(2, **kwargs)


def test_classification_data_refuses_a_heteroscedastic_network(tmp_path, capsys):
    data = load_dataset("breast_cancer")
    with pytest.raises(ValueError, match="heteroscedastic=True needs a regression dataset"):
        make_model(data, heteroscedastic=True)
    code = main(["compare", "--dataset", "breast_cancer", "--heteroscedastic", "--quick",
                 "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "drop heteroscedastic" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_swag_learns_the_noise_that_grows_with_x():
    data = _noisy_line(400, 2)
    cfg = quick_config(pretrain_steps=600, methods=("map", "swag"), heteroscedastic=True,
                       num_samples=30, swa_snapshots=10, pretrain_val_fraction=0.0)
    pyro.set_rng_seed(0)
    summary = compare(data, None, config=cfg, quiet=True)
    for name in ("map", "swag"):
        row = summary["methods"][name]
        assert row["status"] == "ok" and math.isfinite(row["test_ll"]), row
    homo = compare(data, None, config=quick_config(pretrain_steps=600, methods=("swag",),
                                                   num_samples=30, swa_snapshots=10,
                                                   pretrain_val_fraction=0.0), quiet=True)
    # the true noise is far from constant, so the per-input sd must win on test data
    assert summary["methods"]["swag"]["test_ll"] > homo["methods"]["swag"]["test_ll"] + 0.1
    model = make_model(data, cfg.hidden, cfg.seed, heteroscedastic=True)
    assert model.layers[-1].out_features == 2


def test_example_smoke():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "heteroscedastic.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    lines = out.splitlines()
    assert lines[0].strip().startswith("one precision: test LL")
    het = [float(c.split(": ")[1].split()[0]) for c in lines[3].split("noise sd ")[1].split(", ")]
    assert het[-1] > 2 * het[0]  # the learned noise grows with |x|, as the true one does
    rmse = {line.split(":")[0].strip(): float(line.split("RMSE ")[1].split(",")[0])
            for line in lines[5:7]}
    assert set(rmse) == {"plain NLL", "beta-NLL 0.5"}
    assert rmse["beta-NLL 0.5"] < rmse["plain NLL"]  # beta-NLL keeps the large-y points fitted
