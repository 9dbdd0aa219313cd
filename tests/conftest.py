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


def skip_without_xattrs(folder) -> None:
    """Skip the test where ``folder``'s filesystem keeps no user xattrs (data files then carry
    no row count: ``cachedata info`` counts through the index, as other tests show)."""
    from cachedata import fileset

    probe = folder / "xattr-probe"
    probe.touch()
    try:
        fileset.set_rows(probe, 1)
        if fileset.stored_rows(probe) != 1:
            pytest.skip(f"no user xattrs on the filesystem of {folder}")
    finally:
        probe.unlink()
