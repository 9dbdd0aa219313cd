"""Core CachedDataset performance, as ratios against simple limits, in one run.

Cases (each timed interleaved with its baseline where it has one; median of the repeats,
spread = (max - min) / median across the repeats):

1. images   warm epoch of float32[3, 224, 224] items through DataLoader(batch_size=64,
            num_workers=0, default collate) vs the limit: the same bytes in one raw file read
            through np.memmap from the page cache, one copy per item, same DataLoader setup.
            PASS when cachedata reaches >= 70% of the limit's items/s.
2. tokens   warm random-order ``ds.__getitems__`` batches of 256 ragged int64 sequences
            (lengths 32..512) in one process. PASS at >= 100,000 items/s.
3. cold     first epoch with a ~1 ms/item transform (busy-wait, and a calibrated numpy
            computation) through DataLoader(batch_size=64, num_workers=0): cachedata
            (construction + epoch + flush() to disk) vs the uncached dataset + transform.
            PASS when cachedata is at most 10% slower. Fresh cache folder per repeat.
4. index    a cache of 1,000,000 tiny int64[4] items; in a fresh subprocess, time from
            ``CachedDataset(...)`` to the first ``ds[0]`` returning (index load included) and
            the RSS increase over the same span. PASS at < 1 s and < 100 bytes/item.
5. fingerprint of a 100 MB model. PASS at < 1 s.
6. cli      ``cachedata info PATH`` on a cache of 10 namespaces (half merged, half in shards),
            a fresh interpreter each time, vs ``python -c pass``, interleaved. PASS when
            ``info`` takes < 0.3 s (it reads meta.json, names, sizes, leases and each file's
            row-count xattr: no numpy, no HDF5); --help, --version and ``info --items`` (which reads every file's index)
            are timed too (diagnostic).

Usage: python benchmarks/bench_core.py [--quick] [--repeats N] [--cases 1,2,3,4,5,6] [--out PATH]
Writes the results as JSON (default benchmarks/results/core.json); exit status 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (  # benchmarks/_common.py: helpers shared with bench_peers.py
    check_equal,
    epoch,
    interleaved,
    machine,
    make_tmp,
    maybe_summary,
    reset_hwm,
    summary,
    timed,
    vm_hwm,
    write_json,
)

from cachedata import CachedDataset

# ------------------------------------------------------------------------------ datasets
# Deterministic sources. Each names itself via __cachedata_fingerprint__ so that building the
# namespace fingerprint never hashes large arrays, and a subprocess gets the same namespace.


class ImageSource(Dataset):
    """float32[3, 224, 224] items, item i drawn from a generator seeded with (seed, i)."""

    shape = (3, 224, 224)

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def array(self, i: int) -> np.ndarray:
        return np.random.default_rng([self.seed, i]).standard_normal(self.shape, dtype=np.float32)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.array(i))

    def __cachedata_fingerprint__(self) -> str:
        return f"ImageSource-v1-{self.n}-{self.seed}"


class MemmapImages(Dataset):
    """The limit for case 1: items read from one raw file through np.memmap, copied out."""

    def __init__(self, path: Path, n: int, shape: tuple[int, ...]) -> None:
        self.mm = np.memmap(path, dtype=np.float32, mode="r", shape=(n, *shape))

    def __len__(self) -> int:
        return len(self.mm)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.mm[i]))


class TokenSource(Dataset):
    """Ragged int64 token sequences, lengths 32..512, from one pre-generated flat array."""

    def __init__(self, n: int, seed: int = 1) -> None:
        self.n, self.seed = n, seed
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(32, 513, n)
        self.starts = np.zeros(n + 1, np.int64)
        np.cumsum(self.lengths, out=self.starts[1:])
        self.flat = rng.integers(0, 50_000, int(self.starts[-1]), dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.flat[self.starts[i] : self.starts[i + 1]].copy())

    def __cachedata_fingerprint__(self) -> str:
        return f"TokenSource-v1-{self.n}-{self.seed}"


class SmallSource(Dataset):
    """float32[256] items for the cold-epoch case."""

    def __init__(self, n: int, seed: int = 2) -> None:
        self.n, self.seed = n, seed
        self.data = np.random.default_rng(seed).standard_normal((n, 256), dtype=np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.data[i].copy())

    def __cachedata_fingerprint__(self) -> str:
        return f"SmallSource-v1-{self.n}-{self.seed}"


class TinySource(Dataset):
    """int64[4] items (i, i+1, i+2, i+3) for the index-size case (and bench_peers' scaling)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.arange(i, i + 4, dtype=torch.int64)

    def __cachedata_fingerprint__(self) -> str:
        return f"TinySource-v1-{self.n}"


class Transformed(Dataset):
    """The uncached baseline of case 3: ``transform(source[i])`` on every access."""

    def __init__(self, source: Dataset, transform: Callable[[Any], Any]) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.source[i])


# ---------------------------------------------------------------------------- transforms


class BusyTransform:
    """Spins on the CPU for ``ms`` milliseconds, then returns ``x * 2``."""

    def __init__(self, ms: float = 1.0) -> None:
        self.seconds = ms / 1e3

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return x * 2

    def __cachedata_fingerprint__(self) -> str:
        return f"BusyTransform-{self.seconds!r}"


class NumpyTransform:
    """A deterministic numpy computation: ``iters`` rounds of tanh(M @ v) on 16 columns of 16."""

    def __init__(self, iters: int) -> None:
        self.iters = iters
        self.m = np.random.default_rng(3).standard_normal((16, 16)) / 4.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = x.numpy().astype(np.float64).reshape(16, 16)
        m = self.m
        for _ in range(self.iters):
            v = np.tanh(m @ v)
        return torch.from_numpy(v.astype(np.float32).reshape(-1))

    def __cachedata_fingerprint__(self) -> str:
        return f"NumpyTransform-{self.iters}"

    @classmethod
    def calibrated(cls, ms: float = 1.0) -> NumpyTransform:
        """Pick ``iters`` so that one call costs about ``ms`` milliseconds on this machine."""
        x = torch.ones(256)
        probe = cls(200)
        probe(x)
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            for _ in range(5):
                probe(x)
            times.append((time.perf_counter() - t0) / 5)
        per_iter = min(times) / 200  # the minimum: background load only ever adds time
        return cls(max(1, round(ms / 1e3 / per_iter)))


# -------------------------------------------------------------------------------- cases


def case_images(n: int, repeats: int, tmp_root: str | None) -> dict[str, Any]:
    tmp = make_tmp(tmp_root, "images")
    try:
        src = ImageSource(n)
        raw = tmp / "images.f32"
        t0 = time.perf_counter()
        with open(raw, "wb") as f:
            for i in range(n):
                f.write(src.array(i).tobytes())
        t_raw = time.perf_counter() - t0
        cds = CachedDataset(src, tmp / "cache")
        t0 = time.perf_counter()
        cds.warm(num_workers=0, progress=False)
        t_warm = time.perf_counter() - t0
        # a fresh instance, as a later training run would open it
        cds = CachedDataset(src, tmp / "cache")
        mm = MemmapImages(raw, n, ImageSource.shape)
        for i in (0, n // 2, n - 1):
            check_equal(cds[i], src[i], f"image {i}")
            check_equal(mm[i], src[i], f"memmap image {i}")
        loaders = {
            "cachedata": DataLoader(cds, batch_size=64, num_workers=0),
            "memmap": DataLoader(mm, batch_size=64, num_workers=0),
        }
        for loader in loaders.values():  # page-cache (and allocator) warm-up, untimed
            assert epoch(loader) == n
        cpu: dict[str, list[float]] = {}
        times = interleaved({k: (lambda ld=ld: epoch(ld)) for k, ld in loaders.items()}, repeats, cpu)
        item_bytes = int(np.prod(ImageSource.shape)) * 4
        ips = {k: summary([n / t for t in v]) for k, v in times.items()}
        # Each repeat's pair ran back to back: the median of the paired ratios follows the
        # machine's changing load better than the ratio of the two medians (also reported).
        ratios = [b / a for a, b in zip(times["cachedata"], times["memmap"])]
        ratio = statistics.median(ratios)
        stats = cds.stats
        return {
            "items": n,
            "item_bytes": item_bytes,
            "build": {
                "raw_file_seconds": t_raw,
                "warm_seconds": t_warm,
                "warm_items_per_s": n / t_warm,
                "cache_bytes_on_disk": sum(p.stat().st_size for p in cds.path.glob("*.h5")),
            },
            "cachedata_items_per_s": ips["cachedata"],
            "memmap_items_per_s": ips["memmap"],
            "cachedata_gb_per_s": ips["cachedata"]["median"] * item_bytes / 1e9,
            "memmap_gb_per_s": ips["memmap"]["median"] * item_bytes / 1e9,
            "ratio": ratio,
            "ratio_per_repeat": summary(ratios),
            "ratio_of_medians": statistics.median(times["memmap"]) / statistics.median(times["cachedata"]),
            "cpu_ratio": statistics.median([b / a for a, b in zip(cpu["cachedata"], cpu["memmap"])]),
            "hit_rate": stats.hit_rate,
            "target": ">= 0.70",
            "pass": ratio >= 0.70,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def case_tokens(n: int, repeats: int, tmp_root: str | None) -> dict[str, Any]:
    tmp = make_tmp(tmp_root, "tokens")
    try:
        src = TokenSource(n)
        cds = CachedDataset(src, tmp / "cache")
        t0 = time.perf_counter()
        cds.warm(num_workers=0, batch_size=256, progress=False)
        t_warm = time.perf_counter() - t0
        cds = CachedDataset(src, tmp / "cache")
        for i in (0, 1, n // 2, n - 1):
            check_equal(cds[i], src[i], f"tokens {i}")
        perm = np.random.default_rng(4).permutation(n).tolist()
        batches = [perm[lo : lo + 256] for lo in range(0, n, 256)]
        getitems = cds.__getitems__

        def run_cached() -> None:
            for b in batches:
                getitems(b)

        def run_memory() -> None:  # reference: slicing the source's in-memory array
            get = src.__getitem__
            for b in batches:
                [get(i) for i in b]

        run_cached()  # warm page cache and allocator
        run_memory()
        cpu: dict[str, list[float]] = {}
        times = interleaved({"cachedata": run_cached, "in_memory": run_memory}, repeats, cpu)
        ips = {k: summary([n / t for t in v]) for k, v in times.items()}
        tok_bytes = int(src.lengths.sum()) * 8
        return {
            "items": n,
            "mean_item_bytes": tok_bytes / n,
            "build": {"warm_seconds": t_warm, "warm_items_per_s": n / t_warm},
            "cachedata_items_per_s": ips["cachedata"],
            "cachedata_us_per_item": 1e6 / ips["cachedata"]["median"],
            "cachedata_items_per_cpu_s": summary([n / t for t in cpu["cachedata"]]),
            "in_memory_items_per_s": ips["in_memory"],
            "cachedata_vs_in_memory": ips["cachedata"]["median"] / ips["in_memory"]["median"],
            "target": ">= 100000 items/s",
            "pass": ips["cachedata"]["median"] >= 100_000,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def case_cold(n: int, repeats: int, tmp_root: str | None) -> dict[str, Any]:
    tmp = make_tmp(tmp_root, "cold")
    src = SmallSource(n)
    out: dict[str, Any] = {"items": n, "target": "cachedata <= 1.10x uncached"}
    try:
        transforms = {
            "busy_wait_1ms": BusyTransform(1.0),
            "numpy_1ms": NumpyTransform.calibrated(1.0),
            # A transform that costs nothing: what remains is cachedata's own work per miss
            # (encode, checksum, buffer, a fresh decoded copy, the shard write), in us/item.
            "zero_cost": BusyTransform(0.0),
        }
        out["numpy_iters"] = transforms["numpy_1ms"].iters
        counter = [0]
        for name, tf in transforms.items():
            x = src[0]
            t0 = time.perf_counter()
            for _ in range(50):
                tf(x)
            per_call_ms = (time.perf_counter() - t0) / 50 * 1e3
            parts: dict[str, list[float]] = {"construct": [], "epoch": [], "flush": []}

            def run_cached(tf: Callable = tf, parts: dict = parts) -> None:
                counter[0] += 1
                folder = tmp / f"c{counter[0]}"  # fresh cache folder for every repeat
                t0 = time.perf_counter()
                cds = CachedDataset(src, folder, transform=tf)
                t1 = time.perf_counter()
                assert epoch(DataLoader(cds, batch_size=64, num_workers=0)) == n
                t2 = time.perf_counter()
                cds.flush()
                t3 = time.perf_counter()
                parts["construct"].append(t1 - t0)
                parts["epoch"].append(t2 - t1)
                parts["flush"].append(t3 - t2)
                st = cds.stats
                assert st.misses == n and st.writes == n, st

            base_loader = DataLoader(Transformed(src, tf), batch_size=64, num_workers=0)
            run_cached()  # warm-up: imports, allocator, first-call costs (untimed)
            epoch(base_loader)
            for k in parts:
                parts[k].clear()
            cpu: dict[str, list[float]] = {}
            times = interleaved(
                {"cachedata": run_cached, "uncached": lambda ld=base_loader: epoch(ld)}, repeats, cpu
            )
            ratios = [a / b for a, b in zip(times["cachedata"], times["uncached"])]
            ratio = statistics.median(ratios)  # paired, as in case 1
            epoch_ratio = statistics.median(parts["epoch"]) / statistics.median(times["uncached"])
            out[name] = {
                "transform_ms_per_item": per_call_ms,
                "cachedata_seconds": summary(times["cachedata"]),
                "uncached_seconds": summary(times["uncached"]),
                "cachedata_parts_seconds": {k: summary(v) for k, v in parts.items()},
                "overhead_us_per_item": (
                    statistics.median(times["cachedata"]) - statistics.median(times["uncached"])
                )
                / n
                * 1e6,
                "ratio": ratio,
                "ratio_per_repeat": summary(ratios),
                "ratios": ratios,
                "ratio_of_medians": statistics.median(times["cachedata"])
                / statistics.median(times["uncached"]),
                "epoch_only_ratio": epoch_ratio,
                "cpu_ratio": statistics.median([a / b for a, b in zip(cpu["cachedata"], cpu["uncached"])]),
                "pass": ratio <= 1.10,
            }
        out["zero_cost"]["pass"] = None  # informational: cachedata's own cost per miss
        out["pass"] = all(out[k]["pass"] for k in ("busy_wait_1ms", "numpy_1ms"))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_cache(n: int, cache_dir: Path) -> dict[str, Any]:
    """Cache every TinySource(n) item through ``__getitems__`` batches of 65,536, then merge."""
    cds = CachedDataset(TinySource(n), cache_dir)
    t0 = time.perf_counter()
    step = 65536
    for lo in range(0, n, step):
        cds.__getitems__(range(lo, min(n, lo + step)))
    t1 = time.perf_counter()
    cds.merge()
    t2 = time.perf_counter()
    out = {
        "getitems_seconds": t1 - t0,
        "merge_seconds": t2 - t1,
        "items_per_s": n / (t2 - t0),
        "files": sorted(p.name for p in cds.path.glob("*.h5")),
        "bytes_on_disk": sum(p.stat().st_size for p in cds.path.glob("*.h5")),
        "fingerprint": cds.fingerprint,
    }
    del cds
    gc.collect()
    return out


def open_probe(cache_dir: str | Path, n: int, reads: int = 0) -> dict[str, Any]:
    """In a process that has not opened the cache yet: time from ``CachedDataset(...)`` to the
    first ``ds[0]`` returning and the RSS increase over that span (peak, and after malloc_trim).

    With ``reads`` > 0, also the warm per-item cost of a ``ds[i]`` loop and of
    ``__getitems__`` batches of 256 over ``reads`` random indices (after the memory figures).
    """
    import ctypes

    import psutil

    proc = psutil.Process()
    src = TinySource(n)
    gc.collect()
    can_peak = reset_hwm()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    ds = CachedDataset(src, cache_dir)
    t1 = time.perf_counter()
    x = ds[0]
    t2 = time.perf_counter()
    rss1 = proc.memory_info().rss
    peak = vm_hwm() if can_peak else None
    y = ds[n - 1]
    st = ds.stats
    same = torch.equal(x, src[0]) and torch.equal(y, src[n - 1])
    ok = same and st.misses == 0 and st.hits == 2
    # Diagnostic: how much of the increase is memory freed but kept by the C allocator.
    trimmed = None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = proc.memory_info().rss - rss0
    except (OSError, AttributeError):
        pass
    out: dict[str, Any] = {
        "open_seconds": t2 - t0,
        "construct_seconds": t1 - t0,
        "first_read_seconds": t2 - t1,
        "rss_increase_bytes": rss1 - rss0,
        "peak_rss_increase_bytes": None if peak is None else max(0, peak - rss0),
        "rss_increase_after_malloc_trim_bytes": trimmed,
        "ok": bool(ok),
        "equal": bool(same),
        "hits": st.hits,
        "misses": st.misses,
        "fingerprint": ds.fingerprint,
    }
    if reads > 0:
        idx = np.random.default_rng(5).integers(0, n, reads).tolist()
        get, getitems = ds.__getitem__, ds.__getitems__
        for i in idx[:256]:  # first touches of the pages and the allocator, untimed
            get(i)
        t0 = time.perf_counter()
        for i in idx:
            get(i)
        t1 = time.perf_counter()
        for lo in range(0, reads, 256):
            getitems(idx[lo : lo + 256])
        t2 = time.perf_counter()
        out["loop_us_per_item"] = (t1 - t0) / reads * 1e6
        out["getitems_us_per_item"] = (t2 - t1) / reads * 1e6
        out["reads"] = reads
        out["ok"] = out["ok"] and ds.stats.misses == 0
    return out


def case_index(n: int, repeats: int, tmp_root: str | None) -> dict[str, Any]:
    tmp = make_tmp(tmp_root, "index")
    try:
        build = build_tiny_cache(n, tmp / "cache")
        built_fp = build.pop("fingerprint")
        runs = []
        for _ in range(repeats):
            res = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--_probe-open", str(tmp / "cache"), str(n)],
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                raise SystemExit(f"open probe failed:\n{res.stdout}\n{res.stderr}")
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        bad = [r for r in runs if not r["ok"]]
        if bad:
            raise SystemExit(
                f"benchmark sanity check failed: the open probe (namespace {bad[0]['fingerprint']}, built "
                f"as {built_fp}) read equal={bad[0]['equal']}, hits={bad[0]['hits']}, "
                f"misses={bad[0]['misses']}; a different namespace means the fingerprint code changed "
                "between the build and the probe"
            )
        open_s = summary([r["open_seconds"] for r in runs])
        rss = summary([r["rss_increase_bytes"] for r in runs])
        scale = n / 1_000_000
        open_bound, rss_bound = 1.0 * scale, 100e6 * scale
        return {
            "items": n,
            "build": build,
            "open_seconds": open_s,
            "construct_seconds": summary([r["construct_seconds"] for r in runs]),
            "first_read_seconds": summary([r["first_read_seconds"] for r in runs]),
            "rss_increase_bytes": rss,
            "rss_bytes_per_item": rss["median"] / n,
            "peak_rss_increase_bytes": maybe_summary([r["peak_rss_increase_bytes"] for r in runs]),
            "rss_increase_after_malloc_trim_bytes": maybe_summary(
                [r["rss_increase_after_malloc_trim_bytes"] for r in runs]
            ),
            "open_bound_seconds": open_bound,
            "rss_bound_bytes": rss_bound,
            "open_pass": open_s["median"] < open_bound,
            "rss_pass": rss["median"] < rss_bound,
            "pass": open_s["median"] < open_bound and rss["median"] < rss_bound,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------- main


def case_fingerprint(n: int, repeats: int, tmp_root: str | None) -> dict[str, Any]:
    """fingerprint() of a model with ``n`` MB of float32 weights: well under a second."""
    from cachedata import fingerprint

    torch.manual_seed(0)
    per_layer = 2048 * 2048  # 16 MiB float32 per layer
    layers = max(1, round(n * 2**20 / (per_layer * 4)))
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)])
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    first = fingerprint(model)
    times = [timed(lambda: fingerprint(model)) for _ in range(repeats)]
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    changed = fingerprint(model) != first
    secs = summary(times)
    return {
        "model_bytes": nbytes,
        "seconds": secs,
        "gb_per_s": nbytes / secs["median"] / 1e9,
        "one_weight_changes_it": changed,
        "target": "< 1 s for 100 MB",
        "pass": secs["median"] < 1.0 and changed,
    }


def case_cli(n: int, repeats: int, tmp_root: str | None) -> dict[str, Any]:
    """Start-up of the command line: ``cachedata info`` on ``n`` namespaces vs ``python -c pass``."""
    from cachedata import CachedDataset

    tmp = make_tmp(tmp_root, "cli")
    try:
        cache = tmp / "cache"
        for v in range(n):
            ds = CachedDataset(list(range(50)), cache, version=str(v))
            ds.__getitems__(list(range(50)))
            ds.merge() if v % 2 else ds.flush()
        # As installed: byte-compiled (into __pycache__, ignored by git), and allowed to use it.
        root = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "cachedata")], check=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        cli = [sys.executable, "-m", "cachedata"]

        cpu: dict[str, list[float]] = {}

        def run(name: str, argv: list[str]) -> Callable[[], None]:
            def once() -> None:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                cpu.setdefault(name, []).append(used)

            return once

        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "cachedata --version": [*cli, "--version"],
            "cachedata --help": [*cli, "--help"],
            "cachedata info --items": [*cli, "info", "--items", str(cache)],
            "cachedata info": [*cli, "info", str(cache)],
        }
        times = interleaved({k: run(k, v) for k, v in commands.items()}, repeats)
        secs = {k: summary(v) for k, v in times.items()}
        info = secs["cachedata info"]["median"]
        return {
            "namespaces": n,
            "seconds": secs,
            # CPU seconds of the child (user + system): hardly grows when other jobs compete
            # for the CPUs, unlike wall time (a diagnostic on a shared machine).
            "cpu_seconds": {k: summary(v) for k, v in cpu.items()},
            "info_minus_python_seconds": info - secs["python -c pass"]["median"],
            "target": "cachedata info < 0.3 s",
            "pass": info < 0.3,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fmt_rate(s: dict[str, float]) -> str:
    return f"{s['median']:>10,.0f}/s ±{s['spread'] * 50:4.1f}%"


def print_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str]] = []
    r = results.get("images")
    if r:
        rows.append(("1 images warm: cachedata", fmt_rate(r["cachedata_items_per_s"]),
                     f"{r['cachedata_gb_per_s']:.2f} GB/s", ""))  # fmt: skip
        rows.append(("1 images warm: memmap limit", fmt_rate(r["memmap_items_per_s"]),
                     f"{r['memmap_gb_per_s']:.2f} GB/s", ""))  # fmt: skip
        rp = r["ratio_per_repeat"]
        rows.append(("1 images: cachedata / limit", f"{r['ratio']:.2f} [{rp['min']:.2f}..{rp['max']:.2f}]",
                     f"{r['target']} (ratio of medians {r['ratio_of_medians']:.2f}, CPU-time {r['cpu_ratio']:.2f})",
                     "PASS" if r["pass"] else "FAIL"))  # fmt: skip
    r = results.get("tokens")
    if r:
        rows.append(("2 tokens __getitems__(256)", fmt_rate(r["cachedata_items_per_s"]),
                     f"{r['cachedata_us_per_item']:.1f} us/item; target {r['target']}",
                     "PASS" if r["pass"] else "FAIL"))  # fmt: skip
        rows.append(("2 tokens per CPU-second", fmt_rate(r["cachedata_items_per_cpu_s"]),
                     "diagnostic: insensitive to other jobs' CPU use", ""))  # fmt: skip
        rows.append(("2 tokens in-memory reference", fmt_rate(r["in_memory_items_per_s"]), "", ""))
    r = results.get("cold")
    if r:
        for name in ("busy_wait_1ms", "numpy_1ms"):
            c = r[name]
            rp = c["ratio_per_repeat"]
            rows.append((f"3 cold {name}: uncached", f"{c['uncached_seconds']['median']:.3f} s "
                         f"±{c['uncached_seconds']['spread'] * 50:.1f}%",
                         f"transform {c['transform_ms_per_item']:.2f} ms/item", ""))  # fmt: skip
            rows.append((f"3 cold {name}: cachedata", f"{c['cachedata_seconds']['median']:.3f} s "
                         f"±{c['cachedata_seconds']['spread'] * 50:.1f}%",
                         f"+{c['overhead_us_per_item']:.0f} us/item (epoch-only ratio "
                         f"{c['epoch_only_ratio']:.3f}, CPU-time ratio {c['cpu_ratio']:.3f})", ""))  # fmt: skip
            rows.append((f"3 cold {name}: ratio", f"{c['ratio']:.3f} [{rp['min']:.3f}..{rp['max']:.3f}]",
                         f"{r['target']} (ratio of medians {c['ratio_of_medians']:.3f})",
                         "PASS" if c["pass"] else "FAIL"))  # fmt: skip
        z = r["zero_cost"]
        rows.append(("3 cold zero-cost transform", f"+{z['overhead_us_per_item']:.0f} us/item",
                     f"cachedata's own miss cost ({z['cachedata_seconds']['median'] / r['items'] * 1e6:.0f} vs "
                     f"{z['uncached_seconds']['median'] / r['items'] * 1e6:.0f} us/item)", ""))  # fmt: skip
    r = results.get("index")
    if r:
        n = r["items"]
        rows.append((f"4 index open {n:,} items", f"{r['open_seconds']['median'] * 1e3:.0f} ms "
                     f"±{r['open_seconds']['spread'] * 50:.1f}%",
                     f"< {r['open_bound_seconds'] * 1e3:.0f} ms", "PASS" if r["open_pass"] else "FAIL"))  # fmt: skip
        peak = r["peak_rss_increase_bytes"]
        trim = r["rss_increase_after_malloc_trim_bytes"]
        note = f"< {r['rss_bound_bytes'] / 1e6:.0f} MB"
        if peak:
            note += f"; peak +{peak['median'] / 1e6:.0f} MB"
        if trim:
            note += f"; after malloc_trim +{trim['median'] / 1e6:.0f} MB"
        rows.append((f"4 index RSS {n:,} items", f"{r['rss_increase_bytes']['median'] / 1e6:.1f} MB "
                     f"({r['rss_bytes_per_item']:.0f} B/item)", note,
                     "PASS" if r["rss_pass"] else "FAIL"))  # fmt: skip
        b = r["build"]
        rows.append(("4 index build (__getitems__+merge)", f"{b['items_per_s']:>10,.0f}/s",
                     f"{b['getitems_seconds']:.1f} s compute+write, {b['merge_seconds']:.1f} s merge", ""))  # fmt: skip
    r = results.get("fingerprint")
    if r:
        rows.append((f"5 fingerprint of a {r['model_bytes'] / 1e6:.0f} MB model", f"{r['seconds']['median'] * 1e3:.0f} ms",
                     f"{r['gb_per_s']:.1f} GB/s; {r['target']}", "PASS" if r["pass"] else "FAIL"))  # fmt: skip
    r = results.get("cli")
    if r:
        for name, sec in r["seconds"].items():
            last = name == "cachedata info"
            cpu = r["cpu_seconds"][name]["median"] * 1e3
            rows.append((f"6 start-up: {name}", f"{sec['median'] * 1e3:.0f} ms ±{sec['spread'] * 50:.1f}%",
                         f"CPU {cpu:.0f} ms" + (f"; {r['namespaces']} namespaces; {r['target']}" if last else ""),
                         ("PASS" if r["pass"] else "FAIL") if last else ""))  # fmt: skip
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    print(f"{'measure':<{w[0]}}  {'value':<{w[1]}}  {'note / target':<{w[2]}}  result")
    print("-" * (sum(w) + 12))
    for row in rows:
        print(f"{row[0]:<{w[0]}}  {row[1]:<{w[1]}}  {row[2]:<{w[2]}}  {row[3]}")
    print("(± is half the max-min spread of the repeats, relative to the median; [a..b] the per-repeat")
    print(" ratios of interleaved pairs, whose median is the ratio judged)")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--_probe-open":
        # Subprocess side of case 4: construction to first item, RSS increase; prints JSON.
        print(json.dumps(open_probe(sys.argv[2], int(sys.argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller datasets and 3 repeats (smoke run)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per case (>= 3; default 5, quick 3)"
    )
    parser.add_argument("--cases", default="1,2,3,4,5,6", help="comma-separated subset of 1,2,3,4,5,6")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the run (default 1: collate's parallel copy is erratic on a "
        "busy 2-core machine; 0 leaves torch's default)",
    )
    parser.add_argument(
        "--tmp", default=None, help="folder for temporary files (default: the system's, /tmp)"
    )
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "core.json"),
        help="where the JSON results go (default benchmarks/results/core.json)",
    )
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    if repeats < 3:
        parser.error("--repeats must be >= 3 (the median of at least 3 is reported)")
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    sizes = {
        "images": 300 if args.quick else 1500,
        "tokens": 20_000 if args.quick else 100_000,
        "cold": 500 if args.quick else 2000,
        "index": 200_000 if args.quick else 1_000_000,
        "fingerprint": 100,  # MB of weights
        "cli": 10,  # namespaces
    }
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    plan = [
        ("1", "images", case_images, repeats),
        ("2", "tokens", case_tokens, repeats),
        ("3", "cold", case_cold, repeats),
        ("4", "index", case_index, 3),
        ("5", "fingerprint", case_fingerprint, repeats),
        ("6", "cli", case_cli, max(repeats, 5)),
    ]
    for num, name, fn, reps in plan:
        if num not in cases and name not in cases:
            continue
        t0 = time.perf_counter()
        print(f"[{num}] {name}: {sizes[name]:,} items, {reps} repeats ...", flush=True)
        load0 = os.getloadavg()[0]
        results[name] = fn(sizes[name], reps, args.tmp)
        results[name]["case_seconds"] = time.perf_counter() - t0
        results[name]["load_average_1min"] = [load0, os.getloadavg()[0]]
        print(
            f"    done in {results[name]['case_seconds']:.1f} s "
            f"(1-min load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
            flush=True,
        )
    print_table(results)
    all_pass = all(r["pass"] for r in results.values())
    report = {
        "benchmark": "bench_core",
        "quick": args.quick,
        "repeats": repeats,
        "sizes": sizes,
        "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_seconds": time.perf_counter() - t_start,
        "results": results,
        "all_pass": all_pass,
    }
    out = write_json(args.out, report)
    print(f"\n{'ALL PASS' if all_pass else 'SOME FAIL'}; total {report['total_seconds']:.0f} s; wrote {out}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
