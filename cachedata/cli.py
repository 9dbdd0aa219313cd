"""The ``cachedata`` command line: inspect, verify, merge, clear and prune cache folders.

Every subcommand takes a PATH that is either a cache_dir (a folder of namespace folders)
or one namespace folder, prints an aligned table (``--json`` prints JSON to stdout
instead), and exits with:

* 0: success (``verify``: every item passed its checksum);
* 1: failure (corrupt or unreadable items found, a namespace could not be merged or
  deleted, an I/O error);
* 2: usage error (an unknown option, a bad size or duration, a PATH that does not exist,
  an unknown or ambiguous ``--namespace``, ``clear`` without ``--yes`` off a terminal).

Sizes are read and written like ``50G``, ``512M`` or ``1.5T`` (K, M, G, T, P are powers of
1024; KB, MB, GB, ... powers of 1000), durations like ``7d``, ``12h``, ``30m``, ``45s``
or ``1d12h``. This module is the only place in cachedata that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import budget as budget_mod
from . import fileset, metadata
from . import schema as schema_mod
from ._version import __version__
from .fingerprint import diff_trees
from .namespace import Identity, Store
from .paths import default_cache_dir
from .storage import FORMAT_VERSION, CorruptFile, FileIndex, Reader, checksum, read_index
from .units import format_size, parse_size

logger = logging.getLogger("cachedata")

#: Width of a fingerprint in tables (the full one is in --json and in folder names).
SHORT_FP = 12
#: Payload bytes read at once by ``verify`` (several small items per read).
_VERIFY_SPAN_BYTES = 8 * 1024 * 1024
#: A merge.lock younger than this (seconds) marks a namespace as being merged right now.
#: Bad keys listed per file in the table output of ``verify`` (--json lists them all).
_MAX_LISTED_KEYS = 50


# ============================================================================ sizes, durations

_DURATION_TOKEN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)
_DURATION_UNITS: dict[str, int] = {}
for _names, _seconds in (
    (("s", "sec", "secs", "second", "seconds"), 1),
    (("m", "min", "mins", "minute", "minutes"), 60),
    (("h", "hr", "hrs", "hour", "hours"), 3600),
    (("d", "day", "days"), 86400),
    (("w", "wk", "wks", "week", "weeks"), 7 * 86400),
):
    _DURATION_UNITS.update(dict.fromkeys(_names, _seconds))
_DURATION_HELP = "a number with a unit s, m, h, d or w, e.g. 7d, 12h, 30m, 45s, 1d12h"


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``7d``, ``12h``, ``30m``, ``45s``, ``1.5h`` or ``1d12h``.

    Every number needs a unit (s, m, h, d, w; also sec, min, hours, days, weeks...).
    Raises ValueError naming the text and the expected form.
    """
    total = 0.0
    pos = 0
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    for m in _DURATION_TOKEN.finditer(stripped):
        if stripped[pos : m.start()].strip():
            break
        unit = m.group(2).lower()
        if not unit:
            raise ValueError(f"invalid duration {text!r}: {m.group(1)} has no unit; write e.g. {m.group(1)}d")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"invalid duration {text!r}: unknown unit {unit!r}; expected {_DURATION_HELP}")
        total += float(m.group(1)) * _DURATION_UNITS[unit]
        pos = m.end()
    if pos == 0 or stripped[pos:].strip():
        raise ValueError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    return total


def format_duration(seconds: float, parts: int | None = 2) -> str:
    """Whole seconds as ``3d4h``, ``2h30m``, ``45s`` (at most ``parts`` units; None: all, exact).

    The units shown are the largest one present and the ones right below it, so the text
    is at most 1/24 short of ``seconds``; fractions of a second are dropped.
    """
    left = max(0, int(seconds))
    counts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        counts.append((count, unit))
    first = next((i for i, (count, _) in enumerate(counts) if count), len(counts))
    shown = counts[first:] if parts is None else counts[first : first + parts]
    return "".join(f"{count}{unit}" for count, unit in shown if count) or "0s"


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ============================================================================ errors


class UsageError(Exception):
    """Bad input from the command line (exit code 2)."""


# ============================================================================ namespaces on disk


@dataclass(frozen=True)
class NamespaceInfo:
    """One namespace folder as ``info`` shows it (sizes in bytes, times in Unix seconds)."""

    path: str
    fingerprint: str
    items: int | None  # distinct items readable from its files; None when not counted
    bytes: int  # apparent size of every file in the folder
    merged_files: int
    shard_files: int
    dataset_type: str | None
    dataset_len: int | None
    dataset_fingerprint: str | None
    transform_repr: str | None
    transform_fingerprint: str | None
    version: str | None  # the user's version= string
    key: str | None  # "index" or "custom"
    versions: dict[str, str]
    created: float | None
    last_used: float
    last_used_from: str  # "last_used" (its mtime) or "files" (the newest file's mtime)
    merging: bool  # a fresh merge.lock is present
    format: int | None = None  # meta.json's cachedata_format (None when unknown)
    tree: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def short(self) -> str:
        return self.fingerprint[:SHORT_FP]


@dataclass(frozen=True)
class Difference:
    """How a namespace differs from its nearest sibling of the same dataset type."""

    fingerprint: str  # the sibling's
    parts: tuple[str, ...]  # which fingerprint inputs differ: dataset, transform, version, key
    changes: tuple[str, ...]  # ``path: old -> new`` lines from the fingerprint trees


def is_namespace(path: Path) -> bool:
    """True for a folder holding meta.json, schema.json or cache files."""
    try:
        if not path.is_dir():
            return False
        if (path / "meta.json").is_file() or (path / "schema.json").is_file():
            return True
        with os.scandir(path) as it:
            return any(fileset.is_data_file(e.name) for e in it)
    except OSError:
        return False


def find_namespaces(path: Path) -> list[Path]:
    """``path`` itself when it is a namespace folder, else its namespace subfolders, sorted."""
    if is_namespace(path):
        return [path]
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and is_namespace(p))


@dataclass(frozen=True)
class CacheFolder:
    """A folder of namespaces (a cache_dir) found below the PATH given to ``info``."""

    path: str
    namespaces: int
    bytes: int


def find_cache_folders(path: Path) -> list[CacheFolder]:
    """Subfolders of ``path`` that hold namespaces: ``path`` is then a folder of cache folders."""
    found = []
    try:
        subs = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []
    for sub in subs:
        try:
            namespaces = find_namespaces(sub)
        except OSError:
            continue
        if namespaces:
            size = sum(inspect_namespace(p, items=False).bytes for p in namespaces)
            found.append(CacheFolder(str(sub), len(namespaces), size))
    return found


def _no_namespaces_text(path: Path, folders: Sequence[CacheFolder]) -> str:
    """What ``info`` says when PATH holds no namespace: the cache folders below it, or what it expected."""
    if folders:
        rows = [[f.path, str(f.namespaces), format_size(f.bytes)] for f in folders]
        table = render_table(["CACHE FOLDER", "NAMESPACES", "SIZE"], rows, right=(1, 2))
        return (
            f"no namespaces directly under {path}; it holds {len(folders)} cache folder(s):\n{table}\n"
            f"run `cachedata info FOLDER` on one of them"
        )
    return (
        f"no namespaces under {path}: expected a cache_dir (the folder given to CachedDataset, holding "
        "one folder per namespace named by its 64-hex fingerprint, with meta.json, schema.json and .h5 "
        "files), one namespace folder, or a folder of cache_dirs"
    )


def select_namespace(namespaces: list[Path], prefix: str, where: Path) -> Path:
    """The namespace whose fingerprint starts with ``prefix``; UsageError if none or several."""
    hits = [p for p in namespaces if p.name.startswith(prefix)]
    if not hits:
        raise UsageError(
            f"no namespace {prefix!r} under {where}; `cachedata info {where}` lists the fingerprints"
        )
    if len(hits) > 1:
        names = ", ".join(p.name[:SHORT_FP] for p in hits)
        raise UsageError(
            f"--namespace {prefix!r} matches {len(hits)} namespaces ({names}); give more characters"
        )
    return hits[0]


def read_meta(path: Path) -> dict:
    """A namespace's meta.json, or {} when missing or unreadable."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def list_cache_files(path: Path) -> tuple[list[str], list[str]]:
    """(merged file names by generation, shard file names) in a namespace folder.

    Symbolic links are left out, as readers ignore them (see ``linked_cache_files``).
    """
    listing = fileset.list_files(path)
    return [f.name for f in listing.runs], [f.name for f in listing.shards]


def linked_cache_files(path: Path) -> list[str]:
    """Names of symbolic links in a namespace folder named like cache files (never created by cachedata)."""
    return list(fileset.list_files(path).links)


def _file_stats(path: Path) -> tuple[int, float | None, float | None]:
    """(total bytes, oldest mtime, newest mtime) of the regular files under ``path``."""
    total, oldest, newest = 0, None, None
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # merged away while we looked
            total += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return total, oldest, newest


def _last_used(path: Path, newest_file: float | None) -> tuple[float, str]:
    try:
        return (path / "last_used").stat().st_mtime, "last_used"
    except OSError:
        pass
    if newest_file is not None:
        return newest_file, "files"
    return path.stat().st_mtime, "files"


def _merging(path: Path) -> bool:
    return fileset.locked(path)


def count_items(path: Path, meta: dict) -> int:
    """Distinct items a reader gets from the namespace's files (unreadable files count 0)."""
    store = Store(path, path.name, compression=None)
    try:
        return store.count()
    finally:
        store.close()


def inspect_namespace(path: Path, *, items: bool = True) -> NamespaceInfo:
    """Describe one namespace folder; ``items=False`` skips loading the file indexes."""
    meta = read_meta(path)
    merged, shards = list_cache_files(path)
    nbytes, oldest, newest = _file_stats(path)
    last_used, source = _last_used(path, newest)
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    transform = meta.get("transform") if isinstance(meta.get("transform"), dict) else {}
    created = meta.get("created")
    return NamespaceInfo(
        path=str(path),
        fingerprint=path.name,
        items=count_items(path, meta) if items else None,
        bytes=nbytes,
        merged_files=len(merged),
        shard_files=len(shards),
        dataset_type=dataset.get("type"),
        dataset_len=dataset.get("len"),
        dataset_fingerprint=dataset.get("fingerprint"),
        transform_repr=transform.get("repr"),
        transform_fingerprint=transform.get("fingerprint"),
        version=meta.get("version"),
        key=meta.get("key"),
        versions={str(k): str(v) for k, v in (meta.get("versions") or {}).items()},
        created=float(created) if isinstance(created, (int, float)) else oldest,
        last_used=last_used,
        last_used_from=source,
        merging=_merging(path),
        format=meta.get("cachedata_format") if isinstance(meta.get("cachedata_format"), int) else None,
        tree=meta.get("tree") if isinstance(meta.get("tree"), dict) else {},
    )


def nearest_sibling(info: NamespaceInfo, others: Sequence[NamespaceInfo]) -> Difference | None:
    """The sibling of the same dataset type whose fingerprint tree differs least, or None."""
    best: Difference | None = None
    for other in others:
        if other.fingerprint == info.fingerprint or other.dataset_type != info.dataset_type:
            continue
        if info.dataset_type is None:
            continue
        changes = tuple(diff_trees(other.tree, info.tree))
        if best is None or len(changes) < len(best.changes):
            parts = tuple(
                name
                for name, a, b in (
                    ("dataset", other.dataset_fingerprint, info.dataset_fingerprint),
                    ("transform", other.transform_fingerprint, info.transform_fingerprint),
                    ("version", other.version, info.version),
                    ("key", other.key, info.key),
                )
                if a != b
            )
            best = Difference(other.fingerprint, parts, changes)
    return best


# ============================================================================ verify


@dataclass(frozen=True)
class Problem:
    """One corrupt item (``key`` set) or one unreadable file (``key`` None)."""

    file: str
    key: int | None
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found in one namespace."""

    fingerprint: str
    path: str
    files: int  # cache files checked
    items: int  # index rows checked (an item in a shard and a merged file counts twice)
    vanished: int  # files merged away while verify ran (their items are in the new file)
    problems: tuple[Problem, ...]
    repaired: tuple[str, ...] = ()  # damaged meta.json/schema.json and what was done about it

    @property
    def ok(self) -> bool:
        return not self.problems


def _normalized_schema(text: str) -> str:
    return schema_mod.dumps(schema_mod.load(text))


def _namespace_schema(path: Path) -> str | None:
    try:
        return _normalized_schema((path / "schema.json").read_text())
    except (OSError, ValueError):
        return None


def _load_file(path: Path, fingerprint: str, schema: str | None) -> FileIndex | Problem | None:
    """A file's index, a Problem when it cannot be trusted, or None when it vanished."""
    try:
        fi = read_index(path, namespace=fingerprint)
    except FileNotFoundError:
        return None
    except CorruptFile as exc:
        if not path.exists():
            return None
        return Problem(str(path), None, f"unreadable file: {str(exc).removeprefix(f'{path}: ')}")
    if schema is not None:
        try:
            same = _normalized_schema(fi.schema) == schema
        except ValueError as exc:
            return Problem(str(path), None, f"unreadable item schema: {exc}")
        if not same:
            return Problem(str(path), None, "its item schema differs from the namespace's schema.json")
    return fi


def _spans(fi: FileIndex, limit: int = _VERIFY_SPAN_BYTES) -> Iterator[list[int]]:
    """Rows grouped by position in /data, each group spanning at most ``limit`` bytes."""
    order = np.argsort(fi.offsets, kind="stable").tolist()
    offsets, sizes = fi.offsets.tolist(), fi.sizes.tolist()
    group: list[int] = []
    start = 0
    for r in order:
        if group and offsets[r] + sizes[r] - start > limit:
            yield group
            group = []
        if not group:
            start = offsets[r]
        group.append(r)
    if group:
        yield group


def _check_rows(reader: Reader, fi: FileIndex, rows: list[int]) -> list[Problem]:
    """Read ``rows``' payloads in one go and compare each with its checksum."""
    lo = int(fi.offsets[rows[0]])
    hi = max(int(fi.offsets[r] + fi.sizes[r]) for r in rows)
    buf = bytearray(hi - lo)
    try:
        reader.read_into(memoryview(buf), lo)
    except FileNotFoundError:
        raise
    except (OSError, CorruptFile) as exc:
        if len(rows) > 1:  # find out which items are affected
            return [p for r in rows for p in _check_rows(reader, fi, [r])]
        return [Problem(str(fi.path), int(fi.keys[rows[0]]), f"unreadable bytes: {exc}")]
    view = memoryview(buf)
    problems = []
    for r in rows:
        key, off, size = int(fi.keys[r]), int(fi.offsets[r]) - lo, int(fi.sizes[r])
        if checksum(key, view[off : off + size], fi.slots[r].tolist()) != int(fi.checksums[r]):
            problems.append(Problem(str(fi.path), key, "checksum mismatch"))
    return problems


def _check_file(fi: FileIndex, progress: Any) -> list[Problem] | None:
    """Check every payload of one file; None when it vanished before it could be opened."""
    reader = Reader(fi)
    problems: list[Problem] = []
    try:
        for rows in _spans(fi):
            problems += _check_rows(reader, fi, rows)
            progress.update(len(rows))
    except FileNotFoundError:
        return None
    finally:
        reader.close()
    return problems


def count_rows(path: Path) -> int:
    """Index rows in a namespace's cache files, for a progress total (unreadable files: 0)."""
    total = 0
    merged, shards = list_cache_files(path)
    for name in merged + shards:
        try:
            with h5py.File(path / name, "r", locking=False) as f:
                total += int(f["index/key"].shape[0])
        except Exception:  # h5py raises many types for a damaged file; verify reports it
            continue
    return total


def verify_namespace(path: Path, progress: Any) -> VerifyResult:
    """Check every item of every cache file in a namespace folder against its checksum.

    ``progress`` (a tqdm bar) advances by one per item; its total should already include
    ``count_rows(path)``. Files that appear while this runs (a concurrent merge) are checked
    too and added to the total; files merged away before they could be opened are counted
    as ``vanished``.
    """
    repaired = tuple(str(r) for r in metadata.repair(path))  # schema.json first: it is checked below
    schema = _namespace_schema(path)
    done: set[str] = set()
    files = items = vanished = 0
    problems: list[Problem] = []
    for round_ in range(4):
        merged, shards = list_cache_files(path)
        todo = [n for n in merged + shards if n not in done]
        if not todo:
            break
        loaded = [(n, _load_file(path / n, path.name, schema)) for n in todo]
        if round_:
            progress.total = (progress.total or 0) + sum(
                len(x.keys) for _, x in loaded if isinstance(x, FileIndex)
            )
            progress.refresh()
        for name, x in loaded:
            done.add(name)
            if x is None:
                vanished += 1
            elif isinstance(x, Problem):
                files += 1
                problems.append(x)
            else:
                found = _check_file(x, progress)
                if found is None:
                    vanished += 1
                else:
                    files += 1
                    items += len(x.keys)
                    problems += found
    for name in linked_cache_files(path):
        problems.append(Problem(str(path / name), None, "a symbolic link: readers ignore it; delete it"))
    return VerifyResult(path.name, str(path), files, items, vanished, tuple(problems), repaired)


# ============================================================================ merge


@dataclass(frozen=True)
class MergeResult:
    """What ``merge`` did to one namespace."""

    fingerprint: str
    path: str
    status: str  # merged | nothing | busy | failed
    files_before: int
    files_after: int
    items: int
    dropped: int  # items left out because their bytes failed the checksum
    merged_file: str | None
    message: str


def _compression_of(path: Path, names: list[str]) -> str | None:
    """The compression filter of an existing file's /data (gzip or lzf), so a merge keeps it."""
    for name in names:
        try:
            with h5py.File(path / name, "r", locking=False) as f:
                comp = f["data"].compression
        except (OSError, KeyError):
            continue
        return comp if comp in ("gzip", "lzf") else None
    return None


def merge_namespace(path: Path, *, wait: float, progress: bool, full: bool = False) -> MergeResult:
    """Merge the shards of one namespace with Store.consolidate (under merge.lock, reader-safe);
    ``full`` rewrites every file into one."""
    merged, shards = list_cache_files(path)
    before = len(merged) + len(shards)

    def result(status: str, items: int, dropped: int = 0, message: str = "") -> MergeResult:
        m_after, s_after = list_cache_files(path)
        return MergeResult(path.name, str(path), status, before, len(m_after) + len(s_after), items,
                           dropped, m_after[-1] if m_after else None, message)  # fmt: skip

    meta = read_meta(path)
    if not shards and (len(merged) <= 1 or not full):
        return result("nothing", count_items(path, meta), message="no shards to merge")
    store = Store(path, path.name, compression=_compression_of(path, list(reversed(merged)) + shards))
    try:
        count = store.count()
        done = store.consolidate(Identity(0, None, os.getpid()), wait=wait, full=full, progress=progress)
        after = store.count()
    finally:
        store.close()
    if done:
        dropped = max(0, count - after)
        note = f"; left out {dropped} corrupt item(s), recomputed on next use" if dropped else ""
        return result("merged", after, dropped, f"{before} files into {list_cache_files(path)[0][-1]}{note}")
    if _merging(path):
        return result(
            "busy", count, message=f"another process holds {path / 'merge.lock'} (waited {wait:g}s)"
        )
    if count == 0:
        return result("failed", 0, message="no readable cache file; `cachedata verify` shows why")
    return result("nothing", count, message="nothing to merge")


# ============================================================================ clear, prune


def delete_namespace(path: Path) -> None:
    """Delete a namespace folder: renamed away first (atomic), then removed."""
    if path.is_symlink():
        path.unlink()
        return
    doomed = path.with_name(f".deleting-{path.name}-{os.urandom(4).hex()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def plan_prune(
    infos: Sequence[NamespaceInfo], *, older_than: float | None, max_bytes: int | None, now: float
) -> tuple[list[tuple[NamespaceInfo, str]], list[NamespaceInfo]]:
    """(namespaces to remove with the reason, namespaces kept), least recently used first.

    ``older_than`` (seconds): remove those unused for longer. ``max_bytes``: then remove the
    least recently used until the rest fits. Namespaces being merged right now are kept.
    """
    keep = sorted(infos, key=lambda i: (i.last_used, i.fingerprint))
    remove: list[tuple[NamespaceInfo, str]] = []
    if older_than is not None:
        cutoff = now - older_than
        for info in keep:
            if info.last_used < cutoff and not info.merging:
                remove.append((info, f"unused for {format_duration(now - info.last_used)}"))
        gone = {i.fingerprint for i, _ in remove}
        keep = [i for i in keep if i.fingerprint not in gone]
    if max_bytes is not None:
        total = sum(i.bytes for i in keep)
        for info in list(keep):
            if total <= max_bytes:
                break
            if info.merging:
                continue
            remove.append((info, f"least recently used, over {format_size(max_bytes)}"))
            keep.remove(info)
            total -= info.bytes
    return remove, keep


# ============================================================================ output helpers


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns aligned with two spaces between them; columns in ``right`` right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join(line(r).rstrip() for r in [header, *rows])


def _when(t: float | None) -> str:
    return "?" if t is None else datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _ago(t: float, now: float) -> str:
    return "just now" if now - t < 1 else f"{format_duration(now - t, parts=1)} ago"


def _clip(text: str | None, width: int) -> str:
    text = "?" if text is None else " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _versions_text(versions: dict[str, str]) -> str:
    order = ["cachedata", "torch", "numpy", "h5py", "python"]
    names = [n for n in order if n in versions] + sorted(n for n in versions if n not in order)
    return " ".join(f"{n} {versions[n]}" for n in names) or "?"


def _dataset_text(info: NamespaceInfo) -> str:
    name = (info.dataset_type or "?").rsplit(".", 1)[-1]
    return f"{name} ({info.dataset_len})" if info.dataset_len is not None else name


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _progress_enabled(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


# ============================================================================ commands


def _resolve_path(args: argparse.Namespace) -> Path:
    path = Path(args.path).expanduser() if args.path is not None else default_cache_dir()
    if not path.exists():
        raise UsageError(f"PATH {path} does not exist; pass a cache_dir or one namespace folder in it")
    if not path.is_dir():
        raise UsageError(f"PATH {path} is not a folder; pass a cache_dir or one namespace folder in it")
    return path


def _targets(args: argparse.Namespace, path: Path) -> list[Path]:
    namespaces = find_namespaces(path)
    fp = getattr(args, "namespace", None)
    return [select_namespace(namespaces, fp, path)] if fp is not None else namespaces


def _info_json(info: NamespaceInfo, diff: Difference | None) -> dict:
    out = asdict(info)
    out.pop("tree")
    out["created_iso"] = _iso(info.created)
    out["last_used_iso"] = _iso(info.last_used)
    out["differs_from"] = asdict(diff) if diff is not None else None
    return out


def _info_rows(infos: Sequence[NamespaceInfo], now: float) -> list[list[str]]:
    return [
        [
            i.short,
            "?" if i.items is None else str(i.items),
            format_size(i.bytes),
            str(i.merged_files),
            str(i.shard_files),
            _dataset_text(i),
            _clip(i.transform_repr, 40),
            _when(i.created),
            _ago(i.last_used, now),
            _versions_text(i.versions),
        ]
        for i in infos
    ]


def _info_details(info: NamespaceInfo, diff: Difference | None, now: float) -> str:
    lines = [
        f"namespace {info.fingerprint}",
        f"  path:       {info.path}",
        f"  items:      {info.items}   files: {info.merged_files} merged, {info.shard_files} shards"
        f"   size: {format_size(info.bytes)} ({info.bytes} bytes)"
        + ("   (merging now)" if info.merging else ""),
        *(
            [
                f"  format:     {info.format}: written by another cachedata version and never read by "
                f"this one (format {FORMAT_VERSION}); `cachedata clear --namespace {info.short}` removes it"
            ]
            if info.format is not None and info.format != FORMAT_VERSION
            else []
        ),
        f"  dataset:    {info.dataset_type} (len {info.dataset_len}), key {info.key}, version {info.version!r}",
        f"  transform:  {info.transform_repr}",
        f"  versions:   {_versions_text(info.versions)}",
        f"  created:    {_when(info.created)}",
        f"  last used:  {_when(info.last_used)} ({_ago(info.last_used, now)}, from {info.last_used_from})",
    ]
    if diff is None:
        lines.append("  differs:    no other namespace of this dataset type")
    else:
        what = ", ".join(diff.parts) or "nothing recorded"
        lines.append(f"  differs from {diff.fingerprint[:SHORT_FP]} in {what} (its value -> this one's):")
        lines += [f"    {c}" for c in diff.changes] or ["    (no attribute-level difference recorded)"]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    path = _resolve_path(args)
    targets = _targets(args, path)
    now = time.time()
    infos = sorted((inspect_namespace(p) for p in targets), key=lambda i: -i.last_used)
    # Siblings live in the cache_dir: the parent when PATH (or --namespace) is one namespace.
    cache_dir = path.parent if is_namespace(path) else path
    shown = {i.fingerprint for i in infos}
    others = [inspect_namespace(p, items=False) for p in find_namespaces(cache_dir) if p.name not in shown]
    pool = [*infos, *others]
    diffs = {i.fingerprint: nearest_sibling(i, pool) for i in infos}
    usage, _ = _folder_usage(cache_dir)
    in_use = {n.fingerprint: [str(h) for h in n.live_holders] for n in usage.namespaces}
    folders = [] if infos else find_cache_folders(path)
    if args.json:
        found = [{**_info_json(i, diffs[i.fingerprint]), "in_use_by": in_use.get(i.fingerprint, [])}
                 for i in infos]  # fmt: skip
        out = {"path": str(path), "namespaces": found, "budget": _budget_json(usage)}
        if not infos:
            out["cache_folders"] = [asdict(f) for f in folders]
        _print_json(out)
        return 0
    if not infos:
        print(_no_namespaces_text(path, folders))
        print("\n".join(_budget_lines(usage)))
        return 0
    header = ["FINGERPRINT", "ITEMS", "SIZE", "MERGED", "SHARDS", "DATASET", "TRANSFORM", "CREATED",
              "LAST USED", "VERSIONS", "IN USE BY"]  # fmt: skip
    rows = [
        [*r, " ".join(in_use.get(i.fingerprint, [])) or "-"] for r, i in zip(_info_rows(infos, now), infos)
    ]
    print(render_table(header, rows, right=(1, 2, 3, 4)))
    total = sum(i.bytes for i in infos)
    print(f"\n{len(infos)} namespace(s), {format_size(total)} under {path}")
    print("\n".join(_budget_lines(usage)))
    if args.verbose or args.namespace is not None:
        for info in infos:
            print()
            print(_info_details(info, diffs[info.fingerprint], now))
    return 0


def _verify_text(results: Sequence[VerifyResult]) -> str:
    header = ["FINGERPRINT", "FILES", "ITEMS", "CORRUPT", "STATUS"]
    rows = [
        [
            r.fingerprint[:SHORT_FP],
            str(r.files),
            str(r.items),
            str(len(r.problems)),
            "ok" if r.ok else "CORRUPT",
        ]
        for r in results
    ]
    lines = [render_table(header, rows, right=(1, 2, 3))]
    for r in results:
        lines += [f"\nrepaired {fix}" for fix in r.repaired]
        by_file: dict[str, list[Problem]] = {}
        for p in r.problems:
            by_file.setdefault(p.file, []).append(p)
        for file, problems in by_file.items():
            whole = [p for p in problems if p.key is None]
            if whole:
                lines.append(f"\n{file}\n  {whole[0].reason}")
                continue
            lines.append(f"\n{file}: {len(problems)} corrupt item(s)")
            lines += [f"  key {p.key}: {p.reason}" for p in problems[:_MAX_LISTED_KEYS]]
            if len(problems) > _MAX_LISTED_KEYS:
                lines.append(f"  ... and {len(problems) - _MAX_LISTED_KEYS} more (--json lists all)")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    path = _resolve_path(args)
    targets = _targets(args, path)
    enabled = _progress_enabled(args.progress)
    total = sum(count_rows(p) for p in targets) if enabled else 0
    bar = tqdm(total=total, desc="verifying", unit="item", file=sys.stderr, disable=not enabled)
    try:
        results = [verify_namespace(p, bar) for p in targets]
    finally:
        bar.close()
    bad = [p for r in results for p in r.problems]
    if args.json:
        _print_json(
            {"path": str(path), "ok": not bad, "namespaces": [{**asdict(r), "ok": r.ok} for r in results]}
        )
    elif not results:
        print(f"no namespaces under {path}")
    else:
        print(_verify_text(results))
    if bad:
        files = len({p.file for p in bad})
        items = sum(1 for p in bad if p.key is not None)
        print(
            f"{args.parser.prog}: {items} corrupt item(s) and {len(bad) - items} unreadable file(s) "
            f"in {files} file(s); they are recomputed on next use (or run `cachedata clear`)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    path = _resolve_path(args)
    targets = _targets(args, path)
    progress = _progress_enabled(args.progress)
    results = [merge_namespace(p, wait=args.wait, progress=progress, full=args.full) for p in targets]
    if args.json:
        _print_json({"path": str(path), "namespaces": [asdict(r) for r in results]})
    elif not results:
        print(f"no namespaces under {path}")
    else:
        header = ["FINGERPRINT", "FILES BEFORE", "FILES AFTER", "ITEMS", "RESULT", "DETAIL"]
        rows = [
            [
                r.fingerprint[:SHORT_FP],
                str(r.files_before),
                str(r.files_after),
                str(r.items),
                r.status,
                r.message,
            ]
            for r in results
        ]
        print(render_table(header, rows, right=(1, 2, 3)))
    failed = [r for r in results if r.status in ("busy", "failed")]
    for r in failed:
        print(f"{args.parser.prog}: could not merge {r.path}: {r.message}", file=sys.stderr)
    for r in results:
        if r.dropped:
            print(f"{args.parser.prog}: {r.path}: left out {r.dropped} corrupt item(s)", file=sys.stderr)
    return 1 if failed else 0


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _delete_all(infos: Sequence[NamespaceInfo]) -> list[tuple[NamespaceInfo, str]]:
    """Delete each namespace; returns (info, error) for those that could not be deleted."""
    errors = []
    for info in infos:
        try:
            delete_namespace(Path(info.path))
        except OSError as exc:
            errors.append((info, str(exc)))
    return errors


def cmd_clear(args: argparse.Namespace) -> int:
    path = _resolve_path(args)
    infos = [inspect_namespace(p, items=False) for p in _targets(args, path)]
    total = sum(i.bytes for i in infos)
    what = f"{len(infos)} namespace(s) ({format_size(total)}) under {path}"
    if not infos:
        if args.json:
            _print_json({"path": str(path), "deleted": [], "bytes": 0})
        else:
            print(f"no namespaces under {path}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {what} without confirmation: stdin is not a terminal; "
                             "pass --yes to delete without asking")  # fmt: skip
        if not _confirm(f"Delete {what}?"):
            print("nothing deleted", file=sys.stderr)
            return 1
    errors = _delete_all(infos)
    failed = {i.fingerprint for i, _ in errors}
    deleted = [i for i in infos if i.fingerprint not in failed]
    if args.json:
        _print_json({"path": str(path), "deleted": [i.fingerprint for i in deleted],
                     "bytes": sum(i.bytes for i in deleted),
                     "errors": [{"fingerprint": i.fingerprint, "error": e} for i, e in errors]})  # fmt: skip
    else:
        for i in deleted:
            print(f"deleted {i.short}  {format_size(i.bytes)}  {i.path}")
    for info, err in errors:
        print(f"{args.parser.prog}: could not delete {info.path}: {err}", file=sys.stderr)
    return 1 if errors else 0


def cmd_prune(args: argparse.Namespace) -> int:
    if args.older_than is None and args.max_bytes is None:
        raise UsageError("give --older-than DURATION, --max-bytes SIZE or both (e.g. --older-than 7d)")
    path = _resolve_path(args)
    now = time.time()
    infos = [inspect_namespace(p, items=False) for p in find_namespaces(path)]
    remove, keep = plan_prune(infos, older_than=args.older_than, max_bytes=args.max_bytes, now=now)
    errors = [] if args.dry_run else _delete_all([i for i, _ in remove])
    failed = {i.fingerprint: e for i, e in errors}
    freed = sum(i.bytes for i, _ in remove if i.fingerprint not in failed)
    if args.json:
        _print_json({
            "path": str(path),
            "dry_run": args.dry_run,
            "removed": [{"fingerprint": i.fingerprint, "bytes": i.bytes, "last_used": i.last_used,
                         "reason": why, "error": failed.get(i.fingerprint)} for i, why in remove],
            "kept": [{"fingerprint": i.fingerprint, "bytes": i.bytes, "last_used": i.last_used} for i in keep],
            "freed_bytes": freed,
            "remaining_bytes": sum(i.bytes for i in keep) + sum(i.bytes for i, _ in remove if i.fingerprint in failed),
        })  # fmt: skip
    else:
        verb = "would remove" if args.dry_run else "removed"
        if remove:
            header = ["FINGERPRINT", "SIZE", "LAST USED", "REASON"]
            rows = [[i.short, format_size(i.bytes), f"{_when(i.last_used)} ({_ago(i.last_used, now)})", why]
                    for i, why in remove]  # fmt: skip
            print(render_table(header, rows, right=(1,)))
            print()
        kept = sum(i.bytes for i in keep)
        print(f"{verb} {len(remove) - len(errors)} namespace(s) ({format_size(freed)}); "
              f"kept {len(keep)} ({format_size(kept)}) under {path}")  # fmt: skip
    for info, err in errors:
        print(f"{args.parser.prog}: could not delete {info.path}: {err}", file=sys.stderr)
    return 1 if errors else 0


# ============================================================================ budget


def _folder_usage(cache_dir: Path) -> tuple[budget_mod.Usage, str | None]:
    """The folder's usage against the budget a process started from this shell would use
    ($CACHEDATA_MAX_BYTES, else the folder's settings file), and a note when the variable is bad."""
    try:
        explicit, note = budget_mod.explicit_limit(None), None
    except ValueError as exc:
        explicit, note = None, f"ignoring it: {exc}"
    return budget_mod.usage(cache_dir, explicit), note


def _budget_json(u: budget_mod.Usage) -> dict:
    return {
        "cache_dir": u.cache_dir,
        "max_bytes": u.limit.max_bytes,
        "source": u.limit.source,
        "bytes": u.bytes,
        "over": u.over,
        "in_use_bytes": u.in_use_bytes,
        "pending_bytes": u.pending_bytes,
        "namespaces": len(u.namespaces),
        "in_use": {n.fingerprint: [str(h) for h in n.live_holders] for n in u.namespaces if n.in_use},
    }


def _budget_lines(u: budget_mod.Usage) -> list[str]:
    """``budget: 50G (from ...); 12G used (24%); 2 namespace(s) in use (3.1G)``, and what waits."""
    used = format_size(u.bytes)
    if u.limit.max_bytes is None:
        head = f"budget: none ({used} used; set one with `cachedata budget {u.cache_dir} SIZE`)"
    else:
        share = 100.0 * u.bytes / u.limit.max_bytes
        head = f"budget: {u.limit}; {used} used ({share:.0f}%{', OVER' if u.over else ''})"
    busy = [n for n in u.namespaces if n.in_use]
    head += f"; {len(busy)} namespace(s) in use ({format_size(u.in_use_bytes)})"
    lines = [head]
    if u.pending_bytes:
        lines.append(f"evicted, awaiting deletion: {format_size(u.pending_bytes)} (readers on other nodes)")
    return lines


def cmd_budget(args: argparse.Namespace) -> int:
    value = None
    if args.size is not None and args.size.strip().lower() not in ("none", "off"):
        value = _size_or_usage_error(args.size)
    path = Path(args.path).expanduser()
    if args.size is not None and not path.exists():
        path.mkdir(parents=True)  # a budget may be set before the first run
    path = _resolve_path(args)
    cache_dir = path.parent if is_namespace(path) else path
    if args.size is not None:
        budget_mod.write_limit(cache_dir, value)
    u, note = _folder_usage(cache_dir)
    evicted: tuple[budget_mod.Eviction, ...] = ()
    if args.enforce and u.limit.max_bytes is not None:
        done = budget_mod.enforce(cache_dir, u.limit.max_bytes, keep=())
        if not done.locked:
            print(f"{args.parser.prog}: another process holds {cache_dir / '.budget.lock'}; "
                  "nothing evicted, try again", file=sys.stderr)  # fmt: skip
            return 1
        evicted = done.evicted
        u, note = _folder_usage(cache_dir)
    try:
        folder: int | str | None = budget_mod.folder_limit(cache_dir)
    except ValueError as exc:
        folder = f"unreadable: {exc}"
    if args.json:
        out = _budget_json(u)
        out["folder_max_bytes"] = folder
        out["evicted"] = [asdict(e) for e in evicted]
        _print_json(out)
    else:
        for e in evicted:
            print(
                f"evicted {e.fingerprint[:SHORT_FP]}  {format_size(e.bytes)}  last used {_when(e.last_used)}"
            )
        print("\n".join(_budget_lines(u)))
        if u.limit.source.startswith("$"):
            print(f"the folder's own setting ({budget_mod.SETTINGS_NAME}): "
                  f"{format_size(folder) if isinstance(folder, int) else folder or 'none'}; "
                  f"${budget_mod.ENV_VAR} overrides it "
                  "for processes started with it set")  # fmt: skip
    if note:
        print(f"{args.parser.prog}: ${budget_mod.ENV_VAR}: {note}", file=sys.stderr)
    return 0


def _size_or_usage_error(text: str) -> int:
    try:
        return budget_mod.parse_max_bytes(text, where="SIZE")
    except ValueError as exc:
        raise UsageError(f"{exc}; or 'none' to remove the budget") from None


# ============================================================================ parser

_EXIT_CODES = """\
exit status:
  0  success
  1  failure: corrupt items found (verify), a namespace could not be merged or deleted,
     an I/O error
  2  usage error: unknown option, bad size or duration, a PATH that does not exist,
     an unknown --namespace, clear without --yes when stdin is not a terminal
"""

_MAIN_EPILOG = (
    """\
examples:
  cachedata info ~/.cache/cachedata
  cachedata verify /data/cache && cachedata merge /data/cache
  cachedata prune /data/cache --older-than 30d --max-bytes 500G

PATH is a cache_dir (the folder given to CachedDataset) or one namespace folder in it;
where it is optional it defaults to $CACHEDATA_HOME, else ~/.cache/cachedata.

sizes:      50G, 512M, 1.5T, 100KB, 4096: K, M, G, T, P (and KiB, MiB, ...) are powers of
            1024 as in `du -h`; KB, MB, GB, ... are powers of 1000; no unit: bytes
durations:  7d, 12h, 30m, 45s, 1d12h: units s, m, h, d, w; every number needs a unit

"""
    + _EXIT_CODES
)

_COMMANDS: dict[str, tuple[str, str]] = {
    "info": (
        "list namespaces: items, size, files, fingerprint, what produced them, when used",
        """\
example:
  cachedata info ~/.cache/cachedata
  cachedata info ~/.cache/cachedata --json | jq '.namespaces[].items'
  cachedata info ~/.cache/cachedata --namespace 3f2a9c --verbose

--verbose (or --namespace) adds a block per namespace with the full transform repr,
library versions and the attribute paths that differ from its nearest sibling of the
same dataset type (why a new namespace was made). Last used is the mtime of the
namespace's last_used file (touched at most hourly), else of its newest file.
""",
    ),
    "verify": (
        "re-read every item and check its checksum; exit 1 listing the bad keys",
        """\
example:
  cachedata verify ~/.cache/cachedata
  cachedata verify ~/.cache/cachedata --namespace 3f2a9c --json

Reads every item of every merged file and shard and compares it with its xxh3 checksum;
files that cannot be opened count as corrupt. Corrupt items are recomputed by the next
training run that needs them (or delete the namespace with `cachedata clear`).
""",
    ),
    "merge": (
        "merge each namespace's shards into one file (safe while training reads)",
        """\
example:
  cachedata merge ~/.cache/cachedata
  cachedata merge ~/.cache/cachedata --namespace 3f2a9c --wait 5m

Takes the namespace's merge.lock (waits up to --wait for another merger), writes a new
merged file with every readable item, then removes the files it replaces; processes that
are reading keep their open files. Items failing their checksum are left out.
""",
    ),
    "clear": (
        "delete all namespaces under PATH, or one with --namespace",
        """\
example:
  cachedata clear ~/.cache/cachedata --namespace 3f2a9c
  cachedata clear /data/cache --yes

Asks for confirmation when stdin is a terminal; otherwise refuses (exit 2) unless --yes.
PATH is required here (no default) so that nothing is deleted by accident.
""",
    ),
    "prune": (
        "remove namespaces unused for a while, or the least recently used over a size",
        """\
example:
  cachedata prune ~/.cache/cachedata --older-than 7d
  cachedata prune ~/.cache/cachedata --max-bytes 50G --dry-run
  cachedata prune ~/.cache/cachedata --older-than 30d --max-bytes 1.5T

--older-than removes namespaces not used for longer than the duration; --max-bytes then
removes the least recently used ones until the rest fits. Namespaces being merged right
now are kept. Does not ask for confirmation: try --dry-run first.
""",
    ),
    "budget": (
        "show the folder's disk budget and usage, or set the budget",
        """\
example:
  cachedata budget ~/.cache/cachedata
  cachedata budget ~/.cache/cachedata 50G
  cachedata budget ~/.cache/cachedata none
  cachedata budget /data/cache 1.5T --enforce --json

The budget is stored in the folder's cachedata-settings.json, which every process using
the folder reads (CachedDataset(max_bytes=) and $CACHEDATA_MAX_BYTES override it).
Training processes keep the folder under it themselves: when they create a namespace,
seal or merge, they evict the least recently used namespaces that no live process uses.
--enforce does that now. PATH is the cache folder (a namespace folder means its parent).
""",
    ),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_common(sub: argparse.ArgumentParser, *, path_required: bool = False, namespace: bool = True) -> None:
    if path_required:
        sub.add_argument("path", metavar="PATH", help="a cache_dir or one namespace folder")
    else:
        sub.add_argument("path", metavar="PATH", nargs="?", default=None,
                         help="a cache_dir or one namespace folder (default: $CACHEDATA_HOME or ~/.cache/cachedata)")  # fmt: skip
    if namespace:
        sub.add_argument("--namespace", "-n", metavar="FP",
                         help="only the namespace whose fingerprint (folder name) starts with FP")  # fmt: skip
    sub.add_argument("--json", action="store_true", help="print machine-readable JSON to stdout")


def _add_progress(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip


def build_parser(prog: str = "cachedata") -> argparse.ArgumentParser:
    """The argument parser with one subparser per command, each with an example epilog."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Inspect and maintain cachedata cache folders.",
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"cachedata {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "info": cmd_info, "verify": cmd_verify, "merge": cmd_merge, "clear": cmd_clear, "prune": cmd_prune,
        "budget": cmd_budget,
    }  # fmt: skip
    for name, (summary, epilog) in _COMMANDS.items():
        sub = subs.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                              epilog=epilog + "\n" + _EXIT_CODES, formatter_class=_Formatter)  # fmt: skip
        sub.set_defaults(func=handlers[name], parser=sub)
        _add_common(sub, path_required=name in ("clear", "budget"), namespace=name not in ("prune", "budget"))
        if name == "info":
            sub.add_argument("--verbose", "-v", action="store_true",
                             help="add details per namespace and why it differs from its nearest sibling")  # fmt: skip
        if name in ("verify", "merge"):
            _add_progress(sub)
        if name == "merge":
            sub.add_argument("--wait", type=_duration_arg, default=60.0, metavar="DURATION",
                             help="how long to wait for another process's merge.lock (default: 60s)")  # fmt: skip
            sub.add_argument("--full", action="store_true",
                             help="rewrite every file into one (default: merge the shards, keep big old files)")  # fmt: skip
        if name == "clear":
            sub.add_argument("--yes", "-y", action="store_true", help="delete without asking")
        if name == "prune":
            sub.add_argument("--older-than", type=_duration_arg, metavar="DURATION",
                             help="remove namespaces not used for longer than this, e.g. 7d, 12h")  # fmt: skip
            sub.add_argument("--max-bytes", type=_size_arg, metavar="SIZE",
                             help="then remove the least recently used until the rest fits, e.g. 50G")  # fmt: skip
            sub.add_argument(
                "--dry-run", action="store_true", help="show what would be removed, remove nothing"
            )
        if name == "budget":
            sub.add_argument("size", metavar="SIZE", nargs="?", default=None,
                             help="set the budget, e.g. 50G, 512M, 1.5T; 'none' removes it (default: show it)")  # fmt: skip
            sub.add_argument("--enforce", action="store_true",
                             help="evict least recently used namespaces that nobody uses until the folder fits")  # fmt: skip
    return parser


def _setup_logging() -> None:
    """Show the library's warnings (e.g. an unreadable file) on stderr, once per process."""
    if not any(getattr(h, "_cachedata_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.setLevel(logging.WARNING)
        handler._cachedata_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def main(argv: Sequence[str] | None = None, *, prog: str = "cachedata") -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage error)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging()
    sub: argparse.ArgumentParser = args.parser
    try:
        return args.func(args)
    except UsageError as exc:
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `cachedata info --json | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:  # names the file and the reason
        print(f"{sub.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{sub.prog}: interrupted", file=sys.stderr)
        return 130
