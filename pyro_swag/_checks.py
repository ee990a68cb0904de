"""Small predicates shared by the argument checks of every stage (imports nothing upstream)."""

from __future__ import annotations

import math


def is_positive_finite(value) -> bool:
    """Whether ``value`` is a real number in ``(0, inf)`` (a ``bool`` is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf
