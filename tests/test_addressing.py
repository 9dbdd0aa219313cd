"""Positions -> base indices -> storage keys (addressing.Addresses), and the key mapping."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedata.addressing import Addresses, key_to_int


def test_plain_positions_are_their_own_keys():
    a = Addresses(10, None, key=None, base_length=10)
    assert [a.base_index(i) for i in (0, 9, -1, -10, np.int64(3), torch.tensor(4))] == [0, 9, 9, 0, 3, 4]
    assert a.position_keys().tolist() == list(range(10)) and a.base_keys().tolist() == list(range(10))
    for bad, exc in ((10, IndexError), (-11, IndexError), (True, TypeError), (1.0, TypeError),
                     (torch.tensor(1.0), TypeError), ("1", TypeError)):  # fmt: skip
        with pytest.raises(exc, match="CachedDataset ind"):
            a.base_index(bad)


def test_a_subset_maps_positions_to_base_indices_and_keys_name_them():
    indices = np.asarray([5, 2, 2, 7], np.int64)  # folds may repeat an index
    a = Addresses(4, indices, key=lambda i: f"file-{i}.jpg", base_length=8)
    assert a.base_indices([0, 1, 2, 3, -1]) == [5, 2, 2, 7, 7]
    keys = a.position_keys()
    assert keys[1] == keys[2] and keys[0] == a.key_of(5) and len(a.base_keys()) == 8
    assert a.keys_of([5, 2]) == [a.key_of(5), a.key_of(2)]
    assert pickle.loads(pickle.dumps(Addresses(4, indices, key=None, base_length=8))).base_index(0) == 5


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 50),
    picks=st.lists(st.integers(-60, 60), min_size=17, max_size=40),
    subset=st.booleans(),
)
def test_the_vectorized_batch_path_agrees_with_one_at_a_time(n, picks, subset):
    """Lists longer than 16 ints take a numpy path: same answers, same first error."""
    indices = np.random.default_rng(n).permutation(n).astype(np.int64) if subset else None
    a = Addresses(n, indices, key=None, base_length=n)
    try:
        want = [a.base_index(i) for i in picks]
    except IndexError as exc:
        with pytest.raises(IndexError, match=str(exc).split(" out of")[0] + " out of"):
            a.base_indices(picks)
    else:
        assert a.base_indices(picks) == want


def test_keys_map_to_int64_stably():
    assert key_to_int(7, 0) == 7 and key_to_int(np.int64(-3), 0) == -3
    h = xxhash.xxh3_64_intdigest(b"str:a.jpg")
    assert key_to_int("a.jpg", 0) == (h - (1 << 64) if h >= 1 << 63 else h)  # on disk: never changes
    assert key_to_int("7", 0) != key_to_int(7, 0)
    assert -(2**63) <= key_to_int(2**70, 0) < 2**63
    with pytest.raises(TypeError, match=r"key\(3\) returned float 1.5; key= must return a str or an int"):
        key_to_int(1.5, 3)
    with pytest.raises(TypeError, match=r"key\(0\) returned bool"):
        key_to_int(True, 0)
