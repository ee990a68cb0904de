"""Small predicates shared by the argument checks of every stage (imports nothing upstream)."""

from __future__ import annotations

import math
import numbers


def is_real(value) -> bool:
    """Whether ``value`` is a real number, Python's or NumPy's (a ``bool`` is not one here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value, low: int = 1) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's, not a ``bool``) ``>= low``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def is_positive_finite(value) -> bool:
    """Whether ``value`` is a real number in ``(0, inf)``."""
    return is_real(value) and 0 < value < math.inf


def check_positive(name: str, value, hint: str, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is positive and finite (or, with
    ``optional``, ``None``); ``hint`` says what to pass instead."""
    if not ((optional and value is None) or is_positive_finite(value)):
        either = "None or " if optional else ""
        raise ValueError(
            f"{name} must be {either}a positive finite number, got {name}={value!r}; {hint}"
        )
