"""Cold-epoch cost of frozen-network features: Features.batch (stacked) vs one item at a time.

resnet18 (torchvision, weights=None, seed 0, eval, frozen) features of float32 [3, 224, 224]
inputs, read through ``DataLoader(CachedDataset(ds, tmp, transform=...), batch_size=64)``
(num_workers=0) into an empty cache:

- **per item**: ``OneByOne(Features(model))``, a wrapper without ``batch``, so CachedDataset
  calls the model once per miss (batch dimension 1);
- **batched**: ``Features(model)``: CachedDataset hands all misses of one ``__getitems__``
  (64 items) to ``Features.batch``, one stacked forward pass (the target: >= 3x per item);
- **batched, 16/forward**: ``Features(model, max_batch_size=16)``: the same misses in stacks
  of 16 (reported, no target: on small CPUs a stack of 64 spills out of the caches).

Every repeat builds a fresh cache per variant; the variants run interleaved (A B C, C B A,
...) so background load hits all. Times are medians of the repeats, a speedup is the median
of the paired ratios per-item time / batched time; PASS when the batched one is >= 3. The
warm epoch (all hits, read back from the shard) after each batched cold epoch is reported
too, and the cached features of the variants are compared.

torch's intra-op thread count matters a great deal: a batch of one cannot keep many threads
busy and pays a thread synchronization per layer, which on a busy machine costs a scheduler
time slice each; a stack amortizes both. So the speedup grows with the thread count and with
the load from other processes; with one thread it is about the cache behaviour alone. The
thread count, CPU count and load average are reported with the results.

Usage: python benchmarks/bench_features.py [--quick | --tiny] [--items N] [--repeats N] [--threads N]
Writes the results as JSON to benchmarks/results/features.json (``--quick`` / ``--tiny``:
features-quick.json / features-tiny.json). Exit status 1 when the target fails, 2 when a sanity
check fails (the variants disagree, or the warm epoch recomputed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from cachedata import CachedDataset, fingerprint
from cachedata.transforms import Features

TARGET = 3.0
BATCH_SIZE = 64
SHAPE = (3, 224, 224)


class Inputs:
    """``n`` deterministic float32 [3, 224, 224] inputs (one tensor, generated once)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.data = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class OneByOne:
    """Features without ``batch``: CachedDataset calls it once per missing item."""

    def __init__(self, features: Features) -> None:
        self.features = features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def __cachedata_fingerprint__(self) -> str:
        return "one-by-one " + fingerprint(self.features)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def epoch(dataset: CachedDataset) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one pass through a DataLoader(batch_size=64) plus sealing what it wrote.

    The flush writes the items still buffered in memory to a shard (part of a cold epoch's
    cost), so that the warm epoch reads them from the file, not from the buffer.
    """
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, collate_fn=list)
    items: list[torch.Tensor] = []
    t0 = time.perf_counter()
    _common.epoch(loader, into=items)
    dataset.flush()
    return time.perf_counter() - t0, items


def broken(message: str) -> NoReturn:
    """A sanity check failed: the numbers would be meaningless (exit status 2, not a FAIL)."""
    print(f"benchmark sanity check failed: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="64 items (one batch): a ~1 minute smoke run")
    size.add_argument("--tiny", action="store_true", help="2 items, 1 repeat: seconds (what the tests run)")
    parser.add_argument(
        "--items", type=int, default=None, help="items per epoch (default 128, --quick 64, --tiny 2)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="cold epochs per variant (median; >= 1; default 3, --tiny 1)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default 0: keep torch's default)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the JSON results (default benchmarks/results/features[-quick|-tiny].json)",
    )
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    items = args.items if args.items is not None else {"full": 128, "quick": 64, "tiny": 2}[mode]
    repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 3)
    if items < 1 or repeats < 1:
        parser.error("--items and --repeats must be >= 1")
    out = args.out or Path(__file__).resolve().parent / "results" / (
        "features.json" if mode == "full" else f"features-{mode}.json"
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).requires_grad_(False).eval()
    data = Inputs(items)
    variants = {
        "per_item": ("per item (no batch: 1 forward/item)", OneByOne(Features(model))),
        "batched": ("batched (Features.batch, 64/forward)", Features(model)),
        "batched16": ("batched, max_batch_size=16", Features(model, max_batch_size=16)),
    }
    with torch.inference_mode():  # first-call costs (allocator, oneDNN primitives) out of the timings
        for n in (1, 16, BATCH_SIZE):
            model(data.data[: min(n, items)])

    times: dict[str, list[float]] = {name: [] for name in variants}
    warm: list[float] = []
    outputs: dict[str, list[torch.Tensor]] = {}
    load = [load_average()]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cachedata-bench-features-") as tmp:
        for r in range(repeats):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                ds = CachedDataset(data, Path(tmp) / f"{name}-{r}", transform=variants[name][1])
                seconds, got = epoch(ds)
                if ds.stats.misses != items:
                    broken(f"{ds.stats.misses} misses, not {items}")
                times[name].append(seconds)
                outputs[name] = got
                if name == "batched":
                    warm_seconds, again = epoch(ds)
                    if ds.stats.hits != items or not all(torch.equal(a, b) for a, b in zip(got, again)):
                        broken("the warm epoch differs")
                    warm.append(warm_seconds)
                ds.clear()
    load.append(load_average())
    total = time.perf_counter() - t_start
    scale = max(a.abs().max().item() for a in outputs["per_item"])
    max_diff = 0.0
    for name in ("batched", "batched16"):
        diff = max((a - b).abs().max().item() for a, b in zip(outputs["per_item"], outputs[name]))
        if diff > 1e-3 * max(scale, 1.0):
            broken(f"{name} and per-item features differ by {diff}")
        max_diff = max(max_diff, diff)

    ratios = {
        name: [p / b for p, b in zip(times["per_item"], times[name])] for name in ("batched", "batched16")
    }
    speedups = {name: statistics.median(v) for name, v in ratios.items()}
    ok = speedups["batched"] >= TARGET
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"Features cold epoch: resnet18 on {items} x float32{list(SHAPE)}, DataLoader(batch_size={BATCH_SIZE}), "
        f"CPU, torch {torch.__version__}, {threads} torch thread(s), {os.cpu_count()} CPUs, "
        f"load average {load[0]} -> {load[1]}"
    )
    print(f"medians of {repeats} interleaved repeats; PASS = batched at least {TARGET:.0f}x faster")
    print(f"{'variant':38s} {'epoch s':>8s} {'ms/item':>8s} {'items/s':>8s} {'spread':>7s} {'speedup':>8s}")
    rows = [(label, times[name], name) for name, (label, _) in variants.items()]
    rows.append(("warm epoch (cache hits)", warm, None))
    for label, values, name in rows:
        m = statistics.median(values)
        sp = f"{speedups[name]:7.2f}x" if name in speedups else f"{'':8s}"
        half_spread = _common.summary(values)["spread"] / 2
        print(f"{label:38s} {m:8.2f} {m / items * 1e3:8.1f} {items / m:8.1f} {half_spread:6.0%} {sp}")
    pr = ratios["batched"]
    print(
        f"batched vs per item: {speedups['batched']:.2f}x (paired ratios {min(pr):.2f}..{max(pr):.2f}), "
        f"target >= {TARGET:.0f}x  {'PASS' if ok else 'FAIL'}"
    )
    print(f"max |batched - per item| = {max_diff:.2e}; total {total:.0f} s")

    results: dict[str, Any] = {
        "benchmark": "features",
        "mode": mode,
        "quick": args.quick,
        "model": "torchvision resnet18(weights=None), seed 0, eval, frozen",
        "input_shape": list(SHAPE),
        "items": items,
        "batch_size": BATCH_SIZE,
        "repeats": repeats,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_before_after": load,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": times,
        "warm_seconds": warm,
        "ms_per_item": {k: v / items * 1e3 for k, v in med.items()},
        "warm_ms_per_item": statistics.median(warm) / items * 1e3,
        "paired_ratios": ratios,
        "speedup": speedups["batched"],
        "speedup_batched16": speedups["batched16"],
        "target": TARGET,
        "pass": ok,
        "max_abs_diff": max_diff,
        "total_seconds": total,
    }
    print(f"wrote {_common.write_json(out, results)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
