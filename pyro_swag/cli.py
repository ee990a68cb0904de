"""The ``pyro-swag`` console command.

``pyro-swag compare`` runs :func:`pyro_swag.compare.compare` (SWAG against SGD/MAP, SWA,
MultiSWAG, SVI and NUTS) and writes the report directory. Examples::

    pyro-swag compare                          # diabetes, the embedded default
    pyro-swag compare --dataset digits --out digits-report
    pyro-swag compare --uci yacht --data-dir ../shared/data/UCI_Datasets --split 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .calibrate import METHODS as CALIBRATIONS
    from .compare import METHODS
    from .data import SKLEARN_DATASETS, UCI_DATASETS
    from .recipes import RECIPES

    parser = argparse.ArgumentParser(prog="pyro-swag", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare", help="SWAG vs SGD/MAP, SWA, MultiSWAG, SVI and NUTS on one dataset",
        description="Fit every method on one dataset and write report.md, results.json, "
        "PNG plots and one netCDF DataTree per method into --out.",
    )
    src = cmp.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="diabetes",
                     help=f"built-in dataset: {', '.join(sorted(SKLEARN_DATASETS))} "
                     "(default diabetes)")
    src.add_argument("--uci", metavar="NAME",
                     help=f"UCI set: {', '.join(sorted(UCI_DATASETS))}")
    cmp.add_argument("--data-dir", help="UCI data directory (default $PYRO_SWAG_DATA or "
                     "../shared/data/UCI_Datasets)")
    cmp.add_argument("--split", type=int, default=0, help="split index (default 0)")
    cmp.add_argument("--out", default="out/compare", help="output directory (default out/compare)")
    cmp.add_argument("--hidden", type=int, nargs="+", default=[50],
                     help="hidden layer widths (default 50)")
    cmp.add_argument("--heteroscedastic", action="store_true",
                     help="regression: the network also predicts the noise sd per input")
    cmp.add_argument("--pretrain-beta", type=float, default=None, metavar="BETA",
                     help="with --heteroscedastic: pre-train on the beta-NLL loss (0.5 usual)")
    cmp.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                     metavar="METHOD", help=f"subset of: {' '.join(METHODS)}")
    cmp.add_argument("--num-samples", type=int, default=None,
                     help="draws per method (default 100; 30 with --quick)")
    cmp.add_argument("--pretrain-steps", type=int, default=None)
    cmp.add_argument("--svi-steps", type=int, default=None)
    cmp.add_argument("--nuts-budget", type=float, default=None, metavar="SECONDS",
                     help="stop NUTS (reported as skipped) after this long")
    cmp.add_argument("--nuts-warmup", type=int, default=None, metavar="N",
                     help="NUTS warm-up iterations (default 100)")
    cmp.add_argument("--nuts-samples", type=int, default=None, metavar="N",
                     help="NUTS draws kept (default 100); the report checks their R-hat/ESS")
    cmp.add_argument("--nuts-depth", type=int, default=None, metavar="D",
                     help="NUTS max tree depth (default 6; each level up to doubles the "
                          "cost of an iteration)")
    cmp.add_argument("--swa-c", type=float, nargs="+", default=None, metavar="C",
                     help="SWA learning rate c / tau_hat per datum (default c = 0.1); several "
                          "values: each run keeps the one its SWAG predictive scores best on "
                          "the pre-training hold-out (e.g. 0.03 0.1 0.3, the best single-run "
                          "choice for BNN regression in docs/calibration.md)")
    cmp.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                     help="scale selection of calibrated SWAG (default elbo; validation: "
                          "on the 10%% that pre-training holds out; see docs/calibration.md "
                          "for classification)")
    cmp.add_argument("--recipe", choices=RECIPES, default=None,
                     help="the settings of a UCI benchmark recipe (pyro_swag.recipes; "
                          "docs/results/uci.md), e.g. e; other options override them")
    cmp.add_argument("--quick", action="store_true",
                     help="tiny settings for a smoke run (seconds, not minutes)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--threads", type=int, default=1,
                     help="torch threads (default 1: small nets run best single-threaded)")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _config(args, data=None):
    from .compare import CompareConfig, quick_config

    if args.recipe is not None:
        from .recipes import recipe_config

        base = recipe_config(args.recipe, data)
    else:
        base = quick_config() if args.quick else CompareConfig()
    overrides = {"hidden": tuple(args.hidden), "methods": tuple(args.methods), "seed": args.seed}
    if args.heteroscedastic:
        overrides["heteroscedastic"] = True
    if args.pretrain_beta is not None:
        overrides["pretrain_beta"] = args.pretrain_beta
    for key, attr in (("pretrain_steps", "pretrain_steps"), ("svi_steps", "svi_steps"),
                      ("nuts_budget", "nuts_budget_s"), ("num_samples", "num_samples"),
                      ("calibration", "calibration"), ("nuts_warmup", "nuts_warmup"),
                      ("nuts_samples", "nuts_samples"), ("nuts_depth", "nuts_max_tree_depth")):
        if getattr(args, key) is not None:
            overrides[attr] = getattr(args, key)
    if args.swa_c is not None:
        several = len(args.swa_c) > 1 or base.swa_c_grid is not None
        overrides.update(swa_c=args.swa_c[0],
                         swa_c_grid=tuple(sorted(set(args.swa_c))) if several else None)
    values = {**base.__dict__, **overrides}
    return CompareConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-swag`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"argument --threads: must be >= 1, got {args.threads}")
    if args.recipe is not None and args.quick:
        parser.error("argument --quick: not with --recipe (a recipe sets every size)")
    from .data import UCI_DATASETS, load_dataset

    if args.data_dir is not None and not (args.uci or args.dataset.removeprefix("uci:")
                                          in UCI_DATASETS):
        parser.error(f"argument --data-dir: only used with --uci NAME, got --dataset "
                     f"{args.dataset}; drop --data-dir or pass --uci")
    import torch

    torch.set_num_threads(args.threads)
    from .compare import compare
    from .compare_report import markdown

    try:
        name = f"uci:{args.uci}" if args.uci else args.dataset
        data = load_dataset(name, args.split, data_dir=args.data_dir)
        config = _config(args, data)
        summary = compare(data, args.out, config=config, quiet=args.quiet)
    except (ValueError, TypeError, OSError) as err:
        print(f"pyro-swag compare: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(markdown(summary))
    print(f"report written to {args.out}/report.md")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
