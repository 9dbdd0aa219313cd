"""cachedata.admin: the command line's work as Python functions, on real caches.

Caches are made by CachedDataset in tmp_path; corruption is done to the real files;
"a running job" is a live CachedDataset (in this process or in a child process) holding
its lease.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import pytest
from conftest import skip_without_xattrs
from helpers import LogCalls, Ragged, count_calls

from cachedata import CachedDataset, admin, eviction, fileset, leases, scrub, storage
from cachedata.metadata import nearest_sibling, read_meta

DAY = 86400.0
ME = f"{socket.gethostname()}:{os.getpid()}"


def name_key(index: int) -> str:
    return f"item-{index}"


def make(
    cache: Path, scale: float, *, items: int = 8, shards: int = 1, merge: bool = False, **kw
) -> CachedDataset:
    """A namespace of Ragged(8) through LogCalls(scale): its first ``items`` computed and
    sealed as ``shards`` shards, merged into one file with ``merge``."""
    ds = CachedDataset(Ragged(8), cache, transform=LogCalls(cache.parent / "calls.log", scale), **kw)
    per = -(-items // shards)
    for lo in range(0, items, per):
        ds.__getitems__(list(range(lo, min(items, lo + per))))
        ds.flush()
    if merge:
        ds.merge()
    return ds


def made(*args, **kwargs) -> Path:
    """``make(...)``'s folder once that dataset (and with it its lease) is gone.

    The dataset is a local of this frame only: on Python 3.10 a caller's argument stays
    referenced until the call returns, so ``made(...)`` would keep it alive.
    """
    ds = make(*args, **kwargs)
    path = ds.path
    del ds
    gc.collect()
    assert not list(path.glob("lease-*"))
    return path


def aged(path: Path, days: float) -> Path:
    (path / "last_used").touch()
    when = time.time() - days * DAY
    os.utime(path / "last_used", (when, when))
    return path


# ----------------------------------------------------------------------------- inspect


def test_inspect_sums_stored_rows_unless_asked_and_names_users_and_siblings(tmp_path):
    skip_without_xattrs(tmp_path)
    cache = tmp_path / "cache"
    a = make(cache, 2.0)  # alive: this process leases it
    b = made(cache, 3.0, items=5, merge=True)
    found = admin.inspect(cache)
    assert found.items_counted == "rows"
    assert {i.fingerprint: (i.items, i.items_counted) for i in found.namespaces} == {
        a.fingerprint: (8, "rows"),
        b.name: (5, "rows"),
    }
    by_fp = {i.fingerprint: i for i in found.namespaces}
    ia, ib = by_fp[a.fingerprint], by_fp[b.name]
    assert (ia.shard_files, ia.merged_files, ib.shard_files, ib.merged_files) == (1, 0, 0, 1)
    assert ia.in_use_by == (ME,) and ib.in_use_by == () and ia.busy == f"in use by {ME}"
    assert ia.bytes == sum(p.stat().st_size for p in a.path.iterdir())
    assert ia.dataset_type == "helpers.Ragged" and ia.key == "index" and ia.created is not None
    assert ib.differs_from.fingerprint == a.fingerprint and ib.differs_from.parts == ("transform",)
    assert ib.differs_from.changes == ("transform.scale: 2.0 -> 3.0",)
    assert found.usage.in_use_bytes == ia.bytes and found.cache_folders == ()

    counted = admin.inspect(cache, items=True)
    assert counted.items_counted == "index" and {i.items_counted for i in counted.namespaces} == {"index"}
    assert {i.fingerprint: i.items for i in counted.namespaces} == {a.fingerprint: 8, b.name: 5}
    assert admin.inspect_namespace(b).items is None  # prune and clear count nothing
    (one,) = admin.inspect(b, items=True).namespaces  # PATH is one namespace: siblings beside it
    assert one.items == 5 and one.differs_from.fingerprint == a.fingerprint
    with pytest.raises(ValueError, match="no namespace 'zzz'"):
        admin.inspect(cache, namespace="zzz")

    assert admin.inspect(tmp_path).cache_folders == (admin.CacheFolder(str(cache), 2, ia.bytes + ib.bytes),)


def test_stored_rows_count_an_item_two_jobs_stored_until_a_merge_and_a_file_without_them(tmp_path):
    """Rows stored equal the distinct items except for items two jobs computed at the same
    time (here: the same shard under a second job's name) until the next merge; a namespace
    with a file that records no rows is counted through the index."""
    skip_without_xattrs(tmp_path)
    cache = tmp_path / "cache"
    path = made(cache, 2.0, items=6)
    (shard,) = path.glob("shard-*.h5")
    twin = path / shard.name.replace("-p", "-p9", 1)  # another job's shard of the same items
    twin.write_bytes(shard.read_bytes())
    fileset.set_rows(twin, fileset.stored_rows(shard) or 0)
    other = made(cache, 3.0, items=4)

    def counts(**kw) -> dict:
        return {i.fingerprint: (i.items, i.items_counted) for i in admin.inspect(cache, **kw).namespaces}

    assert counts() == {path.name: (12, "rows"), other.name: (4, "rows")}
    assert counts(items=True) == {path.name: (6, "index"), other.name: (4, "index")}
    assert admin.merge_namespace(path, wait=5).status == "merged"
    assert counts() == {path.name: (6, "rows"), other.name: (4, "rows")}

    (merged,) = path.glob("merged-*.h5")
    os.removexattr(merged, fileset.ROWS_XATTR)  # copied without xattrs, or written elsewhere
    assert counts() == {path.name: (6, "index"), other.name: (4, "rows")}


def test_a_different_key_is_named_the_same_way_by_the_dataset_and_by_inspect(tmp_path, caplog):
    cache = tmp_path / "cache"
    by_index = make(cache, 2.0)
    caplog.clear()
    by_name = make(cache, 2.0, key=name_key)  # same data, same transform: only key= differs
    warned = [r.getMessage() for r in caplog.records if "cache starts cold" in r.getMessage()]
    assert (
        len(warned) == 1
        and f"differs from {by_index.fingerprint[:12]} in key: key=: 'index' -> 'custom'" in warned[0]
    )
    assert [r.levelno for r in caplog.records if "cache starts cold" in r.getMessage()] == [logging.WARNING]
    (info,) = admin.inspect(by_name.path).namespaces
    assert info.differs_from.parts == ("key",) and info.differs_from.changes == ("key=: 'index' -> 'custom'",)
    # One function decides for both, whichever order the siblings come in.
    metas = [read_meta(by_index.path), read_meta(by_name.path)]
    assert nearest_sibling(metas[1], metas) == nearest_sibling(metas[1], metas[::-1]) == info.differs_from


def test_a_version_bump_is_explained_quietly(tmp_path, caplog):
    cache = tmp_path / "cache"
    CachedDataset(Ragged(4), cache, version="1")
    caplog.clear()
    CachedDataset(Ragged(4), cache, version="2")
    (record,) = [r for r in caplog.records if "cache starts cold" in r.getMessage()]
    assert record.levelno == logging.INFO and "in version: version=: '1' -> '2'" in record.getMessage()


# ----------------------------------------------------------------------------- verify


def test_verify_reports_corrupt_items_and_files_and_leaves_them_alone(tmp_path):
    cache = tmp_path / "cache"
    a = make(cache, 2.0)
    b = make(cache, 3.0, merge=True, compression="lzf")
    grown, done = [], []
    ok = admin.verify_namespace(a.path, grow=grown.append, progress=done.append)
    assert ok.ok and (ok.files, ok.items, ok.vanished) == (1, 8, 0) and sum(grown) == sum(done) == 8

    (shard,) = a.path.glob("shard-*.h5")
    with h5py.File(shard, "r", locking=False) as f:
        start, off, key = f["data"].id.get_offset(), int(f["index/offset"][3]), int(f["index/key"][3])
    with open(shard, "r+b") as fh:
        fh.seek(start + off)
        byte = fh.read(1)
        fh.seek(start + off)
        fh.write(bytes([byte[0] ^ 0xFF]))
    bad = admin.verify_namespace(a.path)
    assert bad.problems == (admin.Problem(str(shard), key, "checksum mismatch"),) and not bad.ok
    assert shard.exists()  # a report only: nothing retired

    (merged,) = b.path.glob("merged-*.h5")
    merged.write_bytes(merged.read_bytes()[:100])  # truncated
    broken = admin.verify_namespace(b.path)
    ((problem),) = broken.problems
    assert (
        problem.file == str(merged) and problem.key is None and problem.reason.startswith("unreadable file: ")
    )
    assert not problem.unchecked and merged.exists()


def test_verify_repairs_a_damaged_schema_from_the_data_files(tmp_path):
    a = make(tmp_path / "cache", 2.0)
    (a.path / "schema.json").write_text("{not json")
    result = admin.verify_namespace(a.path)
    assert result.ok and result.items == 8
    assert len(result.repaired) == 1 and "schema.json" in result.repaired[0]
    json.loads((a.path / "schema.json").read_text())


def test_check_file_finds_a_row_that_points_outside_the_data(tmp_path):
    a = make(tmp_path / "cache", 2.0)
    (shard,) = a.path.glob("shard-*.h5")
    fi = storage.read_index(shard, namespace=a.fingerprint)
    sizes = fi.sizes.copy()
    sizes[2] = fi.data_bytes + 1
    fake = storage.FileIndex(**{**fi.__dict__, "sizes": sizes})
    assert scrub.check_file(fake, map_file=True) == [
        (int(fi.keys[2]), f"its index row points outside /data ({fi.data_bytes} bytes)")
    ]
    assert scrub.check_file(fi, map_file=False) == []  # read with preadv instead of the map


# ----------------------------------------------------------------------------- merge


def test_merge_keeps_the_compression_and_counts_items(tmp_path):
    path = made(tmp_path / "cache", 2.0, shards=3, compression="lzf")
    result = admin.merge_namespace(path, wait=5.0)
    assert (result.status, result.files_before, result.files_after, result.items) == ("merged", 3, 1, 8)
    with h5py.File(path / result.merged_file, "r", locking=False) as f:
        assert f["data"].compression == "lzf"
    again = admin.merge_namespace(path, wait=5.0)
    assert again.status == "nothing" and again.items == 8


# ----------------------------------------------------------------------------- prune, delete

HOLD = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}, {root!r}]
    from helpers import LogCalls, Ragged
    from cachedata import CachedDataset
    ds = CachedDataset(Ragged(8), {cache!r}, transform=LogCalls({log!r}, {scale!r}))
    print(ds.path, flush=True)
    sys.stdin.read()
    """
)


def test_prune_never_removes_what_a_running_job_leases(tmp_path):
    cache = tmp_path / "cache"
    olds = [aged(made(cache, s), days) for s, days in ((1.0, 30), (2.0, 20), (3.0, 10))]
    here = Path(__file__).parent
    code = HOLD.format(tests=str(here), root=str(here.parent), cache=str(cache), log=str(tmp_path / "calls.log"),
                       scale=2.0)  # fmt: skip
    job = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert job.stdout.readline().strip() == str(olds[1])  # the job opened the 20-day-old one
        aged(olds[1], 20)
        (holder,) = leases.holders(olds[1])
        assert holder.live and holder.pid == job.pid

        plan = admin.prune(cache, older_than=5 * DAY, max_bytes=None, dry_run=True)
        assert [i.path for i, _ in plan.plan.remove] == [str(olds[0]), str(olds[2])]
        assert [(i.path, why) for i, why in plan.plan.spared] == [
            (str(olds[1]), f"in use by {socket.gethostname()}:{job.pid}")
        ]
        assert plan.removals == () and all(p.exists() for p in olds)

        done = admin.prune(cache, older_than=5 * DAY, max_bytes=0)
        assert [r.path for r in done.removals if r.removed] == [str(olds[0]), str(olds[2])]
        assert done.freed_bytes == sum(i.bytes for i, _ in done.plan.remove) and not done.failed
        assert [p.exists() for p in olds] == [False, True, False]
        assert not list(cache.glob(".evicted-*"))
    finally:
        job.stdin.close()
        job.wait(timeout=60)
    assert job.returncode == 0
    done = admin.prune(cache, older_than=5 * DAY, max_bytes=None)  # the job ended: now it goes
    assert [r.path for r in done.removals if r.removed] == [str(olds[1])] and not olds[1].exists()


def test_prune_looks_again_right_before_removing(tmp_path):
    cache = tmp_path / "cache"
    path = aged(made(cache, 2.0), 30)
    infos = [admin.inspect_namespace(path)]
    plan = admin.plan_prune(infos, older_than=DAY, max_bytes=None, now=time.time())
    assert [i.path for i, _ in plan.remove] == [str(path)]
    job = make(cache, 2.0)  # a job leases it between the plan and the removal

    (removal,) = eviction.remove(cache, [i for i, _ in plan.remove], unused_only=True)
    assert not removal.removed and not removal.failed and "in use" in removal.why_kept
    assert path.exists() and job.num_cached == 8


def test_delete_removes_a_namespace_in_use_and_the_job_computes_again(tmp_path):
    cache = tmp_path / "cache"
    log = tmp_path / "calls.log"
    job = make(cache, 2.0)
    other = made(cache, 3.0)
    assert count_calls(log) == 16
    removals = admin.delete([job.path, other])
    assert [(r.fingerprint, r.removed) for r in removals] == [(job.fingerprint, True), (other.name, True)]
    assert not job.path.exists() and not other.exists()
    assert sorted(p.name for p in cache.iterdir()) == []  # no .evicted-* left behind
    len(job)  # the next epoch notices and makes the namespace again
    assert job[3]["name"] == "item-3" and count_calls(log) == 17
