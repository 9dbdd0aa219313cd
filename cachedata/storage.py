"""The HDF5 file format of shards and runs (format version 2).

One file holds many items. Layout, readable with h5py alone::

    /data             uint8[total]  the items' payloads (contiguous, or chunked when compressed)
    /index/key        int64[n]      sorted ascending, unique
    /index/offset     uint64[n]     where each payload starts in /data
    /index/size       uint64[n]     payload bytes
    /index/checksum   uint64[n]     see ``checksum``
    /index/slots      int64[n, S]   shapes and lengths (see cachedata.schema); absent when S == 0
    attrs             cachedata_format=2, kind="shard"|"merged", namespace=<fingerprint>,
                      schema=<JSON>, schema_checksum=<xxh3-64 hex of schema, see SCHEMA_SUM>,
                      created=<unix seconds>, sources=<JSON list, merged files only>
    xattr             user.cachedata.rows=<n> (``fileset.ROWS_XATTR``), where the filesystem has
                      user xattrs: ``cachedata info`` reads the item counts without HDF5

Version 2 stores the index as contiguous columns sorted by key, so every process memory-maps
them (one copy in the page cache, shared) and finds a key with a binary search instead of
building a private dict. Payloads need not be in key order: a merge copies each source's
live byte ranges whole (``copy_file_range``) and only rebases the offsets.

``checksum`` is xxh3-64 of the payload seeded with the key XOR the xxh3-64 of the slots, so an
index row that points at another item's bytes, or carries a flipped shape, fails the check.
Files are written under a temporary name in the same folder and renamed into place once
complete, so readers never see a torn file; a sealed file is never modified again.
Reading payloads is ``cachedata.payloads``; what a failure means is ``cachedata.faults``.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import xxhash

from . import fileset
from . import schema as schema_mod
from .faults import CorruptFileError, TransientError, transient

#: The on-disk format. It is part of every namespace fingerprint, so a cache written in
#: another format is never read: it is a different namespace (``cachedata info`` names it).
FORMAT_VERSION = 2
#: Compressed payloads live in chunks of this many bytes (random reads decompress one or two).
_CHUNK_BYTES = 64 * 1024
#: Copy block for streaming payloads into a file, in bytes.
_COPY_BYTES = 8 * 1024 * 1024
#: Index columns of files with at least this many rows are memory-mapped (shared between
#: processes); smaller ones are read into memory, where a map would cost more than it saves.
MAP_INDEX_ROWS = 4096
#: Held around every HDF5 call and taken by os.fork: a fork while a background merge is inside
#: the HDF5 library would leave its global lock held forever in the child.
H5_LOCK = threading.RLock()


def _h5_lock_in_child() -> None:
    global H5_LOCK
    H5_LOCK = threading.RLock()


os.register_at_fork(
    before=lambda: H5_LOCK.acquire(),
    after_in_parent=lambda: H5_LOCK.release(),
    after_in_child=_h5_lock_in_child,
)
#: Tests lower this to exercise the read/write fallback of merges (see ``copy_range``).
USE_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def checksum(
    key: int, payload: bytes | bytearray | memoryview | np.ndarray, slots: Sequence[int] = ()
) -> int:
    """xxh3-64 of ``payload`` seeded with ``key`` XOR xxh3-64 of ``slots`` (as little-endian int64).

    Binds the bytes to the item they belong to and to the shapes they are decoded with, so
    a flipped key, shape or payload byte all fail the check.
    """
    seed = key & 0xFFFFFFFFFFFFFFFF
    if slots:
        n = len(slots)
        packer = _SLOT_PACKERS.get(n) or _SLOT_PACKERS.setdefault(n, struct.Struct(f"<{n}q"))
        seed ^= xxhash.xxh3_64_intdigest(packer.pack(*slots))
    # An ndarray is a buffer; numpy's stubs say so only for Python >= 3.12.
    return xxhash.xxh3_64_intdigest(payload, seed=seed)  # type: ignore[arg-type]


#: A compiled ``struct.Struct`` per slot count: formatting "<{n}q" anew costs every read.
_SLOT_PACKERS: dict[int, struct.Struct] = {}


#: The attribute holding the xxh3-64 (hex) of a file's ``schema`` text: the item checksums do
#: not cover the schema, and a flipped byte there (a key "label" read as "mabel") would decode
#: good payloads into a wrong structure. Files written before it was added carry none.
SCHEMA_SUM = "schema_checksum"


def schema_sum(schema: str) -> str:
    """The ``SCHEMA_SUM`` attribute of a file whose schema text is ``schema``."""
    return xxhash.xxh3_64_hexdigest(schema.encode("utf-8", "surrogatepass"))


def schema_intact(schema: str | None, recorded: str | None) -> bool:
    """False when a file records its schema's checksum and the schema text does not match it."""
    if recorded is None:
        return True
    return schema is not None and recorded == schema_sum(schema)


def seeds(keys: Sequence[int], slot_rows: np.ndarray) -> list[int]:
    """``checksum``'s seed for many rows at once (``checksum(k, p, s) == xxh3(p, seed)``).

    The slots of all rows are packed once, so a loop over a batch hashes each row's slots
    without building a struct per row: this runs on every hit and in every merge.
    """
    width = 8 * slot_rows.shape[1]
    if not width:
        return [k & 0xFFFFFFFFFFFFFFFF for k in keys]
    blob = np.ascontiguousarray(slot_rows, "<i8").tobytes()
    digest = xxhash.xxh3_64_intdigest
    return [(k & 0xFFFFFFFFFFFFFFFF) ^ digest(blob[i * width : (i + 1) * width]) for i, k in enumerate(keys)]


@dataclass(frozen=True)
class FileIndex:
    """What a reader needs from one file: its rows (sorted by key), schema and data offset.

    The columns of large files are read-only memory maps of the file itself.
    """

    path: Path
    keys: np.ndarray  # int64[n], ascending
    offsets: np.ndarray  # int64 or uint64 [n], relative to the data start
    sizes: np.ndarray  # int64 or uint64 [n]
    checksums: np.ndarray  # uint64[n]
    slots: np.ndarray  # int64[n, S]
    schema: str
    data_offset: int | None  # byte offset of /data in the file; None when compressed or empty
    data_bytes: int  # length of /data
    compressed: bool
    kind: str
    sources: tuple[str, ...]
    file_bytes: int  # size of the whole file

    def __len__(self) -> int:
        return len(self.keys)


# ------------------------------------------------------------------------------ writing


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
    payloads: Iterable[bytes | bytearray | memoryview | np.ndarray | None],
    compression: str | None,
    sources: tuple[str, ...] = (),
    durable: bool = True,
) -> FileIndex:
    """Write one complete file from payloads in row order, atomically.

    Rows must be sorted by key. ``payloads`` yields one buffer per row, or None for a row to
    leave out (its bytes failed a check while being copied). ``durable=False`` skips the
    fsync: a file lost in a power cut only fails its checksums and is recomputed. A file
    must be durable when files that may be on disk are removed because of it.
    """
    sizes = np.asarray(sizes, np.int64)
    offsets = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    total = int(sizes.sum())
    tmp = path.with_name(fileset.tmp_name(path.name))
    try:
        with H5_LOCK, h5py.File(tmp, "w", locking=False) as f:
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
        rows = _Rows(keys[keep], offsets[keep], sizes[keep], np.asarray(checksums)[keep], slots[keep])
        fi = _finish(tmp, path, rows, kind=kind, namespace=namespace, schema=schema, sources=sources,
                     data_offset=data_offset, total=total, compressed=bool(compression), durable=durable)  # fmt: skip
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return fi


@dataclass(frozen=True)
class Piece:
    """A byte range of a source file to copy into a merged file (one ``copy_file_range``)."""

    fd: int  # an open descriptor of the source file
    src: int  # absolute offset in the source file
    dst: int  # offset relative to the new file's /data
    size: int


def write_merged(
    path: Path,
    *,
    namespace: str,
    schema: str,
    keys: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    checksums: np.ndarray,
    slots: np.ndarray,
    pieces: Sequence[Piece],
    total: int,
    sources: tuple[str, ...],
    use_copy_file_range: bool,
    durable: bool = True,
    progress=None,
) -> FileIndex:
    """Write an uncompressed merged file whose payload bytes come from ranges of other files.

    Rows (sorted by key) already carry their offsets in the new /data. Bytes move with
    ``os.copy_file_range`` (no copy through Python; the kernel may share the blocks) or, where
    that is unavailable or unwise (network filesystems), with pread/pwrite. ``durable``: as
    in ``write_file``.
    """
    tmp = path.with_name(fileset.tmp_name(path.name))
    try:
        with H5_LOCK, h5py.File(tmp, "w", locking=False) as f:
            data_offset = _reserve_contiguous(f, total)
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            base = data_offset or 0
            for p in pieces:
                copy_range(p.fd, p.src, fd, base + p.dst, p.size, use_copy_file_range=use_copy_file_range)
                if progress is not None:
                    progress(p.size)
        finally:
            os.close(fd)
        rows = _Rows(keys, offsets, sizes, checksums, slots)
        fi = _finish(tmp, path, rows, kind="merged", namespace=namespace, schema=schema, sources=sources,
                     data_offset=data_offset, total=total, compressed=False, durable=durable)  # fmt: skip
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return fi


def copy_range(src_fd: int, src: int, dst_fd: int, dst: int, n: int, *, use_copy_file_range: bool) -> None:
    """Copy ``n`` bytes between descriptors at explicit offsets; falls back to pread/pwrite."""
    while n > 0 and use_copy_file_range:
        try:
            done = os.copy_file_range(src_fd, dst_fd, n, src, dst)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                break  # not supported here: the loop below copies what is left
            raise
        if done == 0:
            raise CorruptFileError(f"source file ended {n} bytes early while merging")
        src, dst, n = src + done, dst + done, n - done
    buf = bytearray(min(n, _COPY_BYTES)) if n > 0 else bytearray()
    view = memoryview(buf)
    while n > 0:
        got = os.preadv(src_fd, [view[: min(n, len(buf))]], src)
        if got == 0:
            raise CorruptFileError(f"source file ended {n} bytes early while merging")
        at = 0
        while at < got:
            at += os.pwrite(dst_fd, view[at:got], dst + at)
        src, dst, n = src + got, dst + got, n - got


@dataclass(frozen=True)
class _Rows:
    keys: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    checksums: np.ndarray
    slots: np.ndarray


def _finish(
    tmp: Path, path: Path, rows: _Rows, *, kind: str, namespace: str, schema: str, sources: tuple[str, ...],
    data_offset: int | None, total: int, compressed: bool, durable: bool,
) -> FileIndex:  # fmt: skip
    """Write the index columns and attributes, then publish ``tmp`` as ``path``."""
    keys = np.ascontiguousarray(rows.keys, np.int64)
    if len(keys) > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise ValueError(f"{path.name}: index keys must be unique and ascending")
    with H5_LOCK, h5py.File(tmp, "r+", locking=False) as f:
        f.attrs["cachedata_format"] = FORMAT_VERSION
        f.attrs["kind"] = kind
        f.attrs["namespace"] = namespace
        f.attrs["schema"] = schema
        f.attrs[SCHEMA_SUM] = schema_sum(schema)
        f.attrs["created"] = time.time()
        if kind == "merged":
            f.attrs["sources"] = json.dumps(list(sources))
        g = f.create_group("index")
        # Contiguous, uncompressed columns: readers memory-map them at their file offsets.
        g.create_dataset("key", data=keys)
        g.create_dataset("offset", data=np.asarray(rows.offsets, np.uint64))
        g.create_dataset("size", data=np.asarray(rows.sizes, np.uint64))
        g.create_dataset("checksum", data=np.asarray(rows.checksums, np.uint64))
        if rows.slots.shape[1]:
            g.create_dataset("slots", data=np.asarray(rows.slots, np.int64))
    fileset.set_rows(tmp, len(keys))  # before the rename: no published file lacks it
    if durable:
        _fsync_path(tmp)  # the rename below must not publish bytes still in flight
    os.replace(tmp, path)  # atomic: readers see the whole file or nothing
    if durable:
        _fsync_dir(path.parent)
    return FileIndex(
        path=path,
        keys=keys,
        offsets=np.asarray(rows.offsets, np.int64),
        sizes=np.asarray(rows.sizes, np.int64),
        checksums=np.asarray(rows.checksums, np.uint64),
        slots=np.asarray(rows.slots, np.int64).reshape(len(keys), rows.slots.shape[1]),
        schema=schema,
        data_offset=data_offset,
        data_bytes=total,
        compressed=compressed,
        kind=kind,
        sources=tuple(sources),
        file_bytes=os.stat(path).st_size,
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


# ------------------------------------------------------------------------------ reading

_COLUMNS = ("key", "offset", "size", "checksum")


def read_checked(path: Path, *, namespace: str, schema: str, nslots: int) -> FileIndex:
    """``read_index``, for a file about to be read or merged: CorruptFileError also when its
    items have another structure than ``schema`` (a namespace's normalized schema text) or
    another number of slots. A file without a schema counts as such a file: nothing says
    how to decode its payloads."""
    fi = read_index(path, namespace=namespace)
    try:
        same = schema_mod.dumps(schema_mod.load(fi.schema)) == schema
    except ValueError as exc:
        raise CorruptFileError(f"{path}: its item schema does not parse ({exc})") from exc
    if not same:
        raise CorruptFileError(f"{path}: its item schema differs from the namespace's")
    if fi.slots.shape[1] != nslots:
        raise CorruptFileError(f"{path}: {fi.slots.shape[1]} slots per item, expected {nslots}")
    return fi


def read_index(path: Path, *, namespace: str) -> FileIndex:
    """Load and validate one file's index.

    CorruptFileError when the file cannot be trusted; TransientError (never CorruptFileError) when
    the environment failed (too many open files, no memory, a transient I/O error), and
    FileNotFoundError when it vanished (merged away meanwhile).
    """
    try:
        with H5_LOCK, h5py.File(path, "r", locking=False) as f:
            fmt = f.attrs.get("cachedata_format")
            if fmt != FORMAT_VERSION:
                raise CorruptFileError(
                    f"{path}: format {fmt!r}, expected {FORMAT_VERSION} (written by another cachedata version)"
                )
            if _text(f.attrs.get("namespace")) != namespace:
                raise CorruptFileError(f"{path}: belongs to namespace {_text(f.attrs.get('namespace'))!r}")
            data = _dataset(f, path, "data")
            if data.is_virtual or data.external:
                raise CorruptFileError(f"{path}: /data is virtual or external, refusing")
            if data.dtype != np.uint8 or data.ndim != 1:
                raise CorruptFileError(f"{path}: /data has dtype {data.dtype} and {data.ndim} dims")
            total = int(data.shape[0])
            compressed = data.chunks is not None
            data_offset = None if compressed or total == 0 else data.id.get_offset()
            if not compressed and total and data_offset is None:
                raise CorruptFileError(f"{path}: /data has no storage")
            group = f.get("index", getlink=True)
            if not isinstance(group, h5py.HardLink) or not isinstance(f["index"], h5py.Group):
                raise CorruptFileError(f"{path}: /index is not a group")
            places = {}
            for name in (*_COLUMNS, "slots"):
                if name == "slots" and "slots" not in f["index"]:
                    continue
                d = _dataset(f, path, f"index/{name}")
                places[name] = _place(d, path, name)
            n = places["key"][2][0]
            if any(p[2][0] != n for p in places.values()):
                raise CorruptFileError(f"{path}: /index columns differ in length")
            schema = _text(f.attrs.get("schema"))
            if not schema_intact(schema, _text(f.attrs.get(SCHEMA_SUM))):
                raise CorruptFileError(f"{path}: its item schema fails its checksum")
            kind = _text(f.attrs.get("kind"))
            sources = tuple(json.loads(_text(f.attrs.get("sources")) or "[]"))
            # Small files (and any column HDF5 did not lay out contiguously) are read now.
            cols: dict[str, np.ndarray | None] = {
                name: d[()] if n < MAP_INDEX_ROWS or off is None else None
                for name, (d, off, _shape) in places.items()
            }
    except (CorruptFileError, FileNotFoundError):
        raise
    except Exception as exc:
        if transient(exc):
            raise TransientError(getattr(exc, "errno", None) or errno.EIO, f"{path}: {exc}") from exc
        raise CorruptFileError(f"{path}: {exc}") from exc
    file_bytes = os.stat(path).st_size
    for name, (_d, off, shape) in places.items():
        if cols[name] is None:
            cols[name] = _map(path, off, shape, _column_dtype(name), file_bytes)
    slots = cols["slots"] if "slots" in cols else np.zeros((n, 0), np.int64)
    if slots.ndim == 1:
        slots = slots[:, None]
    keys = cols["key"]
    if n < MAP_INDEX_ROWS:
        # Cheap for small files; large files are checked where they are used (a bad row fails
        # its checksum, a row outside /data reads short), which keeps opening at O(1).
        offsets = cols["offset"].astype(np.int64)
        sizes = cols["size"].astype(np.int64)
        if n and (int((cols["offset"] + cols["size"]).max()) > total or offsets.min() < 0 or sizes.min() < 0):
            raise CorruptFileError(f"{path}: /index points outside /data ({total} bytes)")
        if n > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise CorruptFileError(f"{path}: /index keys are not unique and ascending")
    return FileIndex(
        path=path,
        keys=keys,
        offsets=cols["offset"],
        sizes=cols["size"],
        checksums=cols["checksum"],
        slots=slots,
        schema=schema or "",
        data_offset=data_offset,
        data_bytes=total,
        compressed=compressed,
        kind=kind or "",
        sources=sources,
        file_bytes=file_bytes,
    )


def compression_of(path: Path) -> str | None:
    """The compression filter of a file's /data ("gzip" or "lzf"; None when uncompressed or
    unreadable), so that a merge started without a CachedDataset keeps it."""
    try:
        with H5_LOCK, h5py.File(path, "r", locking=False) as f:
            comp = f["data"].compression
    except (OSError, KeyError):
        return None
    return comp if comp in ("gzip", "lzf") else None


def _dataset(f: h5py.File, path: Path, name: str) -> h5py.Dataset:
    link = f.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise CorruptFileError(f"{path}: /{name} is a {type(link).__name__}, refusing links")
    d = f[name]
    if not isinstance(d, h5py.Dataset):
        raise CorruptFileError(f"{path}: /{name} is not a dataset")
    return d


def _place(d: h5py.Dataset, path: Path, name: str) -> tuple[h5py.Dataset, int | None, tuple[int, ...]]:
    """(dataset, file offset when contiguous and mappable, shape) of one index column."""
    want = _column_dtype(name)
    if d.dtype != want or d.ndim != (2 if name == "slots" else 1):
        raise CorruptFileError(f"{path}: /index/{name} has dtype {d.dtype} and {d.ndim} dims")
    off = None
    if d.chunks is None and not d.is_virtual and not d.external and d.size:
        off = d.id.get_offset()
    return d, off, tuple(d.shape)


def _column_dtype(name: str) -> np.dtype:
    return np.dtype("<i8") if name in ("key", "slots") else np.dtype("<u8")


def _map(path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, file_bytes: int) -> np.ndarray:
    """A read-only memory map of one index column (shared between processes).

    Returned as a plain ndarray view of the map (its base keeps the map alive): indexing an
    ``np.memmap`` runs a Python-level ``__getitem__`` and ``__array_finalize__``, about 1 us
    a lookup, and the single-item read path makes four of them.
    """
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if offset + nbytes > file_bytes:
        raise CorruptFileError(f"{path}: an /index column lies outside the file")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape).view(np.ndarray)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
