"""CachedDataset: memoize a map-style dataset's deterministic transform on disk."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, get_worker_info

from . import buffers, metadata
from . import schema as schema_mod
from ._version import __version__
from .budget import explicit_limit
from .fingerprint import fingerprint, fingerprint_tree
from .namespace import Identity, ReadOnly, Store
from .paths import default_cache_dir
from .stats import CacheStats, Counters
from .storage import FORMAT_VERSION
from .tracker import Tracker

logger = logging.getLogger("cachedata")

_COMPRESSIONS = (None, "gzip", "lzf")

#: Misses per process whose transform is checked for drawing from a global random generator.
RNG_CHECKS = 16


class CachedDataset(Dataset):
    """A map-style dataset whose items are ``post_transform(transform(dataset[i]))``, with the
    ``transform(dataset[i])`` part computed once and memoized in HDF5 files under ``cache_dir``.

    Items are shared between CachedDatasets whose dataset, transform and ``version``
    fingerprints match (the *namespace*); anything else gets its own folder, so stale data is
    never served. A ``Subset`` is unwrapped so that folds of one dataset share one cache.
    Works under DataLoader workers (fork, spawn, forkserver, persistent) and torch.distributed.

    ``key``: ``key(i) -> str | int``, a stable name for item ``i`` (default: the index), for a
    dataset whose items can move or change at the same index; ``cachedata.keys.file_stat`` and
    ``file_sha256`` build keys that change when a file is replaced. ``compression``: ``None``
    (default), ``"gzip"`` (smaller files, slower reads) or ``"lzf"`` (fast, lighter), for the
    files this dataset writes. ``allow_random``: ``transform`` is checked on its first misses for
    draws from the global Python, numpy or torch random generators (random work belongs in
    ``post_transform``, which runs on every access and is never cached); ``True`` skips that
    check for a transform that seeds itself.

    Example::

        from cachedata.keys import file_stat

        ds = CachedDataset(
            ImageFiles(paths),                      # ds[i] is a path
            "/data/cache",
            transform=DecodeImage("RGB"),           # computed once per item, then read back
            post_transform=RandomCrop(224),         # every access, never cached
            key=lambda i: file_stat(paths[i]),      # a replaced file is a new item
            compression="lzf",
        )
        loader = DataLoader(ds, batch_size=64, num_workers=8, collate_fn=CachedCollate())
    """

    def __init__(
        self,
        dataset: Any,
        cache_dir: str | os.PathLike | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        post_transform: Callable[[Any], Any] | None = None,
        key: Callable[[int], str | int] | None = None,
        version: str | None = None,
        compression: str | None = None,
        allow_random: bool = False,
        max_bytes: int | str | None = None,
    ) -> None:
        _check_map_style(dataset)
        for name, fn in (("transform", transform), ("post_transform", post_transform), ("key", key)):
            if fn is not None and not callable(fn):
                raise TypeError(f"CachedDataset: {name} must be callable or None, got {type(fn).__name__}")
        if version is not None and not isinstance(version, str):
            raise TypeError(f"CachedDataset: version must be a str, got {type(version).__name__} {version!r}")
        if compression not in _COMPRESSIONS:
            raise ValueError(
                f"CachedDataset: compression must be one of {_COMPRESSIONS}, got {compression!r}"
            )
        limit = explicit_limit(max_bytes)  # max_bytes=, else $CACHEDATA_MAX_BYTES; raises on a bad value
        self.dataset = dataset
        self.transform = transform
        self.post_transform = post_transform
        self.key = key
        self.version = version
        self.compression = compression
        self.allow_random = bool(allow_random)
        self._base, self._indices = _unwrap(dataset)
        self._len = len(dataset)
        self._base_len = len(self._base)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

        dataset_fp, dataset_tree = _fingerprint_part(
            self._base, "dataset", fallback=version is not None or key is not None
        )
        transform_fp, transform_tree = _fingerprint_part(transform, "transform", fallback=version is not None)
        self.fingerprint: str = fingerprint(
            {
                "cachedata_format": FORMAT_VERSION,
                "dataset": dataset_fp,
                "transform": transform_fp,
                "version": version,
                "key": "index" if key is None else "custom",
            }
        )
        self.path: Path = self.cache_dir / self.fingerprint
        self._store = Store(self.path, self.fingerprint, compression=compression)
        self._counters = Counters()
        self._rank = _current_rank()
        self._main_pid = os.getpid()
        self._all_keys: np.ndarray | None = None
        self._rng_checks = (0, RNG_CHECKS)  # (pid, checks left in that process)
        meta = self._meta_record = self._meta(dataset_fp, transform_fp, {**dataset_tree, **transform_tree})
        is_new = not (self.path / "meta.json").exists()
        # Disk budget: lease the namespace before creating its files (so that no other process
        # evicts it from here on), then bring the folder under budget (see cachedata.budget).
        self._budget = Tracker(self.cache_dir, self.path, explicit=limit)
        self._budget.open(meta)
        try:
            self._store.create(meta)
        except ReadOnly as exc:
            self._read_only(exc)
        if is_new:
            _explain_new_namespace(self.cache_dir, meta)
        self._budget.check()

    # -- Dataset protocol -------------------------------------------------------------------

    def __len__(self) -> int:
        if get_worker_info() is None:
            # Samplers call len() at the start of every epoch: a moment to start a background
            # merge when one is due (at most one directory listing per CHECK_EVERY seconds;
            # the merge itself runs on its own thread, so len() returns at once).
            self._store.poke()
            if os.getpid() == self._main_pid:
                self._budget.housekeeping(self._store)  # refresh the lease (rate-limited)
        return self._len

    def __getitem__(self, index: int) -> Any:
        store = self._store
        # Fast path for the common hit: plain int index, default keys, nothing unusual.
        if type(index) is int and self.key is None and store.index is not None and store.pid == os.getpid():
            n = self._len
            i = index + n if index < 0 else index
            if 0 <= i < n:
                key = int(self._indices[i]) if self._indices is not None else i
                t0 = time.perf_counter()
                got = store.get_one(key)
                if got is not None:
                    try:
                        item = store.decoder.decode(got[0], 0, got[1])
                    except (ValueError, RuntimeError) as exc:
                        store.bad_item(None, key, exc)
                    else:
                        self._counters.add(hits=1, bytes_read=len(got[0]),
                                       read_seconds=time.perf_counter() - t0)  # fmt: skip
                        store.touch()
                        return self.post_transform(item) if self.post_transform is not None else item
        return self._get([index], single=True)[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Batched fetch (used by DataLoader): one index lookup for all, misses computed once."""
        return self._get(indices, single=False)

    # -- public API ---------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        """Counters of this process and its DataLoader workers."""
        return self._counters.snapshot()

    @property
    def num_cached(self) -> int:
        """Items present on disk (or buffered by this process) and readable here."""
        return self._store.count()

    def is_cached(self, index: int) -> bool:
        """True when item ``index`` would be served without computing it."""
        key = self._key_of(self._base_index(index))
        store = self._store
        store.check_pid()
        if store.buffered(key) is not None or store.find(key) is not None:
            return True
        store.refresh()
        return store.find(key) is not None

    def flush(self) -> None:
        """Seal this process's buffered writes so that other processes can read them.

        Unless they do not fit the disk budget: then writes stop for the run (see over_budget).
        """
        if not self._budget.before_seal(self._store):
            return
        n, nbytes = self._store.seal(self._identity())
        self._count_writes(n, nbytes)

    def merge(self, *, full: bool = False) -> bool:
        """Consolidate every shard into one merged file; True when a new file was written.

        Older merged files stay as they are unless their size tier is full (so adding a few
        items never rewrites the cache); ``full=True`` rewrites everything into one file.
        Collective under torch.distributed: every rank calls it, global rank 0 merges while
        the others wait, then every rank reads the merged file.
        """
        self.flush()
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()  # every rank's shards are sealed before rank 0 looks
        merged = self._store.consolidate(self._identity(), full=full) if _current_rank() == 0 else False
        if distributed:
            dist.barrier()  # nobody reads on until the merged file is in place
        self._store.refresh()
        if merged:
            self._budget.check()
        return merged

    def warm(
        self, num_workers: int | None = None, batch_size: int | None = None, progress: bool = True
    ) -> None:
        """Compute every missing item in parallel DataLoader workers, then merge.

        ``num_workers`` defaults to the number of CPUs (at most 8), ``batch_size`` to 64.
        """
        from .warm import warm

        warm(self, num_workers=num_workers, batch_size=batch_size, progress=progress)

    def clear(self) -> None:
        """Delete this namespace from disk (every process's view of it becomes empty)."""
        self._store.destroy()
        self._budget.cleared()  # the lease went with the folder
        self._all_keys = None
        try:
            self._store.create(self._meta_record)  # what produced the namespace stays on record
        except ReadOnly as exc:
            self._read_only(exc)

    @property
    def max_bytes(self) -> int | None:
        """The disk budget of ``cache_dir`` in bytes (None: none): ``max_bytes=``, else
        ``$CACHEDATA_MAX_BYTES`` as set at construction, else the folder's settings file now."""
        return self._budget.limit.max_bytes

    @property
    def over_budget(self) -> bool:
        """True when this run stopped storing new items because the namespaces in use alone
        exceed the disk budget (in this process or one of its DataLoader workers). Items are
        still computed and served; what is already stored is kept."""
        return self._budget.stopped()

    def __repr__(self) -> str:
        budget = ""
        if self._budget.stopped():
            budget = f", writes stopped: over the disk budget of {self._budget.limit}"
        return (
            f"CachedDataset({type(self.dataset).__name__}, len={self._len}, path={str(self.path)!r}, "
            f"transform={self.transform!r}{budget})"
        )

    def __cachedata_fingerprint__(self) -> str:
        return self.fingerprint

    def __getstate__(self) -> dict:
        if os.getpid() == self._main_pid and self._store.pending:
            # Spawned workers start from disk: seal what this process computed so far.
            self.flush()
        state = self.__dict__.copy()
        state["_rank"] = _current_rank(default=self._rank)  # workers cannot ask torch.distributed
        state["_all_keys"] = None
        return state

    # -- internals ----------------------------------------------------------------------------

    def _identity(self) -> Identity:
        info = get_worker_info()
        if info is None and os.getpid() == self._main_pid:
            self._rank = _current_rank(default=self._rank)
        return Identity(self._rank, None if info is None else info.id, os.getpid())

    def _base_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
                index = int(index)
            else:
                raise TypeError(
                    f"CachedDataset indices must be integers, got {type(index).__name__} {index!r}"
                )
        i = int(index)
        n = self._len
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"CachedDataset index {index} out of range for length {n}")
        return int(self._indices[i]) if self._indices is not None else i

    def _base_indices(self, indices: Sequence[int]) -> list[int]:
        """Vectorized ``_base_index`` for the common case of a list of in-range ints."""
        if type(indices) is list and len(indices) > 16 and all(type(i) is int for i in indices):
            arr = np.asarray(indices, np.int64) if indices else np.empty(0, np.int64)
            n = self._len
            if len(arr) and (arr.min() < -n or arr.max() >= n):
                bad = next(i for i in indices if not -n <= i < n)
                raise IndexError(f"CachedDataset index {bad} out of range for length {n}")
            arr = np.where(arr < 0, arr + n, arr)
            if self._indices is not None:
                arr = self._indices[arr]
            return arr.tolist()
        return [self._base_index(i) for i in indices]

    def _key_of(self, base_index: int) -> int:
        if self.key is None:
            return base_index
        return _key_to_int(self.key(base_index), base_index)

    def _get(self, indices: Sequence[int], *, single: bool, post: bool = True) -> list[Any]:
        store = self._store
        store.check_pid()
        base = self._base_indices(indices)
        keys = base if self.key is None else [self._key_of(b) for b in base]
        out: list[Any] = [None] * len(keys)
        todo = list(range(len(keys)))  # positions still missing
        t0 = time.perf_counter()
        nbytes = 0
        if store.index is None:
            store.refresh()
        for attempt in range(3):
            # Later attempts: only after loading files that other processes sealed (or
            # merged) meanwhile.
            if attempt and not store.refresh():
                break
            decode = store.decoder.decode if store.decoder is not None else None
            got = store.get_many([keys[p] for p in todo])
            missing = []
            for p, g in zip(todo, got):
                if g is not None:
                    try:
                        out[p] = decode(g[0], 0, g[1])
                    except (ValueError, RuntimeError) as exc:  # shapes that do not fit the bytes
                        store.bad_item(None, keys[p], exc)
                        missing.append(p)
                        continue
                    nbytes += len(g[0])
                elif (enc := store.buffered(keys[p])) is not None:
                    out[p] = store.decoder.decode(buffers.copy(enc.payload), 0, enc.slots)
                    nbytes += len(enc.payload)
                else:
                    missing.append(p)
            todo = missing
            if not todo:
                break
        hits = len(keys) - len(todo)
        t1 = time.perf_counter()
        self._counters.add(hits=hits, bytes_read=nbytes, read_seconds=t1 - t0)
        if todo:
            self._compute_into(out, todo, base, keys, indices)  # counts each miss as it is computed
        if todo or store.pending:
            self._after_writes(single=single)
        if hits:
            store.touch()
        if post and self.post_transform is not None:
            out = [self.post_transform(x) for x in out]
        return out

    def _compute_into(
        self, out: list[Any], todo: list[int], base: list[int], keys: list[int], indices: Sequence[int]
    ) -> None:
        """Compute missing items, buffer them for writing, and put fresh copies into ``out``.

        Each miss is counted as soon as it is computed, not at the end of the batch: a
        DataLoader worker shut down (or killed) mid-batch, say after a StatefulDataLoader's
        ``state_dict()``, has then counted every transform call it made.
        """
        store = self._store
        counters = self._counters
        batch = getattr(self.transform, "batch", None)
        if self.transform is not None and callable(batch):
            t = time.perf_counter()
            values = [self._compute_one(base[p], indices[p]) for p in todo]
            values = self._checked(lambda: batch(values), "transform.batch", indices[todo[0]])
            if not isinstance(values, list) or len(values) != len(todo):
                raise TypeError(
                    f"transform.batch must return a list of {len(todo)} items, got {type(values).__name__}"
                )
            counters.add(misses=len(todo), compute_seconds=time.perf_counter() - t)
        else:
            values = []
            for p in todo:
                t = time.perf_counter()
                v = self._compute_one(base[p], indices[p])
                if self.transform is not None:
                    v = self._checked(lambda v=v: self.transform(v), "transform", indices[p])
                counters.add(misses=1, compute_seconds=time.perf_counter() - t)
                values.append(v)
        ident = self._identity()
        for p, v in zip(todo, values):
            try:
                enc = schema_mod.encode(v)
            except schema_mod.Unstorable as exc:
                raise TypeError(f"item {indices[p]} {exc}") from None
            diff = store.check_schema(enc)
            if diff:
                raise ValueError(
                    f"item {indices[p]} {diff}; every item of a namespace must have the same structure "
                    "and dtypes (items already cached are kept)"
                )
            store.put(keys[p], enc, ident)
            out[p] = store.decoder.decode(buffers.copy(enc.payload), 0, enc.slots)

    def _compute_one(self, base_index: int, index: int) -> Any:
        return self._checked(lambda: self._base[base_index], "dataset[i]", index)

    def _checked(self, fn: Callable[[], Any], what: str, index: int) -> Any:
        """Run ``fn``; on the first misses, fail if it drew from a global random generator."""
        if self.allow_random:
            return fn()
        pid = os.getpid()
        if self._rng_checks[0] != pid:  # each process checks its own first misses
            self._rng_checks = (pid, RNG_CHECKS)
        if self._rng_checks[1] <= 0:
            return fn()
        self._rng_checks = (pid, self._rng_checks[1] - 1)
        before = _rng_states()
        result = fn()
        if not _same_rng(before, _rng_states()):
            raise RuntimeError(
                f"item {index}: {what} drew random numbers from the global random generator "
                f"({_which_rng(before, _rng_states())}), so its cached output would be stale. "
                "Move random augmentation to post_transform=, or pass allow_random=True if it seeds itself."
            )
        return result

    def _after_writes(self, *, single: bool) -> None:
        store = self._store
        in_worker = get_worker_info() is not None
        # A worker seals every batch: another worker may be asked for these items in the next
        # epoch (persistent workers never exit between epochs). So does a rank's main process
        # reading without workers: the next epoch's sampler gives its items to other ranks.
        # While merges lag behind (a cold pass writing faster than the disk can rewrite), it
        # seals by size and time instead (at most a second later), so files stay few.
        every_batch = not single and (in_worker or _world_size() > 1) and not store.backlogged()
        if every_batch or store.should_seal(worker=in_worker):
            self.flush()
            if in_worker:
                store.keep_up()  # a worker may wait for merges; the training loop never does

    def _count_writes(self, n: int, nbytes: int) -> None:
        if n:
            self._counters.add(writes=n, bytes_written=nbytes)

    def _complete(self) -> bool:
        """Every item of the base dataset is on disk (reads every key: construction only)."""
        if self._all_keys is None:
            n = self._base_len
            self._all_keys = (
                np.arange(n, dtype=np.int64)
                if self.key is None
                else np.asarray([self._key_of(i) for i in range(n)], np.int64)
            )
        return bool(self._store.contains(self._all_keys).all())

    def _read_only(self, exc: BaseException) -> None:
        self._store.writable = False
        store = self._store
        store.refresh()
        complete = self._complete()
        if not complete:
            logger.warning(
                "cachedata: %s is not writable (%s); missing items are computed but not stored",
                self.path,
                exc,
            )

    def _meta(self, dataset_fp: str, transform_fp: str, tree: dict[str, str]) -> dict:
        import h5py

        return {
            "cachedata_format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "created": time.time(),
            "dataset": {"type": _qualname(self._base), "len": self._base_len, "fingerprint": dataset_fp},
            "transform": {"repr": repr(self.transform)[:2000], "fingerprint": transform_fp},
            "version": self.version,
            "key": "index" if self.key is None else "custom",
            "tree": tree,
            "versions": {
                "cachedata": __version__,
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "numpy": np.__version__,
                "h5py": h5py.__version__,
            },
        }


# ----------------------------------------------------------------------------- helpers


def _check_map_style(dataset: Any) -> None:
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"CachedDataset needs a map-style dataset, got the IterableDataset {_qualname(dataset)}; "
            "wrap a dataset that has __len__ and __getitem__(int)"
        )
    missing = [m for m in ("__len__", "__getitem__") if not callable(getattr(type(dataset), m, None))]
    if missing:
        raise TypeError(
            f"CachedDataset needs a map-style dataset with __len__ and __getitem__(int); "
            f"{_qualname(dataset)} has no {' or '.join(missing)}"
        )


def _unwrap(dataset: Any) -> tuple[Any, np.ndarray | None]:
    """Peel Subsets off: (base dataset, base indices of this dataset's items or None)."""
    indices: np.ndarray | None = None
    while isinstance(dataset, Subset):
        inner = np.asarray(
            list(dataset.indices) if not isinstance(dataset.indices, np.ndarray) else dataset.indices
        )
        if inner.size and not np.issubdtype(inner.dtype, np.integer):
            raise TypeError(f"Subset indices must be integers, got dtype {inner.dtype}")
        inner = inner.astype(np.int64).reshape(-1)
        n = len(dataset.dataset)
        inner = np.where(inner < 0, inner + n, inner)
        if inner.size and (inner.min() < 0 or inner.max() >= n):
            raise IndexError(f"Subset index out of range for its dataset of length {n}")
        indices = inner if indices is None else inner[indices]
        dataset = dataset.dataset
    return dataset, indices


def _fingerprint_part(obj: Any, what: str, *, fallback: bool) -> tuple[str, dict[str, str]]:
    """(digest, attribute-path tree) of the dataset or transform, or a type-based stand-in."""
    try:
        tree = fingerprint_tree(obj, root=what)
    except TypeError as exc:
        if not fallback:
            hint = (
                "version='...' (bump it when the data changes) or key="
                if what == "dataset"
                else "version='...'"
            )
            raise TypeError(
                f"CachedDataset cannot fingerprint the {what} deterministically: {exc}. "
                f"Pass {hint} to name the namespace yourself"
            ) from None
        logger.info("cachedata: %s is named by its type and version= (%s)", what, exc)
        stand_in = {"type": _qualname(obj), "len": len(obj) if hasattr(obj, "__len__") else None}
        return fingerprint(stand_in), {what: f"{_qualname(obj)} (named by version=)"}
    return tree.digest, tree.entries


#: New namespaces already explained by this process (one WARNING each).
_explained: set[str] = set()


def _explain_new_namespace(cache_dir: Path, meta: dict) -> None:
    """Say, once per process and at WARNING, why a cache starts cold beside older namespaces.

    Names what differs from the nearest sibling of the same dataset type (see
    ``metadata.nearest_sibling``; damaged meta.json files are skipped), in words.
    """
    where = str(cache_dir / meta["fingerprint"])
    if where in _explained:
        return
    diff = metadata.nearest_sibling(meta, metadata.read_metas(cache_dir))
    if diff is None:
        return
    _explained.add(where)
    lines = diff.changes
    shown = "; ".join(lines[:8]) + (f"; ... ({len(lines) - 8} more)" if len(lines) > 8 else "")
    # A version= bump is the user's own request for a fresh namespace: say so, but quietly.
    say = logger.info if diff.version_only else logger.warning
    say(
        "cachedata: cache starts cold: new namespace %s for %s differs from %s in %s: %s. "
        "Its items are computed again into %s. If that difference should not matter, leave it out of "
        "the fingerprint (a __cachedata_fingerprint__ method, or cachedata.register_fingerprint for its "
        "type) and pin the namespace by hand with version='...', bumped when outputs should change",
        meta["fingerprint"][:12],
        meta["dataset"]["type"],
        diff.fingerprint[:12],
        ", ".join(diff.parts) or "nothing recorded",
        shown or "(no attribute-level difference recorded)",
        cache_dir / meta["fingerprint"],
    )


def _qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _key_to_int(k: Hashable, base_index: int) -> int:
    """Map a user key to int64: ints as themselves, str (and big ints) through xxh3-64."""
    import xxhash

    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and -(2**63) <= int(k) < 2**63:
        return int(k)
    if isinstance(k, (str, int, np.integer)) and not isinstance(k, bool):
        h = xxhash.xxh3_64_intdigest(f"{type(k).__name__}:{k}".encode("utf-8", "surrogatepass"))
        return h - (1 << 64) if h >= 1 << 63 else h
    raise TypeError(f"key({base_index}) returned {type(k).__name__} {k!r}; key= must return a str or an int")


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _current_rank(default: int = 0) -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return default


def _rng_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _same_rng(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0] and a[1][2:] == b[1][2:] and np.array_equal(a[1][1], b[1][1]) and torch.equal(a[2], b[2])
    )


def _which_rng(a: tuple, b: tuple) -> str:
    names = []
    if a[0] != b[0]:
        names.append("random")
    if not (a[1][2:] == b[1][2:] and np.array_equal(a[1][1], b[1][1])):
        names.append("numpy.random")
    if not torch.equal(a[2], b[2]):
        names.append("torch")
    return ", ".join(names) or "unknown"
