"""Reading payload bytes of one data file, opened lazily in the process that reads.

The one way payloads are read: hits (``Reader.read``), scans for merges and ``verify``
(``Reader.span``), and decompression of compressed files all go through ``Reader``.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import h5py

from . import buffers, storage
from .faults import CorruptFileError
from .storage import FileIndex


class Reader:
    """Reads payload bytes of one file, opened lazily in the process that uses it.

    Uncompressed files are memory-mapped read-only (``view``) and payloads are copied out of
    the map: for a 190 KB payload already mapped, the copy took 18-22 us against 39-71 us for
    ``preadv`` into the same buffer (the kernel copies page by page), at the cost of the file's
    pages counting in RSS (shared, reclaimable page cache, as with any memory map). Files on network
    filesystems are read with ``os.preadv`` instead (``map_file=False``): a map of a file that
    another node deletes can fault, where a read returns ESTALE. Compressed files go through
    h5py. All are reopened when the process id changes (after a fork).
    """

    __slots__ = (
        "_dset", "_h5", "_mm", "compressed", "data_offset", "fd", "map_error", "map_file", "path", "pid", "view",
    )  # fmt: skip

    def __init__(self, fi: FileIndex, *, map_file: bool = False) -> None:
        self.path = fi.path
        self.data_offset = fi.data_offset or 0
        self.compressed = fi.compressed
        self.map_file = map_file
        self.pid = -1
        self.fd = -1
        self.map_error: BaseException | None = None  # why the last open could not map the file
        self.view: memoryview | None = None  # the payload bytes (from /data's offset on), mapped
        self._mm: mmap.mmap | None = None
        self._h5: h5py.File | None = None
        self._dset: h5py.Dataset | None = None

    def open(self) -> None:
        """(Re)open in this process (the hot path checks ``pid`` once per batch itself).

        Raises OSError (ENOENT when merged away, EMFILE when out of descriptors, ...).
        """
        self.fd = -1
        self.map_error = None
        self.view = self._mm = None  # a fork parent's map: dropping it unmaps only this copy
        self._h5 = self._dset = None
        if self.compressed:
            with storage.H5_LOCK:
                self._h5 = h5py.File(self.path, "r", locking=False)
                self._dset = self._h5["data"]
        else:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            if self.map_file and os.fstat(self.fd).st_size > self.data_offset:
                try:
                    self._mm = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
                except (OSError, ValueError) as exc:
                    # A filesystem without mmap, or out of descriptors (a map keeps a duplicate)
                    # or address space: preadv still works.
                    self._mm = None
                    self.map_error = exc
                else:
                    self.view = memoryview(self._mm)[self.data_offset :]
        self.pid = os.getpid()

    def read(self, offset: int, n: int) -> Any:
        """A fresh writable buffer with the ``n`` payload bytes at ``offset`` (relative to /data).

        The hot path of every hit: the caller opens the reader in this process first (it checks
        ``pid`` once per batch). Mapped: one copy out of the map (a bytearray when small, a
        recycled buffer when large; see ``buffers.empty``); else ``preadv`` or h5py.
        """
        view = self.view
        if view is not None:
            src = view[offset : offset + n]
            if src.nbytes != n:
                raise CorruptFileError(f"{self.path}: short read ({src.nbytes} of {n} bytes at {offset})")
            if n < buffers.MIN_BYTES:
                return bytearray(src)
            buf: Any = buffers.take(n)  # a uint8 array: a writable buffer too
            memoryview(buf)[:] = src
            return buf
        buf = buffers.empty(n)
        if self.compressed:
            self.read_into(memoryview(buf), offset)
        elif n and os.preadv(self.fd, [buf], self.data_offset + offset) != n:
            raise CorruptFileError(f"{self.path}: short read of {n} bytes at {offset}")
        return buf

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with payload bytes starting at ``offset`` (relative to /data)."""
        if self.pid != os.getpid():
            self.open()
        n = buf.nbytes
        if not n:
            return
        if self._dset is not None:
            with storage.H5_LOCK:
                buf[:] = self._dset[offset : offset + n].data
            return
        if self.view is not None:
            src = self.view[offset : offset + n]
            got = src.nbytes
            if got == n:
                buf[:] = src
                return
        else:
            got = os.preadv(self.fd, [buf], self.data_offset + offset)
        if got != n:
            raise CorruptFileError(f"{self.path}: short read ({got} of {n} bytes at {offset})")

    def span(self, offset: int, n: int) -> memoryview:
        """``n`` payload bytes from ``offset`` (relative to /data), for scans rather than hits:
        a read-only slice of the map when the file is mapped (no copy; release it before
        ``close``), else a fresh buffer read from the file."""
        if self.pid != os.getpid():
            self.open()
        if self.view is not None:
            got = self.view[offset : offset + n]
            if got.nbytes != n:
                raise CorruptFileError(f"{self.path}: short read ({got.nbytes} of {n} bytes at {offset})")
            return got
        buf = bytearray(n)
        self.read_into(memoryview(buf), offset)
        return memoryview(buf)

    def forget(self, offset: int, n: int) -> None:
        """Unmap, in this process only, the pages of a span it has scanned (a merge's or
        ``verify``'s check): they stay in the page cache, but a scan of a large file no longer
        leaves all of it in this process's RSS (a cold image pass's merge: +0.9 GB)."""
        if self._mm is None or n <= 0 or self.pid != os.getpid():
            return
        start = self.data_offset + offset
        page = start - start % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, page, start + n - page)
        except (OSError, ValueError):
            pass  # only a memory figure is at stake

    def close(self) -> None:
        """Close what this process opened; a forked child only forgets its parent's handles."""
        if self.pid == os.getpid():
            if self.view is not None:
                try:
                    self.view.release()
                    if self._mm is not None:
                        self._mm.close()
                except BufferError:
                    pass  # a payload slice is still alive: the map goes when it does
            if self.fd >= 0:
                os.close(self.fd)
            if self._h5 is not None:
                with storage.H5_LOCK:
                    self._h5.close()
        self.fd = -1
        self.view = self._mm = None
        self._h5 = self._dset = None
        self.pid = -1
