"""One namespace folder as one process sees it: the store that CachedDataset, warm and the CLI use.

The interface is small: ``count``, ``contains``/``has`` (presence), ``get_one``,
``get_many``, ``put``, ``seal_due``/``seal``, ``consolidate``, ``destroy``, and
``check_files`` for ``cachedata verify``. Behind it, the file format lives in ``storage``
(payload reads in ``payloads``), the set of files and the merge plan in ``fileset``, the shared
index in ``index``, what this process has loaded and the read path in ``view``, unsealed
items in ``shards`` and merging in ``compaction``. Every process writes only its own shards
(one writer per file, no locks on the hot path); readers see the union of runs and shards.
All state here is per process: it is dropped when pickled and rebuilt when the pid changes.
See ``fileset`` for the folder layout.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import buffers, compaction, fileset, metadata, scrub
from . import schema as schema_mod
from .faults import transient, warn_transient
from .scrub import FileCheck
from .shards import Buffer, Identity
from .view import View

logger = logging.getLogger("cachedata")

#: The longest a DataLoader worker waits for merges to catch up after one seal, in seconds.
STALL_SECONDS = 120.0
_LAST_USED_EVERY = 3600.0
#: A transient failure to seal keeps the items for the next try, up to this many.
_RETRY_ITEMS = 4 * 4096


class ReadOnlyError(Exception):
    """The namespace folder cannot be written."""


class Store:
    """Reads and writes one namespace folder for the current process."""

    def __init__(self, path: Path, fingerprint: str, *, compression: str | None) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.compression = compression
        self.map_files = not fileset.shared_filesystem(path)
        self._reset()

    # -- process-local state --------------------------------------------------------------

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.view = View(self.path, self.fingerprint, map_files=self.map_files)
        self.buffer = Buffer(self.path, self.fingerprint, self.compression)
        self.inherited: dict[int, tuple[schema_mod.Encoded, int]] = {}  # a fork parent's unsealed items
        self._writable = True
        self._warned_write = False
        self._last_used = 0.0
        self.background = compaction.Background(self._target)

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("path", "fingerprint", "compression", "map_files")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def check_pid(self) -> None:
        """After a fork, forget the parent's handles; its unsealed items stay readable here
        (read-only: the parent seals them), so a worker forked after a num_workers=0 epoch
        does not recompute them."""
        if self.pid != os.getpid():
            self.view.close()
            inherited = {**self.inherited, **self.buffer.items}
            self._reset()
            self.inherited = inherited

    @property
    def writable(self) -> bool:
        """False once writes stopped for this run (read-only folder, full disk, disk budget)."""
        return self._writable

    @property
    def schema_text(self) -> str:
        """The namespace's item schema as JSON ("" until known)."""
        return self.view.schema_text

    @property
    def unsealed(self) -> tuple[int, int]:
        """(items, payload bytes) this process computed and has not sealed yet."""
        return len(self.buffer.items), self.buffer.nbytes

    def _buffered(self, key: int) -> schema_mod.Encoded | None:
        """An item computed but not sealed yet: by this process, or by the parent it forked from."""
        got = self.buffer.items.get(key) or self.inherited.get(key)
        return got[0] if got is not None else None

    def _target(self) -> compaction.Target | None:
        return self.view.target(self.compression)

    # -- the folder -----------------------------------------------------------------------

    def create(self, meta: dict) -> None:
        """Create the folder and meta.json if missing; ReadOnlyError when that is impossible."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            metadata.ensure_meta(self.path, meta)  # creates it, or repairs a damaged one
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"no write permission on {self.path}")
            fileset.sweep(self.path)  # leftovers of killed writers
        except OSError as exc:
            raise ReadOnlyError(str(exc)) from exc

    def touch(self) -> None:
        """Record a use in ``last_used``'s mtime, at most once an hour per process."""
        now = time.time()
        if now - self._last_used < _LAST_USED_EVERY:
            return
        self._last_used = now
        try:
            (self.path / "last_used").touch()
        except OSError:
            pass  # a read-only cache still serves reads

    def refresh(self) -> bool:
        """Load the files other processes wrote since the last look; True when anything changed."""
        self.check_pid()
        return self.view.refresh()

    # -- presence ---------------------------------------------------------------------------

    def count(self) -> int:
        """Distinct items on disk (as loaded) plus this process's unsealed ones."""
        self.refresh()
        index = self.view.index
        on_disk = index.count if index is not None else 0
        pending = self.buffer.items
        if not pending:
            return on_disk
        keys = np.fromiter(pending.keys(), np.int64, len(pending))
        return on_disk + int((~self.view.contains(keys)).sum())

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which keys are served without computing: on disk (as loaded) or unsealed here."""
        self.check_pid()
        keys = np.asarray(keys, np.int64)
        have = self.view.contains(keys)
        unsealed = [*self.buffer.items, *self.inherited]
        if unsealed:
            have |= np.isin(keys, np.asarray(unsealed, np.int64))
        return have

    def has(self, key: int) -> bool:
        """Whether ``key`` is served without computing, looking at the folder again if needed."""
        self.check_pid()
        if self._buffered(key) is not None or self.view.find(key) is not None:
            return True
        self.refresh()
        return self.view.find(key) is not None

    # -- reading ------------------------------------------------------------------------------

    def get_one(self, key: int) -> tuple[Any, int] | None:
        """(item, payload bytes) of ``key`` from the files already loaded, or None: then ask
        ``get_many``, which also looks for new files and unsealed items. The single-item hot path."""
        view = self.view
        if view.index is None or view.pid != os.getpid():
            return None
        got = view.read_one(key)
        if got is None:
            return None
        try:
            item = view.decoder.decode(got[0], 0, got[1])
        except (ValueError, RuntimeError) as exc:  # shapes that do not fit the bytes
            view.bad_item(None, key, exc)
            return None
        self.touch()
        return item, len(got[0])

    def get_many(self, keys: list[int]) -> tuple[list[Any], list[int], int]:
        """(items, missing positions, payload bytes read) for ``keys``; items are None where missing.

        Looks again at the folder while keys are missing and new files appeared (another process
        sealed or merged meanwhile), and serves unsealed items of this process and its fork
        parent. A payload that fails its checksum or does not decode is missing (and recomputed).
        """
        self.check_pid()
        view = self.view
        if view.index is None:
            view.refresh()
        out: list[Any] = [None] * len(keys)
        todo = list(range(len(keys)))
        nbytes = 0
        for attempt in range(3):
            if attempt and not view.refresh():
                break
            decode = view.decoder.decode if view.decoder is not None else None
            missing = []
            for p, got in zip(todo, view.read_many([keys[p] for p in todo])):
                if got is not None:
                    try:
                        out[p] = decode(got[0], 0, got[1])
                    except (ValueError, RuntimeError) as exc:  # shapes that do not fit the bytes
                        view.bad_item(None, keys[p], exc)
                        missing.append(p)
                        continue
                    nbytes += len(got[0])
                elif (enc := self._buffered(keys[p])) is not None:
                    out[p] = view.decoder.decode(buffers.copy(enc.payload), 0, enc.slots)
                    nbytes += len(enc.payload)
                else:
                    missing.append(p)
            todo = missing
            if not todo:
                break
        if len(todo) < len(keys):
            self.touch()
        return out, todo, nbytes

    def check_files(
        self, *, grow: Callable[[int], None] | None = None, progress: Callable[[int], None] | None = None
    ) -> list[FileCheck]:
        """Read every item of every data file and check it (``cachedata verify``); see
        ``scrub.check_namespace``. A report only: nothing is discarded or retired."""
        self.check_pid()
        return scrub.check_namespace(self.view, grow=grow, progress=progress)

    # -- writing --------------------------------------------------------------------------

    def put(self, key: int, value: Any, ident: Identity, *, where: object) -> Any:
        """Encode ``value``, check it against the namespace's item schema, and buffer it for the
        next seal (when writable). Returns the item as a read gives it back, so that a computed
        item and a cached one look the same. ``where`` names the item in errors."""
        try:
            enc = schema_mod.encode(value)
        except schema_mod.UnstorableError as exc:
            raise TypeError(f"item {where} {exc}") from None
        view = self.view
        diff = view.fix_schema(enc)
        if diff:
            raise ValueError(
                f"item {where} {diff}; every item of a namespace must have the same structure "
                "and dtypes (items already cached are kept)"
            )
        if self._writable:
            self.buffer.add(key, enc, ident, view.schema_text, owner=self)
        return view.decoder.decode(buffers.copy(enc.payload), 0, enc.slots)

    def seal_due(self, *, batched: bool, worker: bool, distributed: bool) -> bool:
        """Whether to seal now, after computing items: the sealing policy in one place.

        A DataLoader worker seals every batch: another worker may be asked for these items in
        the next epoch (persistent workers never exit between epochs). So does a rank's main
        process reading batches without workers: the next epoch's sampler gives its items to
        other ranks. While merges lag behind (a cold pass writing faster than the disk can
        rewrite) they seal by size and time instead (at most a second later), so files stay
        few; so does everyone else (``shards.WORKER_SEAL``, ``shards.MAIN_SEAL``).
        """
        if not self.buffer.items:
            return False
        if batched and (worker or distributed) and not self.background.overdue:
            return True
        return self.buffer.due(worker=worker)

    def seal(self, ident: Identity) -> tuple[int, int]:
        """Write the buffer as a new shard and start a background merge when one is due;
        returns (items, bytes) written. A DataLoader worker then waits for merges that lag
        behind (``compaction.Background.catch_up``); the training loop never does."""
        self.check_pid()
        if not self.buffer.items:
            return 0, 0
        self.buffer.ident = ident
        try:
            fi = self.buffer.write()
        except Exception as exc:  # a failed write (ENOSPC, EFBIG, EROFS, HDF5) must not stop training
            if transient(exc) and len(self.buffer.items) < _RETRY_ITEMS:
                warn_transient(self.path, exc)  # too many open files, no memory: try again at the next seal
            else:
                self.disable_writes(exc)
            return 0, 0
        if fi is None:
            return 0, 0
        self.view.add(fi)
        self.background.poke()
        if ident.worker is not None and self._writable:
            self.background.catch_up(STALL_SECONDS)
        return len(fi.keys), int(fi.sizes.sum())

    def stop_writes(self) -> None:
        """Stop writing for this run without a warning (the caller says why, once)."""
        self._writable = False
        self.buffer.clear()

    def disable_writes(self, exc: BaseException) -> None:
        """Stop writing for this run (disk full, read-only folder): warn once, keep serving."""
        self.stop_writes()
        if not self._warned_write:
            self._warned_write = True
            logger.warning(
                "cachedata: cannot write to %s (%s); items are computed but not stored for the rest of this run",
                self.path,
                exc,
            )

    # -- consolidating --------------------------------------------------------------------------

    def consolidate(
        self, ident: Identity, *, wait: float = 60.0, full: bool = False, progress: bool = False
    ) -> bool:
        """Seal, then merge every shard into one run (``full``: every file into one) and keep
        the runs within their budget (``compaction.Background.merge_now``); True when a file
        was written. Safe while other processes read: sources are removed only after the new
        file is in place, and readers holding them open keep reading (POSIX keeps unlinked
        files alive)."""
        self.seal(ident)
        self.refresh()
        done = self.background.merge_now(full=full, wait=wait, progress=progress)
        self.refresh()
        return done

    def poke(self) -> None:
        """Start a background merge if one is due (cheap; rate-limited)."""
        if self._writable:
            self.background.poke()

    def destroy(self) -> None:
        """Delete the namespace folder (readers elsewhere keep what they have open)."""
        self.buffer.clear()  # unsealed items belong to the namespace being deleted
        self.inherited.clear()
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._reset()

    def close(self) -> None:
        """Close this process's files; the next read opens them again."""
        self.view.close()
