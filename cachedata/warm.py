"""CachedDataset.warm(): fill a cache ahead of training with parallel DataLoader workers."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .progress import progress_bar

if TYPE_CHECKING:
    from .dataset import CachedDataset


class _Filler(Dataset):
    """Computes and stores items without decoding them for anyone: returns a count."""

    def __init__(self, ds: CachedDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return self.ds._addresses.length

    def __getitem__(self, index: int) -> int:
        return len(self.__getitems__([index]))

    def __getitems__(self, indices: list[int]) -> list[int]:
        self.ds._get(indices, single=False, post=False)
        return [1] * len(indices)


def _count(batch: list[int]) -> int:
    return len(batch)


def missing_positions(ds: CachedDataset) -> np.ndarray:
    """Positions ``i`` (in ``0..len(ds)-1``) whose item is not cached yet."""
    store = ds._store
    store.refresh()
    keys = ds._addresses.position_keys()
    positions = np.arange(len(keys), dtype=np.int64)
    have = store.contains(keys)
    # One position per key: folds of a Subset may repeat a base index.
    _, first = np.unique(keys[~have], return_index=True)
    return np.sort(positions[~have][first])


def warm(ds: CachedDataset, *, num_workers: int | None, batch_size: int | None, progress: bool) -> None:
    """Compute every missing item (this rank's share under torch.distributed), then merge."""
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    ds.flush()
    if distributed:
        # One list for all ranks (rank 0's view), so that the shares neither overlap nor miss.
        dist.barrier()
        box = [missing_positions(ds) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        todo = box[0][rank::world]
    else:
        todo = missing_positions(ds)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if batch_size is None:
        batch_size = 64
    if num_workers < 0 or batch_size < 1:
        raise ValueError(
            f"warm(): num_workers must be >= 0 and batch_size >= 1, got {num_workers}, {batch_size}"
        )
    bar = progress_bar(len(todo), "cachedata warm", progress and rank == 0)
    try:
        if len(todo):
            loader = DataLoader(
                _Filler(ds),
                batch_size=batch_size,
                sampler=todo.tolist(),
                num_workers=min(num_workers, max(1, len(todo) // batch_size)) if num_workers else 0,
                collate_fn=_count,
            )
            for n in loader:
                bar.update(n)
    finally:
        bar.close()
    ds.merge()
