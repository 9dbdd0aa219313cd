"""cachedata.keys: file_stat and file_sha256 change when a file is replaced at the same path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachedata.keys import file_sha256, file_stat


def _write(path: Path, data: bytes, *, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_replacing_a_file_changes_both_keys(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    _write(f, b"first version", mtime_ns=1_700_000_000_000_000_000)
    stat1, sha1 = file_stat(f), file_sha256(f)
    # Same size, different content, different mtime: a re-exported file.
    replacement = tmp_path / "new.bin"
    _write(replacement, b"second versio", mtime_ns=1_700_000_001_000_000_000)
    os.replace(replacement, f)
    assert file_stat(f) != stat1
    assert file_sha256(f) != sha1


def test_same_content_new_mtime_changes_stat_only(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    _write(f, b"payload", mtime_ns=1_700_000_000_000_000_000)
    stat1, sha1 = file_stat(f), file_sha256(f)
    os.utime(f, ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))
    assert file_stat(f) != stat1
    assert file_sha256(f) == sha1


def test_keys_are_stable_and_path_spelling_independent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "a.bin"
    _write(f, b"x" * 10, mtime_ns=1_700_000_000_000_000_000)
    monkeypatch.chdir(tmp_path)
    assert file_stat("a.bin") == file_stat(f) == file_stat(str(f))
    assert file_sha256("a.bin") == file_sha256(f)
    assert len(file_stat(f)) == 64 and int(file_stat(f), 16) >= 0


def test_sha256_streams_large_files(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * (1 << 20) + 123)  # spans several 1 MiB blocks
    f = tmp_path / "big.bin"
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()


def test_same_content_at_another_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    _write(a, b"same", mtime_ns=1_700_000_000_000_000_000)
    _write(b, b"same", mtime_ns=1_700_000_000_000_000_000)
    assert file_sha256(a) == file_sha256(b)
    assert file_stat(a) != file_stat(b)


@pytest.mark.parametrize("fn", [file_stat, file_sha256])
def test_missing_file_names_the_path(tmp_path: Path, fn) -> None:
    missing = tmp_path / "nope" / "missing.wav"
    with pytest.raises(FileNotFoundError, match=r"missing\.wav"):
        fn(missing)


@pytest.mark.parametrize("fn", [file_stat, file_sha256])
def test_directory_is_rejected(tmp_path: Path, fn) -> None:
    with pytest.raises(IsADirectoryError, match=str(tmp_path.name)):
        fn(tmp_path)
