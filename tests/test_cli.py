"""The ``cachedata`` command line, run as the installed console script and as ``python -m``.

Caches are built with CachedDataset in the test process; every command runs in a
subprocess against them. Parsers, table rendering and prune planning are unit-tested.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pty
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import torch
from conftest import skip_without_xattrs
from helpers import LogCalls, Ragged, assert_same, count_calls
from hypothesis import given
from hypothesis import strategies as st

from cachedata import CachedDataset, fileset
from cachedata.admin import NamespaceInfo, Problem, inspect_namespace, plan_prune, verify_namespace
from cachedata.cli import main, render_table
from cachedata.units import format_duration, format_size, parse_duration, parse_size

SCRIPT = Path(sys.executable).parent / "cachedata"
RUNNERS = {"script": [str(SCRIPT)], "module": [sys.executable, "-m", "cachedata"]}
DAY = 86400.0


# ----------------------------------------------------------------------------- helpers


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CACHEDATA_HOME"] = str(tmp_path / "default-home")
    return env


def run(tmp_path: Path, *args: str, runner: str = "script", stdin=subprocess.DEVNULL):
    """Run one command to completion; returns the CompletedProcess (text)."""
    return subprocess.run(
        [*RUNNERS[runner], *map(str, args)],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=100,
        env=_env(tmp_path),
    )


def run_many(tmp_path: Path, commands: list[tuple[str, list[str]]]) -> list[subprocess.CompletedProcess]:
    """Run several (runner, args) commands at once (each pays the torch import)."""
    procs = [
        (
            [*RUNNERS[r], *map(str, a)],
            subprocess.Popen(
                [*RUNNERS[r], *map(str, a)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(tmp_path),
            ),
        )
        for r, a in commands
    ]
    out = []
    for cmd, p in procs:
        stdout, stderr = p.communicate(timeout=100)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


@dataclass(frozen=True)
class Built:
    """A namespace built by the test: its dataset, folder, fingerprint and call log."""

    ds: CachedDataset | None  # None once released (no lease held by this process)
    path: Path
    fp: str
    log: Path
    scale: float
    compression: str | None

    def fresh(self) -> CachedDataset:
        """A new CachedDataset on the same namespace (same arguments)."""
        return CachedDataset(
            Ragged(20),
            self.path.parent,
            transform=LogCalls(self.log, self.scale),
            compression=self.compression,
        )


def build(cache: Path, scale: float, *, items: int = 20, shards: int = 1, merge: bool = False,
          compression: str | None = None) -> Built:  # fmt: skip
    """Compute ``items`` of Ragged(20) through LogCalls(scale), sealed as ``shards`` shards."""
    log = cache.parent / "calls.log"  # one log: the transforms differ only in scale
    ds = CachedDataset(Ragged(20), cache, transform=LogCalls(log, scale), compression=compression)
    per = -(-items // shards)
    for lo in range(0, items, per):
        for i in range(lo, min(items, lo + per)):
            ds[i]
        ds.flush()
    if merge:
        ds.merge()
    assert ds.path.name == ds.fingerprint
    return Built(ds, ds.path, ds.fingerprint, log, scale, compression)


def files(path: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(prefix) and p.suffix == ".h5")


def flip_payload_byte(h5: Path, row: int) -> int:
    """Invert the first payload byte of index row ``row`` (uncompressed file); returns its key."""
    with h5py.File(h5, "r", locking=False) as f:
        start = f["data"].id.get_offset()
        entry = {name: f["index"][name][row] for name in ("key", "offset")}
    at = start + int(entry["offset"])
    with open(h5, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0xFF]))
    return int(entry["key"])


def set_last_used(path: Path, when: float) -> None:
    (path / "last_used").touch()
    os.utime(path / "last_used", (when, when))


@pytest.fixture
def two(tmp_path):
    """A cache_dir with A (2 shards, 15 items, uncompressed) and B (merged, 20 items, gzip)."""
    cache = tmp_path / "cache"
    return build(cache, 2.0, items=15, shards=2), build(cache, 3.0, merge=True, compression="gzip")


# ----------------------------------------------------------------------------- parsers (unit)


@pytest.mark.parametrize(
    "text, want",
    [
        ("0", 0),
        ("4096", 4096),
        ("12B", 12),
        ("1K", 1024),
        ("512M", 512 * 1024**2),
        ("50G", 50 * 1024**3),
        ("50g", 50 * 1024**3),
        ("1.5T", int(1.5 * 1024**4)),
        ("2GiB", 2 * 1024**3),
        ("2GB", 2 * 10**9),
        ("100kb", 100_000),
        (" 3 M ", 3 * 1024**2),
        (".5K", 512),
        ("1P", 1024**5),
    ],
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "G", "50X", "-1G", "1.2.3M", "50 GBs", "1e3", "nan", "5G5"])
def test_parse_size_rejects_with_a_clear_message(text):
    with pytest.raises(ValueError, match=r"invalid size .*expected a number with an optional unit.*50G"):
        parse_size(text)


@pytest.mark.parametrize(
    "text, want",
    [
        ("45s", 45),
        ("30m", 1800),
        ("12h", 12 * 3600),
        ("7d", 7 * DAY),
        ("2w", 14 * DAY),
        ("1.5h", 5400),
        ("1d12h", 1.5 * DAY),
        ("1d 2h 3m 4s", DAY + 7384),
        ("10 minutes", 600),
        ("0s", 0),
        ("3 Days", 3 * DAY),
    ],
)
def test_parse_duration(text, want):
    assert parse_duration(text) == pytest.approx(want)


@pytest.mark.parametrize(
    "text, match",
    [
        ("7", "7 has no unit; write e.g. 7d"),
        ("7x", "unknown unit 'x'"),
        ("", "expected a number with a unit"),
        ("d", "expected a number with a unit"),
        ("-7d", "expected a number with a unit"),
        ("7d!", "expected a number with a unit"),
        ("1d 2", "2 has no unit"),
    ],
)
def test_parse_duration_rejects_with_a_clear_message(text, match):
    with pytest.raises(ValueError, match=rf"invalid duration .*{match}"):
        parse_duration(text)


@pytest.mark.parametrize(
    "n, text",
    [(0, "0B"), (1023, "1023B"), (1024, "1K"), (1536, "1.5K"), (512 * 1024**2, "512M"),
     (50 * 1024**3, "50G"), (int(1.5 * 1024**4), "1.5T"), (1024**2 - 1, "1M"), (3 * 1024**5, "3P")],
)  # fmt: skip
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize(
    "seconds, parts, text",
    [(0, 2, "0s"), (45, 2, "45s"), (90, 2, "1m30s"), (3600, 2, "1h"), (DAY + 1800, 2, "1d"),
     (DAY + 7384, 2, "1d2h"), (DAY + 7384, None, "1d2h3m4s"), (7 * DAY, 1, "7d"), (59.9, 2, "59s")],
)  # fmt: skip
def test_format_duration(seconds, parts, text):
    assert format_duration(seconds, parts) == text


@given(st.integers(min_value=0, max_value=2**62))
def test_size_round_trip_within_5_percent(n):
    text = format_size(n)
    back = parse_size(text)
    assert abs(back - n) <= 0.05 * n + 1, (n, text, back)
    if n < 1024:
        assert back == n


@given(st.integers(min_value=0, max_value=10**10))
def test_duration_round_trip(s):
    assert parse_duration(format_duration(s, parts=None)) == s
    short = parse_duration(format_duration(s))
    assert s - s / 24 - 1 <= short <= s  # at most 1/24 short: only smaller units are dropped


# ----------------------------------------------------------------------------- tables, plans (unit)


def test_render_table_aligns_columns():
    text = render_table(["NAME", "SIZE"], [["a", "1K"], ["long-name", "512M"]], right=(1,))
    lines = text.splitlines()
    assert lines == ["NAME       SIZE", "a            1K", "long-name  512M"]


def _info(
    fp: str, nbytes: int, last_used: float, merging: bool = False, in_use_by: tuple = ()
) -> NamespaceInfo:
    return NamespaceInfo(path=f"/c/{fp}", fingerprint=fp, items=None, items_counted=None, bytes=nbytes,
                         merged_files=1, shard_files=0, dataset_type="m.D", dataset_len=1,
                         dataset_fingerprint=None, transform_repr=None, transform_fingerprint=None, version=None, key="index",
                         versions={}, created=None, last_used=last_used, last_used_from="last_used",
                         merging=merging, in_use_by=in_use_by)  # fmt: skip


def test_plan_prune_lru_order_combined_and_busy_kept():
    now = 1e9
    infos = [_info("new", 10, now - 60), _info("old", 10, now - 10 * DAY), _info("mid", 10, now - 3 * DAY),
             _info("older", 10, now - 5 * DAY)]  # fmt: skip
    plan = plan_prune(infos, older_than=7 * DAY, max_bytes=None, now=now)
    assert [i.fingerprint for i, _ in plan.remove] == ["old"] and "unused for 10d" in plan.remove[0][1]
    plan = plan_prune(infos, older_than=None, max_bytes=15, now=now)
    assert [i.fingerprint for i, _ in plan.remove] == ["old", "older", "mid"]
    assert [i.fingerprint for i in plan.keep] == ["new"] and plan.spared == ()
    plan = plan_prune(infos, older_than=7 * DAY, max_bytes=20, now=now)
    assert [(i.fingerprint, why.split()[0]) for i, why in plan.remove] == [
        ("old", "unused"),
        ("older", "least"),
    ]
    busy = [_info("old", 10, now - 10 * DAY, merging=True), _info("new", 10, now),
            _info("leased", 10, now - 9 * DAY, in_use_by=("node1:42",))]  # fmt: skip
    plan = plan_prune(busy, older_than=DAY, max_bytes=0, now=now)
    assert [i.fingerprint for i, _ in plan.remove] == ["new"]
    assert [i.fingerprint for i in plan.keep] == ["old", "leased"]
    assert [(i.fingerprint, why) for i, why in plan.spared] == [
        ("old", "being merged"),
        ("leased", "in use by node1:42"),
    ]


def test_verify_finds_corrupt_compressed_chunk(tmp_path):
    b = build(tmp_path / "cache", 3.0, merge=True, compression="gzip")
    (merged,) = files(b.path, "merged-")
    assert not verify_namespace(b.path).problems
    with h5py.File(b.path / merged, "r", locking=False) as f:
        chunk = f["data"].id.get_chunk_info(0)
    with open(b.path / merged, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 2)
        fh.write(b"\x00\xff\x00\xff")
    result = verify_namespace(b.path)
    assert result.problems and not result.ok
    assert all(p.file == str(b.path / merged) and p.key is not None for p in result.problems)


# ----------------------------------------------------------------------------- info


@pytest.mark.timeout(120)
def test_info_table_and_json(tmp_path, two):
    skip_without_xattrs(tmp_path)
    a, b = two
    table, js, quick = run_many(tmp_path, [("script", ["info", tmp_path / "cache"]),
                                           ("script", ["info", tmp_path / "cache", "--json", "--items"]),
                                           ("script", ["info", tmp_path / "cache", "--json"])])  # fmt: skip
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = lines[0]
    for col in ("FINGERPRINT", "ITEMS", "SIZE", "MERGED", "SHARDS", "DATASET", "TRANSFORM", "CREATED",
                "LAST USED", "VERSIONS"):  # fmt: skip
        assert col in header
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert set(rows) == {a.fp[:12], b.fp[:12]}
    cells = {fp: row.split() for fp, row in rows.items()}  # FINGERPRINT ITEMS SIZE MERGED SHARDS ...
    assert [cells[a.fp[:12]][i] for i in (1, 3, 4)] == ["15", "0", "2"]
    assert [cells[b.fp[:12]][i] for i in (1, 3, 4)] == ["20", "1", "0"]
    assert cells[a.fp[:12]][2].endswith("K")  # a human size
    # aligned: each column starts at the header's position in every row
    for col in ("DATASET", "TRANSFORM", "CREATED", "VERSIONS"):  # left-aligned: same start
        at = header.index(col)
        for row in rows.values():
            assert row[at - 1] == " " and row[at] != " ", (col, row)
    for col in ("ITEMS", "SIZE", "MERGED", "SHARDS"):  # numbers right-aligned: same end
        end = header.index(col) + len(col)
        for row in rows.values():
            assert row[end - 1] != " " and row[end] == " ", (col, row)
    assert f"torch {torch.__version__}" in rows[a.fp[:12]] and "Ragged (20)" in rows[a.fp[:12]]
    assert "2 namespace(s)" in table.stdout

    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    by_fp = {n["fingerprint"]: n for n in data["namespaces"]}
    assert set(by_fp) == {a.fp, b.fp}
    na, nb = by_fp[a.fp], by_fp[b.fp]
    assert (na["items"], na["merged_files"], na["shard_files"]) == (15, 0, 2)
    assert (nb["items"], nb["merged_files"], nb["shard_files"]) == (20, 1, 0)
    meta = json.loads((a.path / "meta.json").read_text())
    assert na["versions"] == meta["versions"] and na["versions"]["torch"] == torch.__version__
    assert na["dataset_type"] == "helpers.Ragged" and na["dataset_len"] == 20 and na["key"] == "index"
    assert na["transform_repr"].startswith("<helpers.LogCalls object")
    assert na["created"] == pytest.approx(meta["created"])
    assert na["bytes"] == sum(p.stat().st_size for p in a.path.iterdir())
    assert na["last_used_from"] == "meta.json"  # no hit yet: no last_used file
    assert nb["differs_from"]["fingerprint"] == a.fp
    assert nb["differs_from"]["parts"] == ["transform"]
    assert nb["differs_from"]["changes"] == ["transform.scale: 2.0 -> 3.0"]
    me = f"{socket.gethostname()}:{os.getpid()}"  # the datasets of `two` are alive here
    assert na["in_use_by"] == [me] and data["items_counted"] == "index"
    assert {n["items_counted"] for n in data["namespaces"]} == {"index"}

    # Without --items: the same, the items summed from the rows the files record (no index read)
    assert quick.returncode == 0, quick.stderr
    fast = json.loads(quick.stdout)
    assert fast["items_counted"] == "rows" and {n["items_counted"] for n in fast["namespaces"]} == {"rows"}
    for n in fast["namespaces"]:
        assert {**n, "items_counted": "index"} == by_fp[n["fingerprint"]]


def test_info_shows_stored_rows_and_counts_where_a_file_records_none(tmp_path, two, capsys):
    skip_without_xattrs(tmp_path)
    a, b = two
    assert main(["info", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["FINGERPRINT", "ITEMS", "SIZE"] and "IN USE BY" in lines[0]
    assert {line.split()[0]: line.split()[1] for line in lines[1:3]} == {a.fp[:12]: "15", b.fp[:12]: "20"}
    assert "items: rows stored" in out and "--items counts distinct items" in out
    assert main(["info", str(tmp_path / "cache"), "--namespace", a.fp[:8]]) == 0  # details count them
    assert "items:      15" in capsys.readouterr().out

    os.removexattr(a.path / files(a.path, "shard-")[0], fileset.ROWS_XATTR)  # as if copied without it
    assert main(["info", str(tmp_path / "cache"), "--json"]) == 0
    got = {
        n["fingerprint"]: (n["items"], n["items_counted"])
        for n in json.loads(capsys.readouterr().out)["namespaces"]
    }
    assert got == {a.fp: (15, "index"), b.fp: (20, "rows")}


@pytest.mark.timeout(120)
def test_info_namespace_details_and_one_folder(tmp_path, two):
    a, b = two
    set_last_used(a.path, time.time() - 3 * DAY)
    detail, one, empty = run_many(tmp_path, [
        ("module", ["info", tmp_path / "cache", "--namespace", a.fp[:8]]),
        ("script", ["info", b.path, "--json"]),
        ("script", ["info", tmp_path, "--json"]),
    ])  # fmt: skip
    assert detail.returncode == 0, detail.stderr
    out = detail.stdout
    assert a.fp in out and f"namespace {b.fp}" not in out
    assert f"differs from {b.fp[:12]} in transform" in out and "transform.scale: 3.0 -> 2.0" in out
    assert "3d ago" in out and "from last_used" in out
    assert "items:      15" in out and "0 merged, 2 shards" in out

    assert one.returncode == 0, one.stderr
    (ns,) = json.loads(one.stdout)["namespaces"]  # PATH is one namespace folder
    assert ns["fingerprint"] == b.fp and ns["differs_from"]["fingerprint"] == a.fp  # siblings beside it

    assert empty.returncode == 0 and json.loads(empty.stdout)["namespaces"] == []


# ----------------------------------------------------------------------------- verify


@pytest.mark.timeout(120)
def test_verify_ok_then_corrupt_keys_listed(tmp_path, two):
    a, b = two
    ok = run(tmp_path, "verify", tmp_path / "cache", "--progress")
    assert ok.returncode == 0, ok.stderr
    assert "verifying" in ok.stderr and "35/35" in ok.stderr  # the tqdm bar, on stderr
    assert [line.split()[-1] for line in ok.stdout.splitlines()[1:]] == ["ok", "ok"]

    shard = a.path / files(a.path, "shard-")[0]
    bad = sorted({flip_payload_byte(shard, 2), flip_payload_byte(shard, 5)})
    (merged,) = files(b.path, "merged-")
    data = (b.path / merged).read_bytes()
    (b.path / merged).write_bytes(data[: len(data) // 2])  # truncated: cannot be opened

    text, js = run_many(tmp_path, [("script", ["verify", tmp_path / "cache"]),
                                   ("module", ["verify", tmp_path / "cache", "--json"])])  # fmt: skip
    assert text.returncode == 1 and js.returncode == 1
    assert f"{shard}: 2 corrupt item(s)" in text.stdout
    for key in bad:
        assert f"key {key}: checksum mismatch" in text.stdout
    assert str(b.path / merged) in text.stdout and "unreadable file" in text.stdout
    assert "2 corrupt item(s) and 1 unreadable file(s)" in text.stderr

    data = json.loads(js.stdout)
    assert data["ok"] is False
    problems = {n["fingerprint"]: n["problems"] for n in data["namespaces"]}
    assert sorted(p["key"] for p in problems[a.fp]) == bad
    assert {p["file"] for p in problems[a.fp]} == {str(shard)}
    assert problems[b.fp] == [
        {"file": str(b.path / merged), "key": None, "reason": problems[b.fp][0]["reason"], "unchecked": False}
    ]
    assert problems[b.fp][0]["reason"].startswith("unreadable file: ")


# ----------------------------------------------------------------------------- merge


@pytest.mark.timeout(120)
def test_merge_leaves_one_file_keeps_compression_and_serves_readers(tmp_path):
    cache = tmp_path / "cache"
    a = build(cache, 2.0, items=15, shards=3, compression="gzip")
    c = build(cache, 4.0, items=12, shards=2)
    reader = a.fresh()  # a "training job" holding the shards open
    want = [reader[i] for i in range(15)]
    calls = count_calls(a.log)
    out = run(tmp_path, "merge", cache)
    assert out.returncode == 0, out.stderr
    assert "merged" in out.stdout and "3 files into merged-000001.h5" in out.stdout
    for built, comp in ((a, "gzip"), (c, None)):
        assert files(built.path, "shard-") == [] and files(built.path, "merged-") == ["merged-000001.h5"]
        with h5py.File(built.path / "merged-000001.h5", "r", locking=False) as f:
            assert f["data"].compression == comp
    for i in range(15):  # the open reader moves over to the merged file, nothing recomputed
        assert_same(reader[i], want[i], f"item {i}")
    fresh = a.fresh()
    for i in range(15):
        assert_same(fresh[i], want[i], f"item {i}")
    assert count_calls(a.log) == calls
    assert fresh.num_cached == 15

    again = run(tmp_path, "merge", cache, "--json")
    assert again.returncode == 0
    assert {n["status"] for n in json.loads(again.stdout)["namespaces"]} == {"nothing"}


@pytest.mark.timeout(120)
def test_merge_busy_lock_exits_1(tmp_path):
    a = build(tmp_path / "cache", 2.0, items=10, shards=2)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    (a.path / "merge.lock").write_text(json.dumps(owner))  # a live process merges
    out = run(tmp_path, "merge", tmp_path / "cache", "--wait", "1s")
    assert out.returncode == 1
    assert "busy" in out.stdout and "merge.lock" in out.stderr
    assert len(files(a.path, "shard-")) == 2


# ----------------------------------------------------------------------------- clear


@pytest.mark.timeout(120)
def test_clear_refuses_without_terminal_then_deletes(tmp_path, two):
    a, b = two
    refused, bad_fp = run_many(tmp_path, [("script", ["clear", tmp_path / "cache"]),
                                          ("script", ["clear", tmp_path / "cache", "-n", "zzzz", "--yes"])])  # fmt: skip
    assert refused.returncode == 2
    assert "stdin is not a terminal" in refused.stderr and "--yes" in refused.stderr
    assert bad_fp.returncode == 2 and "no namespace 'zzzz'" in bad_fp.stderr
    assert a.path.exists() and b.path.exists()

    one = run(tmp_path, "clear", tmp_path / "cache", "--namespace", a.fp[:10], "--yes")
    assert one.returncode == 0, one.stderr
    assert not a.path.exists() and b.path.exists() and f"deleted {a.fp[:12]}" in one.stdout
    rest = run(tmp_path, "clear", tmp_path / "cache", "--yes", "--json")
    assert rest.returncode == 0 and json.loads(rest.stdout)["deleted"] == [b.fp]
    assert not b.path.exists() and (tmp_path / "cache").exists()
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no .deleting-* leftovers


@pytest.mark.timeout(120)
def test_clear_asks_on_a_terminal(tmp_path):
    a = build(tmp_path / "cache", 2.0, items=4)

    def answer(text: bytes) -> subprocess.CompletedProcess:
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen([*RUNNERS["script"], "clear", str(tmp_path / "cache")], stdin=slave,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))  # fmt: skip
            os.write(master, text)
            stdout, stderr = proc.communicate(timeout=100)
        finally:
            os.close(slave)
            os.close(master)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    no = answer(b"n\n")
    assert no.returncode == 1 and "[y/N]" in no.stderr and "nothing deleted" in no.stderr
    assert a.path.exists()
    yes = answer(b"y\n")
    assert yes.returncode == 0, yes.stderr
    assert not a.path.exists()


# ----------------------------------------------------------------------------- prune


@pytest.fixture
def three(tmp_path):
    """Namespaces last used 10 days, 3 days and 1 hour ago (oldest first), no longer in use
    (their datasets released their leases)."""
    cache = tmp_path / "cache"
    now = time.time()
    out = [dataclasses.replace(build(cache, s, items=6), ds=None) for s in (1.0, 2.0, 3.0)]
    gc.collect()
    for built, age in zip(out, (10 * DAY, 3 * DAY, 3600)):
        assert not list(built.path.glob("lease-*"))
        set_last_used(built.path, now - age)
    return out


@pytest.mark.timeout(120)
def test_prune_older_than_and_dry_run(tmp_path, three):
    old, mid, new = three
    dry = run(tmp_path, "prune", tmp_path / "cache", "--older-than", "7d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert old.fp[:12] in dry.stdout and "would remove 1 namespace(s)" in dry.stdout
    assert "unused for 10d" in dry.stdout
    assert all(b.path.exists() for b in three)

    real = run(tmp_path, "prune", tmp_path / "cache", "--older-than", "7d")
    assert real.returncode == 0, real.stderr
    assert "removed 1 namespace(s)" in real.stdout
    assert not old.path.exists() and mid.path.exists() and new.path.exists()


@pytest.mark.timeout(120)
def test_prune_max_bytes_least_recently_used_first(tmp_path, three):
    old, mid, new = three
    sizes = {b.fp: inspect_namespace(b.path).bytes for b in three}
    limit = sizes[new.fp] + sizes[mid.fp] // 2  # room for the newest only
    dry, real = (
        run(tmp_path, "prune", tmp_path / "cache", "--max-bytes", f"{limit}B", "--json", *extra)
        for extra in (["--dry-run"], [])
    )
    for out in (dry, real):
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert [r["fingerprint"] for r in data["removed"]] == [old.fp, mid.fp]  # LRU order
        assert [k["fingerprint"] for k in data["kept"]] == [new.fp]
        assert data["freed_bytes"] == sizes[old.fp] + sizes[mid.fp]
    assert json.loads(dry.stdout)["dry_run"] is True
    assert not old.path.exists() and not mid.path.exists() and new.path.exists()


@pytest.mark.timeout(120)
def test_prune_keeps_a_namespace_that_a_running_job_uses(tmp_path, three):
    old, mid, new = three
    job = old.fresh()  # a training job opens the oldest namespace again: it holds a lease
    set_last_used(old.path, time.time() - 10 * DAY)
    out = run(tmp_path, "prune", tmp_path / "cache", "--older-than", "2d")
    assert out.returncode == 0, out.stderr
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert f"kept {old.fp[:12]}" in out.stdout and f"in use by {me}" in out.stdout
    assert "removed 1 namespace(s)" in out.stdout
    assert old.path.exists() and not mid.path.exists() and new.path.exists()
    assert job.num_cached == 6
    del job
    gc.collect()  # the job ends: its lease goes, and the next prune takes the namespace
    again = run(tmp_path, "prune", tmp_path / "cache", "--older-than", "2d", "--json")
    assert [r["fingerprint"] for r in json.loads(again.stdout)["removed"]] == [old.fp]
    assert not old.path.exists()


# ----------------------------------------------------------------------------- help, usage errors


COMMANDS = ["info", "verify", "merge", "clear", "prune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand_has_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cachedata {command} ")
    assert "example:" in out and f"cachedata {command} " in out.split("example:", 1)[1]
    assert "exit status" in out and "usage error" in out


@pytest.mark.timeout(120)
def test_help_through_the_script_and_module(tmp_path):
    outs = run_many(
        tmp_path, [("script", ["--help"]), ("module", ["--help"]), ("script", ["prune", "--help"])]
    )
    for out in outs:
        assert out.returncode == 0, out.stderr
        assert "example" in out.stdout and "exit status" in out.stdout, out.args
    assert outs[0].stdout.startswith("usage: cachedata ") and "COMMAND" in outs[0].stdout
    for name in COMMANDS:
        assert f"    {name} " in outs[0].stdout  # every subcommand listed with its summary
    assert outs[1].stdout.startswith("usage: python -m cachedata ")
    assert "cachedata prune ~/.cache/cachedata --max-bytes 50G --dry-run" in outs[2].stdout


def _usage_cases(tmp_path: Path, a: Built) -> list[tuple[list, str]]:
    cache = tmp_path / "cache"
    missing = tmp_path / "nope"
    return [
        (["info", missing], f"PATH {missing} does not exist"),
        (
            ["prune", cache, "--max-bytes", "50X"],
            "invalid size '50X': expected a number with an optional unit",
        ),
        (["prune", cache, "--older-than", "7"], "invalid duration '7': 7 has no unit; write e.g. 7d"),
        (["info", cache, "--bogus"], "unrecognized arguments: --bogus"),
        (["prune", cache], "give --older-than DURATION, --max-bytes SIZE or both"),
        # the rest only in-process (each subprocess pays the torch import)
        (["verify", missing], "does not exist"),
        (["merge", a.path / "meta.json"], "is not a folder"),
        (["prune", cache, "--max-bytes=-5G"], "invalid size '-5G'"),
        (["prune", cache, "--older-than", "soon"], "invalid duration 'soon'"),
        (["merge", cache, "--wait", "5"], "5 has no unit"),
        (["info", cache, "--namespace", "zzzz"], "no namespace 'zzzz'"),
        (["info", cache, "--namespace", ""], "matches 2 namespaces"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
        (["clear"], "required: PATH"),
    ]


@pytest.mark.timeout(120)
def test_usage_errors_exit_2(tmp_path, two):
    a, _ = two
    cases = _usage_cases(tmp_path, a)[:5]
    outs = run_many(tmp_path, [("module" if i == 0 else "script", args) for i, (args, _) in enumerate(cases)])
    for (args, message), out in zip(cases, outs):
        assert out.returncode == 2, (args, out.returncode, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "usage:" in out.stderr and out.stdout == "", args
    assert a.path.exists()


def test_usage_errors_exit_2_in_process(tmp_path, two, capsys):
    a, _ = two
    for args, message in _usage_cases(tmp_path, a):
        assert main([str(x) for x in args]) == 2, args
        out = capsys.readouterr()
        assert message in out.err and "usage:" in out.err and out.out == "", (args, out.err)


def test_verify_reports_symlinked_cache_files(tmp_path):
    b = build(tmp_path / "cache", 3.0, items=4)
    (shard,) = files(b.path, "shard-")
    link = b.path / "shard-r0-w0-p1-abcdef-000000.h5"
    link.symlink_to(b.path / shard)
    result = verify_namespace(b.path)
    assert result.files == 1 and result.items == 4
    assert result.problems == (Problem(str(link), None, "a symbolic link: readers ignore it; delete it"),)
