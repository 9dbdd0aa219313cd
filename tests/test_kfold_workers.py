"""k-fold with spawn and forkserver workers: the transform runs N times over all folds.

Each fold builds a new CachedDataset after the previous fold's DataLoader pickled the
transform into its workers; the namespace must not move because of that pickling.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
from fold_helpers import LoggedScale, names
from helpers import LogCalls, Ragged, count_calls
from torch.utils.data import DataLoader, Subset

from cachedata import CachedDataset

N = 18
FOLDS = 3


def _transform(kind: str, log: str):
    return LoggedScale(log) if kind == "dataclass" else LogCalls(log)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("kind", ["dataclass", "plain"])
def test_kfold_runs_the_transform_once_per_item(tmp_path, method, kind):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    log = str(tmp_path / "calls.log")
    base = Ragged(N)
    folds = np.array_split(np.arange(N), FOLDS)
    fingerprints = set()
    for k in range(FOLDS):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k]).tolist()
        ds = CachedDataset(Subset(base, train), tmp_path / "cache", transform=_transform(kind, log))
        fingerprints.add(ds.fingerprint)
        loader = DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context=method, collate_fn=names)
        seen = [n for batch in loader for n in batch]
        assert sorted(seen) == sorted(f"item-{i}" for i in train)
    assert len(fingerprints) == 1, "a fold landed in a new namespace"
    assert count_calls(log) == N  # every item computed exactly once over all folds
