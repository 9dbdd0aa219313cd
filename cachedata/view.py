"""What one process has loaded of a namespace: its item schema, its files' index, the read path.

``View`` lists the folder (``refresh``), loads each new file's index (``storage.read_index``,
checked against the namespace schema) into the shared ``index.Index``, and reads payloads
(``read_many``, ``read_one``) through each file's ``payloads.Reader``, checking every
payload against its checksum. A file that fails to load as malformed is ignored (its items
are recomputed); an environmental failure (too many open files, ...) is no corruption: the
file stays and is tried again. Per process: ``namespace.Store`` builds a new one after a fork.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from . import compaction, fileset, metadata, storage
from . import schema as schema_mod
from .faults import CorruptFileError, TransientError, transient, warn_once, warn_transient
from .index import Index, Segment
from .storage import FileIndex, read_checked, read_index

logger = logging.getLogger("cachedata")

Payload = tuple[Any, list[int]]  # (a writable buffer: bytearray or uint8 array, slots)


class View:
    """One process's view of one namespace folder (see the module docstring)."""

    def __init__(self, path: Path, fingerprint: str, *, map_files: bool) -> None:
        self.path = path
        self.fingerprint = fingerprint
        # Local files are memory-mapped for reading; on a network filesystem another node may
        # delete a file under a map (see payloads.Reader), so those are read with preadv.
        self.map_files = map_files
        self.pid = os.getpid()
        self.schema: dict | None = None
        self.schema_text = ""
        self.decoder: schema_mod.Decoder | None = None
        self.index: Index | None = None
        self._bad_files: set[str] = set()  # files that failed to load as malformed (warned once)
        self.vanished = False  # a file left between listing and reading: refresh() again

    # -- the item schema ----------------------------------------------------------------------

    def load_schema(self) -> bool:
        """Read schema.json (repairing a damaged one) unless known; False when there is none."""
        if self.schema is not None and self.decoder is not None:
            return True
        text, _ = metadata.load_schema(self.path, self.fingerprint)
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

    def fix_schema(self, enc: schema_mod.Encoded) -> str | None:
        """Fix the namespace schema with the first item, then describe any difference."""
        if self.schema is None and not self.load_schema():
            text = schema_mod.dumps(enc.schema)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fileset.create_once(self.path / "schema.json", text)
            except FileExistsError:
                pass  # another process fixed it first; compare against theirs below
            except OSError:
                self._set_schema(text)  # read-only: this process's items still must agree
                return None
            if not self.load_schema():
                self._set_schema(text)
        return schema_mod.difference(self.schema, enc.schema)

    def schema_from_files(self, names: list[str]) -> None:
        """schema.json is missing or damaged: adopt the schema of the first readable file."""
        for name in names:
            try:
                fi = read_index(self.path / name, namespace=self.fingerprint)
                self._set_schema(fi.schema)
                return
            except (CorruptFileError, TransientError, FileNotFoundError, ValueError):
                continue

    def target(self, compression: str | None) -> compaction.Target | None:
        """What merges need to know of this namespace; None until its item schema is known."""
        if self.schema is None and not self.load_schema():
            return None
        return compaction.Target(
            self.path, self.fingerprint, self.schema_text, self.decoder.nslots, compression
        )

    def checked_index(self, name: str) -> FileIndex:
        """A file's index, checked against the namespace's schema (CorruptFileError when it differs)."""
        return read_checked(
            self.path / name, namespace=self.fingerprint, schema=self.schema_text, nslots=self.decoder.nslots
        )

    # -- listing ------------------------------------------------------------------------------

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
                warn_transient(self.path, exc)  # keep what is loaded; look again next time
                return changed
            if not self.vanished:
                break
        return changed

    def _refresh_once(self) -> bool:
        listing = fileset.list_files(self.path)
        for name in listing.links:
            if name not in self._bad_files:
                self._bad_files.add(name)
                logger.warning("cachedata: ignoring symbolic link %s in the cache", self.path / name)
        names = [f.name for f in listing.files]
        if self.index is None:
            if not self.load_schema():
                if not names:
                    return False
                self.schema_from_files(names)
                if self.schema is None:
                    return False
            self.index = Index(nslots=self.decoder.nslots, map_files=self.map_files)
        idx = self.index
        changed = False
        for name in idx.names - set(names):
            idx.remove(name)  # merged away: its items are in a newer run
            changed = True
        # Runs first (largest hold most keys), then shards.
        for name in names:
            if name not in idx.by_name and name not in self._bad_files:
                changed |= self._load(name)
        return changed

    def _load(self, name: str) -> bool:
        try:
            fi = self.checked_index(name)
        except FileNotFoundError:
            self.vanished = True  # merged and removed between listing and opening
            return False
        except TransientError as exc:
            # Not corruption: the file stays, and the next refresh tries it again.
            warn_transient(self.path, exc)
            return False
        except CorruptFileError as exc:
            if not (self.path / name).exists():
                return False
            self._bad_files.add(name)
            logger.warning(
                "cachedata: ignoring unreadable cache file (its items will be recomputed): %s", exc
            )
            return False
        if self.index is not None:
            self.index.add(fi)
        return True

    def add(self, fi: FileIndex) -> None:
        """A file this process has just written (fresh bytes: also what replaces a bad copy)."""
        if self.index is None:
            self.refresh()
        if self.index is not None and fi.path.name not in self.index.by_name:
            self.index.add(fi)

    # -- presence -----------------------------------------------------------------------------

    def find(self, key: int) -> tuple[Segment, int] | None:
        """(segment, row) of ``key`` in the loaded files, or None."""
        return self.index.find(key) if self.index is not None else None

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which keys the loaded files serve."""
        if self.index is None:
            return np.zeros(len(keys), bool)
        return self.index.contains(np.asarray(keys, np.int64))

    # -- reading ------------------------------------------------------------------------------

    def read_many(self, keys: list[int]) -> list[Payload | None]:
        """Payload buffers and slots of ``keys``; None where absent or failing its checksum.

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
        reader = seg.reader
        try:
            if reader.pid != self.pid:
                self._open(seg)
        except OSError as exc:
            self._read_failed(seg, None, exc)
            return
        read = reader.read
        digest = xxhash.xxh3_64_intdigest
        slots = fi.slots[rows]
        got_keys = [keys[p] for p in where]
        for p, key, off, n, want, seed, s in zip(
            where, got_keys, fi.offsets[rows].tolist(), fi.sizes[rows].tolist(),
            fi.checksums[rows].tolist(), storage.seeds(got_keys, slots), slots.tolist(),
        ):  # fmt: skip
            try:
                buf = read(off, n)
            except (OSError, CorruptFileError) as exc:
                self._read_failed(seg, key, exc)
                continue
            if digest(buf, seed=seed) != want:
                self.bad_item(seg, key, "checksum mismatch")
                continue
            out[p] = (buf, s)

    def read_one(self, key: int) -> Payload | None:
        """``read_many`` for one key, without the batch's vectorized column gathering."""
        found = self.find(key)
        if found is None:
            return None
        seg, row = found
        fi = seg.fi
        try:
            if seg.reader.pid != self.pid:
                self._open(seg)
            buf = seg.reader.read(fi.offsets.item(row), fi.sizes.item(row))
        except (OSError, CorruptFileError):
            return None  # the batched path sorts out vanished, transient and corrupt files
        slots = fi.slots[row].tolist()
        if storage.checksum(key, buf, slots) != fi.checksums.item(row):
            return None
        return buf, slots

    def _open(self, seg: Segment) -> None:
        """Open a file's reader; out of descriptors, close this process's other files and retry."""
        try:
            seg.reader.open()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            warn_transient(self.path, exc)
            for other in self.index.segments if self.index is not None else ():
                if other is not seg:
                    other.reader.close()  # reopened on their next read
            seg.reader.open()
        if seg.reader.map_error is not None and transient(seg.reader.map_error):
            warn_transient(self.path, seg.reader.map_error)  # slower reads with preadv, nothing lost
        if self.index is not None:
            self.index.opened(seg)

    def _read_failed(self, seg: Segment, key: int | None, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ESTALE):
            # Merged away (or, on NFS, a stale handle) before this process opened it:
            # refresh() finds the newer file.
            self.vanished = True
        elif transient(exc):
            warn_transient(self.path, exc)  # served by recomputing; the file stays
        elif key is not None:
            self.bad_item(seg, key, exc)

    def bad_item(self, seg: Segment | None, key: int, why: Any) -> None:
        """An item that failed its checksum or could not be decoded: stop serving it from that
        file in this process (it is recomputed and rewritten) and warn once per file."""
        if seg is None:
            found = self.find(key)
            if found is None:
                return
            seg = found[0]
        if self.index is not None:
            self.index.discard(seg, key)
        warn_once(
            "corrupt:" + seg.fi.path.name, self.path,
            "cachedata: corrupt data in %s (%s); affected items are recomputed and rewritten",
            seg.fi.path, why,
        )  # fmt: skip

    def close(self) -> None:
        """Close this process's readers (a forked child only forgets its parent's)."""
        if self.index is not None:
            self.index.close()
        self.index = None
