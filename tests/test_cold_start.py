"""Saying why a cache starts cold; clear() keeping a namespace's record; info on odd folders."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import stability_objects as so
from helpers import ListDataset, LogCalls, Ragged, count_calls

from cachedata import CachedDataset
from cachedata.metadata import read_meta

ROOT = Path(__file__).parent.parent


def _cold_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "cache starts cold" in r.getMessage()
    ]


def test_retrained_tokenizer_is_named_in_words(tmp_path, caplog):
    from cachedata.transforms import Tokenize

    texts = ListDataset(["alpha1 beta2 gamma3", "delta4 zeta1", "theta3 eta2 alpha0"])
    CachedDataset(texts, tmp_path, transform=Tokenize(so.tokenizer(60)))
    caplog.clear()
    ds = CachedDataset(texts, tmp_path, transform=Tokenize(so.tokenizer(70)))
    (msg,) = _cold_warnings(caplog)
    assert "transform._tokenizer.vocabulary: changed (60 -> 70 tokens)" in msg
    assert f"new namespace {ds.fingerprint[:12]}" in msg and str(ds.path) in msg
    assert "version=" in msg and "register_fingerprint" in msg
    assert "#" not in msg.split(" in transform: ")[1].split(". ")[0]  # words, not hashes


def test_torchvision_change_is_one_warning_per_process(tmp_path, caplog):
    from torchvision.transforms import v2

    def pipeline(size: int) -> v2.Compose:
        return v2.Compose([v2.Resize(size, antialias=True), v2.Normalize([0.5], [0.2])])

    CachedDataset(Ragged(3), tmp_path, transform=pipeline(224))
    caplog.clear()
    ds = CachedDataset(Ragged(3), tmp_path, transform=pipeline(256))
    (msg,) = _cold_warnings(caplog)
    assert "in transform: transform.transforms[0].size: [224] -> [256]" in msg
    # The same new namespace again in this process (its folder was deleted meanwhile): no repeat.
    shutil.rmtree(ds.path)
    caplog.clear()
    CachedDataset(Ragged(3), tmp_path, transform=pipeline(256))
    assert _cold_warnings(caplog) == []


def test_no_warning_for_the_first_namespace_or_another_dataset_type(tmp_path, caplog):
    CachedDataset(Ragged(3), tmp_path, transform=LogCalls(tmp_path / "log"))
    CachedDataset(ListDataset([1, 2]), tmp_path)
    assert _cold_warnings(caplog) == []


def test_damaged_sibling_meta_is_skipped(tmp_path, caplog):
    a = CachedDataset(Ragged(3), tmp_path, transform=LogCalls(tmp_path / "log", 2.0))
    (a.path / "meta.json").write_bytes(b"\xff\x00")
    CachedDataset(Ragged(3), tmp_path, transform=LogCalls(tmp_path / "log", 3.0))
    assert _cold_warnings(caplog) == []  # nothing to compare with; no crash


def test_clear_keeps_the_instance_usable_and_its_record(tmp_path):
    log = tmp_path / "calls.log"
    ds = CachedDataset(Ragged(6), tmp_path / "cache", transform=LogCalls(log))
    before = read_meta(ds.path)
    [ds[i] for i in range(6)]
    ds.merge()
    ds.clear()
    after = read_meta(ds.path)
    for key in ("fingerprint", "dataset", "transform", "tree", "versions", "version", "key"):
        assert after[key] == before[key], key
    assert after["dataset"]["type"] == "helpers.Ragged" and after["tree"]
    assert ds.num_cached == 0
    assert [ds[i]["name"] for i in range(6)] == [f"item-{i}" for i in range(6)]
    assert count_calls(log) == 12  # recomputed after clear
    ds.flush()
    assert ds.num_cached == 6
    # A sibling namespace still gets its explanation from the kept tree.
    info = _cli("info", str(tmp_path / "cache"), "--json", "--items")
    (ns,) = json.loads(info.stdout)["namespaces"]
    assert ns["dataset_type"] == "helpers.Ragged" and ns["items"] == 6


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "cachedata", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.timeout(300)
def test_info_on_a_folder_of_cache_folders_and_on_an_unrelated_folder(tmp_path):
    for name, n in (("images", 2), ("texts", 1)):
        for k in range(n):
            ds = CachedDataset(
                Ragged(4), tmp_path / "caches" / name, transform=LogCalls(tmp_path / "l", 1.0 + k)
            )
            ds[0]
            ds.flush()
    (tmp_path / "caches" / "notes").mkdir()
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "a.txt").write_text("x")

    text = _cli("info", str(tmp_path / "caches")).stdout
    assert "it holds 2 cache folder(s)" in text
    assert str(tmp_path / "caches" / "images") in text and str(tmp_path / "caches" / "texts") in text
    assert "notes" not in text and "cachedata info FOLDER" in text
    data = json.loads(_cli("info", str(tmp_path / "caches"), "--json").stdout)
    assert data["namespaces"] == []
    assert [(Path(f["path"]).name, f["namespaces"]) for f in data["cache_folders"]] == [
        ("images", 2),
        ("texts", 1),
    ]

    text = _cli("info", str(tmp_path / "unrelated")).stdout
    assert "expected a cache_dir" in text and "64-hex fingerprint" in text
