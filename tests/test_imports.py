"""The command line starts without torch, and ``import cachedata`` still exposes its API."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import Ragged

import cachedata
from cachedata import CachedDataset, fileset

#: Runs ``cachedata.cli.main(argv)`` in a fresh interpreter and reports which heavy modules
#: it imported (not a timing: start-up time is measured in benchmarks/bench_core.py).
_PROBE = textwrap.dedent(
    """
    import json, sys
    from cachedata.cli import main
    try:
        rc = main(sys.argv[1:])
    except SystemExit as exc:
        rc = exc.code
    heavy = sorted(m for m in ("torch", "torchvision", "torchaudio", "PIL", "numpy", "h5py") if m in sys.modules)
    print(json.dumps({"rc": rc, "heavy": heavy}), file=sys.stderr)
    """
)


def _probe(*argv: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120, input=""
    )
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ten_namespaces(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "cache"
    for v in range(10):
        ds = CachedDataset(Ragged(12), root, version=str(v))
        for i in range(12):
            ds[i]
        if v % 2:
            ds.merge()  # half merged, half in shards
        else:
            ds.flush()
    return root


@pytest.mark.timeout(300)
def test_cli_commands_do_not_import_torch(ten_namespaces):
    """No command imports torch; those that need no data file (all but verify, merge and
    info --items) import neither numpy nor HDF5 either: they start at once. Plain info reads
    the rows each file records in an xattr, and opens the index only where one lacks it."""
    root = str(ten_namespaces)
    folders = sorted(p for p in ten_namespaces.iterdir() if p.is_dir())
    fp = folders[0].name
    counts = any(fileset.listing_rows(p, fileset.list_files(p)) is None for p in folders)  # no xattrs
    for argv, data in (
        (["--help"], False),
        (["--version"], False),
        (["info", "--help"], False),
        (["info", root], counts),
        (["info", "--json", root], counts),
        (["info", "--items", root], True),
        (["budget", root], False),
        (["verify", root], True),
        (["verify", "--json", root], True),
        (["prune", root, "--older-than", "1000d"], False),
        (["prune", root, "--max-bytes", "1G"], False),
        (["clear", root, "--namespace", fp, "--yes"], False),
    ):
        got = _probe(*argv)
        assert got["rc"] == 0, (argv, got)
        heavy = [m for m in got["heavy"] if not data or m not in ("numpy", "h5py")]
        assert heavy == [], f"cachedata {' '.join(argv)} imported {got['heavy']}"


def test_import_cachedata_is_torch_free_until_a_name_needs_it():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, cachedata; a = 'torch' in sys.modules; cachedata.CachedDataset; "
            "print(a, 'torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.split() == ["False", "True"], proc.stderr


def test_every_public_name_resolves():
    assert cachedata.__all__ == sorted(cachedata.__all__)
    for name in cachedata.__all__:
        assert getattr(cachedata, name) is not None
    importlib.import_module("cachedata.fingerprint")  # the submodule must not shadow the function

    assert callable(cachedata.fingerprint) and cachedata.fingerprint(1) == cachedata.fingerprint(1)
    assert set(cachedata.__all__) <= set(dir(cachedata))
    with pytest.raises(AttributeError, match="no_such_name"):
        cachedata.no_such_name  # noqa: B018


def test_the_torch_free_dtype_table_matches_torch():
    from cachedata import schema

    schema._import_torch()
    sizes = {name: torch.empty((), dtype=d).element_size() for name, d in schema._TORCH_DTYPES.items()}
    assert sizes == schema._TENSOR_ITEMSIZES
