"""Removing whole namespaces from a cache folder, safely for the processes that read them.

Three callers, one way: the disk budget (``enforce``: least recently used first until the
folder fits), ``cachedata prune`` and ``cachedata clear`` (``remove``: the namespaces they
chose). Under ``<cache_dir>/.budget.lock`` a namespace's leases are read again right before
its folder is renamed out of the listing to ``.evicted-<time>-<fingerprint>`` (atomic: a
concurrent reader sees the whole namespace or none of it), so no namespace is taken after a
process leased it. It is then deleted outside the lock through the same path as merges
retire files (``fileset.retire``): locally the files are unlinked and open readers keep
reading; on a network filesystem they are renamed and deleted RETIRE_SECONDS later, because
another node's open file must still exist. Plain file-system work: no numpy, no HDF5.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .fileset import LOCK_NAME as MERGE_LOCK_NAME
from .fileset import lock_stale, retire, shared_filesystem
from .leases import LOCK_WAIT_SECONDS, folder_lock, held_here, holders
from .units import format_size
from .usage import EVICTED_PREFIX, NamespaceUsage, measure

logger = logging.getLogger("cachedata")


@dataclass(frozen=True)
class Eviction:
    """One namespace removed to keep its folder under budget."""

    fingerprint: str
    bytes: int
    last_used: float


@dataclass(frozen=True)
class Enforced:
    """What one enforcement pass found and did."""

    bytes: int  # the folder's usage afterwards
    in_use_bytes: int  # of which namespaces in use (leased, merging, or kept by the caller)
    evicted: tuple[Eviction, ...]
    locked: bool  # False: another process held the lock (or the folder is read-only); nothing removed


@dataclass(frozen=True)
class Removal:
    """What ``remove`` did with one namespace."""

    fingerprint: str
    path: str
    bytes: int
    removed: bool
    why_kept: str = ""  # when not removed: in use by whom, being merged, or the error
    failed: bool = False  # not removed because of an error (not because it is in use)


class Folder(Protocol):
    """What ``remove`` needs to know of a namespace (a NamespaceUsage, an admin.NamespaceInfo)."""

    @property
    def path(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def bytes(self) -> int: ...


def enforce(
    cache_dir: str | os.PathLike,
    max_bytes: int,
    *,
    room: int = 0,
    keep: tuple[str | os.PathLike, ...] = (),
    wait: float = LOCK_WAIT_SECONDS,
) -> Enforced:
    """Remove least recently used namespaces that nobody uses until the folder's usage plus
    ``room`` bytes fits in ``max_bytes``.

    Never removed: namespaces in ``keep`` or leased by this process, those with a live lease,
    those being merged. One INFO line per eviction.
    """
    cache_dir = Path(cache_dir)
    protected = {str(p) for p in keep} | held_here()
    doomed: list[tuple[NamespaceUsage, Path]] = []
    with folder_lock(cache_dir, wait=wait) as locked:
        found = measure(cache_dir)
        total = sum(n.bytes for n in found)
        busy = sum(n.bytes for n in found if n.path in protected or n.in_use or n.merging)
        if busy + room > max_bytes:
            room = 0  # it cannot fit even in an emptied folder: evict only what the budget demands
        for n in found if locked else ():
            if total + room <= max_bytes:
                break
            if n.path in protected or n.in_use or n.merging:
                continue
            if _busy_now(n.path):
                busy += n.bytes
                continue
            try:
                away = _take_away(cache_dir, n)
            except OSError:
                continue
            doomed.append((n, away))
            total -= n.bytes
    evicted = []
    for n, away in doomed:
        _delete(away)
        evicted.append(Eviction(n.fingerprint, n.bytes, n.last_used))
        logger.info(
            "cachedata: evicted namespace %s (last used %s) from %s: freed %s; the folder now uses %s "
            "of its disk budget of %s",
            n.fingerprint[:12],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(n.last_used)),
            cache_dir,
            format_size(n.bytes),
            format_size(total),
            format_size(max_bytes),
        )
    sweep_evicted(cache_dir)
    return Enforced(total, busy, tuple(evicted), bool(locked))


def remove(
    cache_dir: str | os.PathLike,
    namespaces: Sequence[Folder],
    *,
    unused_only: bool,
    wait: float = LOCK_WAIT_SECONDS,
) -> list[Removal]:
    """Remove the given namespaces of ``cache_dir``, in order; one Removal each.

    ``unused_only`` (``cachedata prune``): keep a namespace that a live process holds or
    merges, looked at again right before its removal; and remove nothing when the folder's
    lock cannot be taken within ``wait`` seconds, since leases cannot be trusted then.
    Otherwise (``cachedata clear``) remove them whoever uses them: a running job notices and
    computes its items again.
    """
    cache_dir = Path(cache_dir)
    mine = held_here()
    out: list[Removal] = []
    doomed: list[Path] = []
    with folder_lock(cache_dir, wait=wait) as locked:
        for n in namespaces:
            why = ""
            if unused_only:
                if not locked:
                    why = f"another process holds {cache_dir / '.budget.lock'}; try again"
                elif n.path in mine:
                    why = "in use by this process"
                else:
                    why = _busy_now(n.path)
            failed = False
            if not why:
                try:
                    doomed.append(_take_away(cache_dir, n))
                except FileNotFoundError:
                    pass  # gone already
                except OSError as exc:
                    why, failed = f"cannot rename it out of the folder: {exc}", True
            out.append(Removal(n.fingerprint, n.path, n.bytes, not why, why, failed))
    for away in doomed:
        _delete(away)
    sweep_evicted(cache_dir)
    return out


def _busy_now(path: str) -> str:
    """Why a namespace is in use right now (its live leases, a live merge lock), or ""."""
    live = [str(h) for h in holders(path) if h.live]
    if live:
        return f"in use by {', '.join(live)}"
    lock = Path(path) / MERGE_LOCK_NAME
    if lock.exists() and not lock_stale(lock):
        return "being merged"
    return ""


def _take_away(cache_dir: Path, n: Folder) -> Path:
    """Rename a namespace folder out of the listing in one step (a process opening it now sees
    all or nothing); OSError when it cannot (FileNotFoundError: it is gone already)."""
    away = cache_dir / f"{EVICTED_PREFIX}{time.time_ns()}-{n.fingerprint}"
    os.rename(n.path, away)
    return away


def _delete(away: Path) -> None:
    """Delete a namespace folder renamed out of the listing, safely for open readers.

    fileset.retire unlinks locally (an open descriptor keeps reading an unlinked file) and,
    on a network filesystem, renames each file to retired-* for sweep() to delete later,
    because another node's open file must still exist.
    """
    try:
        names = {e.name for e in os.scandir(away) if not e.is_dir(follow_symlinks=False)}
    except OSError:
        return
    retire(away, {n for n in names if not n.startswith("retired-")})
    if not shared_filesystem(away):
        shutil.rmtree(away, ignore_errors=True)


def sweep_evicted(cache_dir: str | os.PathLike) -> None:
    """Finish deleting evicted namespaces: those left by a killed process, and (on a network
    filesystem) those whose retired files are past their grace period."""
    try:
        entries = [e for e in os.scandir(os.fspath(cache_dir)) if e.name.startswith(EVICTED_PREFIX)]
    except OSError:
        return
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        _delete(Path(e.path))  # retires what a killed evictor left; sweeps what is old enough
        with contextlib.suppress(OSError):
            if not any(not x.is_dir(follow_symlinks=False) for x in os.scandir(e.path)):
                shutil.rmtree(e.path, ignore_errors=True)
