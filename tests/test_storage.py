"""The file format and the shared index: round trips, malformed files, lookups, memory."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from conftest import leftovers, skip_without_xattrs
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedata import fileset, storage
from cachedata.faults import CorruptFileError, TransientError, transient
from cachedata.index import Index
from cachedata.payloads import Reader
from cachedata.storage import read_index, write_file


def _write(path, keys, *, nslots=1, compression=None, durable=True):
    keys = np.asarray(keys, np.int64)
    payloads = [np.full(int(k) % 7 + 1, int(k) % 251, np.uint8).tobytes() for k in keys]
    slots = np.asarray([[len(p)] for p in payloads], np.int64).reshape(len(keys), nslots)
    sums = np.asarray(
        [storage.checksum(int(k), p, s.tolist()) for k, p, s in zip(keys, payloads, slots)], np.uint64
    )
    return write_file(
        path, kind="shard", namespace="ns", schema="{}", keys=keys,
        sizes=np.asarray([len(p) for p in payloads]), checksums=sums, slots=slots,
        payloads=payloads, compression=compression, durable=durable,
    ), payloads  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(keys=st.sets(st.integers(-(2**62), 2**62), max_size=60), compression=st.sampled_from([None, "gzip"]))
def test_round_trip(tmp_path_factory, keys, compression):
    folder = tmp_path_factory.mktemp("rt")
    keys = sorted(keys)
    written, payloads = _write(folder / "f.h5", keys, compression=compression)
    fi = read_index(folder / "f.h5", namespace="ns")
    assert fi.keys.tolist() == keys == written.keys.tolist()
    reader = Reader(fi, map_file=True)
    for r, k in enumerate(keys):
        buf = bytearray(int(fi.sizes[r]))
        reader.read_into(memoryview(buf), int(fi.offsets[r]))
        assert bytes(buf) == payloads[r]
        assert storage.checksum(k, buf, fi.slots[r].tolist()) == int(fi.checksums[r])
    reader.close()
    assert leftovers(folder) == []


def test_unsorted_keys_are_refused_at_write_and_at_read(tmp_path):
    with pytest.raises(ValueError, match="ascending"):
        _write(tmp_path / "a.h5", [3, 1, 2])
    assert leftovers(tmp_path) == [] and not (tmp_path / "a.h5").exists()
    _write(tmp_path / "b.h5", [1, 2, 3])
    with h5py.File(tmp_path / "b.h5", "r+", locking=False) as f:
        f["index/key"][...] = [3, 2, 1]
    with pytest.raises(CorruptFileError, match="ascending"):
        read_index(tmp_path / "b.h5", namespace="ns")


@pytest.mark.parametrize(
    "damage",
    ["drop-column", "offset-outside", "wrong-dtype", "link", "other-namespace", "format-1", "garbage"],
)
def test_malformed_files_are_corrupt_not_transient(tmp_path, damage):
    path = tmp_path / "f.h5"
    _write(path, [1, 2, 3])
    if damage == "garbage":
        path.write_bytes(b"\x89HDF\r\n" + os.urandom(500))
    else:
        with h5py.File(path, "r+", locking=False) as f:
            if damage == "drop-column":
                del f["index/checksum"]
            elif damage == "offset-outside":
                f["index/offset"][0] = 10**9
            elif damage == "wrong-dtype":
                del f["index/size"]
                f["index/size"] = np.zeros(3, np.float32)
            elif damage == "link":
                del f["data"]
                f["data"] = h5py.ExternalLink("/etc/passwd", "/x")
            elif damage == "other-namespace":
                f.attrs["namespace"] = "other"
            elif damage == "format-1":
                f.attrs["cachedata_format"] = 1
    with pytest.raises(CorruptFileError) as info:
        read_index(path, namespace="ns")
    assert not isinstance(info.value, TransientError)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_written_files_record_their_rows_in_an_xattr(tmp_path, compression):
    """Shards (a row left out included) and merged files carry their row count from the
    moment they are published: ``cachedata info`` reads it instead of the index."""
    skip_without_xattrs(tmp_path)
    keys = np.arange(0, 12, 2, dtype=np.int64)
    payloads: list[bytes | None] = [bytes([int(k)]) * 8 for k in keys]
    payloads[2] = None  # its bytes failed a check while being copied: left out
    sums = np.asarray([storage.checksum(int(k), p or b"") for k, p in zip(keys, payloads)], np.uint64)
    shard = tmp_path / "shard-r0-w0-p1-ab-0.h5"
    written = write_file(
        shard, kind="shard", namespace="ns", schema="{}", keys=keys, sizes=np.full(len(keys), 8),
        checksums=sums, slots=np.zeros((len(keys), 0), np.int64), payloads=payloads, compression=compression,
    )  # fmt: skip
    assert len(written) == len(read_index(shard, namespace="ns")) == 5
    assert os.getxattr(shard, fileset.ROWS_XATTR) == b"5" and fileset.stored_rows(shard) == 5

    source, _ = _write(tmp_path / "source.h5", range(7))
    merged = tmp_path / fileset.merged_name(1)
    fd = os.open(source.path, os.O_RDONLY)
    try:
        piece = storage.Piece(fd, source.data_offset or 0, 0, source.data_bytes)
        storage.write_merged(
            merged, namespace="ns", schema="{}", keys=source.keys, offsets=source.offsets,
            sizes=source.sizes, checksums=source.checksums, slots=source.slots, pieces=[piece],
            total=source.data_bytes, sources=("source.h5",), use_copy_file_range=False,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert len(read_index(merged, namespace="ns")) == fileset.stored_rows(merged) == 7
    assert leftovers(tmp_path) == []
    listing = fileset.list_files(tmp_path)  # the shard and the merged file (source.h5: no data file name)
    assert len(listing.files) == 2 and fileset.listing_rows(tmp_path, listing) == 5 + 7
    os.removexattr(merged, fileset.ROWS_XATTR)  # as if copied without xattrs, or written elsewhere
    assert fileset.stored_rows(merged) is None and fileset.listing_rows(tmp_path, listing) is None


def test_too_many_open_files_is_transient(tmp_path):
    """EMFILE while opening a file is an environmental error, never corruption."""
    _write(tmp_path / "f.h5", [1, 2, 3])
    code = textwrap.dedent(
        f"""
        import resource, pathlib
        from cachedata import fileset, storage
        from cachedata.faults import CorruptFileError, TransientError, limit_hint
        fds = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        try:
            while True:
                fds.append(open("/dev/null"))
        except OSError:
            pass
        try:
            storage.read_index(pathlib.Path({str(tmp_path / "f.h5")!r}), namespace="ns")
        except TransientError as exc:
            print("transient", limit_hint(exc))
        except CorruptFileError as exc:
            print("corrupt", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("transient the open-files limit"), out.stdout + out.stderr
    assert transient(OSError(errno.EMFILE, "Too many open files"))
    assert not transient(OSError(errno.EACCES, "denied"))


def test_large_index_columns_are_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MAP_INDEX_ROWS", 8)
    _write(tmp_path / "f.h5", range(0, 200, 2))
    fi = read_index(tmp_path / "f.h5", namespace="ns")
    for column in (fi.keys, fi.checksums, fi.offsets, fi.slots):
        # A view of a file map (no private copy), and a plain ndarray (fast scalar lookups).
        assert type(column) is np.ndarray and isinstance(column.base, np.memmap)
        assert pathlib.Path(column.base.filename) == tmp_path / "f.h5"


@pytest.mark.parametrize("contiguous", [True, False])
def test_index_lookups_newest_copy_and_discard(tmp_path, monkeypatch, contiguous):
    monkeypatch.setattr(storage, "MAP_INDEX_ROWS", 8)
    step = 1 if contiguous else 3
    big, _ = _write(tmp_path / "big.h5", range(0, 100 * step, step))
    small, _ = _write(tmp_path / "small.h5", [step * 5, 10**6])
    idx = Index(nslots=1)
    idx.add(read_index(big.path, namespace="ns"))
    idx.add(read_index(small.path, namespace="ns"))
    assert idx.segments[0].contiguous is contiguous
    keys = np.asarray([0, step * 5, 10**6, 7 if not contiguous else -1, step * 99], np.int64)
    seg, _rows = idx.find_many(keys)
    assert (seg >= 0).tolist() == [True, True, True, False, True]
    assert idx.count == 101
    # A row found corrupt is not served from that file again; the other copy still is.
    first, _row = idx.find(step * 5)
    idx.discard(first, step * 5)
    again, _ = idx.find(step * 5)
    assert again is not first
    idx.discard(again, step * 5)
    assert idx.find(step * 5) is None and idx.count == 100
    idx.remove("small.h5")
    assert idx.find(10**6) is None and idx.names == {"big.h5"}
    idx.close()


def test_private_memory_per_item_of_two_readers(tmp_path):
    """Readers of one big file share its index through the page cache (checked with USS)."""
    psutil = pytest.importorskip("psutil")
    n = 1_000_000
    keys = np.arange(n, dtype=np.int64)
    path = tmp_path / "big.h5"
    write_file(
        path, kind="merged", namespace="ns", schema="{}", keys=keys, sizes=np.ones(n, np.int64),
        checksums=np.zeros(n, np.uint64), slots=np.zeros((n, 1), np.int64),
        payloads=iter([b"x"] * n), compression=None,
    )  # fmt: skip
    code = textwrap.dedent(
        f"""
        import gc, pathlib, sys, numpy as np, psutil
        from cachedata.index import Index
        from cachedata.storage import read_index
        probe = np.random.default_rng(0).integers(0, {n}, 4096)
        gc.collect()
        before = psutil.Process().memory_full_info().uss
        idx = Index(nslots=1)
        idx.add(read_index(pathlib.Path({str(path)!r}), namespace="ns"))
        for _ in range(50):
            seg, rows = idx.find_many(probe)
        assert (seg == 0).all() and (rows == probe).all()
        after = psutil.Process().memory_full_info().uss
        print((after - before) / {n})
        sys.stdout.flush()
        input()
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        per_item = [float(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    assert all(b <= 8 for b in per_item), per_item
    assert psutil  # used above through the child processes


@pytest.mark.parametrize("numel", [4, 40_000])  # into a bytearray, and into a recycled buffer
def test_a_batch_partly_in_the_only_loaded_file_reads_only_its_own_rows(tmp_path, caplog, numel):
    """Keys absent from the one loaded file are misses, never row -1 of that file."""
    import logging

    import torch
    from helpers import ListDataset

    from cachedata import CachedDataset

    items = [torch.full((numel,), float(i)) for i in range(10)]
    ds = CachedDataset(ListDataset(items), tmp_path)
    ds.__getitems__([0, 2, 4])
    ds.flush()
    caplog.clear()
    got = ds.__getitems__([0, 1, 2, 3, 4])
    assert all(torch.equal(g, items[i]) for i, g in zip(range(5), got))
    assert ds.stats.hits == 3 and ds.stats.misses == 3 + 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
