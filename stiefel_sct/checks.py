"""The package's one definition of "an int" and "a real number" for argument checks.

Python's ``bool`` is a subclass of ``int``, so ``isinstance(True, int)`` holds and ``rank=True``
would pass a plain check as rank 1. Every check of an integer or real argument goes through
these, so each refuses a bool the same way and names the argument and its allowed range.
"""

from __future__ import annotations

from typing import Optional, TypeGuard, Union

__all__ = ["check_int", "is_int", "is_real"]


def is_int(value: object) -> TypeGuard[int]:
    """``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[Union[int, float]]:
    """``value`` is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: object, name: str, low: int, *, optional: bool = False) -> Optional[int]:
    """``value`` as an int ``>= low`` (or ``None`` where ``optional``); ``ValueError`` naming ``name``
    and the range otherwise."""
    if optional and value is None:
        return None
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' or None' if optional else ''}, got {value!r}")
    return value
