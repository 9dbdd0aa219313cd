"""Per-item ``key=`` helpers for datasets backed by files.

``CachedDataset(..., key=lambda i: file_stat(paths[i]))`` makes an item's cache
key change when its file is replaced at the same path, so a re-exported image or
re-recorded clip is recomputed instead of served stale.

Which one to use:

- ``file_stat`` reads only the file's metadata (absolute path, size, mtime in
  nanoseconds): cheap enough to call on every access, even for millions of
  files. It also changes when a file is merely touched or copied without
  preserving times (a false miss costs one recomputation, never stale data).
- ``file_sha256`` reads the whole file: exact (content only; path and times do
  not matter, so moving or re-copying a dataset keeps its cache), but it costs a
  full read per call. Prefer it when files are small or the transform is
  expensive, or precompute the keys once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "file_stat"]

_BLOCK = 1 << 20  # 1 MiB: streams large files without loading them whole


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"cachedata.keys: no such file {str(p)!r} (absolute: {str(p.absolute())!r})")
    if p.is_dir():
        raise IsADirectoryError(f"cachedata.keys: {str(p)!r} is a directory; keys are built from files")
    return p


def file_stat(path: str | os.PathLike[str]) -> str:
    """Stable key from (absolute path, size, mtime_ns): cheap, changes when the file is replaced.

    The path is made absolute (symlinks resolved) so the same file reached through
    different relative paths gets the same key. The result is a hex SHA-256 of the triple.
    """
    p = _resolve(path).resolve()
    st = p.stat()
    token = f"{p}\x00{st.st_size}\x00{st.st_mtime_ns}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(token).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file's content (streamed in 1 MiB blocks): exact, costs a full read."""
    p = _resolve(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()
