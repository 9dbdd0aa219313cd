"""CachedCollate: a DataLoader ``collate_fn`` that stacks or pads each output straight into its final buffer.

This module walks the structure of the samples (dicts, tuples, lists, per-type functions from
``collate_fn_map``) and hands each column of leaves to the copies in :mod:`cachedata.stacking`,
which allocate their outputs where :mod:`cachedata.placement` decides: shared memory in a
DataLoader worker, pinned memory for a CUDA target, ordinary memory otherwise.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from .checks import is_positive_int, path_str, type_name
from .containers import rebuild_mapping, rebuild_sequence
from .device import parse_device, to_device
from .placement import Placement, plan, send, share_together
from .stacking import (
    NUMBER_DTYPES,
    array_leaf,
    check_types,
    first_mismatch,
    number_column,
    numpy_scalar_column,
    stack_plain,
    validate_pad_value,
    values_tensor,
    where,
)

__all__ = ["CachedCollate"]

Path = tuple[Any, ...]
CollateFn = Callable[..., Any]
_NONE_TYPE = type(None)
_ARRAY_TYPES = (torch.Tensor, np.ndarray)
_set_grad_enabled = torch._C._set_grad_enabled
# Exact types whose column needs no dispatch: numbers -> their tensor dtype, the rest -> None (kept a list).
_SCALAR_DTYPES: dict[type, torch.dtype | None] = {
    **NUMBER_DTYPES,
    str: None,
    bytes: None,
    _NONE_TYPE: None,
}
_NOT_SCALAR = object()
# Leaf types a collate_fn_map entry for a base class (numbers.Number, object) does not take
# over: like torch's default_collate_fn_map, only an entry for the exact type does.
_BUILTIN_LEAF_TYPES = frozenset({torch.Tensor, np.ndarray, *NUMBER_DTYPES, str, bytes, _NONE_TYPE})
# What CachedCollate's own rules handle, as entries of the map handed to collate_fn_map functions.
_BUILTIN_KEYS: tuple[type, ...] = (
    torch.Tensor,
    np.ndarray,
    np.generic,
    numbers.Number,
    str,
    bytes,
    _NONE_TYPE,
    Mapping,
    tuple,
    list,
    object,
)


def _validate_fn_map(fn_map: Any) -> dict[type | tuple[type, ...], CollateFn]:
    if fn_map is None:
        return {}
    if not isinstance(fn_map, Mapping):
        raise TypeError(
            f"CachedCollate(collate_fn_map={fn_map!r}): expected a dict mapping types to functions, "
            "e.g. {MyType: collate_my_type}"
        )
    for key, fn in fn_map.items():
        keys = key if isinstance(key, tuple) else (key,)
        if not keys or not all(isinstance(k, type) for k in keys):
            raise TypeError(
                f"CachedCollate(collate_fn_map=...): key {key!r} is not a type or a tuple of types; "
                "map a class to a function, e.g. {MyType: collate_my_type}"
            )
        if not callable(fn):
            raise TypeError(
                f"CachedCollate(collate_fn_map=...): the value for {key!r} is {fn!r}, which is not "
                "callable; map each type to a function fn(batch, *, collate_fn_map)"
            )
    return dict(fn_map)


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

    Teaching it a type, without subclassing: ``collate_fn_map={MyType: fn}`` maps a type, or a
    tuple of types, to a function called like the entries of torch's ``collate_fn_map``
    (``torch.utils.data.default_collate``'s registry): ``fn(batch, *, collate_fn_map)``, where
    ``batch`` is the list of values at one place in the samples (sample 0's is a ``MyType``); its
    return value is that place in the batch. The entries are merged with the rules above, and
    looked up as torch does: a value's exact type first, then the first entry (in the map's
    order) it is an instance of; tensors, ndarrays, Python numbers, str, bytes and None are
    taken over only by an entry for their exact type. The ``collate_fn_map`` handed to ``fn``
    holds the entries plus this class's rules under ``torch.Tensor``, ``Mapping``, ...,
    ``object``: ``collate_fn_map[object](parts)`` collates a list of parts (say the fields of
    ``MyType``) like any other value at that place (stacked or padded with that key's pad value,
    in the call's shared or pinned memory)::

        def collate_boxes(batch, *, collate_fn_map):
            rest = collate_fn_map[object]
            return Boxes(rest([b.ids for b in batch]), rest([b.score for b in batch]))

        CachedCollate(pad_value={"box": -1}, collate_fn_map={Box: collate_boxes})

    A function's output gets no ``_lengths`` key; with a CUDA ``device`` in the main process its
    tensors are copied there like every other output. For spawn workers the functions must
    pickle (define them at module level). An error raised inside one carries a note naming the
    type and place.
    """

    def __init__(
        self,
        *,
        pad_value: float | Mapping[Any, float] = 0,
        pad_to_multiple_of: int | None = None,
        device: str | torch.device | int | None = None,
        pin_memory: bool | None = None,
        non_blocking: bool = True,
        collate_fn_map: Mapping[type | tuple[type, ...], CollateFn] | None = None,
    ) -> None:
        self.pad_value = validate_pad_value(pad_value)
        if pad_to_multiple_of is not None and not is_positive_int(pad_to_multiple_of):
            raise ValueError(
                f"CachedCollate(pad_to_multiple_of={pad_to_multiple_of!r}): expected a positive int "
                "such as 8 (or None to pad to the batch maximum)"
            )
        self.pad_to_multiple_of = None if pad_to_multiple_of is None else int(pad_to_multiple_of)
        self.device = None if device is None else parse_device(device, owner="CachedCollate")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"CachedCollate(pin_memory={pin_memory!r}): expected None, True or False")
        self.pin_memory = pin_memory
        if not isinstance(non_blocking, bool):
            raise TypeError(f"CachedCollate(non_blocking={non_blocking!r}): expected True or False")
        self.non_blocking = non_blocking
        self.collate_fn_map = _validate_fn_map(collate_fn_map)
        # Per exact sample type: its collate_fn_map function, or None for the built-in rules.
        # None when there is no map at all, so that the walk skips the lookup.
        self._fn_for: dict[type, CollateFn | None] | None = {} if self.collate_fn_map else None

    def __repr__(self) -> str:
        fn_map = f", collate_fn_map={self.collate_fn_map!r}" if self.collate_fn_map else ""
        return (
            f"CachedCollate(pad_value={self.pad_value!r}, pad_to_multiple_of={self.pad_to_multiple_of!r}, "
            f"device={None if self.device is None else str(self.device)!r}, "
            f"pin_memory={self.pin_memory!r}, non_blocking={self.non_blocking!r}{fn_map})"
        )

    def __call__(self, samples: Sequence[Any]) -> Any:
        """Same as :meth:`collate` (so an instance is a ``collate_fn``)."""
        return self.collate(samples)

    def collate(self, samples: Sequence[Any]) -> Any:
        """Turn a list of samples of one structure into a batch (see the class docstring)."""
        batch = samples if type(samples) is list else list(samples)
        if not batch:
            raise ValueError("CachedCollate got an empty list of samples; a batch needs at least one")
        call = plan(self.device, self.pin_memory, self.non_blocking)
        # torch.no_grad() without its context-manager overhead (~2 us, 1-2% of a small batch)
        grad_was_enabled = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            result = self._collate(batch, (), None, call)
            if call.pending:
                share_together(call.pending)
        finally:
            _set_grad_enabled(grad_was_enabled)
        return result

    # -- collate_fn_map ----------------------------------------------------------------------

    def _hook(self, elem_type: type) -> CollateFn | None:
        """The collate_fn_map function for samples of ``elem_type``, or None (built-in rules).

        Resolved as torch's ``collate`` does: the exact type first; then, except for the
        built-in leaf types, the first entry (in the map's order) the type is a subclass of.
        """
        fn_for = self._fn_for
        if fn_for is None:  # no collate_fn_map
            return None
        try:
            return fn_for[elem_type]
        except KeyError:
            pass
        fn_map = self.collate_fn_map
        fn = fn_map.get(elem_type)
        if fn is None and elem_type not in _BUILTIN_LEAF_TYPES:
            fn = next((f for key, f in fn_map.items() if issubclass(elem_type, key)), None)
        fn_for[elem_type] = fn
        return fn

    def _run_hook(self, fn: CollateFn, batch: list[Any], path: Path, key: Any, call: Placement) -> Any:
        """Call a collate_fn_map function as torch does: ``fn(batch, collate_fn_map=...)``.

        The map it gets holds the user's entries, then CachedCollate's own rules for every other
        type, bound to this place in the sample: ``torch.utils.data.collate(parts,
        collate_fn_map=collate_fn_map)`` inside ``fn`` stacks and pads ``parts`` like any column.
        """

        def builtin(parts: Sequence[Any], *, collate_fn_map: Any = None) -> Any:
            return self._collate(list(parts), path, key, call)

        fn_map: dict[Any, CollateFn] = dict(self.collate_fn_map)
        for builtin_type in _BUILTIN_KEYS:
            fn_map.setdefault(builtin_type, builtin)
        try:
            out = fn(batch, collate_fn_map=fn_map)
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python >= 3.11; on 3.10 the error goes on unannotated
                exc.add_note(
                    f"in CachedCollate's collate_fn_map function for {type_name(type(batch[0]))} "
                    f"at {path_str(path) or 'the sample'}"
                )
            raise
        if call.target is not None:  # like every other output, to the device it was asked for
            out = to_device(out, call.target, non_blocking=call.non_blocking)
        return out

    # -- structure ---------------------------------------------------------------------------

    def _pad_for(self, key: Any) -> float:
        """The pad value for a tensor stored under dict key ``key`` (None: outside any dict)."""
        if key == "attention_mask":
            return 0
        if isinstance(self.pad_value, dict):
            return self.pad_value.get(key, 0) if key is not None else 0
        return self.pad_value

    def _collate(self, batch: list[Any], path: Path, key: Any, call: Placement) -> Any:
        elem_type = type(batch[0])
        if self._fn_for is not None:
            fn = self._hook(elem_type)
            if fn is not None:
                return self._run_hook(fn, batch, path, key, call)
        if elem_type is torch.Tensor or elem_type is np.ndarray or issubclass(elem_type, _ARRAY_TYPES):
            return array_leaf(batch, path, self._pad_for(key), self.pad_to_multiple_of, call)[0]
        # One pass of type() over the column; the detailed error is only built on a mismatch.
        if list(map(type, batch)).count(elem_type) != len(batch):
            check_types(batch, path)
        if elem_type is dict:  # the common sample: skip the abstract-class checks below
            return self._mapping(batch, path, call)
        number_dtype = NUMBER_DTYPES.get(elem_type)  # exact bool/int/float/complex: the common case
        if number_dtype is not None:
            return number_column(batch, path, number_dtype, call)
        if elem_type is str or elem_type is _NONE_TYPE or issubclass(elem_type, (str, bytes)):
            return batch
        if issubclass(elem_type, np.generic):
            return numpy_scalar_column(batch, call)
        if issubclass(elem_type, numbers.Number):
            number_dtype = next((d for t, d in NUMBER_DTYPES.items() if issubclass(elem_type, t)), None)
            if number_dtype is not None:
                return number_column(batch, path, number_dtype, call)
        if issubclass(elem_type, Mapping):
            return self._mapping(batch, path, call)
        if issubclass(elem_type, (tuple, list)):
            return self._sequence(batch, path, key, call)
        # PIL images and any other object: kept as a list, like str.
        return batch

    def _mapping(self, batch: list[Mapping[Any, Any]], path: Path, call: Placement) -> Any:
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
        hooked = self._fn_for is not None
        result: dict[Any, Any] = {}
        for k in keys:
            try:
                # a comprehension: d[k] is specialized for dicts, faster than map(operator.itemgetter(k))
                column = [d[k] for d in batch]
            except KeyError:
                self._raise_keys(batch, path)
            value_type = type(column[0])
            if hooked:
                fn = self._hook(value_type)
                if fn is not None:
                    result[k] = self._run_hook(fn, column, (*path, k), k, call)
                    continue
            scalar_dtype = _SCALAR_DTYPES.get(value_type, _NOT_SCALAR)
            if scalar_dtype is not _NOT_SCALAR:
                # Exactly int/float/bool/complex/str/bytes/None (labels, weights, ids): what
                # _collate would do, without its dispatch. One type() a sample; the detailed
                # error is only worked out on a mismatch.
                if list(map(type, column)).count(value_type) != n:
                    check_types(column, (*path, k))
                if scalar_dtype is None:
                    result[k] = column
                else:
                    result[k] = number_column(column, (*path, k), scalar_dtype, call)
            elif (
                value_type is torch.Tensor or value_type is np.ndarray or issubclass(value_type, _ARRAY_TYPES)
            ):
                if value_type is torch.Tensor and plain:
                    # Same-shape plain tensors (features, fixed-length ids): one dtype pass and
                    # one stack. Anything else (ragged, sparse, mixed dtypes or devices, a big
                    # output in a worker) takes array_leaf, which also words the errors.
                    out = stack_plain(column, n, call.shared)
                    if out is not None:
                        result[k] = send(out, call) if call.shared else out
                        continue
                value, shapes = array_leaf(
                    column, (*path, k), self._pad_for(k), self.pad_to_multiple_of, call
                )
                result[k] = value
                if shapes is not None and add_lengths and isinstance(k, str):
                    length_key = k + "_lengths"
                    if length_key not in keys:
                        result[length_key] = values_tensor([s[0] for s in shapes], torch.int64, call)
            else:
                result[k] = self._collate(column, (*path, k), k, call)
        # Keep the mapping type and its extra state (e.g. a HF BatchEncoding), like default_collate.
        return rebuild_mapping(elem, result)

    @staticmethod
    def _raise_keys(batch: list[Mapping[Any, Any]], path: Path) -> NoReturn:
        keys = batch[0].keys()
        i = next(i for i, d in enumerate(batch) if d.keys() != keys)
        missing = [k for k in keys if k not in batch[i]]
        extra = [k for k in batch[i] if k not in keys]
        raise ValueError(
            f"{where(i, path)}: keys differ from sample 0's (missing {missing}, unexpected {extra}); "
            "every sample of a batch needs the same keys"
        )

    def _sequence(self, batch: list[Sequence[Any]], path: Path, key: Any, call: Placement) -> Any:
        sizes = list(map(len, batch))
        if sizes.count(sizes[0]) != len(batch):
            i = first_mismatch(sizes, sizes[0])
            raise ValueError(f"{where(i, path)}: length {sizes[i]} differs from sample 0's {sizes[0]}")
        columns = [
            self._collate(list(column), (*path, j), key, call)
            for j, column in enumerate(zip(*batch, strict=True))
        ]
        return rebuild_sequence(batch[0], columns)
