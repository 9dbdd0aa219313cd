"""One process's unsealed items, when they are due, and how they become a shard.

Kept apart from ``namespace.Store`` so that the exit-time finalizer can hold the buffer
without keeping the Store alive: items still buffered when a process exits (a DataLoader
worker shutting down, the main process ending) are sealed then.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema as schema_mod
from .storage import FileIndex, checksum, write_file

logger = logging.getLogger("cachedata")

#: The main process seals its buffer at these sizes (items, bytes) or after this many seconds.
#: The bytes bound is what a cold pass adds to the training process's memory; 64 MiB already
#: amortizes a file's creation (256 MiB measured no faster and held 190 MB more).
MAIN_SEAL = (4096, 64 * 1024 * 1024, 30.0)
#: A worker on the single-item path seals at these sizes; batched calls seal every batch.
WORKER_SEAL = (64, 64 * 1024 * 1024, 1.0)


@dataclass(frozen=True)
class Identity:
    """Who writes: global rank, DataLoader worker id (None in the main process), pid."""

    rank: int
    worker: int | None
    pid: int

    @property
    def tag(self) -> str:
        return f"r{self.rank}-w{'m' if self.worker is None else self.worker}-p{self.pid}"


class Buffer:
    """Encoded items waiting for the next seal, by key, with their checksums."""

    def __init__(self, path: Path, fingerprint: str, compression: str | None) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.compression = compression
        self.schema_text = ""
        self.pid = os.getpid()
        self.items: dict[int, tuple[schema_mod.Encoded, int]] = {}
        self.nbytes = 0
        self.since = 0.0  # time.monotonic() of the oldest unsealed item
        self.token = os.urandom(3).hex()
        self.seq = 0
        self.ident = Identity(0, None, self.pid)
        self._finalizer: multiprocessing.util.Finalize | None = None

    def add(
        self, key: int, enc: schema_mod.Encoded, ident: Identity, schema_text: str, *, owner: object
    ) -> None:
        """Buffer one encoded item. The first one registers the exit hooks: what is still
        buffered is sealed when ``owner`` (the Store) is collected or the process exits."""
        if self._finalizer is None:
            # DataLoader workers exit through multiprocessing, which runs its finalizers too.
            self._finalizer = multiprocessing.util.Finalize(
                owner, seal_at_exit, args=(self,), exitpriority=10
            )
            # In the main process, multiprocessing's exit hook runs after h5py has shut down
            # (atexit is last-in first-out): register here, after h5py's, to run before it.
            atexit.register(seal_at_exit, self)
        if not self.items:
            self.since = time.monotonic()
        self.items[key] = (enc, checksum(key, enc.payload, enc.slots))
        self.nbytes += len(enc.payload)
        self.ident = ident
        self.schema_text = schema_text

    def due(self, *, worker: bool) -> bool:
        """Whether the buffer reached its size or age bound (WORKER_SEAL or MAIN_SEAL)."""
        items, nbytes, seconds = WORKER_SEAL if worker else MAIN_SEAL
        return bool(self.items) and (
            len(self.items) >= items or self.nbytes >= nbytes or time.monotonic() - self.since >= seconds
        )

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0

    def write(self) -> FileIndex | None:
        """Write and clear the buffered items (sorted by key); None when there is nothing to write."""
        if not self.items or self.pid != os.getpid():
            return None
        items = sorted(self.items.items())
        keys = np.fromiter((k for k, _ in items), np.int64, len(items))
        encs = [e for _, (e, _) in items]
        sizes = np.fromiter((len(e.payload) for e in encs), np.int64, len(encs))
        sums = np.fromiter((c for _, (_, c) in items), np.uint64, len(encs))
        nslots = len(encs[0].slots)
        slots = np.asarray([e.slots for e in encs], np.int64).reshape(len(encs), nslots)
        name = f"shard-{self.ident.tag}-{self.token}-{self.seq:06d}.h5"
        self.seq += 1
        fi = write_file(
            self.path / name,
            kind="shard",
            namespace=self.fingerprint,
            schema=self.schema_text,
            keys=keys,
            sizes=sizes,
            checksums=sums,
            slots=slots,
            payloads=(e.payload for e in encs),
            compression=self.compression,
            durable=False,  # a power cut tears it at worst, and checksums catch that
        )
        self.clear()  # only now: a failed write keeps the items for the next try
        return fi


def seal_at_exit(buf: Buffer) -> None:
    """Exit hook: write what is still buffered (never raises)."""
    n = len(buf.items)
    try:
        buf.write()
    except Exception as exc:  # exit paths must not raise
        buf.clear()  # the process ends: a second exit hook must not try (and warn) again
        logger.warning(
            "cachedata: cannot write to %s (%s); %d items computed in this run are not stored",
            buf.path,
            exc,
            n,
        )
