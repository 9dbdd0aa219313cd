"""Leases: which processes use a namespace, so that nobody evicts it from under them.

A lease is a file ``lease-<host>-<pid>-<token>.json`` in the namespace folder, taken when a
CachedDataset opens, its mtime refreshed by the main process at housekeeping moments
(``len()`` at each epoch, its own seals, merges; at most every LEASE_REFRESH_SECONDS),
removed when the dataset is collected or the process exits. A lease of this host counts
while its process lives (``os.kill(pid, 0)`` and the process start time, so a recycled pid
does not count); a lease of another host sharing the filesystem counts for LEASE_SECONDS
after its last refresh.

Lease takers and evictors (``cachedata.eviction``) serialize on ``<cache_dir>/.budget.lock``,
so no namespace is renamed away after a process leased it. Plain file-system work: no numpy,
no HDF5, so the command line reads leases without importing either.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .fileset import acquire_lock, alive, create_once, release_lock

#: A lease of another host counts as in use for this long (seconds) after its last refresh.
#: The main process refreshes at every epoch start (``len()``), so it must exceed an epoch.
LEASE_SECONDS = 6 * 3600.0
#: The main process refreshes its lease at most this often (seconds).
LEASE_REFRESH_SECONDS = 60.0
#: How long (seconds) a lease taker waits for the folder's budget lock (at construction).
LOCK_WAIT_SECONDS = 10.0
#: The cache folder's lock file, held while a process evicts or takes a lease.
LOCK_NAME = ".budget.lock"
LEASE_RE = re.compile(r"^lease-.+\.json$")

#: Namespaces leased by live CachedDatasets of this process (path -> count): never evicted by
#: this process, even if their lease files were removed from under it.
_HELD: dict[str, int] = {}


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
        entries = [e for e in os.scandir(os.fspath(path)) if LEASE_RE.match(e.name)]
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
    lock = Path(cache_dir) / LOCK_NAME
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
        self._finalizer: weakref.finalize | None = weakref.finalize(
            self, _drop_lease, path / self.name, key, self.owner
        )

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
