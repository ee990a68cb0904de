"""NUTS reference of the BNN calibration benchmark (``benchmarks/calibration_bnn.py``) and the
scores both sides share: two chains per data set, each from its own MAP, metrics cached in
``benchmarks/results/calibration_bnn_nuts.json`` and pointwise test terms in uncommitted
``.pt`` files next to it (the pooled metrics need both chains' terms).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, JitTrace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_value

from pyro_swag.compare import make_model
from pyro_swag.compare_metrics import pointwise, scores
from pyro_swag.data import load_dataset

CACHE = Path(__file__).resolve().parent / "results" / "calibration_bnn_nuts.json"


# ----------------------------------------------------------------------------- scoring
def score(model, data, draws: dict) -> dict:
    """Test LL / point (original units), 90 % coverage, RMSE, and the pointwise terms."""
    terms = pointwise(model, draws, data.x_test, data.y_test, data.likelihood)
    s = scores(terms, data, data.y_test)
    return {"ll": s["test_ll"], "cov90": s["coverage_90"], "rmse": s["rmse"], "terms": terms}


def _pool(terms: list[dict]) -> dict:
    return {k: torch.cat([t[k] for t in terms]) for k in terms[0]}


# ----------------------------------------------------------------------------- NUTS
def map_point(model, data, seed: int, steps: int) -> dict:
    """Full-batch Adam MAP from the network's init (the NUTS chain's start)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x, y, n = data.x_train, data.y_train, data.x_train.shape[0]
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn())
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "clip_norm": 10.0, "lrd": 0.1 ** (1 / steps)})
    scaled = pyro.poutine.scale(model, scale=1.0 / n)
    svi = SVI(scaled, pyro.poutine.scale(guide, scale=1.0 / n), optim,
              JitTrace_ELBO(ignore_jit_warnings=True))
    for _ in range(steps):
        svi.step(x, y, num_data=n)
    return {k: v.detach() for k, v in guide.median().items()}


def _spec(spec: str, default_split: int) -> tuple[str, int]:
    """``"name"`` or ``"name:split"`` -> ``(name, split)``."""
    name, _, split = spec.partition(":")
    return name, int(split) if split else default_split


def nuts_chain(spec: str, chain: int, args) -> dict:
    """One NUTS chain; its pointwise test terms go to a .pt file, its metrics to the JSON."""
    name, split = _spec(spec, args.split)
    data = load_dataset(name, split)
    model = make_model(data, seed=chain)
    start = time.perf_counter()
    init = map_point(model, data, chain, args.map_steps)
    map_s = time.perf_counter() - start
    pyro.set_rng_seed(chain)
    kernel = NUTS(model, max_tree_depth=args.nuts_depth, jit_compile=True,
                  ignore_jit_warnings=True, init_strategy=init_to_value(values=init))
    mcmc = MCMC(kernel, num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup,
                disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(data.x_train, data.y_train)
    wall = time.perf_counter() - start
    ev = score(model, data, {k: v.detach() for k, v in mcmc.get_samples().items()})
    path = CACHE.with_name(f"calibration_bnn_nuts_{name}{split}_c{chain}.pt")
    torch.save(ev.pop("terms"), path)
    ev.update(map_s=map_s, wall_s=wall, warmup=args.nuts_warmup, samples=args.nuts_samples,
              depth=args.nuts_depth, map_steps=args.map_steps)
    return ev


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def save_chain(key: str, chain: int, ev: dict) -> None:
    cache = load_cache()  # re-read: chains of other data sets may run in parallel
    cache.setdefault(key, {})[f"chain{chain}"] = ev
    files = [CACHE.with_name(f"calibration_bnn_nuts_{key}_c{c}.pt") for c in (0, 1)]
    if all(f.exists() for f in files):
        data = load_dataset(key.rstrip("0123456789"), int(key[len(key.rstrip("0123456789")):]))
        pooled = scores(_pool([torch.load(f, weights_only=True) for f in files]), data,
                        data.y_test)
        cache[key]["pooled"] = {"ll": pooled["test_ll"], "cov90": pooled["coverage_90"],
                                "rmse": pooled["rmse"]}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(cache, indent=1))
