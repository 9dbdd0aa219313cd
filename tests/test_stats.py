"""CacheStats per process: every transform call counted, and each rank's stats its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp_mp
from helpers import LogCalls, Ragged, count_calls, identity_batch
from torch.utils.data import DataLoader

from cachedata import CachedDataset
from cachedata.stats import _FIELDS, _HOLDER, _ROWS, Counters


def _holders(counters: Counters) -> list[int]:
    """The pid in each row's holder cell, over every block (0: never handed out)."""
    return [int(h) for block in counters._blocks for h in block[:, _HOLDER].tolist()]


def _pid_batch(batch: list) -> int:
    return os.getpid()


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize(("start_method", "workers"), [("fork", _ROWS + 4), ("spawn", 3)])
def test_every_worker_counts_in_a_row_of_its_own(tmp_path, start_method, workers):
    """More workers than a block has rows: still one row each, none shared with the owner.

    A second epoch's workers take the rows of the first epoch's, which have exited.
    """
    ds = CachedDataset(Ragged(workers), tmp_path / "c", transform=identity_batch)
    for epoch in range(2):
        loader = DataLoader(
            ds,
            batch_size=1,  # batch i goes to worker i: every worker counts exactly one item
            num_workers=workers,
            collate_fn=_pid_batch,
            multiprocessing_context=start_method,
        )
        pids = list(loader)
        del loader
        assert len(set(pids)) == workers
        holders = _holders(ds._counters)
        assert holders[0] == os.getpid(), "row 0 stays the owner's"
        assert sorted(h for h in holders if h in pids) == sorted(pids), "each worker holds exactly one row"
        stats = ds.stats
        assert stats.misses == workers, "each item is computed once, by one worker"
        assert stats.hits + stats.misses == workers * (epoch + 1), stats
    assert len(ds._counters._blocks) == -(-(1 + workers) // _ROWS), "rows of exited workers are reused"


def test_counters_add_every_field_to_its_own_column():
    counters = Counters()
    values = dict(zip(_FIELDS, (1, 2, 3, 4, 5, 0.5, 0.25)))
    counters.add(**values)
    counters.add(**values)
    assert counters.snapshot().to_dict() == {
        **{k: 2 * v for k, v in values.items()},
        "hit_rate": 1 / 3,
    }


class _Tokens:
    """1-D int64 tensors of 1..40 values: the single-leaf path of ``ds[i]``."""

    def __len__(self) -> int:
        return 60

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.arange(i % 40 + 1, dtype=torch.int64)


def test_single_item_hits_count_what_batched_hits_count(tmp_path):
    """ds[i]'s unrolled hit counter adds what ``add`` adds: one hit, its payload bytes, its time."""
    CachedDataset(_Tokens(), tmp_path).__getitems__(list(range(60)))  # cold: all computed
    payload = sum(8 * (i % 40 + 1) for i in range(60))
    batched = CachedDataset(_Tokens(), tmp_path)
    batched.__getitems__(list(range(60)))
    single = CachedDataset(_Tokens(), tmp_path)
    for i in range(60):
        assert torch.equal(single[i], _Tokens()[i])
    for stats in (batched.stats, single.stats):
        assert (stats.hits, stats.misses, stats.writes, stats.bytes_read) == (60, 0, 0, payload)
        assert stats.read_seconds > 0 and stats.compute_seconds == 0


_DYING = """
import os, signal
from helpers import LogCalls


class LogThenDie(LogCalls):
    # LogCalls, except that the process asked for item-29 kills itself (before logging it).
    def __call__(self, item):
        if item["name"] == "item-29":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(item)
"""

_KILLED_MID_BATCH = """
import json, os, signal, sys
sys.path[:0] = [{tests!r}, {here!r}]  # spawned workers get the same sys.path
from dying import LogThenDie
from helpers import Ragged, identity_batch
from torch.utils.data import DataLoader
from cachedata import CachedDataset

ds = CachedDataset(Ragged(40), {cache!r}, transform=LogThenDie({log!r}))
loader = DataLoader(ds, batch_size=8, num_workers=1, collate_fn=identity_batch,
                    multiprocessing_context={start!r})
died = False
try:
    for _ in loader:
        pass
except RuntimeError as exc:
    died = "DataLoader worker" in str(exc)
except (EOFError, ConnectionError):
    died = True  # killed while handing a batch's shared memory over: a reset connection
# The DataLoader's SIGCHLD handler may raise the worker's death once more, at any moment
# (even inside the except above): report until it has had its say, then leave.
while True:
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        print(json.dumps({{"died": died, "misses": ds.stats.misses}}), flush=True)
        os._exit(0)
    except RuntimeError as exc:
        died = died or "DataLoader worker" in str(exc)
    except (EOFError, ConnectionError):
        died = True
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_worker_killed_mid_batch_has_counted_every_call_it_made(tmp_path, start_method):
    """Misses are counted as they are computed, not at the end of the batch.

    In a subprocess: the DataLoader's SIGCHLD handler reports the killed worker
    asynchronously, which must not reach the test runner.
    """
    log = tmp_path / "log"
    (tmp_path / "dying.py").write_text(_DYING)
    script = _KILLED_MID_BATCH.format(
        tests=str(Path(__file__).resolve().parent),
        here=str(tmp_path),
        cache=str(tmp_path / "c"),
        log=str(log),
        start=start_method,
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["died"], proc.stderr
    calls = count_calls(log)
    assert calls == 29  # items 0..28: the batch 24..31 died at its 6th item
    assert got["misses"] == calls


def _rank(rank: int, ds: CachedDataset, out: str, worker_start: str) -> None:
    before = ds.stats
    own = list(range(4 + 16 * rank, 4 + 16 * (rank + 1)))
    loader = DataLoader(
        ds,
        batch_size=4,
        sampler=[0, 1, 2, 3, *own],
        num_workers=2,
        collate_fn=identity_batch,
        multiprocessing_context=worker_start,
    )
    for _ in loader:
        pass
    del loader
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"before": before.to_dict(), "after": ds.stats.to_dict()})
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("rank_start", "worker_start"), [("spawn", "fork"), ("fork", "spawn")])
def test_a_dataset_passed_to_spawned_ranks_shows_each_rank_its_own_stats(tmp_path, rank_start, worker_start):
    """mp.spawn(fn, args=(ds,)) and Lightning's ddp_spawn: the parent's counter block stays its own."""
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(36), tmp_path / "c", transform=LogCalls(log))
    for i in range(4):
        ds[i]
    ds.flush()
    tmp_mp.start_processes(
        _rank, args=(ds, str(tmp_path), worker_start), nprocs=2, join=True, start_method=rank_start
    )
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (got["before"]["hits"], got["before"]["misses"]) == (0, 0), "a rank starts from zero"
        # Its 4 reads of the parent's items are hits and its own 16 items misses, counted
        # by its DataLoader workers into the rank's block, not into the parent's.
        assert (got["after"]["hits"], got["after"]["misses"]) == (4, 16), (rank, got)
        assert got["after"]["writes"] == 16
    assert (ds.stats.hits, ds.stats.misses) == (0, 4), "the ranks' counts stay out of the parent"
    assert count_calls(log) == 4 + 2 * 16
