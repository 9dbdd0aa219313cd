"""The set of files in a namespace: tiers and the merge plan, names, the merge lock, sweeping."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedata import fileset
from cachedata.fileset import FANOUT, SHARD_LIMIT, DataFile, Listing


def _listing(shards=(), runs=()) -> Listing:
    return Listing(
        tuple(DataFile(f"shard-r0-w0-p1-abcdef-{i:06d}.h5", s) for i, s in enumerate(shards)),
        tuple(DataFile(fileset.merged_name(i + 1), s) for i, s in enumerate(runs)),
        (),
    )


def test_few_shards_wait_and_many_are_merged_alone():
    assert fileset.plan(_listing(shards=[100] * (SHARD_LIMIT - 1), runs=[10**9])) == []
    files = fileset.plan(_listing(shards=[100] * SHARD_LIMIT, runs=[10**9, 100]))
    assert len(files) == SHARD_LIMIT and all(f.is_shard for f in files)  # runs are left alone


def test_explicit_merge_takes_what_is_new_and_full_takes_everything():
    listing = _listing(shards=[5], runs=[10**9])
    assert [f.size for f in fileset.plan(listing, explicit=True)] == [5]  # the big file stays
    assert len(fileset.plan(listing, everything=True)) == 2
    assert fileset.plan(_listing(runs=[7]), everything=True) == []
    assert fileset.plan(_listing(runs=[7]), explicit=True) == []  # nothing new
    # Background runs join the new items; merged files, even small ones, are left to the tiers.
    background = DataFile("run-000009.h5", 40)
    listing = Listing((DataFile("shard-r0-w0-p1-abcdef-000000.h5", 10),),
                      (DataFile("merged-000001.h5", 1000), DataFile("merged-000002.h5", 30), background), ())  # fmt: skip
    got = {f.name for f in fileset.plan(listing, explicit=True)}
    assert got == {"shard-r0-w0-p1-abcdef-000000.h5", "run-000009.h5"}
    assert [f.name for f in fileset.plan(Listing((), (background,), ()), explicit=True)] == ["run-000009.h5"]
    assert fileset.output_name([background], 10, explicit=False) == "run-000010.h5"
    assert fileset.output_name([background], 10, explicit=True) == "merged-000010.h5"


def test_a_full_tier_is_merged_and_big_runs_are_not_touched():
    small = fileset.TIER_BASE * 2
    listing = _listing(runs=[10**12] + [small] * FANOUT)
    files = fileset.plan(listing)
    assert len(files) == FANOUT and all(f.size == small for f in files)
    assert fileset.plan(_listing(runs=[10**12] + [small] * (FANOUT - 1))) == []


def test_overdue_when_merges_fall_far_behind():
    """Twice the merge thresholds: writers that can wait then merge before writing on."""
    small = fileset.TIER_BASE * 2
    assert not fileset.overdue(_listing(shards=[100] * (2 * SHARD_LIMIT - 1), runs=[small] * (FANOUT - 1)))
    assert fileset.overdue(_listing(shards=[100] * 2 * SHARD_LIMIT))
    assert fileset.overdue(_listing(runs=[10**12] + [small] * (2 * FANOUT)))
    # Runs of different tiers do not add up.
    assert not fileset.overdue(_listing(runs=[small] * (2 * FANOUT - 1) + [small * FANOUT**2] * 3))


def _simulate(batches: int, item_bytes: int, batch: int) -> tuple[int, float]:
    """Files seen by a reader at most, and bytes written / final bytes, for a cold pass."""
    shards: list[int] = []
    runs: list[int] = []
    written = most = 0
    for _ in range(batches):
        shards.append(item_bytes * batch)
        written += item_bytes * batch
        most = max(most, len(shards) + len(runs))
        while True:
            files = fileset.plan(_listing(shards=shards, runs=runs))
            if not files:
                break
            merged = sum(f.size for f in files)
            if files[0].is_shard:
                shards = []
            else:
                for f in files:
                    runs.remove(f.size)
            runs.append(merged)
            written += merged
    return most, written / (batches * batch * item_bytes)


@settings(max_examples=30, deadline=None)
@given(
    batches=st.integers(1, 3000),
    item_bytes=st.sampled_from([64, 1000, 100_000, 1 << 20]),
    batch=st.sampled_from([1, 8, 64]),
)
def test_files_stay_bounded_whatever_the_sizes(batches, item_bytes, batch):
    most, _amplification = _simulate(batches, item_bytes, batch)
    total = batches * batch * item_bytes
    bound = SHARD_LIMIT + (FANOUT - 1) * (fileset.tier(total) + 1)
    assert most <= bound


def test_a_million_small_items_in_batches_of_8_need_a_few_dozen_files():
    most, amplification = _simulate(1_000_000 // 8, 100, 8)
    assert most <= 50, most
    # 1 MiB items (the benchmark's): each byte is written about three times in all.
    most, amplification = _simulate(10_240 // 16, 1 << 20, 16)
    assert most <= 32 and amplification <= 3.5, (most, amplification)


def _grow(steps: int, step: int, base: int) -> tuple[int, float]:
    """A cache built by ``steps`` explicit merges of ``step`` new bytes each, after ``base``
    bytes in one merged file: (files seen at most, bytes written / final bytes)."""
    runs = [base] if base else []
    written = base
    most = 0
    for _ in range(steps):
        shards = [step]
        written += step
        files = fileset.plan(_listing(shards=shards, runs=runs), explicit=True)
        while files:
            for f in files:
                if not f.is_shard:
                    runs.remove(f.size)
            runs.append(sum(f.size for f in files))
            written += runs[-1]
            most = max(most, len(runs))
            files = fileset.plan(_listing(runs=runs))
    return most, written / (base + steps * step)


@pytest.mark.parametrize("base", [0, 100 << 20], ids=["from-empty", "after-100MiB"])
def test_a_cache_built_in_many_steps_writes_about_3x_its_size(base):
    """Steps of 5% (of 100 MiB) or of 800 KB from empty: every explicit merge writes its new
    items once, and only the tiers rewrite older files (log8 of the steps, not log2)."""
    step = 5 << 20 if base else 800_000
    for steps, limit in ((20, 3.0), (100, 3.7), (1000, 4.6)):
        most, amplification = _grow(steps, step, base)
        assert amplification <= limit, (steps, amplification)
        assert most <= SHARD_LIMIT + (FANOUT - 1) * (fileset.tier(base + steps * step) + 1), (steps, most)


def test_tmp_names_are_parsed_by_sweep(tmp_path):
    name = fileset.tmp_name("shard-x.h5")
    m = fileset.TMP_RE.match(name)
    assert m and m.group(1) == socket.gethostname() and int(m.group(2)) == os.getpid()
    (tmp_path / name).write_text("live")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = fileset.tmp_name("shard-y.h5").replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-")
    (tmp_path / stale).write_text("dead writer")
    assert fileset.sweep(tmp_path) == [stale]
    assert (tmp_path / name).exists()


def test_lock_is_exclusive_and_a_dead_holder_is_broken(tmp_path):
    assert fileset.acquire(tmp_path, wait=0)
    assert fileset.locked(tmp_path)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from cachedata import fileset; print(fileset.acquire(__import__('pathlib').Path({str(tmp_path)!r}), wait=0.2))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.stdout.strip() == "False", child.stderr
    fileset.release(tmp_path)
    assert not (tmp_path / fileset.LOCK_NAME).exists()
    # A holder that died on this host: its lock is broken at once.
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / fileset.LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(proc.stdout), "time": time.time()})
    )
    assert fileset.lock_stale(tmp_path / fileset.LOCK_NAME)
    assert fileset.acquire(tmp_path, wait=0)
    fileset.release(tmp_path)


def test_lock_of_another_host_is_stale_only_when_old(tmp_path):
    lock = tmp_path / fileset.LOCK_NAME
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time()}))
    assert not fileset.lock_stale(lock)
    old = time.time() - fileset.LOCK_STALE_SECONDS - 10
    os.utime(lock, (old, old))
    assert fileset.lock_stale(lock)


def test_listing_orders_runs_by_generation_and_skips_links(tmp_path):
    for name in ("merged-000010.h5", "merged-000002.h5", "shard-r0-w0-p1-abcdef-000000.h5", "other.txt"):
        (tmp_path / name).write_bytes(b"x" * 3)
    os.symlink(tmp_path / "other.txt", tmp_path / "shard-r0-w1-p1-abcdef-000000.h5")
    listing = fileset.list_files(tmp_path)
    assert [f.name for f in listing.runs] == ["merged-000002.h5", "merged-000010.h5"]
    assert [f.name for f in listing.shards] == ["shard-r0-w0-p1-abcdef-000000.h5"]
    assert listing.links == ("shard-r0-w1-p1-abcdef-000000.h5",)
    assert listing.next_generation() == 11
