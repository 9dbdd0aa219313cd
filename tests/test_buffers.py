"""Recycled payload buffers: reused only when nothing holds them, bounded, fresh after fork."""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cachedata import CachedDataset, buffers, shards

N = 300_000  # bytes: above buffers.MIN_BYTES, the size the pool serves


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch):
    """Each test starts with an empty pool of its own, as a fork's child does: what a test
    counts must not depend on which tests ran before it in this process (pytest-xdist
    workers run different subsets, in any order)."""
    monkeypatch.setattr(buffers, "_pool", buffers._Pool())


def base_address(a: np.ndarray) -> int:
    return (a.base if a.base is not None else a).ctypes.data


@given(st.integers(1, 1 << 40))
def test_size_class_covers_the_request_and_wastes_at_most_an_eighth(n):
    size = buffers.size_class(n)
    assert n <= size <= max(n + 4095, n * 9 // 8)
    assert buffers.size_class(size) == size  # a class serves its own size unchanged


def test_an_idle_buffer_is_handed_out_again():
    n = 5_000_000  # a size class no other test uses, so this one's buffer is the oldest
    a = buffers.take(n)
    assert a.nbytes == n and a.dtype == np.uint8 and a.flags.writeable
    where = base_address(a)
    del a
    b = buffers.take(n - 100)  # same size class
    assert base_address(b) == where and b.nbytes == n - 100


@pytest.mark.parametrize(
    "hold",
    [
        lambda a: torch.frombuffer(a, dtype=torch.float32),
        lambda a: torch.from_numpy(a).view(torch.int16)[10:],
        lambda a: a[5:],
        lambda a: memoryview(a),
        lambda a: torch.frombuffer(a, dtype=torch.uint8).view(100, -1).t(),
    ],
    ids=["frombuffer", "from_numpy-view", "numpy-view", "memoryview", "transposed"],
)
def test_a_buffer_that_anything_still_references_is_never_handed_out(hold):
    """Whatever was made from a buffer keeps it: the next takes get other memory, and the
    held bytes stay as written."""
    a = buffers.take(N)
    a[:] = 7
    held = hold(a)
    where = base_address(a)
    del a
    others = [buffers.take(N) for _ in range(8)]
    assert where not in {base_address(o) for o in others}
    for o in others:
        o[:] = 1
    if isinstance(held, torch.Tensor):
        held = held.contiguous().view(torch.uint8).numpy()
    assert (np.asarray(held) == 7).all()


@pytest.mark.parametrize("n", [0, 100, buffers.MIN_BYTES - 1, buffers.MIN_BYTES, N])
def test_copy_is_an_independent_writable_copy(n):
    src = bytearray(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes())
    out = buffers.copy(src)
    assert len(out) == n and bytes(out) == bytes(src)
    assert isinstance(out, bytearray) == (n < buffers.MIN_BYTES)
    if n:
        out[0] ^= 0xFF
        assert out[0] != src[0]


def test_the_pool_keeps_track_of_at_most_pool_bytes():
    big = 8 * 1024 * 1024
    held = [buffers.take(big) for _ in range(2 * buffers.POOL_BYTES // big)]
    assert 0 < buffers.stats().held_bytes <= buffers.POOL_BYTES
    del held
    assert buffers.stats().held_bytes <= buffers.POOL_BYTES
    huge = buffers.take(buffers.POOL_BYTES + 1)  # larger than the pool: served, not kept
    assert huge.nbytes == buffers.POOL_BYTES + 1
    assert buffers.stats().held_bytes <= buffers.POOL_BYTES


def _child_held(q) -> None:
    q.put(buffers.stats())
    q.put(buffers.take(N).nbytes)


def test_a_forked_child_starts_with_an_empty_pool():
    keep = buffers.take(N)  # noqa: F841 -- the parent's pool is not empty
    assert buffers.stats().held_bytes > 0
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_held, args=(q,))
    p.start()
    got = [q.get(timeout=60), q.get(timeout=60)]
    p.join(60)
    assert p.exitcode == 0 and got == [buffers.PoolStats(0, 0, 0), N]


def test_threads_never_share_a_buffer():
    """Eight threads take, fill with their own byte and check: a buffer handed to two holders
    at once would show the other thread's byte."""
    errors = []

    def work(tag: int) -> None:
        for _ in range(300):
            a = buffers.take(N)
            a[:] = tag
            if not (a[::4096] == tag).all() or a[-1] != tag:
                errors.append(tag)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


class Images(torch.utils.data.Dataset):
    """Items of 3x100x100 float32 (120 KB, read into pooled buffers), distinct per index."""

    def __len__(self) -> int:
        return 96

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 100, 100, generator=g)


@pytest.mark.parametrize("collate", ["list", "stack"])
def test_warm_batches_that_are_kept_are_never_overwritten(tmp_path, collate):
    """A collate that returns the items themselves keeps every buffer busy: an epoch's batches
    kept in a list all still hold their own items at the end. Stacked batches let the
    items' buffers go, and the pool hands the same memory out on the next batch."""
    ds = CachedDataset(Images(), tmp_path)
    for i in range(len(ds)):
        ds[i]  # cold
    ds.flush()  # warm reads now come from the file, not from this process's write buffer
    want = [Images()[i] for i in range(len(ds))]
    fn = (lambda b: b) if collate == "list" else torch.stack
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(ds, batch_size=16, sampler=order, collate_fn=fn)
    for _epoch in range(2):
        kept = list(loader)
        got = [x for b in kept for x in b]
        for i, x in zip(order, got):
            assert torch.equal(x, want[i]), f"item {i}"
    if collate == "stack":
        # Steady state: every item reuses an idle buffer, so the pool allocates nothing more.
        before = buffers.stats()
        for _ in loader:
            pass
        after = buffers.stats()
        assert (after.fresh, after.reused - before.reused) == (before.fresh, len(ds))


def test_a_loop_that_holds_the_previous_item_recycles_the_one_before(tmp_path):
    """``x = ds[i]`` keeps item i-1 alive while item i is read: the buffer under it is never
    handed out, and idle ones are, so the loop allocates nothing. The expected values come
    from the source, not from the pool: held pool buffers at the head of the size class
    would make the outcome depend on what earlier tests in this process left there."""
    ds = CachedDataset(Images(), tmp_path)
    for i in range(len(ds)):
        ds[i]  # cold: the copies it returns are dropped at once, idle in the pool
    ds.flush()
    want = [Images()[i] for i in range(len(ds))]
    before = buffers.stats()
    x = None
    for i in range(len(ds)):
        prev, x = x, ds[i]
        assert torch.equal(x, want[i]), f"item {i}"
        assert prev is None or torch.equal(prev, want[i - 1]), f"item {i - 1}, held while {i} was read"
    after = buffers.stats()
    assert after.fresh - before.fresh <= 2 and after.reused - before.reused >= len(ds) - 2


def test_cold_misses_hand_out_recycled_copies_that_stay_intact_while_held(tmp_path):
    """A miss buffers its encoded payload for writing and returns a decoded copy of it; both
    large buffers come from the pool, and the ones still held (the unsealed payloads, the
    copies the caller keeps) are never handed out again.

    (How many of the dropped ones are handed out again depends on the pool's scan: the held
    buffers come first in their size class, so the first dropped reads get fresh memory.)"""
    ds = CachedDataset(Images(), tmp_path)
    want = [Images()[i] for i in range(len(ds))]
    kept = [ds[i] for i in range(0, len(ds), 2)]  # held: never recycled
    assert buffers.stats() == buffers.PoolStats(
        2 * len(kept) * buffers.size_class(3 * 100 * 100 * 4), 2 * len(kept), 0
    )
    for i in range(1, len(ds), 2):
        assert torch.equal(ds[i], want[i]), f"item {i}"  # dropped at once: recycled
    after = buffers.stats()
    assert after.fresh + after.reused == 2 * len(ds), "every payload and copy comes from the pool"
    assert after.reused > 0, "dropped copies are handed out again"
    for i, x in zip(range(0, len(ds), 2), kept):
        assert torch.equal(x, want[i]), f"item {i}"
    ds.flush()
    fresh = CachedDataset(Images(), tmp_path)
    for i in range(len(ds)):
        assert torch.equal(fresh[i], want[i]), f"item {i} as stored"
    assert fresh.stats.misses == 0


def test_a_cold_pass_recycles_the_payloads_of_each_sealed_shard(tmp_path, monkeypatch):
    """Encoded payloads wait in the write buffer until the next seal, which frees them all;
    the items after it are encoded into those buffers instead of fresh memory."""
    monkeypatch.setattr(shards, "MAIN_SEAL", (8, 1 << 30, 3600.0))
    ds = CachedDataset(Images(), tmp_path)
    want = [Images()[i] for i in range(len(ds))]
    for i in range(len(ds)):
        assert torch.equal(ds[i], want[i]), f"item {i}"
    st = buffers.stats()
    # 8 payloads held until each seal, plus the copy returned for each miss (dropped at once)
    assert st.fresh <= 24 and st.fresh + st.reused == 2 * len(ds), st
    ds.flush()
    fresh = CachedDataset(Images(), tmp_path)
    for i in range(len(ds)):
        assert torch.equal(fresh[i], want[i]), f"item {i} as stored"
    assert fresh.stats.misses == 0
