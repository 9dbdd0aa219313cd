"""Collate throughput of CachedCollate against torch's own collate and padding, in one run.

Cases (each in the main process and "in a worker", see below):

- images:       64 x float32[3, 224, 224] tensors                      vs default_collate
- small dicts:  256 x {"features": float32[32], "ids": int64[16], "label": int, "weight": float,
                "id": str}: a typical CachedDataset item (a few small tensors, an int label, a
                float and a str)                                      vs default_collate
- small dicts, 1 tensor: 256 x {"x": float32[16], "label": int, "weight": float, "id": str}
                                                                      vs default_collate
- tokens:       256 int64 sequences, lengths 32..512                  vs torch.nn.utils.rnn.pad_sequence
- A/A noise:    the baseline against itself (images; small dicts), to show how far from 1.00
                timing noise alone moves a ratio.

How a case is judged: CachedCollate and its baseline are timed in alternation (A B, B A, ...),
each timing a block of calls lasting >= 5 ms, so a burst of load from other processes hits both
sides of a pair. The speedup is the median over pairs of baseline time / CachedCollate time.
A case below 1.3x is measured again (up to ``ROUNDS`` rounds in all) before it counts: the
speedup reported is the median of all its pairs, and ``rounds`` lists each round's median.
PASS ("at least as fast", the requirement) needs every round's median >= 1 - NOISE
(NOISE = 3%: what separates two identical operations, see the A/A rows); FAIL when the pooled
median is below that; NOISY when the rounds disagree. ``p10..p90`` is the spread of the pair
ratios; ``clear`` marks a speedup >= 1.15 in every round (a margin noise cannot flip).

"In a worker": get_worker_info() is made non-None, so CachedCollate and default_collate allocate
in shared memory as they do in a DataLoader worker, and whatever a collate left outside shared
memory is moved there afterwards (what the worker's result queue does with it), so both sides
hand over the same thing. DataLoader workers run torch with 1 thread: so do these cases.

With CUDA, DeviceLoader is measured too: its effective host-to-device throughput against a plain
loop of pinned ``.to(device, non_blocking=True)`` (PASS at >= 80%), and the overlap of its copies
with a compute loop: the same batches copied then computed on one stream (serial) against
computed while DeviceLoader copies the next ones (PASS when at least half of the shorter phase is
hidden). Without CUDA that part is skipped.

Usage: python benchmarks/bench_collate.py [--quick] [--repeats N] [--threads N] [--out PATH]
Writes the results as JSON to benchmarks/results/collate.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import default_collate
from torch.utils.data._utils import worker as _worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cachedata.collate import CachedCollate
from cachedata.device import DeviceLoader

#: A speedup within this of 1.0 counts as "as fast" (two identical code paths measure 0.97..1.03).
NOISE = 0.03
#: A speedup below this is measured again before it counts.
REMEASURE_BELOW = 1.3
#: Rounds at most for a case below REMEASURE_BELOW (the first one included).
ROUNDS = 3
#: A speedup at least this large in every round is marked "clear".
CLEAR_MARGIN = 1.15
#: Side of the square matmuls of the DeviceLoader overlap test's compute loop.
GEMM_SIZE = 2048


@contextlib.contextmanager
def as_worker() -> Iterator[None]:
    """Make get_worker_info() non-None, so both collates take their DataLoader-worker path."""
    saved = _worker._worker_info
    _worker._worker_info = object()  # only its being non-None matters to both collates
    try:
        yield
    finally:
        _worker._worker_info = saved


def share_all(obj: Any) -> Any:
    """Move every tensor not yet in shared memory there, as the worker's result queue does.

    In a worker this is part of handing a batch over: a collate that already wrote into
    shared memory skips it, one that did not (pad_sequence, default_collate's numbers) pays it.
    """
    if isinstance(obj, torch.Tensor):
        if not obj.is_shared():
            obj.share_memory_()
    elif isinstance(obj, dict):
        for value in obj.values():
            share_all(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            share_all(value)
    return obj


def time_pair(
    ours: Callable[[], Any], base: Callable[[], Any], *, repeats: int, min_seconds: float
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``ours`` and ``base``, one value per repeat for each, timed in pairs.

    The two are timed in alternation, each repeat a back-to-back pair (the order alternating, so
    neither always runs on a warmer cache), so a burst of load from other processes hits both
    sides of a pair.
    """
    ours()
    base()  # warm up allocators and caches
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < min_seconds / 4 or calls < 2:
        base()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    inner = max(1, round(min_seconds / max(per_call, 1e-9)))
    t_ours: list[float] = []
    t_base: list[float] = []
    for r in range(repeats):
        order = ((ours, t_ours), (base, t_base)) if r % 2 == 0 else ((base, t_base), (ours, t_ours))
        for fn, acc in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            acc.append((time.perf_counter() - t0) / inner)
    return t_ours, t_base


def judge(
    ours: Callable[[], Any], base: Callable[[], Any], *, repeats: int, min_seconds: float, remeasure: bool
) -> dict[str, Any]:
    """Time ``ours`` against ``base``; a speedup under REMEASURE_BELOW is measured again.

    Returns the medians of all timings, the speedup (median of every pair's base / ours), each
    round's median, the p10..p90 spread of the pair ratios and the verdict.
    """
    t_ours: list[float] = []
    t_base: list[float] = []
    ratios: list[float] = []
    rounds: list[float] = []
    for _ in range(ROUNDS if remeasure else 1):
        o, b = time_pair(ours, base, repeats=repeats, min_seconds=min_seconds)
        pair_ratios = [tb / to for to, tb in zip(o, b, strict=True)]
        t_ours += o
        t_base += b
        ratios += pair_ratios
        rounds.append(statistics.median(pair_ratios))
        if statistics.median(ratios) >= REMEASURE_BELOW:
            break
    speedup = statistics.median(ratios)
    deciles = statistics.quantiles(ratios, n=10)
    if min(rounds) >= 1.0 - NOISE:
        verdict = "PASS"
    elif speedup < 1.0 - NOISE:
        verdict = "FAIL"
    else:
        verdict = "NOISY"
    return {
        "cachedcollate_ms": statistics.median(t_ours) * 1e3,
        "baseline_ms": statistics.median(t_base) * 1e3,
        "speedup": speedup,
        "rounds": rounds,
        "ratio_p10": deciles[0],
        "ratio_p90": deciles[-1],
        "pairs": len(ratios),
        "verdict": verdict,
        "clear": min(rounds) >= CLEAR_MARGIN,
    }


def make_cases(seed: int = 0) -> list[tuple[str, str, Callable[[], Any], Callable[[], Any]]]:
    """(name, baseline name, CachedCollate call, baseline call) per case; checks both agree first."""
    gen = torch.Generator().manual_seed(seed)
    collate = CachedCollate()
    images = [torch.rand(3, 224, 224, generator=gen) for _ in range(64)]
    # A typical CachedDataset item: a few small tensors, an int label, a float and a str.
    dicts = [
        {
            "features": torch.rand(32, generator=gen),
            "ids": torch.randint(0, 50_000, (16,), generator=gen),
            "label": i % 10,
            "weight": 0.5 + i / 512,
            "id": f"s{i}",
        }
        for i in range(256)
    ]
    # The same with one tensor (the case earlier runs measured, kept for comparison).
    dicts1 = [
        {"x": torch.rand(16, generator=gen), "label": i % 10, "weight": 0.5, "id": f"s{i}"}
        for i in range(256)
    ]
    lengths = torch.randint(32, 513, (256,), generator=gen).tolist()
    tokens = [torch.randint(0, 50_000, (n,), generator=gen) for n in lengths]

    def check(a: Any, b: Any) -> None:
        same = type(a) is type(b)
        if same and isinstance(a, dict):
            same = list(a) == list(b)
            for k in b:
                check(a[k], b[k])
        elif same and isinstance(a, torch.Tensor):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        elif same:
            same = a == b
        if not same:
            raise SystemExit("benchmark sanity check failed: CachedCollate and the baseline disagree")

    for context in (contextlib.nullcontext(), as_worker()):
        with context:
            check(collate(images), default_collate(images))
            check(collate(dicts), default_collate(dicts))
            check(collate(dicts1), default_collate(dicts1))
            check(collate(tokens), pad_sequence(tokens, batch_first=True))
    return [
        (
            "images 64x3x224x224 f32",
            "default_collate",
            lambda: collate(images),
            lambda: default_collate(images),
        ),
        ("small dicts x256", "default_collate", lambda: collate(dicts), lambda: default_collate(dicts)),
        (
            "small dicts x256, 1 tensor",
            "default_collate",
            lambda: collate(dicts1),
            lambda: default_collate(dicts1),
        ),
        (
            "tokens 256 x int64[32..512]",
            "pad_sequence",
            lambda: collate(tokens),
            lambda: pad_sequence(tokens, batch_first=True),
        ),
        # A/A: the baseline against itself shows how far from 1.00 timing noise alone moves a ratio.
        (
            "A/A noise: images",
            "default_collate",
            lambda: default_collate(images),
            lambda: default_collate(images),
        ),
        (
            "A/A noise: small dicts",
            "default_collate",
            lambda: default_collate(dicts),
            lambda: default_collate(dicts),
        ),
    ]


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def bench_collate(repeats: int, min_seconds: float, main_threads: int) -> list[dict[str, Any]]:
    rows = []
    for where in ("main process", "worker (shared memory)"):
        in_worker = where.startswith("worker")
        # DataLoader workers run torch with 1 thread (the worker loop sets it): so does this.
        threads = 1 if in_worker else main_threads
        for name, base_name, ours, base in make_cases():
            if in_worker:
                ours = (lambda f: lambda: share_all(f()))(ours)
                base = (lambda f: lambda: share_all(f()))(base)
            is_aa = name.startswith("A/A")
            load_before = os.getloadavg()[0]
            with as_worker() if in_worker else contextlib.nullcontext(), num_threads(threads):
                result = judge(ours, base, repeats=repeats, min_seconds=min_seconds, remeasure=not is_aa)
            row = {"case": name, "where": where, "threads": threads, "baseline": base_name, **result}
            row["load_average_1min"] = [load_before, os.getloadavg()[0]]
            if is_aa:
                row["verdict"] = "-"
                row["clear"] = None
            row["pass"] = None if is_aa else row["verdict"] == "PASS"
            rows.append(row)
    return rows


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (the order rotating every repeat)."""
    names = list(fns)
    for name in names:
        fns[name]()  # warm up: allocator, streams, kernels
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_device(repeats: int, quick: bool, device: torch.device | None = None) -> dict[str, Any]:
    """DeviceLoader against plain pinned copies: H2D throughput, and overlap with a compute loop.

    ``device``: the CUDA device (default: the current one). A CPU device runs the same code as a
    dry run of the benchmark itself (DeviceLoader passes batches through; the numbers mean nothing).
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_cuda = device.type == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    n_batches = 8 if quick else 32
    batches = [torch.rand(64, 3, 224, 224) for _ in range(n_batches)]  # 38.5 MB each
    pinned = [t.pin_memory() for t in batches] if on_cuda else batches
    pageable = [t.clone() for t in batches[: max(2, n_batches // 4)]]  # clone(): not pinned
    del batches
    nbytes = sum(t.numel() * t.element_size() for t in pinned)

    # -- throughput: nothing but copies ------------------------------------------------------
    def plain() -> None:
        for t in pinned:
            t.to(device, non_blocking=True)
        sync()

    def through_loader(prefetch: int) -> Callable[[], None]:
        def run() -> None:
            for _ in DeviceLoader(pinned, device, prefetch=prefetch):
                pass
            sync()

        return run

    times = interleaved_medians(
        {"plain": plain, "prefetch1": through_loader(1), "prefetch2": through_loader(2)}, repeats
    )
    t_plain = times["plain"]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if on_cuda else f"{device} (dry run)",
        "batches": n_batches,
        "batch_mb": nbytes / n_batches / 1e6,
        "plain_gbps": nbytes / t_plain / 1e9,
    }
    for prefetch in (1, 2):
        t = times[f"prefetch{prefetch}"]
        result[f"prefetch{prefetch}_gbps"] = nbytes / t / 1e9
        result[f"prefetch{prefetch}_ratio"] = t_plain / t
        result[f"prefetch{prefetch}_pass"] = t_plain / t >= 0.8

    def run_pageable() -> None:  # informational: pageable input, which DeviceLoader pins on the way
        for _ in DeviceLoader(pageable, device):
            pass
        sync()

    page_bytes = sum(t.numel() * t.element_size() for t in pageable)
    result["pageable_input_gbps"] = page_bytes / interleaved_medians({"p": run_pageable}, repeats)["p"] / 1e9

    # -- overlap: copies of the next batches while the consumer computes on the current one ----
    # The compute reads its whole batch (so it must wait for that batch's copy), then runs
    # `gemms` GEMM_SIZE^2 matmuls, calibrated so one batch's compute lasts about one batch's copy:
    # the case where overlap matters most (perfect overlap halves the serial time).
    weight = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
    scratch = torch.empty(GEMM_SIZE, GEMM_SIZE, device=device)
    gemms = 1

    def compute(batch: torch.Tensor) -> None:
        batch.sum()
        for _ in range(gemms):
            torch.mm(weight, weight, out=scratch)

    probe = 20
    compute(pinned[0].to(device))
    sync()
    t0 = time.perf_counter()
    for _ in range(probe):
        torch.mm(weight, weight, out=scratch)
    sync()
    gemm_seconds = (time.perf_counter() - t0) / probe
    gemms = max(1, round((t_plain / n_batches) / gemm_seconds))
    resident = pinned[0].to(device)
    sync()

    def compute_only() -> None:  # the compute loop on a batch already on the device: no copies
        for _ in range(n_batches):
            compute(resident)
        sync()

    def serial() -> None:  # copy then compute, one stream: each copy waits for the compute before it
        for t in pinned:
            compute(t.to(device, non_blocking=True))
        sync()

    def overlapped(prefetch: int) -> Callable[[], None]:
        def run() -> None:
            for batch in DeviceLoader(pinned, device, prefetch=prefetch):
                compute(batch)
            sync()

        return run

    times = interleaved_medians(
        {
            "copy": plain,
            "compute": compute_only,
            "serial": serial,
            "overlap1": overlapped(1),
            "overlap2": overlapped(2),
        },
        repeats,
    )
    shorter = min(times["copy"], times["compute"])
    result["overlap"] = {
        "gemms_per_batch": gemms,
        "copy_ms": times["copy"] * 1e3,
        "compute_ms": times["compute"] * 1e3,
        "serial_ms": times["serial"] * 1e3,
        # perfect overlap: the longer phase alone
        "ideal_ms": max(times["copy"], times["compute"]) * 1e3,
    }
    for prefetch in (1, 2):
        t = times[f"overlap{prefetch}"]
        # share of the shorter phase hidden behind the longer one (1.0 = perfect, 0 = serial)
        hidden = (times["serial"] - t) / shorter if shorter > 0 else 0.0
        result["overlap"][f"prefetch{prefetch}_ms"] = t * 1e3
        result["overlap"][f"prefetch{prefetch}_hidden"] = hidden
        result["overlap"][f"prefetch{prefetch}_pass"] = hidden >= 0.5
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter timings (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (>= 5)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "collate.json",
        help="where to write the JSON results",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the main-process cases (default 1: on a busy 2-core machine torch's "
        "2-thread copies are erratic for both sides; workers always use 1)",
    )
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (7 if args.quick else 41)
    if repeats < 5:
        parser.error(f"--repeats {repeats}: use at least 5 (the reported value is their median)")
    # short pairs, many of them: a pair is over before a burst of load from elsewhere changes
    min_seconds = 0.005

    rows = bench_collate(repeats, min_seconds, args.threads)
    print(f"CachedCollate vs baselines ({repeats} timed pairs a round, torch {torch.__version__})")
    print(
        f"speedup = median of baseline/ours over all pairs; below {REMEASURE_BELOW}x a case is measured "
        f"again (up to {ROUNDS} rounds).\nPASS = at least as fast in every round (>= {1 - NOISE:.2f}: "
        f"a {NOISE:.0%} band for timing noise); clear = >= {CLEAR_MARGIN}x in every round"
    )
    print(
        f"{'case':28s} {'where':22s} {'thr':>3s} {'baseline':15s} {'ours ms':>8s} {'base ms':>8s} "
        f"{'speedup':>7s} {'p10..p90':>11s}  {'rounds':18s} result"
    )
    for r in rows:
        rounds = " ".join(f"{x:.2f}" for x in r["rounds"])
        verdict = r["verdict"] + (" clear" if r["clear"] else "")
        print(
            f"{r['case']:28s} {r['where']:22s} {r['threads']:3d} {r['baseline']:15s} "
            f"{r['cachedcollate_ms']:8.3f} {r['baseline_ms']:8.3f} {r['speedup']:6.2f}x "
            f"{r['ratio_p10']:5.2f}..{r['ratio_p90']:<5.2f}  {rounds:18s} {verdict}"
        )
    device: dict[str, Any] | None = None
    if torch.cuda.is_available():
        device = bench_device(repeats, args.quick)
        print(
            f"\nDeviceLoader H2D on {device['device']} ({device['batches']} batches of "
            f"{device['batch_mb']:.1f} MB): plain pinned loop {device['plain_gbps']:.2f} GB/s"
        )
        for p in (1, 2):
            print(
                f"  prefetch={p}: {device[f'prefetch{p}_gbps']:.2f} GB/s = {device[f'prefetch{p}_ratio']:.0%} "
                f"of plain (target >= 80%)  {'PASS' if device[f'prefetch{p}_pass'] else 'FAIL'}"
            )
        print(f"  pageable input (pinned by DeviceLoader): {device['pageable_input_gbps']:.2f} GB/s")
        o = device["overlap"]
        print(
            f"Overlap with a compute loop ({o['gemms_per_batch']} GEMMs {GEMM_SIZE}^2 a batch): copies alone "
            f"{o['copy_ms']:.1f} ms, compute alone {o['compute_ms']:.1f} ms, serial (one stream) "
            f"{o['serial_ms']:.1f} ms, ideal {o['ideal_ms']:.1f} ms"
        )
        for p in (1, 2):
            print(
                f"  DeviceLoader prefetch={p}: {o[f'prefetch{p}_ms']:.1f} ms, "
                f"{o[f'prefetch{p}_hidden']:.0%} of the shorter phase hidden (target >= 50%)  "
                f"{'PASS' if o[f'prefetch{p}_pass'] else 'FAIL'}"
            )
    else:
        print("\nDeviceLoader H2D and overlap: skipped (no CUDA)")

    results = {
        "benchmark": "collate",
        "quick": args.quick,
        "repeats": repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "collate": rows,
        "device_loader": device if device is not None else "skipped: no CUDA",
        "remeasure_below": REMEASURE_BELOW,
        "max_rounds": ROUNDS,
        "noise_band": NOISE,
        "all_pass": all(r["pass"] for r in rows if r["pass"] is not None)
        and (
            device is None
            or all(device[f"prefetch{p}_pass"] and device["overlap"][f"prefetch{p}_pass"] for p in (1, 2))
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
