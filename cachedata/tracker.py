"""One CachedDataset's side of its cache folder's disk budget: its lease, the checks, the stop.

The budget is enforced at moments that already touch files, never on the read path: when a
CachedDataset opens its namespace, before any process (DataLoader workers included) seals a
shard, and after a merge. A process looks at the whole folder at most every CHECK_SECONDS,
or sooner when its next shard would cross the budget (its own namespace is listed before
every seal, so a run's DataLoader workers see each other's shards). When the folder is over
budget, ``eviction.enforce`` removes the least recently used namespaces that no live process
holds. When what is left is still over (the namespaces in use alone exceed the budget), the
run stops storing new items and keeps serving what it has, with one WARNING; it never
evicts its own namespaces. See ``cachedata.budget`` for where the budget comes from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

from . import eviction, usage
from .budget import ENV_VAR, Limit, current_limit
from .fileset import create_once
from .leases import Lease
from .namespace import ReadOnlyError, Store
from .units import format_size

logger = logging.getLogger("cachedata")

#: A process looks at the whole folder (a scan of every namespace folder, reading only lease
#: files) at most this often (seconds), unless the other namespaces' bytes at its last look
#: plus its own namespace's bytes now (one folder listing before each seal, so that the
#: run's DataLoader workers see each other's shards) plus the shard to write cross the
#: budget. Other runs' writes within this window may take the folder over its budget until
#: the next look; processes sealing at the same moment can each overshoot by one shard.
CHECK_SECONDS = 10.0
#: How long (seconds) a process about to seal waits for the folder's lock (it retries
#: CHECK_SECONDS later).
CHECK_LOCK_WAIT_SECONDS = 2.0
#: A shard's file size beyond its payload: about 8.5 KiB of HDF5 structure plus 56 bytes of
#: index per item (measured with h5py 3); rounded up so that estimates err on the safe side.
SHARD_FIXED_BYTES = 9 * 1024
SHARD_ITEM_BYTES = 64


class BudgetExceededError(Exception):
    """The namespaces in use alone exceed the cache folder's budget (the message says by how much)."""


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
        self._others: float = 0  # of those, bytes outside this namespace (-inf: look again soon)
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
            if limit is None or self._others + usage.folder_bytes(self.path) + room <= limit:
                return True
        self._checked = now
        self._limit = limit = self.limit.max_bytes
        if limit is None:
            return True
        got = eviction.enforce(
            self.cache_dir, limit, room=room, keep=(str(self.path),), wait=CHECK_LOCK_WAIT_SECONDS
        )
        if not got.locked:
            # Nothing could be evicted (another process holds the lock, maybe for a while): let
            # this write happen and look again CHECK_SECONDS later, not before every seal.
            self._others = -math.inf
            return True
        self._usage = got.bytes
        self._others = got.bytes - usage.folder_bytes(self.path)
        self._in_use = got.in_use_bytes
        return got.bytes + room <= limit

    def stopped(self) -> bool:
        """True when this run stopped storing because of the budget (in any of its processes)."""
        return self.message is not None or self.lease.stopped_file.exists()

    def before_seal(self, store: Store) -> bool:
        """Before this process seals its buffer (``flush()``, also before a merge): False (and
        writes stopped) when it would not fit. The main process refreshes its lease here too."""
        self.housekeeping(store)
        if not store.writable or not store.unsealed[0]:
            return True  # nothing to seal: Store.seal does nothing
        if self.message is None and self.lease.stopped_file.exists():
            # Another process of this run stopped already (and warned): follow it quietly.
            self.message = "stopped by another process of this run"
            store.stop_writes()
            return False
        if not self.path.is_dir():  # removed by another process: make it again before writing
            if os.getpid() == self.lease.owner:
                self._reopen(store)
            else:
                self.recreate(store)
        room = shard_bytes(*store.unsealed)
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
            store.disable_writes(BudgetExceededError(self.message))
        else:
            store.stop_writes()

    def recreate(self, store: Store) -> None:
        """The namespace folder was removed by another process: create it again (meta.json,
        and schema.json when this process knows the schema) so that writes can go on."""
        try:
            store.create(self.meta or {"fingerprint": self.path.name})
        except ReadOnlyError:
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
