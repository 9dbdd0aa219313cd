"""DeviceLoader: move a loader's batches to a CUDA device ahead of time, on a side stream.

While the model works on batch ``j`` on the consumer's stream, the host-to-device copies of the
next ``prefetch`` batches already run on side streams. The consumer's stream waits for exactly
the copies of the batch it receives (``wait_stream``), and every produced tensor is marked with
``record_stream`` so the caching allocator does not hand its memory out again while the consumer
may still read it. On the CPU it is a pass-through.
"""

from __future__ import annotations

import logging
import numbers
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .checks import is_positive_int
from .containers import rebuild_mapping, rebuild_sequence

__all__ = ["DeviceLoader", "parse_device", "to_device"]

logger = logging.getLogger("cachedata")


def parse_device(value: str | torch.device | int, *, owner: str) -> torch.device:
    """``torch.device(value)``, or a ValueError naming ``owner`` (e.g. ``"DeviceLoader"``) and a fix."""
    try:
        return torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{owner}(device={value!r}): not a device torch understands; use 'cpu', 'cuda', 'cuda:1' "
            f"or a torch.device ({exc})"
        ) from None


def to_device(
    obj: Any,
    device: torch.device,
    *,
    pin: bool = False,
    non_blocking: bool = True,
    produced: list[torch.Tensor] | None = None,
) -> Any:
    """Copy every tensor in a nested batch to ``device``; containers are rebuilt around the copies.

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
        out = src.to(device, non_blocking=non_blocking)
        if produced is not None:
            produced.append(out)
        return out
    if isinstance(obj, Mapping):
        return rebuild_mapping(
            obj,
            {
                k: to_device(v, device, pin=pin, non_blocking=non_blocking, produced=produced)
                for k, v in obj.items()
            },
        )
    if isinstance(obj, (tuple, list)):
        return rebuild_sequence(
            obj, [to_device(v, device, pin=pin, non_blocking=non_blocking, produced=produced) for v in obj]
        )
    return obj


class DeviceLoader:
    """Wrap any iterable of batches and yield them with every tensor on ``device``.

    ``prefetch`` batches (>= 1) are copied ahead of the one being consumed. Each ``iter()`` starts
    a new pass over ``loader``; ``len()`` is the loader's. With ``device`` "cpu", or "cuda"
    without CUDA available, the loader's batches are yielded unchanged. Other device types
    (e.g. "mps") get a plain ``.to(device)`` without streams.
    """

    def __init__(self, loader: Iterable[Any], device: str | torch.device | int, *, prefetch: int = 1) -> None:
        if not is_positive_int(prefetch):
            # a count of the wrong type is a TypeError, a count below 1 a ValueError
            raise (
                ValueError if isinstance(prefetch, numbers.Integral) and prefetch is not True else TypeError
            )(
                f"DeviceLoader(prefetch={prefetch!r}): expected an int >= 1 (batches copied ahead); "
                "use prefetch=1 or more"
            )
        self.device = parse_device(device, owner="DeviceLoader")
        self.loader = loader
        self.prefetch = int(prefetch)

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
            yield to_device(batch, device)

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
                moved = to_device(batch, device, pin=True, produced=produced)
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
