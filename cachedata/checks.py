"""Small argument checks, and the words error messages use for types and places.

Torch-free (the command line and ``import cachedata`` use it). Every error in cachedata
names the value, where it was found and a fix; these helpers keep that wording uniform:
``type_name(int)`` is ``int`` and ``type_name(np.ndarray)`` ``numpy.ndarray``;
``path_str(("meta", 2))`` is ``["meta"][2]``.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

__all__ = ["is_positive_int", "path_str", "type_name"]


def is_positive_int(value: object) -> bool:
    """True for an integer >= 1 (a Python or numpy int; ``True`` is not a number here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1


def type_name(t: type) -> str:
    """``module.qualname`` of a type as messages show it (builtins without their module)."""
    module = getattr(t, "__module__", None)
    qual = getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))
    return qual if module in (None, "builtins") else f"{module}.{qual}"


def path_str(path: tuple[Any, ...]) -> str:
    """A place inside a nested item or sample: ``("x", 2)`` -> ``["x"][2]``, ``()`` -> ``""``.

    str keys are JSON-quoted (so a key with quotes or newlines stays readable), anything
    else is shown by ``repr``.
    """
    return "".join(f"[{json.dumps(k) if isinstance(k, str) else repr(k)}]" for k in path)
