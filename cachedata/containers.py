"""Rebuilding a sample's container (dict, tuple, list, their subclasses) around new values.

Collation and the device copy both walk a nested batch and build the same structure around
new leaves; a subclass keeps its type where it can be rebuilt, like ``default_collate``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["rebuild_mapping", "rebuild_sequence"]


def rebuild_mapping(template: Mapping[Any, Any], values: dict[Any, Any]) -> Any:
    """``values`` in a mapping of ``template``'s type; a plain dict when that type cannot be built.

    A mutable mapping is copied and refilled, so it keeps its extra state (e.g. a Hugging Face
    ``BatchEncoding``); any other mapping type is called with ``values``.
    """
    if type(template) is dict:
        return values
    try:
        if isinstance(template, MutableMapping):
            clone = copy.copy(template)
            clone.clear()
            clone.update(values)
            return clone
        return type(template)(values)
    except (TypeError, ValueError, AttributeError):
        return values


def rebuild_sequence(template: Sequence[Any], items: list[Any]) -> Any:
    """``items`` in a sequence of ``template``'s type (a namedtuple by its fields).

    A type that cannot be built from a list falls back to a plain tuple or list.
    """
    kind = type(template)
    if kind is tuple:
        return tuple(items)
    if kind is list:
        return items
    if isinstance(template, tuple) and hasattr(template, "_fields"):  # namedtuple
        return kind(*items)
    try:
        return kind(items)
    except (TypeError, ValueError):
        return tuple(items) if isinstance(template, tuple) else items
