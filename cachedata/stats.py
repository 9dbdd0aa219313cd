"""CacheStats and the counters that a process shares with its own DataLoader workers."""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import asdict, dataclass
from multiprocessing.context import get_spawning_popen

import torch
from torch.utils.data import get_worker_info

_FIELDS = ("hits", "misses", "writes", "bytes_read", "bytes_written", "compute_seconds", "read_seconds")
_WIDTH = len(_FIELDS)
_HITS, _BYTES_READ, _READ_SECONDS = (_FIELDS.index(f) for f in ("hits", "bytes_read", "read_seconds"))
#: A row is the counters plus one cell naming the process that writes it: its pid, or
#: _FREE (never handed out) or _HANDED (handed to a process starting up, not claimed yet).
_HOLDER = _WIDTH
_STRIDE = _WIDTH + 1
_FREE = 0.0
_HANDED = -1.0
#: Rows per block. A block stays small (16 x 8 float64 = 1 KiB): torch's fd-shared allocation
#: of 32 KiB and more hangs when first made in a forked child (torch 2.13), and a forked
#: rank makes its first block there. More workers than rows get further blocks.
_ROWS = 16


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


def _new_block() -> torch.Tensor:
    return torch.zeros((_ROWS, _STRIDE), dtype=torch.float64).share_memory_()


def _alive(pid: int) -> bool:
    """False once process ``pid`` has exited (and been reaped); a reused pid reads as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process took the pid
        return True
    return True


class Counters:
    """Counters in shared memory: a row for the owning process and one for each of its workers.

    The blocks are shared-memory tensors: fork children inherit them and spawn/forkserver
    children receive them through torch's multiprocessing pickler, so workers' counts reach
    their parent without any messages. Each process adds only to its own row, so no two
    processes ever write the same cell and no lock is needed:

    - the owner (the process that made the counters) writes row 0 of block 0;
    - the owner hands each process it starts (a DataLoader worker, forked or spawned) a row
      of its own just before the start: a row never handed out, or one whose holder has
      exited (its counts stay and the new holder adds to them). When every row is taken, a
      new block is added, so any number of workers, over any number of epochs, get distinct
      rows, and the rows in use stay as many as the processes alive at once.

    The counters are shared only between their *owner* and the owner's DataLoader workers.
    Any other process that ends up with a copy (a rank started by ``mp.spawn(fn,
    args=(dataset,))`` or by a fork, Lightning's ``ddp_spawn``) starts fresh counters of its
    own on first use, and becomes their owner: each rank's ``stats`` are its own.
    """

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._blocks = [_new_block()]
        self._blocks[0][0, _HOLDER] = self._owner
        self._row: tuple[int, int] | None = None  # the row handed to this process by the owner
        self._lock = threading.Lock()  # the owner hands out rows from any thread
        self._cells: memoryview[float] | None = None
        self._base = 0
        _LIVE.add(self)

    def __getstate__(self) -> dict:
        if os.getpid() != self._owner and get_worker_info() is None:
            # A rank that got these counters from its parent hands its workers its own.
            self._attach()
        # A process being started (spawn, forkserver) gets a row; a plain pickle gets none.
        row = self._hand_out() if os.getpid() == self._owner and get_spawning_popen() is not None else None
        return {"_blocks": self._blocks, "_owner": self._owner, "_row": row}

    def __setstate__(self, state: dict) -> None:
        self._blocks = state["_blocks"]
        self._owner = state["_owner"]
        self._lock = threading.Lock()
        self._cells = None
        self._base = 0
        self._row = None
        self._claim(state["_row"])
        _LIVE.add(self)

    def _hand_out(self) -> tuple[int, int]:
        """(block, row) for a process about to start: a free row, or one whose holder has exited."""
        with self._lock:
            for b, block in enumerate(self._blocks):
                for r, holder in enumerate(block[:, _HOLDER].tolist()):
                    if holder == _FREE or (holder > 0 and not _alive(int(holder))):
                        block[r, _HOLDER] = _HANDED
                        return b, r
            block = _new_block()
            block[0, _HOLDER] = _HANDED
            self._blocks.append(block)
            return len(self._blocks) - 1, 0

    def _claim(self, row: tuple[int, int] | None) -> None:
        """In a process just started by the owner: write its pid into the row it was handed."""
        if row is None:
            return
        b, r = row
        if os.getpid() == self._owner:  # unpickled in the owner itself (a copy): nothing to hold
            self._blocks[b][r, _HOLDER] = _FREE
            return
        self._blocks[b][r, _HOLDER] = os.getpid()
        self._row = row

    def _attach(self) -> memoryview[float]:
        """Find this process's row, first making counters of its own if this is a foreign process.

        Runs once per process (``_cells`` is reset after a fork and by unpickling).
        """
        pid = os.getpid()
        if pid == self._owner:
            b, r = 0, 0
        elif self._row is not None and get_worker_info() is not None:
            b, r = self._row
        else:  # not started by the owner as a worker: a rank, or a worker's own child
            if self._row is not None:
                rb, rr = self._row
                self._blocks[rb][rr, _HOLDER] = _FREE  # give the owner its row back
                self._row = None
            self._blocks = [_new_block()]
            self._blocks[0][0, _HOLDER] = pid
            self._owner = pid
            b, r = 0, 0
        self._base = r * _STRIDE
        self._cells = memoryview(self._blocks[b].numpy()).cast("B").cast("d")
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

    def hit(self, nbytes: int, seconds: float) -> None:
        """``add(hits=1, bytes_read=nbytes, read_seconds=seconds)`` unrolled: ``ds[i]``'s hot path,
        where the general loop over seven fields costs about a microsecond an item."""
        cells = self._cells
        if cells is None:
            cells = self._attach()
        base = self._base
        cells[base + _HITS] += 1
        cells[base + _BYTES_READ] += nbytes
        cells[base + _READ_SECONDS] += seconds

    def snapshot(self) -> CacheStats:
        """The sum over this process (or its owner, in a worker) and the owner's workers.

        In a worker, blocks the owner added after the worker started are not included.
        """
        if self._cells is None:
            self._attach()
        total = torch.stack([block[:, :_WIDTH].sum(0) for block in self._blocks]).sum(0).tolist()
        hits, misses, writes, bytes_read, bytes_written = (round(v) for v in total[:5])
        return CacheStats(
            hits, misses, writes, bytes_read, bytes_written, compute_seconds=total[5], read_seconds=total[6]
        )


#: Every Counters alive in this process; after a fork, the child claims the row handed to it.
_LIVE: weakref.WeakSet[Counters] = weakref.WeakSet()
#: Rows handed out by the thread that is forking, to the child it forks.
_FORKING = threading.local()


def _before_fork() -> None:
    handed = []
    in_worker = get_worker_info() is not None
    for counters in list(_LIVE):
        if counters._owner != os.getpid():
            if in_worker:
                continue  # a worker's own children get no row of the owner's
            # A foreign process (a forked rank) takes its own counters before forking workers,
            # so that the workers count into the rank's blocks and not into the rank's parent's.
            counters._attach()
        handed.append((counters, counters._hand_out()))
    _FORKING.handed = handed


def _after_fork_in_parent() -> None:
    _FORKING.handed = []


def _after_fork_in_child() -> None:
    handed = dict((id(c), row) for c, row in getattr(_FORKING, "handed", []))
    _FORKING.handed = []
    for counters in list(_LIVE):
        counters._lock = threading.Lock()  # another thread may have held it at the fork
        counters._cells = None
        counters._row = None
        counters._claim(handed.get(id(counters)))


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
