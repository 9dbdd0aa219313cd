"""CachedDataset: memoize a map-style dataset's deterministic transform on disk."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from . import origin
from .addressing import Addresses
from .budget import explicit_limit
from .compute import Compute
from .distributed import current_rank, world_size
from .namespace import ReadOnlyError, Store
from .paths import default_cache_dir
from .shards import Identity
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
        base, indices = origin.unwrap(dataset)
        self._addresses = Addresses(len(dataset), indices, key=key, base_length=len(base))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

        dataset_fp, dataset_tree = origin.fingerprint_part(
            base, "dataset", fallback=version is not None or key is not None
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
        self._compute = Compute(base, transform, allow_random=self.allow_random, counters=self._counters)
        self._rank = current_rank()
        self._main_pid = os.getpid()
        meta = self._meta_record = origin.meta_record(
            self.fingerprint, base=base, transform=transform, version=version,
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
        except ReadOnlyError as exc:
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
        return self._addresses.length

    def __getitem__(self, index: int) -> Any:
        addr = self._addresses
        # Fast path for the common hit: plain int index, default keys, files already loaded.
        if type(index) is int and addr.key is None:
            n = addr.length
            i = index + n if index < 0 else index
            if 0 <= i < n:
                t0 = time.perf_counter()
                got = self._store.get_one(int(addr.indices[i]) if addr.indices is not None else i)
                if got is not None:
                    self._counters.hit(got[1], time.perf_counter() - t0)
                    return self.post_transform(got[0]) if self.post_transform is not None else got[0]
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
        addr = self._addresses
        return self._store.has(addr.key_of(addr.base_index(index)))

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

        Older merged files stay as they are, unless more than 24 would stand: then the newest
        few join (a run only with at least as many newer bytes as its own, so adding a few
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
        try:
            self._store.create(self._meta_record)  # what produced the namespace stays on record
        except ReadOnlyError as exc:
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
            f"CachedDataset({type(self.dataset).__name__}, len={len(self.dataset)}, path={str(self.path)!r}, "
            f"transform={self.transform!r}{budget})"
        )

    def __cachedata_fingerprint__(self) -> str:
        return self.fingerprint

    def __getstate__(self) -> dict:
        if os.getpid() == self._main_pid and self._store.unsealed[0]:
            # Spawned workers start from disk: seal what this process computed so far.
            self.flush()
        state = self.__dict__.copy()
        state["_rank"] = current_rank(default=self._rank)  # workers cannot ask torch.distributed
        return state

    # -- internals ----------------------------------------------------------------------------

    def _identity(self) -> Identity:
        info = get_worker_info()
        if info is None and os.getpid() == self._main_pid:
            self._rank = current_rank(default=self._rank)
        return Identity(self._rank, None if info is None else info.id, os.getpid())

    def _get(self, indices: Sequence[int], *, single: bool, post: bool = True) -> list[Any]:
        """Items at ``indices``: read what is stored, compute and store the rest."""
        store = self._store
        addr = self._addresses
        base = addr.base_indices(indices)
        keys = addr.keys_of(base)
        t0 = time.perf_counter()
        out, todo, nbytes = store.get_many(keys)
        self._counters.add(
            hits=len(keys) - len(todo), bytes_read=nbytes, read_seconds=time.perf_counter() - t0
        )
        if todo:
            values = self._compute.run([base[p] for p in todo], [indices[p] for p in todo])
            ident = self._identity()
            for p, v in zip(todo, values):
                out[p] = store.put(keys[p], v, ident, where=indices[p])
        if todo or store.unsealed[0]:
            in_worker = get_worker_info() is not None
            if store.seal_due(batched=not single, worker=in_worker, distributed=world_size() > 1):
                self.flush()
        if post and self.post_transform is not None:
            out = [self.post_transform(x) for x in out]
        return out

    def _count_writes(self, n: int, nbytes: int) -> None:
        if n:
            self._counters.add(writes=n, bytes_written=nbytes)

    def _read_only(self, exc: BaseException) -> None:
        store = self._store
        store.stop_writes()
        store.refresh()
        if not store.contains(self._addresses.base_keys()).all():  # reads every key: construction only
            logger.warning(
                "cachedata: %s is not writable (%s); missing items are computed but not stored",
                self.path,
                exc,
            )
