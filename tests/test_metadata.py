"""Damaged meta.json/schema.json never crash anything and never serve wrong data."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import leftovers
from helpers import LogCalls, Ragged, assert_same, count_calls, reference

from cachedata import CachedDataset, metadata
from cachedata import schema as schema_mod

ROOT = Path(__file__).parent.parent
N = 12


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()
    (p / "inside").write_text("x")


def _other_schema(p: Path) -> None:
    # Valid JSON and a valid item schema, but not the one the data files were written with.
    p.write_text(schema_mod.dumps(schema_mod.encode({"x": 1.5}).schema))


DAMAGE: dict[str, Callable[[Path], object]] = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "not_utf8": lambda p: p.write_bytes(b'{"t": "\xff\xfe\xc3('),
    "wrong_json": lambda p: p.write_text('{"t": "dict", "keys": 3, "fingerprint": 7}'),
    "json_list": lambda p: p.write_text("[1, 2, 3]"),
    "directory": _directory,
    "deleted": lambda p: p.unlink(),
}
SCHEMA_DAMAGE = {**DAMAGE, "other_schema": _other_schema}


def _build(cache: Path, log: Path, scale: float = 2.0) -> CachedDataset:
    """A namespace with a merged file (items 0-5) and a shard (items 6-8)."""
    ds = CachedDataset(Ragged(N), cache, transform=LogCalls(log, scale))
    [ds[i] for i in range(6)]
    ds.merge()
    [ds[i] for i in range(6, 9)]
    ds.flush()
    assert sorted(p.name.split("-")[0] for p in ds.path.glob("*.h5")) == ["merged", "shard"]
    return ds


def _warnings(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and name in r.getMessage()]


@pytest.mark.parametrize("damage", sorted(SCHEMA_DAMAGE))
def test_damaged_schema_is_recovered_from_the_data_files(tmp_path, caplog, damage):
    log = tmp_path / "calls.log"
    built = _build(tmp_path / "cache", log)
    schema_text = (built.path / "schema.json").read_text()
    SCHEMA_DAMAGE[damage](built.path / "schema.json")
    caplog.clear()

    ds = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
    assert len(ds) == N and ds.path == built.path
    for i in range(9):
        assert_same(ds[i], reference(Ragged(N), LogCalls(tmp_path / "unused.log"), i), f"item {i}")
    assert count_calls(log) == 9  # every stored item was a hit: nothing recomputed
    assert (built.path / "schema.json").read_text() == schema_text  # rewritten in place
    warned = _warnings(caplog, "schema.json")
    assert len(warned) == 1 and "rewritten from merged-" in warned[0], warned
    ds.warm(num_workers=0, progress=False)
    assert count_calls(log) == N and ds.num_cached == N
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_meta_is_rewritten_from_the_dataset(tmp_path, caplog, damage):
    log = tmp_path / "calls.log"
    built = _build(tmp_path / "cache", log)
    meta = json.loads((built.path / "meta.json").read_text())
    DAMAGE[damage](built.path / "meta.json")
    caplog.clear()

    ds = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
    assert len(ds) == N
    assert [ds[i]["name"] for i in range(9)] == [f"item-{i}" for i in range(9)]
    assert count_calls(log) == 9
    again = json.loads((built.path / "meta.json").read_text())
    for key in ("fingerprint", "dataset", "tree", "versions", "key", "version"):
        assert again[key] == meta[key], key
    assert again["transform"]["fingerprint"] == meta["transform"]["fingerprint"]
    assert again["transform"]["repr"].startswith("<helpers.LogCalls object")
    warned = _warnings(caplog, "meta.json")
    assert len(warned) == (0 if damage == "deleted" else 1), warned
    ds.warm(num_workers=0, progress=False)
    assert count_calls(log) == N


def test_damaged_schema_without_data_files_is_cleared_for_the_first_item(tmp_path, caplog):
    log = tmp_path / "calls.log"
    ds = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
    (ds.path / "schema.json").write_text("{truncat")
    caplog.clear()
    again = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
    assert again[3]["name"] == "item-3"
    again.flush()
    assert schema_mod.load((ds.path / "schema.json").read_text())  # fixed by the first item
    assert len(_warnings(caplog, "schema.json")) == 1


def test_one_warning_per_process_and_folder(tmp_path, caplog):
    log = tmp_path / "calls.log"
    built = _build(tmp_path / "cache", log)
    for _ in range(3):
        (built.path / "schema.json").write_text("")
        ds = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
        assert ds[1]["name"] == "item-1"
    assert len(_warnings(caplog, "schema.json")) == 1


def test_read_only_folder_with_damaged_schema_still_serves(tmp_path, caplog):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    log = tmp_path / "calls.log"
    built = _build(tmp_path / "cache", log)
    built.merge()
    (built.path / "schema.json").write_text("")
    mode = built.path.stat().st_mode
    built.path.chmod(0o555)
    try:
        ds = CachedDataset(Ragged(N), tmp_path / "cache", transform=LogCalls(log))
        assert [ds[i]["name"] for i in range(9)] == [f"item-{i}" for i in range(9)]
        assert count_calls(log) == 9
    finally:
        built.path.chmod(mode)


def test_repair_reports_what_it_did(tmp_path):
    built = _build(tmp_path / "cache", tmp_path / "calls.log")
    (built.path / "schema.json").write_bytes(b"\xff")
    (built.path / "meta.json").write_text("[]")
    repairs = metadata.repair(built.path)
    assert [Path(r.file).name for r in repairs] == ["schema.json", "meta.json"]
    assert repairs[0].problem == "not UTF-8 text" and repairs[0].action.startswith("rewritten from merged-")
    assert repairs[1].problem == "JSON list, expected an object"
    assert json.loads((built.path / "meta.json").read_text())["fingerprint"] == built.fingerprint
    assert metadata.repair(built.path) == []  # nothing left to repair


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run(
        [sys.executable, "-m", "cachedata", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.timeout(600)
def test_cli_info_verify_merge_on_damaged_metadata(tmp_path):
    cache = tmp_path / "cache"
    damaged: dict[str, tuple[str, str]] = {}  # fingerprint -> (file, damage)
    cases = [("schema.json", d) for d in sorted(SCHEMA_DAMAGE)] + [("meta.json", d) for d in sorted(DAMAGE)]
    for k, (name, damage) in enumerate(cases):
        ds = _build(cache, tmp_path / "calls.log", scale=1.0 + k)
        (SCHEMA_DAMAGE if name == "schema.json" else DAMAGE)[damage](ds.path / name)
        damaged[ds.fingerprint] = (name, damage)

    verify = _cli("verify", str(cache), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert report["ok"]
    for ns in report["namespaces"]:
        name, damage = damaged[ns["fingerprint"]]
        assert ns["items"] == 9, ns
        assert [r.split(":")[0].rsplit("/", 1)[-1] for r in ns["repaired"]] == [name], (
            damage,
            ns["repaired"],
        )
    info = _cli("info", str(cache), "--json")
    assert info.returncode == 0, info.stderr
    assert {n["fingerprint"] for n in json.loads(info.stdout)["namespaces"]} == set(damaged)

    text = _cli("verify", str(cache))
    assert text.returncode == 0 and "repaired" not in text.stdout  # all repaired by the first run

    merge = _cli("merge", str(cache), "--json")
    assert merge.returncode == 0, merge.stderr
    assert all(r["status"] == "merged" and r["items"] == 9 for r in json.loads(merge.stdout)["namespaces"])
    for fp in damaged:
        assert schema_mod.load((cache / fp / "schema.json").read_text())
        assert json.loads((cache / fp / "meta.json").read_text())["fingerprint"] == fp
