"""Train a small model with DistributedDataParallel over a CachedDataset (CPU, gloo).

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py [--items 512] [--cache-dir DIR]

Every rank wraps the same dataset in CachedDataset with the same cache folder on a shared
filesystem. Epoch 1 (cold) computes each item once across all ranks and their DataLoader
workers; epoch 2 (warm) reads everything back; rank 0 merges the shards at the end
(``merge()`` is collective: every rank calls it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cachedata import CachedDataset


class Signals(Dataset):
    """Deterministic raw signals (stand-ins for decoded audio or images)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        return {"signal": rng.standard_normal(4096).astype(np.float32), "label": i % 4}


class SpectralFeatures:
    """An expensive deterministic transform: a stack of short-time spectra (cached)."""

    def __init__(self, frame: int = 256, repeats: int = 20) -> None:
        self.frame = frame
        self.repeats = repeats  # make the cost visible on the CPU

    def __call__(self, item):
        x = torch.from_numpy(item["signal"])
        for _ in range(self.repeats):
            spec = torch.stft(x, self.frame, window=torch.hann_window(self.frame), return_complex=True).abs()
        return {"features": spec.log1p().mean(-1), "label": item["label"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "cachedata-ddp-example")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    dist.init_process_group("gloo")  # torchrun provides RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ds = CachedDataset(Signals(args.items), args.cache_dir, transform=SpectralFeatures())
    if rank == 0:
        ds.clear()  # start cold so the example shows both epochs
    dist.barrier()
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True)
    loader = DataLoader(ds, batch_size=32, sampler=sampler, num_workers=args.workers, persistent_workers=True)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(129, 64), nn.ReLU(), nn.Linear(64, 4))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    for epoch, name in enumerate(("cold epoch", "warm epoch")):
        sampler.set_epoch(epoch)
        before = ds.stats
        start = time.perf_counter()
        total_loss = 0.0
        for batch in loader:
            loss = nn.functional.cross_entropy(model(batch["features"]), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += loss.item()
        elapsed = time.perf_counter() - start
        after = ds.stats
        counts = torch.tensor([after.hits - before.hits, after.misses - before.misses], dtype=torch.float64)
        dist.all_reduce(counts)  # every rank's (and its workers') hits and misses
        if rank == 0:
            hits, misses = counts.tolist()
            print(
                f"{name}: {elapsed:.2f} s, loss {total_loss:.3f}, hits {hits:.0f}, misses {misses:.0f}, "
                f"hit rate {hits / max(1.0, hits + misses):.0%}",
                flush=True,
            )
    ds.merge()  # collective: rank 0 merges, everybody waits and then reads the merged file
    if rank == 0:
        print(f"cache: {ds.path} ({sorted(p.name for p in ds.path.glob('*.h5'))})", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
