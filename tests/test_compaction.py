"""Consolidation at scale: bounded files, background merges, faults during merges, write volume."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import leftovers
from helpers import ListDataset, LogCalls, Ragged, add_one, assert_same, count_calls
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler

from cachedata import CachedDataset, compaction, fileset, namespace, storage

HERE = os.path.dirname(__file__)
pytestmark = pytest.mark.timeout(300)


def data_files(path) -> list[str]:
    return sorted(p.name for p in path.glob("*.h5") if not p.name.startswith("."))


def _bound() -> int:
    """Files a reader may find once merges have kept up: the runs' budget and the shards that
    do not yet make a merge."""
    return fileset.MAX_RUNS + fileset.SHARD_LIMIT


def _identity(batch):
    return batch


@pytest.fixture
def small_budget(monkeypatch):
    """Thresholds low enough that a few hundred items fill the runs' budget many times over
    and fold older runs (fork inherits them)."""
    monkeypatch.setattr(fileset, "SHARD_LIMIT", 4)
    monkeypatch.setattr(fileset, "MAX_RUNS", 4)
    monkeypatch.setattr(compaction, "CHECK_EVERY", 0.0)


@pytest.mark.parametrize("pattern", ["subset-outside", "subset-sampler", "direct"])
def test_worker_only_access_patterns_consolidate_without_len_or_merge(tmp_path, small_budget, pattern):
    """Workers write and merge by themselves: no len() or merge() on the CachedDataset."""
    n = 600
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=LogCalls(log))
    idx = list(range(0, n, 2)) + list(range(1, n, 2))
    if pattern == "subset-outside":
        loader = DataLoader(Subset(ds, idx), batch_size=4, num_workers=2, collate_fn=_identity,
                            multiprocessing_context="fork")  # fmt: skip
    elif pattern == "subset-sampler":
        loader = DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(idx), num_workers=2,
                            collate_fn=_identity, multiprocessing_context="fork")  # fmt: skip
    else:
        loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=_identity,
                            multiprocessing_context="fork")  # fmt: skip
    seen = sum(len(b) for b in loader)
    assert seen == n and count_calls(log) == n
    files = data_files(ds.path)
    # 150 batches made 150 shards; merges in the workers kept the folder small.
    assert len(files) <= _bound(), files
    assert sum(1 for f in files if f.startswith("run-")) >= 1  # merged in the background
    fresh = CachedDataset(Ragged(n), tmp_path / "c", transform=LogCalls(log))
    for i in range(0, n, 37):
        assert_same(fresh[i], add_one_log(Ragged(n)[i]))
    assert fresh.num_cached == n and count_calls(log) == n
    assert leftovers(tmp_path) == []


def add_one_log(item):
    return {"x": item["x"] * 2.0, "label": item["label"], "name": item["name"]}


def _spawned_rank(rank, ds, n, out):
    fileset.SHARD_LIMIT, fileset.MAX_RUNS = 4, 4
    compaction.CHECK_EVERY = 0.0
    for lo in range(rank * 4, n, 8):  # this rank's batches, as a DistributedSampler would
        ds.__getitems__(list(range(lo, min(lo + 4, n))))
    ds._store.background.join()
    out.put((rank, ds.stats.misses))


def test_dataset_built_in_parent_and_passed_to_spawned_processes_consolidates(tmp_path, small_budget):
    n = 400
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spawned_rank, args=(r, ds, n, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
    assert sum(got.values()) == n
    assert len(data_files(ds.path)) <= _bound(), data_files(ds.path)
    assert ds.num_cached == n


def test_main_process_peek_does_not_block_consolidation(tmp_path, small_budget):
    """Items computed in the main process before training (a look at ds[0]) stay unsealed,
    and the workers' shards still get merged."""
    n = 300
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    ds[0], ds[1]
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=_identity, multiprocessing_context="fork")
    assert sum(len(b) for b in loader) == n
    assert len(data_files(ds.path)) <= _bound()
    assert ds.stats.misses == n  # the peeked items were inherited by the forked workers


def test_background_merge_under_concurrent_readers(tmp_path, small_budget):
    """A reader in another process never sees a wrong value nor recomputes while files merge."""
    n = 240
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=LogCalls(log))
    for lo in range(0, n, 4):  # 60 shards, without merging
        ds.__getitems__(list(range(lo, lo + 4)))
        ds._store.buffer.write()
    ds._store.refresh()
    calls = count_calls(log)
    stop = tmp_path / "stop"
    code = textwrap.dedent(
        f"""
        import sys, pathlib
        sys.path.insert(0, {HERE!r})
        from helpers import Ragged, LogCalls
        from cachedata import CachedDataset
        ds = CachedDataset(Ragged({n}), {str(tmp_path / "c")!r}, transform=LogCalls({str(log)!r}))
        rounds = 0
        while not pathlib.Path({str(stop)!r}).exists() or rounds < 3:
            for lo in range(0, {n}, 16):
                for i, item in zip(range(lo, lo + 16), ds.__getitems__(list(range(lo, lo + 16)))):
                    assert item["name"] == f"item-{{i}}" and float(item["x"].sum()) == float(Ragged({n})[i]["x"].sum() * 2)
            rounds += 1
        print(rounds, ds.stats.misses)
        """
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for _ in range(6):  # merge while the reader reads
            if not compaction.consolidate(ds._store._target(), explicit=False, everything=False, wait=30):
                break
            time.sleep(0.05)
        ds.merge(full=True)
    finally:
        stop.write_text("")
        out, err = reader.communicate(timeout=240)
    assert reader.returncode == 0, err[-2000:]
    rounds, misses = map(int, out.split())
    assert rounds >= 3 and misses == 0
    assert count_calls(log) == calls
    assert data_files(ds.path) == [data_files(ds.path)[0]] and data_files(ds.path)[0].startswith("merged-")


def _slow_copy(delay):
    real = storage.copy_range

    def slow(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)

    return slow


def test_sigkill_while_merging_leaves_a_readable_cache_and_no_leftovers(tmp_path):
    n = 64
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    for lo in range(0, n, 8):
        ds.__getitems__(list(range(lo, lo + 8)))
        ds.flush()
    before = data_files(ds.path)
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {HERE!r})
        from helpers import Ragged, add_one
        from cachedata import CachedDataset, storage
        real = storage.copy_range
        def slow(*a, **k):
            print("copying", flush=True)
            time.sleep(60)
        storage.copy_range = slow
        CachedDataset(Ragged({n}), {str(tmp_path / "c")!r}, transform=add_one).merge()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "copying"
    assert fileset.locked(ds.path) and leftovers(tmp_path)  # mid-merge: a temporary file exists
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert data_files(ds.path) == before  # nothing retired
    fresh = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)  # sweeps the dead writer's file
    assert leftovers(tmp_path) == []
    for i in range(n):
        assert_same(fresh[i], add_one(Ragged(n)[i]))
    assert fresh.stats.misses == 0
    assert fresh.merge() and len(data_files(ds.path)) == 1  # the dead holder's lock was broken


def test_fork_during_a_background_merge(tmp_path, monkeypatch):
    """A process forked while a merge thread works in HDF5 can use HDF5 itself (no inherited lock)."""
    monkeypatch.setattr(fileset, "SHARD_LIMIT", 2)
    monkeypatch.setattr(compaction, "CHECK_EVERY", 0.0)
    monkeypatch.setattr(storage, "copy_range", _slow_copy(0.05))
    n = 40
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    for lo in range(0, n, 4):
        ds.__getitems__(list(range(lo, lo + 4)))
        ds._store.buffer.write()
    assert ds._store.background.poke(force=True)
    results = []
    ctx = mp.get_context("fork")
    for _ in range(5):
        q = ctx.Queue()
        p = ctx.Process(target=_child_reads, args=(ds, q))
        p.start()
        results.append(q.get(timeout=60))
        p.join(60)
        assert p.exitcode == 0
    ds._store.background.join()
    assert all(r == n for r in results), results
    assert ds.num_cached == n and leftovers(tmp_path) == []


def _child_reads(ds, q):
    fresh = CachedDataset(Ragged(len(ds)), ds.cache_dir, transform=add_one)
    q.put(sum(1 for i in range(len(ds)) if fresh.is_cached(i)))


def test_len_returns_while_a_merge_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(fileset, "SHARD_LIMIT", 2)
    monkeypatch.setattr(compaction, "CHECK_EVERY", 0.0)
    release = threading.Event()
    real = storage.copy_range

    def blocked(*a, **k):
        release.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(storage, "copy_range", blocked)
    ds = CachedDataset(Ragged(20), tmp_path / "c", transform=add_one)
    for lo in range(0, 20, 5):
        ds.__getitems__(list(range(lo, lo + 5)))
        ds._store.buffer.write()
    assert len(ds) == 20  # starts the background merge and returns
    thread = ds._store.background._thread
    assert thread is not None and thread.is_alive()
    assert len(ds) == 20 and ds[3]["label"] == 3  # reads go on during the merge
    release.set()
    ds._store.background.join()
    assert [f for f in data_files(ds.path) if f.startswith("shard-")] == []


def _keys_on_disk(path) -> list[int]:
    keys: list[int] = []
    for name in data_files(path):
        keys += storage.read_index(path / name, namespace=path.name).keys.tolist()
    return sorted(keys)


def test_explicit_merge_drops_duplicates_and_leaves_disjoint_files_alone(tmp_path):
    n = 120
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    ds.__getitems__(list(range(40)))
    assert ds.merge()
    (first,) = data_files(ds.path)
    ds.__getitems__(list(range(40, 80)))
    assert ds.merge()
    second = [f for f in data_files(ds.path) if f != first]
    assert len(second) == 1  # new items went into a file of their own: the first was not rewritten
    # Another job computed items 41 and 42 at the same time: they reach this merge's pile.
    for k in (41, 42):
        ds._store.put(k, add_one(Ragged(n)[k]), ds._identity(), where=k)
    ds.__getitems__(list(range(80, 90)))
    assert ds.merge()
    files = data_files(ds.path)
    assert first in files and second[0] not in files and len(files) == 2, files  # the overlap was merged in
    assert _keys_on_disk(ds.path) == list(range(90))  # every item once: duplicates dropped
    fresh = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    for i in (0, 41, 42, 85):
        assert_same(fresh[i], add_one(Ragged(n)[i]))
    assert fresh.stats.misses == 0


def test_a_merge_fsyncs_its_output_only_when_it_retires_a_run(tmp_path, monkeypatch):
    """Shards are never fsynced, so merging them into a run need not be either. A merge that
    removes a run (which may be on disk) makes its output durable before the rename."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    n = 90
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    ds.__getitems__(list(range(40)))
    assert ds.merge()
    assert not [s for s in synced if s.endswith(".h5")], synced  # shards in, no run out
    (first,) = data_files(ds.path)
    ds.__getitems__(list(range(40, 80)))
    assert ds.merge()
    assert not [s for s in synced if s.endswith(".h5")], synced  # new shards only: the first run stays
    assert ds._store.consolidate(ds._identity(), full=True)  # `cachedata merge --full`
    (merged,) = data_files(ds.path)
    # The output was fsynced under its temporary name, before the rename retired the runs.
    (out,) = [s for s in synced if s.endswith(".h5")]
    assert out.startswith(".tmp-") and out.endswith("-" + merged), synced
    assert first not in data_files(ds.path)
    fresh = CachedDataset(Ragged(n), tmp_path / "c", transform=add_one)
    for i in (0, 41, 79):
        assert_same(fresh[i], add_one(Ragged(n)[i]))
    assert fresh.stats.misses == 0


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_a_merge_checks_its_sources_without_keeping_them_in_its_rss(tmp_path):
    """A merge reads every source payload through a map to check its checksum; the pages it
    has checked are unmapped again, so merging 96 MiB raises the process's peak RSS by far
    less than that (it stays page cache either way)."""
    items = [torch.full((1 << 18,), i, dtype=torch.float32) for i in range(96)]  # 1 MiB each
    ds = CachedDataset(ListDataset(items), tmp_path / "c")
    for lo in range(0, 96, 8):
        ds.__getitems__(list(range(lo, lo + 8)))
        ds.flush()  # 12 shards of 8 MiB, no merge yet
    del items
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kib("VmHWM")
    assert ds.merge()
    grew = (_status_kib("VmHWM") - base) * 1024
    assert grew < 40 << 20, f"peak RSS grew by {grew / 2**20:.0f} MiB"
    for i in (0, 47, 95):
        assert torch.equal(ds[i], torch.full((1 << 18,), i, dtype=torch.float32))
    assert ds.stats.misses == 96  # only the cold reads


def test_growth_steps_write_a_bounded_volume(tmp_path):
    """Adding 5% to a merged cache writes at most 15% of it; 20 such steps at most 3x in all."""
    n0, step, steps = 400, 20, 20
    items = [torch.full((4096,), i, dtype=torch.float32) for i in range(n0 + step * steps)]
    seen: dict[str, int] = {}

    def written() -> int:
        for p in (tmp_path / "c").glob("*/*.h5"):
            seen.setdefault(p.name, p.stat().st_size)
        return sum(seen.values())

    ds = CachedDataset(ListDataset(items), tmp_path / "c")
    ds.__getitems__(list(range(n0)))
    written()
    ds.merge()
    base = written()
    size = sum(p.stat().st_size for p in ds.path.glob("*.h5"))
    for k in range(steps):
        lo = n0 + k * step
        ds.__getitems__(list(range(lo, lo + step)))
        ds.flush()
        before = written()
        ds.merge()
        after = written()
        if k == 0:
            assert after - base <= 0.15 * size, (after - base, size)
        assert before <= after
    final = sum(p.stat().st_size for p in ds.path.glob("*.h5"))
    assert written() <= 3.0 * final, (written(), final)
    for i in range(0, len(items), 13):
        assert torch.equal(ds[i], items[i])
    assert len(data_files(ds.path)) <= _bound()


def test_resource_errors_lose_nothing_under_a_low_open_files_limit(tmp_path):
    """ulimit -n 256 with 375 shards (background merges held back): reading them all needs
    more descriptors than the limit, and so would one merge of them all. Readers recycle
    their files and merges take the shards in rounds: every computed item survives, nothing
    is recomputed, and the folder ends as one merged file."""
    n = 3000
    log = tmp_path / "log"
    code = textwrap.dedent(
        f"""
        import logging, resource, sys
        sys.path.insert(0, {HERE!r})
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from helpers import Ragged, LogCalls
        from torch.utils.data import DataLoader
        from cachedata import CachedDataset, fileset
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        fileset.SHARD_LIMIT = 10**6  # no background merge: shards pile up
        ds = CachedDataset(Ragged({n}), {str(tmp_path / "c")!r}, transform=LogCalls({str(log)!r}))
        for lo in range(0, {n}, 8):
            ds.__getitems__(list(range(lo, lo + 8)))
            ds.flush()
        shards = len(list(ds.path.glob("shard-*.h5")))
        fresh = CachedDataset(Ragged({n}), {str(tmp_path / "c")!r}, transform=LogCalls({str(log)!r}))
        got = fresh.__getitems__(list(range({n})))
        assert [g["name"] for g in got] == [f"item-{{i}}" for i in range({n})]
        print("read", shards, fresh.stats.hits, fresh.stats.misses, flush=True)
        fresh.merge()
        print("files", sorted(p.name[:7] for p in fresh.path.glob("*.h5")), flush=True)
        loader = DataLoader(fresh, batch_size=64, num_workers=2, collate_fn=lambda b: b,
                            multiprocessing_context="fork")
        print("epoch", sum(len(b) for b in loader), fresh.stats.misses, flush=True)
        del loader
        starved = CachedDataset(Ragged({n}), {str(tmp_path / "c")!r}, transform=LogCalls({str(log)!r}))
        # Now leave one descriptor free: maps and loads fail with EMFILE, which is no corruption.
        hog = []
        try:
            while True:
                hog.append(open("/dev/null"))
        except OSError:
            pass
        hog.pop().close()  # one left: enough to open a file, not to map it too
        got = starved.__getitems__(list(range(0, {n}, 7)))
        assert [g["name"] for g in got] == [f"item-{{i}}" for i in range(0, {n}, 7)]
        for f in hog:
            f.close()
        print("files", sorted(p.name[:7] for p in fresh.path.glob("*.h5")), flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"read 375 {n} 0", out.stdout + out.stderr[-2000:]
    assert lines[1] == "files ['merged-']", out.stdout
    assert lines[2] == f"epoch {n} 0", out.stdout
    assert lines[3] == "files ['merged-']", out.stdout  # the starved reader deleted nothing
    assert "corrupt" not in out.stderr and "dropping" not in out.stderr, out.stderr[-2000:]
    # One warning that names the limit and how to raise it.
    assert out.stderr.count("Raise the open-files limit (now 256") == 1, out.stderr[-2000:]
    fresh = CachedDataset(Ragged(n), tmp_path / "c", transform=LogCalls(log))
    calls = count_calls(log)
    assert fresh.num_cached == n
    assert [g["name"] for g in fresh.__getitems__(list(range(n)))] == [f"item-{i}" for i in range(n)]
    assert count_calls(log) == calls and fresh.stats.misses == 0
    assert leftovers(tmp_path) == []


def _max_files_during(loader, folder) -> tuple[int, int]:
    """Iterate ``loader`` while a thread counts the data files; (items seen, most files at once)."""
    most, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            with contextlib.suppress(OSError):
                most[0] = max(most[0], len(data_files(folder)))
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        seen = sum(len(b) for b in loader)
    finally:
        done.set()
        t.join()
    return seen, most[0]


@pytest.mark.parametrize("stall", [True, False], ids=["workers-wait", "control-no-wait"])
def test_a_pass_that_outruns_merges_keeps_files_few(tmp_path, monkeypatch, stall):
    """Writers faster than merges (slowed copies here, the disk in a cold pass of cheap items):
    workers that find the folder overdue merge before writing on, so the file count stays
    bounded all through the pass. The control run, whose workers never find it overdue (so
    neither wait nor seal less often), shows the pile the two prevent."""
    monkeypatch.setattr(fileset, "SHARD_LIMIT", 2)
    monkeypatch.setattr(fileset, "MAX_RUNS", 4)
    monkeypatch.setattr(compaction, "CHECK_EVERY", 0.0)
    monkeypatch.setattr(storage, "copy_range", _slow_copy(0.02))
    if not stall:
        monkeypatch.setattr(fileset, "overdue", lambda listing: False)  # forked workers inherit it
    n, workers = 400, 2
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(n), tmp_path / "c", transform=LogCalls(log))
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=_identity,
                        multiprocessing_context="fork")  # fmt: skip
    seen, most = _max_files_during(loader, ds.path)
    assert seen == n and count_calls(log) == n
    # overdue at 2 x SHARD_LIMIT shards (+ one in flight per worker); every merge leaves at
    # most MAX_RUNS runs (+ its output, published just before its sources are retired)
    bound = 2 * fileset.SHARD_LIMIT + workers + fileset.MAX_RUNS + 1
    if stall:
        assert most <= bound, (most, bound)
    else:
        assert most > bound, (most, bound)  # what the wait (and sealing less often) prevents
    fresh = CachedDataset(Ragged(n), tmp_path / "c", transform=LogCalls(log))
    assert fresh.num_cached == n and count_calls(log) == n
    assert leftovers(tmp_path) == []


def test_workers_seal_by_size_and_time_while_merges_lag(tmp_path, monkeypatch):
    """With a backlog of shards (merges held back here), a worker stops sealing every batch."""
    monkeypatch.setattr(fileset, "SHARD_LIMIT", 2)  # backlog from 4 shards on
    monkeypatch.setattr(compaction, "CHECK_EVERY", 0.0)
    monkeypatch.setattr(compaction.Background, "_run", lambda self, target: None)  # no merges
    monkeypatch.setattr(namespace, "STALL_SECONDS", 0.0)  # nor merges in the worker's write path
    n = 40
    ds = CachedDataset(Ragged(n + 40), tmp_path / "c", transform=add_one)
    for lo in range(n, n + 40, 4):  # ten shards already waiting
        ds.__getitems__(list(range(lo, lo + 4)))
        ds._store.buffer.write()
    before = set(data_files(ds.path))
    loader = DataLoader(Subset(ds, list(range(n))), batch_size=4, num_workers=1, collate_fn=_identity,
                        multiprocessing_context="fork")  # fmt: skip
    assert sum(len(b) for b in loader) == n
    new = set(data_files(ds.path)) - before
    # Ten batches: the first seals (and finds the backlog), the rest wait for 64 items, a
    # second, or the worker's exit. Every item is still stored.
    assert 1 <= len(new) <= 3, sorted(new)
    fresh = CachedDataset(Ragged(n + 40), tmp_path / "c", transform=add_one)
    assert fresh.num_cached == n + 40
