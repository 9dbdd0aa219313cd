"""The ``cachedata`` command line: argument parsing and rendering over ``cachedata.admin``.

Every subcommand takes a PATH that is either a cache_dir (a folder of namespace folders)
or one namespace folder, prints an aligned table (``--json`` prints JSON to stdout
instead), and exits with:

* 0: success (``verify``: every item passed its checksum);
* 1: failure (corrupt or unreadable items found, a namespace could not be merged or
  deleted, an I/O error);
* 2: usage error (an unknown option, a bad size or duration, a PATH that does not exist,
  an unknown or ambiguous ``--namespace``, ``clear`` without ``--yes`` off a terminal).

The work is done by ``cachedata.admin`` (pure functions returning records); this module
only reads arguments and prints, the only place in cachedata that prints. It imports
neither torch, numpy nor HDF5 up front: ``info``, ``prune``, ``clear`` and ``budget`` never
need them, so they start in a fraction of a second (under 0.3 s for 10 namespaces).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from . import admin, budget, eviction
from ._version import __version__
from .admin import NamespaceInfo, VerifyResult
from .cli_help import COMMANDS, EXIT_CODES, MAIN_EPILOG
from .paths import default_cache_dir
from .units import format_duration, format_size, parse_duration, parse_size
from .usage import Usage

logger = logging.getLogger("cachedata")

#: Width of a fingerprint in tables (the full one is in --json and in folder names).
SHORT_FP = 12
#: Bad keys listed per file in the table output of ``verify`` (--json lists them all).
_MAX_LISTED_KEYS = 50


class UsageError(Exception):
    """Bad input from the command line (exit code 2)."""


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


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"{args.parser.prog}: {message}", file=sys.stderr)


# ============================================================================ arguments


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


def _resolve_path(args: argparse.Namespace) -> Path:
    path = Path(args.path).expanduser() if args.path is not None else default_cache_dir()
    path = Path(os.path.abspath(path))  # "." names no namespace; a fingerprint is a folder name
    if not path.exists():
        raise UsageError(f"PATH {path} does not exist; pass a cache_dir or one namespace folder in it")
    if not path.is_dir():
        raise UsageError(f"PATH {path} is not a folder; pass a cache_dir or one namespace folder in it")
    return path


def _targets(args: argparse.Namespace, path: Path) -> list[Path]:
    namespaces = admin.find_namespaces(path)
    fp = getattr(args, "namespace", None)
    if fp is None:
        return namespaces
    try:
        return [admin.select_namespace(namespaces, fp, path)]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ============================================================================ info


def _info_json(info: NamespaceInfo) -> dict:
    return {**asdict(info), "created_iso": _iso(info.created), "last_used_iso": _iso(info.last_used)}


def _budget_json(u: Usage) -> dict:
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


def _budget_lines(u: Usage) -> list[str]:
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


def _no_namespaces_text(found: admin.Inspection) -> str:
    """What ``info`` says when PATH holds no namespace: the cache folders below it, or what it expected."""
    path = found.path
    if found.cache_folders:
        rows = [[f.path, str(f.namespaces), format_size(f.bytes)] for f in found.cache_folders]
        table = render_table(["CACHE FOLDER", "NAMESPACES", "SIZE"], rows, right=(1, 2))
        return (
            f"no namespaces directly under {path}; it holds {len(found.cache_folders)} cache folder(s):\n"
            f"{table}\nrun `cachedata info FOLDER` on one of them"
        )
    return (
        f"no namespaces under {path}: expected a cache_dir (the folder given to CachedDataset, holding "
        "one folder per namespace named by its 64-hex fingerprint, with meta.json, schema.json and .h5 "
        "files), one namespace folder, or a folder of cache_dirs"
    )


def _info_table(found: admin.Inspection, now: float) -> str:
    header = ["FINGERPRINT", "ITEMS", "SIZE", "MERGED", "SHARDS", "DATASET", "TRANSFORM", "CREATED",
              "LAST USED", "VERSIONS", "IN USE BY"]  # fmt: skip
    rows = [
        [i.fingerprint[:SHORT_FP], str(i.items), format_size(i.bytes),
         str(i.merged_files), str(i.shard_files), _dataset_text(i), _clip(i.transform_repr, 40),
         _when(i.created), _ago(i.last_used, now), _versions_text(i.versions), " ".join(i.in_use_by) or "-"]
        for i in found.namespaces
    ]  # fmt: skip
    return render_table(header, rows, right=(1, 2, 3, 4))


def _info_details(info: NamespaceInfo, now: float) -> str:
    from .storage import FORMAT_VERSION  # HDF5: details count items, which loads it anyway

    diff = info.differs_from
    lines = [
        f"namespace {info.fingerprint}",
        f"  path:       {info.path}",
        f"  items:      {info.items}   files: {info.merged_files} merged, {info.shard_files} shards"
        f"   size: {format_size(info.bytes)} ({info.bytes} bytes)"
        + ("   (merging now)" if info.merging else ""),
        *(
            [
                f"  format:     {info.format}: written by another cachedata version and never read by "
                f"this one (format {FORMAT_VERSION}); `cachedata clear --namespace {info.fingerprint[:SHORT_FP]}` "
                "removes it"
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
    details = args.verbose or args.namespace is not None
    try:
        found = admin.inspect(path, namespace=args.namespace, items=args.items or details)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    now = time.time()
    if args.json:
        out = {"path": found.path, "items_counted": found.items_counted,
               "namespaces": [_info_json(i) for i in found.namespaces], "budget": _budget_json(found.usage)}  # fmt: skip
        if not found.namespaces:
            out["cache_folders"] = [asdict(f) for f in found.cache_folders]
        _print_json(out)
        return 0
    if not found.namespaces:
        print(_no_namespaces_text(found))
        print("\n".join(_budget_lines(found.usage)))
        return 0
    print(_info_table(found, now))
    total = sum(i.bytes for i in found.namespaces)
    print(f"\n{len(found.namespaces)} namespace(s), {format_size(total)} under {path}")
    if any(i.items_counted == "rows" for i in found.namespaces):
        print("items: rows stored (an item two jobs computed at once counts twice until the next merge); "
              "--items counts distinct items")  # fmt: skip
    print("\n".join(_budget_lines(found.usage)))
    if details:
        for info in found.namespaces:
            print()
            print(_info_details(info, now))
    return 0


# ============================================================================ verify, merge


def _verify_text(results: Sequence[VerifyResult]) -> str:
    header = ["FINGERPRINT", "FILES", "ITEMS", "CORRUPT", "STATUS"]
    rows = [
        [r.fingerprint[:SHORT_FP], str(r.files), str(r.items), str(sum(not p.unchecked for p in r.problems)),
         "ok" if r.ok else "CORRUPT" if any(not p.unchecked for p in r.problems) else "UNCHECKED"]
        for r in results
    ]  # fmt: skip
    lines = [render_table(header, rows, right=(1, 2, 3))]
    for r in results:
        lines += [f"\nrepaired {fix}" for fix in r.repaired]
        by_file: dict[str, list[admin.Problem]] = {}
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
    from tqdm.auto import tqdm  # only here: it costs 0.1 s to import

    path = _resolve_path(args)
    targets = _targets(args, path)
    enabled = sys.stderr.isatty() if args.progress is None else args.progress
    bar = tqdm(total=0, desc="verifying", unit="item", file=sys.stderr, disable=not enabled)

    def grow(n: int) -> None:
        bar.total = (bar.total or 0) + n
        bar.refresh()

    try:
        results = [admin.verify_namespace(p, grow=grow, progress=bar.update) for p in targets]
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
        unchecked = sum(1 for p in bad if p.unchecked)
        _fail(args, f"{items} corrupt item(s) and {len(bad) - items - unchecked} unreadable file(s) in {files} "
                    "file(s); they are recomputed on next use (or run `cachedata clear`)"
                    + (f"; {unchecked} file(s) could not be checked now: run verify again" if unchecked else ""))  # fmt: skip
        return 1
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    path = _resolve_path(args)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    results = [
        admin.merge_namespace(p, wait=args.wait, progress=progress, full=args.full)
        for p in _targets(args, path)
    ]
    if args.json:
        _print_json({"path": str(path), "namespaces": [asdict(r) for r in results]})
    elif not results:
        print(f"no namespaces under {path}")
    else:
        header = ["FINGERPRINT", "FILES BEFORE", "FILES AFTER", "ITEMS", "RESULT", "DETAIL"]
        rows = [[r.fingerprint[:SHORT_FP], str(r.files_before), str(r.files_after), str(r.items), r.status,
                 r.message] for r in results]  # fmt: skip
        print(render_table(header, rows, right=(1, 2, 3)))
    failed = [r for r in results if r.status in ("busy", "failed")]
    for r in failed:
        _fail(args, f"could not merge {r.path}: {r.message}")
    for r in results:
        if r.dropped:
            _fail(args, f"{r.path}: left out {r.dropped} corrupt item(s)")
    return 1 if failed else 0


# ============================================================================ clear, prune


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_clear(args: argparse.Namespace) -> int:
    path = _resolve_path(args)
    infos = [admin.inspect_namespace(p) for p in _targets(args, path)]
    what = f"{len(infos)} namespace(s) ({format_size(sum(i.bytes for i in infos))}) under {path}"
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
        busy = [f"{i.fingerprint[:SHORT_FP]} is {i.busy}" for i in infos if i.busy]
        if not _confirm(f"Delete {what}{' (' + '; '.join(busy) + ')' if busy else ''}?"):
            print("nothing deleted", file=sys.stderr)
            return 1
    removals = admin.delete([Path(i.path) for i in infos])
    deleted = [r for r in removals if r.removed]
    errors = [r for r in removals if not r.removed]
    if args.json:
        _print_json({"path": str(path), "deleted": [r.fingerprint for r in deleted],
                     "bytes": sum(r.bytes for r in deleted),
                     "errors": [{"fingerprint": r.fingerprint, "error": r.why_kept} for r in errors]})  # fmt: skip
    else:
        for r in deleted:
            print(f"deleted {r.fingerprint[:SHORT_FP]}  {format_size(r.bytes)}  {r.path}")
    for r in errors:
        _fail(args, f"could not delete {r.path}: {r.why_kept}")
    return 1 if errors else 0


def _prune_json(done: admin.PruneResult) -> dict:
    why_not = {r.fingerprint: r.why_kept for r in done.removals if not r.removed}
    kept = [*done.plan.keep, *(i for i, _ in done.plan.remove if i.fingerprint in why_not)]
    removed = [{"fingerprint": i.fingerprint, "bytes": i.bytes, "last_used": i.last_used, "reason": why,
                "error": why_not.get(i.fingerprint)} for i, why in done.plan.remove]  # fmt: skip
    return {
        "path": done.path,
        "dry_run": done.dry_run,
        "removed": removed,
        "kept": [
            {"fingerprint": i.fingerprint, "bytes": i.bytes, "last_used": i.last_used} for i in done.plan.keep
        ],
        "spared": [{"fingerprint": i.fingerprint, "reason": why} for i, why in done.plan.spared],
        "freed_bytes": done.freed_bytes,
        "remaining_bytes": sum(i.bytes for i in kept),
    }


def cmd_prune(args: argparse.Namespace) -> int:
    if args.older_than is None and args.max_bytes is None:
        raise UsageError("give --older-than DURATION, --max-bytes SIZE or both (e.g. --older-than 7d)")
    path = _resolve_path(args)
    now = time.time()
    done = admin.prune(
        path, older_than=args.older_than, max_bytes=args.max_bytes, dry_run=args.dry_run, now=now
    )
    plan = done.plan
    if args.json:
        _print_json(_prune_json(done))
    else:
        verb = "would remove" if args.dry_run else "removed"
        if plan.remove:
            rows = [[i.fingerprint[:SHORT_FP], format_size(i.bytes), f"{_when(i.last_used)} ({_ago(i.last_used, now)})",
                     why] for i, why in plan.remove]  # fmt: skip
            print(render_table(["FINGERPRINT", "SIZE", "LAST USED", "REASON"], rows, right=(1,)))
            print()
        for info, why in plan.spared:
            print(f"kept {info.fingerprint[:SHORT_FP]} ({format_size(info.bytes)}): {why}")
        kept = sum(i.bytes for i in plan.keep)
        print(f"{verb} {len(plan.remove) - len(done.failed)} namespace(s) ({format_size(done.freed_bytes)}); "
              f"kept {len(plan.keep)} ({format_size(kept)}) under {path}")  # fmt: skip
    for r in done.failed:
        _fail(args, f"kept {r.path}: {r.why_kept}")
    return 1 if any(r.failed for r in done.failed) else 0


# ============================================================================ budget


def _size_or_usage_error(text: str) -> int:
    try:
        return budget.parse_max_bytes(text, where="SIZE")
    except ValueError as exc:
        raise UsageError(f"{exc}; or 'none' to remove the budget") from None


def cmd_budget(args: argparse.Namespace) -> int:
    value = None
    if args.size is not None and args.size.strip().lower() not in ("none", "off"):
        value = _size_or_usage_error(args.size)
    path = Path(args.path).expanduser()
    if args.size is not None and not path.exists():
        path.mkdir(parents=True)  # a budget may be set before the first run
    cache_dir = admin.cache_dir_of(_resolve_path(args))
    if args.size is not None:
        budget.write_limit(cache_dir, value)
    u, note = admin.budget_usage(cache_dir)
    evicted: tuple[eviction.Eviction, ...] = ()
    if args.enforce and u.limit.max_bytes is not None:
        done = eviction.enforce(cache_dir, u.limit.max_bytes, keep=())
        if not done.locked:
            _fail(args, f"another process holds {cache_dir / '.budget.lock'}; nothing evicted, try again")
            return 1
        evicted = done.evicted
        u, note = admin.budget_usage(cache_dir)
    try:
        folder: int | str | None = budget.folder_limit(cache_dir)
    except ValueError as exc:
        folder = f"unreadable: {exc}"
    if args.json:
        _print_json({**_budget_json(u), "folder_max_bytes": folder, "evicted": [asdict(e) for e in evicted]})
    else:
        for e in evicted:
            print(
                f"evicted {e.fingerprint[:SHORT_FP]}  {format_size(e.bytes)}  last used {_when(e.last_used)}"
            )
        print("\n".join(_budget_lines(u)))
        if u.limit.source.startswith("$"):
            print(f"the folder's own setting ({budget.SETTINGS_NAME}): "
                  f"{format_size(folder) if isinstance(folder, int) else folder or 'none'}; "
                  f"${budget.ENV_VAR} overrides it for processes started with it set")  # fmt: skip
    if note:
        _fail(args, f"${budget.ENV_VAR}: {note}")
    return 0


# ============================================================================ parser


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


def build_parser(prog: str = "cachedata") -> argparse.ArgumentParser:
    """The argument parser with one subparser per command, each with an example epilog."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description="Inspect and maintain cachedata cache folders.",
                                     epilog=MAIN_EPILOG, formatter_class=raw)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"cachedata {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "info": cmd_info, "verify": cmd_verify, "merge": cmd_merge, "clear": cmd_clear, "prune": cmd_prune,
        "budget": cmd_budget,
    }  # fmt: skip
    for name, (summary, epilog) in COMMANDS.items():
        sub = subs.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                              epilog=epilog + "\n" + EXIT_CODES, formatter_class=raw)  # fmt: skip
        sub.set_defaults(func=handlers[name], parser=sub)
        _add_common(sub, path_required=name in ("clear", "budget"), namespace=name not in ("prune", "budget"))
        if name == "info":
            sub.add_argument("--items", action="store_true",
                             help="count distinct items through every file's index (slower) instead of "
                                  "summing the rows the files record")  # fmt: skip
            sub.add_argument("--verbose", "-v", action="store_true",
                             help="add details per namespace (distinct items counted) and why it differs "
                                  "from its nearest sibling")  # fmt: skip
        if name in ("verify", "merge"):
            sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                             help="show a progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip
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
