"""CachedCollate: a DataLoader ``collate_fn`` that stacks or pads each output straight into its final buffer.

Every tensor of a batch is written exactly once, into the buffer it is handed over in:

- inside a DataLoader worker: shared memory (what the worker queue sends without copying it again,
  the same trick as ``torch.utils.data.default_collate``). Creating a shared-memory segment costs
  tens of microseconds whatever its size, so the small outputs of a batch (labels, lengths, small
  features: each at most ``_SHARED_BLOCK_LEAF_BYTES``) are made in ordinary memory and then moved
  together into ONE segment, each a view of its own aligned slice; large outputs get their own;
- in the main process with a CUDA target: pinned memory, then one ``non_blocking`` copy to the device;
- otherwise: ordinary memory.

Same-shape samples go through one ``torch.stack`` (``out=`` the shared or pinned buffer); ragged
ones are copied into their slice of an output preallocated and filled with the pad value (no
``pad_sequence`` + copy).
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import math
import numbers
from collections.abc import Mapping, MutableMapping, Sequence
from operator import attrgetter
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import get_worker_info

from . import buffers

__all__ = ["CachedCollate"]

logger = logging.getLogger("cachedata")

_Path = tuple[Any, ...]
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_NONE_TYPE = type(None)
_ARRAY_TYPES = (torch.Tensor, np.ndarray)
_IS_CPU = attrgetter("is_cpu")
_memmove = ctypes.memmove
_memset = ctypes.memset
_set_grad_enabled = torch._C._set_grad_enabled
# In a worker, outputs up to this size share one shared-memory segment per batch (see the module
# docstring); the segment lives as long as any of them, so it is kept small. Larger outputs are
# written straight into a segment of their own (copying them once more would cost more than the
# segment).
_SHARED_BLOCK_LEAF_BYTES = 64 * 1024
_SHARED_BLOCK_ALIGN = 64  # bytes: each output starts on a cache line
# In ordinary memory, stacked outputs larger than this go into a recycled buffer (see _empty):
# a batch of 64 images is 38 MB of fresh pages otherwise, faulted in on every batch.
_POOLED_STACK_BYTES = 1024 * 1024
# Python numbers and the tensor dtype default_collate gives them (bool before int: bool is an int).
_NUMBER_DTYPES: dict[type, torch.dtype] = {
    bool: torch.bool,
    int: torch.int64,
    float: torch.float64,
    complex: torch.complex128,
}
# Exact types whose column needs no dispatch: numbers -> their tensor dtype, the rest -> None (kept a list).
_SCALAR_DTYPES: dict[type, torch.dtype | None] = {
    **_NUMBER_DTYPES,
    str: None,
    bytes: None,
    _NONE_TYPE: None,
}
_NOT_SCALAR = object()
_TORCH_TO_NP: dict[torch.dtype, type] = {
    torch.bool: np.bool_,
    torch.int64: np.int64,
    torch.float64: np.float64,
    torch.complex128: np.complex128,
}
# numpy dtype -> torch dtype, filled lazily; None: torch has no such dtype (str, object, datetime).
_NP_TO_TORCH: dict[np.dtype, torch.dtype | None] = {}
_warned_no_cuda = False


def _torch_dtype_of(np_dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype holding ``np_dtype`` (byte order aside), or None when torch has none."""
    try:
        return _NP_TO_TORCH[np_dtype]
    except KeyError:
        pass
    try:
        native = np_dtype.newbyteorder("=")
        result: torch.dtype | None = torch.from_numpy(np.empty(0, dtype=native)).dtype
    except (TypeError, ValueError, RuntimeError):
        result = None
    _NP_TO_TORCH[np_dtype] = result
    return result


def _fmt_path(path: _Path) -> str:
    """``("x", 2)`` -> ``["x"][2]`` (JSON quoting for str keys, repr for the rest)."""
    return "".join(f"[{json.dumps(k) if isinstance(k, str) else repr(k)}]" for k in path)


def _where(index: int, path: _Path) -> str:
    return f"sample {index} at {_fmt_path(path)}" if path else f"sample {index}"


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _dtype_name(dtype: torch.dtype | np.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_mismatch(values: list[Any], ref: Any) -> int:
    """Index of the first value that differs from ``ref`` (the caller knows there is one)."""
    return next(i for i, v in enumerate(values) if v != ref)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, np.ndarray)


def _zero_bytes(pad: Any) -> bool:
    """Whether ``pad`` is stored as all-zero bytes in every dtype (0, 0.0, False; not -0.0)."""
    try:
        z = complex(pad)
    except (TypeError, ValueError):
        return False
    return z == 0 and math.copysign(1.0, z.real) > 0 and math.copysign(1.0, z.imag) > 0


def _copy_rows(out: torch.Tensor, batch: list[torch.Tensor], lengths: Sequence[int], pad: Any) -> None:
    """Fill ``out`` (uninitialized) with sample i in ``out[i, :lengths[i]]`` and ``pad`` after it,
    when only dimension 0 is ragged (token ids, frames, waveforms).

    Each such slot is one contiguous block of ``out``, so a plain dense CPU sample is one
    ``memmove`` of its bytes: ~1 us a sample against several for torch indexing + ``copy_``,
    which is what makes padding faster than ``pad_sequence``. A zero pad is one ``memset`` of
    each row's tail rather than a ``fill_`` of the whole output first: every byte is written
    once (for ragged audio, the fill was 40% of the collate). Anything else (a subclass,
    non-contiguous, conj/neg views, quantized) goes through :func:`_copy_slices`.
    """
    n = len(batch)
    raw = (
        not out.is_quantized
        and out.is_contiguous()
        and list(map(type, batch)).count(torch.Tensor) == n
        and list(map(_IS_CPU, batch)).count(True) == n
        and list(map(torch.Tensor.is_contiguous, batch)).count(True) == n
        and list(map(torch.Tensor.is_neg, batch)).count(False) == n
        and (not out.dtype.is_complex or list(map(torch.Tensor.is_conj, batch)).count(False) == n)
    )
    zero_tails = raw and _zero_bytes(pad)
    if not zero_tails:
        out.fill_(pad)
    if not raw:
        _copy_slices(out, batch, [(length,) for length in lengths], True)
        return
    itemsize = out.element_size()
    row_bytes = out.stride(0) * itemsize
    base = out.data_ptr()
    sources = list(map(torch.Tensor.data_ptr, batch))
    nbytes = [numel * itemsize for numel in map(torch.Tensor.numel, batch)]
    for i, (src, count) in enumerate(zip(sources, nbytes, strict=True)):
        if count:  # empty samples may have no storage at all
            _memmove(base + i * row_bytes, src, count)
        if zero_tails and count < row_bytes:
            _memset(base + i * row_bytes + count, 0, row_bytes - count)


def _copy_slices(
    out: torch.Tensor, batch: list[Any], shapes: Sequence[Sequence[int]], dim0_only: bool
) -> None:
    """Copy sample i into ``out[i, :size0, :size1, ...]`` (any ragged dimensions).

    numpy slice assignment costs well under a microsecond, torch indexing + ``copy_`` several,
    so CPU samples go through a numpy view of ``out``; what numpy cannot view (bfloat16,
    conj/neg views, tensors on a device or requiring grad) goes through torch.
    """
    out_np = None
    if out.is_cpu:
        try:
            out_np = out.numpy()
        except (RuntimeError, TypeError):  # bfloat16 and other dtypes numpy lacks
            pass
    for i, (sample, shape) in enumerate(zip(batch, shapes, strict=True)):
        index = (i, slice(shape[0])) if dim0_only else (i, *map(slice, shape))
        if out_np is not None:
            if isinstance(sample, np.ndarray):
                out_np[index] = sample
                continue
            try:
                out_np[index] = sample.numpy()
                continue
            except (RuntimeError, TypeError):
                pass
        out[index] = torch.as_tensor(sample)


def _stack_plain(batch: list[torch.Tensor], n: int, shared: bool) -> torch.Tensor | None:
    """``torch.stack(batch)`` for same-shape strided tensors of one dtype, else None (general path).

    ``shared``: in a worker, only an output small enough for the batch's shared segment.
    """
    elem = batch[0]
    if elem.layout is not torch.strided or elem.is_nested:
        return None
    if shared and n * elem.nbytes > _SHARED_BLOCK_LEAF_BYTES:
        return None
    try:
        # a cheap guess at "not ragged" (stack checks every shape, and devices)
        if elem.shape != batch[-1].shape:
            return None
        # stack would promote mixed dtypes silently: check them (1 attribute read a sample)
        if list(map(_DTYPE, batch)).count(elem.dtype) != n:
            return None
        return torch.stack(batch, 0)
    except (AttributeError, RuntimeError):  # a sample that is no tensor, ragged, another device
        return None


def _validate_pad_value(pad_value: Any) -> float | dict[Any, float]:
    if isinstance(pad_value, Mapping):
        for key, value in pad_value.items():
            if not _is_number(value):
                raise TypeError(
                    f"CachedCollate(pad_value=...): the pad value for key {key!r} is {value!r} "
                    f"({type(value).__name__}); use a number such as 0, -100 or 0.0"
                )
        return dict(pad_value)
    if not _is_number(pad_value):
        raise TypeError(
            f"CachedCollate(pad_value={pad_value!r}): expected a number, or a dict mapping sample "
            f"keys to numbers (e.g. {{'input_ids': 0, 'labels': -100}}), got {type(pad_value).__name__}"
        )
    return pad_value


class _Call:
    """Per-call decisions: where outputs are allocated and where they are sent."""

    __slots__ = ("non_blocking", "pending", "pinned", "shared", "target")

    def __init__(self, shared: bool, pinned: bool, target: torch.device | None, non_blocking: bool) -> None:
        self.shared = shared  # inside a DataLoader worker: allocate in shared memory
        self.pinned = pinned  # main process: allocate in pinned memory
        self.target = target  # copy each output there (None: stay where allocated)
        self.non_blocking = non_blocking
        # worker: small outputs made in ordinary memory, moved into one shared segment at the end
        self.pending: list[torch.Tensor] = []


def _share_together(tensors: list[torch.Tensor]) -> None:
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
        t.set_(
            storage, offset // t.itemsize, source.shape, source.stride()
        )  # set_ keeps old strides otherwise


class CachedCollate:
    """Collate a list of samples into a batch, stacking same-shape tensors and padding ragged ones.

    Use an instance as a DataLoader ``collate_fn`` (it pickles, so spawn workers work). Rules:

    - tensors and ndarrays of one shape are stacked; of different shapes (same number of
      dimensions) they are padded at the end of each ragged dimension to the batch maximum,
      rounded up to ``pad_to_multiple_of``, with ``pad_value``. Dimensions whose sizes all agree
      are neither padded nor rounded, so a batch that needs no padding is stacked as is.
    - ndarrays become tensors; ndarrays torch cannot hold (strings, objects) stay lists.
    - Python numbers become tensors like ``default_collate`` (bool -> bool, int -> int64,
      float -> float64, complex -> complex128); numpy scalars keep their dtype.
    - str, bytes, None and any other object (PIL images included) stay lists.
    - dict (key order of sample 0), tuple, namedtuple and list nesting is kept.
    - In a dict, each padded tensor/ndarray value under a str key ``k`` also gets
      ``k + "_lengths"``: int64 original sizes along the first dimension, unless the dict has
      ``"attention_mask"``: then no ``_lengths`` keys are added and ``attention_mask`` is always
      padded with 0. A key the sample already has is never overwritten. A batch in which
      ``k`` needs no padding (equal sizes, or a single sample) gets no ``k + "_lengths"``.
    - ``pad_value`` is a number, or a dict mapping the key a tensor is stored under (its nearest
      enclosing dict key) to a number; keys not in the dict, and tensors outside any dict, use 0.

    Where outputs go: inside a DataLoader worker, into shared memory (``device`` is ignored
    there; move batches with :class:`~cachedata.DeviceLoader`). There the small outputs of one
    batch (each at most 64 KiB: labels, lengths, small features) are views of ONE shared segment,
    which stays mapped while any of them is alive: ``.clone()`` a small piece you keep for long
    (e.g. labels gathered over an epoch). In the main process with a CUDA
    ``device``, into pinned memory, then copied with ``non_blocking``; ``pin_memory=True`` pins
    even without a ``device``. Without CUDA (or with ``device`` None/"cpu") nothing is pinned and
    batches stay on the CPU, silently.

    Collation is done under ``torch.no_grad()``: batches never carry autograd history.
    """

    def __init__(
        self,
        *,
        pad_value: float | Mapping[Any, float] = 0,
        pad_to_multiple_of: int | None = None,
        device: str | torch.device | int | None = None,
        pin_memory: bool | None = None,
        non_blocking: bool = True,
    ) -> None:
        self.pad_value = _validate_pad_value(pad_value)
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, numbers.Integral)
            or pad_to_multiple_of < 1
        ):
            raise ValueError(
                f"CachedCollate(pad_to_multiple_of={pad_to_multiple_of!r}): expected a positive int "
                "such as 8 (or None to pad to the batch maximum)"
            )
        self.pad_to_multiple_of = None if pad_to_multiple_of is None else int(pad_to_multiple_of)
        if device is None:
            self.device: torch.device | None = None
        else:
            try:
                self.device = torch.device(device)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"CachedCollate(device={device!r}): not a device torch understands; use None, "
                    f"'cpu', 'cuda', 'cuda:1' or a torch.device ({exc})"
                ) from None
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"CachedCollate(pin_memory={pin_memory!r}): expected None, True or False")
        self.pin_memory = pin_memory
        if not isinstance(non_blocking, bool):
            raise TypeError(f"CachedCollate(non_blocking={non_blocking!r}): expected True or False")
        self.non_blocking = non_blocking

    def __repr__(self) -> str:
        return (
            f"CachedCollate(pad_value={self.pad_value!r}, pad_to_multiple_of={self.pad_to_multiple_of!r}, "
            f"device={None if self.device is None else str(self.device)!r}, "
            f"pin_memory={self.pin_memory!r}, non_blocking={self.non_blocking!r})"
        )

    def __call__(self, samples: Sequence[Any]) -> Any:
        """Same as :meth:`collate` (so an instance is a ``collate_fn``)."""
        return self.collate(samples)

    def collate(self, samples: Sequence[Any]) -> Any:
        """Turn a list of samples of one structure into a batch (see the class docstring)."""
        batch = samples if type(samples) is list else list(samples)
        if not batch:
            raise ValueError("CachedCollate got an empty list of samples; a batch needs at least one")
        call = self._plan()
        # torch.no_grad() without its context-manager overhead (~2 us, 1-2% of a small batch)
        grad_was_enabled = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            result = self._collate(batch, (), None, call)
            if call.pending:
                _share_together(call.pending)
        finally:
            _set_grad_enabled(grad_was_enabled)
        return result

    # -- where outputs go -------------------------------------------------------------------

    def _plan(self) -> _Call:
        if get_worker_info() is not None:
            # CUDA cannot be used in a worker: collate into shared memory, DeviceLoader moves it.
            return _Call(shared=True, pinned=False, target=None, non_blocking=False)
        device = self.device
        wants_cuda = device is not None and device.type == "cuda"
        cuda = (wants_cuda or self.pin_memory is True) and torch.cuda.is_available()
        if wants_cuda and not cuda:
            global _warned_no_cuda
            if not _warned_no_cuda:
                _warned_no_cuda = True
                logger.debug(
                    "CachedCollate(device=%s): CUDA is not available, batches stay on the CPU", device
                )
        target = None
        if device is not None and device.type != "cpu" and (not wants_cuda or cuda):
            target = device
        pinned = cuda and (self.pin_memory if self.pin_memory is not None else wants_cuda)
        return _Call(shared=False, pinned=pinned, target=target, non_blocking=self.non_blocking)

    @staticmethod
    def _empty(shape: Sequence[int], dtype: torch.dtype, call: _Call) -> torch.Tensor:
        """An uninitialized CPU output in shared, pinned or ordinary memory.

        In a worker, a small output is made in ordinary memory: :meth:`_send` queues it, and
        :meth:`collate` moves all of them into one shared segment at the end.
        """
        if call.shared:
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > _SHARED_BLOCK_LEAF_BYTES:
                # Straight into shared memory, like default_collate: the worker queue then sends
                # a handle instead of copying the batch into shared memory a second time.
                storage = torch.UntypedStorage._new_shared(nbytes)
                return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
        elif not call.pinned:
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes >= buffers.MIN_BYTES:
                # Recycled memory (cachedata.buffers): a fresh multi-MB output page-faults in
                # on every batch once glibc has handed the last one back (about a third of a
                # padded audio batch's collate time here). The buffer is reused only after the
                # batch and every view of it are gone.
                try:
                    return torch.from_numpy(buffers.take(nbytes)).view(dtype).view(tuple(shape))
                except RuntimeError:  # a dtype a byte buffer cannot be viewed as (quantized)
                    pass
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=call.pinned)

    @staticmethod
    def _send(out: torch.Tensor, call: _Call) -> torch.Tensor:
        """Hand an output over: to the worker's shared memory, or copied to the target device."""
        if call.shared:
            if out.is_cpu:
                if out.nbytes <= _SHARED_BLOCK_LEAF_BYTES:
                    call.pending.append(out)  # into the batch's shared segment at the end
                elif not out.is_shared():
                    out.share_memory_()
            return out
        if call.target is None:
            return out
        return out.to(call.target, non_blocking=call.non_blocking)

    # -- structure ---------------------------------------------------------------------------

    def _pad_for(self, key: Any) -> float:
        """The pad value for a tensor stored under dict key ``key`` (None: outside any dict)."""
        if key == "attention_mask":
            return 0
        if isinstance(self.pad_value, dict):
            return self.pad_value.get(key, 0) if key is not None else 0
        return self.pad_value

    def _collate(self, batch: list[Any], path: _Path, key: Any, call: _Call) -> Any:
        elem_type = type(batch[0])
        if elem_type is torch.Tensor or elem_type is np.ndarray or issubclass(elem_type, _ARRAY_TYPES):
            return self._array_leaf(batch, path, self._pad_for(key), call)[0]
        # One pass of type() over the column; the detailed error is only built on a mismatch.
        if list(map(type, batch)).count(elem_type) != len(batch):
            self._check_types(batch, path)
        if elem_type is dict:  # the common sample: skip the abstract-class checks below
            return self._mapping(batch, path, call)
        number_dtype = _NUMBER_DTYPES.get(elem_type)  # exact bool/int/float/complex: the common case
        if number_dtype is not None:
            return self._numbers(batch, path, number_dtype, call)
        if elem_type is str or elem_type is _NONE_TYPE or issubclass(elem_type, (str, bytes)):
            return batch
        if issubclass(elem_type, np.generic):
            return self._numpy_scalars(batch, path, call)
        if issubclass(elem_type, numbers.Number):
            number_dtype = next((d for t, d in _NUMBER_DTYPES.items() if issubclass(elem_type, t)), None)
            if number_dtype is not None:
                return self._numbers(batch, path, number_dtype, call)
        if issubclass(elem_type, Mapping):
            return self._mapping(batch, path, call)
        if issubclass(elem_type, (tuple, list)):
            return self._sequence(batch, path, key, call)
        # PIL images and any other object: kept as a list, like str.
        return batch

    def _mapping(self, batch: list[Mapping[Any, Any]], path: _Path, call: _Call) -> Any:
        elem = batch[0]
        keys = elem.keys()
        # Every sample holds each key of sample 0 (a missing one raises KeyError while gathering
        # below) and as many keys in all (checked here) = the same keys. One len() a sample.
        n = len(batch)
        if sum(map(len, batch)) != n * len(keys):
            self._raise_keys(batch, path)
        # With an attention mask the model already knows the lengths: add no `_lengths` keys.
        add_lengths = "attention_mask" not in keys
        # Outputs in ordinary memory, handed over as they are (main process without pinning,
        # or a worker's small outputs, which go into the batch's shared segment at the end).
        plain = call.target is None and not call.pinned
        result: dict[Any, Any] = {}
        for k in keys:
            try:
                # a comprehension: d[k] is specialized for dicts, faster than map(operator.itemgetter(k))
                column = [d[k] for d in batch]
            except KeyError:
                self._raise_keys(batch, path)
            value_type = type(column[0])
            scalar_dtype = _SCALAR_DTYPES.get(value_type, _NOT_SCALAR)
            if scalar_dtype is not _NOT_SCALAR:
                # Exactly int/float/bool/complex/str/bytes/None (labels, weights, ids): what
                # _collate would do, without its dispatch. One type() a sample; the detailed
                # error is only worked out on a mismatch.
                if list(map(type, column)).count(value_type) != n:
                    self._check_types(column, (*path, k))
                if scalar_dtype is None:
                    result[k] = column
                else:
                    result[k] = self._numbers(column, (*path, k), scalar_dtype, call)
            elif (
                value_type is torch.Tensor or value_type is np.ndarray or issubclass(value_type, _ARRAY_TYPES)
            ):
                if value_type is torch.Tensor and plain:
                    # Same-shape plain tensors (features, fixed-length ids): one dtype pass and
                    # one stack. Anything else (ragged, sparse, mixed dtypes or devices, a big
                    # output in a worker) takes _array_leaf, which also words the errors.
                    out = _stack_plain(column, n, call.shared)
                    if out is not None:
                        result[k] = self._send(out, call) if call.shared else out
                        continue
                value, shapes = self._array_leaf(column, (*path, k), self._pad_for(k), call)
                result[k] = value
                if shapes is not None and add_lengths and isinstance(k, str):
                    length_key = k + "_lengths"
                    if length_key not in keys:
                        result[length_key] = self._values([s[0] for s in shapes], torch.int64, call)
            else:
                result[k] = self._collate(column, (*path, k), k, call)
        if type(elem) is dict:
            return result
        try:
            if isinstance(elem, MutableMapping):
                # Keep the mapping type and its extra state (e.g. a HF BatchEncoding), like default_collate.
                clone = copy.copy(elem)
                clone.clear()
                clone.update(result)
                return clone
            return type(elem)(result)
        except (TypeError, ValueError, AttributeError):
            return result

    @staticmethod
    def _raise_keys(batch: list[Mapping[Any, Any]], path: _Path) -> NoReturn:
        keys = batch[0].keys()
        i = next(i for i, d in enumerate(batch) if d.keys() != keys)
        missing = [k for k in keys if k not in batch[i]]
        extra = [k for k in batch[i] if k not in keys]
        raise ValueError(
            f"{_where(i, path)}: keys differ from sample 0's (missing {missing}, unexpected {extra}); "
            "every sample of a batch needs the same keys"
        )

    def _sequence(self, batch: list[Sequence[Any]], path: _Path, key: Any, call: _Call) -> Any:
        elem = batch[0]
        sizes = list(map(len, batch))
        if sizes.count(sizes[0]) != len(batch):
            i = _first_mismatch(sizes, sizes[0])
            raise ValueError(f"{_where(i, path)}: length {sizes[i]} differs from sample 0's {sizes[0]}")
        columns = [
            self._collate(list(column), (*path, j), key, call)
            for j, column in enumerate(zip(*batch, strict=True))
        ]
        elem_type = type(elem)
        if elem_type is tuple:
            return tuple(columns)
        if elem_type is list:
            return columns
        if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # namedtuple
            return elem_type(*columns)
        try:
            return elem_type(columns)
        except (TypeError, ValueError):
            return tuple(columns) if isinstance(elem, tuple) else columns

    @staticmethod
    def _check_types(batch: list[Any], path: _Path) -> None:
        elem_type = type(batch[0])
        types = list(map(type, batch))
        if types.count(elem_type) != len(batch):
            i = _first_mismatch(types, elem_type)
            raise ValueError(
                f"{_where(i, path)}: type {_type_name(types[i])} differs from sample 0's {_type_name(elem_type)}"
            )

    # -- leaves ------------------------------------------------------------------------------

    def _values(self, values: list[Any], dtype: torch.dtype, call: _Call) -> torch.Tensor:
        """A 1-D tensor of Python/numpy scalars, converted by numpy in one C loop (no torch.tensor)."""
        if call.pinned or (call.shared and len(values) * dtype.itemsize > _SHARED_BLOCK_LEAF_BYTES):
            out = self._empty((len(values),), dtype, call)
            out.numpy()[:] = values
        else:  # ordinary memory (in a worker: moved into the batch's shared segment at the end)
            np_dtype = _TORCH_TO_NP.get(dtype) or torch.empty(0, dtype=dtype).numpy().dtype
            out = torch.from_numpy(np.fromiter(values, dtype=np_dtype, count=len(values)))
        return self._send(out, call)

    def _numbers(self, batch: list[Any], path: _Path, dtype: torch.dtype, call: _Call) -> torch.Tensor:
        try:
            if call.target is None and not call.pinned and not call.shared:  # ordinary memory
                np_dtype = _TORCH_TO_NP.get(dtype) or torch.empty(0, dtype=dtype).numpy().dtype
                return torch.from_numpy(np.fromiter(batch, dtype=np_dtype, count=len(batch)))
            return self._values(batch, dtype, call)
        except (OverflowError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{_fmt_path(path) or 'samples'}: numbers do not fit {_dtype_name(dtype)} ({exc})"
            ) from None

    def _numpy_scalars(self, batch: list[np.generic], path: _Path, call: _Call) -> Any:
        # One numpy scalar type is one dtype (the type check ran): no per-sample dtype check.
        dtype = _torch_dtype_of(batch[0].dtype)
        if dtype is None:  # datetime64, void, object: nothing torch can hold
            return batch
        return self._values(batch, dtype, call)

    def _array_leaf(
        self, batch: list[Any], path: _Path, pad: float, call: _Call
    ) -> tuple[Any, list[tuple[int, ...]] | None]:
        """Stack or pad tensors/ndarrays. Returns (batch tensor, sample shapes when padded else None)."""
        elem = batch[0]
        n = len(batch)
        is_numpy = isinstance(elem, np.ndarray)
        if is_numpy:
            torch_dtype = _torch_dtype_of(elem.dtype)
            if torch_dtype is None:  # arrays of str/object: nothing a tensor can hold
                return batch, None
        else:
            torch_dtype = elem.dtype
            if elem.layout is not torch.strided or elem.is_nested:
                raise TypeError(
                    f"{_fmt_path(path) or 'samples'}: {elem.layout} tensors cannot be batched; "
                    "convert them with .to_dense() in the dataset or transform"
                )

        # The dtype check also stands in for a type check (1 attribute read a sample): on a
        # mismatch, or a sample without a dtype, the types are compared first for the best error.
        try:
            dtypes = list(map(_DTYPE, batch))
        except AttributeError:
            dtypes = []  # some sample has no dtype: _check_types raises below
        if dtypes.count(elem.dtype) != n:
            self._check_types(batch, path)
            i = _first_mismatch(dtypes, elem.dtype)
            raise ValueError(
                f"{_where(i, path)}: dtype {_dtype_name(dtypes[i])} differs from sample 0's {_dtype_name(elem.dtype)}"
            )
        # Samples already on an accelerator are collated there (no shared/pinned memory).
        on_device = not is_numpy and not elem.is_cpu

        def empty(shape: Sequence[int]) -> torch.Tensor:
            if on_device:
                return torch.empty(tuple(shape), dtype=torch_dtype, device=elem.device)
            return self._empty(shape, torch_dtype, call)

        shapes: list[Any] | None = None
        if is_numpy:
            shapes = list(map(_SHAPE, batch))
            same = shapes.count(shapes[0]) == n
        else:
            # A cheap guess (building every torch.Size costs ~0.2 us a sample); torch.stack
            # checks all shapes and a ragged batch that slips through falls to the padding below.
            same = elem.shape == batch[-1].shape
        if same:  # fast path: one stack into the output
            try:
                if is_numpy:
                    out = empty((n, *elem.shape))
                    np.stack(batch, axis=0, out=out.numpy())
                elif on_device or not (
                    call.pinned
                    or n * elem.nbytes > (_SHARED_BLOCK_LEAF_BYTES if call.shared else _POOLED_STACK_BYTES)
                ):
                    # Ordinary memory (in a worker, a small output goes to the batch's shared
                    # segment later): stack allocates the output itself, and its out= variant
                    # is ~2x slower for many small tensors (it unsqueezes each input first).
                    out = torch.stack(batch, 0)
                else:
                    out = empty((n, *elem.shape))
                    torch.stack(batch, 0, out=out)
                return self._send(out, call), None
            except RuntimeError:
                if not is_numpy:
                    self._diagnose_devices(batch, path)
                shapes = list(map(_SHAPE, batch))
                if shapes.count(shapes[0]) == n:
                    raise
                # ragged after all: pad below
        if shapes is None:
            shapes = list(map(_SHAPE, batch))

        shape0 = shapes[0]
        ndim = len(shape0)
        ndims = list(map(len, shapes))
        if ndims.count(ndim) != n:
            i = _first_mismatch(ndims, ndim)
            raise ValueError(
                f"{_where(i, path)}: {ndims[i]} dimensions (shape {tuple(shapes[i])}) differ from sample 0's "
                f"{ndim} (shape {tuple(shape0)}); only sizes may differ, not the number of dimensions"
            )
        if on_device:
            self._diagnose_devices(batch, path)
        columns = list(zip(*shapes, strict=True))
        size = list(map(max, columns))
        ragged = [d for d, sizes in enumerate(columns) if min(sizes) != size[d]]
        if self.pad_to_multiple_of is not None:
            m = self.pad_to_multiple_of
            for d in ragged:
                size[d] = -(-size[d] // m) * m
        self._check_pad(pad, torch_dtype, path)

        out = empty((n, *size))
        if ragged == [0] and not is_numpy and out.is_cpu:
            _copy_rows(out, batch, columns[0], pad)
        else:
            out.fill_(pad)
            _copy_slices(out, batch, shapes, ragged == [0])
        return self._send(out, call), shapes

    @staticmethod
    def _check_pad(pad: float, dtype: torch.dtype, path: _Path) -> None:
        """Refuse a pad value the output dtype would silently change (1.5 into int64, 2 into bool)."""
        where = _fmt_path(path) or "the batch"
        if dtype.is_complex:
            return
        if isinstance(pad, complex) and pad.imag != 0:
            raise ValueError(
                f"pad value {pad!r} for {where} is complex but the tensors are {_dtype_name(dtype)}"
            )
        if dtype.is_floating_point:
            return
        if dtype == torch.bool:
            if pad not in (0, 1):
                raise ValueError(
                    f"pad value {pad!r} for {where} does not fit bool tensors; use 0/False or 1/True"
                )
            return
        if isinstance(pad, float) and not pad.is_integer():
            raise ValueError(
                f"pad value {pad!r} for {where} is not an integer but the tensors are {_dtype_name(dtype)}; "
                "pass an integer pad value for this key"
            )
        info = torch.iinfo(dtype)
        if not info.min <= pad <= info.max:
            raise ValueError(
                f"pad value {pad!r} for {where} is outside {_dtype_name(dtype)}'s range [{info.min}, {info.max}]"
            )

    @staticmethod
    def _diagnose_devices(batch: list[torch.Tensor], path: _Path) -> None:
        devices = [t.device for t in batch]
        if devices.count(devices[0]) != len(devices):
            i = _first_mismatch(devices, devices[0])
            raise ValueError(f"{_where(i, path)}: device {devices[i]} differs from sample 0's {devices[0]}")
