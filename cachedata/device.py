"""DeviceLoader: move a loader's batches to a CUDA device ahead of time, on a side stream.

While the model works on batch ``j`` on the consumer's stream, the host-to-device copies of the
next ``prefetch`` batches already run on side streams. The consumer's stream waits for exactly
the copies of the batch it receives (``wait_stream``), and every produced tensor is marked with
``record_stream`` so the caching allocator does not hand its memory out again while the consumer
may still read it. On the CPU it is a pass-through.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch

__all__ = ["DeviceLoader"]

logger = logging.getLogger("cachedata")


def _to_device(obj: Any, device: torch.device, produced: list[torch.Tensor], *, pin: bool) -> Any:
    """Copy every tensor in a nested batch to ``device`` with ``non_blocking=True``.

    ``pin``: pin CPU tensors that are not pinned yet first (a copy from pageable memory is
    synchronous). New device tensors are appended to ``produced`` (for ``record_stream``).
    Leaves that are not tensors, and tensors already on ``device``, are returned as they are.
    """
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        src = obj
        if pin and src.is_cpu and not src.is_pinned():
            src = src.pin_memory()
        out = src.to(device, non_blocking=True)
        produced.append(out)
        return out
    if isinstance(obj, Mapping):
        moved = {k: _to_device(v, device, produced, pin=pin) for k, v in obj.items()}
        if type(obj) is dict:
            return moved
        try:
            if isinstance(obj, MutableMapping):
                clone = copy.copy(obj)
                clone.clear()
                clone.update(moved)
                return clone
            return type(obj)(moved)
        except (TypeError, ValueError, AttributeError):
            return moved
    if isinstance(obj, tuple):
        items = [_to_device(v, device, produced, pin=pin) for v in obj]
        if type(obj) is tuple:
            return tuple(items)
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        try:
            return type(obj)(items)
        except (TypeError, ValueError):
            return tuple(items)
    if isinstance(obj, list):
        items = [_to_device(v, device, produced, pin=pin) for v in obj]
        if type(obj) is list:
            return items
        try:
            return type(obj)(items)
        except (TypeError, ValueError):
            return items
    return obj


class DeviceLoader:
    """Wrap any iterable of batches and yield them with every tensor on ``device``.

    ``prefetch`` batches (>= 1) are copied ahead of the one being consumed. Each ``iter()`` starts
    a new pass over ``loader``; ``len()`` is the loader's. With ``device`` "cpu", or "cuda"
    without CUDA available, the loader's batches are yielded unchanged. Other device types
    (e.g. "mps") get a plain ``.to(device)`` without streams.
    """

    def __init__(self, loader: Iterable[Any], device: str | torch.device | int, *, prefetch: int = 1) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int):
            raise TypeError(
                f"DeviceLoader(prefetch={prefetch!r}): expected an int >= 1 (batches copied ahead)"
            )
        if prefetch < 1:
            raise ValueError(
                f"DeviceLoader(prefetch={prefetch}): needs at least 1 batch copied ahead; use prefetch=1 or more"
            )
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(
                f"DeviceLoader(device={device!r}): not a device torch understands; use 'cuda', 'cuda:1', "
                f"'cpu' or a torch.device ({exc})"
            ) from None
        self.loader = loader
        self.prefetch = prefetch

    def __repr__(self) -> str:
        return f"DeviceLoader({self.loader!r}, device={str(self.device)!r}, prefetch={self.prefetch})"

    def __len__(self) -> int:
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TypeError(
                f"DeviceLoader has no len(): the wrapped {type(self.loader).__name__} has none ({exc})"
            ) from None

    def __iter__(self) -> Iterator[Any]:
        device = self.device
        if device.type == "cpu":
            return iter(self.loader)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                logger.debug(
                    "DeviceLoader(device=%s): CUDA is not available, batches stay on the CPU", device
                )
                return iter(self.loader)
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            return self._cuda_iter(device)
        return self._plain_iter(device)

    def _plain_iter(self, device: torch.device) -> Iterator[Any]:
        for batch in self.loader:
            yield _to_device(batch, device, [], pin=False)

    def _cuda_iter(self, device: torch.device) -> Iterator[Any]:
        # One side stream per prefetch slot (batch j copies on streams[j % prefetch]). When the
        # consumer takes batch j, its slot's stream holds only batch j's copies, so wait_stream
        # waits for those and not for the batches prefetched after it.
        streams = [torch.cuda.Stream(device=device) for _ in range(self.prefetch)]
        batches = iter(self.loader)
        pending: deque[tuple[Any, list[torch.Tensor], torch.cuda.Stream]] = deque()
        count = 0
        error: BaseException | None = None

        def enqueue() -> None:
            nonlocal count, error
            if error is not None:
                return
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # raised once the batches before it are handed over
                error = exc
                return
            stream = streams[count % len(streams)]
            count += 1
            produced: list[torch.Tensor] = []
            with torch.cuda.stream(stream):
                moved = _to_device(batch, device, produced, pin=True)
            pending.append((moved, produced, stream))

        for _ in range(self.prefetch):
            enqueue()
        while pending:
            moved, produced, stream = pending.popleft()
            consumer = torch.cuda.current_stream(device)
            consumer.wait_stream(stream)
            for tensor in produced:
                # Allocated on the side stream: keep the memory alive until the consumer's
                # work queued so far is done, even if the caller frees the tensor earlier.
                tensor.record_stream(consumer)
            enqueue()  # start the next copy before handing this batch over
            yield moved
        if error is not None:
            raise error
