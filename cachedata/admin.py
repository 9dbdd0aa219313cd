"""Maintaining cache folders from Python: inspect, verify, merge, plan a prune, prune, delete.

What the ``cachedata`` command line does, as functions that return frozen records and
print nothing. A PATH is a cache_dir (a folder of namespace folders) or one namespace
folder, whose last part is the fingerprint (so not ``.``: the CLI makes paths absolute).
Every file is reached through the storage layers: names, listings and locks through
``fileset``, sizes, last uses and leases through ``usage``/``leases``, deletion through
``eviction``, the data files through ``namespace.Store``.

``inspect`` reads meta.json, file names, sizes, lease files and the row count each data file
carries in an extended attribute (``fileset.ROWS_XATTR``), so that ``cachedata info`` starts
without numpy or HDF5 (under 0.3 s for 10 namespaces). Only a namespace with a file lacking that
attribute has its items counted through every file's index (HDF5), as ``items=True`` does
for all. ``verify``, ``merge`` and the index count import the Store when called, for the
same reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import budget, eviction, fileset, metadata
from .metadata import Difference
from .units import format_duration, format_size
from .usage import NamespaceUsage, Usage, folder_usage, is_namespace, measure, namespace_usage

#: Progress callbacks get a number of items.
Progress = Callable[[int], None]
#: How items are counted. "rows": the sum of the rows the data files record in their
#: attribute, no file opened; an item that two jobs computed at the same time counts twice
#: until the next merge. "index": the distinct keys of every file's index (numpy and HDF5).
Counting = Literal["rows", "index"]


# ============================================================================ finding namespaces


def find_namespaces(path: Path) -> list[Path]:
    """``path`` itself when it is a namespace folder, else its namespace subfolders, sorted.

    Hidden folders (evicted namespaces being deleted) and links (they may lead outside the
    cache) are left out, as eviction leaves them out.
    """
    if is_namespace(path):
        return [path]
    return sorted(Path(n.path) for n in measure(path))


def cache_dir_of(path: Path) -> Path:
    """The cache_dir of a PATH: its parent when PATH is one namespace folder."""
    return path.parent if is_namespace(path) else path


def select_namespace(namespaces: Sequence[Path], prefix: str, where: Path) -> Path:
    """The namespace whose fingerprint starts with ``prefix``; ValueError if none or several."""
    hits = [p for p in namespaces if p.name.startswith(prefix)]
    if not hits:
        raise ValueError(
            f"no namespace {prefix!r} under {where}; `cachedata info {where}` lists the fingerprints"
        )
    if len(hits) > 1:
        names = ", ".join(p.name[:12] for p in hits)
        raise ValueError(
            f"--namespace {prefix!r} matches {len(hits)} namespaces ({names}); give more characters"
        )
    return hits[0]


@dataclass(frozen=True)
class CacheFolder:
    """A folder of namespaces (a cache_dir) found below a PATH that holds none itself."""

    path: str
    namespaces: int
    bytes: int


def find_cache_folders(path: Path) -> list[CacheFolder]:
    """Subfolders of ``path`` that hold namespaces: ``path`` is then a folder of cache folders."""
    try:
        subs = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []
    found = []
    for sub in subs:
        namespaces = measure(sub)
        if namespaces:
            found.append(CacheFolder(str(sub), len(namespaces), sum(n.bytes for n in namespaces)))
    return found


# ============================================================================ inspect


@dataclass(frozen=True)
class NamespaceInfo:
    """One namespace folder as ``cachedata info`` shows it (sizes in bytes, times in Unix seconds)."""

    path: str
    fingerprint: str
    items: int | None  # counted as items_counted says; None when not counted
    items_counted: Counting | None  # "rows" (stored rows) or "index" (distinct items)
    bytes: int  # apparent size of its files (retired ones awaiting deletion left out)
    merged_files: int
    shard_files: int
    dataset_type: str | None
    dataset_len: int | None
    dataset_fingerprint: str | None
    transform_repr: str | None
    transform_fingerprint: str | None
    version: str | None  # the user's version= string
    key: str | None  # "index" or "custom"
    versions: dict[str, str]  # library versions that wrote it
    created: float | None
    last_used: float
    last_used_from: str  # "last_used", "meta.json" or "folder": whose mtime last_used is
    merging: bool  # a live process holds its merge.lock
    in_use_by: tuple[str, ...] = ()  # host:pid of the live processes that lease it
    format: int | None = None  # meta.json's cachedata_format (None when unknown)
    differs_from: Difference | None = None  # its nearest sibling of the same dataset type

    @property
    def busy(self) -> str:
        """Why it must not be removed now ("in use by ...", "being merged"), or ""."""
        if self.in_use_by:
            return f"in use by {', '.join(self.in_use_by)}"
        return "being merged" if self.merging else ""


@dataclass(frozen=True)
class Inspection:
    """What ``inspect`` found under a PATH."""

    path: str
    namespaces: tuple[NamespaceInfo, ...]  # most recently used first
    usage: Usage  # the cache folder against its disk budget
    budget_note: str | None  # why $CACHEDATA_MAX_BYTES was ignored, if it was
    cache_folders: tuple[CacheFolder, ...]  # when PATH holds no namespace: cache folders below it
    items_counted: Counting  # as asked: "rows" falls back to "index" per namespace (see each one's)


def budget_usage(cache_dir: Path) -> tuple[Usage, str | None]:
    """The folder's usage against the budget a process started from this environment would
    use ($CACHEDATA_MAX_BYTES, else the folder's settings file), and a note when the variable
    is bad (then ignored)."""
    try:
        explicit, note = budget.explicit_limit(None), None
    except ValueError as exc:
        explicit, note = None, f"ignoring it: {exc}"
    return folder_usage(cache_dir, explicit), note


def inspect_namespace(
    path: Path,
    *,
    items: Counting | None = None,
    found: NamespaceUsage | None = None,
    siblings: Sequence[dict] = (),
) -> NamespaceInfo:
    """Describe one namespace folder. ``items``: leave them uncounted (None), sum the rows its
    files record ("rows"; through the index where a file records none) or count the distinct
    keys of every file's index ("index"). ``siblings`` are meta.json records to find the
    nearest sibling among."""
    found = found or namespace_usage(path) or NamespaceUsage(str(path), path.name, 0, time.time(), (), False)
    meta = metadata.read_meta(path)
    listing = fileset.list_files(path)
    dataset: dict = meta["dataset"] if isinstance(meta.get("dataset"), dict) else {}
    transform: dict = meta["transform"] if isinstance(meta.get("transform"), dict) else {}
    created = meta.get("created")
    fmt = meta.get("cachedata_format")
    count: int | None = None
    if items == "rows":
        count = fileset.listing_rows(path, listing)
    if items is not None and count is None:
        items, count = "index", count_items(path)
    return NamespaceInfo(
        path=str(path),
        fingerprint=path.name,
        items=count,
        items_counted=items,
        bytes=found.bytes,
        merged_files=len(listing.runs),
        shard_files=len(listing.shards),
        dataset_type=dataset.get("type"),
        dataset_len=dataset.get("len"),
        dataset_fingerprint=dataset.get("fingerprint"),
        transform_repr=transform.get("repr"),
        transform_fingerprint=transform.get("fingerprint"),
        version=meta.get("version"),
        key=meta.get("key"),
        versions={str(k): str(v) for k, v in (meta.get("versions") or {}).items()},
        created=float(created) if isinstance(created, (int, float)) else None,
        last_used=found.last_used,
        last_used_from=found.last_used_from,
        merging=found.merging,
        in_use_by=tuple(str(h) for h in found.live_holders),
        format=fmt if isinstance(fmt, int) and not isinstance(fmt, bool) else None,
        differs_from=metadata.nearest_sibling({**meta, "fingerprint": path.name}, siblings),
    )


def count_items(path: Path) -> int:
    """Distinct items a reader gets from a namespace's files (unreadable files count 0)."""
    from .namespace import Store  # numpy and HDF5: only when items are counted (see the docstring)

    store = Store(path, path.name, compression=None)
    try:
        return store.count()
    finally:
        store.close()


def inspect(path: Path, *, namespace: str | None = None, items: bool = False) -> Inspection:
    """The namespaces under PATH (or the one whose fingerprint starts with ``namespace``),
    with the cache folder's budget; ValueError for an unknown or ambiguous ``namespace``.
    Items are the rows the files record; ``items=True`` counts distinct items through every
    file's index instead (slower: numpy and HDF5)."""
    counting: Counting = "index" if items else "rows"
    one = is_namespace(path)
    cache_dir = path.parent if one else path  # siblings live in the cache_dir
    usage, note = budget_usage(cache_dir)
    by_path = {n.path: n for n in usage.namespaces}
    targets = [path] if one else sorted(Path(p) for p in by_path)  # as find_namespaces, from one scan
    if namespace is not None:
        targets = [select_namespace(targets, namespace, path)]
    metas = metadata.read_metas(cache_dir)
    infos = [inspect_namespace(p, items=counting, found=by_path.get(str(p)), siblings=metas) for p in targets]
    infos.sort(key=lambda i: -i.last_used)
    folders = () if infos else tuple(find_cache_folders(path))
    return Inspection(str(path), tuple(infos), usage, note, folders, counting)


# ============================================================================ verify


@dataclass(frozen=True)
class Problem:
    """One corrupt item (``key`` set), one unreadable file (``key`` None), or a file that could
    not be checked now (``unchecked``: an environmental error such as too many open files)."""

    file: str
    key: int | None
    reason: str
    unchecked: bool = False


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify_namespace`` found in one namespace."""

    fingerprint: str
    path: str
    files: int  # data files checked (or found unreadable)
    items: int  # index rows checked (an item in a shard and a merged file counts twice)
    vanished: int  # files merged away while verify ran (their items are in the new file)
    problems: tuple[Problem, ...]
    repaired: tuple[str, ...] = ()  # damaged meta.json/schema.json and what was done about it

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_namespace(
    path: Path, *, grow: Progress | None = None, progress: Progress | None = None
) -> VerifyResult:
    """Check every item of every data file in a namespace folder against its checksum.

    Repairs a damaged meta.json or schema.json first (``metadata.repair``), then reads every
    payload through ``Store.check_files``. ``grow`` gets the item count of files as they are
    listed (a merge running meanwhile adds one), ``progress`` the items checked.
    """
    from .namespace import Store  # numpy and HDF5: only for verify (see the module docstring)

    repaired = tuple(str(r) for r in metadata.repair(path))
    store = Store(path, path.name, compression=None)
    try:
        checks = store.check_files(grow=grow, progress=progress)
    finally:
        store.close()
    problems = [Problem(str(path / c.name), key, reason) for c in checks for key, reason in c.bad] + [
        Problem(str(path / c.name), None, f"not checked: {c.error}", unchecked=True)
        for c in checks
        if c.error
    ]
    problems += [
        Problem(str(path / name), None, "a symbolic link: readers ignore it; delete it")
        for name in fileset.list_files(path).links
    ]
    return VerifyResult(
        fingerprint=path.name,
        path=str(path),
        files=sum(1 for c in checks if not c.vanished and not c.error),
        items=sum(c.rows for c in checks),
        vanished=sum(1 for c in checks if c.vanished),
        problems=tuple(problems),
        repaired=repaired,
    )


# ============================================================================ merge


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_namespace`` did to one namespace."""

    fingerprint: str
    path: str
    status: str  # merged | nothing | busy | failed
    files_before: int
    files_after: int
    items: int
    dropped: int  # items left out because their bytes failed the checksum
    merged_file: str | None
    message: str


def merge_namespace(path: Path, *, wait: float, progress: bool = False, full: bool = False) -> MergeResult:
    """Merge the shards of one namespace (``Store.consolidate``: under merge.lock, safe for
    readers); ``full`` rewrites every file into one. ``wait``: seconds to wait for another
    merger; ``progress``: show a progress bar on stderr."""
    from . import storage  # numpy and HDF5: only for merge (see the module docstring)
    from .namespace import Store
    from .shards import Identity

    listing = fileset.list_files(path)
    before = len(listing.files)

    def result(status: str, items: int, dropped: int = 0, message: str = "") -> MergeResult:
        after = fileset.list_files(path)
        newest = after.runs[-1].name if after.runs else None
        return MergeResult(
            path.name, str(path), status, before, len(after.files), items, dropped, newest, message
        )

    if not listing.shards and (len(listing.runs) <= 1 or not full):
        return result("nothing", count_items(path), message="no shards to merge")
    newest_first = [*reversed(listing.runs), *listing.shards]
    compression = next((c for f in newest_first if (c := storage.compression_of(path / f.name))), None)
    store = Store(path, path.name, compression=compression)
    try:
        count = store.count()
        done = store.consolidate(Identity(0, None, os.getpid()), wait=wait, full=full, progress=progress)
        after = store.count()
    finally:
        store.close()
    if done:
        dropped = max(0, count - after)
        note = f"; left out {dropped} corrupt item(s), recomputed on next use" if dropped else ""
        newest = fileset.list_files(path).runs
        into = newest[-1].name if newest else "?"
        return result("merged", after, dropped, f"{before} files into {into}{note}")
    if fileset.locked(path):
        return result(
            "busy", count, message=f"another process holds {path / fileset.LOCK_NAME} (waited {wait:g}s)"
        )
    if count == 0:
        return result("failed", 0, message="no readable cache file; `cachedata verify` shows why")
    return result("nothing", count, message="nothing to merge")


# ============================================================================ prune, delete


@dataclass(frozen=True)
class PrunePlan:
    """Which namespaces a prune removes (with the reason) and keeps, least recently used first."""

    remove: tuple[tuple[NamespaceInfo, str], ...]
    keep: tuple[NamespaceInfo, ...]
    spared: tuple[tuple[NamespaceInfo, str], ...]  # kept although old or over: in use or being merged


def plan_prune(
    infos: Sequence[NamespaceInfo], *, older_than: float | None, max_bytes: int | None, now: float
) -> PrunePlan:
    """``older_than`` (seconds): remove the namespaces unused for longer. ``max_bytes``: then
    remove the least recently used until the rest fits. A namespace that a live process
    holds (its lease) or merges is never removed."""
    keep = sorted(infos, key=lambda i: (i.last_used, i.fingerprint))
    remove: list[tuple[NamespaceInfo, str]] = []
    spared: dict[str, tuple[NamespaceInfo, str]] = {}
    if older_than is not None:
        for info in keep:
            if info.last_used < now - older_than:
                if info.busy:
                    spared[info.fingerprint] = (info, info.busy)
                else:
                    remove.append((info, f"unused for {format_duration(now - info.last_used)}"))
        gone = {i.fingerprint for i, _ in remove}
        keep = [i for i in keep if i.fingerprint not in gone]
    if max_bytes is not None:
        total = sum(i.bytes for i in keep)
        for info in list(keep):
            if total <= max_bytes:
                break
            if info.busy:
                spared[info.fingerprint] = (info, info.busy)
                continue
            remove.append((info, f"least recently used, over {format_size(max_bytes)}"))
            keep.remove(info)
            total -= info.bytes
    return PrunePlan(tuple(remove), tuple(keep), tuple(spared.values()))


@dataclass(frozen=True)
class PruneResult:
    """What ``prune`` planned and did (``removals`` empty on a dry run)."""

    path: str
    dry_run: bool
    plan: PrunePlan
    removals: tuple[eviction.Removal, ...]

    @property
    def failed(self) -> tuple[eviction.Removal, ...]:
        """Planned removals that did not happen (in use by now, or an error)."""
        return tuple(r for r in self.removals if not r.removed)

    @property
    def freed_bytes(self) -> int:
        if self.dry_run:
            return sum(i.bytes for i, _ in self.plan.remove)
        return sum(r.bytes for r in self.removals if r.removed)


def prune(
    path: Path,
    *,
    older_than: float | None,
    max_bytes: int | None,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneResult:
    """Plan (``plan_prune``) and remove namespaces under PATH, safely for running jobs: each
    is looked at again right before its removal (``eviction.remove``), so one that a job
    leased meanwhile is kept."""
    now = time.time() if now is None else now
    infos = [inspect_namespace(p) for p in find_namespaces(path)]
    plan = plan_prune(infos, older_than=older_than, max_bytes=max_bytes, now=now)
    doomed = [i for i, _ in plan.remove]
    done = (
        () if dry_run or not doomed else tuple(eviction.remove(cache_dir_of(path), doomed, unused_only=True))
    )
    return PruneResult(str(path), dry_run, plan, done)


def delete(namespaces: Sequence[Path]) -> list[eviction.Removal]:
    """Delete namespace folders whoever uses them (``cachedata clear``): renamed out of the
    listing in one step, then removed as eviction does (open readers keep reading; a running
    job notices and computes its items again). A link given as a namespace loses only the link."""
    out = []
    for path in namespaces:
        found = namespace_usage(path) or NamespaceUsage(str(path), path.name, 0, 0.0, (), False)
        if path.is_symlink():
            try:
                path.unlink()
                out.append(eviction.Removal(found.fingerprint, str(path), found.bytes, True))
            except OSError as exc:
                out.append(eviction.Removal(found.fingerprint, str(path), found.bytes, False, str(exc), True))
            continue
        out += eviction.remove(path.parent, [found], unused_only=False)
    return out
