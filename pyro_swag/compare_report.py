"""Scoring, ``report.md``, PNG plots and per-method netCDF files of :func:`pyro_swag.compare`."""

from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import pyro
import torch

from .compare_methods import LABELS, METHODS
from .compare_metrics import agreement, pointwise, scores

__all__ = ["summarise", "write_outputs"]


def _tree_and_loo(model, data, res, num_draws: int, seed: int):
    r"""The method's DataTree (training data) and its corrected PSIS-LOO summary.

    The DataTree holds the model's (standardised) data; for regression the elpd is moved to
    original units like the test LL: :math:`\mathrm{elpd} - N \log s_y`.
    """
    from .datatree import loo, to_datatree

    source = res.mcmc if res.mcmc is not None else res.guide
    if source is None:  # point estimates: posterior group only, no LOO
        return _point_tree(res), {}
    args, kwargs = (data.x_train,), {"y": data.y_train}
    chains = getattr(source, "num_runs", None) or 1
    draws = max(1, num_draws // chains) if res.mcmc is None else None
    pyro.set_rng_seed(seed)  # the same draws whichever methods ran before
    try:
        dt = to_datatree(source, args, kwargs, model=model, num_chains=chains, num_draws=draws)
    except (ValueError, RuntimeError, TypeError) as err:
        return None, {"loo_note": f"DataTree failed: {type(err).__name__}: {err}"}
    try:
        with warnings.catch_warnings():  # a high or undefined k-hat is reported in the table
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            elpd = loo(dt)
    except (ValueError, RuntimeError, TypeError) as err:
        return dt, {"loo_note": f"LOO failed: {type(err).__name__}: {err}"}
    value, k_max = float(elpd.elpd), float(elpd.pareto_k.max())
    if not math.isfinite(value):
        return dt, {"loo_note": f"LOO failed: the elpd is {value} (max Pareto k̂ {k_max:.3g})"}
    if data.likelihood == "gaussian":
        value -= data.x_train.shape[0] * math.log(data.y_std)
    return dt, {"loo_elpd": value, "loo_se": float(elpd.se), "loo_max_k": k_max}


def _point_tree(res):
    import xarray as xr

    posterior = {}
    for site, v in res.draws.items():
        arr = v.detach().cpu().numpy()[None]
        dims = ["chain", "draw"] + [f"{site}_dim_{i}" for i in range(arr.ndim - 2)]
        posterior[site] = (dims, arr)
    return xr.DataTree.from_dict({"posterior": xr.Dataset(posterior)})


def summarise(model, data, results: dict, config) -> tuple[dict, dict]:
    """Score every method on the test split; returns ``(summary, evals)``.

    ``summary`` is JSON-ready; ``evals`` keeps tensors (predictive means/sds/probabilities)
    for the plots.
    """
    x, y = data.x_test, data.y_test
    evals, methods = {}, {}
    for name, res in results.items():
        row = {"label": LABELS.get(name, name), "status": res.status, "note": res.note,
               "wall_s": res.wall_s, **{k: v for k, v in res.extra.items()
                                        if isinstance(v, (int, float, str))}}
        if res.status == "ok":
            sc = scores(pointwise(model, res.draws, x, y, data.likelihood), data, y)
            evals[name] = sc
            row.update({k: v for k, v in sc.items() if not k.startswith("_")})
            tree, loo_row = _tree_and_loo(model, data, res, config.num_samples, config.seed)
            sc["_tree"] = tree
            row.update(loo_row)
            if res.mcmc is not None and tree is not None:
                from .datatree import mcmc_health

                row["mcmc_health"] = mcmc_health(tree)
        methods[name] = row
    ref = results.get("nuts")
    if ref is not None and ref.status == "ok":
        for name, res in results.items():
            if name != "nuts" and name in evals:
                methods[name]["vs_nuts"] = agreement(
                    evals[name], evals["nuts"], res.draws, ref.draws, data
                )
    summary = {
        "dataset": {
            "name": data.name, "split": data.split, "likelihood": data.likelihood,
            "num_train": int(data.x_train.shape[0]), "num_test": int(x.shape[0]),
            "in_features": data.in_features, "y_mean": data.y_mean, "y_std": data.y_std,
        },
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "methods": methods,
    }
    return summary, evals


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(summary: dict) -> str:
    reg = summary["dataset"]["likelihood"] == "gaussian"
    cols = [("test LL", "test_ll"), ("RMSE" if reg else "accuracy", "rmse" if reg else "accuracy")]
    if not reg:
        cols.append(("ECE", "ece"))
    cols += [("cov 90%", "coverage_90"), ("cov 95%", "coverage_95"), ("LOO elpd", "loo_elpd"),
             ("± se", "loo_se"), ("max k̂", "loo_max_k"), ("wall s", "wall_s")]
    lines = ["| method | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for row in summary["methods"].values():
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['status']}: {row['note']} |"
                         + " |" * (len(cols) - 1))
            continue
        digits = {"wall_s": 1, "loo_elpd": 1, "loo_se": 1, "loo_max_k": 2}
        cells = [_fmt(row.get(k), digits.get(k, 3)) for _, k in cols]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _agreement_table(summary: dict) -> str:
    rows = [(r["label"], r["vs_nuts"]) for r in summary["methods"].values() if "vs_nuts" in r]
    if not rows:
        return ""
    keys = list(rows[0][1])
    head = "| method | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys)
    body = "\n".join(f"| {lab} | " + " | ".join(_fmt(a[k]) for k in keys) + " |"
                     for lab, a in rows)
    return head + "\n" + body


_THRESHOLDS = {"divergences": (0, "divergences > 0"), "max_rhat": (1.01, "R̂ > 1.01"),
               "min_ess_bulk": (100, "bulk ESS < 100"), "min_ess_tail": (100, "tail ESS < 100"),
               "min_bfmi": (0.3, "E-BFMI < 0.3")}


def _health(h: dict) -> str:
    """One line on the MCMC reference's health, with the usual thresholds it misses."""
    text = (f"{h['draws']} draws, {h.get('divergences', '?')} divergent; max split R̂ "
            f"{_fmt(h['max_rhat'])}, smallest ESS bulk {_fmt(h['min_ess_bulk'], 0)} / tail "
            f"{_fmt(h['min_ess_tail'], 0)}; ESS of the log joint {_fmt(h.get('ess_log_p'), 0)}"
            + (f", E-BFMI {_fmt(h['min_bfmi'], 2)}" if "min_bfmi" in h else ""))
    missed = [msg for key, (limit, msg) in _THRESHOLDS.items() if key in h and (
        h[key] > limit if key in ("divergences", "max_rhat") else h[key] < limit)]
    return text + (f" (short of the usual thresholds: {', '.join(missed)}; the agreement "
                   "below is with an imperfect reference)" if missed else "")


def markdown(summary: dict) -> str:
    """The ``report.md`` text."""
    ds = summary["dataset"]
    units = " (original units)" if ds["likelihood"] == "gaussian" else ""
    parts = [
        f"# pyro-swag compare: {ds['name']} (split {ds['split']})",
        "",
        f"{ds['num_train']} training / {ds['num_test']} test points, {ds['in_features']} "
        f"inputs, {ds['likelihood']} likelihood. Test log-likelihood per point{units}; "
        "coverage of central predictive intervals (classification: of the smallest class "
        f"sets) on the test split; corrected PSIS-LOO on the training split (elpd{units} ± "
        "se, largest Pareto k̂; k̂ > 0.7 means unreliable); wall time of fit + draws.",
        "",
        _table(summary),
        "",
    ]
    notes = [f"- {r['label']}: {r['note']}" for r in summary["methods"].values()
             if r.get("note") and r["status"] == "ok"]
    notes += [f"- {r['label']}: {r['loo_note']}" for r in summary["methods"].values()
              if r.get("loo_note")]
    notes += [f"- {r['label']}: {_health(r['mcmc_health'])}" for r in summary["methods"].values()
              if r.get("mcmc_health")]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    agree = _agreement_table(summary)
    if agree:
        parts += [
            "## Agreement with NUTS", "",
            ("`pred_mean_err` / `pred_sd_err`: RMS over test points of the difference of the "
             "predictive mean / sd to NUTS's (original units)" if units else
             "`pred_prob_err`: mean absolute difference of the predictive class "
             "probabilities to NUTS's, over test points and classes")
            + "; `w2_marginal`: mean over latent scalars of the 1-D Wasserstein-2 distance to "
            "NUTS's marginal, in units of NUTS's marginal sd.",
            "", agree, "",
        ]
    else:
        parts += ["NUTS did not run or did not finish; no agreement table.", ""]
    parts += ["Plots: `predictive.png`, `calibration.png`, `forest.png`. Per-method "
              "DataTrees: `<method>.nc`. Numbers: `results.json`.", ""]
    return "\n".join(parts)


def write_outputs(out: Path, model, data, results: dict, summary: dict, evals: dict) -> None:
    """Write report.md, plots and netCDF files into ``out``."""
    from . import compare_plots

    (out / "report.md").write_text(markdown(summary))
    compare_plots.predictive_plot(out / "predictive.png", data, evals, summary)
    compare_plots.calibration_plot(out / "calibration.png", data, evals, results, model, summary)
    compare_plots.forest_plot(out / "forest.png", results, summary)
    for name, ev in evals.items():
        if ev.get("_tree") is not None:
            ev["_tree"].to_netcdf(out / f"{name}.nc", engine="h5netcdf")


OUTPUTS = ("results.json", "report.md", "predictive.png", "calibration.png", "forest.png",
           *(f"{m}.nc" for m in METHODS))


def check_out_dir(out_dir) -> Path:
    """``out_dir`` as a path, refused (``ValueError``) before any fitting when it cannot be
    written: an existing file, or a parent where no directory can be made."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} is a file, not a directory; pass another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)).rmdir()
    except OSError as err:
        raise ValueError(
            f"out_dir={str(out)!r} cannot be written ({err.strerror or err}); pass a directory "
            "you can write to"
        ) from err
    return out


def json_safe(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    value = float(value)  # floats, numpy and 0-d torch scalars
    return value if math.isfinite(value) else None


def save(out: Path, model, data, results: dict, summary: dict, evals: dict) -> None:
    """Write every output into a temporary sibling of ``out``, then move it in,
    ``results.json`` (the completion marker) last; a previous report's files go first."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_outputs(tmp, model, data, results, summary, evals)
        text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
        (tmp / "results.json").write_text(text)
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "results.json"):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(item), str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
