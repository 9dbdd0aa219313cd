from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _cachedata_logs(caplog):
    caplog.set_level(logging.INFO, logger="cachedata")
    yield


def leftovers(path) -> list[str]:
    """Temporary files left in a cache folder tree (there must be none)."""
    return sorted(str(p) for p in path.rglob(".tmp-*"))
