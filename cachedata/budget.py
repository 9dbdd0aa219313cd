"""The disk budget of a cache folder: its setting, leases, usage, and least-recently-used eviction.

A budget caps the bytes of all namespaces under one ``cache_dir`` together. It comes from
``CachedDataset(max_bytes=)``, else ``$CACHEDATA_MAX_BYTES``, else the folder's settings file
(``cachedata-settings.json``, written by ``cachedata budget PATH SIZE``), else there is none.

It is enforced at moments that already touch files, never on the read path: when a
CachedDataset opens its namespace, before any process (DataLoader workers included) seals a
shard, and after a merge. A process looks at the whole folder at most every CHECK_SECONDS,
or sooner when its next shard would cross the budget (its own namespace is listed before
every seal, so a run's DataLoader workers see each other's shards). When the folder
is over budget, the least recently used namespaces (``last_used``'s mtime, else meta.json's)
that no live process holds are removed, oldest first, one INFO line each. When what is left
is still over (the namespaces in use alone exceed the budget), the run stops storing new
items and keeps serving what it has, with one WARNING; it never evicts its own namespaces.

"In use" is a *lease*: a file ``lease-<host>-<pid>-<token>.json`` in the namespace folder,
taken when a CachedDataset opens, its mtime refreshed by the main process at housekeeping
moments (``len()`` at each epoch, its own seals, merges; at most every
LEASE_REFRESH_SECONDS), removed when the dataset is collected or the process exits. A lease
of this host counts while its process lives (``os.kill(pid, 0)`` and the process start time,
so a recycled pid does not count); a lease of another host sharing the filesystem counts
for LEASE_SECONDS after its last refresh.

Concurrency: enforcers and lease takers serialize on ``<cache_dir>/.budget.lock`` (held for
a folder scan and a few renames, never while deleting). An enforcer re-reads a namespace's
leases right before it renames the folder out of the listing to ``.evicted-<time>-<fp>``
(atomic: a concurrent reader sees the whole namespace or none of it), then deletes it
outside the lock through the same path as merges retire files (``fileset.retire``):
locally the files are unlinked and open readers keep reading; on a network filesystem they
are renamed and deleted RETIRE_SECONDS later, because another node's open file must exist.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileset import (
    RUN_RE,
    SHARD_RE,
    acquire_lock,
    alive,
    create_once,
    lock_stale,
    release_lock,
    retire,
    shared_filesystem,
)
from .namespace import ReadOnly, Store
from .units import format_size, parse_size

logger = logging.getLogger("cachedata")

#: The environment variable that sets a default budget (a size like ``50G``; ``none`` or ``off``: no budget).
ENV_VAR = "CACHEDATA_MAX_BYTES"
#: The settings file in a cache folder (JSON, ``{"max_bytes": <bytes>}``).
SETTINGS_NAME = "cachedata-settings.json"
#: A lease of another host counts as in use for this long (seconds) after its last refresh.
#: The main process refreshes at every epoch start (``len()``), so it must exceed an epoch.
LEASE_SECONDS = 6 * 3600.0
#: The main process refreshes its lease at most this often (seconds).
LEASE_REFRESH_SECONDS = 60.0
#: A process looks at the whole folder (a scan of every namespace folder, reading only lease
#: files) at most this often (seconds), unless the other namespaces' bytes at its last look
#: plus its own namespace's bytes now (one folder listing before each seal, so that the
#: run's DataLoader workers see each other's shards) plus the shard to write cross the
#: budget. Other runs' writes within this window may take the folder over its budget until
#: the next look; processes sealing at the same moment can each overshoot by one shard.
CHECK_SECONDS = 10.0
#: How long (seconds) a lease taker waits for the folder's budget lock (at construction).
LOCK_WAIT_SECONDS = 10.0
#: How long (seconds) a process about to seal waits for it (it retries CHECK_SECONDS later).
CHECK_LOCK_WAIT_SECONDS = 2.0

#: A shard's file size beyond its payload: about 8.5 KiB of HDF5 structure plus 56 bytes of
#: index per item (measured with h5py 3); rounded up so that estimates err on the safe side.
SHARD_FIXED_BYTES = 9 * 1024
SHARD_ITEM_BYTES = 64

_LOCK_NAME = ".budget.lock"
_LEASE_RE = re.compile(r"^lease-.+\.json$")
_EVICTED_PREFIX = ".evicted-"
_OFF = ("none", "off")

#: Namespaces leased by live CachedDatasets of this process (path -> count): never evicted by
#: this process, even if their lease files were removed from under it.
_HELD: dict[str, int] = {}
_warned: set[str] = set()


class BudgetExceeded(Exception):
    """The namespaces in use alone exceed the cache folder's budget (the message says by how much)."""


# ============================================================================ the setting


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

    Written as a temporary file in the same folder, then renamed over the old one: every
    process reads the old or the new settings, never half a file. Other settings are kept.
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
    tmp = folder / f".tmp-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}-{SETTINGS_NAME}"
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
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


# ============================================================================ leases


@dataclass(frozen=True)
class Holder:
    """One lease on a namespace: which process holds it, and whether it still counts."""

    host: str
    pid: int
    refreshed: float  # the lease file's mtime (Unix seconds)
    live: bool
    file: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    rest = data[data.rfind(b")") + 2 :].split()
    return rest[19].decode() if len(rest) > 19 else None


def holders(path: str | os.PathLike, *, now: float | None = None) -> list[Holder]:
    """Every lease file in a namespace folder, live or not."""
    out: list[Holder] = []
    try:
        entries = [e for e in os.scandir(path) if _LEASE_RE.match(e.name)]
    except OSError:
        return out
    host = socket.gethostname()
    now = time.time() if now is None else now
    for e in entries:
        try:
            refreshed = e.stat(follow_symlinks=False).st_mtime
            owner = json.loads(Path(e.path).read_text())
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError):
            owner = {}
        if not isinstance(owner, dict):
            owner = {}
        who, pid, start = str(owner.get("host") or "?"), owner.get("pid"), owner.get("start")
        if not isinstance(pid, int) or isinstance(pid, bool):
            pid = -1
        if who == host and pid > 0:
            # Same host: the process itself answers; its start time tells a recycled pid apart.
            live = alive(pid) and (start is None or _start_time(pid) in (None, start))
        else:
            live = now - refreshed < LEASE_SECONDS
        out.append(Holder(who, pid, refreshed, live, e.name))
    return out


@contextlib.contextmanager
def folder_lock(cache_dir: str | os.PathLike, *, wait: float) -> Iterator[bool]:
    """Hold ``<cache_dir>/.budget.lock`` inside the block; yields False when it could not be
    taken within ``wait`` seconds or the folder is read-only.

    Lease takers hold it while they create a lease, enforcers while they pick namespaces and
    rename them away: so no namespace is renamed away after a process leased it. A lock left
    by a dead process is broken (same rules as merge.lock).
    """
    lock = Path(cache_dir) / _LOCK_NAME
    try:
        got = acquire_lock(lock, wait=wait)
    except OSError:
        got = False
    try:
        yield got
    finally:
        if got:
            release_lock(lock)


def _drop_lease(file: Path, key: str, owner: int) -> None:
    """Finalizer of a Lease: remove its files and forget the namespace (only in its owner)."""
    if os.getpid() != owner:
        return  # a forked child collecting its copy: the lease is its parent's
    for p in (file, file.with_suffix(".stopped")):
        with contextlib.suppress(OSError):
            p.unlink()
    left = _HELD.get(key, 0) - 1
    if left > 0:
        _HELD[key] = left
    else:
        _HELD.pop(key, None)


class Lease:
    """This process's claim on one namespace folder: a file there that says "in use".

    Copies pickled into other processes (DataLoader workers) know its name but do not own it:
    only the owner refreshes it and removes it (when collected or at exit).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner = os.getpid()
        self.name = f"lease-{socket.gethostname()}-{self.owner}-{os.urandom(4).hex()}.json"
        self._refreshed = -math.inf
        key = str(path)
        _HELD[key] = _HELD.get(key, 0) + 1
        self._finalizer = weakref.finalize(self, _drop_lease, path / self.name, key, self.owner)

    @property
    def file(self) -> Path:
        return self.path / self.name

    @property
    def stopped_file(self) -> Path:
        """Created by the first process of this run that stops storing (see Tracker.stop)."""
        return self.file.with_suffix(".stopped")

    def __getstate__(self) -> dict:
        return {"path": self.path, "owner": self.owner, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._refreshed = -math.inf
        self._finalizer = None

    def take(self, *, recreate: Callable[[], None] | None = None) -> bool:
        """Create the lease file (and run ``recreate`` first) under the folder's budget lock;
        False when the folder is not writable (a read-only cache is never evicted by us)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        with folder_lock(self.path.parent, wait=LOCK_WAIT_SECONDS):
            # Without the lock (a busy or read-only folder) the lease is still worth taking.
            try:
                self.path.mkdir(exist_ok=True)
                if recreate is not None:
                    recreate()
                info = {"host": socket.gethostname(), "pid": self.owner, "start": _start_time(self.owner),
                        "created": time.time()}  # fmt: skip
                create_once(self.file, json.dumps(info))
            except FileExistsError:
                pass
            except OSError:
                return False
        self._refreshed = time.monotonic()
        return True

    def refresh(self, *, force: bool = False) -> bool:
        """Refresh the lease's mtime (owner only, at most every LEASE_REFRESH_SECONDS unless
        ``force``); True when the lease file is gone: the namespace was removed (evicted,
        cleared) by another process, and the caller should take it again."""
        if os.getpid() != self.owner:
            return False
        now = time.monotonic()
        if not force and now - self._refreshed < LEASE_REFRESH_SECONDS:
            return False
        self._refreshed = now
        try:
            os.utime(self.file)
        except FileNotFoundError:
            return True
        except OSError:
            pass  # a read-only folder
        return False


def held_here() -> set[str]:
    """Namespace folders leased by live CachedDatasets of this process."""
    return set(_HELD)


# ============================================================================ usage


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


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files directly in one namespace folder, retired ones left out."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(path) as it:
        for e in it:
            if not e.name.startswith("retired-"):
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_size
    return total


def namespace_usage(path: str | os.PathLike, *, now: float | None = None) -> NamespaceUsage | None:
    """Measure one folder; None when it is not a namespace (nothing cachedata wrote in it)."""
    path = Path(path)
    now = time.time() if now is None else now
    total, stamps, looks_like, merging = 0, {}, False, False
    try:
        entries = list(os.scandir(path))
    except OSError:
        return None
    for e in entries:
        name = e.name
        if name.startswith("retired-"):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                total += _tree_bytes(e.path)
                continue
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue  # merged away while we looked
        total += st.st_size
        if name in ("last_used", "meta.json"):
            stamps[name] = st.st_mtime
        if name == "merge.lock":
            merging = not lock_stale(Path(e.path))
        if name in ("meta.json", "schema.json") or SHARD_RE.match(name) or RUN_RE.match(name):
            looks_like = True
        elif _LEASE_RE.match(name):
            looks_like = True
    if not looks_like:
        return None
    last_used = stamps.get("last_used") or stamps.get("meta.json")
    if last_used is None:
        try:
            last_used = path.stat().st_mtime
        except OSError:
            last_used = now
    return NamespaceUsage(str(path), path.name, total, last_used, tuple(holders(path, now=now)), merging)


def measure(cache_dir: str | os.PathLike, *, now: float | None = None) -> list[NamespaceUsage]:
    """Every namespace under ``cache_dir``, least recently used first."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(cache_dir))
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


def usage(cache_dir: str | os.PathLike, explicit: Limit | None = None) -> Usage:
    """The folder, its namespaces and its budget, as ``cachedata info`` and ``budget`` show them."""
    pending = 0
    with contextlib.suppress(OSError), os.scandir(cache_dir) as it:
        for e in it:
            if e.name.startswith(_EVICTED_PREFIX) and e.is_dir(follow_symlinks=False):
                pending += _tree_bytes(e.path)
    return Usage(str(cache_dir), current_limit(cache_dir, explicit), tuple(measure(cache_dir)), pending)


# ============================================================================ eviction


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
            # Look again right before the rename: a process that gave up waiting for the lock
            # may have leased it since the scan.
            if any(h.live for h in holders(n.path)):
                busy += n.bytes
                continue
            away = cache_dir / f"{_EVICTED_PREFIX}{time.time_ns()}-{n.fingerprint}"
            try:
                # Out of the listing in one step: a process opening it now sees all or nothing.
                os.rename(n.path, away)
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
        entries = [e for e in os.scandir(cache_dir) if e.name.startswith(_EVICTED_PREFIX)]
    except OSError:
        return
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        _delete(Path(e.path))  # retires what a killed evictor left; sweeps what is old enough
        with contextlib.suppress(OSError):
            if not any(not x.is_dir(follow_symlinks=False) for x in os.scandir(e.path)):
                shutil.rmtree(e.path, ignore_errors=True)


# ============================================================================ one dataset's side


def shard_bytes(items: int, nbytes: int) -> int:
    """Estimated file size of a shard of ``items`` items with ``nbytes`` payload bytes."""
    return nbytes + SHARD_FIXED_BYTES + SHARD_ITEM_BYTES * items


class Tracker:
    """One CachedDataset's link to its folder's budget: its lease, the rate-limited checks,
    and the stop when the namespaces in use alone exceed the budget.

    Pickled into DataLoader workers with the dataset: a worker checks before its own seals
    (it does not own the lease).
    """

    def __init__(self, cache_dir: Path, path: Path, *, explicit: Limit | None) -> None:
        self.cache_dir = cache_dir
        self.path = path
        self.explicit = explicit
        self.lease = Lease(path)
        self.meta: dict | None = None  # to re-create the namespace after another process removed it
        self._reset()

    def _reset(self) -> None:
        self._checked = -math.inf  # monotonic time of the last full look
        self._limit: int | None = None
        self._usage = 0  # the folder's bytes at the last look
        self._others = 0  # of those, bytes outside this namespace
        self._in_use = 0  # of _usage, bytes that could not be evicted
        self.message: str | None = None  # why this process stopped storing

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("cache_dir", "path", "explicit", "lease", "meta")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def limit(self) -> Limit:
        """The budget in force now (re-read from the settings file unless set explicitly)."""
        return current_limit(self.cache_dir, self.explicit)

    def open(self, meta: dict) -> None:
        """At construction, before the namespace's files are created: lease it."""
        self.meta = meta
        self.lease.take()

    def check(self, *, room: int = 0) -> bool:
        """Enforce the budget when due; False when ``room`` more bytes do not fit even after
        evicting every namespace nobody uses.

        Due: at the first call in a process, every CHECK_SECONDS, and whenever the other
        namespaces' bytes at the last look plus this namespace's bytes now plus ``room``
        cross the budget.
        """
        now = time.monotonic()
        limit = self._limit
        if now - self._checked < CHECK_SECONDS:
            if limit is None or self._others + _folder_bytes(self.path) + room <= limit:
                return True
        self._checked = now
        self._limit = limit = self.limit.max_bytes
        if limit is None:
            return True
        got = enforce(self.cache_dir, limit, room=room, keep=(str(self.path),), wait=CHECK_LOCK_WAIT_SECONDS)
        if not got.locked:
            # Nothing could be evicted (another process holds the lock, maybe for a while): let
            # this write happen and look again CHECK_SECONDS later, not before every seal.
            self._others = -math.inf
            return True
        self._usage = got.bytes
        self._others = got.bytes - _folder_bytes(self.path)
        self._in_use = got.in_use_bytes
        return got.bytes + room <= limit

    def stopped(self) -> bool:
        """True when this run stopped storing because of the budget (in any of its processes)."""
        return self.message is not None or self.lease.stopped_file.exists()

    def before_seal(self, store: Store) -> bool:
        """Before this process seals its buffer (``flush()``, also before a merge): False (and
        writes stopped) when it would not fit. The main process refreshes its lease here too."""
        self.housekeeping(store)
        if not store.writable or not store.buffer.items:
            return True  # nothing to seal: Store.seal does nothing
        if self.message is None and self.lease.stopped_file.exists():
            # Another process of this run stopped already (and warned): follow it quietly.
            self.message = "stopped by another process of this run"
            store.writable = False
            store.buffer.clear()
            return False
        if not self.path.is_dir():  # removed by another process: make it again before writing
            if os.getpid() == self.lease.owner:
                self._reopen(store)
            else:
                self.recreate(store)
        room = shard_bytes(len(store.buffer.items), store.buffer.nbytes)
        if self.check(room=room):
            return True
        self.stop(store, room=room)
        return False

    def stop(self, store: Store, *, room: int) -> None:
        """Stop storing for the rest of the run: one WARNING for the whole run (the process
        that creates the run's ``.stopped`` file warns; the others follow quietly)."""
        limit = self._limit or 0
        need = self._in_use + room  # what the budget must be, with every unused namespace evicted
        budget, needed = format_size(limit), format_size(need)
        if budget == needed:  # too close to tell apart when rounded
            budget, needed = f"{limit} bytes", f"{need} bytes"
        self.message = (
            f"{self.cache_dir} is over its disk budget of {budget} ({self.limit.source}): "
            f"the namespaces in use need {needed} ({format_size(self._in_use)} stored, "
            f"{format_size(room)} more to store by this run); raise the budget to at least {needed} "
            f"(max_bytes=, ${ENV_VAR} or `cachedata budget {self.cache_dir} SIZE`)"
        )
        first = True
        try:
            fd = os.open(self.lease.stopped_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            first = False
        except OSError:
            pass  # cannot mark it: warn here
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.message + "\n")
        if first:
            store.disable_writes(BudgetExceeded(self.message))
        else:
            store.writable = False
            store.buffer.clear()

    def recreate(self, store: Store) -> None:
        """The namespace folder was removed by another process: create it again (meta.json,
        and schema.json when this process knows the schema) so that writes can go on."""
        try:
            store.create(self.meta or {"fingerprint": self.path.name})
        except ReadOnly:
            return
        if store.schema_text and not (self.path / "schema.json").exists():
            with contextlib.suppress(OSError):
                create_once(self.path / "schema.json", store.schema_text)

    def housekeeping(self, store: Store) -> bool:
        """Main process, at ``len()``, its seals and merges: refresh the lease. True when the
        namespace had been removed by another process: it is created and leased again, and the
        store's index (which points at files that are gone) is dropped to be rebuilt."""
        if not self.lease.refresh():
            return False
        self._reopen(store)
        return True

    def _reopen(self, store: Store) -> None:
        logger.info(
            "cachedata: namespace %s was removed by another process (evicted or cleared); "
            "its items are recomputed and stored again",
            self.path,
        )
        self.lease.take(recreate=lambda: self.recreate(store))
        store.close()

    def cleared(self) -> None:
        """After ``CachedDataset.clear()`` deleted the folder (lease included): lease it again."""
        self._reset()
        self.lease.take()
