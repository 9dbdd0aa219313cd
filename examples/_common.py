"""What the examples share: class-per-folder file lists, the training epoch, the cold-then-warm loop."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm


def add_training_args(ap: argparse.ArgumentParser, *, epochs: int, batch_size: int) -> None:
    """The options every training example has: --epochs, --workers, --batch-size, --cache-dir."""
    ap.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"samples per batch (default {batch_size})"
    )
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one)")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}


class ClassFolder(Dataset):
    """{"path", "label"} per file of a class-per-subfolder tree (torchvision's ImageFolder layout).

    Only the file list lives here; decoding is left to the cached transform.
    """

    def __init__(self, root: Path, suffixes: Collection[str]) -> None:
        self.classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        self.samples = [
            (str(f), label)
            for label, name in enumerate(self.classes)
            for f in sorted((Path(root) / name).iterdir())
            if f.suffix.lower() in suffixes
        ]
        if not self.samples:
            raise SystemExit(f"no {'/'.join(sorted(suffixes))} files in class subfolders of {root}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        return {"path": path, "label": label}


#: ``forward(batch) -> (logits, labels)``: the one part of an epoch that differs per example.
Forward = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def train_epoch(
    ds: Any, loader: Any, opt: Any, forward: Forward, name: str, *, progress: bool = False
) -> tuple[float, float]:
    """One epoch of cross-entropy training; prints and returns (seconds, hit rate of this epoch).

    The time spent waiting for the next batch is printed too: it is what the cache shortens.
    """
    before = ds.stats
    start = time.perf_counter()
    total, correct, loss_sum, waited = 0, 0, 0.0, 0.0
    batches = iter(tqdm(loader, desc=name, unit="batch", leave=False) if progress else loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - t0
        logits, labels = forward(batch)
        loss = nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    elapsed = time.perf_counter() - start
    after = ds.stats
    hits, misses = after.hits - before.hits, after.misses - before.misses
    rate = hits / max(1, hits + misses)
    print(
        f"{name}: {elapsed:.2f} s (waiting for data {waited:.2f} s), hits {hits}, misses {misses}, "
        f"hit rate {rate:.0%}, loss {loss_sum / max(1, total):.3f}, accuracy {correct / max(1, total):.0%}",
        flush=True,
    )
    return elapsed, rate


def run_epochs(
    ds: Any, loader: Any, opt: Any, epochs: int, forward: Forward, *, progress: bool = False
) -> tuple[list[float], list[float]]:
    """Train ``epochs`` epochs (the first one cold), print cold vs warm time and hit rate.

    Returns, per epoch, its time in seconds and its hit rate (0..1). ``progress`` shows a
    tqdm bar per epoch.
    """
    times, rates = [], []
    for epoch in range(epochs):
        name = f"epoch {epoch + 1} ({'cold' if epoch == 0 else 'warm'})"
        elapsed, rate = train_epoch(ds, loader, opt, forward, name, progress=progress)
        times.append(elapsed)
        rates.append(rate)
    if len(times) > 1:
        print(
            f"cold epoch {times[0]:.2f} s, warm epoch {times[1]:.2f} s "
            f"({times[0] / times[1]:.1f}x); warm hit rate {rates[1]:.0%}; "
            f"transform time {ds.stats.compute_seconds:.2f} s",
            flush=True,
        )
    return times, rates
