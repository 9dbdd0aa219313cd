"""Module-level datasets and transforms for the tests (importable by spawned workers)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


class Ragged:
    """Dict items with a ragged float tensor, an int label and a name."""

    def __init__(self, n: int, *, seed: int = 0) -> None:
        self.n = n
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        return {"x": torch.randn(i % 7 + 1, 3, generator=g), "label": i % 5, "name": f"item-{i}"}


class LogCalls:
    """A deterministic transform that appends one line per call to a log file (any process)."""

    def __init__(self, log: str | os.PathLike, scale: float = 2.0) -> None:
        self.log = str(log)
        self.scale = scale

    def __call__(self, item):
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} {item['label']} {item['name']}\n")
        return {"x": item["x"] * self.scale, "label": item["label"], "name": item["name"]}


def count_calls(log: str | os.PathLike) -> int:
    p = Path(log)
    return len(p.read_text().splitlines()) if p.exists() else 0


def reference(ds, transform, i):
    """What the uncached pipeline returns for item i."""
    return transform(ds[i]) if transform is not None else ds[i]


class ListDataset:
    """A map-style dataset over a list of ready items."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class Tokens:
    """Ragged int64 token sequences of length 32..512 (like a tokenized corpus)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        return torch.from_numpy(rng.integers(0, 50000, size=int(rng.integers(32, 513)), dtype=np.int64))


def random_transform(item):
    """Draws from the global torch generator: must be caught."""
    return item["x"] + torch.rand(1)


def python_random_transform(item):
    return {"x": item["x"], "noise": random.random()}


def add_one(item):
    return {"x": item["x"] + 1, "label": item["label"]}


def identity_batch(batch):
    return batch


def assert_same(a, b, where="item"):
    """Bit-exact equality with the same types, recursively."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert (
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
            if a.numel()
            else True
        ), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif type(a).__module__.startswith("PIL."):
        assert a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes(), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def kill_on_item_30(item):
    """add_one, except that the process computing item 30 kills itself (SIGKILL) mid-epoch."""
    if item["name"] == "item-30":
        os.kill(os.getpid(), 9)
    return add_one(item)
