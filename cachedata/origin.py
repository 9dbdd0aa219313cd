"""What a namespace is made from: the dataset (Subsets peeled off), the fingerprints of
dataset and transform, the meta.json record, and why a new namespace starts cold.

CachedDataset builds its namespace from these at construction; nothing here runs on the
training path.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, Subset

from . import metadata
from ._version import __version__
from .fingerprint import fingerprint, fingerprint_tree
from .storage import FORMAT_VERSION

logger = logging.getLogger("cachedata")


def namespace_fingerprint(
    dataset_fp: str, transform_fp: str, *, version: str | None, custom_key: bool
) -> str:
    """The namespace's name: every input that changes what is stored (the format included)."""
    return fingerprint(
        {
            "cachedata_format": FORMAT_VERSION,
            "dataset": dataset_fp,
            "transform": transform_fp,
            "version": version,
            "key": "custom" if custom_key else "index",
        }
    )


def meta_record(
    name: str,
    *,
    base: Any,
    transform: Any,
    version: str | None,
    custom_key: bool,
    dataset_fp: str,
    transform_fp: str,
    tree: dict[str, str],
) -> dict:
    """The namespace's meta.json: what produced it, in words and digests, and the versions."""
    import h5py

    return {
        "cachedata_format": FORMAT_VERSION,
        "fingerprint": name,
        "created": time.time(),
        "dataset": {"type": qualname(base), "len": len(base), "fingerprint": dataset_fp},
        "transform": {"repr": repr(transform)[:2000], "fingerprint": transform_fp},
        "version": version,
        "key": "custom" if custom_key else "index",
        "tree": tree,
        "versions": {
            "cachedata": __version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "h5py": h5py.__version__,
        },
    }


def check_map_style(dataset: Any) -> None:
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"CachedDataset needs a map-style dataset, got the IterableDataset {qualname(dataset)}; "
            "wrap a dataset that has __len__ and __getitem__(int)"
        )
    missing = [m for m in ("__len__", "__getitem__") if not callable(getattr(type(dataset), m, None))]
    if missing:
        raise TypeError(
            f"CachedDataset needs a map-style dataset with __len__ and __getitem__(int); "
            f"{qualname(dataset)} has no {' or '.join(missing)}"
        )


def unwrap(dataset: Any) -> tuple[Any, np.ndarray | None]:
    """Peel Subsets off: (base dataset, base indices of this dataset's items or None)."""
    indices: np.ndarray | None = None
    while isinstance(dataset, Subset):
        inner = np.asarray(
            list(dataset.indices) if not isinstance(dataset.indices, np.ndarray) else dataset.indices
        )
        if inner.size and not np.issubdtype(inner.dtype, np.integer):
            raise TypeError(f"Subset indices must be integers, got dtype {inner.dtype}")
        inner = inner.astype(np.int64).reshape(-1)
        n = len(dataset.dataset)
        inner = np.where(inner < 0, inner + n, inner)
        if inner.size and (inner.min() < 0 or inner.max() >= n):
            raise IndexError(f"Subset index out of range for its dataset of length {n}")
        indices = inner if indices is None else inner[indices]
        dataset = dataset.dataset
    return dataset, indices


def fingerprint_part(obj: Any, what: str, *, fallback: bool) -> tuple[str, dict[str, str]]:
    """(digest, attribute-path tree) of the dataset or transform, or a type-based stand-in."""
    try:
        tree = fingerprint_tree(obj, root=what)
    except TypeError as exc:
        if not fallback:
            hint = (
                "version='...' (bump it when the data changes) or key="
                if what == "dataset"
                else "version='...'"
            )
            raise TypeError(
                f"CachedDataset cannot fingerprint the {what} deterministically: {exc}. "
                f"Pass {hint} to name the namespace yourself"
            ) from None
        logger.info("cachedata: %s is named by its type and version= (%s)", what, exc)
        stand_in = {"type": qualname(obj), "len": len(obj) if hasattr(obj, "__len__") else None}
        return fingerprint(stand_in), {what: f"{qualname(obj)} (named by version=)"}
    return tree.digest, tree.entries


#: New namespaces already explained by this process (one WARNING each).
_explained: set[str] = set()


def explain_new_namespace(cache_dir: Path, meta: dict) -> None:
    """Say, once per process and at WARNING, why a cache starts cold beside older namespaces.

    Names what differs from the nearest sibling of the same dataset type (see
    ``metadata.nearest_sibling``; damaged meta.json files are skipped), in words.
    """
    where = str(cache_dir / meta["fingerprint"])
    if where in _explained:
        return
    diff = metadata.nearest_sibling(meta, metadata.read_metas(cache_dir))
    if diff is None:
        return
    _explained.add(where)
    lines = diff.changes
    shown = "; ".join(lines[:8]) + (f"; ... ({len(lines) - 8} more)" if len(lines) > 8 else "")
    # A version= bump is the user's own request for a fresh namespace: say so, but quietly.
    say = logger.info if diff.version_only else logger.warning
    say(
        "cachedata: cache starts cold: new namespace %s for %s differs from %s in %s: %s. "
        "Its items are computed again into %s. If that difference should not matter, leave it out of "
        "the fingerprint (a __cachedata_fingerprint__ method, or cachedata.register_fingerprint for its "
        "type) and pin the namespace by hand with version='...', bumped when outputs should change",
        meta["fingerprint"][:12],
        meta["dataset"]["type"],
        diff.fingerprint[:12],
        ", ".join(diff.parts) or "nothing recorded",
        shown or "(no attribute-level difference recorded)",
        cache_dir / meta["fingerprint"],
    )


def qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"
