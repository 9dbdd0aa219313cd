"""What the examples share: the cold-then-warm epoch loop and its one-line summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def run_epochs(
    ds: Any, loader: Any, model: Any, opt: Any, epochs: int, train_epoch: Callable
) -> tuple[list[float], list[float]]:
    """Train ``epochs`` epochs (the first one cold), print cold vs warm time and hit rate.

    ``train_epoch(ds, loader, model, opt, name)`` returns (seconds, hit rate of that epoch);
    the lists of both (one entry per epoch) are returned.
    """
    times, rates = [], []
    for epoch in range(epochs):
        name = f"epoch {epoch + 1} ({'cold' if epoch == 0 else 'warm'})"
        elapsed, rate = train_epoch(ds, loader, model, opt, name)
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
