"""CachedDataset under real DataLoader worker processes: every start method, persistent or not."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import leftovers
from helpers import LogCalls, Ragged, assert_same, count_calls, identity_batch
from torch.utils.data import DataLoader

from cachedata import CachedDataset

N = 48


def _epoch(loader):
    return {item["name"]: item for batch in loader for item in batch}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_each_item_computed_once_across_workers_and_epochs(tmp_path, start_method, persistent, num_workers):
    log = tmp_path / "calls.log"
    base = Ragged(N)
    ds = CachedDataset(base, tmp_path / "cache", transform=LogCalls(log))
    loader = DataLoader(
        ds,
        batch_size=5,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=identity_batch,
        multiprocessing_context=start_method,
        persistent_workers=persistent,
        generator=torch.Generator().manual_seed(0),
    )
    first = _epoch(loader)
    assert count_calls(log) == N, "epoch 1 must compute every item exactly once"
    pids = {line.split()[0] for line in log.read_text().splitlines()}
    assert str(os.getpid()) not in pids and len(pids) == num_workers, "workers computed, not the main process"
    second = _epoch(loader)
    assert count_calls(log) == N, "epoch 2 must compute nothing"
    reference = LogCalls(tmp_path / "ref.log")
    for i in range(N):
        want = reference(base[i])
        assert_same(first[f"item-{i}"], want, f"epoch 1 item {i}")
        assert_same(second[f"item-{i}"], want, f"epoch 2 item {i}")
    s = ds.stats
    assert (s.misses, s.hits) == (N, N), "main-process stats include the workers' counters"
    assert s.writes == N and s.bytes_written > 0 and s.compute_seconds > 0
    # Each worker wrote only its own shards; nothing temporary is left.
    for shard in ds.path.glob("shard-*.h5"):
        assert "-wm-" not in shard.name
    assert leftovers(tmp_path) == []


@pytest.mark.timeout(120)
def test_num_workers_zero_and_getitems_is_the_batched_path(tmp_path):
    log = tmp_path / "calls.log"
    ds = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
    calls = []
    original = ds.__getitems__
    ds.__getitems__ = lambda idx: calls.append(len(idx)) or original(idx)
    loader = DataLoader(ds, batch_size=8, num_workers=0, collate_fn=identity_batch)
    _epoch(loader)
    _epoch(loader)
    assert calls and set(calls) == {8} and count_calls(log) == N


@pytest.mark.timeout(180)
def test_workers_merge_shards_in_the_background(tmp_path, monkeypatch):
    from cachedata import compaction, fileset

    monkeypatch.setattr(fileset, "SHARD_LIMIT", 4)  # forked workers inherit it
    monkeypatch.setattr(compaction, "CHECK_EVERY", 0.0)
    ds = CachedDataset(Ragged(N), tmp_path, transform=LogCalls(tmp_path / "log"))
    loader = DataLoader(
        ds, batch_size=3, num_workers=2, collate_fn=identity_batch, multiprocessing_context="fork"
    )
    _epoch(loader)
    names = sorted(p.name for p in ds.path.glob("*.h5"))
    assert any(n.startswith("run-") for n in names) and sum(n.startswith("shard-") for n in names) < 4 + 2, (
        names
    )
    _epoch(loader)  # all hits
    assert count_calls(tmp_path / "log") == N
    ds.merge()  # an explicit merge takes in the background runs: one file
    files = sorted(p.name for p in ds.path.glob("*.h5"))
    assert len(files) == 1 and files[0].startswith("merged-"), files


def _reader(path: str, n: int, log: str, seconds: float, queue) -> None:
    ds = CachedDataset(Ragged(n), path, transform=LogCalls(log))
    deadline = time.monotonic() + seconds
    reads = 0
    wrong = 0
    want = LogCalls(os.devnull)
    base = Ragged(n)
    while time.monotonic() < deadline:
        for i in range(n):
            got = ds[i]
            if not torch.equal(got["x"], want(base[i])["x"]):
                wrong += 1
            reads += 1
    queue.put((reads, wrong, ds.stats.misses))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_reader_in_another_process_keeps_working_across_merges(tmp_path, start_method):
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(N), tmp_path / "c", transform=LogCalls(log))
    for i in range(N):
        ds[i]
        if i % 10 == 9:
            ds.flush()  # several shards
    ds.flush()
    ctx = mp.get_context(start_method)
    q = ctx.Queue()
    proc = ctx.Process(target=_reader, args=(str(tmp_path / "c"), N, str(log), 4.0, q))
    proc.start()
    time.sleep(1.0 if start_method == "fork" else 2.5)
    for _ in range(3):  # merge repeatedly while the other process reads
        [ds[i] for i in range(N)]
        ds._store.consolidate(ds._identity())
        time.sleep(0.2)
    reads, wrong, misses = q.get(timeout=120)
    proc.join(60)
    assert proc.exitcode == 0
    assert reads > N and wrong == 0 and misses == 0
    assert count_calls(log) == N
    assert len(list((tmp_path / "c").glob("*/merged-*.h5"))) == 1


@pytest.mark.timeout(180)
def test_worker_killed_mid_epoch_loses_only_its_unsealed_items(tmp_path):
    """SIGKILL a process in the middle of writing: the cache stays readable, the rest is kept."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import Ragged, LogCalls
        from cachedata import CachedDataset
        ds = CachedDataset(Ragged({N}), {str(tmp_path / "c")!r}, transform=LogCalls({str(tmp_path / "log")!r}))
        for i in range(20):
            ds[i]
        ds.flush()
        for i in range(20, 30):
            ds[i]
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -9
    ds = CachedDataset(Ragged(N), tmp_path / "c", transform=LogCalls(tmp_path / "log"))
    assert ds.num_cached == 20
    [ds[i] for i in range(N)]
    assert count_calls(tmp_path / "log") == 30 + (N - 20)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_see_items_the_main_process_computed_but_did_not_seal(tmp_path, start_method):
    log = tmp_path / "calls.log"
    ds = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
    _epoch(DataLoader(ds, batch_size=6, num_workers=0, collate_fn=identity_batch))
    assert count_calls(log) == N and ds._store.unsealed[0]  # buffered in the main process only
    loader = DataLoader(
        ds, batch_size=6, num_workers=2, collate_fn=identity_batch, multiprocessing_context=start_method
    )
    got = _epoch(loader)
    assert count_calls(log) == N, "workers recomputed items the main process had computed"
    assert len(got) == N
