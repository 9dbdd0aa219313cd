"""One namespace folder as one process sees it: listing, reading, buffered writes, merging.

Folder layout (format version 1)::

    <cache_dir>/<fingerprint>/
        meta.json                       what produced the namespace (written once)
        schema.json                     the item structure, fixed by the first stored item
        last_used                       its mtime records the last use (touched hourly at most)
        shard-r<rank>-w<worker>-p<pid>-<token>-<seq>.h5   sealed per-process shards
        merged-<generation>.h5          consolidated file (the newest generation wins)
        merge.lock                      held while a process merges
        .tmp-*                          files being written (renamed into place when complete)

Every process writes only its own shards (one writer per file, no locks on the hot path);
readers union the newest merged file with the shards it does not already contain. All
state here is per process: it is dropped when pickled and rebuilt when the pid changes.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import multiprocessing.util
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from . import buffers, metadata
from . import schema as schema_mod
from .index import Index
from .storage import MAP_BELOW, CorruptFile, FileIndex, checksum, read_index, write_file

logger = logging.getLogger("cachedata")

_SHARD_RE = re.compile(r"^shard-r(\d+)-w(\w+)-p(\d+)-([0-9a-f]+)-(\d+)\.h5$")
_MERGED_RE = re.compile(r"^merged-(\d+)\.h5$")
#: The main process seals its buffer at these sizes (items, bytes) or after this many seconds.
#: The bytes bound is what a cold pass adds to the training process's memory; 64 MiB already
#: amortizes a file's creation and fsync (256 MiB measured no faster and held 190 MB more).
_MAIN_SEAL = (4096, 64 * 1024 * 1024, 30.0)
#: A worker on the single-item path seals at these sizes; batched calls seal every batch.
_WORKER_SEAL = (64, 64 * 1024 * 1024, 1.0)
#: More shards than this and the main process merges even an incomplete namespace.
MAX_SHARDS = 256
#: merge() reads about this many bytes per batch into one reused buffer.
_MERGE_BATCH_BYTES = 32 * 1024 * 1024
#: A merge lock older than this (seconds) whose owner cannot be checked is considered stale.
_LOCK_STALE_SECONDS = 3600.0
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


class Store:
    """Reads and writes one namespace folder for the current process."""

    def __init__(
        self, path: Path, fingerprint: str, *, compression: str | None, dense_size: int | None
    ) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.compression = compression
        self.dense_size = dense_size
        # Local files are memory-mapped for reading; on a network filesystem another node may
        # delete a file under a map (see storage.Reader), so those are read with preadv.
        self.map_files = not shared_filesystem(path)
        self._reset()

    # -- process-local state --------------------------------------------------------------

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.schema: dict | None = None
        self.schema_text = ""
        self.decoder: schema_mod.Decoder | None = None
        self.index: Index | None = None
        self._merged: str | None = None  # name of the merged file the index is built on
        self._seen: set[str] = set()  # file names already loaded or skipped
        self._bad: set[str] = set()  # files that failed to load (warned once)
        self.buffer = _Buffer(self)
        self.pending = self.buffer.items  # key -> (encoded item, checksum); never rebound
        self.inherited: dict[int, tuple[schema_mod.Encoded, int]] = {}  # a fork parent's unsealed items
        self._finalizer: multiprocessing.util.Finalize | None = None
        self.writable = True
        self._warned_write = False
        self._last_used = 0.0
        self.rng_checks_left = 16
        self._vanished = False
        self.shard_count = 0

    def __getstate__(self) -> dict:
        return {
            k: getattr(self, k) for k in ("path", "fingerprint", "compression", "dense_size", "map_files")
        }

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
            sweep(self.path)  # leftovers of killed writers
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
        if self.schema is not None:
            return True
        text, _ = metadata.load_schema(self.path, self.fingerprint)  # repairs a damaged schema.json
        if text is None:
            return False
        self._set_schema(text)
        return True

    def _set_schema(self, text: str) -> None:
        self.schema = schema_mod.load(text)
        self.schema_text = schema_mod.dumps(self.schema)
        self.decoder = schema_mod.Decoder(self.schema)

    def check_schema(self, enc: schema_mod.Encoded) -> str | None:
        """Fix the namespace schema with the first item, then describe any difference."""
        if self.schema is None and not self._load_schema():
            text = schema_mod.dumps(enc.schema)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                _create_once(self.path / "schema.json", text)
            except FileExistsError:
                pass  # another process fixed it first; compare against theirs below
            except OSError:
                self._set_schema(text)  # read-only: this process's items still must agree
                return None
            if not self._load_schema():
                self._set_schema(text)
        return schema_mod.difference(self.schema, enc.schema)

    # -- listing and the index --------------------------------------------------------------

    def _listing(self) -> tuple[str | None, list[str]]:
        merged: list[tuple[int, str]] = []
        shards: list[str] = []
        try:
            with os.scandir(self.path) as it:
                for e in it:
                    name = e.name
                    if e.is_symlink():
                        # Cache files are only ever created in place; a link may lead outside.
                        if name not in self._bad and (_SHARD_RE.match(name) or _MERGED_RE.match(name)):
                            self._bad.add(name)
                            logger.warning(
                                "cachedata: ignoring symbolic link %s in the cache", self.path / name
                            )
                        continue
                    if _SHARD_RE.match(name):
                        shards.append(name)
                    else:
                        m = _MERGED_RE.match(name)
                        if m:
                            merged.append((int(m.group(1)), name))
        except FileNotFoundError:
            pass
        return (max(merged)[1] if merged else None), sorted(shards)

    def refresh(self) -> bool:
        """Load files that appeared since the last look; True when anything changed.

        A file that vanishes between listing and opening was merged meanwhile: look again
        (a few times) so that a stale listing recovers on its own.
        """
        changed = False
        for _ in range(4):
            self._vanished = False
            changed |= self._refresh_once()
            if not self._vanished:
                break
        return changed

    def _refresh_once(self) -> bool:
        self.check_pid()
        newest, shards = self._listing()
        self.shard_count = len(shards)  # as of this listing: lets housekeeping skip another one
        changed = False
        if self.index is None or newest != self._merged:
            if self.index is not None:
                self.index.close()
            if not self._load_schema():
                if not shards and newest is None:
                    self.index = None
                    return False
                self._schema_from_files(newest, shards)
                if self.schema is None:
                    return False
            self.index = Index(
                nslots=self.decoder.nslots, dense_size=self.dense_size, map_files=self.map_files
            )
            self._seen = set()
            self._merged = newest
            changed = True
            if newest is not None:
                fi = self._load(newest)
                if fi is not None:
                    self._seen.update(fi.sources)
        for name in shards:
            if name not in self._seen:
                self._load(name, override=True)  # shards are newer than the merged file
                changed = True
        return changed

    def _schema_from_files(self, newest: str | None, shards: list[str]) -> None:
        """schema.json is missing (deleted?): adopt the schema of the first readable file."""
        for name in ([newest] if newest else []) + shards:
            try:
                fi = read_index(self.path / name, namespace=self.fingerprint)
                self._set_schema(fi.schema)
                return
            except (CorruptFile, ValueError):
                continue

    def _load(self, name: str, *, override: bool = False) -> FileIndex | None:
        self._seen.add(name)
        try:
            fi = read_index(self.path / name, namespace=self.fingerprint)
            if schema_mod.dumps(schema_mod.load(fi.schema)) != self.schema_text:
                raise CorruptFile(f"{self.path / name}: its item schema differs from the namespace's")
            if fi.slots.shape[1] != self.decoder.nslots:
                raise CorruptFile(
                    f"{self.path / name}: {fi.slots.shape[1]} slots per item, expected {self.decoder.nslots}"
                )
        except FileNotFoundError:
            self._vanished = True  # merged and removed between listing and opening
            return None
        except (CorruptFile, ValueError) as exc:
            if not (self.path / name).exists():
                return None
            if name not in self._bad:
                self._bad.add(name)
                logger.warning(
                    "cachedata: ignoring unreadable cache file (its items will be recomputed): %s", exc
                )
            return None
        self.index.add(fi, override=override)
        return fi

    def lookup(self, key: int) -> int:
        """Row of ``key`` in the index, or -1 (also -1 before anything is on disk)."""
        return self.index.row(key) if self.index is not None else -1

    def lookups(self, keys: list[int]) -> list[int]:
        """Rows of many keys at once (-1 where missing)."""
        if self.index is None:
            return [-1] * len(keys)
        if len(keys) < 8:
            return [self.index.row(k) for k in keys]
        return self.index.rows(np.asarray(keys, np.int64)).tolist()

    def read(
        self, rows: list[int], keys: list[int], *, arena: np.ndarray | None = None
    ) -> list[tuple[bytearray | np.ndarray, list[int]] | None]:
        """Payload buffers and slots for index rows; None where the checksum fails.

        The checksum is ``storage.checksum`` inlined: this loop is the hot path of every hit.
        With ``arena`` (uint8, at least the rows' total size) the payloads are consecutive
        slices of it instead of fresh buffers: merge reuses one arena for every batch,
        because fresh large buffers cost a page fault per 4 KiB on every batch.
        """
        idx = self.index
        out: list[tuple[bytearray | np.ndarray, list[int]] | None] = []
        files = idx.file[rows].tolist()
        offsets = idx.offset[rows].tolist()
        sizes = idx.size[rows].tolist()
        sums = idx.checksum[rows].tolist()
        slot_rows = idx.slots[rows]
        slots = slot_rows.tolist()
        blob = slot_rows.astype("<i8", copy=False).tobytes()
        width = 8 * slot_rows.shape[1]
        readers = idx.readers
        digest = xxhash.xxh3_64_intdigest
        pid = os.getpid()
        preadv = os.preadv
        at = 0
        for i, (f, off, n, want, s, key) in enumerate(zip(files, offsets, sizes, sums, slots, keys)):
            reader = readers[f]
            try:
                if reader.pid != pid:
                    reader.open()
                view = reader.view
                if view is not None and arena is None and n < MAP_BELOW:
                    # The common small hit: one copy out of the map into a fresh writable buffer.
                    buf = bytearray(view[off : off + n])
                    if len(buf) != n:
                        raise CorruptFile(f"{reader.path}: short read of {n} bytes at {off}")
                else:
                    if arena is not None:  # merge: read once, so preadv, not the map
                        buf = arena[at : at + n]
                        at += n
                    else:  # large (or a network filesystem): see buffers.empty
                        buf = buffers.empty(n)
                    if reader.compressed:
                        reader.read_into(memoryview(buf), off)
                    elif n and preadv(reader.fd, [buf], reader.data_offset + off) != n:
                        raise CorruptFile(f"{reader.path}: short read of {n} bytes at {off}")
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):
                    # Merged away (or, on NFS, a stale handle) before this process opened
                    # it: refresh() finds the newer file.
                    self._vanished = True
                else:
                    self._bad_item(reader.path, key, exc)
                out.append(None)
                continue
            except CorruptFile as exc:
                self._bad_item(reader.path, key, exc)
                out.append(None)
                continue
            seed = key & 0xFFFFFFFFFFFFFFFF
            if width:
                seed ^= digest(blob[i * width : (i + 1) * width])
            if digest(buf, seed=seed) != want:
                self._bad_item(reader.path, key, "checksum mismatch")
                out.append(None)
                continue
            out.append((buf, s))
        return out

    def read_one(self, row: int, key: int) -> tuple[bytearray | np.ndarray, list[int]] | None:
        """``read`` for a single row, without the batch's vectorized column gathering."""
        idx = self.index
        reader = idx.readers[idx.file[row]]
        n = int(idx.size[row])
        slot_row = idx.slots[row]
        buf = buffers.empty(n)
        try:
            if reader.pid != os.getpid():
                reader.open()
            reader.read_into(memoryview(buf), int(idx.offset[row]))
        except (OSError, CorruptFile):
            return None  # the batched path sorts out vanished and corrupt files
        slots = slot_row.tolist()
        if checksum(key, buf, slots) != int(idx.checksum[row]):
            return None
        return buf, slots

    def bad_item(self, key: int, why: Any) -> None:
        """An item that read back but could not be decoded: forget it and warn once per file."""
        row = self.lookup(key)
        path = self.index.readers[int(self.index.file[row])].path if row >= 0 else self.path
        self._bad_item(path, key, why)

    def _bad_item(self, path: Path, key: int, why: Any) -> None:
        self.index.discard(key)
        if path.name not in self._bad:
            self._bad.add(path.name)
            logger.warning(
                "cachedata: corrupt data in %s (%s); affected items are recomputed and rewritten", path, why
            )

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
        items, nbytes, seconds = _WORKER_SEAL if worker else _MAIN_SEAL
        buf = self.buffer
        return bool(buf.items) and (
            len(buf.items) >= items or buf.nbytes >= nbytes or time.monotonic() - buf.since >= seconds
        )

    def seal(self, ident: Identity) -> tuple[int, int]:
        """Write the buffer as a new shard; returns (items, bytes) written."""
        self.check_pid()
        if not self.buffer.items:
            return 0, 0
        self.buffer.ident = ident
        try:
            fi = self.buffer.write()
        except Exception as exc:  # a failed write (ENOSPC, EFBIG, EROFS, HDF5) must not stop training
            self.disable_writes(exc)
            return 0, 0
        if fi is None:
            return 0, 0
        if self.index is None:
            self.refresh()
        if self.index is not None and fi.path.name not in self._seen:
            self._seen.add(fi.path.name)
            self.index.add(fi, override=True)  # fresh bytes replace any bad older copy
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

    # -- merging --------------------------------------------------------------------------

    def merge(self, ident: Identity, *, wait: float = 60.0, progress: bool = False) -> bool:
        """Consolidate the newest merged file and every shard into a new merged file.

        Safe while other processes read: sources are removed only after the new file is in
        place, and readers holding them open keep reading (POSIX keeps unlinked files alive).
        Returns False when there was nothing to merge or another process holds the lock.
        """
        self.seal(ident)
        lock = self.path / "merge.lock"
        if not _acquire(lock, wait=wait):
            logger.info("cachedata: another process is merging %s; skipping", self.path)
            return False
        try:
            self.refresh()
            idx = self.index
            if idx is None:
                return False
            newest, _ = self._listing()
            sources = [n for n in idx.names if n == newest or _SHARD_RE.match(n)]
            if len(sources) <= 1 and (not sources or sources[0] == newest):
                return False
            keys = idx.keys()
            rows = idx.rows(keys)
            gen = int(_MERGED_RE.match(newest).group(1)) + 1 if newest else 1
            target = self.path / f"merged-{gen:06d}.h5"
            payloads = self._verified(rows, keys, progress=progress)
            write_file(
                target,
                kind="merged",
                namespace=self.fingerprint,
                schema=self.schema_text,
                keys=keys,
                sizes=idx.size[rows],
                checksums=idx.checksum[rows],
                slots=idx.slots[rows],
                payloads=payloads,
                compression=self.compression,
                sources=tuple(sources),
            )
            # Remove what the new file supersedes: its sources, shards that an older merged
            # file already held, unreadable files, and older generations. Shards that
            # appeared after the refresh above are not in _seen and stay.
            stale = set(sources) | {n for n in self._seen if _SHARD_RE.match(n)}
            stale |= {n for n in os.listdir(self.path) if _MERGED_RE.match(n) and n < target.name}
            _retire(self.path, stale)
            self.refresh()
            logger.info("cachedata: merged %d files (%d items) into %s", len(sources), len(keys), target.name)
            return True
        finally:
            _release(lock)

    def _verified(self, rows: np.ndarray, keys: np.ndarray, *, progress: bool):
        """Yield each row's payload, or None when it fails its checksum (dropped on merge).

        Rows are read in batches of at most 256 rows or _MERGE_BATCH_BYTES into one reused
        arena; each payload is valid until the next batch, which is all write_file needs
        (it copies or writes every payload before asking for the next).
        """
        sizes = self.index.size[rows]
        bar = _progress(len(rows), "merging", progress)
        arena = np.empty(0, np.uint8)
        try:
            lo = 0
            while lo < len(rows):
                ends = np.cumsum(sizes[lo : lo + 256])
                hi = lo + max(1, int(np.searchsorted(ends, _MERGE_BATCH_BYTES, side="right")))
                need = int(ends[hi - lo - 1])
                if arena.size < need:
                    arena = np.empty(need, np.uint8)
                part = self.read(rows[lo:hi].tolist(), keys[lo:hi].tolist(), arena=arena)
                for item in part:
                    yield None if item is None else item[0]
                bar.update(len(part))
                lo = hi
        finally:
            bar.close()

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
        """Write and clear the buffered items; None when there is nothing to write."""
        if not self.items or self.pid != os.getpid():
            return None
        items = list(self.items.items())
        self.clear()
        keys = np.fromiter((k for k, _ in items), np.int64, len(items))
        encs = [e for _, (e, _) in items]
        sizes = np.fromiter((len(e.payload) for e in encs), np.int64, len(encs))
        sums = np.fromiter((c for _, (_, c) in items), np.uint64, len(encs))
        nslots = len(encs[0].slots)
        slots = np.asarray([e.slots for e in encs], np.int64).reshape(len(encs), nslots)
        name = f"shard-{self.ident.tag}-{self.token}-{self.seq:06d}.h5"
        self.seq += 1
        return write_file(
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
        )


def _seal_at_exit(buf: _Buffer) -> None:
    n = len(buf.items)
    try:
        buf.write()
    except Exception as exc:  # exit paths must not raise
        logger.warning(
            "cachedata: cannot write to %s (%s); %d items computed in this run are not stored",
            buf.store["path"],
            exc,
            n,
        )


#: Superseded files stay (renamed) this long, in seconds, for readers on other nodes.
RETIRE_SECONDS = 600.0
_RETIRED_RE = re.compile(r"^retired-(\d+)-")
_TMP_RE = re.compile(r"^\.tmp-(.+?)-(\d+)-[0-9a-f]{8}-")


def _retire(folder: Path, names: set[str]) -> None:
    """Take superseded files out of the listing without deleting them yet.

    A reader that still has one open keeps reading it: locally an unlinked file would do,
    but on NFS another client's open file must still exist (or its reads fail with ESTALE).
    Renamed files are deleted by a later merge once older than RETIRE_SECONDS.
    """
    stamp = time.time_ns()
    keep = shared_filesystem(folder)
    for name in names:
        try:
            if keep:
                os.replace(folder / name, folder / f"retired-{stamp}-{name}")
            else:
                os.unlink(folder / name)  # local: open descriptors keep an unlinked file alive
        except FileNotFoundError:
            pass
    sweep(folder)


#: Filesystem types where another machine may hold a file open (checked in /proc/self/mounts).
_NETWORK_FS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "9p",
    "fuse",
)


def shared_filesystem(path: Path) -> bool:
    """True when ``path`` lives on a network filesystem (or CACHEDATA_SHARED_FS=1 says so)."""
    forced = os.environ.get("CACHEDATA_SHARED_FS")
    if forced is not None:
        return forced not in ("", "0", "false", "no")
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, fstype = parts[1], parts[2]
    except OSError:
        return False
    return fstype.startswith(_NETWORK_FS)


def sweep(folder: Path, *, retire_seconds: float = RETIRE_SECONDS) -> list[str]:
    """Delete retired files past their grace period and temporary files of dead writers."""
    removed = []
    now = time.time()
    host = socket.gethostname()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _RETIRED_RE.match(e.name)
        dead = False
        if m:
            dead = now - int(m.group(1)) / 1e9 > retire_seconds
        else:
            t = _TMP_RE.match(e.name)
            if t:
                try:
                    age = now - e.stat().st_mtime
                except OSError:
                    continue
                same_host = t.group(1) == host
                dead = (same_host and not _alive(int(t.group(2)))) or age > _LOCK_STALE_SECONDS
        if dead:
            try:
                os.unlink(e.path)
                removed.append(e.name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


def _create_once(path: Path, text: str) -> None:
    """Create ``path`` with ``text`` unless it exists (FileExistsError), atomically.

    A hard link of a complete temporary file is atomic and exclusive, also on NFS.
    """
    tmp = path.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}-{path.name}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _acquire(lock: Path, *, wait: float) -> bool:
    """Take the merge lock (an exclusively created file naming its owner); False on timeout."""
    deadline = time.monotonic() + wait
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    while True:
        try:
            _create_once(lock, me)
            return True
        except FileExistsError:
            if _stale(lock):
                lock.unlink(missing_ok=True)
                continue
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _stale(lock: Path) -> bool:
    """A lock whose owner died on this host, or older than an hour, may be broken."""
    try:
        owner = json.loads(lock.read_text())
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OSError):
            return False
        return False
    return age > _LOCK_STALE_SECONDS


def _release(lock: Path) -> None:
    try:
        owner = json.loads(lock.read_text())
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            lock.unlink()
    except (OSError, ValueError):
        pass
