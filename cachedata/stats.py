"""CacheStats and the counters that DataLoader workers share with the main process."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

_FIELDS = ("hits", "misses", "writes", "bytes_read", "bytes_written", "compute_seconds", "read_seconds")
#: Rows of the shared counter block: row 0 for the main process, row 1 + w for worker w.
_ROWS = 257


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a CachedDataset's counters (this process and its DataLoader workers).

    ``compute_seconds`` is time spent in ``dataset[i]`` + ``transform`` on misses and
    ``read_seconds`` time spent reading and decoding hits, both in seconds.
    """

    hits: int = 0
    misses: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    compute_seconds: float = 0.0
    read_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 when nothing was looked up."""
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0

    def to_dict(self) -> dict:
        """The counters and ``hit_rate`` as a plain dict (for logging or JSON)."""
        return {**asdict(self), "hit_rate": self.hit_rate}


class Counters:
    """Counters in shared memory, one row per process, summed by ``snapshot()``.

    The block is a shared-memory tensor: fork children inherit it and spawn/forkserver
    children receive it through torch's multiprocessing pickler, so workers' counts reach
    the main process without any messages. Each process adds only to its own row.
    """

    def __init__(self) -> None:
        self._block = torch.zeros((_ROWS, len(_FIELDS)), dtype=torch.float64).share_memory_()
        self._cells: memoryview | None = None

    def __getstate__(self) -> dict:
        return {"_block": self._block}

    def __setstate__(self, state: dict) -> None:
        self._block = state["_block"]
        self._cells = None

    def add(self, row: int, hits: int = 0, misses: int = 0, writes: int = 0, bytes_read: int = 0,
            bytes_written: int = 0, compute_seconds: float = 0.0, read_seconds: float = 0.0) -> None:  # fmt: skip
        """Add to this process's row (``row`` from the caller's worker id).

        Plain float adds through a memoryview of the shared block: well under a microsecond,
        so even the single-item path can count every access.
        """
        cells = self._cells
        if cells is None:
            cells = self._cells = memoryview(self._block.numpy()).cast("B").cast("d")
        base = (row % _ROWS) * 7
        for i, v in enumerate(
            (hits, misses, writes, bytes_read, bytes_written, compute_seconds, read_seconds)
        ):
            if v:
                cells[base + i] += v

    def snapshot(self) -> CacheStats:
        """The sum over all processes."""
        total = self._block.sum(0).tolist()
        ints = [round(v) for v in total[:5]]
        return CacheStats(*ints, compute_seconds=total[5], read_seconds=total[6])
