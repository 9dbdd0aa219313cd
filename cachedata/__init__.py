"""cachedata: memoize a PyTorch dataset's deterministic preprocessing on disk.

Swap ``dataset`` for ``CachedDataset(dataset, cache_dir, transform=...)``: each item's
transform output is computed once, stored in HDF5 shards written per DataLoader worker and
merged by rank 0, and read back bit-exactly on every later epoch, fold and run.
"""

from ._version import __version__
from .collate import CachedCollate
from .dataset import CachedDataset
from .device import DeviceLoader
from .fingerprint import diff_trees, fingerprint, fingerprint_tree, register_fingerprint
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
