"""UCI regression benchmark: SWAG, MultiSWAG and SVI baselines (NUTS as time allows).

Protocol (Hernández-Lobato & Adams 2015; Gal & Ghahramani 2016): the standard splits (20 per
set, 5 for protein), inputs and targets standardised with training statistics, one hidden
layer of 50 units (tanh, N(0, 1) priors, learned noise precision), test log-likelihood per
point and RMSE in original units, mean ± standard error over the splits run.

Every (set, split, method) result is stored in a JSON cache as soon as it exists, so the run
can be stopped and resumed; ``--table-only`` rewrites ``docs/results/uci.md`` from the cache.
Splits are run split-major (split 0 of every set first), so a partial run covers all sets.

    python benchmarks/uci.py --splits 3                       # all sets, 3 splits each
    python benchmarks/uci.py --sets yacht boston --methods swag nuts --splits 1
    python benchmarks/uci.py --recipe b --methods swag --cache NEW_CACHE.json  # recipe B
    python benchmarks/uci.py --recipe c --methods swag --sets naval --cache NEW_CACHE.json
    python benchmarks/uci.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyro
import torch

from pyro_swag.compare import CompareConfig, make_model
from pyro_swag.compare_methods import run_method
from pyro_swag.compare_metrics import pointwise, scores
from pyro_swag.data import UCI_DATASETS, load_uci, uci_num_splits
from pyro_swag.recipes import recipe_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uci_report import LARGE, SETS, write_table  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "results" / "uci_cache.json"
TABLE = ROOT / "docs" / "results" / "uci.md"
METHODS = ["swag", "swag_diag", "multiswag", "svi_normal", "svi_lowrank", "nuts"]
# Recipes B to E cache their rows as swag_b ... swag_e (recipe A, the first run, under the
# plain method names).
RECIPE_SUFFIX = {"a": "", "b": "_b", "c": "_c", "d": "_d", "e": "_e", "f": "_f", "g": "_g"}
RECIPE_METHODS = {"swag", "swag_diag", "multiswag"}
DEFAULT_METHODS = ["swag", "multiswag", "svi_normal", "svi_lowrank"]
SMALL = {"boston", "concrete", "energy", "wine", "yacht"}  # NUTS only here


def config_for(name: str, args, data) -> CompareConfig:
    """Benchmark settings: :func:`pyro_swag.recipes.recipe_config` (where the recipes are
    described) with this script's step, snapshot and run counts."""
    extra = {"pretrain_steps": args.pretrain_steps, "nuts_budget_s": args.nuts_budget} if (
        args.recipe == "a") else {}
    return recipe_config(args.recipe, data, large=name in LARGE, svi_steps=args.svi_steps,
                         swa_snapshots=args.snapshots, multiswag_runs=args.multiswag_runs,
                         methods=tuple(args.methods), **extra)


def settings(cfg: CompareConfig) -> dict:
    keys = ("pretrain_steps", "pretrain_batch_size", "pretrain_val_fraction", "svi_steps",
            "swa_snapshots", "max_collect_every", "multiswag_runs", "swa_c", "rank",
            "pretrain_batch_grid", "pretrain_lr_decay", "pretrain_select", "swa_c_grid",
            "patience", "swa_scale_grid", "pretrain_checkpoints", "heteroscedastic",
            "pretrain_beta")
    return {k: getattr(cfg, k) for k in keys}


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_all(path: Path) -> dict:
    """Every ``uci_cache*.json`` beside ``path`` (parallel runs write separate files)."""
    merged = {}
    for p in sorted(path.parent.glob("uci_cache*.json")):
        merged.update(load_cache(p))
    merged.update(load_cache(path))
    return merged


def save_cache(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _key(method: str, args) -> str:
    return method + (RECIPE_SUFFIX[args.recipe] if method in RECIPE_METHODS else "")


def run_split(name: str, split: int, methods: list[str], args, cache: dict) -> None:
    todo = [m for m in methods if cache.get(f"{name}/{split}/{_key(m, args)}", {})
            .get("status") not in ("ok", "skipped")]
    if name not in SMALL:
        todo = [m for m in todo if m != "nuts"]
    if not todo:
        return
    data = load_uci(name, split, args.data_dir)
    cfg = config_for(name, args, data)
    torch.manual_seed(0)
    model = make_model(data, cfg.hidden, cfg.seed, cfg.heteroscedastic)
    state: dict = {}
    for method in todo:
        pyro.set_rng_seed(cfg.seed)
        start = time.perf_counter()
        try:
            res = run_method(method, model,
                             lambda s: make_model(data, cfg.hidden, s, cfg.heteroscedastic),
                             data, cfg, state, quiet=not args.progress)
        except (ValueError, RuntimeError) as err:
            cache[f"{name}/{split}/{_key(method, args)}"] = {"status": "failed",
                                                            "note": str(err)[:300]}
            save_cache(args.cache, cache)
            print(f"{name} split {split} {method}: FAILED {err}", flush=True)
            continue
        wall = res.wall_s if res.wall_s is not None else time.perf_counter() - start
        row = {"status": res.status, "note": res.note, "wall_s": wall, "settings": settings(cfg)}
        if res.status == "ok":
            sc = scores(pointwise(model, res.draws, data.x_test, data.y_test, "gaussian"),
                        data, data.y_test)
            row.update({k: v for k, v in sc.items() if not k.startswith("_")})
            row.update({k: v for k, v in res.extra.items() if isinstance(v, (int, float))})
            # the SWAG run's settings describe the SWAG-based rows only
            run = (state.get("swag_run") or {}) if method in RECIPE_METHODS else {}
            for k in ("swa_c", "pretrain_batch", "pretrain_val_ll", "pretrain_s", "swa_s",
                      "pretrain_checkpoint"):
                if isinstance(run.get(k), (int, float, str)):
                    row[k] = run[k]
            if run.get("swa_c_selection"):
                row["swa_c_val_ll"] = {str(c): v for c, v in run["swa_c_selection"].items()}
            cal = run["guide"].calibration if "guide" in run else None
            if cal:  # the scale chosen on held-out data (recipe E)
                row["swa_scale"] = run["guide"].scale
                row["swa_scale_val_ll"] = dict(zip(map(str, cal["scales"]),
                                                   cal["curve"]["log_likelihood"]))
            if run.get("pretrain_selection"):
                row["pretrain_val_lls"] = run["pretrain_selection"]
        cache[f"{name}/{split}/{_key(method, args)}"] = row
        save_cache(args.cache, cache)
        ll = row.get("test_ll", float("nan"))
        print(f"{name} split {split} {_key(method, args)}: LL {ll:.3f} "
              f"RMSE {row.get('rmse', float('nan')):.3f} ({wall:.0f} s)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=SETS, choices=sorted(UCI_DATASETS))
    parser.add_argument("--splits", type=int, default=20,
                        help="splits per set (capped at the set's number, 5 for protein)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=TABLE)
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--svi-steps", type=int, default=2000)
    parser.add_argument("--snapshots", type=int, default=30)
    parser.add_argument("--multiswag-runs", type=int, default=2)
    parser.add_argument("--nuts-budget", type=float, default=300.0)
    parser.add_argument("--start-split", type=int, default=0,
                        help="first split to run (to extend a finished run in a new cache file)")
    parser.add_argument("--recipe", choices=sorted(RECIPE_SUFFIX), default="a",
                        help="a: the first benchmark recipe; b: longer pre-training and the "
                             "SWA rate (small sets: also the Adam batch) chosen on held-out "
                             "training data (rows cached as swag_b, multiswag_b); c: b with "
                             "40000 Adam steps, no early stop on the large sets (swag_c); d: c "
                             "with the small sets' pre-training run chosen by the SWAG "
                             "predictive (swag_d); e: d with SWAG's scale chosen on the "
                             "held-out part too (swag_e, multiswag_e); f: e with a "
                             "heteroscedastic network (swag_f); g: f pre-trained on "
                             "beta-NLL, beta 0.5 (swag_g)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache = load_cache(args.cache)
    if args.table_only:
        cache = load_all(args.cache)
    else:
        limits = {s: min(args.splits, uci_num_splits(s, args.data_dir)) for s in args.sets}
        for split in range(args.start_split, max(limits.values())):
            for name in args.sets:
                if split < limits[name]:
                    run_split(name, split, args.methods, args, cache)
                    write_table(load_all(args.cache), args.out, args)
    print(write_table(load_all(args.cache), args.out, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
