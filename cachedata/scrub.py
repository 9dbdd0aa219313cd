"""Scrubbing: reading every payload of a data file and checking it against its checksum.

What ``cachedata verify`` does to each file (through ``Store.check_files``), apart from the
read hot path: payloads are read through a ``storage.Reader`` in file order, several at a
time, and a mapped uncompressed file is checked in place, without a copy. It reports and
changes nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .storage import CorruptFile, FileIndex, Reader, TransientError, checksum, transient


@dataclass(frozen=True)
class FileCheck:
    """One data file as ``Store.check_files`` found it."""

    name: str
    rows: int  # index rows checked (0 when the file could not be opened)
    bad: tuple[tuple[int | None, str], ...]  # (key, reason); key None: the whole file is unreadable
    vanished: bool = False  # merged away before it could be checked (its items are in a newer file)
    error: str = ""  # why it could not be checked now (an environmental error, not corruption)


#: Payload bytes ``check_file`` looks at in one go (several small items per read).
CHECK_SPAN_BYTES = 8 * 1024 * 1024


def check_file(
    fi: FileIndex, *, map_file: bool, progress: Callable[[int], None] | None = None
) -> list[tuple[int, str]]:
    """(key, reason) of every row of ``fi`` whose payload cannot be read or fails its checksum.

    Payloads are read through a ``Reader`` in file order, CHECK_SPAN_BYTES at a time; a
    mapped uncompressed file (``map_file``) is checked in place, without a copy. ``progress``
    gets the number of rows checked after each span. Raises FileNotFoundError when the file
    vanished before it could be opened, and TransientError when the environment failed
    (too many open files, no memory, a transient I/O error): neither says the file is bad.
    """
    reader = Reader(fi, map_file=map_file)
    bad: list[tuple[int, str]] = []
    try:
        for rows in _spans(fi):
            bad += _check_rows(reader, fi, rows)
            if progress is not None:
                progress(len(rows))
    except (FileNotFoundError, TransientError):
        raise
    except OSError as exc:
        if transient(exc):
            raise TransientError(exc.errno or errno.EIO, f"{fi.path}: {exc}") from exc
        raise
    finally:
        reader.close()
    return bad


def _spans(fi: FileIndex) -> Iterator[list[int]]:
    """Rows inside /data grouped by position, each group spanning at most CHECK_SPAN_BYTES;
    a row outside /data (a malformed index row) is a group of its own."""
    offsets = np.asarray(fi.offsets, np.int64).tolist()
    sizes = np.asarray(fi.sizes, np.int64).tolist()
    group: list[int] = []
    start = 0
    for r in np.argsort(np.asarray(fi.offsets, np.int64), kind="stable").tolist():
        if offsets[r] < 0 or sizes[r] < 0 or offsets[r] + sizes[r] > fi.data_bytes:
            yield [r]
            continue
        if group and offsets[r] + sizes[r] - start > CHECK_SPAN_BYTES:
            yield group
            group = []
        if not group:
            start = offsets[r]
        group.append(r)
    if group:
        yield group


def _check_rows(reader: Reader, fi: FileIndex, rows: list[int]) -> list[tuple[int, str]]:
    """Read ``rows``' payloads in one go and compare each with its checksum."""
    offsets = np.asarray(fi.offsets[rows], np.int64).tolist()
    sizes = np.asarray(fi.sizes[rows], np.int64).tolist()
    keys = np.asarray(fi.keys[rows], np.int64).tolist()
    if len(rows) == 1 and (offsets[0] < 0 or sizes[0] < 0 or offsets[0] + sizes[0] > fi.data_bytes):
        return [(keys[0], f"its index row points outside /data ({fi.data_bytes} bytes)")]
    lo = offsets[0]
    hi = max(o + n for o, n in zip(offsets, sizes))
    sums = np.asarray(fi.checksums[rows], np.uint64).tolist()
    slots = np.asarray(fi.slots[rows], np.int64).tolist()
    bad = []
    try:
        with reader.span(lo, hi - lo) as view:
            for key, off, n, want, s in zip(keys, offsets, sizes, sums, slots):
                if checksum(key, view[off - lo : off - lo + n], s) != want:
                    bad.append((key, "checksum mismatch"))
    except FileNotFoundError:
        raise
    except (OSError, CorruptFile) as exc:
        if transient(exc):
            raise
        if len(rows) > 1:  # find out which items are affected
            return [b for r in rows for b in _check_rows(reader, fi, [r])]
        return [(keys[0], f"unreadable bytes: {exc}")]
    return bad
