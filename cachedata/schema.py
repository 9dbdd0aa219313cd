"""Item structure: flatten a nested item into typed byte leaves and rebuild it bit-exactly.

An item (what ``transform`` returns) is described by a *schema*: a JSON tree of containers
(dict, list, tuple) and typed leaves (tensor, ndarray, PIL image, Python scalars, str,
bytes). The schema is fixed per namespace; per item only the leaf bytes and a row of
integer *slots* (shapes, byte lengths) vary, so ragged tensors are stored exactly while the
structure is checked. Decoding builds fresh, writable objects that share one buffer per
item and never unpickles or imports anything.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import buffers
from .checks import path_str, type_name

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("cachedata")

#: Leaves whose element size is 16 bytes (complex128) start at a 16-byte boundary, others at 8.
_ALIGN = 8

#: Element size in bytes of every torch dtype that cachedata stores, by name (torch 2.13), so
#: that decoders are built without importing torch; tests check it against torch's own.
_TENSOR_ITEMSIZES: dict[str, int] = {
    **dict.fromkeys(("bool", "uint8", "int8", "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz"), 1),
    **dict.fromkeys(("float8_e4m3fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"), 1),
    **{f"{sign}int{bits}": 1 for sign in ("", "u") for bits in range(1, 8)},
    **dict.fromkeys(("int16", "uint16", "float16", "bfloat16"), 2),
    **dict.fromkeys(("int32", "uint32", "float32", "complex32"), 4),
    **dict.fromkeys(("int64", "uint64", "float64", "complex64"), 8),
    "complex128": 16,
}


def _import_torch() -> None:
    """Import torch and build the dtype tables, replacing the stand-ins below for good.

    torch is imported on first use, not with this module: the command line (info, verify,
    prune, clear) reads caches through this module and starts in about 0.1 s instead of 2-5 s.
    """
    global torch, _TORCH_DTYPES, _DTYPE_NAMES
    import torch as real

    dtypes = {
        str(d).removeprefix("torch."): d
        for d in vars(real).values()
        if isinstance(d, real.dtype) and not str(d).startswith(("torch.q", "torch.bits"))  # quantized: scales
    }
    torch, _TORCH_DTYPES, _DTYPE_NAMES = real, dtypes, {d: name for name, d in dtypes.items()}


class _OnFirstUse:
    """Stands for a module global that needs torch; the first use imports torch and rebinds it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _real(self) -> Any:
        _import_torch()
        return globals()[self._name]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._real(), attr)

    def __contains__(self, key: object) -> bool:
        return key in self._real()


if not TYPE_CHECKING:
    torch = _OnFirstUse("torch")
_TORCH_DTYPES: dict[str, torch.dtype] = _OnFirstUse("_TORCH_DTYPES")  # type: ignore[assignment]
_DTYPE_NAMES: dict[torch.dtype, str] = _OnFirstUse("_DTYPE_NAMES")  # type: ignore[assignment]
#: numpy dtype kinds stored as raw bytes; object (O) and void/structured (V) are refused.
_NUMPY_KINDS = frozenset("biufcmMSU")
#: PIL modes that survive ``Image.fromarray(np.asarray(img), mode)`` unchanged.
_PIL_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"})

_warned_subclass: set[str] = set()


class UnstorableError(TypeError):
    """Raised while flattening; the dataset prefixes the item index."""


def _place(path: tuple) -> str:
    """A leaf's place inside an item for messages, e.g. ``["meta"][2]``."""
    return path_str(path) or "(the item itself)"


@dataclass(frozen=True)
class Encoded:
    """One flattened item: its schema, the slots row and the payload (leaves, aligned)."""

    schema: dict
    slots: list[int]
    payload: bytearray | np.ndarray  # uint8, from ``buffers`` when large


# ----------------------------------------------------------------------------- encoding


def encode(item: Any) -> Encoded:
    """Flatten ``item``; raise TypeError naming the path of a leaf that cannot be stored.

    Large payloads go into recycled buffers: a cold pass holds them until its next seal
    and then frees them all, and fresh memory would cost a page fault per 4 KiB again for
    every item (a 600 KB image: 320 us to copy into fresh memory, 50 us into a recycled
    buffer).
    """
    slots: list[int] = []
    chunks: list[tuple[memoryview, int]] = []
    schema = _flatten(item, (), slots, chunks)
    if len(chunks) == 1:  # one leaf: its bytes are the payload
        return Encoded(schema, slots, buffers.copy(chunks[0][0]))
    size = 0
    for c, a in chunks:
        size = _align(size, a) + c.nbytes
    payload = buffers.empty(size)
    view = payload.data if isinstance(payload, np.ndarray) else memoryview(payload)
    off = 0
    for c, a in chunks:
        start = _align(off, a)
        view[off:start] = bytes(start - off)  # padding: zeros, not a recycled buffer's bytes
        n = c.nbytes
        view[start : start + n] = c
        off = start + n
    return Encoded(schema, slots, payload)


def _chunk(data: bytes | np.ndarray, align: int = 8) -> tuple[memoryview, int]:
    """A leaf's bytes as a flat byte view, with the alignment its decoder expects."""
    return memoryview(data).cast("B") if isinstance(data, np.ndarray) else memoryview(data), align


def _align(off: int, a: int) -> int:
    return (off + a - 1) // a * a


def _flatten(x: Any, path: tuple, slots: list[int], chunks: list) -> dict:
    t = type(x)
    if t is dict:
        keys = []
        items = []
        for k, v in x.items():
            if type(k) is str:
                keys.append(["s", k])
            elif type(k) is int:
                keys.append(["i", k])
            else:
                raise UnstorableError(
                    f"at {_place(path)}: dict key {k!r} of type {type_name(type(k))} cannot be stored; "
                    "use str or int keys"
                )
            items.append(_flatten(v, (*path, k), slots, chunks))
        return {"t": "dict", "keys": keys, "items": items}
    if t is list:
        homogeneous = _homogeneous_list(x)
        if homogeneous is not None:
            return _flatten_seq(x, homogeneous, slots, chunks)
        return {"t": "list", "items": [_flatten(v, (*path, i), slots, chunks) for i, v in enumerate(x)]}
    if t is tuple:
        return {"t": "tuple", "items": [_flatten(v, (*path, i), slots, chunks) for i, v in enumerate(x)]}
    if isinstance(x, torch.Tensor):
        return _flatten_tensor(x, path, slots, chunks)
    if t is np.ndarray or t is np.memmap:
        return _flatten_array(x, path, slots, chunks, "ndarray")
    if isinstance(x, np.generic):
        node = _flatten_array(np.asarray(x), path, slots, chunks, "npscalar")
        return node
    if t is bool:
        chunks.append(_chunk(b"\x01" if x else b"\x00"))
        return {"t": "bool"}
    if t is int:
        n = max(8, (x.bit_length() + 8) // 8)
        chunks.append(_chunk(x.to_bytes(n, "little", signed=True)))
        slots.append(n)
        return {"t": "int"}
    if t is float:
        chunks.append(_chunk(struct.pack("<d", x)))
        return {"t": "float"}
    if t is complex:
        chunks.append(_chunk(struct.pack("<dd", x.real, x.imag)))
        return {"t": "complex"}
    if x is None:
        return {"t": "none"}
    if t is str:
        b = x.encode("utf-8", "surrogatepass")  # keep lone surrogates exact
        chunks.append(_chunk(b))
        slots.append(len(b))
        return {"t": "str"}
    if t is bytes or t is bytearray:
        chunks.append(_chunk(bytes(x)))
        slots.append(len(x))
        return {"t": t.__name__}
    if t.__module__.startswith("PIL.") and hasattr(x, "mode") and hasattr(x, "size"):
        return _flatten_pil(x, path, slots, chunks)
    if isinstance(x, (dict, list, tuple)):
        hint = "a plain dict" if isinstance(x, dict) else "a plain list or tuple"
        raise UnstorableError(f"at {_place(path)}: cannot store {type_name(type(x))}; return {hint}")
    raise UnstorableError(
        f"at {_place(path)}: cannot store {type_name(type(x))}; return a tensor, an ndarray, "
        "a number, str, bytes, None, or a dict/list/tuple of those"
    )


def _homogeneous_list(x: list) -> str | None:
    """'ints'/'floats'/'strs' when every element is of that one type (ragged lists are common)."""
    if not x:
        return None
    t = type(x[0])
    if t not in (int, float, str) or any(type(v) is not t for v in x):
        return None
    if t is int and not all(-(2**63) <= v < 2**63 for v in x):
        return None
    return {int: "ints", float: "floats", str: "strs"}[t]


def _flatten_seq(x: list, kind: str, slots: list[int], chunks: list) -> dict:
    if kind == "ints":
        chunks.append(_chunk(np.asarray(x, dtype="<i8")))
        slots.append(len(x))
    elif kind == "floats":
        chunks.append(_chunk(np.asarray(x, dtype="<f8")))
        slots.append(len(x))
    else:
        encoded = [s.encode("utf-8", "surrogatepass") for s in x]
        lengths = np.asarray([len(e) for e in encoded], dtype="<i8")
        chunks.append(_chunk(lengths))
        chunks.append(_chunk(b"".join(encoded)))
        slots.extend((len(x), int(lengths.sum())))
    return {"t": kind}


def _flatten_tensor(x: torch.Tensor, path: tuple, slots: list[int], chunks: list) -> dict:
    # Fast path (most items): a plain, contiguous CPU tensor needs no conversion at all.
    # numpy() itself refuses everything that would (grad, another device, the conj/neg bits,
    # sparse, nested or quantized tensors, dtypes numpy lacks): one call instead of a check each.
    if type(x) is torch.Tensor:
        name = _DTYPE_NAMES.get(x.dtype)
        if name is not None:
            try:
                arr = x.numpy()
            except (RuntimeError, TypeError):
                arr = None
            if arr is not None and arr.flags.c_contiguous:
                slots.extend(arr.shape)
                chunks.append(
                    (memoryview(arr.reshape(-1).view(np.uint8)), 16 if arr.itemsize >= 16 else _ALIGN)
                )
                return {"t": "tensor", "dtype": name, "ndim": arr.ndim}
    if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        name = type_name(type(x))
        if name not in _warned_subclass:
            _warned_subclass.add(name)
            logger.warning("cachedata stores %s at %s as a plain torch.Tensor", name, _place(path))
        x = x.as_subclass(torch.Tensor)
    if x.layout != torch.strided or x.is_quantized or x.is_nested:
        raise UnstorableError(
            f"at {_place(path)}: cannot store a {x.layout} / quantized / nested tensor; "
            "return a dense tensor (e.g. .to_dense())"
        )
    dtype = str(x.dtype).removeprefix("torch.")
    if dtype not in _TORCH_DTYPES:
        raise UnstorableError(f"at {_place(path)}: cannot store tensor dtype {x.dtype}")
    x = x.detach().resolve_conj().resolve_neg()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    slots.extend(x.shape)
    raw = x.reshape(-1).view(torch.uint8).numpy() if x.numel() else np.empty(0, np.uint8)
    chunks.append(_chunk(raw, 16 if x.element_size() >= 16 else _ALIGN))
    return {"t": "tensor", "dtype": dtype, "ndim": x.dim()}


def _np_dtype_name(dt: np.dtype) -> tuple[str, bool]:
    """The stored dtype name, and whether its itemsize varies per item (str/bytes arrays)."""
    if dt.kind in "SU":
        return dt.str[:2], True  # e.g. '<U': the length goes into a slot
    return dt.str, False


def _flatten_array(x: np.ndarray, path: tuple, slots: list[int], chunks: list, kind: str) -> dict:
    dt = x.dtype
    if dt.kind not in _NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise UnstorableError(
            f"at {_place(path)}: cannot store an ndarray of dtype {dt}; "
            "return a numeric, bool, datetime or fixed-width string array"
        )
    name, flexible = _np_dtype_name(dt)
    x = x if x.flags.c_contiguous else x.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
    if flexible:
        slots.append(dt.itemsize)
    if kind == "ndarray":
        slots.extend(x.shape)
    raw = x.reshape(-1).view(np.uint8)
    chunks.append(_chunk(raw, 16 if dt.itemsize >= 16 and not flexible else _ALIGN))
    node = {"t": kind, "dtype": name}
    if kind == "ndarray":
        node["ndim"] = x.ndim
    return node


def _flatten_pil(img: Any, path: tuple, slots: list[int], chunks: list) -> dict:
    if img.mode not in _PIL_MODES:
        raise UnstorableError(
            f"at {_place(path)}: cannot store a PIL image of mode {img.mode!r}; "
            f"convert it first (e.g. img.convert('RGB')); storable modes: {sorted(_PIL_MODES)}"
        )
    arr = np.asarray(img)
    node = _flatten_array(arr, path, slots, chunks, "ndarray")
    return {"t": "pil", "mode": img.mode, "dtype": node["dtype"], "ndim": node["ndim"]}


# ----------------------------------------------------------------------------- comparing


def dumps(schema: dict) -> str:
    """Canonical JSON text of a schema (the form stored on disk and compared)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=True)


def difference(expected: dict, got: dict, path: tuple = ()) -> str | None:
    """Describe the first difference between two schemas, or None when they are equal."""
    if expected == got:
        return None
    te, tg = expected.get("t"), got.get("t")
    where = f"at {_place(path)}"
    if te != tg:
        return f"{where}: {_describe(got)} where earlier items have {_describe(expected)}"
    if te == "dict":
        ke = [k for _, k in expected["keys"]]
        kg = [k for _, k in got["keys"]]
        if ke != kg:
            return f"{where}: keys {kg} where earlier items have keys {ke}"
        for k, e, g in zip(ke, expected["items"], got["items"]):
            d = difference(e, g, (*path, k))
            if d:
                return d
    if te in ("list", "tuple"):
        if len(expected["items"]) != len(got["items"]):
            return (
                f"{where}: {te} of length {len(got['items'])} where earlier items have length "
                f"{len(expected['items'])}"
            )
        for i, (e, g) in enumerate(zip(expected["items"], got["items"])):
            d = difference(e, g, (*path, i))
            if d:
                return d
    for field in ("dtype", "ndim", "mode"):
        if expected.get(field) != got.get(field):
            return f"{where}: {field} {got.get(field)} where earlier items have {expected.get(field)}"
    return f"{where}: {got} where earlier items have {expected}"


def _describe(node: dict) -> str:
    t = node["t"]
    if t in ("tensor", "ndarray", "pil"):
        return f"{t} of dtype {node['dtype']}"
    return {"ints": "list of ints", "floats": "list of floats", "strs": "list of str"}.get(t, t)


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Leaf:
    nslots: int
    align: int
    size: Callable[[list[int]], int]
    decode: Callable[[bytearray, int, int, list[int]], Any]


class Decoder:
    """Compiled from a schema once; rebuilds items from (buffer, offset, slots) quickly."""

    def __init__(self, schema: dict) -> None:
        self.schema = schema
        self.leaves: list[_Leaf] = []
        self._build = self._compile(schema)
        self.nslots = sum(leaf.nslots for leaf in self.leaves)
        self._single = self.leaves[0] if self._build is next else None

    def decode(self, buf: bytearray | np.ndarray, base: int, slots: list[int]) -> Any:
        """Rebuild one item whose payload starts at ``buf[base]`` (16-byte aligned).

        ``buf`` is a fresh bytearray or uint8 array; tensors and arrays are views of it.
        """
        if self._single is not None:  # one leaf, no containers: the token/image fast path
            return self._single.decode(buf, base, len(buf) - base, slots)
        vals = []
        off = base
        j = 0
        for leaf in self.leaves:
            s = slots[j : j + leaf.nslots]
            j += leaf.nslots
            a = leaf.align
            off = (off + a - 1) // a * a
            n = leaf.size(s)
            vals.append(leaf.decode(buf, off, n, s))
            off += n
        if off != len(buf):
            raise ValueError(f"{len(buf) - base} payload bytes for an item of {off - base} bytes")
        return self._build(iter(vals))

    def _compile(self, node: dict) -> Callable[[Iterator], Any]:
        t = node["t"]
        if t == "dict":
            keys = [k for _, k in node["keys"]]
            fns = [self._compile(n) for n in node["items"]]
            return lambda it: {k: f(it) for k, f in zip(keys, fns)}
        if t in ("list", "tuple"):
            fns = [self._compile(n) for n in node["items"]]
            if t == "list":
                return lambda it: [f(it) for f in fns]
            return lambda it: tuple(f(it) for f in fns)
        self.leaves.append(_leaf(node))
        return next


def _tensor_leaf(node: dict) -> _Leaf:
    """A tensor leaf; torch is imported at its first decode, not here (``cachedata info``
    builds decoders to count items and must not import torch)."""
    name = node.get("dtype", "")
    item = _TENSOR_ITEMSIZES.get(name) if isinstance(name, str) else None
    if item is None:  # not in the table (a newer torch's dtype, or garbage): ask torch
        dtype = _TORCH_DTYPES.get(name)
        if dtype is None:
            raise ValueError(f"unknown tensor dtype {name!r} in a cache file")
        item = torch.empty((), dtype=dtype).element_size()
    ndim = _ndim(node)

    def tensor_decoder(dtype: torch.dtype) -> Callable[[Any, int, int, list[int]], Any]:
        # A closure, not functools.partial(..., dtype=): keywords cost ds[i] a tenth of a us.
        def dec_tensor(buf, off, n, s):
            if n == 0:
                return torch.empty(s, dtype=dtype)
            if off == 0 and n == len(buf):  # a whole buffer (ds[i]): no count/offset to parse
                flat = torch.frombuffer(buf, dtype=dtype)
            else:
                flat = torch.frombuffer(buf, dtype=dtype, count=n // item, offset=off)
            if ndim == 1:  # view() costs microseconds: skip it for 1-D, check the length instead
                if s[0] * item != n:
                    raise ValueError(f"{n} payload bytes for a tensor of shape {s}")
                return flat
            return flat.view(s)

        return dec_tensor

    def first_decode(buf, off, n, s):
        dtype = _TORCH_DTYPES.get(name)
        if dtype is None:
            raise ValueError(f"unknown tensor dtype {name!r} in a cache file (this torch lacks it)")
        # Later items skip this lookup (_Leaf is frozen against accidents, not against this).
        object.__setattr__(leaf, "decode", tensor_decoder(dtype))
        return leaf.decode(buf, off, n, s)

    leaf = _Leaf(ndim, 16 if item >= 16 else _ALIGN, lambda s: math.prod(s) * item, first_decode)
    return leaf


def _leaf(node: dict) -> _Leaf:
    t = node["t"]
    if t == "tensor":
        return _tensor_leaf(node)
    if t in ("ndarray", "npscalar", "pil"):
        return _array_leaf(node)
    if t == "bool":
        return _Leaf(0, _ALIGN, lambda s: 1, lambda buf, off, n, s: bool(buf[off]))
    if t == "int":
        return _Leaf(
            1,
            _ALIGN,
            lambda s: s[0],
            lambda buf, off, n, s: int.from_bytes(bytes(buf[off : off + n]), "little", signed=True),
        )
    if t == "float":
        unpack = struct.Struct("<d").unpack_from
        return _Leaf(0, _ALIGN, lambda s: 8, lambda buf, off, n, s: unpack(buf, off)[0])
    if t == "complex":
        unpack2 = struct.Struct("<dd").unpack_from
        return _Leaf(0, _ALIGN, lambda s: 16, lambda buf, off, n, s: complex(*unpack2(buf, off)))
    if t == "none":
        return _Leaf(0, 1, lambda s: 0, lambda buf, off, n, s: None)
    if t == "str":
        return _Leaf(
            1,
            _ALIGN,
            lambda s: s[0],
            lambda buf, off, n, s: bytes(buf[off : off + n]).decode("utf-8", "surrogatepass"),
        )
    if t == "bytes":
        return _Leaf(1, _ALIGN, lambda s: s[0], lambda buf, off, n, s: bytes(buf[off : off + n]))
    if t == "bytearray":
        return _Leaf(1, _ALIGN, lambda s: s[0], lambda buf, off, n, s: bytearray(buf[off : off + n]))
    if t == "ints":
        return _Leaf(
            1,
            _ALIGN,
            lambda s: 8 * s[0],
            lambda buf, off, n, s: np.frombuffer(buf, "<i8", s[0], off).tolist(),
        )
    if t == "floats":
        return _Leaf(
            1,
            _ALIGN,
            lambda s: 8 * s[0],
            lambda buf, off, n, s: np.frombuffer(buf, "<f8", s[0], off).tolist(),
        )
    if t == "strs":

        def dec_strs(buf, off, n, s):
            lengths = np.frombuffer(buf, "<i8", s[0], off).tolist()
            pos = off + 8 * s[0]
            out = []
            for m in lengths:
                out.append(bytes(buf[pos : pos + m]).decode("utf-8", "surrogatepass"))
                pos += m
            return out

        return _Leaf(2, _ALIGN, lambda s: 8 * s[0] + s[1], dec_strs)
    raise ValueError(f"unknown leaf type {t!r} in a cache file")


def _ndim(node: dict) -> int:
    ndim = node.get("ndim")
    if type(ndim) is not int or not 0 <= ndim <= 64:
        raise ValueError(f"bad ndim {ndim!r} in a cache file")
    return ndim


def _array_leaf(node: dict) -> _Leaf:
    t = node["t"]
    name = node.get("dtype")
    if not isinstance(name, str):
        raise ValueError(f"bad dtype {name!r} in a cache file")
    flexible = name[1:2] in ("S", "U") and len(name) == 2
    base = np.dtype(name + "1") if flexible else np.dtype(name)  # np.dtype parses, never evals
    if base.kind not in _NUMPY_KINDS:
        raise ValueError(f"refusing ndarray dtype {name!r} in a cache file")
    ndim = _ndim(node) if t != "npscalar" else 0
    nslots = ndim + (1 if flexible else 0)
    wide = base.itemsize >= 16 and not flexible
    align = 16 if wide else _ALIGN

    def dtype_of(s: list[int]) -> np.dtype:
        return np.dtype(f"{name}{s[0] // (4 if name[1] == 'U' else 1)}") if flexible else base

    def size(s: list[int]) -> int:
        shape = s[1:] if flexible else s
        return math.prod(shape) * (s[0] if flexible else base.itemsize)

    if t == "ndarray":

        def dec(buf, off, n, s):
            shape = s[1:] if flexible else s
            return np.frombuffer(buf, dtype_of(s), math.prod(shape), off).reshape(tuple(shape))

    elif t == "npscalar":

        def dec(buf, off, n, s):
            return np.frombuffer(buf, dtype_of(s), 1, off)[0]

    else:
        mode = node.get("mode")
        if mode not in _PIL_MODES:
            raise ValueError(f"refusing PIL mode {mode!r} in a cache file")

        def dec(buf, off, n, s):
            from PIL import Image

            shape = s[1:] if flexible else s
            arr = np.frombuffer(buf, dtype_of(s), math.prod(shape), off).reshape(tuple(shape))
            if mode == "1":
                return Image.fromarray(arr)
            return Image.frombytes(mode, (shape[1], shape[0]), arr.tobytes())

    return _Leaf(nslots, align, size, dec)


def load(text: str) -> dict:
    """Parse a stored schema (JSON only) and check that it compiles; ValueError if not."""
    try:
        schema = json.loads(text)
        if not isinstance(schema, dict):
            raise ValueError("a cache file's schema is not a JSON object")
        Decoder(schema)
    except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise ValueError(f"a cache file's schema is malformed ({type(exc).__name__}: {exc})") from None
    return schema
