"""The package's one definition of "an int", "a real number" and "a bool" for argument checks, and
of an argument's old name.

Python's ``bool`` is a subclass of ``int``, so ``isinstance(True, int)`` holds and ``rank=True``
would pass a plain check as rank 1. Every check of an integer or real argument goes through
these, so each refuses a bool the same way and names the argument and its allowed range.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, TypeGuard, TypeVar, Union, cast

__all__ = ["check_bool", "check_int", "is_int", "is_real", "renamed_argument"]

F = TypeVar("F", bound=Callable[..., Any])


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


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is a bool; ``TypeError`` naming ``name`` otherwise (``0``/``1`` included:
    a flag is never read from an int)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def renamed_argument(old: str, new: str) -> Callable[[F], F]:
    """Decorator: the keyword ``old`` still works as ``new``, with a ``DeprecationWarning`` naming
    both; passing both is a ``TypeError``. (The retraction backend was ``method=`` on the manifold
    functions and ``retraction=`` on layers, ``spectralize`` and ``SpectralAdam``: one name now.)"""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{fn.__qualname__}() got both {new}= and its old name {old}=: pass {new}= only")
                warnings.warn(f"{fn.__qualname__}({old}=...) is deprecated: use {new}=...", DeprecationWarning,
                              stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return cast(F, inner)

    return wrap
