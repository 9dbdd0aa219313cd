"""How a miss is computed: ``dataset[i]``, then ``transform`` (or ``transform.batch``).

Each call runs under the global-random-generator check on the first misses of a process
(``randomness.RandomGuard``) unless ``allow_random``, and each miss is counted as soon as it
is computed, not at the end of the batch: a DataLoader worker shut down (or killed) mid-batch,
say after a StatefulDataLoader's ``state_dict()``, has then counted every transform call it made.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from .randomness import RandomGuard
from .stats import Counters


class Compute:
    """Computes the transform output of base dataset items (picklable with the dataset)."""

    def __init__(
        self, base: Any, transform: Callable[[Any], Any] | None, *, allow_random: bool, counters: Counters
    ) -> None:
        self.base = base
        self.transform = transform
        self.allow_random = allow_random
        self.counters = counters
        self._guard = RandomGuard()

    def run(self, base_indices: list[int], labels: list[Any]) -> list[Any]:
        """``transform(base[i])`` for each base index; ``labels`` name the items in errors."""
        transform, counters = self.transform, self.counters
        batch = getattr(transform, "batch", None)
        if transform is not None and callable(batch):
            t = time.perf_counter()
            values = [self._item(b, label) for b, label in zip(base_indices, labels)]
            values = self._checked(lambda: batch(values), "transform.batch", labels[0])
            if not isinstance(values, list) or len(values) != len(base_indices):
                raise TypeError(
                    f"transform.batch must return a list of {len(base_indices)} items, got {type(values).__name__}"
                )
            counters.add(misses=len(values), compute_seconds=time.perf_counter() - t)
            return values
        values = []
        for b, label in zip(base_indices, labels):
            t = time.perf_counter()
            v = self._item(b, label)
            if transform is not None:
                v = self._checked(functools.partial(transform, v), "transform", label)
            counters.add(misses=1, compute_seconds=time.perf_counter() - t)
            values.append(v)
        return values

    def _item(self, base_index: int, label: Any) -> Any:
        return self._checked(lambda: self.base[base_index], "dataset[i]", label)

    def _checked(self, fn: Callable[[], Any], what: str, label: Any) -> Any:
        """Run ``fn``; on the first misses, fail if it drew from a global random generator."""
        return fn() if self.allow_random else self._guard.run(fn, what, label)
