"""Scrubbing: reading every payload of a data file and checking it against its checksum.

What ``cachedata verify`` does to a namespace (``check_namespace``, through ``Store.check_files``) and what a merge
does to the rows it copies, apart from the read hot path: payloads are read through a
``payloads.Reader`` in file order, several at a time, and a mapped uncompressed file is
checked in place, without a copy. It reports and changes nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from . import fileset, storage
from .faults import CorruptFileError, TransientError, limit_hint, transient
from .payloads import Reader
from .storage import FileIndex

if TYPE_CHECKING:
    from .view import View


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


def check_namespace(
    view: View, *, grow: Callable[[int], None] | None = None, progress: Callable[[int], None] | None = None
) -> list[FileCheck]:
    """Read every item of every data file of ``view``'s folder and check it against its checksum.

    The folder is listed again until no new file appears (a merge running meanwhile writes
    one), four times at most; ``grow`` gets the rows of newly listed files before they are
    checked, ``progress`` the rows checked as it goes.
    """
    folder = view.path
    if not view.load_schema():
        view.schema_from_files([f.name for f in fileset.list_files(folder).files])
    done: set[str] = set()
    out: list[FileCheck] = []
    for _ in range(4):
        todo = [f.name for f in fileset.list_files(folder).files if f.name not in done]
        if not todo:
            break
        done.update(todo)
        loaded: list[FileIndex] = []
        for name in todo:
            try:
                if view.schema is None:
                    raise CorruptFileError(f"{folder / name}: no readable item schema in the namespace")
                loaded.append(view.checked_index(name))
            except FileNotFoundError:
                out.append(FileCheck(name, 0, (), vanished=True))
            except TransientError as exc:
                out.append(FileCheck(name, 0, (), error=f"{exc}; raise {limit_hint(exc)}"))
            except CorruptFileError as exc:
                gone = not (folder / name).exists()
                why = f"unreadable file: {str(exc).removeprefix(f'{folder / name}: ')}"
                out.append(FileCheck(name, 0, () if gone else ((None, why),), vanished=gone))
        if grow is not None:
            grow(sum(len(fi) for fi in loaded))
        for fi in loaded:
            try:
                bad = check_file(fi, map_file=view.map_files, progress=progress)
            except FileNotFoundError:
                out.append(FileCheck(fi.path.name, 0, (), vanished=True))
            except TransientError as exc:
                out.append(FileCheck(fi.path.name, 0, (), error=f"{exc}; raise {limit_hint(exc)}"))
            else:
                out.append(FileCheck(fi.path.name, len(fi), tuple(bad)))
    return out


def check_file(
    fi: FileIndex, *, map_file: bool, progress: Callable[[int], None] | None = None
) -> list[tuple[int, str]]:
    """(key, reason) of every row of ``fi`` whose payload cannot be read or fails its checksum.

    ``map_file``: check a local uncompressed file in place, through a memory map. Raises
    FileNotFoundError when the file vanished before it could be opened, and TransientError
    when the environment failed (too many open files, no memory, a transient I/O error):
    neither says the file is bad.
    """
    reader = Reader(fi, map_file=map_file)
    try:
        bad = check_rows(reader, fi, np.arange(len(fi), dtype=np.int64), progress=progress)
    finally:
        reader.close()
    keys = np.asarray(fi.keys, np.int64)
    return [(int(keys[r]), why) for r, why in bad]


def check_rows(
    reader: Reader, fi: FileIndex, rows: np.ndarray, *, progress: Callable[[int], None] | None = None
) -> list[tuple[int, str]]:
    """(row, reason) for each of ``rows`` whose payload cannot be read or fails its checksum.

    The one checksum loop for files at rest (``verify`` and merges; hits check theirs as they
    are read). Rows are read in file order, CHECK_SPAN_BYTES at a time: a slice of the map
    when ``reader`` maps the file (no copy), else one read per span. ``progress`` gets the
    number of rows checked after each span. TransientError when the environment failed.
    """
    bad: list[tuple[int, str]] = []
    try:
        for group in _spans(fi, rows):
            bad += _check_group(reader, fi, group)
            if progress is not None:
                progress(len(group))
    except (FileNotFoundError, TransientError):
        raise
    except OSError as exc:
        if transient(exc):
            raise TransientError(exc.errno or errno.EIO, f"{fi.path}: {exc}") from exc
        raise
    return bad


def _spans(fi: FileIndex, rows: np.ndarray) -> Iterator[list[int]]:
    """``rows`` inside /data grouped by position, each group spanning at most CHECK_SPAN_BYTES;
    a row outside /data (a malformed index row) is a group of its own."""
    offsets = np.asarray(fi.offsets[rows], np.int64)
    sizes = np.asarray(fi.sizes[rows], np.int64).tolist()
    order = np.argsort(offsets, kind="stable")
    group: list[int] = []
    start = 0
    for r, off, n in zip(rows[order].tolist(), offsets[order].tolist(), [sizes[i] for i in order.tolist()]):
        if off < 0 or n < 0 or off + n > fi.data_bytes:
            yield [r]
            continue
        if group and off + n - start > CHECK_SPAN_BYTES:
            yield group
            group = []
        if not group:
            start = off
        group.append(r)
    if group:
        yield group


def _check_group(reader: Reader, fi: FileIndex, rows: list[int]) -> list[tuple[int, str]]:
    """Read ``rows``' payloads in one go and compare each with its checksum."""
    offsets = np.asarray(fi.offsets[rows], np.int64).tolist()
    sizes = np.asarray(fi.sizes[rows], np.int64).tolist()
    if len(rows) == 1 and (offsets[0] < 0 or sizes[0] < 0 or offsets[0] + sizes[0] > fi.data_bytes):
        return [(rows[0], f"its index row points outside /data ({fi.data_bytes} bytes)")]
    lo = offsets[0]
    hi = max(o + n for o, n in zip(offsets, sizes))
    sums = np.asarray(fi.checksums[rows], np.uint64).tolist()
    seeds = storage.seeds(np.asarray(fi.keys[rows], np.int64).tolist(), np.asarray(fi.slots[rows], np.int64))
    digest = xxhash.xxh3_64_intdigest
    bad = []
    try:
        with reader.span(lo, hi - lo) as view:
            for r, off, n, want, seed in zip(rows, offsets, sizes, sums, seeds):
                if digest(view[off - lo : off - lo + n], seed=seed) != want:
                    bad.append((r, "checksum mismatch"))
        reader.forget(lo, hi - lo)
    except FileNotFoundError:
        raise
    except (OSError, CorruptFileError) as exc:
        if transient(exc):
            raise
        if len(rows) > 1:  # find out which items are affected
            return [b for r in rows for b in _check_group(reader, fi, [r])]
        return [(rows[0], f"unreadable bytes: {exc}")]
    return bad
