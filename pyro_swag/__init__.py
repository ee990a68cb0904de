"""SWAG (Stochastic Weight Averaging-Gaussian) as a Pyro guide.

The core (moments, guides, models, training, predictive) imports eagerly; the ArviZ bridge,
calibration, distributed training and the comparison load on first use.
"""

from importlib import import_module

from .autoguide import SWAGCollector, SWAGGuide
from .models import BayesianMLP
from .module import ModuleSWAG
from .moments import SWAGMoments
from .multiswag import MultiSWAG, fit_runs
from .predictive import (
    forward_draws,
    log_joint,
    log_likelihood,
    predictive,
    sample_latents,
    unpack_latents,
)
from .train import FitResult, fit

_LAZY = {
    "to_datatree": "datatree",
    "loo": "datatree",
    "psis_diagnostic": "datatree",
    "RecordingNUTS": "datatree",
    "suggest_swa_lr": "lr",
    "estimate_preconditioner": "precondition",
    "Preconditioner": "precondition",
    "PreconditionedSGD": "precondition",
    "calibrate": "calibrate",
    "DistributedSWAG": "distributed",
    "load_dataset": "data",
}

__all__ = [
    "BayesianMLP",
    "FitResult",
    "ModuleSWAG",
    "MultiSWAG",
    "SWAGCollector",
    "SWAGGuide",
    "SWAGMoments",
    "fit",
    "fit_runs",
    "forward_draws",
    "log_joint",
    "log_likelihood",
    "predictive",
    "sample_latents",
    "unpack_latents",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyro_swag' has no attribute {name!r}")
