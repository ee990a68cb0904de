"""The SWAG training recipe of :func:`pyro_swag.compare.compare`.

Adam pre-training to the MAP (early-stopped on a held-out part of the training data, with the
batch size optionally chosen there), then the SWA phase of
:func:`pyro_swag.train.fit`: SGD with momentum at the per-datum learning rate
``swa_c / tau_hat`` (``swa_c`` optionally chosen by the held-out SWAG predictive, alone or
jointly with the pre-training run). SGD/MAP, SWA, SWAG and SWAG-Diag of the comparison share
this one trajectory.
"""

from __future__ import annotations

import math
import time
import warnings

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_median
from tqdm.auto import tqdm

from .autoguide import SWAGCollector
from .models import HETEROSCEDASTIC, BetaNLL
from .moments import unmoved_quietly
from .predictive import log_likelihood
from .train import fit

__all__ = ["SWAPhaseError", "train_swag"]


class SWAPhaseError(RuntimeError):
    """The SWA phase failed after pre-training succeeded; ``pretrained`` holds the MAP
    (``map``, ``tau_hat``, ``pretrain_s``), so the methods that need only it can still run."""

    def __init__(self, message: str, pretrained: dict) -> None:
        super().__init__(message)
        self.pretrained = pretrained


def _init_fn(model):
    make = getattr(model, "init_loc_fn", None)
    return make() if callable(make) else init_to_median


def _batches(n: int, batch: int):
    while True:
        perm = torch.randperm(n)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def _elbo(config):
    # The compiled ELBO is ~3x faster on small nets (Pyro's overhead dominates them).
    if config.jit:
        return JitTrace_ELBO(ignore_jit_warnings=True)
    return Trace_ELBO()


def _curvature(model, collector, x, y, batch: int) -> float | None:
    """Largest eigenvalue of the per-datum loss Hessian at the current point (power iteration
    on Hessian-vector products, :func:`pyro_swag.lr.gradient_noise`)."""
    from .lr import gradient_noise

    n = x.shape[0]
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (and so the run) untouched
    perm = torch.randperm(n, generator=gen)
    batches = [(x[perm[i : i + batch]], y[perm[i : i + batch]])
               for i in range(0, min(n, 8 * batch) - batch + 1, batch)]
    with torch.random.fork_rng():  # the power iteration's random start stays out of the run
        stats = gradient_noise(model, collector, batches, num_data=n, max_batches=8,
                               curvature_iters=10)
    lam = stats.max_curvature
    return float(lam) / n if lam and math.isfinite(lam) and lam > 0 else None


def _holdout(n: int, fraction: float, seed: int):
    """Indices of the pre-training part and of the held-out part (None when fraction=0)."""
    if fraction <= 0 or n < 20:
        return torch.arange(n), None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, round(fraction * n))
    return perm[k:].sort().values, perm[:k]


@torch.no_grad()
def _val_scores(model, collector, x, y, val, mse: bool) -> tuple[float, float]:
    """Held-out log-likelihood per point and (with ``mse``) minus the mean squared error of
    the likelihood's mean, at the collector's current point."""
    values = collector(x[:2], y[:2], num_data=x.shape[0])
    cond = pyro.poutine.condition(model, data=values)
    fn = pyro.poutine.trace(cond).get_trace(x[val], y[val]).nodes["obs"]["fn"]
    neg_mse = -float(((fn.mean - y[val]) ** 2).mean()) if mse else -math.inf
    return float(fn.log_prob(y[val]).mean()), neg_mse


def _precision(model, values: dict[str, torch.Tensor], x=None, y=None) -> float:
    """Noise precision ``tau_hat`` at the MAP: the learned one, ``1 / noise**2``, or for a
    heteroscedastic network the mean of ``1 / sigma(x)**2`` over ``x`` (1 for
    classification)."""
    if "precision" in values:
        return float(values["precision"])
    if getattr(model, "noise", None) == HETEROSCEDASTIC and x is not None:
        with torch.no_grad():
            cond = pyro.poutine.condition(model, data=values)
            fn = pyro.poutine.trace(cond).get_trace(x, y).nodes["obs"]["fn"]
            return float(fn.variance.reciprocal().mean())
    noise = getattr(model, "noise", None)
    if isinstance(noise, (int, float)) and getattr(model, "likelihood", "") == "gaussian":
        return 1.0 / float(noise) ** 2
    return 1.0


def train_swag(model, data, config, seed: int, quiet: bool, desc: str = "swag",
               heldout_scale: bool = False) -> dict:
    """Adam pre-training to the MAP, then :func:`pyro_swag.train.fit`'s SWA phase.

    Returns a dict with the collector, the SWAG guide (at the held-out scale, if one was
    chosen: ``guide.calibration``), the MAP values, ``tau_hat``, the SWA learning rate, the
    held-out selections made (``"heldout_ll"``: the winner's score) and the wall times of
    both phases. With ``heldout_scale``,
    ``"heldout_calibration"`` holds a scale chosen on the pre-training hold-out: the SWA
    phase at the chosen rate on the pre-training part, scored by
    :func:`~pyro_swag.calibrate.calibrate_validation` on the held-out part (reused from
    ``config.swa_scale_grid``'s selection when that ran; None without a held-out part);
    its wall time is ``"heldout_s"``, not part of ``"swa_s"``.
    """
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    batch = min(config.batch_size, n)
    train, val = _holdout(n, config.pretrain_val_fraction, seed)
    xt, yt = x[train], y[train]
    start = time.perf_counter()
    held_out = val is not None
    sizes = (config.pretrain_batch_grid if held_out else None) or (
        config.pretrain_batch_size or batch,)
    points, pre_selection = [], {}  # (held-out LL, point, batch size, checkpoint) candidates
    for size in sizes:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        collector = SWAGCollector(model, rank=config.rank, init_loc_fn=_init_fn(model))
        kept = _pretrain(model, collector, x, y, train, val, min(size, n), config, quiet, desc)
        for crit, (ll, loc) in kept.items():
            pre_selection[f"batch={size}" + ("" if crit == "ll" else f",{crit}")] = ll
            points.append((ll, loc, size, crit))
    pretrain_s = time.perf_counter() - start
    start = time.perf_counter()
    grid = config.swa_c_grid if held_out else None
    points.sort(key=lambda p: -p[0])  # best held-out MAP first (the first of equals)
    if not (grid and config.pretrain_select == "swag"):
        points = points[:1]  # pre-training chosen by the MAP's held-out log-likelihood
    best = None
    for ll, loc, size, crit in points:
        map_values, tau, curvature, cap = _at(model, collector, loc, x, y, batch, config)
        c, score, selection, scales = config.swa_c, ll, None, None
        if grid:  # the SWA rate (and pre-training point) chosen on the held-out part
            selection, scales = {}, {}
            for c_try in grid:
                try:
                    g, _, _ = _swa_phase(model, collector, xt, yt, min(c_try / tau, cap), config,
                                         loc, quiet, desc)
                    if config.swa_scale_grid is None:
                        selection[c_try] = _val_predictive(model, g, xt, yt, x[val], y[val],
                                                           config.num_samples)
                    else:  # the scale too, on the same held-out part
                        scales[c_try] = _val_scales(model, g, x[val], y[val], config)
                        selection[c_try] = scales[c_try].best()
                except RuntimeError:  # diverged at every retry: this rate loses
                    selection[c_try] = -math.inf
            c = max(selection, key=selection.get)
            score = selection[c]
        if best is None or score > best["score"]:
            best = {"score": score, "loc": loc, "map": map_values, "tau": tau, "cap": cap,
                    "curvature": curvature, "c": c, "selection": selection,
                    "calibration": (scales or {}).get(c),
                    "pretrain_batch": size, "pretrain_val_ll": ll, "checkpoint": crit}
    tau, heldout, heldout_s = best["tau"], best["calibration"], 0.0
    try:
        if heldout_scale and heldout is None and val is not None:
            heldout_start = time.perf_counter()
            heldout = _heldout_scale(model, collector, x, y, train, val, best, config, quiet,
                                     desc)
            heldout_s = time.perf_counter() - heldout_start
            start += heldout_s  # not part of the SWA phase's time
        guide, lr, retries = _swa_phase(model, collector, x, y,
                                        min(best["c"] / tau, best["cap"]), config,
                                        best["loc"], quiet, desc)
    except RuntimeError as err:
        pretrained = {"map": best["map"], "tau_hat": tau, "pretrain_s": pretrain_s}
        raise SWAPhaseError(str(err), pretrained) from err
    if best["calibration"] is not None:  # the held-out scale, recorded on the guide
        guide.scale = best["calibration"].scale
        guide.calibration = best["calibration"].to_dict()
    return {
        "collector": collector, "guide": guide, "map": best["map"], "tau_hat": tau,
        "swa_lr": lr, "swa_lr_uncapped": best["c"] / tau, "curvature": best["curvature"],
        "swa_retries": retries, "pretrain_s": pretrain_s,
        "swa_s": time.perf_counter() - start, "snapshots": collector.num_snapshots,
        "swa_c": best["c"], "swa_c_selection": best["selection"],
        "pretrain_batch": best["pretrain_batch"], "pretrain_val_ll": best["pretrain_val_ll"],
        "pretrain_checkpoint": best["checkpoint"],
        "pretrain_selection": pre_selection if len(pre_selection) > 1 else None,
        "heldout_calibration": heldout, "heldout_s": heldout_s,
        "heldout_ll": best["score"] if best["selection"] else None,
    }


def _heldout_scale(model, collector, x, y, train, val, best, config, quiet, desc):
    """The SWA phase at ``best``'s rate on the pre-training part, its scale chosen on the
    held-out part. The RNG state is restored afterwards, so that the final SWA phase
    draws the same batches whether or not this ran."""
    from .calibrate import calibrate_validation

    rng = pyro.util.get_rng_state()
    try:
        lr = min(best["c"] / best["tau"], best["cap"])
        g, _, _ = _swa_phase(model, collector, x[train], y[train], lr, config, best["loc"],
                             quiet, desc)
        return calibrate_validation(model, g, x[val], y[val],
                                    num_samples=config.num_samples, apply=False)
    finally:
        pyro.util.set_rng_state(rng)


def _at(model, collector, loc, x, y, batch: int, config) -> tuple:
    """``(MAP values, tau_hat, curvature, rate cap)`` at the pre-training point ``loc``
    (``collector.loc`` is set to it)."""
    with torch.no_grad():
        collector.loc.copy_(loc)
        values = {k: v.detach().clone() for k, v in collector(x, y, num_data=x.shape[0]).items()}
    curvature, cap = None, math.inf
    if config.swa_stability is not None:  # keep SGD inside its stable range
        curvature = _curvature(model, collector, x, y, batch)
        if curvature:
            cap = config.swa_stability * 2 * (1 + 0.9) / curvature
    return values, _precision(model, values, x, y), curvature, cap


def _pretrain(model, collector, x, y, train, val, pre_batch, config, quiet, desc) -> dict:
    """Adam on ``(x, y)[train]`` with early stopping on ``val``.

    Returns ``{criterion: (held-out LL, point)}`` for each of ``config.pretrain_checkpoints``:
    the point best by held-out log-likelihood (``"ll"``) or by held-out squared error
    (``"rmse"``). The collector is left at the first criterion's point. Without ``val``:
    ``-inf`` and the last point.
    """
    xt, yt, nt = x[train], y[train], train.numel()
    steps = config.pretrain_steps
    optim = pyro.optim.ClippedAdam(
        {"lr": config.pretrain_lr, "clip_norm": 10.0,
         "lrd": config.pretrain_lr_decay ** (1 / steps)}
    )
    scaled = pyro.poutine.scale(model, scale=1.0 / nt)
    if config.pretrain_beta is not None:  # the fitting loss only; scores use the model
        scaled = BetaNLL(config.pretrain_beta)(scaled)
    svi = SVI(scaled, pyro.poutine.scale(collector, scale=1.0 / nt), optim, _elbo(config))
    it = _batches(nt, min(pre_batch, nt))
    crits = config.pretrain_checkpoints if val is not None else ("ll",)
    best = {c: (-math.inf, None, -math.inf) for c in crits}  # (score, point, held-out LL)
    stale = 0
    for step in tqdm(range(steps), desc=f"{desc} pre-train", disable=quiet, leave=False):
        idx = next(it)
        loss = svi.step(xt[idx], yt[idx], num_data=nt)
        if not math.isfinite(loss):
            raise RuntimeError(f"{desc}: pre-training loss became {loss}; lower pretrain_lr")
        if val is not None and ((step + 1) % config.eval_every == 0 or step + 1 == steps):
            ll, neg_mse = _val_scores(model, collector, x, y, val, "rmse" in crits)
            improved = False
            for c in crits:
                score = ll if c == "ll" else neg_mse
                if score > best[c][0]:
                    best[c], improved = (score, collector.loc.detach().clone(), ll), True
            stale = 0 if improved else stale + 1
            if config.patience is not None and stale >= config.patience:
                break
    last = collector.loc.detach().clone()
    if val is None or best[crits[0]][1] is None:  # no held-out part (or never finite)
        return {c: (-math.inf, last) for c in crits}
    with torch.no_grad():  # early stopping: the pre-training point best on held-out data
        collector.loc.copy_(best[crits[0]][1])
    return {c: (best[c][2], last if best[c][1] is None else best[c][1]) for c in crits}


@torch.no_grad()
def _val_predictive(model, guide, xt, yt, xv, yv, num_samples: int) -> float:
    """Held-out log predictive density per point of the mixture over ``guide``'s draws
    (drawn one guide call at a time, the random stream the cached benchmark rows used)."""
    draws = [guide(xt[:2], yt[:2], num_data=xt.shape[0]) for _ in range(num_samples)]
    samples = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    loglik = log_likelihood(model, samples, xv, yv)["obs"]
    return float((loglik.logsumexp(0) - math.log(num_samples)).mean())


def _val_scales(model, guide, xv, yv, config):
    """The held-out log-likelihood of ``guide``'s predictive at each scale of
    ``config.swa_scale_grid`` (shared draws): a :class:`~pyro_swag.calibrate.Calibration`
    holding the best; the guide is left unchanged."""
    from .calibrate import calibrate_validation

    with warnings.catch_warnings():  # a choice at the grid's end is said in the report note
        warnings.filterwarnings("ignore", message="the best scale", category=UserWarning)
        return calibrate_validation(model, guide, xv, yv, scales=list(config.swa_scale_grid),
                                    num_samples=config.num_samples, refine=False, apply=False)


def _swa_phase(model, collector, x, y, lr, config, map_loc, quiet, desc):
    """The SWA phase on ``(x, y)`` from ``map_loc`` with fresh moments; returns
    ``(guide, lr, retries)`` (the rate after restarts at 3x smaller rates)."""
    n = x.shape[0]
    batch = min(config.batch_size, n)
    per_epoch = math.ceil(n / batch)
    if per_epoch <= config.max_collect_every:
        epochs, every, every_steps = config.swa_snapshots, 1, None
    else:
        every_steps = config.max_collect_every
        epochs, every = math.ceil(config.swa_snapshots * every_steps / per_epoch), 1
    retries = 0
    _reset(collector, map_loc)
    while True:
        try:
            with unmoved_quietly():  # the report's note says it, once
                guide, _ = fit(
                    model, collector, (x, y), epochs=epochs, swa_start=0, swa_lr=lr,
                    batch_size=batch, collect_every=every, collect_every_steps=every_steps,
                    quiet=True if quiet else None,
                )
            if guide is not None and torch.isfinite(guide.loc).all():
                return guide, lr, retries
            err = RuntimeError("non-finite SWA mean")
        except (ValueError, RuntimeError) as caught:  # e.g. the noise scale reached 0
            err = caught
        if retries == config.swa_retries:
            raise RuntimeError(
                f"{desc}: the SWA phase diverged at swa_lr={lr:.3g} after {retries} "
                f"retries ({type(err).__name__}: {str(err)[:200]}); lower swa_c"
            ) from err
        # Unstable SGD (lr times the curvature ~ tau_hat too large): restart from the MAP
        # with a 3x smaller rate and fresh moments.
        retries, lr = retries + 1, lr / 3
        _reset(collector, map_loc)


def _reset(collector, map_loc) -> None:
    """Back to the MAP with fresh (empty) moments."""
    if collector.num_snapshots:
        old = collector.moments
        collector.moments = type(old)(old.rank, old.min_var, old.deviation_dtype, old.device)
    with torch.no_grad():
        collector.loc.copy_(map_loc)
