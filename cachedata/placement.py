"""Where CachedCollate's outputs live: shared memory in a worker, pinned memory for CUDA, the plan.

Every output of a batch is written once, into the memory it is handed over in:

- inside a DataLoader worker: shared memory (what the worker queue sends without copying it again,
  the same trick as ``torch.utils.data.default_collate``). Creating a shared-memory segment costs
  tens of microseconds whatever its size, so the small outputs of a batch (labels, lengths, small
  features: each at most ``SHARED_BLOCK_LEAF_BYTES``) are made in ordinary memory and then moved
  together into ONE segment, each a view of its own aligned slice; large outputs get their own;
- in the main process with a CUDA target: pinned memory, then one ``non_blocking`` copy to the device;
- otherwise: ordinary memory.

:func:`plan` decides this once per ``collate`` call; :func:`empty` allocates an output where the
plan says, :func:`send` hands a finished output over, and :func:`share_together` moves a worker's
small outputs into their one segment at the end of the call.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info

from . import buffers

__all__ = [
    "POOLED_STACK_BYTES",
    "SHARED_BLOCK_LEAF_BYTES",
    "Placement",
    "empty",
    "plan",
    "send",
    "share_together",
]

logger = logging.getLogger("cachedata")

# In a worker, outputs up to this size share one shared-memory segment per batch (see the module
# docstring); the segment lives as long as any of them, so it is kept small. Larger outputs are
# written straight into a segment of their own (copying them once more would cost more than the
# segment).
SHARED_BLOCK_LEAF_BYTES = 64 * 1024
#: In ordinary memory, stacked outputs larger than this (bytes) go into a recycled buffer (see
#: ``empty``): a batch of 64 images is 38 MB of fresh pages otherwise, faulted in every batch.
POOLED_STACK_BYTES = 1024 * 1024
_SHARED_BLOCK_ALIGN = 64  # bytes: each output starts on a cache line
_memmove = ctypes.memmove
_warned_no_cuda = False


class Placement:
    """One ``collate`` call's decisions: where outputs are allocated and where they are sent."""

    __slots__ = ("non_blocking", "pending", "pinned", "shared", "target")

    def __init__(self, shared: bool, pinned: bool, target: torch.device | None, non_blocking: bool) -> None:
        self.shared = shared  # inside a DataLoader worker: allocate in shared memory
        self.pinned = pinned  # main process: allocate in pinned memory
        self.target = target  # copy each output there (None: stay where allocated)
        self.non_blocking = non_blocking
        # worker: small outputs made in ordinary memory, moved into one shared segment at the end
        self.pending: list[torch.Tensor] = []


def plan(device: torch.device | None, pin_memory: bool | None, non_blocking: bool) -> Placement:
    """Where this call's outputs go, from ``CachedCollate``'s options and the calling process."""
    if get_worker_info() is not None:
        # CUDA cannot be used in a worker: collate into shared memory, DeviceLoader moves it.
        return Placement(shared=True, pinned=False, target=None, non_blocking=False)
    wants_cuda = device is not None and device.type == "cuda"
    cuda = (wants_cuda or pin_memory is True) and torch.cuda.is_available()
    if wants_cuda and not cuda:
        global _warned_no_cuda
        if not _warned_no_cuda:
            _warned_no_cuda = True
            logger.debug("CachedCollate(device=%s): CUDA is not available, batches stay on the CPU", device)
    target = None
    if device is not None and device.type != "cpu" and (not wants_cuda or cuda):
        target = device
    pinned = cuda and (pin_memory if pin_memory is not None else wants_cuda)
    return Placement(shared=False, pinned=pinned, target=target, non_blocking=non_blocking)


def empty(shape: Sequence[int], dtype: torch.dtype, placement: Placement) -> torch.Tensor:
    """An uninitialized CPU output in shared, pinned or ordinary memory.

    In a worker, a small output is made in ordinary memory: :func:`send` queues it, and the
    end of the call moves all of them into one shared segment (:func:`share_together`).
    """
    if placement.shared:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > SHARED_BLOCK_LEAF_BYTES:
            # Straight into shared memory, like default_collate: the worker queue then sends
            # a handle instead of copying the batch into shared memory a second time.
            storage = torch.UntypedStorage._new_shared(nbytes)
            return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
    elif not placement.pinned:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= buffers.MIN_BYTES:
            # Recycled memory (cachedata.buffers): a fresh multi-MB output page-faults in on
            # every batch once glibc has handed the last one back (about a third of a padded
            # audio batch's collate time here). The buffer is reused only after the batch and
            # every view of it are gone.
            try:
                return torch.from_numpy(buffers.take(nbytes)).view(dtype).view(tuple(shape))
            except RuntimeError:  # a dtype a byte buffer cannot be viewed as (quantized)
                pass
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=placement.pinned)


def send(out: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Hand a fresh output over: to the worker's shared memory, or copied to the target device."""
    if placement.shared:
        if out.is_cpu:
            if out.nbytes <= SHARED_BLOCK_LEAF_BYTES:
                placement.pending.append(out)  # into the batch's shared segment at the end
            elif not out.is_shared():
                out.share_memory_()
        return out
    if placement.target is None:
        return out
    return out.to(placement.target, non_blocking=placement.non_blocking)


def share_together(tensors: list[torch.Tensor]) -> None:
    """Move ``tensors`` (fresh CPU outputs nothing else references yet) into ONE shared-memory segment.

    Each tensor keeps its identity, shape and values: its data is copied to its own aligned slice
    of the segment and the tensor is re-pointed there with ``set_``. One segment instead of one
    per output is what makes a worker's batch of small outputs cheap (a segment costs tens of
    microseconds to create, and as much again for the receiving process to map).
    """
    align = _SHARED_BLOCK_ALIGN
    offsets = []
    total = 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.nbytes // align) * align
    storage = torch.UntypedStorage._new_shared(total)
    base = storage.data_ptr()
    for t, offset in zip(tensors, offsets, strict=True):
        source = t if t.is_contiguous() else t.contiguous()
        nbytes = source.nbytes
        if nbytes:
            _memmove(base + offset, source.data_ptr(), nbytes)
        # set_ keeps the old strides unless given the source's
        t.set_(storage, offset // t.itemsize, source.shape, source.stride())
