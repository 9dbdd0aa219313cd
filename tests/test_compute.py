"""Computing misses (compute.Compute): transform or transform.batch, the random check, counting."""

from __future__ import annotations

import random

import pytest

from cachedata.compute import Compute
from cachedata.randomness import RNG_CHECKS
from cachedata.stats import Counters


class Doubler:
    def __call__(self, x):
        return 2 * x

    def batch(self, xs):
        return [2 * x for x in xs]


def test_misses_are_counted_as_they_are_computed():
    counters = Counters()
    seen = []

    def transform(x):
        seen.append(counters.snapshot().misses)  # what was counted before this call
        if x == 3:
            raise KeyError("boom")
        return x + 1

    c = Compute(list(range(10)), transform, allow_random=False, counters=counters)
    assert c.run([0, 1], ["a", "b"]) == [1, 2]
    with pytest.raises(KeyError):
        c.run([2, 3, 4], [2, 3, 4])
    assert seen == [0, 1, 2, 3] and counters.snapshot().misses == 3  # 0, 1, 2: not the failed one


def test_a_batch_transform_runs_once_per_batch_and_must_return_one_item_each():
    counters = Counters()
    assert Compute([1, 2, 3], Doubler(), allow_random=False, counters=counters).run([2, 0], [2, 0]) == [6, 2]
    assert counters.snapshot().misses == 2

    class Short(Doubler):
        def batch(self, xs):
            return xs[:-1]

    with pytest.raises(TypeError, match=r"transform\.batch must return a list of 2 items"):
        Compute([1, 2, 3], Short(), allow_random=False, counters=Counters()).run([0, 1], [0, 1])


def test_global_random_draws_are_refused_on_the_first_misses_unless_allowed():
    def noisy(x):
        return x + random.random()

    c = Compute(list(range(100)), noisy, allow_random=False, counters=Counters())
    with pytest.raises(RuntimeError, match=r"item 'fold-1': transform drew random numbers"):
        c.run([5], ["'fold-1'"])
    assert (
        len(Compute(list(range(100)), noisy, allow_random=True, counters=Counters()).run([1, 2], [1, 2])) == 2
    )
    # Only the first RNG_CHECKS calls of a process are checked (the check costs a state copy).
    quiet = Compute(list(range(100)), lambda x: x, allow_random=False, counters=Counters())
    quiet.run(list(range(RNG_CHECKS)), list(range(RNG_CHECKS)))
    quiet.transform = noisy
    assert len(quiet.run([1], [1])) == 1
