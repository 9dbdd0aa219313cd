"""Which stored item a CachedDataset index names: position -> base index -> storage key.

A ``Subset`` is unwrapped (``origin.unwrap``), so positions map to indices of the base
dataset and folds share one cache; ``key=`` then names each base index for storage (a str
through xxh3-64), else the base index is the key.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch
import xxhash


class Addresses:
    """The index arithmetic of one CachedDataset (plain data: pickled with it)."""

    def __init__(
        self,
        length: int,
        indices: np.ndarray | None,
        *,
        key: Callable[[int], Hashable] | None,
        base_length: int,
    ) -> None:
        self.length = length
        self.indices = indices  # positions -> base indices, or None when they are the same
        self.key = key
        self.base_length = base_length

    def base_index(self, index: object) -> int:
        """The base dataset's index for position ``index`` (negative counts from the end)."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
                index = int(index)
            else:
                raise TypeError(
                    f"CachedDataset indices must be integers, got {type(index).__name__} {index!r}"
                )
        i = int(index)
        n = self.length
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"CachedDataset index {index} out of range for length {n}")
        return int(self.indices[i]) if self.indices is not None else i

    def base_indices(self, indices: Sequence[int]) -> list[int]:
        """``base_index`` of each, vectorized for the common case of a list of in-range ints."""
        if type(indices) is list and len(indices) > 16 and all(type(i) is int for i in indices):
            arr = np.asarray(indices, np.int64)
            n = self.length
            if arr.min() < -n or arr.max() >= n:
                bad = next(i for i in indices if not -n <= i < n)
                raise IndexError(f"CachedDataset index {bad} out of range for length {n}")
            arr = np.where(arr < 0, arr + n, arr)
            if self.indices is not None:
                arr = self.indices[arr]
            return arr.tolist()
        return [self.base_index(i) for i in indices]

    def key_of(self, base_index: int) -> int:
        """The storage key of a base index."""
        if self.key is None:
            return base_index
        return key_to_int(self.key(base_index), base_index)

    def keys_of(self, base_indices: list[int]) -> list[int]:
        return base_indices if self.key is None else [self.key_of(b) for b in base_indices]

    def position_keys(self) -> np.ndarray:
        """The storage key of every position, in order (a pass over ``key=``: not for hot paths)."""
        base = self.indices if self.indices is not None else np.arange(self.length, dtype=np.int64)
        if self.key is None:
            return np.asarray(base, np.int64)
        return np.asarray([self.key_of(int(b)) for b in base], np.int64)

    def base_keys(self) -> np.ndarray:
        """The storage key of every item of the base dataset (a pass over ``key=``)."""
        n = self.base_length
        if self.key is None:
            return np.arange(n, dtype=np.int64)
        return np.asarray([self.key_of(i) for i in range(n)], np.int64)


def key_to_int(k: Hashable, base_index: int) -> int:
    """Map a user key to int64: ints as themselves, str (and big ints) through xxh3-64."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and -(2**63) <= int(k) < 2**63:
        return int(k)
    if isinstance(k, (str, int, np.integer)) and not isinstance(k, bool):
        h = xxhash.xxh3_64_intdigest(f"{type(k).__name__}:{k}".encode("utf-8", "surrogatepass"))
        return h - (1 << 64) if h >= 1 << 63 else h
    raise TypeError(f"key({base_index}) returned {type(k).__name__} {k!r}; key= must return a str or an int")
