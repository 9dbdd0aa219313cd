"""cachedata: memoize a PyTorch dataset's deterministic preprocessing on disk.

Swap ``dataset`` for ``CachedDataset(dataset, cache_dir, transform=...)``: each item's
transform output is computed once, stored in HDF5 shards written per DataLoader worker and
merged by rank 0, and read back bit-exactly on every later epoch, fold and run.

The public names are imported on first use (PEP 562), so that ``import cachedata`` and the
command line do not import torch (2-5 s) until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# Eager (torch-free): the submodule shares the function's name, and binding the function
# after the submodule's import keeps ``cachedata.fingerprint`` the function.
from .fingerprint import diff_trees, fingerprint, fingerprint_tree, register_fingerprint

if TYPE_CHECKING:
    from .collate import CachedCollate
    from .dataset import CachedDataset
    from .device import DeviceLoader
    from .stats import CacheStats

__all__ = [
    "CacheStats",
    "CachedCollate",
    "CachedDataset",
    "DeviceLoader",
    "__version__",
    "diff_trees",
    "fingerprint",
    "fingerprint_tree",
    "register_fingerprint",
]

#: Public name -> the submodule that defines it.
_LAZY = {
    "CacheStats": "stats",
    "CachedCollate": "collate",
    "CachedDataset": "dataset",
    "DeviceLoader": "device",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cachedata' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
