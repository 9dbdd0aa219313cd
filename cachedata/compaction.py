"""Merging files of a namespace into runs, in the foreground or on a background thread.

A merge reads the sources' indexes, checks every payload against its checksum straight
from a read-only map of the source (no copy through Python), and moves the live byte
ranges of each source into the new run with ``os.copy_file_range`` (pread/pwrite where
that is unsupported, or on network filesystems). Only then, under the namespace's merge
lock, are the sources retired. Whatever stops a merge midway (an error, SIGKILL, a full
disk) leaves the sources in place: a merge never retires a file it has not fully read and
rewritten, and a resource error (too many open files, no memory) is never taken for
corruption.

Background merges run on one daemon thread per process, started after a seal or from
``len()``, so no training step waits for them; the lock makes them one per namespace.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import fileset, scrub, storage
from .faults import CorruptFileError, TransientError, limit_hint, transient, warn_once, warn_transient
from .payloads import Reader
from .progress import progress_bar
from .storage import FileIndex

logger = logging.getLogger("cachedata")

#: A process looks at the listing for background work at most this often, in seconds.
CHECK_EVERY = 0.5
#: A DataLoader worker or an exiting process waits this long, in seconds, for its merge.
JOIN_AT_EXIT = 3.0


@dataclass(frozen=True)
class Target:
    """What a merge needs to know about the namespace (plain, picklable, thread-safe)."""

    folder: Path
    fingerprint: str
    schema_text: str
    nslots: int
    compression: str | None


@dataclass(frozen=True)
class Outcome:
    """One merge: the new run, what it replaced, and what it left out."""

    run: str
    sources: tuple[str, ...]
    items: int  # rows in the new file (-1 when a background run was only renamed)
    dropped: int  # rows whose bytes failed their checksum (recomputed on next use)
    bytes_written: int


def merge_files(target: Target, files: list[fileset.DataFile], *, run: str, progress=None) -> Outcome | None:
    """Merge ``files`` into the new file ``run`` and retire them; None when nothing was done.

    The caller holds the namespace's merge lock. Raises TransientError (nothing changed on
    disk) when the environment fails; a malformed source is retired with a warning, since
    its items are unreadable in any case.
    """
    folder = target.folder
    loaded: list[tuple[int, FileIndex]] = []  # (priority: lower wins duplicates, index)
    malformed: set[str] = set()
    # Newest first: shards, then runs by descending generation (fresh bytes win duplicates).
    order = sorted(files, key=lambda f: (not f.is_shard, -_generation(f.name), f.name))
    for prio, f in enumerate(order):
        try:
            fi = storage.read_checked(
                folder / f.name, namespace=target.fingerprint, schema=target.schema_text, nslots=target.nslots
            )
        except FileNotFoundError:
            return None  # cleared meanwhile (merges never remove files they do not hold)
        except CorruptFileError as exc:
            if (folder / f.name).exists():
                warn_once("corrupt:" + f.name, folder, "cachedata: dropping unreadable cache file %s", exc)
                malformed.add(f.name)
            continue
        loaded.append((prio, fi))
    if not loaded:
        if malformed:
            fileset.retire(folder, malformed)
        return None
    # The output is fsynced only when the merge retires a run. A run may already be on disk,
    # and removing it must not leave its items only in memory. Shards were never fsynced, so
    # a power cut loses them either way (their checksums catch what it tears). Skipping the
    # fsync makes the explicit merge after a cold pass 1.7x faster.
    durable = any(not fileset.SHARD_RE.match(fi.path.name) for _, fi in loaded)
    if target.compression or any(fi.compressed for _, fi in loaded):
        outcome = _merge_decoded(target, loaded, run, progress, durable=durable)
    else:
        outcome = _merge_ranges(target, loaded, run, progress, durable=durable)
    fileset.retire(folder, {fi.path.name for _, fi in loaded} | malformed)
    return outcome


def _generation(name: str) -> int:
    m = fileset.RUN_RE.match(name)
    return int(m.group(2)) if m else 1 << 62


def _winners(loaded: list[tuple[int, FileIndex]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys ascending, source number, row) with one row per key: the lowest priority wins."""
    keys = np.concatenate([np.asarray(fi.keys, np.int64) for _, fi in loaded])
    src = np.concatenate([np.full(len(fi.keys), i, np.int64) for i, (_, fi) in enumerate(loaded)])
    rows = np.concatenate([np.arange(len(fi.keys), dtype=np.int64) for _, fi in loaded])
    prio = np.asarray([p for p, _ in loaded], np.int64)[src]
    order = np.lexsort((prio, keys))
    keys, src, rows = keys[order], src[order], rows[order]
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first], src[first], rows[first]


def _merge_ranges(
    target: Target, loaded: list[tuple[int, FileIndex]], run: str, progress, *, durable: bool
) -> Outcome:
    """Uncompressed: copy each source's live byte ranges whole and rebase the offsets."""
    keys, src, rows = _winners(loaded)
    use_map = not fileset.shared_filesystem(target.folder)
    readers: list[Reader] = []
    try:
        for _, fi in loaded:
            readers.append(Reader(fi, map_file=use_map))
            try:
                readers[-1].open()
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise TransientError(exc.errno, f"{fi.path}: {exc.strerror}") from exc
        new_offsets = np.zeros(len(keys), np.int64)
        keep = np.zeros(len(keys), bool)
        pieces: list[storage.Piece] = []
        at = 0
        for s, (_, fi) in enumerate(loaded):
            mine = np.flatnonzero(src == s)
            if not len(mine):
                continue
            r = rows[mine]
            bad = [row for row, _ in scrub.check_rows(readers[s], fi, r)]
            good = ~np.isin(r, np.asarray(bad, np.int64))
            if not good.all():
                warn_once(
                    "corrupt:" + fi.path.name, target.folder,
                    "cachedata: corrupt data in %s (%d item(s) failed their checksum); left out of the "
                    "merge, they are recomputed and rewritten on next use",
                    fi.path, int((~good).sum()),
                )  # fmt: skip
            mine, r = mine[good], r[good]
            keep[mine] = True
            # Live ranges in file order, adjacent ones joined: one copy per stretch of bytes.
            by_off = np.argsort(np.asarray(fi.offsets[r], np.int64), kind="stable")
            mine, r = mine[by_off], r[by_off]
            offs = np.asarray(fi.offsets[r], np.int64)
            sizes = np.asarray(fi.sizes[r], np.int64)
            starts = np.ones(len(r), bool)
            starts[1:] = offs[1:] != offs[:-1] + sizes[:-1]
            group = np.cumsum(starts) - 1
            g_start = offs[starts]
            g_end = np.zeros(int(starts.sum()), np.int64)
            np.maximum.at(g_end, group, offs + sizes)
            g_dst = at + np.concatenate([[0], np.cumsum(g_end - g_start)[:-1]]).astype(np.int64)
            new_offsets[mine] = g_dst[group] + (offs - g_start[group])
            base = fi.data_offset or 0
            pieces += [
                storage.Piece(readers[s].fd, base + int(a), int(d), int(b - a))
                for a, b, d in zip(g_start.tolist(), g_end.tolist(), g_dst.tolist())
                if b > a
            ]
            at += int((g_end - g_start).sum())
        dropped = int((~keep).sum())
        k_src, k_rows = src[keep], rows[keep]

        def column(name: str) -> np.ndarray:
            return _gather(loaded, k_src, k_rows, name)

        fi = storage.write_merged(
            target.folder / run,
            namespace=target.fingerprint,
            schema=target.schema_text,
            keys=keys[keep],
            offsets=new_offsets[keep],
            sizes=column("sizes"),
            checksums=column("checksums"),
            slots=column("slots").reshape(int(keep.sum()), target.nslots),
            pieces=pieces,
            total=at,
            sources=tuple(fi.path.name for _, fi in loaded),
            use_copy_file_range=storage.USE_COPY_FILE_RANGE and use_map,
            durable=durable,
            progress=progress,
        )
    finally:
        for reader in readers:
            reader.close()
    return Outcome(run, fi.sources, len(fi.keys), dropped, fi.file_bytes)


def _gather(loaded: list[tuple[int, FileIndex]], src: np.ndarray, rows: np.ndarray, name: str) -> np.ndarray:
    """One index column for (source, row) pairs, in their order."""
    first = getattr(loaded[0][1], name)
    out = np.empty((len(src), *first.shape[1:]), np.uint64 if name == "checksums" else np.int64)
    for s, (_, fi) in enumerate(loaded):
        mine = np.flatnonzero(src == s)
        if len(mine):
            out[mine] = getattr(fi, name)[rows[mine]]
    return out


def _merge_decoded(
    target: Target, loaded: list[tuple[int, FileIndex]], run: str, progress, *, durable: bool
) -> Outcome:
    """Compressed namespaces: payloads go through h5py (decompressed, checked, recompressed)."""
    keys, src, rows = _winners(loaded)
    readers = [Reader(fi) for _, fi in loaded]
    dropped = [0]

    def payloads():
        for s, r, key in zip(src.tolist(), rows.tolist(), keys.tolist()):
            fi = loaded[s][1]
            n = int(fi.sizes[r])
            buf = bytearray(n)
            try:
                readers[s].read_into(memoryview(buf), int(fi.offsets[r]))
            except CorruptFileError:
                dropped[0] += 1
                yield None
                continue
            except OSError as exc:
                if transient(exc):
                    raise TransientError(exc.errno or 0, f"{fi.path}: {exc}") from exc
                raise
            if storage.checksum(key, buf, fi.slots[r].tolist()) != int(fi.checksums[r]):
                dropped[0] += 1
                warn_once(
                    "corrupt:" + fi.path.name, target.folder,
                    "cachedata: corrupt data in %s (item %d failed its checksum); left out of the merge",
                    fi.path, key,
                )  # fmt: skip
                yield None
                continue
            if progress is not None:
                progress(n)
            yield buf

    try:
        fi = storage.write_file(
            target.folder / run,
            kind="merged",
            namespace=target.fingerprint,
            schema=target.schema_text,
            keys=keys,
            sizes=_gather(loaded, src, rows, "sizes"),
            checksums=_gather(loaded, src, rows, "checksums"),
            slots=_gather(loaded, src, rows, "slots").reshape(len(keys), target.nslots),
            payloads=payloads(),
            compression=target.compression or "gzip",
            sources=tuple(fi.path.name for _, fi in loaded),
            durable=durable,
        )
    finally:
        for r in readers:
            r.close()
    return Outcome(run, fi.sources, len(fi.keys), dropped[0], fi.file_bytes)


def consolidate(
    target: Target, *, explicit: bool, everything: bool, wait: float, progress=None
) -> list[Outcome] | None:
    """Merge under the namespace lock until the layout is within its bounds.

    Returns the merges done, or None when another process holds the lock past ``wait``
    seconds. TransientError propagates with nothing lost.
    """
    folder = target.folder
    if not fileset.acquire(folder, wait=wait):
        return None
    done: list[Outcome] = []
    try:
        while True:
            listing = fileset.list_files(folder)
            files = fileset.plan(listing, everything=everything, explicit=explicit)
            if not files:
                return done
            if explicit and not everything:
                files += overlapping(target, files, listing)
            # Open at most max_fanin() sources at once. A partial round writes a background run,
            # so that the next round of an explicit merge takes it in again.
            partial = len(files) > max_fanin()
            if partial:
                files = sorted(files, key=lambda f: f.size)[: max_fanin()]
            run = fileset.output_name(
                files, listing.next_generation(), explicit=(explicit or everything) and not partial
            )
            if len(files) == 1 and files[0].is_background_run and (explicit or everything):
                # One background run holds everything new: naming it merged is all an
                # explicit merge has to do (a rename, not a rewrite of its bytes).
                os.rename(folder / files[0].name, folder / run)
                done.append(Outcome(run, (files[0].name,), -1, 0, 0))
            else:
                outcome = merge_files(target, files, run=run, progress=progress)
                if outcome is None:
                    return done
                done.append(outcome)
                logger.info(
                    "cachedata: merged %d files (%d items) into %s",
                    len(outcome.sources),
                    outcome.items,
                    outcome.run,
                )
            if not partial:
                explicit = everything = False  # from here on, only the background rules
    finally:
        fileset.release(folder)


def overlapping(
    target: Target, pile: list[fileset.DataFile], listing: fileset.Listing
) -> list[fileset.DataFile]:
    """Older merged files holding any key of ``pile`` (the new items of an explicit merge).

    Two jobs that computed the same items at once leave them in two files; merging such a
    file in drops the duplicates. A file whose keys are all elsewhere is left to the runs'
    budget (``fileset.fold``), so adding new items never rewrites the big old files. Keys
    are sorted in every file: a pile's keys are looked up in each file's memory-mapped key
    column (no full read).
    """
    names = {f.name for f in pile}
    older = [r for r in listing.runs if not r.is_background_run and r.name not in names]
    if not older:
        return []
    try:
        parts = [storage.read_index(target.folder / f.name, namespace=target.fingerprint).keys for f in pile]
    except (CorruptFileError, FileNotFoundError):
        return []  # merge_files deals with the pile's own faults
    keys = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    out = []
    for f in older:
        try:
            have = storage.read_index(target.folder / f.name, namespace=target.fingerprint).keys
        except (CorruptFileError, FileNotFoundError):
            continue  # a malformed or vanished file is not this merge's business
        if not len(have) or not len(keys) or have[0] > keys[-1] or have[-1] < keys[0]:
            continue
        pos = np.minimum(np.searchsorted(have, keys), len(have) - 1)
        if bool((have[pos] == keys).any()):
            out.append(f)
    return out


def max_fanin() -> int:
    """Sources one merge opens at once: at most 64, and a quarter of the open-files limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 1024
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
        soft = 1 << 20
    return max(4, min(64, soft // 4))


class Background:
    """The merges one process runs in one namespace: at most one background thread, explicit
    merges (``merge_now``) and the write stall (``catch_up``).

    ``poke()`` is cheap (a clock read) unless CHECK_EVERY seconds have passed; then it lists
    the folder and, when ``fileset.plan`` has work, starts the thread. Dropped on pickling
    and after a fork (the thread does not exist in the child).
    """

    def __init__(self, target_of: Callable[[], Target | None]) -> None:
        # A weak reference: the Store owns this object, and a cycle would delay the Store's
        # collection and with it the finalizer that seals its buffered items.
        self._target_of = (
            weakref.WeakMethod(target_of) if hasattr(target_of, "__self__") else lambda: target_of
        )
        self._thread: threading.Thread | None = None
        self._next = 0.0
        self._pid = os.getpid()
        self.error: BaseException | None = None
        self.overdue = False  # fileset.overdue() at the last look

    def poke(self, *, force: bool = False) -> bool:
        """Start a background merge when one is due; True when a thread is running."""
        if self._pid != os.getpid():
            self._thread, self._next, self._pid = None, 0.0, os.getpid()
        running = self._thread is not None and self._thread.is_alive()
        now = time.monotonic()
        if not force and now < self._next:
            return running
        self._next = now + CHECK_EVERY
        target_of = self._target_of()
        target = target_of() if target_of is not None else None
        if target is None:
            return running
        try:
            listing = fileset.list_files(target.folder)
        except fileset.ListingError:
            return running  # out of descriptors or the like: try again at the next poke
        # Looked at while this process's own merge runs too: a writer that wrote on meanwhile
        # would pile shards up unseen by the write stall (``catch_up`` joins that merge).
        self.overdue = fileset.overdue(listing)
        if running:
            return True
        if not fileset.plan(listing) or fileset.locked(target.folder):
            return False
        self._thread = threading.Thread(
            target=self._run, args=(target,), name=f"cachedata-merge-{target.fingerprint[:8]}", daemon=True
        )
        self._thread.start()
        _register_exit_join()
        _live.add(self)
        return True

    def _run(self, target: Target) -> None:
        try:
            consolidate(target, explicit=False, everything=False, wait=0.0)
        except (TransientError, fileset.ListingError) as exc:
            warn_once(
                "transient", target.folder,
                "cachedata: background merge of %s deferred (%s); nothing is lost. Raise %s",
                target.folder, exc, limit_hint(exc),
            )  # fmt: skip
        except Exception as exc:  # a failed background merge must never reach training
            self.error = exc
            warn_once(
                "merge", target.folder, "cachedata: background merge of %s failed: %r", target.folder, exc
            )

    def merge_now(self, *, full: bool, wait: float, progress: bool) -> bool:
        """An explicit merge (``merge()``, the end of ``warm()``, ``cachedata merge``): every
        new item into one file (``full``: every file into one), then the background rules.

        Waits up to ``wait`` seconds for a merge in another process; True when a file was
        written. ``progress``: a bar of the bytes merged, on stderr.
        """
        target_of = self._target_of()
        target = target_of() if target_of is not None else None
        if target is None:
            return False
        self.join()  # this process's own background merge holds the lock
        total = sum(f.size for f in fileset.list_files(target.folder).files)
        bar = progress_bar(total, "merging", progress, unit="B")
        try:
            done = consolidate(
                target, explicit=True, everything=full, wait=wait, progress=bar.update if progress else None
            )
        except TransientError as exc:
            warn_transient(target.folder, exc)
            return False
        finally:
            bar.close()
        if done is None:
            logger.info("cachedata: another process is merging %s; skipping", target.folder)
            return False
        return bool(done)

    def catch_up(self, seconds: float) -> None:
        """Write stall, for writers that can wait (DataLoader workers, never the training loop).

        A cold pass with little transform cost writes as fast as the disk allows, and the
        merges must rewrite each byte a few times: the merges fall behind and files pile up
        for every later reader. When the folder was overdue (``fileset.overdue``) at the last
        look, merge here (or wait while another process does) until it is not, for at most
        ``seconds``, so that writing slows to what the disk can also consolidate.
        """
        target_of = self._target_of()
        target = target_of() if target_of is not None else None
        if not self.overdue or target is None:
            return
        deadline = time.monotonic() + seconds
        try:
            while fileset.overdue(fileset.list_files(target.folder)):
                if time.monotonic() >= deadline:
                    return
                warn_once(
                    "stall", target.folder,
                    "cachedata: merges of %s lag behind writers (a disk-bound pass); DataLoader "
                    "workers merge before writing on, so that files stay few",
                    target.folder, level=logging.INFO,
                )  # fmt: skip
                self.join()  # this process's own merge holds the lock: let it finish
                if consolidate(target, explicit=False, everything=False, wait=0.0) is None:
                    time.sleep(0.05)  # another process is merging
        except (TransientError, fileset.ListingError) as exc:
            warn_transient(target.folder, exc)  # out of descriptors and the like: write on, merge later
        self.overdue = False

    def join(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None and self._pid == os.getpid() and t.is_alive():
            t.join(timeout)


_live: set[Background] = set()  # few per process, joined at exit
_registered_pid = 0


def _register_exit_join() -> None:
    """Join running merges at exit, in the main process and in DataLoader workers alike.

    Workers leave through multiprocessing, which skips atexit but runs its finalizers.
    """
    global _registered_pid
    if _registered_pid != os.getpid():
        _registered_pid = os.getpid()
        _live.clear()
        import multiprocessing.util

        multiprocessing.util.Finalize(None, _join_all, exitpriority=5)


def _join_all() -> None:
    """Give running merges a moment to finish at exit (a cut merge is safe, only wasted)."""
    deadline = time.monotonic() + JOIN_AT_EXIT
    for bg in list(_live):
        bg.join(max(0.0, deadline - time.monotonic()))
