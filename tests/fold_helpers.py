"""Transforms for the k-fold tests, importable by spawn and forkserver workers."""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass
class LoggedScale:
    """A dataclass transform (the most common way to write one) that logs every call."""

    log: str
    scale: float = 2.0

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()} {item['name']}\n")
        return {"x": item["x"] * self.scale, "label": item["label"], "name": item["name"]}


def names(batch: list[dict[str, Any]]) -> list[str]:
    """collate_fn keeping only item names (the items are ragged)."""
    return [item["name"] for item in batch]
