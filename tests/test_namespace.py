"""The store interface (namespace.Store) on real folders: count, presence, get, put, seal,
consolidate, destroy, and what a fork, a pickle or a damaged payload does to them.

Every CachedDataset, warm() and the CLI go through these calls only, so they are tested here
directly, with two Stores standing for two processes where that is the point.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import socket

import numpy as np
import pytest
from conftest import leftovers

from cachedata import fileset, shards
from cachedata.namespace import ReadOnlyError, Store
from cachedata.shards import Identity

pytestmark = pytest.mark.timeout(120)

FP = "f" * 64
ME = Identity(0, None, os.getpid())
WORKER = Identity(0, 3, os.getpid())


def _item(k: int) -> dict:
    return {"x": np.arange(k % 5 + 1, dtype=np.float32) + k, "name": f"item-{k}"}


def _store(path, *, create: bool = True) -> Store:
    store = Store(path, FP, compression=None)
    if create:
        store.create({"fingerprint": FP})
    return store


def _same(got, k: int) -> None:
    want = _item(k)
    assert got["name"] == want["name"]
    np.testing.assert_array_equal(np.asarray(got["x"]), want["x"])


def _put(store: Store, keys, ident: Identity = ME) -> None:
    for k in keys:
        _same(store.put(k, _item(k), ident, where=k), k)  # put gives back what a read would


def test_unsealed_items_are_served_counted_and_present_in_this_process_only(tmp_path):
    a, b = _store(tmp_path / "ns"), _store(tmp_path / "ns")
    _put(a, range(10))
    assert a.unsealed[0] == 10 and a.unsealed[1] > 0
    assert a.count() == 10 and a.has(3) and not a.has(10)
    assert a.contains(np.arange(12)).tolist() == [True] * 10 + [False] * 2
    items, missing, nbytes = a.get_many([3, 11, 7])
    assert missing == [1] and items[1] is None and nbytes > 0
    _same(items[0], 3)
    _same(items[2], 7)
    # Another process (here: another Store) sees nothing before the seal ...
    assert b.count() == 0 and not b.has(3) and b.get_many([3])[1] == [0]
    assert a.seal(ME)[0] == 10 and a.unsealed == (0, 0)
    # ... and everything after it, without being told: get_many looks at the folder again.
    items, missing, _ = b.get_many(list(range(10)))
    assert missing == []
    for k, got in enumerate(items):
        _same(got, k)
    got = b.get_one(4)  # the single-item path, once the files are loaded
    assert got is not None and got[1] > 0
    _same(got[0], 4)
    assert b.get_one(99) is None
    assert leftovers(tmp_path / "ns") == []


def test_put_names_the_item_in_its_errors_and_keeps_what_is_stored(tmp_path):
    store = _store(tmp_path / "ns")
    _put(store, [1])
    with (
        socket.socket() as sock,
        pytest.raises(TypeError, match=r'item fold-2#5 at \["x"\]: cannot store socket'),
    ):
        store.put(5, {"x": sock, "name": "five"}, ME, where="fold-2#5")
    with pytest.raises(ValueError, match=r"item 6 .*same structure"):
        store.put(6, {"x": np.zeros(3, np.int64), "name": "six"}, ME, where=6)  # float32 before
    assert store.unsealed[0] == 1  # the bad items were not buffered; the good one stays
    assert store.seal(ME)[0] == 1


def test_seal_due_is_the_sealing_policy(tmp_path, monkeypatch):
    store = _store(tmp_path / "ns")
    assert not store.seal_due(batched=True, worker=True, distributed=False)  # nothing to seal
    _put(store, [1])
    # A worker's batch, and a rank's batch: sealed at once (another reader may need them).
    assert store.seal_due(batched=True, worker=True, distributed=False)
    assert store.seal_due(batched=True, worker=False, distributed=True)
    # The main process of a single-process run: by size and time (shards.MAIN_SEAL).
    assert not store.seal_due(batched=True, worker=False, distributed=False)
    monkeypatch.setattr(shards, "MAIN_SEAL", (2, 1 << 30, 3600.0))
    _put(store, [2])
    assert store.seal_due(batched=False, worker=False, distributed=False)
    # While merges lag behind, batches are sealed by size and time too, so files stay few.
    store.background.overdue = True
    monkeypatch.setattr(shards, "WORKER_SEAL", (100, 1 << 30, 3600.0))
    assert not store.seal_due(batched=True, worker=True, distributed=False)
    monkeypatch.setattr(shards, "WORKER_SEAL", (2, 1 << 30, 3600.0))
    assert store.seal_due(batched=True, worker=True, distributed=False)


def test_stop_writes_keeps_serving_and_stores_nothing(tmp_path):
    store = _store(tmp_path / "ns")
    _put(store, [1, 2])
    store.stop_writes()
    assert not store.writable and store.unsealed == (0, 0)
    _put(store, [3])  # still encoded and checked, given back, not buffered
    assert store.unsealed == (0, 0) and store.seal(WORKER) == (0, 0)
    assert fileset.list_files(tmp_path / "ns").files == ()


def test_a_damaged_payload_is_missing_never_wrong_and_warned_once(tmp_path, caplog):
    writer = _store(tmp_path / "ns")
    _put(writer, range(20))
    writer.seal(ME)
    (f,) = fileset.list_files(tmp_path / "ns").files
    reader = _store(tmp_path / "ns")
    reader.refresh()
    seg, row = reader.view.find(7)
    at = seg.fi.data_offset + int(seg.fi.offsets[row])
    with open(tmp_path / "ns" / f.name, "r+b") as fh:  # flip one byte of item 7's payload
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))
    fresh = _store(tmp_path / "ns")
    with caplog.at_level(logging.WARNING, logger="cachedata"):
        fresh.refresh()
        assert fresh.get_one(7) is None
        items, missing, _ = fresh.get_many([6, 7, 8, 7])
        _, missing2, _ = fresh.get_many([7])
    assert missing == [1, 3] and missing2 == [0]
    _same(items[0], 6)
    _same(items[2], 8)
    assert sum("corrupt data" in r.getMessage() for r in caplog.records) == 1
    assert not fresh.has(7)  # not served from that file again in this process: recomputed
    _put(fresh, [7])
    fresh.seal(ME)
    _same(fresh.get_many([7])[0][0], 7)


def _child(path, queue):
    store = _CHILD_STORE
    queue.put((store.has(1), store.get_many([1, 2])[1], store.unsealed, store.seal(WORKER)))


_CHILD_STORE: Store | None = None


def test_a_forked_child_reads_the_parents_unsealed_items_but_never_seals_them(tmp_path):
    global _CHILD_STORE
    store = _CHILD_STORE = _store(tmp_path / "ns")
    _put(store, [1])
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(tmp_path / "ns", queue))
    proc.start()
    has, missing, unsealed, sealed = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    assert has and missing == [1] and unsealed == (0, 0) and sealed == (0, 0)
    assert fileset.list_files(tmp_path / "ns").files == ()  # the parent seals its own items
    assert store.seal(ME)[0] == 1


def test_pickling_keeps_the_folder_and_drops_process_state(tmp_path):
    store = _store(tmp_path / "ns")
    _put(store, [1, 2])
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.path, copy.fingerprint, copy.compression) == (store.path, FP, None)
    assert copy.unsealed == (0, 0) and copy.view.index is None
    store.seal(ME)
    assert copy.count() == 2


def test_consolidate_and_destroy(tmp_path):
    store = _store(tmp_path / "ns")
    for lo in range(0, 30, 10):
        _put(store, range(lo, lo + 10), WORKER)
        store.seal(WORKER)
    assert len(fileset.list_files(tmp_path / "ns").shards) == 3
    _put(store, [30])  # consolidate seals first
    assert store.consolidate(ME)
    (merged,) = fileset.list_files(tmp_path / "ns").files
    assert not merged.is_shard and store.count() == 31
    assert not store.consolidate(ME)  # nothing new: nothing written
    _put(store, [31])
    store.destroy()
    assert not (tmp_path / "ns").exists() and store.count() == 0 and store.unsealed == (0, 0)


def test_a_folder_that_cannot_be_created_is_read_only(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ReadOnlyError):
        _store(tmp_path / "file" / "ns")
