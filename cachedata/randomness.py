"""The check that a cached transform does not draw from a global random generator.

A transform that draws from ``random``, ``numpy.random`` or torch's default generator
produces a different item on every call: caching its first output would serve one random
draw forever. The first RNG_CHECKS misses of each process compare the generators' states
before and after the call; later calls run unchecked (the check costs a state copy).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: Misses per process whose transform is checked for drawing from a global random generator.
RNG_CHECKS = 16


class RandomGuard:
    """Runs the first RNG_CHECKS calls of each process under the check (picklable: a spawned
    or forked process starts its own count)."""

    def __init__(self) -> None:
        self._pid = 0
        self._left = RNG_CHECKS

    def run(self, fn: Callable[[], Any], what: str, index: int) -> Any:
        pid = os.getpid()
        if self._pid != pid:
            self._pid, self._left = pid, RNG_CHECKS
        if self._left <= 0:
            return fn()
        self._left -= 1
        before = rng_states()
        result = fn()
        after = rng_states()
        if not same_rng(before, after):
            raise RuntimeError(
                f"item {index}: {what} drew random numbers from the global random generator "
                f"({which_rng(before, after)}), so its cached output would be stale. "
                "Move random augmentation to post_transform=, or pass allow_random=True if it seeds itself."
            )
        return result


def rng_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def same_rng(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0] and a[1][2:] == b[1][2:] and np.array_equal(a[1][1], b[1][1]) and torch.equal(a[2], b[2])
    )


def which_rng(a: tuple, b: tuple) -> str:
    names = []
    if a[0] != b[0]:
        names.append("random")
    if not (a[1][2:] == b[1][2:] and np.array_equal(a[1][1], b[1][1])):
        names.append("numpy.random")
    if not torch.equal(a[2], b[2]):
        names.append("torch")
    return ", ".join(names) or "unknown"
