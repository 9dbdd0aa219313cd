"""CachedDataset in one process: values, hits, namespaces, Subsets, errors and files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from conftest import leftovers
from helpers import ListDataset, LogCalls, Ragged, add_one, assert_same, count_calls, random_transform
from torch.utils.data import IterableDataset, Subset

from cachedata import CachedDataset, CacheStats


def test_roundtrip_hits_and_no_recompute(tmp_path):
    log = tmp_path / "calls.log"
    base = Ragged(12)
    ds = CachedDataset(base, tmp_path / "c", transform=LogCalls(log))
    want = [LogCalls(tmp_path / "ref.log")(base[i]) for i in range(12)]
    for epoch in range(3):
        for i in range(12):
            assert_same(ds[i], want[i], f"epoch {epoch} item {i}")
    assert count_calls(log) == 12
    s = ds.stats
    assert (s.hits, s.misses) == (24, 12) and s.hit_rate == pytest.approx(24 / 36)
    assert isinstance(s, CacheStats) and s.to_dict()["hits"] == 24


def test_hit_calls_neither_dataset_nor_transform(tmp_path):
    class Counting(Ragged):
        calls = 0

        def __getitem__(self, i):
            Counting.calls += 1
            return super().__getitem__(i)

    ds = CachedDataset(Counting(5), tmp_path, transform=add_one)
    [ds[i] for i in range(5)]
    ds.flush()
    Counting.calls = 0
    fresh = CachedDataset(Counting(5), tmp_path, transform=add_one)
    [fresh[i] for i in range(5)]
    fresh.__getitems__([4, 3, 2])
    assert Counting.calls == 0


def test_post_transform_runs_on_every_access_and_is_never_cached(tmp_path):
    seen = []

    def post(item):
        seen.append(1)
        item["x"].add_(1000)  # mutating must not reach the cache
        return item

    ds = CachedDataset(Ragged(4), tmp_path, transform=add_one, post_transform=post)
    first = ds[2]["x"].clone()
    second = ds[2]["x"]
    assert torch.equal(first, second) and len(seen) == 2
    ds.flush()
    assert torch.equal(CachedDataset(Ragged(4), tmp_path, transform=add_one)[2]["x"] + 1000, first)


def test_returned_items_are_fresh_and_writable(tmp_path):
    ds = CachedDataset(ListDataset([{"t": torch.ones(3), "a": np.ones(2)}] * 2), tmp_path)
    for _ in range(2):  # miss, then hit
        a = ds[0]
        a["t"].mul_(7)
        a["a"] *= 7
    b = ds[0]
    assert b["t"].tolist() == [1, 1, 1] and b["a"].tolist() == [1, 1]
    ds.flush()
    c = CachedDataset(ListDataset([{"t": torch.ones(3), "a": np.ones(2)}] * 2), tmp_path)[0]
    c["t"][0] = 5
    assert CachedDataset(ListDataset([{"t": torch.ones(3), "a": np.ones(2)}] * 2), tmp_path)[0]["t"][0] == 1


def test_len_negative_indices_and_index_errors(tmp_path):
    ds = CachedDataset(Ragged(6), tmp_path)
    assert len(ds) == 6
    assert_same(ds[-1], Ragged(6)[5])
    assert_same(ds[np.int64(2)], Ragged(6)[2])
    for bad in (6, -7, 100):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds["a"]


def test_getitems_mixes_hits_misses_and_duplicates(tmp_path):
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(10), tmp_path / "c", transform=LogCalls(log))
    ds[3]
    got = ds.__getitems__([3, 4, 4, 9, -1])
    assert [g["name"] for g in got] == ["item-3", "item-4", "item-4", "item-9", "item-9"]
    assert count_calls(log) <= 5 and ds.stats.misses >= 3


def test_batch_transform_gets_only_the_misses_once_per_call(tmp_path):
    class Batched:
        def __init__(self):
            self.batches = []

        def __call__(self, item):
            return self.batch([item])[0]

        def batch(self, items):
            self.batches.append([it["name"] for it in items])
            return [{"x": it["x"] * 3} for it in items]

    t = Batched()
    ds = CachedDataset(Ragged(8), tmp_path, transform=t)
    ds.__getitems__([0, 1])
    ds.__getitems__([0, 1, 2, 5])
    assert t.batches == [["item-0", "item-1"], ["item-2", "item-5"]]
    assert torch.equal(ds[5]["x"], Ragged(8)[5]["x"] * 3)


def test_subset_unwrapped_so_folds_share_items(tmp_path):
    log = tmp_path / "log"
    base = Ragged(30)
    for fold in range(5):
        idx = [i for i in range(30) if i % 5 != fold]
        fold_ds = CachedDataset(Subset(base, idx), tmp_path / "c", transform=LogCalls(log))
        assert len(fold_ds) == 24
        for j in range(len(fold_ds)):
            assert fold_ds[j]["name"] == f"item-{idx[j]}"
        fold_ds.flush()
    assert count_calls(log) == 30
    whole = CachedDataset(base, tmp_path / "c", transform=LogCalls(log))
    outer = Subset(whole, [7, 3])
    assert outer[0]["name"] == "item-7" and count_calls(log) == 30
    nested = CachedDataset(
        Subset(Subset(base, list(range(10, 20))), [0, -1]), tmp_path / "c", transform=LogCalls(log)
    )
    assert [nested[0]["name"], nested[1]["name"]] == ["item-10", "item-19"]
    assert nested.fingerprint == whole.fingerprint


def test_namespaces_follow_transform_dataset_and_version(tmp_path):
    fps = {
        CachedDataset(Ragged(5), tmp_path, transform=LogCalls("a")).fingerprint,
        CachedDataset(Ragged(5), tmp_path, transform=LogCalls("a", scale=3.0)).fingerprint,
        CachedDataset(Ragged(5), tmp_path, transform=LogCalls("a"), version="2").fingerprint,
        CachedDataset(Ragged(6), tmp_path, transform=LogCalls("a")).fingerprint,
        CachedDataset(Ragged(5, seed=1), tmp_path, transform=LogCalls("a")).fingerprint,
        CachedDataset(Ragged(5), tmp_path).fingerprint,
    }
    assert len(fps) == 6
    same = CachedDataset(Ragged(5), tmp_path, transform=LogCalls("a"))
    assert same.fingerprint in fps and same.path == tmp_path / same.fingerprint


def test_unfingerprintable_transform_asks_for_version(tmp_path):
    import threading

    class Locked:
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, x):
            return x

    with pytest.raises(TypeError, match="version="):
        CachedDataset(Ragged(3), tmp_path, transform=Locked())
    ds = CachedDataset(Ragged(3), tmp_path, transform=Locked(), version="v1")
    assert ds[0]["name"] == "item-0"


def test_iterable_and_non_map_datasets_are_refused(tmp_path):
    class It(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="IterableDataset"):
        CachedDataset(It(), tmp_path)
    with pytest.raises(TypeError, match="__len__"):
        CachedDataset(iter([1, 2]), tmp_path)
    with pytest.raises(ValueError, match="compression"):
        CachedDataset(Ragged(2), tmp_path, compression="zstd")
    with pytest.raises(TypeError, match="transform must be callable"):
        CachedDataset(Ragged(2), tmp_path, transform=3)


def test_unstorable_leaf_error_names_index_path_and_type(tmp_path):
    import socket

    s = socket.socket()
    try:
        ds = CachedDataset(ListDataset([{"meta": [1, 2, 3]}, {"meta": [1, 2, s]}]), tmp_path, version="1")
        ds[0]
        with pytest.raises(TypeError, match=r'item 1 at \["meta"\]\[2\]: cannot store socket'):
            ds[1]
    finally:
        s.close()


def test_structure_change_is_a_value_error_and_keeps_earlier_items(tmp_path):
    items = [
        {"x": torch.zeros(2)},
        {"x": torch.zeros(3)},
        {"x": torch.zeros(2, dtype=torch.float64)},
        {"y": 1},
    ]
    ds = CachedDataset(ListDataset(items), tmp_path)
    ds[0], ds[1]
    with pytest.raises(
        ValueError, match=r'item 2 at \["x"\]: dtype float64 where earlier items have float32'
    ):
        ds[2]
    with pytest.raises(ValueError, match=r"item 3 .*keys \['y'\]"):
        ds[3]
    ds.flush()
    again = CachedDataset(ListDataset(items), tmp_path)
    assert again.num_cached == 2 and again.is_cached(1) and not again.is_cached(2)


@pytest.mark.parametrize("transform", [random_transform, "numpy", "python"])
def test_random_transform_is_caught(tmp_path, transform):
    import helpers

    if transform == "numpy":
        transform = lambda item: item["x"] * float(np.random.rand())  # noqa: E731
    elif transform == "python":
        transform = helpers.python_random_transform
    ds = CachedDataset(Ragged(4), tmp_path, transform=transform)
    with pytest.raises(RuntimeError, match="post_transform"):
        ds[0]
    ok = CachedDataset(Ragged(4), tmp_path / "ok", transform=transform, allow_random=True)
    ok[0]


def test_random_dataset_is_caught(tmp_path):
    class Noisy(Ragged):
        def __getitem__(self, i):
            return {"x": torch.rand(2)}

    with pytest.raises(RuntimeError, match=r"dataset\[i\] drew random numbers"):
        CachedDataset(Noisy(3), tmp_path)[0]


def test_custom_keys_and_file_replacement(tmp_path):
    names = ["a", "b", "c"]
    ds = CachedDataset(Ragged(3), tmp_path, key=lambda i: names[i])
    [ds[i] for i in range(3)]
    assert ds.num_cached == 3 and ds.is_cached(2)
    ds.flush()
    names[1] = "b2"  # the item behind index 1 changed identity
    again = CachedDataset(Ragged(3), tmp_path, key=lambda i: names[i])
    assert again.is_cached(0) and not again.is_cached(1)
    with pytest.raises(TypeError, match="key= must return a str or an int"):
        CachedDataset(Ragged(3), tmp_path, key=lambda i: 1.5)[0]


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_compression_roundtrip(tmp_path, compression):
    base = Ragged(20)
    ds = CachedDataset(base, tmp_path, transform=add_one, compression=compression)
    want = [add_one(base[i]) for i in range(20)]
    [ds[i] for i in range(20)]
    assert ds.merge()
    fresh = CachedDataset(base, tmp_path, transform=add_one, compression=compression)
    for i in range(20):
        assert_same(fresh[i], want[i])
    assert fresh.stats.misses == 0
    (merged,) = fresh.path.glob("merged-*.h5")
    with h5py.File(merged, "r", locking=False) as f:
        assert (f["data"].compression or None) == compression


def test_flush_merge_layout_readable_with_h5py_alone(tmp_path):
    ds = CachedDataset(ListDataset([torch.arange(i + 1) for i in range(10)]), tmp_path)
    [ds[i] for i in range(10)]
    ds.flush()
    assert len(list(ds.path.glob("shard-r0-wm-*.h5"))) == 1
    assert ds.merge() and not list(ds.path.glob("shard-*"))
    (merged,) = ds.path.glob("merged-*.h5")
    import json

    import xxhash

    with h5py.File(merged, "r", locking=False) as f:
        assert f.attrs["cachedata_format"] == 2 and f.attrs["kind"] == "merged"
        assert json.loads(f.attrs["schema"]) == {"t": "tensor", "dtype": "int64", "ndim": 1}
        index = {name: f["index"][name][()] for name in ("key", "offset", "size", "checksum", "slots")}
        data = f["data"][()]
    assert index["key"].tolist() == list(range(10))
    for key, off, size, check, slots in zip(*index.values()):
        raw = data[off : off + size].tobytes()
        slots_hash = xxhash.xxh3_64_intdigest(np.asarray(slots, "<i8").tobytes())
        assert xxhash.xxh3_64_intdigest(raw, seed=int(key) ^ slots_hash) == check
        assert np.frombuffer(raw, np.int64).tolist() == list(range(slots[0]))
    assert leftovers(tmp_path) == []
    meta = json.loads((ds.path / "meta.json").read_text())
    assert meta["fingerprint"] == ds.fingerprint and meta["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("copy_file_range", [True, False])
def test_merge_copies_byte_ranges_and_drops_a_corrupt_item(tmp_path, monkeypatch, caplog, copy_file_range):
    """merge() moves each source's live byte ranges (copy_file_range, or its read/write
    fallback): every item must land intact and a corrupt one is left out, with one warning."""
    from cachedata import storage

    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(storage, "USE_COPY_FILE_RANGE", copy_file_range)
    items = [torch.arange(i * 37 % 300 + 1, dtype=torch.int64) * (i + 1) for i in range(40)]
    ds = CachedDataset(ListDataset(items), tmp_path)
    for lo in range(0, 40, 8):  # five shards
        ds.__getitems__(list(range(lo, lo + 8)))
        ds.flush()
    (shard, *_) = sorted(ds.path.glob("shard-*.h5"))
    with h5py.File(shard, "r", locking=False) as f:
        row = {name: f["index"][name][0] for name in ("key", "offset")}
        at = int(f["data"].id.get_offset()) + int(row["offset"]) + 3
    with open(shard, "r+b") as fh:  # flip one byte of the shard's first item
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0xFF]))
    caplog.clear()
    assert ds.merge()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and shard.name in warnings[0], warnings
    fresh = CachedDataset(ListDataset(items), tmp_path)
    assert fresh.num_cached == 39 and not fresh.is_cached(int(row["key"]))
    for i in range(40):
        assert_same(fresh[i], items[i])
    assert fresh.stats.misses == 1
    assert leftovers(tmp_path) == []
    # Five shards of adjacent items: a handful of whole ranges, not one call per item.
    assert (0 < len(calls) <= 10) if copy_file_range else calls == []


class Big(torch.utils.data.Dataset):
    """Items of 1 MiB each (float32), distinct per index."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((262144,), float(i))


def test_a_long_cold_pass_publishes_bounded_shards_without_flush(tmp_path):
    """The main process holds at most 64 MiB of unsealed items: a cold pass over 100 MiB of
    misses seals shards along the way, so its memory stays bounded and other processes (here a
    second reader) see the work before any flush."""
    ds = CachedDataset(Big(), tmp_path)
    other = CachedDataset(Big(), tmp_path)
    seen = []
    for i in range(100):
        ds[i]
        seen.append(other.num_cached)  # only what is sealed on disk
    assert 0 < seen[80] < 100
    assert max(b - a for a, b in zip([0, *seen], seen)) <= 64, "a shard holds at most 64 MiB of 1 MiB items"
    ds.flush()
    assert other.num_cached == 100
    for i in (0, 63, 64, 99):
        assert torch.equal(other[i], torch.full((262144,), float(i)))
    assert other.stats.misses == 0


def test_a_new_process_sees_every_item_as_a_hit(tmp_path):
    ds = CachedDataset(Ragged(15), tmp_path, transform=add_one)
    [ds[i] for i in range(15)]
    del ds  # no flush: process exit or garbage collection must seal the buffer
    code = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import Ragged, add_one
        from cachedata import CachedDataset
        ds = CachedDataset(Ragged(15), {str(tmp_path)!r}, transform=add_one)
        [ds[i] for i in range(15)]
        print(ds.stats.hits, ds.stats.misses)
        """
    )
    # The writing happened in this process; seal happens at exit, so run the writer in a child too.
    writer = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import Ragged, add_one
        from cachedata import CachedDataset
        ds = CachedDataset(Ragged(15), {str(tmp_path / "x")!r}, transform=add_one)
        [ds[i] for i in range(15)]
        """
    )
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=120)
    out = subprocess.run([sys.executable, "-c", code.replace(str(tmp_path), str(tmp_path / "x"))],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.split()[-2:] == ["15", "0"]


def test_warm_fills_everything_then_merges(tmp_path):
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(50), tmp_path / "c", transform=LogCalls(log))
    ds[0]
    ds.warm(num_workers=2, batch_size=8, progress=False)
    assert count_calls(log) == 50
    assert ds.num_cached == 50
    assert [p.name for p in ds.path.glob("*.h5")] == ["merged-000001.h5"]
    [ds[i] for i in range(50)]
    assert count_calls(log) == 50
    assert leftovers(tmp_path) == []


def test_clear_deletes_the_namespace(tmp_path):
    ds = CachedDataset(Ragged(5), tmp_path)
    [ds[i] for i in range(5)]
    ds.flush()
    ds.clear()
    assert ds.num_cached == 0 and not list(ds.path.glob("*.h5"))
    assert ds[1]["name"] == "item-1"


def test_corrupt_bytes_are_detected_recomputed_and_warned_once(tmp_path, caplog):
    log = tmp_path / "log"
    ds = CachedDataset(Ragged(20), tmp_path / "c", transform=LogCalls(log))
    want = [ds[i] for i in range(20)]
    ds.merge()
    (merged,) = ds.path.glob("merged-*.h5")
    with h5py.File(merged, "r", locking=False) as f:
        start = f["data"].id.get_offset()
        size = f["data"].shape[0]
    raw = bytearray(merged.read_bytes())
    for off in range(start, start + size, 97):  # flip bytes throughout the payload area
        raw[off] ^= 0xFF
    merged.write_bytes(bytes(raw))
    caplog.clear()
    fresh = CachedDataset(Ragged(20), tmp_path / "c", transform=LogCalls(log))
    for i in range(20):
        assert_same(fresh[i], want[i])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "corrupt" in r.getMessage()]
    assert len(warnings) == 1
    assert count_calls(log) > 20  # recomputed
    fresh.flush()
    before = count_calls(log)
    again = CachedDataset(Ragged(20), tmp_path / "c", transform=LogCalls(log))
    [again[i] for i in range(20)]
    assert count_calls(log) == before


@pytest.fixture
def read_only_view(tmp_path):
    """(writable folder, the same folder through a read-only bind mount)."""
    src, view = tmp_path / "src", tmp_path / "view"
    src.mkdir()
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(src), str(view)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs permission to bind-mount a read-only view")
    try:
        yield src, view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def test_read_only_cache_dir(read_only_view, caplog):
    """A folder nobody can write: complete -> silent reads; incomplete -> one warning."""
    src, view = read_only_view
    full = CachedDataset(Ragged(10), src, transform=add_one)
    [full[i] for i in range(10)]
    full.merge()
    part = CachedDataset(Ragged(10, seed=3), src, transform=add_one)
    [part[i] for i in range(4)]
    part.flush()
    subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
    with pytest.raises(OSError):
        (view / "probe").touch()
    caplog.clear()
    for seed, want in ((0, (20, 0)), (3, (8, 12))):
        ds = CachedDataset(Ragged(10, seed=seed), view, transform=add_one)
        for _epoch in range(2):
            for i in range(10):
                assert torch.equal(ds[i]["x"], Ragged(10, seed=seed)[i]["x"] + 1)
        ds.flush()
        assert (ds.stats.hits, ds.stats.misses) == want
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not stored" in warnings[0], warnings
    fresh = CachedDataset(Ragged(10, seed=4), view, transform=add_one)  # no namespace folder at all
    assert fresh[0]["label"] == 0
    assert leftovers(src) == []


def test_new_namespace_logs_which_attribute_changed(tmp_path, caplog):
    from torchvision.transforms import v2

    CachedDataset(Ragged(3), tmp_path, transform=v2.Compose([v2.Resize(224), v2.Normalize([0.5], [0.2])]))
    caplog.clear()
    ds = CachedDataset(
        Ragged(3), tmp_path, transform=v2.Compose([v2.Resize(256), v2.Normalize([0.5], [0.2])])
    )
    msgs = [r.getMessage() for r in caplog.records if "new namespace" in r.getMessage()]
    assert len(msgs) == 1 and "in transform" in msgs[0] and "224" in msgs[0] and "256" in msgs[0], msgs
    import json

    meta = json.loads((ds.path / "meta.json").read_text())
    assert any(k.startswith("transform") for k in meta["tree"])


def test_shared_filesystem_retires_instead_of_deleting(tmp_path, monkeypatch):
    """On NFS-like folders superseded files stay readable (renamed) for other nodes' readers."""
    from cachedata import fileset

    monkeypatch.setenv("CACHEDATA_SHARED_FS", "1")
    ds = CachedDataset(Ragged(6), tmp_path)
    [ds[i] for i in range(6)]
    ds.flush()
    (shard,) = ds.path.glob("shard-*.h5")
    fd = os.open(shard, os.O_RDONLY)
    try:
        ds.merge()
        retired = list(ds.path.glob("retired-*"))
        assert len(retired) == 1 and retired[0].name.endswith(shard.name)
        assert os.pread(fd, 8, 0) == retired[0].read_bytes()[:8]
        assert fileset.sweep(ds.path) == []  # within the grace period
        assert fileset.sweep(ds.path, retire_seconds=0) == [retired[0].name]
    finally:
        os.close(fd)
    assert [p.name for p in ds.path.glob("*.h5")] == ["merged-000001.h5"]


def test_leftover_temporary_files_of_dead_writers_are_swept(tmp_path):
    import socket

    ds = CachedDataset(Ragged(3), tmp_path)
    ds[0]
    ds.flush()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = ds.path / f".tmp-{socket.gethostname()}-{pid}-0123abcd-shard-x.h5"
    live = ds.path / f".tmp-{socket.gethostname()}-{os.getpid()}-0123abcd-shard-y.h5"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    CachedDataset(Ragged(3), tmp_path)  # opening the namespace sweeps
    assert not stale.exists() and live.exists()
    live.unlink()
