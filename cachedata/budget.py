"""The disk budget of a cache folder: what it is and where it comes from.

A budget caps the bytes of all namespaces under one ``cache_dir`` together. It comes from
``CachedDataset(max_bytes=)``, else ``$CACHEDATA_MAX_BYTES``, else the folder's settings file
(``cachedata-settings.json``, written by ``cachedata budget PATH SIZE``), else there is none.

The rest lives beside this module, one job each:

- ``leases``: which processes use a namespace (lease files), and the folder's lock;
- ``usage``: how many bytes each namespace takes and when it was last used;
- ``eviction``: removing least recently used namespaces nobody uses (also ``prune``, ``clear``);
- ``tracker``: one CachedDataset's side: its lease, the rate-limited checks, the stop when
  the namespaces in use alone exceed the budget.

Plain file-system work: no numpy, no HDF5, so the command line reads budgets quickly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileset import write_atomic
from .units import format_size, parse_size

logger = logging.getLogger("cachedata")

#: The environment variable that sets a default budget (a size like ``50G``; ``none`` or ``off``: no budget).
ENV_VAR = "CACHEDATA_MAX_BYTES"
#: The settings file in a cache folder (JSON, ``{"max_bytes": <bytes>}``).
SETTINGS_NAME = "cachedata-settings.json"

_OFF = ("none", "off")
_warned: set[str] = set()


@dataclass(frozen=True)
class Limit:
    """A budget in bytes (``max_bytes`` None: no budget) and where it came from."""

    max_bytes: int | None
    source: str  # "max_bytes=", "$CACHEDATA_MAX_BYTES", the settings file's path, or "none"

    def __str__(self) -> str:
        if self.max_bytes is None:
            return "none" if self.source == "none" else f"none (from {self.source})"
        return f"{format_size(self.max_bytes)} (from {self.source})"


def parse_max_bytes(value: Any, *, where: str) -> int:
    """A budget in bytes from an int or a size string like ``"50G"``; errors name ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        if type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu":
            value = int(value)
        else:
            raise TypeError(
                f"{where}: the disk budget must be a number of bytes (int) or a size string like '50G', "
                f"got {type(value).__name__} {value!r}"
            )
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if value <= 0:
        raise ValueError(
            f"{where}: the disk budget must be positive, got {value!r}; give a size like '50G' "
            "(or no budget at all)"
        )
    return int(value)


def explicit_limit(max_bytes: Any) -> Limit | None:
    """The budget from ``max_bytes=``, else from ``$CACHEDATA_MAX_BYTES``; None when neither is
    set (then the folder's settings file decides, see ``current_limit``).

    Raises TypeError or ValueError naming the bad value and where it came from.
    """
    if max_bytes is not None:
        return Limit(parse_max_bytes(max_bytes, where="CachedDataset(max_bytes=...)"), "max_bytes=")
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return None
    if env.lower() in _OFF:
        return Limit(None, f"${ENV_VAR}")
    where = f"${ENV_VAR}={env!r}"
    return Limit(parse_max_bytes(env, where=where + " (unset it or write e.g. 50G)"), f"${ENV_VAR}")


def settings_path(cache_dir: str | os.PathLike) -> Path:
    """Where a cache folder keeps its settings (the budget)."""
    return Path(cache_dir) / SETTINGS_NAME


def read_settings(cache_dir: str | os.PathLike) -> dict:
    """The folder's settings, {} without a settings file; ValueError naming the file when damaged."""
    path = settings_path(cache_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def folder_limit(cache_dir: str | os.PathLike) -> int | None:
    """The budget stored in the folder's settings file (None: none); ValueError when damaged."""
    value = read_settings(cache_dir).get("max_bytes")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{settings_path(cache_dir)}: max_bytes must be a positive number of bytes, got {value!r}"
        )
    return value


def write_limit(cache_dir: str | os.PathLike, max_bytes: int | None) -> Path:
    """Store the folder's budget (None: remove it) in its settings file; returns its path.

    Written as a temporary file in the same folder, then renamed over the old one
    (``fileset.write_atomic``): every process reads the old or the new settings, never half
    a file. Other settings are kept.
    """
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        data = read_settings(folder)
    except ValueError:
        data = {}  # a damaged file is replaced
    if max_bytes is None:
        data.pop("max_bytes", None)
    else:
        data["max_bytes"] = int(max_bytes)
    target = settings_path(folder)
    if not data:
        target.unlink(missing_ok=True)  # nothing left to say
        return target
    write_atomic(target, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return target


def current_limit(cache_dir: str | os.PathLike, explicit: Limit | None = None) -> Limit:
    """The budget in force: ``explicit`` (max_bytes= or the environment), else the folder's
    settings file. A damaged settings file is ignored with one warning per process: a
    training run must not stop over it."""
    if explicit is not None:
        return explicit
    try:
        value = folder_limit(cache_dir)
    except ValueError as exc:
        key = str(settings_path(cache_dir))
        if key not in _warned:
            _warned.add(key)
            logger.warning(
                "cachedata: ignoring the disk budget: %s; set it again with `cachedata budget %s SIZE`",
                exc,
                cache_dir,
            )
        return Limit(None, "none")
    return Limit(None, "none") if value is None else Limit(value, str(settings_path(cache_dir)))
