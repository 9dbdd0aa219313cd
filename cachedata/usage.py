"""How much of a cache folder each namespace takes, when it was last used, and who uses it.

What ``cachedata info`` and ``cachedata budget`` show and what eviction and ``prune`` decide
on: bytes are the apparent sizes of a namespace's files (retired files that await deletion
left out), the last use is ``last_used``'s mtime (touched at most hourly by readers), else
meta.json's, else the folder's. Plain file-system work: no numpy, no HDF5.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .budget import Limit, current_limit
from .fileset import LOCK_NAME as MERGE_LOCK_NAME
from .fileset import RUN_RE, SHARD_RE, lock_stale
from .leases import LEASE_RE, Holder, holders

#: Evicted namespace folders are renamed to ``.evicted-<time ns>-<fingerprint>`` until deleted
#: (see cachedata.eviction); their bytes are pending, not part of any namespace.
EVICTED_PREFIX = ".evicted-"


@dataclass(frozen=True)
class NamespaceUsage:
    """One namespace folder's share of its cache folder (bytes: apparent sizes of its files,
    leaving out retired files that await deletion)."""

    path: str
    fingerprint: str
    bytes: int
    last_used: float  # Unix seconds: last_used's mtime, else meta.json's, else the folder's
    holders: tuple[Holder, ...]
    merging: bool  # a merge.lock whose owner is alive
    last_used_from: str = "last_used"  # where last_used came from: "last_used", "meta.json" or "folder"

    @property
    def in_use(self) -> bool:
        return any(h.live for h in self.holders)

    @property
    def live_holders(self) -> tuple[Holder, ...]:
        return tuple(h for h in self.holders if h.live)


@dataclass(frozen=True)
class Usage:
    """A cache folder measured against its budget."""

    cache_dir: str
    limit: Limit
    namespaces: tuple[NamespaceUsage, ...]  # least recently used first
    pending_bytes: int  # evicted, awaiting deletion (network filesystems keep them a while)

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.namespaces)

    @property
    def in_use_bytes(self) -> int:
        return sum(n.bytes for n in self.namespaces if n.in_use)

    @property
    def over(self) -> bool:
        return self.limit.max_bytes is not None and self.bytes > self.limit.max_bytes


def tree_bytes(path: str) -> int:
    """Bytes of every file below ``path`` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files directly in one namespace folder, retired ones left out."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(os.fspath(path)) as it:
        for e in it:
            if not e.name.startswith("retired-"):
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_size
    return total


def _marks_namespace(name: str) -> bool:
    """A file name that only cachedata writes into a namespace folder."""
    return name in ("meta.json", "schema.json") or bool(
        SHARD_RE.match(name) or RUN_RE.match(name) or LEASE_RE.match(name)
    )


def is_namespace(path: str | os.PathLike) -> bool:
    """True for a folder that holds what cachedata writes into a namespace (not a cache_dir)."""
    try:
        with os.scandir(os.fspath(path)) as it:
            return any(_marks_namespace(e.name) for e in it)
    except OSError:
        return False


def namespace_usage(path: str | os.PathLike, *, now: float | None = None) -> NamespaceUsage | None:
    """Measure one folder; None when it is not a namespace (nothing cachedata wrote in it)."""
    path = Path(path)
    now = time.time() if now is None else now
    total, stamps, looks_like, merging = 0, {}, False, False
    try:
        entries = list(os.scandir(os.fspath(path)))
    except OSError:
        return None
    for e in entries:
        name = e.name
        if name.startswith("retired-"):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                total += tree_bytes(e.path)
                continue
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue  # merged away while we looked
        total += st.st_size
        if name in ("last_used", "meta.json"):
            stamps[name] = st.st_mtime
        if name == MERGE_LOCK_NAME:
            merging = not lock_stale(Path(e.path))
        looks_like = looks_like or _marks_namespace(name)
    if not looks_like:
        return None
    source = next((name for name in ("last_used", "meta.json") if stamps.get(name)), "folder")
    last_used = stamps.get(source)
    if last_used is None:
        try:
            last_used = path.stat().st_mtime
        except OSError:
            last_used = now
    found = tuple(holders(path, now=now))
    return NamespaceUsage(str(path), path.name, total, last_used, found, merging, source)


def measure(cache_dir: str | os.PathLike, *, now: float | None = None) -> list[NamespaceUsage]:
    """Every namespace under ``cache_dir``, least recently used first."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(os.fspath(cache_dir)))
    except OSError:
        return []
    found = []
    for e in entries:
        if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue  # .evicted-*, .deleting-*, locks, temporary files; links may lead outside
        n = namespace_usage(e.path, now=now)
        if n is not None:
            found.append(n)
    return sorted(found, key=lambda n: (n.last_used, n.fingerprint))


def folder_usage(cache_dir: str | os.PathLike, explicit: Limit | None = None) -> Usage:
    """The folder, its namespaces and its budget, as ``cachedata info`` and ``budget`` show them."""
    pending = 0
    with contextlib.suppress(OSError), os.scandir(os.fspath(cache_dir)) as it:
        for e in it:
            if e.name.startswith(EVICTED_PREFIX) and e.is_dir(follow_symlinks=False):
                pending += tree_bytes(e.path)
    return Usage(str(cache_dir), current_limit(cache_dir, explicit), tuple(measure(cache_dir)), pending)
