"""The set of files in one namespace folder: their names, their levels, and what to merge next.

Folder layout (format version 2)::

    <cache_dir>/<fingerprint>/
        meta.json                       what produced the namespace (written once)
        schema.json                     the item structure, fixed by the first stored item
        last_used                       its mtime records the last use (touched hourly at most)
        shard-r<rank>-w<worker>-p<pid>-<token>-<seq>.h5   sealed per-process shards
        merged-<generation>.h5          runs written by an explicit merge (or holding one)
        run-<generation>.h5             runs written by background merges
        merge.lock                      held while a process merges
        .tmp-<host>-<pid>-<hex>-<name>  files being written (renamed into place when complete)
        retired-<ns>-<name>             superseded files kept a while for readers on other nodes

Runs (merged and run files alike) are kept to at most ``MAX_RUNS``: a merge that would leave
more folds the newest runs into its output, and ``fold`` picks how many by the binomial
schedule, about the least rewriting any policy keeping that many files can do. A reader
therefore needs at most ``MAX_RUNS`` runs plus the shards not merged yet (fewer than
``SHARD_LIMIT``, or twice that while writers outrun merges), and a cache built in N equal
steps writes each byte at most t + 1 times (its shard, then t merges) where
C(MAX_RUNS + t, t) > N. Everything here is plain file-system work, usable without torch.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

SHARD_RE = re.compile(r"^shard-r(\d+)-w(\w+)-p(\d+)-([0-9a-f]+)-(\d+)\.h5$")
RUN_RE = re.compile(r"^(merged|run)-(\d+)\.h5$")
RETIRED_RE = re.compile(r"^retired-(\d+)-")
TMP_RE = re.compile(r"^\.tmp-(.+?)-(\d+)-[0-9a-f]{8}-")
LOCK_NAME = "merge.lock"

#: Errors of the environment, not of a file (too many open files, no memory, a transient
#: I/O error): never taken for corruption anywhere in cachedata.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EINTR,
        errno.EAGAIN,
        errno.EIO,
        errno.ESTALE,
        errno.EBUSY,
    }
)
#: Shards (unmerged files) that trigger a background merge.
SHARD_LIMIT = 16
#: Runs (merged and run files) a namespace keeps at most: merges fold the newest runs into
#: their output so that no more remain. More runs mean fewer rewrites (C(MAX_RUNS + t, t)
#: steps cost about t rewrites per byte) and more files for every reader.
MAX_RUNS = 24
#: Superseded files stay (renamed) this long, in seconds, on network filesystems.
RETIRE_SECONDS = 600.0
#: A merge lock older than this (seconds) whose owner cannot be checked is considered stale.
LOCK_STALE_SECONDS = 3600.0


@dataclass(frozen=True)
class DataFile:
    """One shard or run as listed: its name and size in bytes."""

    name: str
    size: int

    @property
    def is_shard(self) -> bool:
        return self.name.startswith("shard-")

    @property
    def is_background_run(self) -> bool:
        """A run made by a background merge: new items that no explicit merge took in yet."""
        return self.name.startswith("run-")

    @property
    def generation(self) -> int:
        m = RUN_RE.match(self.name)
        return int(m.group(2)) if m else 0


@dataclass(frozen=True)
class Listing:
    """The data files of a namespace at one moment (symbolic links left out)."""

    shards: tuple[DataFile, ...]
    runs: tuple[DataFile, ...]  # oldest generation first
    links: tuple[str, ...]  # symbolic links named like data files (never created by cachedata)

    @property
    def files(self) -> tuple[DataFile, ...]:
        return self.runs + self.shards

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.files)

    def next_generation(self) -> int:
        return max((r.generation for r in self.runs), default=0) + 1


class ListingError(OSError):
    """The folder could not be listed for a transient reason (too many open files, ...)."""


def is_data_file(name: str) -> bool:
    return bool(SHARD_RE.match(name) or RUN_RE.match(name))


def list_files(folder: Path) -> Listing:
    """One directory scan: shards, runs (by generation) and stray links; empty when missing."""
    shards: list[DataFile] = []
    runs: list[tuple[int, DataFile]] = []
    links: list[str] = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                name = e.name
                if not is_data_file(name):
                    continue
                if e.is_symlink():
                    links.append(name)  # data files are only ever created in place
                    continue
                try:
                    size = e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # merged away while we looked
                if name.startswith("shard-"):
                    shards.append(DataFile(name, size))
                else:
                    runs.append((int(RUN_RE.match(name).group(2)), DataFile(name, size)))
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise ListingError(exc.errno, f"cannot list {folder}: {exc.strerror}") from exc
        raise
    return Listing(
        tuple(sorted(shards, key=lambda f: f.name)), tuple(f for _, f in sorted(runs)), tuple(sorted(links))
    )


def merged_name(generation: int, *, background: bool = False) -> str:
    """``merged-<generation>.h5``, or ``run-<generation>.h5`` for a background merge's output."""
    return f"{'run' if background else 'merged'}-{generation:06d}.h5"


def plan(listing: Listing, *, everything: bool = False, explicit: bool = False) -> list[DataFile]:
    """The files to merge next into one run, or [] when the layout is within its bounds.

    - ``everything``: all files into one (``cachedata merge --full``).
    - ``explicit`` (``merge()``, the end of ``warm()``, ``cachedata merge``): every item
      written since the last explicit merge (shards and background runs) into one file.
    - otherwise (background): SHARD_LIMIT shards or more into one run; and a layout holding
      more than MAX_RUNS runs (written by an older version) folds its newest run down.

    Either way the newest older runs that ``fold`` picks join the merge, so that at most
    MAX_RUNS runs remain after it; a few new items never rewrite a big old file.
    """
    if everything:
        files = list(listing.files)
        return (
            files if len(files) > 1 or (files and (files[0].is_shard or files[0].is_background_run)) else []
        )
    runs = list(listing.runs)
    if explicit:
        pile = list(listing.shards) + [r for r in runs if r.is_background_run]
    elif len(listing.shards) >= SHARD_LIMIT:
        pile = list(listing.shards)
    elif len(runs) > MAX_RUNS:
        pile = runs[-1:]
    else:
        return []
    if not pile:
        return []
    names = {f.name for f in pile}
    older = [r for r in runs if r.name not in names]
    return pile + fold(older, sum(f.size for f in pile), listing.next_generation())


def fold(older: list[DataFile], pile_bytes: int, generation: int) -> list[DataFile]:
    """The newest of ``older`` (runs, oldest generation first) to merge with a pile of
    ``pile_bytes`` bytes into run ``generation``, so that at most MAX_RUNS runs remain.

    Every merge takes a generation, so the gap between a run's generation and the one below
    it counts the merges ("steps") it holds. The runs form a stack, each a merge of a
    contiguous stretch of steps; with k runs allowed from run j up, a run of c steps is at
    level r, the largest with C(k + r, r) <= c, and it is merged again (with everything
    above it) once the runs above it and the pile hold C(k + r, r + 1) steps. That is the
    online binomial schedule: N equal steps merge each byte at most t times (its step's own
    merge included) where C(MAX_RUNS + t, t) > N, which is optimal at N = C(MAX_RUNS + t, t)
    - 1 and close to it between (24 runs, 1,000 steps: 3.81x written in all against 3.65x at
    best). Each byte is written at most twice up to 24 steps, 3 times up to 324, 4 times up
    to 2,924; the size tiers this replaced (8 runs per tier) reached 3 at 8 steps, 4 at 64
    and 5 at 512. Counting steps rather than bytes keeps the schedule whatever the step
    sizes; one size rule on top: an older run joins only when the bytes newer than it in
    the merge are at least its own, so a few new items never rewrite a big old run (a 1 TB
    cache gaining 1 GB a step is not rewritten at step 25), and the newest run always may.
    """
    if len(older) < MAX_RUNS:
        return []  # the merge's output fits beside them
    gens = [r.generation for r in older]
    counts = [g - below for below, g in zip([0, *gens], gens)]
    # The lowest run from which every run up may join, by the size rule.
    lowest, newer = len(older) - 1, pile_bytes
    for j in range(len(older) - 2, -1, -1):
        newer += older[j + 1].size
        if older[j].size > newer:
            break
        lowest = j
    above = generation  # steps in the runs and the pile together (generations count from 1)
    for j in range(MAX_RUNS):
        above -= counts[j]
        slots = MAX_RUNS - j
        if j < lowest:
            continue
        if slots == 1:
            return older[j:]
        level = _level(counts[j], slots)
        if above >= math.comb(slots + level, level + 1):
            return older[j:]
    return older[MAX_RUNS - 1 :]  # over budget whatever the sizes: the bound comes first


def _level(steps: int, slots: int) -> int:
    """The largest r with C(slots + r, r) <= steps (slots >= 2: r grows like sqrt(steps))."""
    r = 0
    while math.comb(slots + r + 1, r + 1) <= steps:
        r += 1
    return r


def overdue(listing: Listing) -> bool:
    """True when merges lag far behind writers: twice SHARD_LIMIT shards, or twice MAX_RUNS
    runs. Writers that can wait (DataLoader workers) then merge before writing on, which
    bounds the file count even when a cold pass writes as fast as the disk does."""
    return len(listing.shards) >= 2 * SHARD_LIMIT or len(listing.runs) >= 2 * MAX_RUNS


def output_name(files: list[DataFile], generation: int, *, explicit: bool) -> str:
    """The merged file's name: a background run only when nothing explicit went into it."""
    background = not explicit and all(f.is_shard or f.is_background_run for f in files)
    return merged_name(generation, background=background)


# ------------------------------------------------------------------- row counts in an xattr

#: Extended attribute of every data file: its index rows in ASCII decimal. ``storage`` sets it
#: on the temporary file before the rename, so a published file carries it from its first
#: moment; ``cachedata info`` sums it instead of opening every index (numpy and HDF5).
ROWS_XATTR = "user.cachedata.rows"


def set_rows(path: Path, rows: int) -> None:
    """Record ``rows`` on the file at ``path``; quietly nothing where the filesystem has no
    user xattrs (ENOTSUP, EPERM) or the platform has no ``os.setxattr``: readers then count."""
    try:
        os.setxattr(path, ROWS_XATTR, str(rows).encode("ascii"))
    except (OSError, AttributeError):
        pass


def stored_rows(path: Path) -> int | None:
    """The rows ``set_rows`` recorded on ``path``; None when the file lacks the attribute
    (written elsewhere or before it existed, copied without xattrs) or is gone."""
    try:
        raw = os.getxattr(path, ROWS_XATTR)
    except (OSError, AttributeError):
        return None
    return int(raw) if raw.isdigit() else None


def listing_rows(folder: Path, listing: Listing) -> int | None:
    """The rows of all the listed data files from their attributes, without opening one; None
    when any lacks it (or was merged away since the listing): count through the index then."""
    total = 0
    for f in listing.files:
        rows = stored_rows(folder / f.name)
        if rows is None:
            return None
        total += rows
    return total


# ----------------------------------------------------------------------- names of temporaries


def tmp_name(final: str) -> str:
    """The temporary name a file is written under before ``os.replace`` publishes it.

    It names the host and pid, so that ``sweep`` can tell a dead writer's leftovers from a
    live writer's file (``TMP_RE`` parses it back).
    """
    return f".tmp-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}-{final}"


def create_once(path: Path, text: str) -> None:
    """Create ``path`` with ``text`` unless it exists (FileExistsError), atomically.

    A hard link of a complete temporary file is atomic and exclusive, also on NFS.
    """
    tmp = path.with_name(tmp_name(path.name))
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary name, then ``os.replace``)."""
    tmp = path.with_name(tmp_name(path.name))
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------ retiring and sweeping

#: Filesystem types where another machine may hold a file open (checked in /proc/self/mounts).
_NETWORK_FS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "9p",
    "fuse",
)


def shared_filesystem(path: Path) -> bool:
    """True when ``path`` lives on a network filesystem (or CACHEDATA_SHARED_FS=1 says so)."""
    forced = os.environ.get("CACHEDATA_SHARED_FS")
    if forced is not None:
        return forced not in ("", "0", "false", "no")
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, fstype = parts[1], parts[2]
    except OSError:
        return False
    return fstype.startswith(_NETWORK_FS)


def retire(folder: Path, names: set[str]) -> None:
    """Take superseded files out of the listing without pulling them from under readers.

    Locally an unlinked file stays readable through descriptors and maps already open. On
    NFS another client's open file must still exist (or its reads fail with ESTALE), so it
    is renamed and deleted by a later ``sweep`` once older than RETIRE_SECONDS.
    """
    stamp = time.time_ns()
    keep = shared_filesystem(folder)
    for name in names:
        try:
            if keep:
                os.replace(folder / name, folder / f"retired-{stamp}-{name}")
            else:
                os.unlink(folder / name)
        except FileNotFoundError:
            pass
    sweep(folder)


def sweep(folder: Path, *, retire_seconds: float = RETIRE_SECONDS) -> list[str]:
    """Delete retired files past their grace period and temporary files of dead writers."""
    removed = []
    now = time.time()
    host = socket.gethostname()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = RETIRED_RE.match(e.name)
        dead = False
        if m:
            dead = now - int(m.group(1)) / 1e9 > retire_seconds
        else:
            t = TMP_RE.match(e.name)
            if t:
                try:
                    age = now - e.stat().st_mtime
                except OSError:
                    continue
                same_host = t.group(1) == host
                dead = (same_host and not alive(int(t.group(2)))) or age > LOCK_STALE_SECONDS
        if dead:
            try:
                os.unlink(e.path)
                removed.append(e.name)
            except OSError:
                pass
    return removed


def alive(pid: int) -> bool:
    """True when a process with this id exists on this host (or we may not signal it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ------------------------------------------------------------------------------ the merge lock


def acquire(folder: Path, *, wait: float) -> bool:
    """Take the namespace's merge lock: one merge at a time per namespace, across processes
    and hosts. False on timeout."""
    return acquire_lock(folder / LOCK_NAME, wait=wait)


def acquire_lock(lock: Path, *, wait: float) -> bool:
    """Take a lock file (exclusively created, naming its owner); a dead owner's lock is broken.

    False when another live process still holds it after ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    while True:
        try:
            create_once(lock, me)
            return True
        except FileExistsError:
            if lock_stale(lock):
                lock.unlink(missing_ok=True)
                continue
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def lock_stale(lock: Path) -> bool:
    """A lock whose owner died on this host, or older than LOCK_STALE_SECONDS, may be broken."""
    try:
        owner = json.loads(lock.read_text())
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False
    if not isinstance(owner, dict):
        return age > LOCK_STALE_SECONDS
    if owner.get("host") == socket.gethostname():
        try:
            return not alive(int(owner.get("pid", -1)))
        except (TypeError, ValueError):
            return age > LOCK_STALE_SECONDS
    return age > LOCK_STALE_SECONDS


def locked(folder: Path) -> bool:
    """True while a live process holds the merge lock."""
    lock = folder / LOCK_NAME
    return lock.exists() and not lock_stale(lock)


def release(folder: Path) -> None:
    """Drop the merge lock if this process holds it."""
    release_lock(folder / LOCK_NAME)


def release_lock(lock: Path) -> None:
    """Remove a lock file if this process holds it."""
    try:
        owner = json.loads(lock.read_text())
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            lock.unlink()
    except (OSError, ValueError, AttributeError):
        pass
