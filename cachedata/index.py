"""The index of one namespace, shared between processes: key -> (file, row).

Each file's index columns are sorted by key (format version 2) and, for files of
``storage.MAP_INDEX_ROWS`` rows or more, memory-mapped read-only, so every process and
DataLoader worker reads one copy in the page cache instead of building its own. A key is
found by a binary search per file (O(1) for a file whose keys are one contiguous range,
the common case of a complete cache), largest file first. The only private state is a set
of rows found corrupt, which this process must not serve again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .payloads import Reader
from .storage import FileIndex


@dataclass(eq=False)
class Segment:
    """One file's rows and its reader."""

    fi: FileIndex
    reader: Reader
    first: int = field(init=False)  # keys[0] when the keys are one contiguous range, else None
    contiguous: bool = field(init=False)

    def __post_init__(self) -> None:
        keys = self.fi.keys
        n = len(keys)
        self.first = int(keys[0]) if n else 0
        self.contiguous = bool(n) and int(keys[n - 1]) - self.first == n - 1

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Rows of an int64 array of keys in this file, -1 where absent."""
        n = len(self.fi.keys)
        if not n:
            return np.full(len(keys), -1, np.int64)
        if self.contiguous:
            rows = keys - self.first
            rows[(rows < 0) | (rows >= n)] = -1
            return rows
        at = np.searchsorted(self.fi.keys, keys)
        ok = at < n
        hit = np.zeros(len(keys), bool)
        hit[ok] = self.fi.keys[at[ok]] == keys[ok]
        return np.where(hit, at, -1)

    def row(self, key: int) -> int:
        """The row of one key, or -1 (no array allocation on this path)."""
        keys = self.fi.keys
        n = len(keys)
        if self.contiguous:
            r = key - self.first
            return r if 0 <= r < n else -1
        r = int(np.searchsorted(keys, key))
        return r if r < n and int(keys[r]) == key else -1


class Index:
    """The loaded files of a namespace, and which one serves each key."""

    def __init__(self, *, nslots: int, map_files: bool = False) -> None:
        self.nslots = nslots
        self.map_files = map_files  # memory-map uncompressed payloads (see payloads.Reader)
        self.segments: list[Segment] = []  # largest first: most keys resolve in one probe
        self.by_name: dict[str, Segment] = {}
        self._bad: dict[int, set[int]] = {}  # id(segment) -> keys whose bytes failed a check
        self.discards = 0  # how many rows were discarded so far (readers retry when it grows)
        self._open: OrderedDict[int, Segment] = OrderedDict()  # opened readers, oldest first

    @property
    def names(self) -> set[str]:
        return set(self.by_name)

    def add(self, fi: FileIndex) -> Segment:
        seg = Segment(fi, Reader(fi, map_file=self.map_files))
        self.segments.append(seg)
        self.segments.sort(key=lambda s: -len(s.fi.keys))
        self.by_name[fi.path.name] = seg
        return seg

    def opened(self, seg: Segment) -> None:
        """Record that ``seg``'s reader was opened; close the oldest beyond ``open_files_cap``.

        A mapped file costs two descriptors (mmap keeps a duplicate), so a process with many
        files open would reach a limit like ``ulimit -n 1024`` long before its memory runs out.
        """
        self._open[id(seg)] = seg
        self._open.move_to_end(id(seg))
        cap = open_files_cap()
        while len(self._open) > cap:
            _, old = self._open.popitem(last=False)
            old.reader.close()  # reopened on its next read

    def remove(self, name: str) -> None:
        """Forget a file that left the listing (merged away); readers already open stay valid."""
        seg = self.by_name.pop(name, None)
        if seg is not None:
            self.segments.remove(seg)
            self._bad.pop(id(seg), None)
            self._open.pop(id(seg), None)
            seg.reader.close()

    def find(self, key: int) -> tuple[Segment, int] | None:
        """(segment, row) serving ``key``, or None."""
        bad = self._bad
        for seg in self.segments:
            r = seg.row(key)
            if r >= 0 and not (bad and key in bad.get(id(seg), ())):
                return seg, r
        return None

    def find_many(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment number in ``segments`` or -1, row) for an int64 array of keys."""
        seg_of = np.full(len(keys), -1, np.int64)
        rows = np.full(len(keys), -1, np.int64)
        todo = np.arange(len(keys))
        for s, seg in enumerate(self.segments):
            if not len(todo):
                break
            r = seg.rows(keys[todo])
            bad = self._bad.get(id(seg))
            if bad:
                r[np.isin(keys[todo], np.fromiter(bad, np.int64, len(bad)))] = -1
            got = r >= 0
            seg_of[todo[got]] = s
            rows[todo[got]] = r[got]
            todo = todo[~got]
        return seg_of, rows

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask of keys that some file serves."""
        return self.find_many(keys)[0] >= 0

    def keys(self) -> np.ndarray:
        """Every key that has a row, ascending (reads every file's key column)."""
        if not self.segments:
            return np.empty(0, np.int64)
        parts = []
        for seg in self.segments:
            k = np.asarray(seg.fi.keys, np.int64)
            bad = self._bad.get(id(seg))
            if bad:
                k = k[~np.isin(k, np.fromiter(bad, np.int64, len(bad)))]
            parts.append(k)
        return np.unique(np.concatenate(parts))

    @property
    def count(self) -> int:
        """Distinct keys served (O(items): not for the hot path)."""
        if len(self.segments) == 1 and not self._bad:
            return len(self.segments[0].fi.keys)
        return len(self.keys())

    def discard(self, seg: Segment, key: int) -> None:
        """Never serve ``key`` from ``seg`` again in this process (its bytes failed a check)."""
        self._bad.setdefault(id(seg), set()).add(key)
        self.discards += 1

    def close(self) -> None:
        for seg in self.segments:
            seg.reader.close()
        self._open.clear()


def open_files_cap() -> int:
    """Files one process keeps open for reading: an eighth of the open-files limit, 8 to 512."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 512
    except (ImportError, OSError, ValueError):
        return 128
    return max(8, min(512, soft // 8))
