"""The HDF5 file format of shards and merged files (format version 1).

One file holds many items. Layout, readable with h5py alone::

    /data    uint8[total]   the items' payloads back to back (contiguous, or chunked when compressed)
    /index   compound[n]    key int64, offset uint64, size uint64, checksum uint64,
                            slots int64[S] (shapes and lengths, see cachedata.schema)
    attrs    cachedata_format=1, kind="shard"|"merged", namespace=<fingerprint>,
             schema=<JSON>, created=<unix seconds>, sources=<JSON list, merged files only>

``checksum`` is xxh3-64 of the payload seeded with the key XOR the xxh3-64 of the slots, so an
index row that points at another item's bytes, or carries a flipped shape, fails the check. Files are written under a temporary name in the
same folder and renamed into place once complete, so readers never see a torn file; a
sealed file is never modified again. Uncompressed payloads are read at the dataset's file
offset: small ones copied out of a read-only memory map, large ones (and all on network
filesystems) with ``os.preadv``. No HDF5 call and no lock on the hot path.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import xxhash

FORMAT_VERSION = 1
#: Compressed payloads live in chunks of this many bytes (random reads decompress one or two).
_CHUNK_BYTES = 64 * 1024
#: Copy block for streaming payloads into a file, in bytes.
_COPY_BYTES = 8 * 1024 * 1024
#: Payloads smaller than this many bytes are copied out of a file's memory map, where a system
#: call would cost more than the copy; larger ones are read with preadv (into buffers.take's
#: recycled buffers), which costs the same per byte and leaves the file's pages out of RSS.
MAP_BELOW = 64 * 1024


def checksum(key: int, payload: bytes | bytearray | memoryview, slots: Sequence[int] = ()) -> int:
    """xxh3-64 of ``payload`` seeded with ``key`` XOR xxh3-64 of ``slots`` (as little-endian int64).

    Binds the bytes to the item they belong to and to the shapes they are decoded with, so
    a flipped key, shape or payload byte all fail the check.
    """
    seed = key & 0xFFFFFFFFFFFFFFFF
    if slots:
        seed ^= xxhash.xxh3_64_intdigest(struct.pack(f"<{len(slots)}q", *slots))
    return xxhash.xxh3_64_intdigest(payload, seed=seed)


def index_dtype(nslots: int) -> np.dtype:
    """The compound dtype of ``/index`` for a schema with ``nslots`` slots per item."""
    fields = [("key", "<i8"), ("offset", "<u8"), ("size", "<u8"), ("checksum", "<u8")]
    if nslots:
        fields.append(("slots", "<i8", (nslots,)))
    return np.dtype(fields)


class CorruptFile(Exception):
    """A cache file that cannot be trusted (unreadable, inconsistent, or tampered with)."""


@dataclass(frozen=True)
class FileIndex:
    """What a reader needs from one file: its rows, schema text and where payloads start."""

    path: Path
    keys: np.ndarray  # int64[n]
    offsets: np.ndarray  # int64[n], relative to the data start
    sizes: np.ndarray  # int64[n]
    checksums: np.ndarray  # uint64[n]
    slots: np.ndarray  # int64[n, S]
    schema: str
    data_offset: int | None  # byte offset of /data in the file; None when compressed or empty
    compressed: bool
    kind: str
    sources: tuple[str, ...]


def write_file(
    path: Path,
    *,
    kind: str,
    namespace: str,
    schema: str,
    keys: np.ndarray,
    sizes: np.ndarray,
    checksums: np.ndarray,
    slots: np.ndarray,
    payloads: Iterable[bytes | bytearray | memoryview | None],
    compression: str | None,
    sources: tuple[str, ...] = (),
) -> FileIndex:
    """Write one complete file atomically: a temporary name, fsync, then ``os.replace``.

    ``payloads`` yields one buffer per row, in order, or None for a row to leave out (its
    bytes failed a check while being copied). The index is written after the payloads, so
    only rows whose bytes were written are listed. Returns the new file's index.
    """
    sizes = np.asarray(sizes, np.int64)
    offsets = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    total = int(sizes.sum())
    tmp = path.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}-{path.name}")
    try:
        with h5py.File(tmp, "w", locking=False) as f:
            if compression:
                data = f.create_dataset(
                    "data",
                    shape=(total,),
                    dtype=np.uint8,
                    chunks=(min(_CHUNK_BYTES, total),) if total else None,
                    compression=compression,
                )
                keep = _fill_h5(data, payloads, sizes)
                data_offset = None
            else:
                data_offset = _reserve_contiguous(f, total)
        if not compression:
            keep = _fill_raw(tmp, data_offset or 0, payloads, sizes)
        rows = np.zeros(int(keep.sum()), index_dtype(slots.shape[1]))
        rows["key"] = keys[keep]
        rows["offset"] = offsets[keep]
        rows["size"] = sizes[keep]
        rows["checksum"] = checksums[keep]
        if slots.shape[1]:
            rows["slots"] = slots[keep]
        with h5py.File(tmp, "r+", locking=False) as f:
            f.attrs["cachedata_format"] = FORMAT_VERSION
            f.attrs["kind"] = kind
            f.attrs["namespace"] = namespace
            f.attrs["schema"] = schema
            f.attrs["created"] = time.time()
            if kind == "merged":
                f.attrs["sources"] = json.dumps(list(sources))
            f.create_dataset("index", data=rows)
        _fsync_path(tmp)  # the rename below must not publish bytes still in flight
        os.replace(tmp, path)  # atomic: readers see the whole file or nothing
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return FileIndex(
        path=path,
        keys=rows["key"].astype(np.int64),
        offsets=rows["offset"].astype(np.int64),
        sizes=rows["size"].astype(np.int64),
        checksums=rows["checksum"].astype(np.uint64),
        slots=np.asarray(slots[keep], np.int64).reshape(len(rows), slots.shape[1]),
        schema=schema,
        data_offset=data_offset,
        compressed=bool(compression),
        kind=kind,
        sources=tuple(sources),
    )


def _reserve_contiguous(f: h5py.File, total: int) -> int | None:
    """Create /data with its space allocated now (no fill), and return its file offset."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # we write every byte ourselves below
    space = h5py.h5s.create_simple((total,))
    dset = h5py.h5d.create(f.id, b"data", h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl)
    return dset.get_offset() if total else None


def _fill_raw(path: Path, offset: int, payloads: Iterable, sizes: np.ndarray) -> np.ndarray:
    keep = np.zeros(len(sizes), bool)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        pos = offset
        for i, (p, size) in enumerate(zip(payloads, sizes.tolist())):
            if p is not None:
                keep[i] = True
                view = memoryview(p).cast("B")
                at = pos
                while view.nbytes:
                    w = os.pwrite(fd, view, at)
                    at += w
                    view = view[w:]
            pos += size  # a left-out row leaves a hole of its planned size
    finally:
        os.close(fd)
    return keep


def _fill_h5(data: h5py.Dataset, payloads: Iterable, sizes: np.ndarray) -> np.ndarray:
    keep = np.zeros(len(sizes), bool)
    pos = 0
    block = bytearray()
    for i, (p, size) in enumerate(zip(payloads, sizes.tolist())):
        if p is None:
            block += bytes(size)  # a left-out row leaves a hole of its planned size
        else:
            keep[i] = True
            block += memoryview(p).cast("B")  # (bytearray += ndarray would broadcast instead)
        if len(block) >= _COPY_BYTES:
            data[pos : pos + len(block)] = np.frombuffer(block, np.uint8)
            pos += len(block)
            block = bytearray()
    if block:
        data[pos : pos + len(block)] = np.frombuffer(block, np.uint8)
    return keep


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry itself)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def read_index(path: Path, *, namespace: str) -> FileIndex:
    """Load and validate one file's index; CorruptFile when it cannot be trusted."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("cachedata_format") != FORMAT_VERSION:
                raise CorruptFile(
                    f"{path}: format {f.attrs.get('cachedata_format')!r}, expected {FORMAT_VERSION}"
                )
            if _text(f.attrs.get("namespace")) != namespace:
                raise CorruptFile(f"{path}: belongs to namespace {_text(f.attrs.get('namespace'))!r}")
            for name in ("index", "data"):
                link = f.get(name, getlink=True)
                if not isinstance(link, h5py.HardLink):
                    raise CorruptFile(f"{path}: /{name} is a {type(link).__name__}, refusing links")
            data = f["data"]
            if data.is_virtual or data.external:
                raise CorruptFile(f"{path}: /data is virtual or external, refusing")
            if data.dtype != np.uint8 or data.ndim != 1:
                raise CorruptFile(f"{path}: /data has dtype {data.dtype} and {data.ndim} dims")
            total = data.shape[0]
            compressed = data.chunks is not None
            data_offset = None if compressed or total == 0 else data.id.get_offset()
            if not compressed and total and data_offset is None:
                raise CorruptFile(f"{path}: /data has no storage")
            index = f["index"]
            names = index.dtype.names or ()
            if names[:4] != ("key", "offset", "size", "checksum"):
                raise CorruptFile(f"{path}: /index has fields {names}")
            # Field by field: no transient copy of the whole compound table (index memory).
            cols = {name: index.fields(name)[()] for name in names}
            schema = _text(f.attrs.get("schema"))
            kind = _text(f.attrs.get("kind"))
            sources = tuple(json.loads(_text(f.attrs.get("sources")) or "[]"))
    except (CorruptFile, FileNotFoundError):
        raise
    except Exception as exc:
        raise CorruptFile(f"{path}: {exc}") from exc
    offsets = cols["offset"].astype(np.int64, copy=False)
    sizes = cols["size"].astype(np.int64, copy=False)
    if len(offsets) and (
        offsets.min() < 0 or sizes.min() < 0 or int((offsets + sizes).max()) > total or offsets.max() > total
    ):
        raise CorruptFile(f"{path}: /index points outside /data ({total} bytes)")
    n = len(offsets)
    slots = cols["slots"].astype(np.int64, copy=False) if "slots" in names else np.zeros((n, 0), np.int64)
    if slots.ndim == 1:
        slots = slots[:, None]
    return FileIndex(
        path=path,
        keys=cols["key"].astype(np.int64, copy=False),
        offsets=offsets,
        sizes=sizes,
        checksums=cols["checksum"].astype(np.uint64, copy=False),
        slots=slots,
        schema=schema or "",
        data_offset=data_offset,
        compressed=compressed,
        kind=kind or "",
        sources=sources,
    )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


class Reader:
    """Reads payload bytes of one file, opened lazily in the process that uses it.

    Uncompressed files are memory-mapped read-only (``view``) and small payloads are copied
    out of the map: a copy costs a fraction of a ``preadv`` system call (see MAP_BELOW). Files on network
    filesystems are read with ``os.preadv`` instead (``map_file=False``): a map of a file that
    another node deletes can fault, where a read returns ESTALE. Compressed files go through
    h5py. All are reopened when the process id changes (after a fork). Holds only what
    reading needs (the index columns live in cachedata.index).
    """

    __slots__ = ("_dset", "_h5", "_mm", "compressed", "data_offset", "fd", "map_file", "path", "pid", "view")

    def __init__(self, fi: FileIndex, *, map_file: bool = False) -> None:
        self.path = fi.path
        self.data_offset = fi.data_offset or 0
        self.compressed = fi.compressed
        self.map_file = map_file
        self.pid = -1
        self.fd = -1
        self.view: memoryview | None = None  # the payload bytes (from /data's offset on), mapped
        self._mm: mmap.mmap | None = None
        self._h5: h5py.File | None = None
        self._dset: h5py.Dataset | None = None

    def open(self) -> None:
        """(Re)open in this process (the hot path checks ``pid`` once per batch itself)."""
        self.fd = -1
        self.view = self._mm = None  # a fork parent's map: dropping it unmaps only this copy
        self._h5 = self._dset = None
        if self.compressed:
            self._h5 = h5py.File(self.path, "r", locking=False)
            self._dset = self._h5["data"]
        else:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            if self.map_file and os.fstat(self.fd).st_size > self.data_offset:
                try:
                    self._mm = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
                except (OSError, ValueError):
                    self._mm = None  # a filesystem without mmap: preadv still works
                else:
                    self.view = memoryview(self._mm)[self.data_offset :]
        self.pid = os.getpid()

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with payload bytes starting at ``offset`` (relative to /data)."""
        if self.pid != os.getpid():
            self.open()
        n = buf.nbytes
        if not n:
            return
        if self._dset is not None:
            buf[:] = self._dset[offset : offset + n].data
            return
        if self.view is not None and n < MAP_BELOW:
            src = self.view[offset : offset + n]
            got = src.nbytes
            if got == n:
                buf[:] = src
                return
        else:
            got = os.preadv(self.fd, [buf], self.data_offset + offset)
        if got != n:
            raise CorruptFile(f"{self.path}: short read ({got} of {n} bytes at {offset})")

    def close(self) -> None:
        """Close what this process opened; a forked child only forgets its parent's handles."""
        if self.pid == os.getpid():
            if self.view is not None:
                try:
                    self.view.release()
                    self._mm.close()
                except BufferError:
                    pass  # a payload slice is still alive: the map goes when it does
            if self.fd >= 0:
                os.close(self.fd)
            if self._h5 is not None:
                self._h5.close()
        self.fd = -1
        self.view = self._mm = None
        self._h5 = self._dset = None
        self.pid = -1
