"""A namespace folder's two metadata files: reading them, writing them, and repairing them.

``meta.json`` says what produced the namespace (dataset type, transform repr, the
fingerprint tree, library versions); ``schema.json`` says how items are laid out. Both
can be damaged by a full disk, a killed copy, a sync tool or a person: empty, truncated,
not UTF-8, valid JSON with the wrong content, replaced by a directory, deleted. None of
that may crash a job or make it serve wrong data:

- the schema is recovered from the data files (every shard and run
  carries its schema text in the HDF5 attribute ``schema``), the authority on how their
  bytes are laid out, and ``schema.json`` is rewritten atomically with one warning;
- ``meta.json`` is rewritten from what the constructing ``CachedDataset`` knows (its
  own record of the namespace); without one (``cachedata verify``) a minimal record
  marked ``"recovered"`` is written, completed by the next construction.

Every write goes to a temporary name in the same folder, then ``os.replace``. Nothing
here follows a symbolic link: a link in place of a metadata file is treated as damage.

``nearest_sibling`` says why a namespace exists beside older ones of the same dataset type
(what CachedDataset logs when it starts cold, and what ``cachedata info --verbose`` shows).
Reading meta.json needs neither numpy nor HDF5 (the command line's ``info`` stays quick);
the schema functions import them when called.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import faults, fileset
from .fingerprint import diff_trees

logger = logging.getLogger("cachedata")

META = "meta.json"
SCHEMA = "schema.json"
#: Keys a complete meta.json has (written by CachedDataset); others were recovered or damaged.
_META_KEYS = ("cachedata_format", "fingerprint", "dataset", "transform", "tree", "versions")


@dataclass(frozen=True)
class Repair:
    """One metadata file found damaged and what was done about it."""

    file: str  # the file's path
    problem: str  # e.g. "not valid JSON (truncated?)", "a directory", "missing"
    action: str  # e.g. "rewritten from merged-000003.h5", "removed (no data file to recover from)"

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}; {self.action}"


# ----------------------------------------------------------------------------- reading


def _read_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None) for a readable regular file, else (None, what is wrong with it)."""
    try:
        if path.is_symlink():
            return None, "a symbolic link (cache metadata is never a link)"
        if path.is_dir():
            return None, "a directory"
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    if not data.strip():
        return None, "empty"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "not UTF-8 text"


def _read_json_object(path: Path) -> tuple[dict | None, str | None]:
    text, problem = _read_text(path)
    if text is None:
        return None, problem
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None, "not valid JSON (truncated?)"
    if not isinstance(value, dict):
        return None, f"JSON {type(value).__name__}, expected an object"
    return value, None


def read_meta(folder: Path) -> dict:
    """The namespace's meta.json as a dict; {} when it is missing or damaged (never raises)."""
    meta, _ = _read_json_object(folder / META)
    return meta if meta is not None else {}


def meta_problem(folder: Path, fingerprint: str) -> str | None:
    """What is wrong with ``folder``'s meta.json (None when it is complete and belongs here)."""
    meta, problem = _read_json_object(folder / META)
    if meta is None:
        return problem
    if meta.get("fingerprint") != fingerprint:
        return f"names namespace {str(meta.get('fingerprint'))[:16]!r}, not this folder's"
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        return f"incomplete (no {', '.join(missing)})"
    return None


# ----------------------------------------------------------------------------- writing


def _tmp_name(path: Path) -> Path:
    return path.with_name(fileset.tmp_name(path.name))  # fileset.sweep removes a killed writer's


def _clear_slot(path: Path) -> None:
    """Remove a directory or link that sits where a metadata file belongs."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: written to a temporary name beside it, then renamed."""
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _clear_slot(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_once(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists (atomically, also on NFS); True when
    this call created it."""
    try:
        fileset.create_once(path, text)
    except FileExistsError:
        return False
    return True


def ensure_meta(folder: Path, meta: dict) -> Repair | None:
    """Write ``meta`` as the folder's meta.json unless a complete one is there.

    A damaged or incomplete meta.json is replaced (one warning per process); a complete one
    is kept (it records when the namespace was created). Raises OSError when the folder
    cannot be written.
    """
    path = folder / META
    text = json.dumps(meta, indent=1, sort_keys=True)
    if not path.exists() and not path.is_symlink():
        if create_once(path, text):
            return None
    problem = meta_problem(folder, str(meta.get("fingerprint")))
    if problem is None:
        return None
    write_atomic(path, text)
    faults.warn_once(
        META,
        folder,
        "cachedata: %s was %s; rewritten from this CachedDataset's record",
        path,
        problem,
        repeat=logging.INFO,
    )
    return Repair(str(path), problem, "rewritten from the CachedDataset's record")


def recover_meta(folder: Path) -> Repair | None:
    """Without a CachedDataset: replace a damaged meta.json by a minimal record.

    The dataset type, transform and tree cannot be known from the data files; the record
    says so (``"recovered"``) and the next ``CachedDataset`` construction completes it.
    """
    path = folder / META
    meta, problem = _read_json_object(path)
    if meta is not None and meta.get("fingerprint") in (folder.name, None):
        return None  # readable (possibly incomplete, e.g. already recovered): nothing to repair
    if problem is None:
        problem = f"names namespace {str(meta.get('fingerprint'))[:16]!r}, not this folder's"  # type: ignore[union-attr]
    from .storage import FORMAT_VERSION  # the data files beside it are in this format

    record = {
        "cachedata_format": FORMAT_VERSION,
        "fingerprint": folder.name,
        "recovered": f"meta.json was {problem}",
    }
    write_atomic(path, json.dumps(record, indent=1, sort_keys=True))
    faults.warn_once(
        META, folder, "cachedata: %s was %s; wrote a minimal record", path, problem, repeat=logging.INFO
    )
    return Repair(str(path), problem, "replaced by a minimal record (completed by the next CachedDataset)")


# ------------------------------------------------------------------------------ schema


def data_files(folder: Path) -> list[Path]:
    """Cache data files, newest merged generation first, then shards (links left out)."""
    try:
        listing = fileset.list_files(folder)
    except OSError:
        return []
    return [folder / f.name for f in (*reversed(listing.runs), *listing.shards)]


def _file_schema(path: Path, namespace: str) -> str | None:
    """The normalized schema a data file carries, or None when the file cannot tell."""
    import h5py

    from . import schema as schema_mod
    from . import storage

    try:
        with storage.H5_LOCK, h5py.File(path, "r", locking=False) as f:
            if (
                f.attrs.get("cachedata_format") != storage.FORMAT_VERSION
                or _attr(f, "namespace") != namespace
            ):
                return None
            raw = _attr(f, "schema")
            if not storage.schema_intact(raw, _attr(f, storage.SCHEMA_SUM)):
                return None  # a damaged schema must not become the namespace's
    except Exception:  # h5py raises many types for damaged files; another file may do
        return None
    if not raw:
        return None
    try:
        return schema_mod.dumps(schema_mod.load(raw))
    except ValueError:
        return None


def _attr(f: Any, name: str) -> str | None:
    value = f.attrs.get(name)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def load_schema(folder: Path, namespace: str) -> tuple[str | None, Repair | None]:
    """The namespace's schema text (normalized), repairing ``schema.json`` when needed.

    Returns (None, ...) while nothing fixes the schema yet (no item stored). When data
    files exist, the first readable one is the authority: a damaged, missing or
    different ``schema.json`` is rewritten from it (one warning per process). A damaged
    ``schema.json`` with no data file to recover from is removed, so that the next
    stored item fixes the schema afresh.
    """
    from . import schema as schema_mod

    path = folder / SCHEMA
    text, problem = _read_text(path)
    stored: str | None = None
    if text is not None:
        try:
            stored = schema_mod.dumps(schema_mod.load(text))
        except ValueError as exc:
            problem = f"not a valid item schema ({exc})"
    files = data_files(folder)
    for file in files:
        recovered = _file_schema(file, namespace)
        if recovered is None:
            continue
        if stored == recovered:
            return stored, None
        if stored is not None:
            problem = f"different from the schema of {file.name}"
        repair = _repair_schema(folder, recovered, problem or "damaged", f"rewritten from {file.name}")
        return recovered, repair
    if stored is not None:
        return stored, None  # nothing stored yet disagrees (or no file is readable)
    if problem == "missing":
        return None, None
    # Damaged and nothing to recover from: clear it so the first stored item fixes it.
    try:
        _clear_slot(path)
        path.unlink(missing_ok=True)
    except OSError:
        pass  # read-only: this process keeps its schema in memory
    action = "removed (no readable data file to recover from; the next stored item fixes it)"
    faults.warn_once(SCHEMA, folder, "cachedata: %s was %s; %s", path, problem, action, repeat=logging.INFO)
    return None, Repair(str(path), str(problem), action)


def _repair_schema(folder: Path, text: str, problem: str, action: str) -> Repair:
    path = folder / SCHEMA
    try:
        write_atomic(path, text)
    except OSError as exc:
        action = f"recovered in memory (cannot rewrite it: {exc.strerror or exc})"
    faults.warn_once(SCHEMA, folder, "cachedata: %s was %s; %s", path, problem, action, repeat=logging.INFO)
    return Repair(str(path), problem, action)


def create_schema(folder: Path, text: str) -> bool:
    """Fix the namespace schema with the first stored item's; False when one already exists."""
    return create_once(folder / SCHEMA, text)


def repair(folder: Path) -> list[Repair]:
    """Check and repair both metadata files of a namespace folder (``cachedata verify``).

    Raises nothing: what cannot be written is reported as recovered in memory.
    """
    repairs: list[Repair] = []
    _, fixed = load_schema(folder, folder.name)
    if fixed is not None:
        repairs.append(fixed)
    try:
        fixed = recover_meta(folder)
    except OSError as exc:
        problem = meta_problem(folder, folder.name) or "damaged"
        fixed = Repair(str(folder / META), problem, f"cannot rewrite it: {exc.strerror or exc}")
    if fixed is not None:
        repairs.append(fixed)
    return repairs


# ------------------------------------------------------------------------ sibling namespaces


@dataclass(frozen=True)
class Difference:
    """How a namespace differs from its nearest sibling of the same dataset type."""

    fingerprint: str  # the sibling's
    parts: tuple[str, ...]  # inputs of the namespace fingerprint that differ, in FINGERPRINT_PARTS order
    changes: tuple[str, ...]  # ``what: the sibling's value -> this one's``, one line per difference

    @property
    def version_only(self) -> bool:
        """Only ``version=`` differs: the user asked for a fresh namespace."""
        return self.parts == ("version",)


#: What a namespace fingerprint is made of, as meta.json records it.
FINGERPRINT_PARTS = ("on-disk format", "dataset", "transform", "version", "key")


def read_metas(cache_dir: Path) -> list[dict]:
    """The meta.json of every namespace folder in ``cache_dir`` (damaged ones left out)."""
    try:
        folders = sorted(p for p in cache_dir.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []
    return [m for m in (read_meta(p) for p in folders) if m.get("fingerprint")]


def nearest_sibling(meta: dict, siblings: Iterable[dict]) -> Difference | None:
    """The sibling (a meta.json record) of ``meta``'s dataset type that differs least, or None.

    Every input of the namespace fingerprint counts, one line each: the on-disk format,
    ``version=`` and ``key=`` (a namespace whose items are keyed by another ``key=`` holds
    other items under the same numbers: worth naming), plus one line per attribute path that
    differs in the dataset and transform fingerprint trees. The sibling with the fewest lines
    wins; ties go to the smaller fingerprint, so every caller names the same one.
    """
    kind = _dataset(meta).get("type")
    if kind is None:
        return None
    best: Difference | None = None
    for other in sorted(siblings, key=lambda m: str(m.get("fingerprint"))):
        if other.get("fingerprint") == meta.get("fingerprint") or _dataset(other).get("type") != kind:
            continue
        diff = _difference(other, meta)
        if best is None or len(diff.changes) < len(best.changes):
            best = diff
    return best


def _dataset(meta: dict) -> dict:
    value = meta.get("dataset")
    return value if isinstance(value, dict) else {}


def _difference(old: dict, new: dict) -> Difference:
    """How ``new`` differs from ``old`` (two meta.json records)."""

    def value(meta: dict, part: str) -> Any:
        if part == "on-disk format":
            return meta.get("cachedata_format")
        if part in ("dataset", "transform"):
            got = meta.get(part)
            return got.get("fingerprint") if isinstance(got, dict) else None
        return meta.get(part)

    parts = tuple(p for p in FINGERPRINT_PARTS if value(old, p) != value(new, p))
    changes = []
    if "on-disk format" in parts:
        changes.append(
            f"on-disk format: {value(old, 'on-disk format')} -> {value(new, 'on-disk format')} "
            "(written by another cachedata version, never read by this one)"
        )
    for part in ("version", "key"):
        if part in parts:
            changes.append(f"{part}=: {value(old, part)!r} -> {value(new, part)!r}")
    trees: list[dict] = [m["tree"] if isinstance(m.get("tree"), dict) else {} for m in (old, new)]
    changes += diff_trees(trees[0], trees[1])
    return Difference(str(old.get("fingerprint")), parts, tuple(changes))
