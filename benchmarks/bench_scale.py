"""Storage at training sizes: a 10 GiB cache, growth, merge speed, index memory, fragmentation.

Every figure is a ratio measured in this run (or a per-item cost), so a noisy machine moves
both sides alike. Cases:

1. a cache of ``--gib`` GiB of 1 MiB items through ``DataLoader(num_workers=2, batch_size=16)``:
   epoch 1 (cold), the first ``len()`` of epoch 2 (must not wait for consolidation), and the
   warm epoch; the file count at the end of each;
2. 20 growth steps of 5% (each ended by ``merge()``): bytes written over the final size;
3. merge throughput (MB/s) against ``cp`` of the same files;
4. private memory per item of the shared index at 1M and 10M items (``key=None`` and
   ``key=str``), in a fresh process and in spawned workers, and the time to open it;
5. warm items/s after 1,000+ batches were written by workers (background-merged), against
   the same items in one merged file;
6. warm items/s of ``Subset(CachedDataset(...))`` and ``SubsetRandomSampler`` (patterns that
   never call ``len()`` on the dataset), each after its own cold epoch, against the direct
   ``DataLoader(CachedDataset(...))``.

Run from the repository root: ``.venv/bin/python benchmarks/bench_scale.py`` (about 10
minutes on 2 CPUs), ``--quick`` for 1 GiB and 1M items (about 2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

MIB = 1 << 20


class Blobs:
    """``n`` distinct float32 items of ``nbytes`` each, made cheaply (no real transform)."""

    def __init__(self, n: int, nbytes: int = MIB) -> None:
        self.n = n
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        return torch.full((self.nbytes // 4,), float(i), dtype=torch.float32)


class Small:
    """``n`` tiny int64 items (for index-size measurements)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import numpy as np

        return np.asarray([i], np.int64)


def _as_list(batch):
    return batch  # no collate work: the benchmark measures the cache


def _files(path: Path) -> int:
    return sum(1 for p in path.glob("*.h5"))


def _written(path: Path, seen: dict[str, int]) -> int:
    for p in path.glob("*.h5"):
        seen.setdefault(p.name, p.stat().st_size)
    return sum(seen.values())


def _most_files(path: Path, fn: Callable[[], Any]) -> int:
    """Run ``fn`` while a thread counts the data files; the most seen at once."""
    most, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                most[0] = max(most[0], _files(path))
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return most[0]


def case_big_cache(root: Path, gib: float, *, stall: bool = True) -> dict[str, Any]:
    """``stall=False`` turns off the workers' wait for merges (the control run)."""
    from torch.utils.data import DataLoader

    from cachedata import CachedDataset, namespace

    n = int(gib * 1024)
    saved = namespace.STALL_SECONDS
    if not stall:
        namespace.STALL_SECONDS = 0.0  # forked workers inherit it
    try:
        ds = CachedDataset(Blobs(n), root / "big")
        loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=_as_list, shuffle=True,
                            persistent_workers=True, multiprocessing_context="fork")  # fmt: skip
        t0 = time.perf_counter()
        most = _most_files(ds.path, functools.partial(_common.epoch, loader))
        cold = time.perf_counter() - t0
        files_cold = _files(ds.path)
        t0 = time.perf_counter()
        len(ds)
        first_len = time.perf_counter() - t0
        t0 = time.perf_counter()
        most_warm = _most_files(ds.path, functools.partial(_common.epoch, loader))
        warm = time.perf_counter() - t0
        files_warm = _files(ds.path)
        misses = ds.stats.misses
        del loader
        t0 = time.perf_counter()
        ds.merge()
        merge_s = time.perf_counter() - t0
    finally:
        namespace.STALL_SECONDS = saved
    return {
        "items": n,
        "gib": gib,
        "cold_epoch_s": cold,
        "cold_gb_per_s": gib * 1.073741824 / cold,
        "first_len_ms": first_len * 1e3,
        "warm_epoch_s": warm,
        "warm_items_per_s": n / warm,
        "warm_over_cold": warm / cold,
        "most_files_cold": most,
        "files_after_cold": files_cold,
        "most_files_warm": most_warm,
        "files_after_warm": files_warm,
        "misses": misses,
        "final_merge_s": merge_s,
    }


def case_growth(root: Path, steps: int = 20, base_items: int = 400) -> dict[str, Any]:
    from cachedata import CachedDataset

    step = base_items // 20
    n = base_items + steps * step
    ds = CachedDataset(Blobs(n, 256 * 1024), root / "growth")
    seen: dict[str, int] = {}
    ds.__getitems__(list(range(base_items)))
    ds.flush()
    _written(ds.path, seen)
    ds.merge()
    base_written = _written(ds.path, seen)
    base_size = sum(p.stat().st_size for p in ds.path.glob("*.h5"))
    per_step = []  # bytes written by each step over the cache's size before it
    for k in range(steps):
        size = sum(p.stat().st_size for p in ds.path.glob("*.h5"))
        before = _written(ds.path, seen)
        lo = base_items + k * step
        ds.__getitems__(list(range(lo, lo + step)))
        ds.flush()
        _written(ds.path, seen)
        ds.merge()
        per_step.append((_written(ds.path, seen) - before) / size)
    final = sum(p.stat().st_size for p in ds.path.glob("*.h5"))
    return {
        "steps": steps,
        "base_bytes": base_size,
        "first_step_written_over_size": per_step[0],
        "max_step_written_over_size": max(per_step),
        "total_written_over_final": _written(ds.path, seen) / final,
        "after_base_written_over_final": (_written(ds.path, seen) - base_written) / final,
        "files": _files(ds.path),
    }


def case_merge_vs_cp(root: Path, gib: float) -> dict[str, Any]:
    from cachedata import CachedDataset, fileset

    n = max(64, int(gib * 1024))
    ds = CachedDataset(Blobs(n), root / "merge")
    held, fileset.SHARD_LIMIT = fileset.SHARD_LIMIT, 1 << 30  # shards only: no background merge
    try:
        for lo in range(0, n, 64):
            ds.__getitems__(list(range(lo, min(n, lo + 64))))
            ds.flush()
    finally:
        fileset.SHARD_LIMIT = held
    shards = sorted(ds.path.glob("shard-*.h5"))
    nbytes = sum(p.stat().st_size for p in shards)
    copy_dir = root / "cp"
    copy_dir.mkdir()
    # Neither is timed with its writeback: cp never fsyncs, and a merge of shards alone does
    # not either (see cachedata.compaction.merge_files). The untimed sync between them keeps
    # the cp's dirty pages from slowing the merge down.
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, shards), str(copy_dir)], check=True)
    cp_s = time.perf_counter() - t0
    subprocess.run(["sync", "-f", str(copy_dir)], check=False)
    shutil.rmtree(copy_dir)
    t0 = time.perf_counter()
    ds.merge()
    merge_s = time.perf_counter() - t0
    return {
        "bytes": nbytes,
        "cp_mb_per_s": nbytes / MIB / cp_s,
        "merge_mb_per_s": nbytes / MIB / merge_s,
        "merge_over_cp": cp_s / merge_s,
        "files_after": _files(ds.path),
    }


def str_key(i: int) -> str:
    """The ``key=`` of the string-keyed index case (a module function: spawn pickles it)."""
    return f"k{i}"


def rollup() -> dict[str, int]:
    """This process's /proc/self/smaps_rollup, in bytes."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        out[name] = int(value.split()[0]) * 1024
    return out


def probe_reads(ds: Any, n: int) -> tuple[float, float]:
    """Read 20 batches of 512 random items; (private, mapped-file) bytes per item this added.

    Private: anonymous memory no other process can share or the kernel reclaim. Mapped: file
    pages of the memory-mapped index (fault-around maps 64 KiB per touch), page cache shared
    by every reader of the file, and reclaimable.
    """
    import gc

    import numpy as np

    gc.collect()
    before = rollup()
    probe = np.random.default_rng(0).integers(0, n, 512).tolist()
    for _ in range(20):
        ds.__getitems__(probe)
    if ds.stats.misses:
        raise RuntimeError(f"the index probe computed items: {ds.stats}")
    after = rollup()
    mapped = after["Rss"] - after["Anonymous"] - before["Rss"] + before["Anonymous"]
    return (after["Private_Dirty"] - before["Private_Dirty"]) / n, mapped / n


def spawned_reader(ds: Any, n: int, out: Any) -> None:
    """A spawned process given the dataset by pickling, as a spawn DataLoader worker is."""
    import cachedata.budget  # noqa: F401  (imported before measuring: modules are not per-item memory)

    out.put(probe_reads(ds, n))


_INDEX_PROBE = """
import sys, time, json
import multiprocessing as mp
sys.path.insert(0, {here!r})
from bench_scale import Small, probe_reads, spawned_reader, str_key
from cachedata import CachedDataset
import cachedata.budget, h5py  # imported before measuring: modules are not per-item memory

if __name__ == "__main__":
    t0 = time.perf_counter()
    ds = CachedDataset(Small({n}), {cache!r}, key=None if {mode!r} == "index" else str_key)
    ds._store.refresh()
    opened = time.perf_counter() - t0
    private, mapped = probe_reads(ds, {n})
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=spawned_reader, args=(ds, {n}, q))
    p.start()
    spawned_private, _ = q.get(timeout=600)
    p.join(60)
    print(json.dumps({{
        "open_s": opened,
        "private_bytes_per_item": private,
        "spawned_private_bytes_per_item": spawned_private,
        "mapped_file_bytes_per_item": mapped,
    }}))
"""


def _build_small(root: Path, n: int, mode: str) -> Path:
    import numpy as np

    from cachedata import CachedDataset
    from cachedata.storage import checksum, write_file

    key = None if mode == "index" else str_key
    ds = CachedDataset(Small(n), root / f"idx-{mode}-{n}", key=key)
    ds[0]
    ds.flush()  # fixes the schema
    keys = np.arange(n, dtype=np.int64) if key is None else np.sort(ds._addresses.base_keys())
    payload = np.zeros(8, np.uint8)
    sums = np.asarray([checksum(int(k), payload, [1]) for k in keys], np.uint64)
    write_file(
        ds.path / "merged-000900.h5", kind="merged", namespace=ds.fingerprint, schema=ds._store.schema_text,
        keys=keys, sizes=np.full(n, 8), checksums=sums, slots=np.ones((n, 1), np.int64),
        payloads=(payload for _ in range(n)),  # the items' values do not matter here
        compression=None,
    )  # fmt: skip
    for p in ds.path.glob("shard-*"):
        p.unlink()
    return root / f"idx-{mode}-{n}"


def case_index(root: Path, sizes: list[int], modes: tuple[str, ...] = ("index", "str")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    here = str(Path(__file__).resolve().parent)
    for n in sizes:
        for mode in modes:
            cache = _build_small(root, n, mode)
            code = _INDEX_PROBE.format(here=here, mode=mode, n=n, cache=str(cache))
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
            if res.returncode:
                out[f"{mode}_{n}"] = {"error": res.stderr[-500:]}
                continue
            out[f"{mode}_{n}"] = __import__("json").loads(res.stdout.strip().splitlines()[-1])
            shutil.rmtree(cache)
    return out


def case_fragmented(root: Path, n: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from cachedata import CachedDataset

    ds = CachedDataset(Blobs(n, 4096), root / "frag")
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=_as_list)
    batches = sum(1 for _ in loader)
    files = _files(ds.path)
    fresh = CachedDataset(Blobs(n, 4096), root / "frag")
    read = DataLoader(fresh, batch_size=64, num_workers=0, collate_fn=_as_list)
    merged_dir = root / "frag-merged"
    shutil.copytree(root / "frag", merged_dir)
    one = CachedDataset(Blobs(n, 4096), merged_dir)
    one.merge(full=True)
    one = CachedDataset(Blobs(n, 4096), merged_dir)
    read_one = DataLoader(one, batch_size=64, num_workers=0, collate_fn=_as_list)
    _common.epoch(read), _common.epoch(read_one)
    times = _common.interleaved(
        {"written": lambda: _common.epoch(read), "merged": lambda: _common.epoch(read_one)}, 5
    )
    ratios = [m / w for w, m in zip(times["written"], times["merged"])]
    return {
        "batches_written": batches,
        "files": files,
        "written_items_per_s": n / _common.summary(times["written"])["median"],
        "merged_items_per_s": n / _common.summary(times["merged"])["median"],
        "ratio": _common.summary(ratios)["median"],
        "misses": fresh.stats.misses,
    }


def case_patterns(root: Path, n: int) -> dict[str, Any]:
    """Warm items/s of the access patterns that never call len() on the CachedDataset, each
    after its own cold epoch (2 workers, batches of 8), against the direct pattern."""
    import numpy as np
    from torch.utils.data import DataLoader, Subset, SubsetRandomSampler

    from cachedata import CachedDataset

    idx = np.random.default_rng(0).permutation(n).tolist()

    def loaders(ds, batch):
        return {
            "direct": DataLoader(ds, batch_size=batch, num_workers=2, collate_fn=_as_list, shuffle=True),
            "subset_outside": DataLoader(Subset(ds, idx), batch_size=batch, num_workers=2, collate_fn=_as_list),
            "subset_sampler": DataLoader(ds, batch_size=batch, num_workers=2, collate_fn=_as_list,
                                         sampler=SubsetRandomSampler(idx)),
        }  # fmt: skip

    files = {}
    warm_loaders = {}
    for name in ("direct", "subset_outside", "subset_sampler"):
        ds = CachedDataset(Blobs(n, 16384), root / f"pattern-{name}")
        _common.epoch(loaders(ds, 8)[name])  # cold: written in batches of 8, merged by the workers
        files[name] = _files(ds.path)
        warm_loaders[name] = loaders(CachedDataset(Blobs(n, 16384), root / f"pattern-{name}"), 64)[name]
    for loader in warm_loaders.values():
        _common.epoch(loader)
    times = _common.interleaved({k: (lambda v=v: _common.epoch(v)) for k, v in warm_loaders.items()}, 3)
    direct = times["direct"]
    return {
        "items": n,
        "files": files,
        "items_per_s": {k: n / _common.summary(v)["median"] for k, v in times.items()},
        "vs_direct": {
            k: _common.summary([d / t for d, t in zip(direct, v)])["median"] for k, v in times.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB and 1M index items (about 2 minutes)")
    parser.add_argument("--tiny", action="store_true", help="minimal sizes: checks that the script runs")
    parser.add_argument("--gib", type=float, default=None, help="size of the big cache (default 10, quick 1)")
    parser.add_argument("--cases", default="1,2,3,4,5,6")
    parser.add_argument("--tmp", default=None, help="where caches go (needs about 2.5x --gib free)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args()
    gib = args.gib or (0.03 if args.tiny else 1.0 if args.quick else 10.0)
    small = args.quick or args.tiny
    cases = {int(c) for c in args.cases.split(",")}
    root = _common.make_tmp(args.tmp, "scale")
    results: dict[str, Any] = {"machine": _common.machine(), "gib": gib}
    try:
        if 1 in cases:
            results["big_cache"] = case_big_cache(root, gib)
            shutil.rmtree(root / "big", ignore_errors=True)
            print("big cache", results["big_cache"], flush=True)
            results["big_cache_no_stall"] = case_big_cache(root, gib, stall=False)
            shutil.rmtree(root / "big", ignore_errors=True)
            print("big cache, workers never wait", results["big_cache_no_stall"], flush=True)
        if 2 in cases:
            results["growth"] = case_growth(root, base_items=40 if args.tiny else 400)
            print("growth", results["growth"], flush=True)
        if 3 in cases:
            results["merge_vs_cp"] = case_merge_vs_cp(root, min(gib, 2.0))
            print("merge vs cp", results["merge_vs_cp"], flush=True)
        if 4 in cases:
            sizes = [20_000] if args.tiny else [1_000_000] if args.quick else [1_000_000, 10_000_000]
            results["index"] = case_index(root, sizes, ("index",) if args.tiny else ("index", "str"))
            print("index", results["index"], flush=True)
        if 5 in cases:
            results["fragmented"] = case_fragmented(root, 400 if args.tiny else 8_000 if small else 16_000)
            print("fragmented", results["fragmented"], flush=True)
        if 6 in cases:
            results["patterns"] = case_patterns(root, 400 if args.tiny else 8_000 if small else 40_000)
            print("patterns", results["patterns"], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _common.write_json(args.out, results)
    print(render(results))
    return 0


def render(r: dict[str, Any]) -> str:
    """The README's "At scale" table."""
    rows = []
    if "big_cache" in r:
        b = r["big_cache"]
        rows += [
            (f"{b['gib']:g} GiB cache, 1 MiB items, 2 workers: cold epoch", f"{b['cold_gb_per_s']:.2f} GB/s, {b.get('most_files_cold', '?')} files at most, {b['files_after_cold']} at the end"),
            ("first len() of epoch 2", f"{b['first_len_ms']:.2f} ms"),
            ("warm epoch", f"{b['warm_items_per_s']:.0f} items/s ({b['warm_over_cold']:.2f}x the cold time), {b['files_after_warm']} files"),
        ]  # fmt: skip
        if "big_cache_no_stall" in r:
            c = r["big_cache_no_stall"]
            rows += [
                ("control, workers never wait for merges: cold epoch", f"{c['cold_gb_per_s']:.2f} GB/s, {c['most_files_cold']} files at most, {c['files_after_cold']} at the end"),
                ("control: warm epoch", f"{c['warm_items_per_s']:.0f} items/s, {c['most_files_warm']} files at most, {c['files_after_warm']} at the end"),
                ("control: cold + warm epochs over the default's", f"{(c['cold_epoch_s'] + c['warm_epoch_s']) / (b['cold_epoch_s'] + b['warm_epoch_s']):.2f}x"),
            ]  # fmt: skip
    if "growth" in r:
        g = r["growth"]
        rows += [
            ("first 5% step: written / cache size", f"{g['first_step_written_over_size']:.2f}"),
            (
                f"{g['steps']} steps of 5%: written in all / final size",
                f"{g['total_written_over_final']:.2f}",
            ),
        ]
    if "merge_vs_cp" in r:
        m = r["merge_vs_cp"]
        rows.append(
            (
                "merge vs cp",
                f"{m['merge_mb_per_s']:.0f} vs {m['cp_mb_per_s']:.0f} MB/s ({m['merge_over_cp']:.2f}x)",
            )
        )
    for k, v in r.get("index", {}).items():
        if "private_bytes_per_item" in v:
            rows.append(
                (
                    f"index {k}: per item, open",
                    f"{v['private_bytes_per_item']:.2f} B private"
                    f" ({v.get('spawned_private_bytes_per_item', float('nan')):.2f} in a spawned process)"
                    f" (+{v.get('mapped_file_bytes_per_item', 0):.0f} B shared page cache),"
                    f" {v['open_s'] * 1e3:.0f} ms",
                )
            )
    if "fragmented" in r:
        f = r["fragmented"]
        rows.append(
            (
                f"{f['batches_written']} batches written by 2 workers ({f['files']} files) vs one file",
                f"{f['ratio']:.2f}x",
            )
        )
    if "patterns" in r:
        p = r["patterns"]
        for k in ("subset_outside", "subset_sampler"):
            rows.append(
                (
                    f"warm {k} vs direct ({p['files'][k]} vs {p['files']['direct']} files)",
                    f"{p['vs_direct'][k]:.2f}x",
                )
            )
    width = max(len(a) for a, _ in rows) if rows else 10
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


if __name__ == "__main__":
    sys.exit(main())
