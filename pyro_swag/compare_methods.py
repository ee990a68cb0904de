"""The methods of :func:`pyro_swag.compare.compare`, one small function each.

Each returns a :class:`MethodResult` holding posterior draws ``{site: (S, ...)}`` of the
model's latent sites (constrained), plus the guide or MCMC object it came from. SGD/MAP, SWA,
SWAG and SWAG-Diag share one training trajectory (Adam pre-training to the MAP, then SGD with
momentum at the per-datum learning rate ``swa_c / tau_hat``, see ``docs/compare.md``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.infer import MCMC, SVI
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from tqdm.auto import tqdm

from .compare_swag import SWAPhaseError, _batches, _elbo, _init_fn, train_swag
from .datatree import RecordingNUTS
from .moments import unmoved, unmoved_quietly
from .multiswag import MultiSWAG

__all__ = ["METHODS", "MethodResult", "run_method", "guide_draws"]

#: Method names, in report order.
METHODS = (
    "map", "swa", "swag", "swag_diag", "multiswag", "calibrated_swag",
    "svi_normal", "svi_lowrank", "nuts",
)
LABELS = {
    "map": "SGD/MAP", "swa": "SWA", "swag": "SWAG", "swag_diag": "SWAG-Diag",
    "multiswag": "MultiSWAG", "calibrated_swag": "calibrated SWAG",
    "svi_normal": "SVI AutoNormal", "svi_lowrank": "SVI AutoLowRankMVN", "nuts": "NUTS",
}


@dataclass
class MethodResult:
    """One method's posterior draws and bookkeeping."""

    name: str
    status: str = "ok"  # "ok", "skipped" or "failed"
    note: str = ""
    draws: dict[str, torch.Tensor] | None = None
    guide: Any = None
    mcmc: Any = None
    wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def guide_draws(guide, data, num_samples: int) -> dict[str, torch.Tensor]:
    """``num_samples`` draws of every latent site from an autoguide (constrained values)."""
    args, kw = (data.x_train, data.y_train), {"num_data": data.x_train.shape[0]}
    samples = [guide(*args, **kw) for _ in range(num_samples)]
    return {k: torch.stack([s[k].detach() for s in samples]) for k in samples[0]}


def _swag_run(ctx, need_swa: bool = True) -> dict:
    """The shared trajectory, trained once; then the RNG is reseeded, so that a method's
    draws do not depend on which method happened to train it. A failed SWA phase is kept
    (and raised again) rather than retrained; ``need_swa=False`` (MAP, NUTS) takes only
    the pre-training's MAP from it."""
    if "swag_run" not in ctx.state:
        try:
            cfg = ctx.config
            heldout = cfg.calibration == "validation" and "calibrated_swag" in cfg.methods
            ctx.state["swag_run"] = train_swag(
                ctx.model, ctx.data, cfg, cfg.seed, ctx.quiet, heldout_scale=heldout
            )
        except SWAPhaseError as err:
            ctx.state["swag_run"] = {**err.pretrained, "swa_error": err}
    run = ctx.state["swag_run"]
    if need_swa and "swa_error" in run:
        raise run["swa_error"]
    pyro.set_rng_seed(ctx.config.seed)
    return run


def _info(run: dict) -> dict:
    keys = ("tau_hat", "swa_lr", "swa_lr_uncapped", "curvature", "swa_retries", "snapshots")
    info = {k: run[k] for k in keys if run[k] is not None}
    if run.get("swa_c_selection"):  # the choices made on the pre-training hold-out
        info.update(swa_c=run["swa_c"], heldout_ll=run["heldout_ll"],
                    pretrain_batch=run["pretrain_batch"],
                    pretrain_checkpoint=run["pretrain_checkpoint"])
    return info


def _choices(run: dict, guide) -> str:
    """The report's note on what the held-out part chose (empty when nothing was)."""
    if not run.get("swa_c_selection"):
        return ""
    parts = [f"swa_c={run['swa_c']:g}"]
    if run.get("pretrain_selection"):
        parts.append(f"pre-training batch {run['pretrain_batch']} ({run['pretrain_checkpoint']} "
                     "checkpoint)")
    if guide.calibration is not None:
        grid = guide.calibration["scales"]
        end = guide.scale in (grid[0], grid[-1]) and len(grid) > 1
        parts.append(f"scale={guide.scale:.3g}" + (" (an end of swa_scale_grid: the "
                                                    "held-out curve may go on rising)"
                                                    if end else ""))
    return (f"chosen on the pre-training hold-out: {', '.join(parts)} (held-out log-likelihood "
            f"{run['heldout_ll']:.3f} per point, in the model's units)")


def _map(ctx) -> MethodResult:
    run = _swag_run(ctx, need_swa=False)
    draws = {k: v.unsqueeze(0) for k, v in run["map"].items()}
    return MethodResult("map", draws=draws, wall_s=run["pretrain_s"],
                        note="Adam pre-training end point (one draw)")


def _swa(ctx) -> MethodResult:
    run = _swag_run(ctx)
    draws = {k: v.detach().unsqueeze(0) for k, v in run["guide"].median().items()}
    return MethodResult("swa", draws=draws, wall_s=run["pretrain_s"] + run["swa_s"],
                        note="SWAG mean (one draw)", extra=_info(run))


def _swag_like(ctx, name: str, diagonal: bool) -> MethodResult:
    run = _swag_run(ctx)
    start = time.perf_counter()
    # SWAG is the run's own guide (at the scale chosen on held-out data, if one was)
    guide = _frozen(run["collector"], diagonal=True) if diagonal else run["guide"]
    draws = guide_draws(guide, ctx.data, ctx.config.num_samples)
    wall = run["pretrain_s"] + run["swa_s"] + time.perf_counter() - start
    note = _unmoved_note(guide, "" if diagonal else _choices(run, guide))
    return MethodResult(name, draws=draws, guide=guide, wall_s=wall, extra=_info(run),
                        note=note)


def _frozen(collector, diagonal: bool = False):
    """``collector.swag_guide()`` without the unmoved-coordinates warning (a note says it)."""
    with unmoved_quietly():
        return collector.swag_guide(diagonal=diagonal)


def _unmoved_note(guide, note: str) -> str:
    """``note``, with the count of coordinates the SWA phase did not move, if any."""
    still = int(unmoved(guide.loc, guide.variance).sum())
    if not still:  # see docs/swag.md, "Directions SGD never moves"
        return note
    text = (f"{still} of {guide.loc.numel()} coordinates did not move in the SWA phase (no "
            "gradient noise there, e.g. weights of a constant input: SWAG gives them no "
            "spread; docs/swag.md)")
    return f"{note}; {text}" if note else text


def _multiswag(ctx) -> MethodResult:
    cfg = ctx.config
    run = _swag_run(ctx)
    guides = [run["guide"]]
    start = time.perf_counter()
    for k in range(1, cfg.multiswag_runs):
        model_k = ctx.model_factory(cfg.seed + k)
        guides.append(train_swag(model_k, ctx.data, cfg, cfg.seed + k, ctx.quiet,
                                 desc=f"multiswag {k + 1}/{cfg.multiswag_runs}")["guide"])
    pyro.set_rng_seed(cfg.seed)
    guide = MultiSWAG(guides, model=ctx.model)
    draws = guide_draws(guide, ctx.data, cfg.num_samples)
    wall = run["pretrain_s"] + run["swa_s"] + time.perf_counter() - start
    return MethodResult("multiswag", draws=draws, guide=guide, wall_s=wall,
                        note=f"mixture of {len(guides)} independent SWAG runs")


def _calibrated(ctx) -> MethodResult:
    from .calibrate import calibrate

    data, cfg = ctx.data, ctx.config
    run = _swag_run(ctx)
    start = time.perf_counter()
    guide = _frozen(run["collector"])
    if cfg.calibration == "validation":  # chosen on the pre-training hold-out
        result = run.get("heldout_calibration")
        if result is None:
            raise ValueError(
                f"calibration='validation' needs held-out data, but pretrain_val_fraction="
                f"{cfg.pretrain_val_fraction} with {data.x_train.shape[0]} training points "
                "holds none out; set pretrain_val_fraction > 0 (at least 20 training points) "
                "or use calibration='elbo'"
            )
        guide.scale, guide.calibration = result.scale, result.to_dict()
        how = "validation on the pre-training hold-out"
    else:
        result = calibrate(ctx.model, guide, data.x_train, data.y_train,
                           method=cfg.calibration, num_samples=cfg.num_samples)
        how = f"{cfg.calibration} on the training data"
    draws = guide_draws(guide, data, cfg.num_samples)
    wall = (run["pretrain_s"] + run["swa_s"] + run.get("heldout_s", 0.0)
            + time.perf_counter() - start)
    return MethodResult("calibrated_swag", draws=draws, guide=guide, wall_s=wall,
                        note=_unmoved_note(guide, f"scale={result.scale:.3g} chosen by {how}"),
                        extra={"scale": float(result.scale)})


def _svi(ctx, name: str, guide_cls) -> MethodResult:
    cfg, data = ctx.config, ctx.data
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    batch = min(cfg.pretrain_batch_size, n)
    guide = guide_cls(ctx.model, init_loc_fn=_init_fn(ctx.model), init_scale=0.01)
    optim = pyro.optim.ClippedAdam(
        {"lr": cfg.svi_lr, "clip_norm": 10.0, "lrd": 0.1 ** (1 / cfg.svi_steps)}
    )
    svi = SVI(pyro.poutine.scale(ctx.model, scale=1.0 / n),
              pyro.poutine.scale(guide, scale=1.0 / n), optim, _elbo(cfg))
    start = time.perf_counter()
    it = _batches(n, batch)
    for _ in tqdm(range(cfg.svi_steps), desc=name, disable=ctx.quiet, leave=False):
        idx = next(it)
        loss = svi.step(x[idx], y[idx], num_data=n)
        if not math.isfinite(loss):
            raise RuntimeError(f"{name}: the ELBO became {loss}; lower svi_lr")
    draws = guide_draws(guide, data, cfg.num_samples)
    return MethodResult(name, draws=draws, guide=guide, wall_s=time.perf_counter() - start)


class _OverBudget(Exception):
    pass


def _nuts(ctx) -> MethodResult:
    cfg, data = ctx.config, ctx.data
    run = _swag_run(ctx, need_swa=False)
    start = time.perf_counter()

    def hook(kernel, samples, stage, i):
        if time.perf_counter() - start > cfg.nuts_budget_s:
            raise _OverBudget(f"{stage} iteration {i}")

    kernel = RecordingNUTS(ctx.model, max_tree_depth=cfg.nuts_max_tree_depth,
                  init_strategy=init_to_value(values=run["map"]))
    mcmc = MCMC(kernel, num_samples=cfg.nuts_samples, warmup_steps=cfg.nuts_warmup,
                hook_fn=hook, disable_progbar=ctx.quiet)
    try:
        mcmc.run(data.x_train, data.y_train)
    except _OverBudget as err:
        return MethodResult("nuts", status="skipped", wall_s=time.perf_counter() - start,
                            note=f"over the time budget of {cfg.nuts_budget_s:g} s at {err}")
    draws = {k: v.detach() for k, v in mcmc.get_samples().items()}
    return MethodResult("nuts", draws=draws, mcmc=mcmc, wall_s=time.perf_counter() - start,
                        note=f"{cfg.nuts_warmup} warm-up + {cfg.nuts_samples} draws from the MAP")


@dataclass
class _Context:
    model: Any
    model_factory: Any
    data: Any
    config: Any
    quiet: bool
    state: dict


_RUNNERS = {
    "map": _map,
    "swa": _swa,
    "swag": lambda ctx: _swag_like(ctx, "swag", False),
    "swag_diag": lambda ctx: _swag_like(ctx, "swag_diag", True),
    "multiswag": _multiswag,
    "calibrated_swag": _calibrated,
    "svi_normal": lambda ctx: _svi(ctx, "svi_normal", AutoNormal),
    "svi_lowrank": lambda ctx: _svi(ctx, "svi_lowrank", AutoLowRankMultivariateNormal),
    "nuts": _nuts,
}


def run_method(name, model, model_factory, data, config, state: dict, quiet=False):
    """Run method ``name``; ``state`` carries the shared SWAG trajectory between methods."""
    ctx = _Context(model, model_factory, data, config, quiet, state)
    return _RUNNERS[name](ctx)
