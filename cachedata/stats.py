"""CacheStats and the counters that a process shares with its own DataLoader workers."""

from __future__ import annotations

import os
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import get_worker_info

_FIELDS = ("hits", "misses", "writes", "bytes_read", "bytes_written", "compute_seconds", "read_seconds")
_WIDTH = len(_FIELDS)
#: DataLoader workers with distinct rows: worker w writes row 1 + w % _WORKER_ROWS, so only
#: workers whose ids differ by a multiple of 256 share a row, never the owner's row 0.
#: The block stays at 257 x 7 float64 (14 KiB): torch's fd-shared allocation of 32 KiB and
#: more hangs when first made in a forked child (torch 2.13).
_WORKER_ROWS = 256


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


def row_of(worker: int | None) -> int:
    """The counter row of the owner (``worker=None``) or of its DataLoader worker ``worker``."""
    return 0 if worker is None else 1 + worker % _WORKER_ROWS


def _new_block() -> torch.Tensor:
    return torch.zeros((1 + _WORKER_ROWS, _WIDTH), dtype=torch.float64).share_memory_()


class Counters:
    """Counters in shared memory: row 0 for the owning process, one row per DataLoader worker.

    The block is a shared-memory tensor: fork children inherit it and spawn/forkserver
    children receive it through torch's multiprocessing pickler, so workers' counts reach
    their parent without any messages. Each process adds only to its own row.

    The block is shared only between its *owner* (the process that made it) and the owner's
    DataLoader workers. Any other process that ends up with a copy (a rank started by
    ``mp.spawn(fn, args=(dataset,))`` or by a fork, Lightning's ``ddp_spawn``) starts a fresh
    block of its own on first use, and becomes its owner: each rank's ``stats`` are its own.
    """

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._block = _new_block()
        self._cells: memoryview | None = None
        self._base = 0
        _LIVE.add(self)

    def __getstate__(self) -> dict:
        # A rank that got this block from its parent hands its workers a block of its own.
        self._attach()
        return {"_block": self._block, "_owner": self._owner}

    def __setstate__(self, state: dict) -> None:
        self._block = state["_block"]
        self._owner = state["_owner"]
        self._cells = None
        self._base = 0
        _LIVE.add(self)

    def _attach(self) -> memoryview:
        """Pick this process's row, first making a private block if this is a foreign process.

        Runs once per process (``_cells`` is reset after a fork and by unpickling).
        """
        info = get_worker_info()
        pid = os.getpid()
        if pid != self._owner and info is None:
            self._block = _new_block()
            self._owner = pid
        self._base = row_of(None if info is None or pid == self._owner else info.id) * _WIDTH
        self._cells = memoryview(self._block.numpy()).cast("B").cast("d")
        return self._cells

    def add(self, *, hits: int = 0, misses: int = 0, writes: int = 0, bytes_read: int = 0,
            bytes_written: int = 0, compute_seconds: float = 0.0, read_seconds: float = 0.0) -> None:  # fmt: skip
        """Add to this process's row.

        Plain float adds through a memoryview of the shared block: well under a microsecond,
        so even the single-item path can count every access, and a miss can be counted as
        soon as it is computed (a worker shut down mid-batch loses no count).
        """
        cells = self._cells
        if cells is None:
            cells = self._attach()
        base = self._base
        for i, v in enumerate(
            (hits, misses, writes, bytes_read, bytes_written, compute_seconds, read_seconds)
        ):
            if v:
                cells[base + i] += v

    def snapshot(self) -> CacheStats:
        """The sum over this process (or its owner, in a worker) and the owner's workers."""
        if self._cells is None:
            self._attach()
        total = self._block.sum(0).tolist()
        ints = [round(v) for v in total[:5]]
        return CacheStats(*ints, compute_seconds=total[5], read_seconds=total[6])


#: Every Counters alive in this process; after a fork, the child re-picks its row.
_LIVE: weakref.WeakSet[Counters] = weakref.WeakSet()


def _before_fork() -> None:
    # A foreign process (a forked rank) takes its own block before forking workers, so that
    # the workers count into the rank's block and not into the rank's parent's.
    for counters in list(_LIVE):
        if counters._owner != os.getpid() and get_worker_info() is None:
            counters._attach()


def _after_fork_in_child() -> None:
    for counters in list(_LIVE):
        counters._cells = None


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
