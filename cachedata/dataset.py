"""CachedDataset: memoize a map-style dataset's deterministic transform on disk."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from . import buffers, origin
from . import schema as schema_mod
from .budget import explicit_limit
from .distributed import current_rank, world_size
from .namespace import Identity, ReadOnly, Store
from .paths import default_cache_dir
from .randomness import RandomGuard
from .stats import CacheStats, Counters
from .tracker import Tracker

logger = logging.getLogger("cachedata")

_COMPRESSIONS = (None, "gzip", "lzf")


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
        origin.check_map_style(dataset)
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
        self._base, self._indices = origin.unwrap(dataset)
        self._len = len(dataset)
        self._base_len = len(self._base)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

        dataset_fp, dataset_tree = origin.fingerprint_part(
            self._base, "dataset", fallback=version is not None or key is not None
        )
        transform_fp, transform_tree = origin.fingerprint_part(
            transform, "transform", fallback=version is not None
        )
        self.fingerprint: str = origin.namespace_fingerprint(
            dataset_fp, transform_fp, version=version, custom_key=key is not None
        )
        self.path: Path = self.cache_dir / self.fingerprint
        self._store = Store(self.path, self.fingerprint, compression=compression)
        self._counters = Counters()
        self._rank = current_rank()
        self._main_pid = os.getpid()
        self._all_keys: np.ndarray | None = None
        self._random_guard = RandomGuard()
        meta = self._meta_record = origin.meta_record(
            self.fingerprint, base=self._base, transform=transform, version=version,
            custom_key=key is not None, dataset_fp=dataset_fp, transform_fp=transform_fp,
            tree={**dataset_tree, **transform_tree},
        )  # fmt: skip
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
            origin.explain_new_namespace(self.cache_dir, meta)
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
        merged = self._store.consolidate(self._identity(), full=full) if current_rank() == 0 else False
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
        state["_rank"] = current_rank(default=self._rank)  # workers cannot ask torch.distributed
        state["_all_keys"] = None
        return state

    # -- internals ----------------------------------------------------------------------------

    def _identity(self) -> Identity:
        info = get_worker_info()
        if info is None and os.getpid() == self._main_pid:
            self._rank = current_rank(default=self._rank)
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
        return fn() if self.allow_random else self._random_guard.run(fn, what, index)

    def _after_writes(self, *, single: bool) -> None:
        store = self._store
        in_worker = get_worker_info() is not None
        # A worker seals every batch: another worker may be asked for these items in the next
        # epoch (persistent workers never exit between epochs). So does a rank's main process
        # reading without workers: the next epoch's sampler gives its items to other ranks.
        # While merges lag behind (a cold pass writing faster than the disk can rewrite), it
        # seals by size and time instead (at most a second later), so files stay few.
        every_batch = not single and (in_worker or world_size() > 1) and not store.backlogged()
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


def _key_to_int(k: Hashable, base_index: int) -> int:
    """Map a user key to int64: ints as themselves, str (and big ints) through xxh3-64."""
    import xxhash

    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and -(2**63) <= int(k) < 2**63:
        return int(k)
    if isinstance(k, (str, int, np.integer)) and not isinstance(k, bool):
        h = xxhash.xxh3_64_intdigest(f"{type(k).__name__}:{k}".encode("utf-8", "surrogatepass"))
        return h - (1 << 64) if h >= 1 << 63 else h
    raise TypeError(f"key({base_index}) returned {type(k).__name__} {k!r}; key= must return a str or an int")
