"""SWAG (Stochastic Weight Averaging-Gaussian) as a Pyro guide."""

from .autoguide import SWAGCollector, SWAGGuide
from .moments import SWAGMoments

__all__ = ["SWAGCollector", "SWAGGuide", "SWAGMoments"]
__version__ = "0.1.0"
