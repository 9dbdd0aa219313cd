"""The stacking and padding copies of CachedCollate: one column of samples -> one batch output.

Same-shape samples go through one ``torch.stack`` (``out=`` the shared or pinned buffer); ragged
ones are copied into their slice of an output preallocated and filled with the pad value (no
``pad_sequence`` + copy). Python and numpy numbers become a 1-D tensor in one numpy C loop.
Outputs are allocated and handed over as the call's :class:`~cachedata.placement.Placement` says.

The error helpers here (:func:`where`, :func:`check_types`) word a mismatch by the first sample
that differs and its place in the sample (``sample 3 at ["x"]: ...``).
"""

from __future__ import annotations

import ctypes
import math
import numbers
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

import numpy as np
import torch

from .checks import path_str, type_name
from .placement import POOLED_STACK_BYTES, SHARED_BLOCK_LEAF_BYTES, Placement, empty, send

__all__ = [
    "NUMBER_DTYPES",
    "array_leaf",
    "check_types",
    "copy_rows",
    "copy_slices",
    "dtype_name",
    "first_mismatch",
    "is_number",
    "number_column",
    "numpy_scalar_column",
    "stack_plain",
    "torch_dtype_of",
    "validate_pad_value",
    "values_tensor",
    "where",
]

Path = tuple[Any, ...]
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_IS_CPU = attrgetter("is_cpu")
_memset = ctypes.memset
_memmove = ctypes.memmove
# Python numbers and the tensor dtype default_collate gives them (bool before int: bool is an int).
NUMBER_DTYPES: dict[type, torch.dtype] = {
    bool: torch.bool,
    int: torch.int64,
    float: torch.float64,
    complex: torch.complex128,
}
_TORCH_TO_NP: dict[torch.dtype, type] = {
    torch.bool: np.bool_,
    torch.int64: np.int64,
    torch.float64: np.float64,
    torch.complex128: np.complex128,
}
# numpy dtype -> torch dtype, filled lazily; None: torch has no such dtype (str, object, datetime).
_NP_TO_TORCH: dict[np.dtype, torch.dtype | None] = {}


def torch_dtype_of(np_dtype: np.dtype) -> torch.dtype | None:
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


# -- error wording --------------------------------------------------------------------------------


def where(index: int, path: Path) -> str:
    """``sample 3 at ["x"]`` (or ``sample 3`` at the top of the sample)."""
    return f"sample {index} at {path_str(path)}" if path else f"sample {index}"


def dtype_name(dtype: torch.dtype | np.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def first_mismatch(values: list[Any], ref: Any) -> int:
    """Index of the first value that differs from ``ref`` (the caller knows there is one)."""
    return next(i for i, v in enumerate(values) if v != ref)


def check_types(batch: list[Any], path: Path) -> None:
    """Raise a ValueError naming the first sample whose type differs from sample 0's."""
    elem_type = type(batch[0])
    types = list(map(type, batch))
    if types.count(elem_type) != len(batch):
        i = first_mismatch(types, elem_type)
        raise ValueError(
            f"{where(i, path)}: type {type_name(types[i])} differs from sample 0's {type_name(elem_type)}"
        )


def _diagnose_devices(batch: list[torch.Tensor], path: Path) -> None:
    devices = [t.device for t in batch]
    if devices.count(devices[0]) != len(devices):
        i = first_mismatch(devices, devices[0])
        raise ValueError(f"{where(i, path)}: device {devices[i]} differs from sample 0's {devices[0]}")


def _check_pad(pad: float, dtype: torch.dtype, path: Path) -> None:
    """Refuse a pad value the output dtype would silently change (1.5 into int64, 2 into bool)."""
    place = path_str(path) or "the batch"
    if dtype.is_complex:
        return
    if isinstance(pad, complex) and pad.imag != 0:
        raise ValueError(f"pad value {pad!r} for {place} is complex but the tensors are {dtype_name(dtype)}")
    if dtype.is_floating_point:
        return
    if dtype == torch.bool:
        if pad not in (0, 1):
            raise ValueError(
                f"pad value {pad!r} for {place} does not fit bool tensors; use 0/False or 1/True"
            )
        return
    if isinstance(pad, float) and not pad.is_integer():
        raise ValueError(
            f"pad value {pad!r} for {place} is not an integer but the tensors are {dtype_name(dtype)}; "
            "pass an integer pad value for this key"
        )
    info = torch.iinfo(dtype)
    if not info.min <= pad <= info.max:
        raise ValueError(
            f"pad value {pad!r} for {place} is outside {dtype_name(dtype)}'s range [{info.min}, {info.max}]"
        )


# -- copies ---------------------------------------------------------------------------------------


def _zero_bytes(pad: Any) -> bool:
    """Whether ``pad`` is stored as all-zero bytes in every dtype (0, 0.0, False; not -0.0)."""
    try:
        z = complex(pad)
    except (TypeError, ValueError):
        return False
    return z == 0 and math.copysign(1.0, z.real) > 0 and math.copysign(1.0, z.imag) > 0


def copy_rows(out: torch.Tensor, batch: list[torch.Tensor], lengths: Sequence[int], pad: Any) -> None:
    """Fill ``out`` (uninitialized) with sample i in ``out[i, :lengths[i]]`` and ``pad`` after it,
    when only dimension 0 is ragged (token ids, frames, waveforms).

    Each such slot is one contiguous block of ``out``, so a plain dense CPU sample is one
    ``memmove`` of its bytes: ~1 us a sample against several for torch indexing + ``copy_``,
    which is what makes padding faster than ``pad_sequence``. A zero pad is one ``memset`` of
    each row's tail rather than a ``fill_`` of the whole output first: every byte is written
    once (for ragged audio, the fill was 40% of the collate). Anything else (a subclass,
    non-contiguous, conj/neg views, quantized) goes through :func:`copy_slices`.
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
        copy_slices(out, batch, [(length,) for length in lengths], True)
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


def copy_slices(
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


def stack_plain(batch: list[torch.Tensor], n: int, shared: bool) -> torch.Tensor | None:
    """``torch.stack(batch)`` for same-shape strided tensors of one dtype, else None (general path).

    ``shared``: in a worker, only an output small enough for the batch's shared segment.
    """
    elem = batch[0]
    if elem.layout is not torch.strided or elem.is_nested:
        return None
    if shared and n * elem.nbytes > SHARED_BLOCK_LEAF_BYTES:
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


# -- numbers --------------------------------------------------------------------------------------


def _np_dtype(dtype: torch.dtype) -> Any:
    return _TORCH_TO_NP.get(dtype) or torch.empty(0, dtype=dtype).numpy().dtype


def values_tensor(values: list[Any], dtype: torch.dtype, placement: Placement) -> torch.Tensor:
    """A 1-D tensor of Python/numpy scalars, converted by numpy in one C loop (no torch.tensor)."""
    if placement.pinned or (placement.shared and len(values) * dtype.itemsize > SHARED_BLOCK_LEAF_BYTES):
        out = empty((len(values),), dtype, placement)
        out.numpy()[:] = values
    else:  # ordinary memory (in a worker: moved into the batch's shared segment at the end)
        out = torch.from_numpy(np.fromiter(values, dtype=_np_dtype(dtype), count=len(values)))
    return send(out, placement)


def number_column(batch: list[Any], path: Path, dtype: torch.dtype, placement: Placement) -> torch.Tensor:
    """Python numbers of one type as a 1-D ``dtype`` tensor (default_collate's dtypes)."""
    try:
        if placement.target is None and not placement.pinned and not placement.shared:  # ordinary memory
            return torch.from_numpy(np.fromiter(batch, dtype=_np_dtype(dtype), count=len(batch)))
        return values_tensor(batch, dtype, placement)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path_str(path) or 'samples'}: numbers do not fit {dtype_name(dtype)} ({exc})"
        ) from None


def numpy_scalar_column(batch: list[np.generic], placement: Placement) -> Any:
    """numpy scalars of one type as a 1-D tensor of their dtype; kept a list when torch has none."""
    # One numpy scalar type is one dtype (the caller checked the types): no per-sample dtype check.
    dtype = torch_dtype_of(batch[0].dtype)
    if dtype is None:  # datetime64, void, object: nothing torch can hold
        return batch
    return values_tensor(batch, dtype, placement)


def is_number(value: Any) -> bool:
    """A number that can be a pad value (a 0-d ndarray is not one)."""
    return isinstance(value, numbers.Number) and not isinstance(value, np.ndarray)


def validate_pad_value(pad_value: Any) -> float | dict[Any, float]:
    """``CachedCollate(pad_value=...)``: a number, or a dict of numbers (copied)."""
    if isinstance(pad_value, Mapping):
        for key, value in pad_value.items():
            if not is_number(value):
                raise TypeError(
                    f"CachedCollate(pad_value=...): the pad value for key {key!r} is {value!r} "
                    f"({type_name(type(value))}); use a number such as 0, -100 or 0.0"
                )
        return dict(pad_value)
    if not is_number(pad_value):
        raise TypeError(
            f"CachedCollate(pad_value={pad_value!r}): expected a number, or a dict mapping sample "
            f"keys to numbers (e.g. {{'input_ids': 0, 'labels': -100}}), got {type_name(type(pad_value))}"
        )
    return pad_value


# -- tensors and arrays ---------------------------------------------------------------------------


def array_leaf(
    batch: list[Any], path: Path, pad: float, pad_to_multiple_of: int | None, placement: Placement
) -> tuple[Any, list[tuple[int, ...]] | None]:
    """Stack or pad tensors/ndarrays. Returns (batch tensor, sample shapes when padded else None)."""
    elem = batch[0]
    n = len(batch)
    is_numpy = isinstance(elem, np.ndarray)
    if is_numpy:
        torch_dtype = torch_dtype_of(elem.dtype)
        if torch_dtype is None:  # arrays of str/object: nothing a tensor can hold
            return batch, None
    else:
        torch_dtype = elem.dtype
        if elem.layout is not torch.strided or elem.is_nested:
            raise TypeError(
                f"{path_str(path) or 'samples'}: {elem.layout} tensors cannot be batched; "
                "convert them with .to_dense() in the dataset or transform"
            )

    # The dtype check also stands in for a type check (1 attribute read a sample): on a
    # mismatch, or a sample without a dtype, the types are compared first for the best error.
    try:
        dtypes = list(map(_DTYPE, batch))
    except AttributeError:
        dtypes = []  # some sample has no dtype: check_types raises below
    if dtypes.count(elem.dtype) != n:
        check_types(batch, path)
        i = first_mismatch(dtypes, elem.dtype)
        raise ValueError(
            f"{where(i, path)}: dtype {dtype_name(dtypes[i])} differs from sample 0's {dtype_name(elem.dtype)}"
        )
    # Samples already on an accelerator are collated there (no shared/pinned memory).
    on_device = not is_numpy and not elem.is_cpu

    def new_output(shape: Sequence[int]) -> torch.Tensor:
        if on_device:
            return torch.empty(tuple(shape), dtype=torch_dtype, device=elem.device)
        return empty(shape, torch_dtype, placement)

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
                out = new_output((n, *elem.shape))
                np.stack(batch, axis=0, out=out.numpy())
            elif on_device or not (
                placement.pinned
                or n * elem.nbytes > (SHARED_BLOCK_LEAF_BYTES if placement.shared else POOLED_STACK_BYTES)
            ):
                # Ordinary memory (in a worker, a small output goes to the batch's shared
                # segment later): stack allocates the output itself, and its out= variant
                # is ~2x slower for many small tensors (it unsqueezes each input first).
                out = torch.stack(batch, 0)
            else:
                out = new_output((n, *elem.shape))
                torch.stack(batch, 0, out=out)
            return send(out, placement), None
        except RuntimeError:
            if not is_numpy:
                _diagnose_devices(batch, path)
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
        i = first_mismatch(ndims, ndim)
        raise ValueError(
            f"{where(i, path)}: {ndims[i]} dimensions (shape {tuple(shapes[i])}) differ from sample 0's "
            f"{ndim} (shape {tuple(shape0)}); only sizes may differ, not the number of dimensions"
        )
    if on_device:
        _diagnose_devices(batch, path)
    columns = list(zip(*shapes, strict=True))
    size = list(map(max, columns))
    ragged = [d for d, sizes in enumerate(columns) if min(sizes) != size[d]]
    if pad_to_multiple_of is not None:
        m = pad_to_multiple_of
        for d in ragged:
            size[d] = -(-size[d] // m) * m
    _check_pad(pad, torch_dtype, path)

    out = new_output((n, *size))
    if ragged == [0] and not is_numpy and out.is_cpu:
        copy_rows(out, batch, columns[0], pad)
    else:
        out.fill_(pad)
        copy_slices(out, batch, shapes, ragged == [0])
    return send(out, placement), shapes
