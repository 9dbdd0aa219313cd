"""Progress bars for long work: merges, ``warm()``.

tqdm is imported on first use only (it costs about 0.1 s, which the command line's quick
paths do not pay).
"""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, desc: str, enabled: bool, *, unit: str = "item") -> Any:
    """A tqdm bar counting ``unit`` ("item", or "B" for bytes), or a disabled one."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not enabled, leave=False)
