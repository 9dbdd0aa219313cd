"""CachedDataset under real torch.distributed (gloo) process groups with DataLoader workers."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from helpers import LogCalls, Ragged, count_calls, identity_batch
from torch.utils.data import DataLoader, DistributedSampler

from cachedata import CachedDataset

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(target, world: int, args_of) -> None:
    """Spawn ``world`` rank processes running ``target(rank, world, *args_of(rank))``; all must succeed."""
    ctx = tmp_mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, *args_of(r))) for r in range(world)]
    for p in procs:
        p.start()
    for r, p in enumerate(procs):
        p.join(240)
        assert p.exitcode == 0, f"rank {r} exited with {p.exitcode}"


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _epochs(
    rank: int, world: int, port: int, cache: str, log: str, n: int, drop_last: bool, out: str, workers: int
) -> None:
    _init(rank, world, port)
    try:
        ds = CachedDataset(Ragged(n), cache, transform=LogCalls(log))
        sampler = DistributedSampler(
            ds, num_replicas=world, rank=rank, shuffle=True, drop_last=drop_last, seed=1
        )
        loader = DataLoader(
            ds,
            batch_size=4,
            sampler=sampler,
            num_workers=workers,
            collate_fn=identity_batch,
            persistent_workers=workers > 0,
        )
        result = {"epochs": []}
        for epoch in range(2):
            sampler.set_epoch(epoch)
            names = [item["name"] for batch in loader for item in batch]
            dist.barrier()
            result["epochs"].append({"names": names, "calls": count_calls(log)})
            dist.barrier()
        result["merged"] = ds.merge()
        result["files"] = sorted(p.name for p in ds.path.glob("*.h5"))
        result["stats"] = ds.stats.to_dict()
        Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("world", "drop_last", "workers"),
    [(2, False, 2), (2, True, 2), (3, False, 2), (2, False, 0)],
    ids=["2-pad", "2-drop", "3-pad", "2-pad-no-workers"],
)
def test_ranks_compute_each_item_once_in_total(tmp_path, world, drop_last, workers):
    """With workers, and without (a rank's main process seals every batch too under DDP)."""
    n = 50  # uneven: 50 is not a multiple of 3 (and not of 4 batches)
    log = tmp_path / "calls.log"
    port = _free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(world)]
    _run_ranks(
        _epochs, world, lambda r: (port, str(tmp_path / "cache"), str(log), n, drop_last, outs[r], workers)
    )
    results = [json.loads(Path(o).read_text()) for o in outs]
    readers = collections.Counter(name for r in results for name in r["epochs"][0]["names"])
    seen = set(readers)
    expected = n if not drop_last else (n // world) * world
    assert len(seen) == expected
    # Epoch 1 computes every item exactly once in total. The exception is an item that two
    # ranks read in the same epoch (without drop_last, DistributedSampler pads the ranks'
    # shares by repeating the first items: 3 ranks, 50 items): the second computes it too when
    # it gets there before the first has sealed it, since no rank waits for another's unsealed
    # work. Whether it does is a race, so for that item only the bound is checked.
    first = results[0]["epochs"][0]["calls"]  # every rank finished epoch 1 before this count
    calls = collections.Counter(line.split()[2] for line in log.read_text().splitlines()[:first])
    assert set(calls) == seen and sum(readers.values()) - len(seen) == (0 if drop_last else -n % world)
    for name, k in readers.items():
        assert (calls[name] == 1) if k == 1 else (1 <= calls[name] <= k), (name, k, calls[name])
    both = seen | {name for r in results for name in r["epochs"][1]["names"]}
    # Epoch 2 computes nothing seen before (with drop_last a reshuffle may bring a dropped item).
    assert results[0]["epochs"][1]["calls"] - first == len(both - seen), (
        "epoch 2 computes only items never seen"
    )
    assert not any(r["merged"] for r in results[1:]), "only rank 0 merges"
    files = results[0]["files"]  # rank 0 merged on its own (complete) or on merge()
    assert len(files) == 1 and files[0].startswith("merged-") and all(r["files"] == files for r in results)
    # A fresh process reads every item as a hit with exact values.
    ds = CachedDataset(Ragged(n), tmp_path / "cache", transform=LogCalls(log))
    want = LogCalls(os.devnull)
    for i in range(n):
        if f"item-{i}" in both:
            assert torch.equal(ds[i]["x"], want(Ragged(n)[i])["x"])
    assert ds.stats.misses == 0 and count_calls(log) == first + len(both - seen)
    shards = {p.name for p in (tmp_path / "cache").glob("*/shard-*")}
    assert not shards


def _shard_names_and_merge_while_reading(
    rank: int, world: int, port: int, cache: str, log: str, out: str
) -> None:
    _init(rank, world, port)
    try:
        n = 40
        ds = CachedDataset(Ragged(n), cache, transform=LogCalls(log))
        mine = list(range(rank, n, world))
        ds.__getitems__(mine)
        ds.flush()
        dist.barrier()  # both ranks have flushed: list only after, or rank 1's shard may not exist yet
        names = sorted(p.name for p in ds.path.glob("shard-*.h5"))
        dist.barrier()  # ...and before rank 0 merges them away
        want = LogCalls(os.devnull)
        reads = wrong = 0
        if rank == 0:
            time.sleep(0.3)  # rank 1 is reading by now
            for _ in range(3):
                ds._store.consolidate(ds._identity())  # not collective: the other rank keeps reading
                ds.__getitems__(list(range(n)))
                time.sleep(0.1)
        else:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for i in range(n):
                    reads += 1
                    wrong += not torch.equal(ds[i]["x"], want(Ragged(n)[i])["x"])
        dist.barrier()
        Path(out).write_text(
            json.dumps({"names": names, "reads": reads, "wrong": wrong, "misses": ds.stats.misses})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_rank_reads_while_rank0_merges_and_shards_carry_the_rank(tmp_path):
    port = _free_port()
    log = tmp_path / "log"
    outs = [str(tmp_path / f"r{r}.json") for r in range(2)]
    _run_ranks(
        _shard_names_and_merge_while_reading, 2, lambda r: (port, str(tmp_path / "c"), str(log), outs[r])
    )
    r0, r1 = (json.loads(Path(o).read_text()) for o in outs)
    assert any(name.startswith("shard-r0-wm-") for name in r0["names"])
    assert any(name.startswith("shard-r1-wm-") for name in r0["names"])
    assert r1["reads"] > 40 and r1["wrong"] == 0 and r1["misses"] == 20  # only its own first misses
    assert count_calls(log) == 40


def _warm(rank: int, world: int, port: int, cache: str, log: str) -> None:
    _init(rank, world, port)
    try:
        ds = CachedDataset(Ragged(60), cache, transform=LogCalls(log))
        ds.warm(num_workers=1, batch_size=8, progress=False)
        assert ds.num_cached == 60
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_warm_splits_the_work_across_ranks(tmp_path):
    port = _free_port()
    log = tmp_path / "log"
    _run_ranks(_warm, 2, lambda r: (port, str(tmp_path / "c"), str(log)))
    assert count_calls(log) == 60
    lines = log.read_text().splitlines()
    assert len({line.split()[0] for line in lines}) == 2, "both ranks' workers computed a share"
    assert [p.name for p in (tmp_path / "c").glob("*/*.h5")] == ["merged-000001.h5"]


@pytest.mark.timeout(300)
def test_ddp_example_runs_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "examples" / "ddp_train.py"), "--items", "64", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cold epoch" in out.stdout and "warm epoch" in out.stdout
    assert "hit rate 100%" in out.stdout
