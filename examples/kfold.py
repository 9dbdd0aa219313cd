"""5-fold cross-validation over one cache: N transform calls in total, not 5N.

    python examples/kfold.py [--items 300] [--folds 5] [--epochs 2] [--workers 2]
        [--batch-size 32] [--cache-dir DIR]

Every fold wraps ``Subset(base, train_idx)`` and ``Subset(base, val_idx)`` in a
``CachedDataset`` with the same cache folder and transform. A Subset is unwrapped and keyed
by the base index, so an item computed in any fold (train or validation side) is a hit in
every later fold. The transform appends one line to a log file per call; at the end the
example prints the number of calls: N for N items (each item once), where recomputing per
fold would cost folds x N. (``--data`` is accepted for symmetry with the other examples:
a ``.npy`` file of shape [N, 2048] float32 signals; labels are ``i % 4``.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cachedata import CachedDataset

CLASSES = 4


class Signals(Dataset):
    """Deterministic raw signals: a class-dependent frequency plus noise (or rows of a .npy file)."""

    def __init__(self, n: int, length: int = 2048, data: np.ndarray | None = None) -> None:
        self.n = n if data is None else len(data)
        self.length = length
        self.data = data

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        label = i % CLASSES
        if self.data is not None:
            return {"signal": np.asarray(self.data[i], dtype=np.float32), "label": label}
        rng = np.random.default_rng(i)
        t = np.arange(self.length) / self.length
        freq = 20 * (label + 1) + rng.uniform(-3, 3)
        signal = np.sin(2 * np.pi * freq * t) + rng.normal(0, 0.5, self.length)
        return {"signal": signal.astype(np.float32), "label": label}


class CountingSpectrum:
    """Deterministic, cached: a log magnitude spectrum; logs one line per call to ``log_path``.

    The log is how the example proves that the transform ran N times across all folds. (It is
    a side effect, not an input: the output does not depend on the file.)
    """

    def __init__(self, log_path: str, bins: int = 128) -> None:
        self.log_path = log_path
        self.bins = bins

    def __call__(self, item):
        with open(self.log_path, "a") as log:  # one short append per call: safe across workers
            log.write(f"{os.getpid()}\n")
        spectrum = torch.fft.rfft(torch.from_numpy(item["signal"])).abs()[1 : self.bins + 1]
        return {"features": spectrum.log1p(), "label": item["label"]}


def count_calls(log_path: str) -> int:
    if not os.path.exists(log_path):
        return 0
    with open(log_path) as log:
        return sum(1 for _ in log)


def fold_indices(n: int, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, val_idx) per fold from one fixed shuffled split."""
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    return [(np.concatenate(parts[:k] + parts[k + 1 :]), parts[k]) for k in range(folds)]


def loader_for(ds, args, shuffle: bool) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=shuffle,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )


def run_fold(k: int, train_ds, val_ds, args) -> tuple[float, int, int, float]:
    """Train a fresh probe on one fold; returns (seconds, hits, misses, validation accuracy)."""
    torch.manual_seed(k)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = train_ds.stats.hits + val_ds.stats.hits, train_ds.stats.misses + val_ds.stats.misses
    start = time.perf_counter()
    train_loader, val_loader = loader_for(train_ds, args, True), loader_for(val_ds, args, False)
    for _ in range(args.epochs):
        for batch in train_loader:
            loss = nn.functional.cross_entropy(model(batch["features"]), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    correct = total = 0
    with torch.no_grad():
        for batch in val_loader:
            correct += (model(batch["features"]).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
    del train_loader, val_loader  # stop this fold's workers
    elapsed = time.perf_counter() - start
    hits = train_ds.stats.hits + val_ds.stats.hits - before[0]
    misses = train_ds.stats.misses + val_ds.stats.misses - before[1]
    return elapsed, hits, misses, correct / max(1, total)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="a .npy file [N, 2048] (default: generated)")
    ap.add_argument("--items", type=int, default=300, help="items to generate without --data (default 300)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2, help="training epochs per fold (default 2)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one)")
    args = ap.parse_args(argv)

    base = Signals(args.items, data=np.load(args.data) if args.data else None)
    n = len(base)
    with tempfile.TemporaryDirectory(prefix="cachedata-kfold-") as tmp:
        cache_dir = args.cache_dir or Path(tmp) / "cache"
        log_path = str(Path(tmp) / "transform-calls.log")  # fresh per run
        transform = CountingSpectrum(log_path)
        times, rates = [], []
        for k, (train_idx, val_idx) in enumerate(fold_indices(n, args.folds)):
            train_ds = CachedDataset(Subset(base, train_idx.tolist()), cache_dir, transform=transform)
            val_ds = CachedDataset(Subset(base, val_idx.tolist()), cache_dir, transform=transform)
            elapsed, hits, misses, acc = run_fold(k, train_ds, val_ds, args)
            rate = hits / max(1, hits + misses)
            times.append(elapsed)
            rates.append(rate)
            print(
                f"fold {k + 1}/{args.folds} ({'cold' if k == 0 else 'warm'}): {elapsed:.2f} s, "
                f"train {len(train_idx)} / val {len(val_idx)}, hits {hits}, misses {misses}, "
                f"hit rate {rate:.0%}, val accuracy {acc:.0%}, transform calls so far {count_calls(log_path)}",
                flush=True,
            )
        calls = count_calls(log_path)
        if len(times) > 1:
            warm_time = sum(times[1:]) / len(times[1:])
            warm_rate = min(rates[1:])
            print(
                f"cold fold {times[0]:.2f} s, warm fold {warm_time:.2f} s on average "
                f"({times[0] / warm_time:.1f}x); warm hit rate {warm_rate:.0%}",
                flush=True,
            )
        print(
            f"transform calls: {calls} for {n} items and {args.folds} folds "
            f"(without the cache: {args.folds * n}, one per item per fold)",
            flush=True,
        )
        train_ds.flush()
        train_ds.merge()  # one consolidated file for the next run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
