"""Faults with the real operating system: corruption, kills, full disks, concurrency, leaks."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import leftovers
from helpers import LogCalls, Ragged, add_one, assert_same, count_calls
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cachedata import CachedDataset, storage

HERE = os.path.dirname(__file__)


def _built(tmp_path, n=12, *, merge=True):
    ds = CachedDataset(Ragged(n), tmp_path, transform=add_one)
    want = [add_one(Ragged(n)[i]) for i in range(n)]
    [ds[i] for i in range(n)]
    if merge:
        ds.merge()
    else:
        ds.flush()
    return ds, want


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    ds, want = _built(root)
    (merged,) = ds.path.glob("merged-*.h5")
    return _Pristine(ds.path.name, merged.name, merged.read_bytes(), want)


class _Pristine(tuple):
    """(namespace, file name, file bytes, expected items) with a short repr for hypothesis."""

    def __new__(cls, *parts):
        return super().__new__(cls, parts)

    def __repr__(self) -> str:
        return f"<pristine {self[1]} ({len(self[2])} bytes)>"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_flips_never_yield_a_wrong_value(pristine, tmp_path_factory, data):
    ns, name, raw, want = pristine
    blob = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    root = tmp_path_factory.mktemp("flip")
    (root / ns).mkdir()
    (root / ns / name).write_bytes(bytes(blob))
    ds = CachedDataset(Ragged(12), root, transform=add_one)
    for i in range(12):
        assert_same(ds[i], want[i], f"item {i}")


def test_a_flipped_byte_in_the_schema_text_never_renames_keys(pristine, tmp_path, caplog):
    """Found by the property test above: item checksums do not cover the file's schema text,
    and with schema.json gone the namespace adopts a file's schema. "label" flipped to "mabel"
    decoded good payloads into a wrong structure; the schema's own checksum now refuses it."""
    ns, name, raw, want = pristine
    at = raw.index(b'"label"')
    blob = bytearray(raw)
    blob[at + 1] ^= ord("l") ^ ord("m")  # "mabel": still valid JSON, still decodable
    (tmp_path / ns).mkdir()
    (tmp_path / ns / name).write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="cachedata"):
        ds = CachedDataset(Ragged(12), tmp_path, transform=add_one)
        for i in range(12):
            assert_same(ds[i], want[i], f"item {i}")
    assert ds.stats.misses == 12
    assert any("schema fails its checksum" in r.getMessage() for r in caplog.records)


def test_a_file_without_a_schema_is_refused_by_readers_and_merges_alike(tmp_path, caplog):
    """A shard whose schema attributes are gone cannot say how to decode its payloads: readers
    skip it, and a merge retires it instead of taking its items in (merges used to)."""
    ds, want = _built(tmp_path, merge=False)
    (shard,) = ds.path.glob("shard-*.h5")
    with h5py.File(shard, "r+") as f:
        del f.attrs["schema"], f.attrs["schema_checksum"]
    with caplog.at_level(logging.WARNING, logger="cachedata"):
        fresh = CachedDataset(Ragged(12), tmp_path, transform=add_one)
        for i in range(6):
            assert_same(fresh[i], want[i], f"item {i}")
        assert fresh.stats.misses == 6
        assert fresh.merge()
    assert not shard.exists()
    assert any("schema" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    (merged,) = ds.path.glob("merged-*.h5")  # items 6..11 of the refused shard were not taken in
    assert storage.read_index(merged, namespace=ds.path.name).keys.tolist() == list(range(6))
    again = CachedDataset(Ragged(12), tmp_path, transform=add_one)
    for i in range(12):
        assert_same(again[i], want[i], f"item {i}")
    assert again.stats.misses == 6


def test_truncated_file_is_detected_and_recomputed(tmp_path, caplog):
    ds, want = _built(tmp_path)
    (merged,) = ds.path.glob("merged-*.h5")
    with open(merged, "r+b") as fh:
        fh.truncate(merged.stat().st_size // 2)
    caplog.clear()
    fresh = CachedDataset(Ragged(12), tmp_path, transform=add_one)
    for i in range(12):
        assert_same(fresh[i], want[i])
    assert fresh.stats.misses == 12
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def _payload_at(path, key: int) -> tuple[int, int]:
    """(file offset, size) of ``key``'s payload in a cache file."""
    with h5py.File(path, "r") as f:
        (row,) = [r for r, k in enumerate(f["index/key"][()]) if int(k) == key]
        return f["data"].id.get_offset() + int(f["index/offset"][row]), int(f["index/size"][row])


@pytest.mark.parametrize("shared_fs", ["0", "1"], ids=["mapped", "preadv"])
def test_bytes_changed_or_cut_under_an_open_reader_are_caught(tmp_path, monkeypatch, caplog, shared_fs):
    """Both read paths (a memory map on local disks, preadv on network filesystems) check every
    payload: a byte changed in place under an open reader, and a file cut short under an index
    already loaded, give recomputed items, never wrong ones."""
    monkeypatch.setenv("CACHEDATA_SHARED_FS", shared_fs)
    ds, want = _built(tmp_path)
    (merged,) = ds.path.glob("merged-*.h5")
    reader = CachedDataset(Ragged(12), tmp_path, transform=add_one)
    for i in range(12):
        assert_same(reader[i], want[i])
    (opened,) = [seg.reader for seg in reader._store.view.index.segments]
    assert (opened.view is not None) == (shared_fs == "0"), "local files are mapped, shared ones are not"
    at, size = _payload_at(merged, 5)
    with open(merged, "r+b") as fh:  # in place: a map of the file sees it at once
        fh.seek(at + size // 2)
        byte = fh.read(1)[0]
        fh.seek(at + size // 2)
        fh.write(bytes([byte ^ 0x10]))
    caplog.clear()
    assert_same(reader[5], want[5])
    assert_same(reader.__getitems__([4, 5, 6]), [want[4], want[5], want[6]])
    assert reader.stats.misses == 1, "item 5 is recomputed once, then served from its new shard"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    late = CachedDataset(Ragged(12), tmp_path, transform=add_one)
    assert late.num_cached == 12  # index loaded, files not opened yet
    cut, _ = _payload_at(merged, 8)
    os.truncate(merged, cut + 3)  # items from 8 on lie past the end now
    assert_same(late.__getitems__(list(range(12))), want)
    assert (late.stats.misses, late.stats.hits) == (5, 7)  # 5 (changed) and 8..11 (cut off)


def test_missing_files_are_recomputed(tmp_path):
    ds, want = _built(tmp_path, merge=False)
    for f in [*ds.path.glob("shard-*.h5"), ds.path / "schema.json", ds.path / "meta.json"]:
        f.unlink()
    fresh = CachedDataset(Ragged(12), tmp_path, transform=add_one)
    for i in range(12):
        assert_same(fresh[i], want[i])
    assert fresh.stats.misses == 12


def test_a_file_merged_away_under_a_reader_is_found_again(tmp_path):
    ds, want = _built(tmp_path, merge=False)
    reader = CachedDataset(Ragged(12), tmp_path, transform=add_one)
    assert reader.num_cached == 12  # index built on the shard, file not opened yet
    ds.merge()  # the shard is gone
    for i in range(12):
        assert_same(reader[i], want[i])
    assert reader.stats.misses == 0


def test_tampered_links_and_symlinks_are_refused(tmp_path, caplog):
    outside = tmp_path / "outside.h5"
    ds, want = _built(tmp_path / "c")
    (merged,) = ds.path.glob("merged-*.h5")
    shutil.copy(merged, outside)
    with h5py.File(merged, "r+", locking=False) as f:  # /data becomes an external link
        del f["data"]
        f["data"] = h5py.ExternalLink(str(outside), "/data")
    link = ds.path / "shard-r0-wm-p1-abcdef-000000.h5"
    link.symlink_to(outside)
    caplog.clear()
    fresh = CachedDataset(Ragged(12), tmp_path / "c", transform=add_one)
    for i in range(12):
        assert_same(fresh[i], want[i])
    assert fresh.stats.misses == 12
    messages = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "ExternalLink" in messages and "symbolic link" in messages


def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        _built(tmp_path)
    finally:
        os.umask(old)
    for p in tmp_path.rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{p} has mode {oct(mode)}"


KILLED_LOADER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    from torch.utils.data import DataLoader
    from helpers import Ragged, identity_batch, kill_on_item_30
    from cachedata import CachedDataset
    ds = CachedDataset(Ragged(60), {cache!r}, transform=kill_on_item_30)
    for _ in DataLoader(ds, batch_size=5, num_workers=2, collate_fn=identity_batch):
        pass
    """
)


@pytest.mark.timeout(180)
def test_worker_killed_by_sigkill_mid_epoch(tmp_path):
    """Readers never see a torn file; the next run recomputes only what was lost."""
    from helpers import kill_on_item_30

    # The loader runs in its own process: DataLoader's SIGCHLD handling stays out of pytest.
    code = KILLED_LOADER.format(here=HERE, cache=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=160)
    assert out.returncode != 0
    # DataLoader reports the dead worker; when the kill lands while the worker is handing a
    # batch's shared memory over, the report is the reset connection instead (seen 1 in 6),
    # or the connection closed before its handshake (EOFError in resource_sharer, seen once).
    reports = ("killed by signal", "exited unexpectedly", "ConnectionResetError", "EOFError")
    assert any(r in out.stderr for r in reports), out.stderr[-2000:]
    stored = CachedDataset(Ragged(60), tmp_path, transform=kill_on_item_30)
    kept = stored.num_cached
    assert 0 < kept < 60
    for i in range(60):  # every file that is visible is complete and readable
        if stored.is_cached(i):
            assert_same(stored[i], add_one(Ragged(60)[i]))
    assert stored.stats.misses == 0
    # The dead worker's temporary files (if it died mid-write) were swept at this open.
    assert leftovers(tmp_path) == []


DISK_FULL = textwrap.dedent(
    """
    import logging, resource, signal, sys
    sys.path.insert(0, {here!r})
    logging.basicConfig(level=logging.WARNING, format="WARN %(message)s")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    import torch
    from helpers import Ragged, add_one
    from cachedata import CachedDataset
    ds = CachedDataset(Ragged(400), {cache!r}, transform=add_one)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
    for epoch in range(2):
        for lo in range(0, 400, 16):
            got = ds.__getitems__(list(range(lo, lo + 16)))
            for i, item in zip(range(lo, lo + 16), got):
                assert torch.equal(item["x"], Ragged(400)[i]["x"] + 1), i
    print("ok", ds.stats.writes)
    """
)


@pytest.mark.timeout(180)
def test_disk_full_warns_once_and_keeps_serving(tmp_path):
    code = DISK_FULL.format(here=HERE, cache=str(tmp_path / "c"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=160)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARN")]
    assert len(warnings) == 1 and "not stored" in warnings[0], out.stderr
    assert out.stdout.startswith("ok")
    assert leftovers(tmp_path) == []


JOB = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {here!r})
    from torch.utils.data import DataLoader
    from helpers import Ragged, LogCalls, identity_batch
    from cachedata import CachedDataset
    n = 80
    ds = CachedDataset(Ragged(n), {cache!r}, transform=LogCalls({log!r}))
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=identity_batch)
    want = LogCalls("/dev/null")
    for epoch in range(2):
        for batch in loader:
            for item in batch:
                i = int(item["name"].split("-")[1])
                assert torch.equal(item["x"], want(Ragged(n)[i])["x"]), i
    for _ in range(3):
        ds.merge()
    print("done")
    """
)


@pytest.mark.timeout(240)
def test_two_jobs_on_one_cache_at_once(tmp_path):
    log = tmp_path / "log"
    code = JOB.format(here=HERE, cache=str(tmp_path / "c"), log=str(log))
    jobs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    for job in jobs:
        out, err = job.communicate(timeout=220)
        assert job.returncode == 0 and "done" in out, err[-3000:]
    # Both computed some items at the same time; at most a few were computed twice.
    assert 80 <= count_calls(log) < 160
    ds = CachedDataset(Ragged(80), tmp_path / "c", transform=LogCalls(log))
    ds.merge()
    files = sorted(p.name for p in ds.path.glob("*.h5"))
    assert files and all(f.startswith("merged-") for f in files), files
    keys = []
    for name in files:
        with h5py.File(ds.path / name, "r", locking=False) as f:
            keys += f["index/key"][()].tolist()
    assert sorted(keys) == list(range(80)), "duplicates dropped"
    assert not (ds.path / "merge.lock").exists() and leftovers(tmp_path) == []


class Tiny:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([i, i * 3], dtype=torch.int32)


def _sum_batches(batch):
    return len(batch)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_long_run_has_no_memory_or_handle_growth(tmp_path):
    psutil = pytest.importorskip("psutil")
    n = 200_000
    ds = CachedDataset(Tiny(n), tmp_path)
    ds.warm(num_workers=2, batch_size=4096, progress=False)
    loader = DataLoader(
        ds, batch_size=1024, shuffle=True, num_workers=2, persistent_workers=True, collate_fn=_sum_batches
    )
    me = psutil.Process()
    warmed = ds.stats
    rss, fds = [], []
    for _epoch in range(20):
        assert sum(loader) == n
        procs = [me, *me.children(recursive=True)]
        rss.append(sum(p.memory_info().rss for p in procs))
        fds.append(sum(p.num_fds() for p in procs))
    early, late = np.mean(rss[2:6]), np.mean(rss[-4:])
    assert late <= early * 1.15 + 32e6, f"RSS grew from {early / 1e6:.0f} MB to {late / 1e6:.0f} MB"
    assert max(fds[-4:]) <= max(fds[2:6]) + 4, f"open files grew: {fds}"
    assert ds.stats.misses == warmed.misses and ds.stats.hits - warmed.hits >= 20 * n
    del loader
    time.sleep(0.1)


class _Waves(torch.utils.data.Dataset):
    """Large ragged float32 items (80..120 KB: above buffers.MIN_BYTES, the recycled-buffer path)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.arange(20_000 + 5_000 * i, dtype=torch.float32) * (i + 1), "label": i}

    def __cachedata_fingerprint__(self) -> str:
        return "waves-v1"


@pytest.mark.parametrize("shared_fs", ["0", "1"], ids=["mapped", "preadv"])
def test_large_payloads_changed_under_an_open_reader_are_caught(tmp_path, monkeypatch, shared_fs):
    """Large payloads go through the same checks as small ones on both read paths (copied out of
    the map into a recycled buffer, or preadv), for batches and for ds[i]."""
    monkeypatch.setenv("CACHEDATA_SHARED_FS", shared_fs)
    src = _Waves()
    want = [add_one(src[i]) for i in range(len(src))]
    ds = CachedDataset(src, tmp_path, transform=add_one)
    ds.__getitems__(list(range(len(src))))
    ds.merge()
    (merged,) = ds.path.glob("merged-*.h5")
    reader = CachedDataset(src, tmp_path, transform=add_one)
    assert_same(reader.__getitems__(list(range(len(src)))), want)
    assert_same([reader[i] for i in range(len(src))], want)
    first = reader[3]
    at, size = _payload_at(merged, 3)
    with open(merged, "r+b") as fh:
        fh.seek(at + size - 1)
        byte = fh.read(1)[0]
        fh.seek(at + size - 1)
        fh.write(bytes([byte ^ 0x01]))
    assert_same(reader.__getitems__([2, 3, 4]), [want[2], want[3], want[4]])
    assert reader.stats.misses == 1, "item 3 is recomputed once, then served from its new shard"
    assert_same(reader[3], want[3])
    assert_same(first, want[3])  # read before the change: its own copy, not a view of the file
