"""The disk budget of a cache folder (cachedata.budget, leases, usage, eviction, tracker), with
real processes and real files.

Namespaces are built in the test process (then released); the processes that hold, evict,
or run over the budget are separate Python processes, as training jobs would be.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import leftovers
from helpers import LogCalls, Ragged, add_one, assert_same, count_calls

from cachedata import CachedDataset, budget, eviction, leases, usage

HERE = os.path.dirname(__file__)
N = 60  # items per namespace in most tests
HOUR = 3600.0

# One training job: open a namespace of Ragged(n) through add_one with a version, read every
# item for some epochs (main process batches, or a DataLoader with forked workers), check
# every value, print a JSON summary; with "hold", then keep the dataset open until stdin closes.
JOB = textwrap.dedent(
    """
    import json, logging, os, sys
    sys.path.insert(0, {here!r})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(process)d %(message)s")
    args = json.loads(sys.argv[1])
    import torch
    from torch.utils.data import DataLoader
    from helpers import Ragged, add_one, identity_batch
    from cachedata import CachedDataset
    n = args["n"]
    kw = {{"max_bytes": args["max_bytes"]}} if args.get("max_bytes") is not None else {{}}
    ds = CachedDataset(Ragged(n), args["cache"], transform=add_one, version=args["version"], **kw)
    want = [add_one(Ragged(n)[i]) for i in range(n)]
    bad = 0
    for epoch in range(args.get("epochs", 1)):
        if args.get("workers"):
            loader = DataLoader(ds, batch_size=6, num_workers=args["workers"], collate_fn=identity_batch,
                                multiprocessing_context="fork")
            got = [x for batch in loader for x in batch]
        else:
            len(ds)  # an epoch starts: the sampler asks for the length
            got = []
            for lo in range(0, n, 6):  # one shard per 6 items, like build() in the test
                got += ds.__getitems__(list(range(lo, min(n, lo + 6))))
                ds.flush()
        assert len(got) == n  # in order: no shuffling
        bad += sum(not (torch.equal(g["x"], w["x"]) and g["label"] == w["label"]) for g, w in zip(got, want))
    ds.flush()
    print(json.dumps({{"bad": bad, "path": str(ds.path), "misses": ds.stats.misses, "writes": ds.stats.writes,
                      "over_budget": ds.over_budget, "repr": repr(ds), "num_cached": ds.num_cached,
                      "max_bytes": ds.max_bytes, "pid": os.getpid()}}), flush=True)
    if args.get("hold"):
        sys.stdin.read()  # keep the dataset (and its lease) open until the test closes stdin
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CACHEDATA_MAX_BYTES", "CACHEDATA_SHARED_FS")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(HERE).parent), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def start_job(cache: Path, version: str, *, env: dict[str, str] | None = None, **args) -> subprocess.Popen:
    code = JOB.format(here=HERE)
    spec = json.dumps({"cache": str(cache), "version": version, "n": N, **args})
    return subprocess.Popen(
        [sys.executable, "-c", code, spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
    )


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[dict, str]:
    """Close the job's stdin, wait, and return (its JSON summary, its stderr)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    lines = out.strip().splitlines()  # empty when wait_ready read the summary already
    return (json.loads(lines[-1]) if lines else {}), err


def wait_ready(proc: subprocess.Popen, timeout: float = 150) -> dict:
    """Read a holding job's JSON summary (it then keeps its dataset open)."""
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-4000:]
    assert time.monotonic() < deadline
    return json.loads(line)


def run_job(cache: Path, version: str, **kw) -> tuple[dict, str]:
    return finish(start_job(cache, version, **kw))


def build(cache: Path, version: str, *, last_used: float | None = None, n: int = N) -> Path:
    """A complete, released namespace (built in this process, one shard per 6 items like a
    job's), its last use set to ``last_used``."""
    ds = CachedDataset(Ragged(n), cache, transform=add_one, version=version)
    for lo in range(0, n, 6):
        ds.__getitems__(list(range(lo, min(n, lo + 6))))
        ds.flush()
    path = ds.path
    del ds
    gc.collect()  # releases the lease
    assert not [p for p in path.iterdir() if p.name.startswith("lease-")]
    if last_used is not None:
        (path / "last_used").touch()
        os.utime(path / "last_used", (last_used, last_used))
    return path


def size(path: Path) -> int:
    got = usage.namespace_usage(path)
    assert got is not None, path
    return got.bytes


def evictions(stderr: str) -> list[str]:
    """The INFO lines of evictions in a job's log."""
    return [line for line in stderr.splitlines() if "evicted namespace" in line]


def evicted(stderr: str) -> list[str]:
    """The (short) fingerprints of the namespaces a job evicted, in order."""
    return re.findall(r"evicted namespace (\w+)", stderr)


def warnings(stderr: str) -> list[str]:
    """WARNING lines, less the one that explains a new namespace beside older ones (every
    test here makes namespaces that differ by version=)."""
    return [
        line for line in stderr.splitlines() if line.startswith("WARNING") and "cache starts cold" not in line
    ]


def nothing_left_behind(cache: Path) -> None:
    """No temporary files, no locks, no evicted folders, no leases of finished processes."""
    assert leftovers(cache) == []
    names = {p.name for p in cache.iterdir()}
    assert not {n for n in names if n.startswith((".evicted-", ".budget.lock", ".tmp-"))}, names
    assert not list(cache.glob("*/lease-*")), list(cache.glob("*/lease-*"))


# ----------------------------------------------------------------------------- the setting


def test_max_bytes_takes_an_int_or_a_size_string_and_names_bad_values(tmp_path, monkeypatch):
    monkeypatch.delenv("CACHEDATA_MAX_BYTES", raising=False)
    assert CachedDataset(Ragged(3), tmp_path, max_bytes="50G").max_bytes == 50 * 1024**3
    assert CachedDataset(Ragged(3), tmp_path, max_bytes="1.5M").max_bytes == 1572864
    assert CachedDataset(Ragged(3), tmp_path, max_bytes=123456).max_bytes == 123456
    assert CachedDataset(Ragged(3), tmp_path).max_bytes is None
    with pytest.raises(ValueError, match=r"max_bytes.*'50Q'.*e\.g\. 50G"):
        CachedDataset(Ragged(3), tmp_path, max_bytes="50Q")
    for bad in (0, -5, "0"):
        with pytest.raises(ValueError, match="must be positive"):
            CachedDataset(Ragged(3), tmp_path, max_bytes=bad)
    for bad in (1.5, True, [1]):
        with pytest.raises(TypeError, match=r"max_bytes.*int.*'50G'"):
            CachedDataset(Ragged(3), tmp_path, max_bytes=bad)
    monkeypatch.setenv("CACHEDATA_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match=r"\$CACHEDATA_MAX_BYTES='lots'.*unset it"):
        CachedDataset(Ragged(3), tmp_path)
    monkeypatch.setenv("CACHEDATA_MAX_BYTES", "2K")
    assert CachedDataset(Ragged(3), tmp_path).max_bytes == 2048
    assert CachedDataset(Ragged(3), tmp_path, max_bytes="3K").max_bytes == 3072  # the argument wins


def test_settings_file_is_written_atomically_and_keeps_other_keys(tmp_path):
    cache = tmp_path / "c"
    target = budget.write_limit(cache, 5000)
    assert json.loads(target.read_text()) == {"max_bytes": 5000}
    target.write_text(json.dumps({"max_bytes": 5000, "other": "kept"}))
    budget.write_limit(cache, 7000)
    assert json.loads(target.read_text()) == {"max_bytes": 7000, "other": "kept"}
    assert budget.current_limit(cache) == budget.Limit(7000, str(target))
    budget.write_limit(cache, None)
    assert json.loads(target.read_text()) == {"other": "kept"}
    assert sorted(p.name for p in cache.iterdir()) == [budget.SETTINGS_NAME]  # no temporary file


def test_a_damaged_settings_file_is_ignored_with_one_warning(tmp_path, caplog):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / budget.SETTINGS_NAME).write_text("{not json")
    ds = CachedDataset(Ragged(4), cache, transform=add_one)
    [ds[i] for i in range(4)]
    ds.flush()
    assert ds.max_bytes is None and ds.num_cached == 4
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and budget.SETTINGS_NAME in msgs[0] and "cachedata budget" in msgs[0], msgs


def test_env_var_and_settings_file_are_respected_by_other_processes(tmp_path):
    cache = tmp_path / "c"
    old = build(cache, "old", last_used=time.time() - 5 * HOUR)
    mid = build(cache, "mid", last_used=time.time() - 4 * HOUR)
    s = size(old)
    cli = [sys.executable, "-m", "cachedata", "budget", str(cache)]
    # `cachedata budget PATH SIZE` writes the settings file; every process reads it.
    set_ = subprocess.run([*cli, str(int(3.5 * s))], capture_output=True, text=True, timeout=100, env=_env())
    assert set_.returncode == 0, set_.stderr
    assert json.loads((cache / budget.SETTINGS_NAME).read_text()) == {"max_bytes": int(3.5 * s)}
    shown = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=100, env=_env())
    got = json.loads(shown.stdout)
    assert got["max_bytes"] == int(3.5 * s) and got["source"].endswith(budget.SETTINGS_NAME)
    assert got["bytes"] == size(old) + size(mid) and not got["over"]

    # $CACHEDATA_MAX_BYTES overrides the folder's setting: "none" means no budget at all.
    free, err = run_job(cache, "free", env=_env(CACHEDATA_MAX_BYTES="none"))
    assert free["max_bytes"] is None and evictions(err) == [] and old.exists() and mid.exists()
    # The settings file alone: the oldest unused namespace goes, the newer one fits.
    summary, err = run_job(cache, "new")
    assert summary["max_bytes"] == int(3.5 * s) and summary["bad"] == 0
    assert evicted(err) == [old.name[:12]], err
    assert not old.exists() and mid.exists()
    # The environment variable alone (a smaller budget than the file's).
    summary, err = run_job(cache, "newer", env=_env(CACHEDATA_MAX_BYTES=str(int(2.5 * s))))
    assert summary["max_bytes"] == int(2.5 * s) and summary["num_cached"] == N
    assert evicted(err) == [mid.name[:12], Path(free["path"]).name[:12]], err
    nothing_left_behind(cache)


# ----------------------------------------------------------------------------- eviction


@pytest.mark.timeout(300)
def test_budget_smaller_than_three_namespaces_evicts_oldest_unused_and_keeps_the_one_in_use(tmp_path):
    cache = tmp_path / "c"
    now = time.time()
    a = build(cache, "a", last_used=now - 10 * HOUR)  # the oldest, but in use below
    b = build(cache, "b", last_used=now - 5 * HOUR)
    c = build(cache, "c", last_used=now - 1 * HOUR)
    s = max(size(a), size(b), size(c))
    holder = start_job(cache, "a", hold=True, epochs=0)
    try:
        held = wait_ready(holder)
        assert held["misses"] == 0 and held["path"] == str(a)
        assert [h.live for h in leases.holders(a)] == [True]
        # Room for 3.5 namespaces: the new run's one needs the oldest unused (b) to go, not c.
        summary, err = run_job(cache, "d", max_bytes=int(3.6 * s))
    finally:
        finish(holder)  # closes its stdin: it releases its lease and exits
    assert summary["bad"] == 0 and summary["num_cached"] == N and not summary["over_budget"]
    assert evicted(err) == [b.name[:12]], err
    (line,) = evictions(err)
    assert line.startswith("INFO") and "freed" in line and "budget" in line
    assert a.exists() and not b.exists() and c.exists() and Path(summary["path"]).exists()
    assert sum(size(p) for p in (a, c, Path(summary["path"]))) <= int(3.6 * s)
    nothing_left_behind(cache)


@pytest.mark.timeout(300)
def test_dead_lease_holders_expire(tmp_path):
    cache = tmp_path / "c"
    now = time.time()
    killed = build(cache, "killed", last_used=now - 3 * HOUR)
    far_old = build(cache, "far-old", last_used=now - 2 * HOUR)
    far_fresh = build(cache, "far-fresh", last_used=now - 9 * HOUR)
    s = max(size(killed), size(far_old), size(far_fresh))
    # A process on this host holds "killed" and dies by SIGKILL: its lease file stays behind.
    holder = start_job(cache, "killed", hold=True, epochs=0)
    wait_ready(holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    holder.stdout.close()
    holder.stderr.close()
    holder.stdin.close()
    (lease,) = leases.holders(killed)
    assert not lease.live and lease.pid == holder.pid
    # Processes on another host sharing the folder: one refreshed its lease a moment ago, one
    # has not for longer than LEASE_SECONDS (it is gone).
    for path, age in ((far_old, leases.LEASE_SECONDS + 60), (far_fresh, 60)):
        f = path / "lease-other-node-4242-abcd.json"
        f.write_text(json.dumps({"host": "other-node", "pid": 4242, "start": "1", "created": now - age}))
        os.utime(f, (now - age, now - age))
    # A lease of this host whose pid is alive but started at another time: a recycled pid.
    recycled = far_old / f"lease-{socket.gethostname()}-{os.getpid()}-0000.json"
    recycled.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "1"}))
    assert [h.live for h in leases.holders(far_old)] == [False, False]
    assert [h.live for h in leases.holders(far_fresh)] == [True]

    summary, err = run_job(cache, "new", max_bytes=int(2.5 * s))
    assert summary["bad"] == 0 and summary["num_cached"] == N
    assert set(evicted(err)) == {killed.name[:12], far_old.name[:12]}, err
    assert not killed.exists() and not far_old.exists() and far_fresh.exists()


@pytest.mark.timeout(300)
def test_two_concurrent_jobs_never_evict_each_other(tmp_path):
    cache = tmp_path / "c"
    now = time.time()
    # "Last used" in the future: the jobs' own namespaces are older than these, so a job that
    # ignored the other's lease would evict the other's namespace first.
    olds = [build(cache, f"old{i}", last_used=now + (1 + i) * HOUR) for i in range(3)]
    s = max(size(p) for p in olds)
    limit = int(2.6 * s)  # both jobs' namespaces fit, with at most one old one beside them
    jobs = [
        start_job(cache, "job1", max_bytes=limit, epochs=2),
        start_job(cache, "job2", max_bytes=limit, epochs=2, workers=2),
    ]
    results = [finish(j) for j in jobs]
    for summary, err in results:
        # Every item computed once and stored: the second epoch was all hits, so neither
        # job's namespace was evicted by the other, and nothing was recomputed.
        assert summary["bad"] == 0 and summary["misses"] == N, err
        assert summary["num_cached"] == N and not summary["over_budget"], err
        assert "removed by another process" not in err and not warnings(err), err
    gone = [fp for _, err in results for fp in evicted(err)]
    assert len(gone) == len(set(gone))  # each evicted once, by one of the two
    # Old namespaces go oldest first (how many depends on the timing). A job's namespace may
    # go too, but only once its job has ended and released it: the checks above show that
    # neither job lost its namespace while it ran.
    old_names = [p.name[:12] for p in olds]
    gone_olds = sorted(fp for fp in gone if fp in old_names)
    assert gone_olds and gone_olds == sorted(old_names[: len(gone_olds)]), gone
    assert [p.exists() for p in olds] == [False] * len(gone_olds) + [True] * (3 - len(gone_olds))
    jobs_gone = [fp for fp in gone if fp not in old_names]
    assert len(jobs_gone) <= 1 and all(
        Path(summary["path"]).exists() or Path(summary["path"]).name[:12] in jobs_gone
        for summary, _ in results
    )
    # A final look with the same budget, keeping the jobs' namespaces: the folder fits. (Without
    # `keep`, a job's namespace may be the least recently used one by now: the jobs' last looks
    # can leave the folder over by what the other job wrote since, see tracker.CHECK_SECONDS.)
    kept = tuple(summary["path"] for summary, _ in results if Path(summary["path"]).exists())
    done = eviction.enforce(cache, limit, keep=kept)
    assert done.locked and done.bytes <= limit
    assert all(e.fingerprint[:12] in old_names for e in done.evicted), done  # what is left of the olds
    nothing_left_behind(cache)


@pytest.mark.timeout(300)
def test_run_over_budget_stops_writing_with_one_warning_and_serves_correct_values(tmp_path):
    cache = tmp_path / "c"
    other = build(cache, "other", last_used=time.time() - HOUR)
    limit = 24 * 1024  # a few shards' worth: the run alone needs more
    summary, err = run_job(cache, "big", max_bytes=limit, epochs=2, workers=2)
    assert summary["bad"] == 0  # every value correct, in both epochs
    assert summary["over_budget"] and "writes stopped: over the disk budget of 24K" in summary["repr"]
    found = warnings(err)
    assert len(found) == 1, err  # one for the run, though two workers and the main process stopped
    # (exact bytes when the rounded sizes would read the same)
    assert "budget of 24K" in found[0] or "budget of 24576 bytes" in found[0], found[0]
    assert "need" in found[0] and "raise the budget to at least" in found[0]
    assert 0 < summary["num_cached"] < N  # what was stored before the stop is kept and served
    assert summary["misses"] == 2 * N - summary["num_cached"]  # the rest is computed again, not stored
    assert not other.exists()  # the unused namespace went first
    # Two workers that check at the same moment may each write one more shard.
    shard = max(p.stat().st_size for p in Path(summary["path"]).glob("shard-*.h5"))
    assert usage.folder_usage(cache).bytes <= limit + shard
    nothing_left_behind(cache)


def test_run_over_budget_in_one_process(tmp_path, caplog):
    cache = tmp_path / "c"
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(200), cache, transform=LogCalls(log), max_bytes="20K")
    want = [LogCalls(os.devnull)(Ragged(200)[i]) for i in range(200)]
    for _epoch in range(2):
        for lo in range(0, 200, 20):
            for i, got in zip(range(lo, lo + 20), ds.__getitems__(list(range(lo, lo + 20)))):
                assert_same(got, want[i], f"item {i}")
            ds.flush()
    found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(found) == 1 and "disk budget of 20K" in found[0], found
    assert ds.over_budget and "writes stopped" in repr(ds)
    kept = ds.num_cached
    assert 0 < kept < 200 and count_calls(log) == 400 - kept
    assert usage.folder_usage(cache).bytes <= 20 * 1024
    fresh = CachedDataset(Ragged(200), cache, transform=LogCalls(log), max_bytes="20K")
    assert not fresh.over_budget and fresh.num_cached == kept  # a new run tries again


def test_namespace_evicted_under_a_live_dataset_is_recomputed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(leases, "LEASE_REFRESH_SECONDS", 0.0)  # refresh at every len()
    cache = tmp_path / "c"
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(N), cache, transform=LogCalls(log))
    want = [LogCalls(os.devnull)(Ragged(N)[i]) for i in range(N)]
    assert len(ds) == N
    ds.__getitems__(list(range(N)))
    ds.merge()
    assert count_calls(log) == N
    ds[3]  # the merged file is open
    # This process looks like a job on another node that has not refreshed its lease for
    # longer than LEASE_SECONDS: another job may evict its namespace.
    (lease,) = ds.path.glob("lease-*")
    lease.write_text(json.dumps({"host": "other-node", "pid": 1, "start": "1"}))
    old = time.time() - leases.LEASE_SECONDS - 60
    os.utime(lease, (old, old))
    os.utime(ds.path / "meta.json", (old, old))
    _, err = run_job(cache, "evictor", max_bytes=size(ds.path) + 1000)
    assert evicted(err) == [ds.path.name[:12]], err
    assert not ds.path.exists()
    # Between epochs: the items still read correctly (from the open file, or recomputed) ...
    for i in range(N):
        assert_same(ds[i], want[i], f"item {i}")
    # ... and the next epoch notices, makes the namespace again and stores the items again.
    caplog.clear()
    assert len(ds) == N
    assert any("removed by another process" in r.getMessage() for r in caplog.records)
    assert ds.path.is_dir() and list(ds.path.glob("lease-*"))
    for _epoch in range(2):
        len(ds)
        got = ds.__getitems__(list(range(N)))
        for i in range(N):
            assert_same(got[i], want[i], f"item {i}")
        ds.flush()
    assert count_calls(log) == 2 * N  # recomputed once, then served from the new files
    fresh = CachedDataset(Ragged(N), cache, transform=LogCalls(log))
    assert fresh.num_cached == N and all(fresh.is_cached(i) for i in range(N))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cleared_by_another_process_under_a_live_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "LEASE_REFRESH_SECONDS", 0.0)
    cache = tmp_path / "c"
    ds = CachedDataset(Ragged(N), cache, transform=add_one)
    ds.__getitems__(list(range(N)))
    ds.flush()
    out = subprocess.run([sys.executable, "-m", "cachedata", "clear", str(cache), "--yes"],
                         capture_output=True, text=True, timeout=100, env=_env())  # fmt: skip
    assert out.returncode == 0 and not ds.path.exists(), out.stderr
    len(ds)
    for i in range(N):
        assert_same(ds[i], add_one(Ragged(N)[i]), f"item {i}")
    ds.flush()
    assert CachedDataset(Ragged(N), cache, transform=add_one).num_cached == N


def test_network_filesystem_eviction_retires_files_for_open_readers(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEDATA_SHARED_FS", "1")
    cache = tmp_path / "c"
    old = build(cache, "old", last_used=time.time() - HOUR)
    names = sorted(p.name for p in old.iterdir())
    shard = next(old.glob("shard-*.h5"))
    with open(shard, "rb") as reader:  # a reader on another node, as far as it can be shown here
        first = reader.read(64)
        done = eviction.enforce(cache, 1)
        assert [e.fingerprint for e in done.evicted] == [old.name] and not old.exists()
        (away,) = cache.glob(".evicted-*")
        assert sorted(p.name.split("-", 2)[2] for p in away.iterdir()) == names  # all retired
        assert usage.folder_usage(cache).bytes == 0 and usage.folder_usage(cache).pending_bytes > 0
        reader.seek(0)
        assert reader.read(64) == first
    eviction.sweep_evicted(cache)
    assert away.exists()  # within the grace period
    for p in away.iterdir():  # age the retired files past it
        stamp, rest = p.name.removeprefix("retired-").split("-", 1)
        p.rename(away / f"retired-{int(stamp) - int(2 * 3600 * 1e9)}-{rest}")
    eviction.sweep_evicted(cache)
    assert not away.exists()
    nothing_left_behind(cache)


# ----------------------------------------------------------------------------- visible


@pytest.mark.timeout(200)
def test_info_and_budget_commands_show_budget_usage_and_who_uses_what(tmp_path):
    cache = tmp_path / "c"
    idle = build(cache, "idle")
    ds = CachedDataset(Ragged(N), cache, transform=add_one, version="busy")
    ds.__getitems__(list(range(N)))
    ds.flush()
    budget.write_limit(cache, 10 * 1024 * 1024)
    env = _env()
    me = f"{socket.gethostname()}:{os.getpid()}"
    info = subprocess.run([sys.executable, "-m", "cachedata", "info", str(cache), "--json"],
                          capture_output=True, text=True, timeout=100, env=env)  # fmt: skip
    got = json.loads(info.stdout)
    by_fp = {n["fingerprint"]: n for n in got["namespaces"]}
    assert by_fp[ds.fingerprint]["in_use_by"] == [me] and by_fp[idle.name]["in_use_by"] == []
    assert got["budget"]["max_bytes"] == 10 * 1024 * 1024
    assert got["budget"]["bytes"] == size(idle) + size(ds.path)
    assert got["budget"]["in_use"] == {ds.fingerprint: [me]}
    table = subprocess.run([sys.executable, "-m", "cachedata", "info", str(cache)],
                           capture_output=True, text=True, timeout=100, env=env)  # fmt: skip
    assert "IN USE BY" in table.stdout.splitlines()[0]
    row = next(line for line in table.stdout.splitlines() if line.startswith(ds.fingerprint[:12]))
    assert row.rstrip().endswith(me)
    assert "budget: 10M (from" in table.stdout and "1 namespace(s) in use" in table.stdout
    shown = subprocess.run([sys.executable, "-m", "cachedata", "budget", str(cache)],
                           capture_output=True, text=True, timeout=100, env=env)  # fmt: skip
    assert shown.returncode == 0 and "budget: 10M" in shown.stdout, shown.stderr
    bad = subprocess.run([sys.executable, "-m", "cachedata", "budget", str(cache), "10Q"],
                         capture_output=True, text=True, timeout=100, env=env)  # fmt: skip
    assert bad.returncode == 2 and "10Q" in bad.stderr and "none" in bad.stderr
    # --enforce evicts now what nobody uses, and never what a live process holds.
    budget.write_limit(cache, 1)
    enforced = subprocess.run([sys.executable, "-m", "cachedata", "budget", str(cache), "--enforce", "--json"],
                              capture_output=True, text=True, timeout=100, env=env)  # fmt: skip
    out = json.loads(enforced.stdout)
    assert [e["fingerprint"] for e in out["evicted"]] == [idle.name] and out["over"]
    assert ds.path.exists() and not idle.exists()
    del ds
    gc.collect()
    assert not list(cache.glob("*/lease-*"))  # released with the dataset


def test_worker_copies_do_not_own_the_lease(tmp_path):
    """A dataset pickled (into a spawned worker) neither refreshes nor removes the lease."""
    import pickle

    ds = CachedDataset(Ragged(4), tmp_path, transform=add_one)
    (lease,) = ds.path.glob("lease-*")
    copy = pickle.loads(pickle.dumps(ds))
    del copy
    gc.collect()
    assert lease.exists()
    assert torch.equal(ds[1]["x"], add_one(Ragged(4)[1])["x"])
    del ds
    gc.collect()
    assert not lease.exists()


def test_reads_never_look_at_the_folder_and_seals_look_at_most_every_few_seconds(tmp_path, monkeypatch):
    calls = {"enforce": 0, "listing": 0}
    real_enforce, real_folder = eviction.enforce, usage.folder_bytes

    def counting_enforce(*args, **kw):
        calls["enforce"] += 1
        return real_enforce(*args, **kw)

    def counting_folder(path):
        calls["listing"] += 1
        return real_folder(path)

    monkeypatch.setattr(eviction, "enforce", counting_enforce)
    monkeypatch.setattr(usage, "folder_bytes", counting_folder)
    ds = CachedDataset(Ragged(200), tmp_path, transform=add_one, max_bytes="10M")
    assert calls["enforce"] == 1  # at construction
    for lo in range(0, 200, 10):  # 20 seals well under the budget, within CHECK_SECONDS
        ds.__getitems__(list(range(lo, lo + 10)))
        ds.flush()
    assert calls["enforce"] == 1 and calls["listing"] <= 21  # one listing of its own folder per seal
    before = dict(calls)
    for _epoch in range(3):  # hits only: the read path never scans or lists
        for i in range(200):
            ds[i]
        ds.__getitems__(list(range(200)))
    assert calls == before
