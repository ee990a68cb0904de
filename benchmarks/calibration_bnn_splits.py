"""The BNN point of issue 7 over several splits of one data set (diabetes by default, or the
synthetic ``friedman``); writes the ``bnn_splits[_<set>][_<recipe>]`` section of
docs/results/calibration.md.

Per split: the NUTS reference (two chains, ``calibration_bnn.py --nuts-only``), several SWAG
seeds of one recipe (the main job's by default) scored raw and ELBO-calibrated, and the
MultiSWAG mixtures of the first 3 seeds (the comparison's default) and of all seeds. The
seeds are :mod:`calibration_bnn`'s, cached in the same uncommitted ``.pt`` files, so splits 0
and 1 reuse that benchmark's runs. A case meets the
point when its test LL is within 0.05 of NUTS's pooled LL *and* its 90 % coverage is within
0.87–0.93; NUTS's own coverage is checked against the same band.

    python benchmarks/calibration_bnn.py --nuts-only --datasets diabetes:2 --chains 0 1
    python benchmarks/calibration_bnn_splits.py --splits 0 1 2 3 4 --seeds 10
    python benchmarks/calibration_bnn.py --nuts-only --datasets friedman:0 --chains 0 1
    python benchmarks/calibration_bnn_splits.py --dataset friedman --splits 0 --seeds 10
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyro
import torch

from pyro_swag.compare import make_model
from pyro_swag.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration import write_section  # noqa: E402  (benchmarks/ is not a package)
from calibration_bnn import OUT, RECIPES, _summary, _task  # noqa: E402
from calibration_bnn_nuts import _pool, load_cache, score  # noqa: E402

VARIANTS = ("raw", "elbo")
LL_TOL, COV_BAND = 0.05, (0.87, 0.93)


def meets(ev: dict, ref: float) -> bool:
    return abs(ev["ll"] - ref) <= LL_TOL and COV_BAND[0] <= ev["cov90"] <= COV_BAND[1]


def split_rows(split: int, args, nuts: dict, tally: dict) -> list[str]:
    """Table rows of one split; adds ``(met, cases)`` per (label, variant) to ``tally``."""
    data = load_dataset(args.dataset, split)
    model = make_model(data)
    jobs = [(args.dataset, split, args.recipe, s, args.draws, not args.rerun)
            for s in range(args.seeds)]
    runs = [torch.load(_task(job), weights_only=True) for job in jobs]
    runs = [r for r in runs if "failed" not in r]
    if not runs:
        return [f"| {split} | | every SWAG seed failed | | | |"]
    ref = nuts["ll"]
    rows = []
    for variant in VARIANTS:
        evs = [r["rows"][variant] for r in runs]
        groups = [(f"SWAG ({len(evs)} seeds)", "SWAG", evs)]
        for k in sorted({min(3, len(runs)), len(runs)}):  # MultiSWAG of 3 (compare's), of all
            mixed = score(model, data, _pool([r["draws"][variant] for r in runs[:k]]))
            groups.append((f"MultiSWAG ({k})", f"MultiSWAG ({k})", [mixed]))
        for label, name, group in groups:
            ok = sum(meets(e, ref) for e in group)
            key = (name, variant)
            met, cases, diffs, covs = tally.get(key, (0, 0, [], []))
            tally[key] = (met + ok, cases + len(group), diffs + [e["ll"] - ref for e in group],
                          covs + [e["cov90"] for e in group])
            rows.append(
                f"| {split} | {label} {variant} | {_summary([e['ll'] - ref for e in group])} | "
                f"{_summary([e['cov90'] for e in group], '.3f')} | {ok}/{len(group)} |"
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="diabetes", choices=("diabetes", "friedman"))
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--recipe", default="main", choices=RECIPES)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--rerun", action="store_true", help="ignore cached SWAG seed results")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    cache = load_cache()
    name = args.dataset
    missing = [s for s in args.splits if "pooled" not in cache.get(f"{name}{s}", {})]
    if missing:
        raise SystemExit(
            f"no pooled NUTS reference for {name} split(s) {missing}; run `python "
            "benchmarks/calibration_bnn.py --nuts-only --datasets "
            + " ".join(f"{name}:{s}" for s in missing)
            + " --chains 0 1`"
        )
    load = os.getloadavg()[0]
    tally: dict = {}
    lines = [
        "| split | variant | test LL − NUTS: mean [min, max] | 90 % coverage | meets both |",
        "|---|---|---|---|---|",
    ]
    nuts_lines = []
    for split in args.splits:
        nuts = cache[f"{name}{split}"]["pooled"]
        lines += split_rows(split, args, nuts, tally)
        inside = COV_BAND[0] <= nuts["cov90"] <= COV_BAND[1]
        chains = ", ".join(f"{cache[f'{name}{split}'][f'chain{c}']['ll']:.3f}" for c in (0, 1))
        nuts_lines.append(
            f"split {split}: LL {nuts['ll']:.3f} (chains alone {chains}), coverage "
            f"{nuts['cov90']:.3f}" + ("" if inside else " (outside the band)")
        )
        print(lines[-1], flush=True)
    singles = [meets(cache[f"{name}{sp}"][f"chain{c}"], cache[f"{name}{sp}"]["pooled"]["ll"])
               for sp in args.splits for c in (0, 1)]
    nuts_cov = sum(cache[f"{name}{s}"]["pooled"]["cov90"] for s in args.splits)
    per_split = load_dataset(name, args.splits[0]).x_test.shape[0]
    n_test = per_split * len(args.splits)
    summary = [
        f"- {label} {variant}: meets both in **{met} of {cases}** cases; over all cases, "
        f"test LL − NUTS {sum(diffs) / len(diffs):+.3f} and 90 % coverage "
        f"{sum(covs) / len(covs):.3f}"
        for (label, variant), (met, cases, diffs, covs) in tally.items()
    ] + [f"- NUTS: 90 % coverage {nuts_cov / len(args.splits):.3f} over the same splits "
         f"({n_test} test points; binomial sd of a calibrated interval's coverage "
         f"{(0.09 / n_test) ** 0.5:.3f})",
         f"- NUTS, one chain against the pooled two (the same test): meets both in "
         f"**{sum(singles)} of {len(singles)}** cases"]
    cmd = "python benchmarks/calibration_bnn_splits.py " + " ".join(sys.argv[1:])
    body = "\n".join(
        [
            f"## The BNN point over {len(args.splits)} {name} split"
            + ("s" if len(args.splits) > 1 else "")
            + ("" if args.recipe == "main" else f", recipe `{args.recipe}`"),
            "",
            f"Measured with `{cmd.strip()}` (recipe `{args.recipe}`, {args.seeds} seeds, "
            f"{args.draws} draws; torch {torch.__version__}, pyro {pyro.__version__}, 1 thread, "
            f"load average {load:.1f} at start). A case meets the point when its test LL is "
            f"within {LL_TOL} of NUTS's pooled LL and its coverage within "
            f"{COV_BAND[0]}–{COV_BAND[1]}. {per_split} test points per split: one point moves "
            f"coverage by {1 / per_split:.3f}, and the binomial sd of a perfectly calibrated "
            f"90 % interval's coverage is {(0.09 / per_split) ** 0.5:.3f}"
            + (", wider than the band" if (0.09 / per_split) ** 0.5 > 0.03 else "")
            + ". `raw`: scale 1 at the recipe's SWA rate (recipe "
            "`rate` chooses that rate per run on held-out data); `elbo`: the scale chosen by "
            "the ELBO on top of it.",
            "",
            "NUTS (pooled chains): " + "; ".join(nuts_lines) + ".",
            "",
            *lines,
            "",
            *summary,
        ]
    )
    print(body)
    section = ("bnn_splits" + ("" if name == "diabetes" else f"_{name}")
               + ("" if args.recipe == "main" else f"_{args.recipe}"))
    write_section(args.out, section, body)


if __name__ == "__main__":
    main()
