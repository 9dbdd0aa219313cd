"""The in-memory index of one namespace: key -> (file, offset, size, checksum, slots).

Columns are numpy arrays grown by doubling, so a million items cost about 40 bytes each
plus 8 per shape slot. Integer keys ``0 <= key < size`` (the default: dataset indices)
map to rows through a dense int64 array; other keys (from ``key=``) through a dict.
The first file that supplies a key wins unless a later one is added with ``override``.
"""

from __future__ import annotations

import numpy as np

from .storage import FileIndex, Reader


class Index:
    """Rows of every loaded file, and which row serves each key."""

    def __init__(self, *, nslots: int, dense_size: int | None, map_files: bool = False) -> None:
        self.nslots = nslots
        self.map_files = map_files  # memory-map uncompressed files (see storage.Reader)
        self.readers: list[Reader] = []
        self.names: dict[str, int] = {}
        self._n = 0
        cap = 1024
        self.file = np.empty(cap, np.int32)
        self.offset = np.empty(cap, np.int64)
        self.size = np.empty(cap, np.int64)
        self.checksum = np.empty(cap, np.uint64)
        self.slots = np.empty((cap, nslots), np.int64)
        # Rows fit int32 below 2**31 items: half the memory of the key -> row map.
        self._dense = (
            np.full(dense_size, -1, np.int32 if (dense_size or 0) < 2**31 else np.int64)
            if dense_size is not None
            else None
        )
        self._map: dict[int, int] = {}
        self.count = 0  # keys that have a row

    def row(self, key: int) -> int:
        """The row serving ``key``, or -1."""
        if self._dense is not None:
            return int(self._dense[key]) if 0 <= key < len(self._dense) else -1
        return self._map.get(key, -1)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Vectorized ``row`` for an int64 array of keys."""
        if self._dense is not None:
            ok = (keys >= 0) & (keys < len(self._dense))
            out = np.full(len(keys), -1, np.int64)
            out[ok] = self._dense[keys[ok]]
            return out
        get = self._map.get
        return np.fromiter((get(int(k), -1) for k in keys), np.int64, len(keys))

    def keys(self) -> np.ndarray:
        """Every key that has a row, ascending."""
        if self._dense is not None:
            return np.flatnonzero(self._dense >= 0)
        return np.sort(np.fromiter(self._map.keys(), np.int64, len(self._map)))

    def add(self, fi: FileIndex, *, override: bool = False) -> None:
        """Add a file's rows; keys already served keep their row unless ``override``."""
        fid = len(self.readers)
        self.readers.append(Reader(fi, map_file=self.map_files))
        self.names[fi.path.name] = fid
        n = len(fi.keys)
        if not n:
            return
        if self._n == 0 and len(self.file) < n:
            # First big file (a merged one): adopt its freshly read columns, no copy.
            self.file = np.full(n, fid, np.int32)
            self.offset, self.size, self.checksum = fi.offsets, fi.sizes, fi.checksums
            self.slots = fi.slots
            self._n = n
            self._map_rows(fi.keys, np.arange(n, dtype=np.int64), override)
            return
        self._grow(self._n + n)
        lo, hi = self._n, self._n + n
        self.file[lo:hi] = fid
        self.offset[lo:hi] = fi.offsets
        self.size[lo:hi] = fi.sizes
        self.checksum[lo:hi] = fi.checksums
        self.slots[lo:hi] = fi.slots
        self._n = hi
        self._map_rows(fi.keys, np.arange(lo, hi, dtype=np.int64), override)

    def _map_rows(self, keys: np.ndarray, rows: np.ndarray, override: bool) -> None:
        """Point keys at rows (keys are unique within one file by construction)."""
        if self._dense is not None:
            ok = (keys >= 0) & (keys < len(self._dense))
            if not ok.all():
                keys, rows = keys[ok], rows[ok]
            free = self._dense[keys] < 0
            if not override:
                keys, rows = keys[free], rows[free]
                self.count += len(keys)
            else:
                self.count += int(np.count_nonzero(free))
            self._dense[keys] = rows
        else:
            m = self._map
            for k, r in zip(keys.tolist(), rows.tolist()):
                if override or k not in m:
                    if k not in m:
                        self.count += 1
                    m[k] = r

    def discard(self, key: int) -> None:
        """Forget a key's row (its bytes failed the checksum), so it is recomputed."""
        if self._dense is not None:
            if 0 <= key < len(self._dense) and self._dense[key] >= 0:
                self._dense[key] = -1
                self.count -= 1
        elif self._map.pop(key, None) is not None:
            self.count -= 1

    def _grow(self, need: int) -> None:
        cap = len(self.file)
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("file", "offset", "size", "checksum"):
            old = getattr(self, name)
            new = np.empty(cap, old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)
        slots = np.empty((cap, self.nslots), np.int64)
        slots[: self._n] = self.slots[: self._n]
        self.slots = slots

    def close(self) -> None:
        for r in self.readers:
            r.close()
