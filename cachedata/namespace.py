"""One namespace folder as one process sees it: the store that CachedDataset, warm and the CLI use.

The interface is small: ``count``, ``find``/``contains`` (presence), ``get_one``,
``get_many``, ``put``, ``seal``, ``consolidate``, ``destroy``, and ``check_files`` for
``cachedata verify``. Behind it, the file format
lives in ``storage``, the set of files and their tiers in ``fileset``, the shared index in
``index`` and merging in ``compaction``. Every process writes only its own shards (one
writer per file, no locks on the hot path); readers see the union of runs and shards. All
state here is per process: it is dropped when pickled and rebuilt when the pid changes.
See ``fileset`` for the folder layout.
"""

from __future__ import annotations

import atexit
import errno
import logging
import multiprocessing.util
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from . import buffers, compaction, fileset, metadata, scrub, storage
from . import schema as schema_mod
from .index import Index, Segment
from .scrub import FileCheck
from .storage import CorruptFile, FileIndex, TransientError, checksum, read_index, write_file

logger = logging.getLogger("cachedata")

#: The main process seals its buffer at these sizes (items, bytes) or after this many seconds.
#: The bytes bound is what a cold pass adds to the training process's memory; 64 MiB already
#: amortizes a file's creation (256 MiB measured no faster and held 190 MB more).
MAIN_SEAL = (4096, 64 * 1024 * 1024, 30.0)
#: A worker on the single-item path seals at these sizes; batched calls seal every batch.
WORKER_SEAL = (64, 64 * 1024 * 1024, 1.0)
#: The longest a DataLoader worker waits for merges to catch up after one seal, in seconds.
STALL_SECONDS = 120.0
_LAST_USED_EVERY = 3600.0


@dataclass(frozen=True)
class Identity:
    """Who writes: global rank, DataLoader worker id (None in the main process), pid."""

    rank: int
    worker: int | None
    pid: int

    @property
    def tag(self) -> str:
        return f"r{self.rank}-w{'m' if self.worker is None else self.worker}-p{self.pid}"


class ReadOnly(Exception):
    """The namespace folder cannot be written."""


Payload = tuple[bytearray | np.ndarray, list[int]]


class Store:
    """Reads and writes one namespace folder for the current process."""

    def __init__(self, path: Path, fingerprint: str, *, compression: str | None) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.compression = compression
        # Local files are memory-mapped for reading; on a network filesystem another node may
        # delete a file under a map (see storage.Reader), so those are read with preadv.
        self.map_files = not fileset.shared_filesystem(path)
        self._reset()

    # -- process-local state --------------------------------------------------------------

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.schema: dict | None = None
        self.schema_text = ""
        self.decoder: schema_mod.Decoder | None = None
        self.index: Index | None = None
        self._bad_files: set[str] = set()  # files that failed to load as malformed (warned once)
        self.buffer = _Buffer(self)
        self.pending = self.buffer.items  # key -> (encoded item, checksum); never rebound
        self.inherited: dict[int, tuple[schema_mod.Encoded, int]] = {}  # a fork parent's unsealed items
        self._finalizer: multiprocessing.util.Finalize | None = None
        self.writable = True
        self._warned_write = False
        self._last_used = 0.0
        self.vanished = False  # a file left between listing and reading: refresh() again
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
            if self.index is not None:
                self.index.close()
            inherited = {**self.inherited, **self.buffer.items}
            self._reset()
            self.inherited = inherited

    def buffered(self, key: int) -> schema_mod.Encoded | None:
        """An item computed but not sealed yet: by this process, or by the parent it forked from."""
        got = self.pending.get(key) or self.inherited.get(key)
        return got[0] if got is not None else None

    # -- namespace files ------------------------------------------------------------------

    def create(self, meta: dict) -> None:
        """Create the folder and meta.json if missing; ReadOnly when that is impossible."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            metadata.ensure_meta(self.path, meta)  # creates it, or repairs a damaged one
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"no write permission on {self.path}")
            fileset.sweep(self.path)  # leftovers of killed writers
        except OSError as exc:
            raise ReadOnly(str(exc)) from exc

    def meta(self) -> dict:
        return metadata.read_meta(self.path)

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

    def _load_schema(self) -> bool:
        if self.schema is not None and self.decoder is not None:
            return True
        text, _ = metadata.load_schema(self.path, self.fingerprint)  # repairs a damaged schema.json
        if text is None:
            return False
        self._set_schema(text)
        return True

    def _set_schema(self, text: str) -> None:
        schema = schema_mod.load(text)
        decoder = schema_mod.Decoder(schema)
        self.schema_text = schema_mod.dumps(schema)
        self.decoder = decoder
        self.schema = schema  # last: "is the schema known" is asked of this attribute

    def check_schema(self, enc: schema_mod.Encoded) -> str | None:
        """Fix the namespace schema with the first item, then describe any difference."""
        if self.schema is None and not self._load_schema():
            text = schema_mod.dumps(enc.schema)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fileset.create_once(self.path / "schema.json", text)
            except FileExistsError:
                pass  # another process fixed it first; compare against theirs below
            except OSError:
                self._set_schema(text)  # read-only: this process's items still must agree
                return None
            if not self._load_schema():
                self._set_schema(text)
        return schema_mod.difference(self.schema, enc.schema)

    def _target(self) -> compaction.Target | None:
        if self.schema is None and not self._load_schema():
            return None
        return compaction.Target(
            self.path, self.fingerprint, self.schema_text, self.decoder.nslots, self.compression
        )

    # -- listing and the index --------------------------------------------------------------

    def refresh(self) -> bool:
        """Load files that appeared since the last look and drop those that left; True when
        anything changed. A file that vanishes between listing and opening was merged
        meanwhile: look again (a few times) so that a stale listing recovers on its own."""
        changed = False
        for _ in range(4):
            self.vanished = False
            try:
                changed |= self._refresh_once()
            except fileset.ListingError as exc:
                self.warn_transient(exc)  # keep what is loaded; look again next time
                return changed
            if not self.vanished:
                break
        return changed

    def _refresh_once(self) -> bool:
        self.check_pid()
        listing = fileset.list_files(self.path)
        for name in listing.links:
            if name not in self._bad_files:
                self._bad_files.add(name)
                logger.warning("cachedata: ignoring symbolic link %s in the cache", self.path / name)
        names = [f.name for f in listing.files]
        if self.index is None:
            if not self._load_schema():
                if not names:
                    return False
                self._schema_from_files(names)
                if self.schema is None:
                    return False
            self.index = Index(nslots=self.decoder.nslots, map_files=self.map_files)
        idx = self.index
        changed = False
        present = set(names)
        for name in idx.names - present:
            idx.remove(name)  # merged away: its items are in a newer run
            changed = True
        # Runs first (largest hold most keys), then shards.
        for name in names:
            if name not in idx.by_name and name not in self._bad_files:
                changed |= self._load(name)
        return changed

    def _schema_from_files(self, names: list[str]) -> None:
        """schema.json is missing or damaged: adopt the schema of the first readable file."""
        for name in names:
            try:
                fi = read_index(self.path / name, namespace=self.fingerprint)
                self._set_schema(fi.schema)
                return
            except (CorruptFile, TransientError, FileNotFoundError, ValueError):
                continue

    def _checked_index(self, name: str) -> FileIndex:
        """A file's index, checked against the namespace's schema (CorruptFile when it differs)."""
        fi = read_index(self.path / name, namespace=self.fingerprint)
        if schema_mod.dumps(schema_mod.load(fi.schema)) != self.schema_text:
            raise CorruptFile(f"{self.path / name}: its item schema differs from the namespace's")
        if fi.slots.shape[1] != self.decoder.nslots:
            raise CorruptFile(
                f"{self.path / name}: {fi.slots.shape[1]} slots per item, expected {self.decoder.nslots}"
            )
        return fi

    def _load(self, name: str) -> bool:
        try:
            fi = self._checked_index(name)
        except FileNotFoundError:
            self.vanished = True  # merged and removed between listing and opening
            return False
        except TransientError as exc:
            # Not corruption: the file stays, and the next refresh tries it again.
            self.warn_transient(exc)
            return False
        except (CorruptFile, ValueError) as exc:
            if not (self.path / name).exists():
                return False
            self._bad_files.add(name)
            logger.warning(
                "cachedata: ignoring unreadable cache file (its items will be recomputed): %s", exc
            )
            return False
        self.index.add(fi)
        return True

    def warn_transient(self, exc: BaseException) -> None:
        compaction.warn_once(
            "transient", self.path,
            "cachedata: %s: %s. Nothing is lost: the files stay, and the work is retried or "
            "deferred (an item that cannot be read now is recomputed). Raise %s.",
            self.path, exc, storage.limit_hint(exc),
        )  # fmt: skip

    # -- presence --------------------------------------------------------------------------

    def find(self, key: int) -> tuple[Segment, int] | None:
        """(segment, row) of ``key`` in the loaded files, or None."""
        return self.index.find(key) if self.index is not None else None

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which keys the loaded files serve (buffered items not included)."""
        if self.index is None:
            return np.zeros(len(keys), bool)
        return self.index.contains(np.asarray(keys, np.int64))

    def count(self) -> int:
        """Distinct items on disk (as loaded) plus this process's unsealed ones."""
        self.refresh()
        on_disk = self.index.count if self.index is not None else 0
        if not self.pending:
            return on_disk
        keys = np.fromiter(self.pending.keys(), np.int64, len(self.pending))
        return on_disk + int((~self.contains(keys)).sum())

    # -- reading ------------------------------------------------------------------------------

    def get_many(self, keys: list[int]) -> list[Payload | None]:
        """Payload buffers and slots of ``keys``; None where absent or failing its checksum.

        The checksum is ``storage.checksum`` inlined: this loop is the hot path of every hit.
        Sets ``vanished`` when a file disappeared under the listing (refresh and retry).
        """
        out: list[Payload | None] = [None] * len(keys)
        idx = self.index
        if idx is None or not keys:
            return out
        todo = np.arange(len(keys))
        for _ in range(len(idx.segments)):
            discards = idx.discards
            seg_of, rows = idx.find_many(np.asarray(keys, np.int64)[todo])
            if (seg_of == seg_of[0]).all():  # the common case: one file serves the whole batch
                groups = [(int(seg_of[0]), np.arange(len(todo)))] if seg_of[0] >= 0 else []
            else:
                groups = [(int(s), np.flatnonzero(seg_of == s)) for s in np.unique(seg_of) if s >= 0]
            for s, where in groups:
                self._read_segment(idx.segments[s], rows[where], todo[where].tolist(), keys, out)
            if idx.discards == discards:
                break
            # Rows failed their checksum: another file may hold a good copy (a rewrite).
            todo = np.asarray([p for p in todo.tolist() if out[p] is None], np.int64)
            if not len(todo):
                break
        return out

    def _read_segment(
        self, seg: Segment, rows: np.ndarray, where: list[int], keys: list[int], out: list
    ) -> None:
        fi = seg.fi
        offsets = fi.offsets[rows].tolist()
        sizes = fi.sizes[rows].tolist()
        sums = fi.checksums[rows].tolist()
        slot_rows = fi.slots[rows]
        slots = slot_rows.tolist()
        blob = slot_rows.astype("<i8", copy=False).tobytes()
        width = 8 * slot_rows.shape[1]
        reader = seg.reader
        digest = xxhash.xxh3_64_intdigest
        preadv = os.preadv
        try:
            if reader.pid != self.pid:
                self._open(seg)
        except OSError as exc:
            self._read_failed(seg, None, exc)
            return
        view = reader.view
        for i, (p, off, n, want, s) in enumerate(zip(where, offsets, sizes, sums, slots)):
            key = keys[p]
            try:
                if view is not None:
                    # A local file: one copy out of the map into a fresh writable buffer (a
                    # bytearray when small, a recycled one when large; see buffers.empty).
                    src = view[off : off + n]
                    if src.nbytes != n:
                        raise CorruptFile(f"{reader.path}: short read of {n} bytes at {off}")
                    if n < buffers.MIN_BYTES:
                        buf = bytearray(src)
                    else:
                        buf = buffers.take(n)  # type: ignore[assignment]  # a uint8 array: a buffer too
                        memoryview(buf)[:] = src
                else:  # a network filesystem (or a compressed file): see buffers.empty
                    buf = buffers.empty(n)
                    if reader.compressed:
                        reader.read_into(memoryview(buf), off)
                    elif n and preadv(reader.fd, [buf], reader.data_offset + off) != n:
                        raise CorruptFile(f"{reader.path}: short read of {n} bytes at {off}")
            except (OSError, CorruptFile) as exc:
                self._read_failed(seg, key, exc)
                continue
            seed = key & 0xFFFFFFFFFFFFFFFF
            if width:
                seed ^= digest(blob[i * width : (i + 1) * width])
            if digest(buf, seed=seed) != want:
                self.bad_item(seg, key, "checksum mismatch")
                continue
            out[p] = (buf, s)

    def _open(self, seg: Segment) -> None:
        """Open a file's reader; out of descriptors, close this process's other files and retry."""
        try:
            seg.reader.open()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.warn_transient(exc)
            for other in self.index.segments:
                if other is not seg:
                    other.reader.close()  # reopened on their next read
            seg.reader.open()
        if seg.reader.map_error is not None and storage.transient(seg.reader.map_error):
            self.warn_transient(seg.reader.map_error)  # slower reads with preadv, nothing lost
        self.index.opened(seg)

    def _read_failed(self, seg: Segment, key: int | None, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ESTALE):
            # Merged away (or, on NFS, a stale handle) before this process opened it:
            # refresh() finds the newer file.
            self.vanished = True
        elif storage.transient(exc):
            self.warn_transient(exc)  # served by recomputing; the file stays
        elif key is not None:
            self.bad_item(seg, key, exc)

    def get_one(self, key: int) -> Payload | None:
        """``get_many`` for one key, without the batch's vectorized column gathering."""
        found = self.find(key)
        if found is None:
            return None
        seg, row = found
        fi = seg.fi
        n = int(fi.sizes[row])
        buf = buffers.empty(n)
        try:
            if seg.reader.pid != self.pid:
                self._open(seg)
            seg.reader.read_into(memoryview(buf), int(fi.offsets[row]))
        except (OSError, CorruptFile):
            return None  # the batched path sorts out vanished, transient and corrupt files
        slots = fi.slots[row].tolist()
        if checksum(key, buf, slots) != int(fi.checksums[row]):
            return None
        return buf, slots

    def bad_item(self, seg: Segment | None, key: int, why: Any) -> None:
        """An item that failed its checksum or could not be decoded: stop serving it from that
        file in this process (it is recomputed and rewritten) and warn once per file."""
        if seg is None:
            found = self.find(key)
            if found is None:
                return
            seg = found[0]
        self.index.discard(seg, key)
        compaction.warn_once(
            "corrupt:" + seg.fi.path.name, self.path,
            "cachedata: corrupt data in %s (%s); affected items are recomputed and rewritten",
            seg.fi.path, why,
        )  # fmt: skip

    # -- checking ---------------------------------------------------------------------------

    def check_files(
        self, *, grow: Callable[[int], None] | None = None, progress: Callable[[int], None] | None = None
    ) -> list[FileCheck]:
        """Read every item of every data file and check it against its checksum (``cachedata verify``).

        A report only: nothing is discarded, retired or warned about. The folder is listed
        again until no new file appears (a merge running meanwhile writes one), four times at
        most; ``grow`` gets the rows of newly listed files before they are checked,
        ``progress`` the rows checked as it goes.
        """
        self.check_pid()
        if not self._load_schema():
            self._schema_from_files([f.name for f in fileset.list_files(self.path).files])
        done: set[str] = set()
        out: list[FileCheck] = []
        for _ in range(4):
            todo = [f.name for f in fileset.list_files(self.path).files if f.name not in done]
            if not todo:
                break
            done.update(todo)
            loaded: list[FileIndex] = []
            for name in todo:
                try:
                    if self.schema is None:
                        raise CorruptFile(f"{self.path / name}: no readable item schema in the namespace")
                    loaded.append(self._checked_index(name))
                except FileNotFoundError:
                    out.append(FileCheck(name, 0, (), vanished=True))
                except TransientError as exc:
                    out.append(FileCheck(name, 0, (), error=f"{exc}; raise {storage.limit_hint(exc)}"))
                except (CorruptFile, ValueError) as exc:
                    gone = not (self.path / name).exists()
                    why = f"unreadable file: {str(exc).removeprefix(f'{self.path / name}: ')}"
                    out.append(FileCheck(name, 0, () if gone else ((None, why),), vanished=gone))
            if grow is not None:
                grow(sum(len(fi) for fi in loaded))
            for fi in loaded:
                try:
                    bad = scrub.check_file(fi, map_file=self.map_files, progress=progress)
                except FileNotFoundError:
                    out.append(FileCheck(fi.path.name, 0, (), vanished=True))
                except TransientError as exc:
                    out.append(
                        FileCheck(fi.path.name, 0, (), error=f"{exc}; raise {storage.limit_hint(exc)}")
                    )
                else:
                    out.append(FileCheck(fi.path.name, len(fi), tuple(bad)))
        return out

    # -- writing --------------------------------------------------------------------------

    def put(self, key: int, enc: schema_mod.Encoded, ident: Identity) -> None:
        """Buffer one encoded item for the next seal (only when the folder is writable)."""
        if not self.writable:
            return
        buf = self.buffer
        if not buf.items:
            buf.since = time.monotonic()
        buf.items[key] = (enc, checksum(key, enc.payload, enc.slots))
        buf.nbytes += len(enc.payload)
        buf.ident = ident
        buf.schema_text = self.schema_text
        if self._finalizer is None:
            # Seal what is still buffered when this Store is collected or the process exits
            # (DataLoader workers exit through multiprocessing, which runs these too).
            self._finalizer = multiprocessing.util.Finalize(self, _seal_at_exit, args=(buf,), exitpriority=10)
            # In the main process, multiprocessing's exit hook runs after h5py has shut down
            # (atexit is last-in first-out): register here, after h5py's, to run before it.
            atexit.register(_seal_at_exit, buf)

    def should_seal(self, *, worker: bool) -> bool:
        items, nbytes, seconds = WORKER_SEAL if worker else MAIN_SEAL
        buf = self.buffer
        return bool(buf.items) and (
            len(buf.items) >= items or buf.nbytes >= nbytes or time.monotonic() - buf.since >= seconds
        )

    def seal(self, ident: Identity) -> tuple[int, int]:
        """Write the buffer as a new shard and start a background merge when one is due;
        returns (items, bytes) written."""
        self.check_pid()
        if not self.buffer.items:
            return 0, 0
        self.buffer.ident = ident
        try:
            fi = self.buffer.write()
        except Exception as exc:  # a failed write (ENOSPC, EFBIG, EROFS, HDF5) must not stop training
            if storage.transient(exc) and len(self.buffer.items) < 4 * MAIN_SEAL[0]:
                self.warn_transient(exc)  # too many open files, no memory: try again at the next seal
            else:
                self.disable_writes(exc)
            return 0, 0
        if fi is None:
            return 0, 0
        if self.index is None:
            self.refresh()
        if self.index is not None and fi.path.name not in self.index.by_name:
            self.index.add(fi)  # fresh bytes: also what replaces a bad older copy
        self.background.poke()
        return len(fi.keys), int(fi.sizes.sum())

    def disable_writes(self, exc: BaseException) -> None:
        """Stop writing for this run (disk full, read-only folder): warn once, keep serving."""
        self.writable = False
        self.buffer.clear()
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
        """Merge every shard into one run (``full``: every file into one), then keep the runs
        within their tiers. Waits up to ``wait`` seconds for a merge in another process.

        Safe while other processes read: sources are removed only after the new file is in
        place, and readers holding them open keep reading (POSIX keeps unlinked files alive).
        Returns True when a file was written.
        """
        self.seal(ident)
        self.refresh()
        target = self._target()
        if target is None:
            return False
        self.background.join()  # this process's own background merge holds the lock
        bar = progress_bar(
            sum(f.size for f in fileset.list_files(self.path).files), "merging", progress, unit="B"
        )
        try:
            done = compaction.consolidate(
                target, explicit=True, everything=full, wait=wait, progress=bar.update if progress else None
            )
        except TransientError as exc:
            self.warn_transient(exc)
            return False
        finally:
            bar.close()
        if done is None:
            logger.info("cachedata: another process is merging %s; skipping", self.path)
            return False
        self.refresh()
        return bool(done)

    def backlogged(self) -> bool:
        """True when merges lag behind writers (``fileset.overdue`` at the last look): writers
        then seal by size and time instead of every batch, so the file count stops growing
        faster than merges can take files in."""
        return self.background.overdue

    def keep_up(self) -> None:
        """Write stall, for writers that can wait (DataLoader workers, never the training loop).

        A cold pass with little transform cost writes as fast as the disk allows, and tiered
        merges must rewrite each byte a few times: the merges fall behind and files pile up
        for every later reader. When the folder is overdue (``fileset.overdue``) the worker
        merges here (or waits while another process does) until it is not, for at most
        STALL_SECONDS, so that writing slows to what the disk can also consolidate.
        """
        if not self.writable or not self.background.overdue:
            return
        target = self._target()
        if target is None:
            return
        deadline = time.monotonic() + STALL_SECONDS
        try:
            while fileset.overdue(fileset.list_files(self.path)):
                if time.monotonic() >= deadline:
                    return
                compaction.warn_once(
                    "stall", self.path,
                    "cachedata: merges of %s lag behind writers (a disk-bound pass); DataLoader "
                    "workers merge before writing on, so that files stay few",
                    self.path, level=logging.INFO,
                )  # fmt: skip
                self.background.join()  # this process's own merge holds the lock: let it finish
                if compaction.consolidate(target, explicit=False, everything=False, wait=0.0) is None:
                    time.sleep(0.05)  # another process is merging
        except (TransientError, fileset.ListingError) as exc:
            self.warn_transient(exc)  # out of descriptors and the like: write on, merge later
        self.background.overdue = False

    def poke(self) -> None:
        """Start a background merge if one is due (cheap; rate-limited)."""
        if self.writable:
            self.background.poke()

    def destroy(self) -> None:
        """Delete the namespace folder (readers elsewhere keep what they have open)."""
        self.buffer.clear()  # unsealed items belong to the namespace being deleted
        self.inherited.clear()
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._reset()

    def close(self) -> None:
        if self.index is not None and self.pid == os.getpid():
            self.index.close()
        self.index = None


class _Buffer:
    """One process's unsealed items, and how to write them as a shard.

    Kept apart from Store so that an exit-time finalizer can hold it without keeping the
    Store alive.
    """

    def __init__(self, store: Store) -> None:
        self.store = store.__getstate__()  # plain config: path, fingerprint, compression
        self.schema_text = ""
        self.pid = os.getpid()
        self.items: dict[int, tuple[schema_mod.Encoded, int]] = {}
        self.nbytes = 0
        self.since = 0.0
        self.token = os.urandom(3).hex()
        self.seq = 0
        self.ident = Identity(0, None, self.pid)

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0

    def write(self) -> FileIndex | None:
        """Write and clear the buffered items (sorted by key); None when there is nothing to write."""
        if not self.items or self.pid != os.getpid():
            return None
        items = sorted(self.items.items())
        keys = np.fromiter((k for k, _ in items), np.int64, len(items))
        encs = [e for _, (e, _) in items]
        sizes = np.fromiter((len(e.payload) for e in encs), np.int64, len(encs))
        sums = np.fromiter((c for _, (_, c) in items), np.uint64, len(encs))
        nslots = len(encs[0].slots)
        slots = np.asarray([e.slots for e in encs], np.int64).reshape(len(encs), nslots)
        name = f"shard-{self.ident.tag}-{self.token}-{self.seq:06d}.h5"
        self.seq += 1
        fi = write_file(
            self.store["path"] / name,
            kind="shard",
            namespace=self.store["fingerprint"],
            schema=self.schema_text,
            keys=keys,
            sizes=sizes,
            checksums=sums,
            slots=slots,
            payloads=(e.payload for e in encs),
            compression=self.store["compression"],
            durable=False,  # checksums catch a shard torn by a power cut; merges are fsynced
        )
        self.clear()  # only now: a failed write keeps the items for the next try
        return fi


def _seal_at_exit(buf: _Buffer) -> None:
    n = len(buf.items)
    try:
        buf.write()
    except Exception as exc:  # exit paths must not raise
        buf.clear()  # the process ends: a second exit hook must not try (and warn) again
        logger.warning(
            "cachedata: cannot write to %s (%s); %d items computed in this run are not stored",
            buf.store["path"],
            exc,
            n,
        )


def progress_bar(total: int, desc: str, enabled: bool, *, unit: str = "item"):
    """A tqdm bar counting ``unit`` ("item", or "B" for bytes), or a disabled one."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not enabled, leave=False)
