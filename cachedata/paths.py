"""Where caches live by default (no torch import: the command line uses it too)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$CACHEDATA_HOME``, else ``~/.cache/cachedata``."""
    env = os.environ.get("CACHEDATA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cachedata"
