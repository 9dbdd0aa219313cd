"""Deterministic content fingerprints of datasets, transforms and their parameters.

``fingerprint(obj)`` returns a hex SHA-256 that is the same in every process, run
and ``PYTHONHASHSEED`` for objects with the same state, and different as soon as
a parameter that can change a transform's output changes. ``CachedDataset``
builds its namespace from it, so a stale cache is never served.

How it works: the object graph is walked once. Small scalars become inline
tokens; every container or object becomes a SHA-256 node over the tokens of its
children (a Merkle tree), so unordered things (sets, dict items) can be sorted by
their children's tokens and never depend on the hash seed. Bulk bytes (tensors,
arrays, long strings, images) are hashed with xxh3-128 first, which keeps a
100 MB model well under a second.

What is covered:

- ``None``, ``bool``, ``int``, ``float`` (bit pattern: ``NaN`` is stable and
  ``-0.0 != 0.0``), ``complex``, ``str``, ``bytes``, ``bytearray``, ``memoryview``.
- ``tuple`` and ``list`` (distinct from each other), ``dict`` (order-independent:
  two dicts equal as mappings fingerprint the same; items are sorted by key
  token), ``OrderedDict`` (order-sensitive, as its ``==`` is), ``set``,
  ``frozenset``, and subclasses of all of these (class identity + contents).
- Dataclasses (class + fields), enums (class + name + value), classes,
  modules (name + ``__version__`` when the module defines one).
- numpy arrays and scalars, torch tensors (content, dtype, shape; a tensor on any
  device is hashed from its CPU bytes, so moving it does not change anything;
  sparse, quantized and nested tensors too), ``torch.dtype``/``device``/``Generator``.
- Read-only ``numpy.memmap`` arrays and ``h5py`` files/groups/datasets are
  fingerprinted by *file identity* (real path, size, ``mtime_ns``) plus position,
  dtype and shape, not by content: a many-GB token file is not read on every
  construction, and rewriting the file still changes the fingerprint (like
  ``cachedata.keys.file_stat``). Writable memmaps are hashed by content; HDF5
  files open for writing are refused.
- ``torch.nn.Module``: class, every parameter and buffer (persistent or not), the
  ``training`` flag and every other attribute of every submodule, forward hooks.
  This covers torchvision v1/v2 and torchaudio transforms (sizes, mean/std,
  interpolation enums, antialias, windows, filter banks, resampling kernels).
- Functions and lambdas: qualified name, bytecode, constants (nested code
  included), names, defaults, keyword defaults, closure cells, function
  attributes, and the module globals they read (so changing ``SIZE = 224`` to
  ``256`` changes the fingerprint of a function that reads ``SIZE``). The file
  name and line numbers are *not* included: moving code around does not
  invalidate a cache, but editing it does. Bytecode is interpreter specific, so a
  Python upgrade changes fingerprints of user functions.
- Decorated functions keep their code: ``functools.wraps`` wrappers through
  their closure and ``__wrapped__``, ``functools.lru_cache`` through ``__wrapped__``.
- Bound methods (function + ``__self__``), ``functools.partial`` (function, args,
  keywords), callable instances and any other object with inspectable state
  (its ``__reduce_ex__``/``__dict__``/``__slots__`` state, the same state pickle
  sees: PIL images, ``pathlib`` paths, ``re`` patterns, ``random.Random``...).
- Hugging Face ``tokenizers.Tokenizer`` (its full ``to_str()`` serialization:
  vocabulary, merges, normalizer, pre-tokenizer, post-processor, padding,
  truncation), ``transformers`` fast tokenizers (``backend_tokenizer.to_str()``
  plus special tokens and settings) and image processors / feature extractors
  (their ``to_dict()`` config), detected by duck typing, without importing
  ``transformers``.
- Any object whose class defines ``__cachedata_fingerprint__(self) -> str``: that
  string (plus the class identity) is used and nothing else is inspected.

User code versus library code: code in ``__main__``, in exec'd strings and in
modules outside the standard library and ``site-packages`` is *user code*;
user functions and classes are fingerprinted by their code (a class by its
methods and class attributes), so editing them invalidates caches. Library
functions and classes (stdlib, installed packages, ``cachedata`` itself) are
fingerprinted by module and qualified name only: upgrading a library does not
change fingerprints unless the state of the objects changes. Modules referenced
by user code do contribute their own ``__version__`` attribute (e.g. ``numpy``
read as a global), as the issue asks.

What is not covered, and raises ``TypeError`` naming the type and the attribute
path (e.g. ``transform.tokenizer._lock``): open files, sockets, locks, threads,
generators, iterators and other objects with hidden state, and objects whose
only state is their identity (``object()``). The fix is ``version=`` on
``CachedDataset`` or a ``__cachedata_fingerprint__`` method.

Known limits (what a fingerprint cannot see): files, environment variables and
network resources a transform reads when it runs; the code of library functions
and classes (a library upgrade that changes results is invisible, bump
``version=``); global variables read by library code; module names and file
locations of user code (deliberately: moving code keeps caches). A user module
that is pip-installed on one machine and a plain checkout on another is library
code on the first and user code on the second, so their fingerprints differ.

Diagnostics: ``_fingerprint_tree`` returns the same digest plus a flat
``{attribute path: short description}`` map and ``_diff_trees`` turns two maps
into ``transform.transforms[0].size: 224 -> 256`` lines, so the core can say
*why* a namespace changed.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import dataclasses
import dis
import enum
import functools
import hashlib
import io
import logging
import mmap
import os
import random
import site
import socket
import struct
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Iterator
from typing import Any

import xxhash

__all__ = ["fingerprint"]

logger = logging.getLogger("cachedata")

# Bumped only when the token format changes (which invalidates every cache).
_FORMAT = b"cachedata.fingerprint/1\x00"

# Strings/bytes longer than this are reduced to (length, xxh3-128) inside tokens.
_INLINE_MAX = 1 << 16
# Deeper object graphs are refused instead of overflowing the C stack.
_MAX_NESTING = 400
# Tree (diagnostics) limits.
_TREE_CAP = 5000
_SMALL_SEQ = 8
_BIG_SEQ = 16
_DESC_MAX = 60

_FIX_HINT = "pass version= to CachedDataset or define __cachedata_fingerprint__"

_pack_d = struct.Struct("<d").pack
_pack_dd = struct.Struct("<dd").pack


# --------------------------------------------------------------------------- tokens


def _big(data: bytes | memoryview | Any) -> bytes:
    """(length, xxh3-128) of a bytes-like object: the fast hash for bulk content."""
    return len(data).to_bytes(8, "little") + xxhash.xxh3_128_digest(data)


def _tok_str(x: str) -> bytes:
    b = x.encode("utf-8", "surrogatepass")
    return b"s" + b if len(b) <= _INLINE_MAX else b"S" + _big(b)


def _tok_int(x: int) -> bytes:
    return b"i" + x.to_bytes(x.bit_length() // 8 + 1, "little", signed=True)


def _tok_float(x: float) -> bytes:
    return b"f" + _pack_d(x)  # bit pattern: -0.0 and NaN payloads stay distinct


def _tok_bytes(x: bytes) -> bytes:
    return b"b" + x if len(x) <= _INLINE_MAX else b"B" + _big(x)


def _tok_bytearray(x: bytearray) -> bytes:
    return b"a" + bytes(x) if len(x) <= _INLINE_MAX else b"A" + _big(x)


# Exact types only: subclasses (IntEnum, numpy.float64, str enums...) carry a class.
_SCALAR_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    str: _tok_str,
    int: _tok_int,
    float: _tok_float,
    bool: lambda x: b"T" if x else b"F",
    type(None): lambda x: b"N",
    bytes: _tok_bytes,
    complex: lambda x: b"c" + _pack_dd(x.real, x.imag),
    bytearray: _tok_bytearray,
}
_encoder = _SCALAR_ENCODERS.get


def _scalar_token(x: object) -> bytes | None:
    """Inline token of an exact builtin scalar, or None for anything else."""
    enc = _encoder(type(x))
    return enc(x) if enc is not None else None


def _scalar_tokens(seq: Iterable[object]) -> list[bytes] | None:
    """Tokens of a sequence made only of scalars, or None if anything else is in it."""
    out = []
    for x in seq:
        enc = _encoder(type(x))
        if enc is None:
            return None
        out.append(enc(x))
    return out


def _node(tag: bytes, parts: Iterable[bytes]) -> bytes:
    """SHA-256 over a tag and the length-prefixed tokens of the children."""
    h = hashlib.sha256(tag + b"\x00")
    update = h.update
    for p in parts:
        update(len(p).to_bytes(8, "little"))
        update(p)
    return h.digest()


_SEQ_TAGS = {tuple: b"tuple", list: b"list"}


def _s(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _type_name(t: type) -> str:
    """``module.qualname`` as error messages show it (builtins without module)."""
    mod = getattr(t, "__module__", None)
    qual = getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))
    return qual if mod in (None, "builtins") else f"{mod}.{qual}"


def _identity(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def _short(text: str, digest: bytes) -> str:
    """Readable description: the text if short, else a prefix plus digest."""
    if len(text) <= _DESC_MAX:
        return text
    return f"{text[:40]}… #{digest.hex()[:16]}"


# ------------------------------------------------------------------ user vs library


@functools.cache
def _library_roots() -> tuple[str, ...]:
    roots: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(os.path.realpath(p))
    try:
        roots.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:  # some virtualenv flavours lack it
        pass
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user_site, str):
        roots.add(os.path.realpath(user_site))
    for p in sys.path:
        if p and ("site-packages" in p or "dist-packages" in p):
            roots.add(os.path.realpath(p))
    return tuple(sorted(roots))


_LIBRARY_CACHE: dict[str, bool] = {}


def _is_library_module(name: str | None) -> bool:
    """True for stdlib/installed modules (fingerprinted by name), False for user code."""
    if not name or name == "__main__":
        return False
    cached = _LIBRARY_CACHE.get(name)
    if cached is not None:
        return cached
    top = name.partition(".")[0]
    if top == "cachedata" or top in sys.builtin_module_names or top in sys.stdlib_module_names:
        result = True
    else:
        mod = sys.modules.get(name) or sys.modules.get(top)
        if mod is None:
            return False  # not imported (yet): user code, and not cached
        file = getattr(mod, "__file__", None)
        path = os.path.realpath(file) if file else ""
        result = bool(path) and any(path.startswith(root + os.sep) for root in _library_roots())
    _LIBRARY_CACHE[name] = result
    return result


# ------------------------------------------------------------------ unsupported types


def _unsupported_types() -> tuple[type, ...]:
    types_: list[type] = [
        io.IOBase,
        socket.socket,
        type(threading.Lock()),
        type(threading.RLock()),
        threading.Thread,
        threading.Condition,
        threading.Event,
        threading.Semaphore,
        weakref.ref,
        types.FrameType,
        types.TracebackType,
        types.GeneratorType,
        types.CoroutineType,
        types.AsyncGeneratorType,
        Coroutine,
        AsyncGenerator,
        Iterator,
    ]
    return tuple(types_)


_UNSUPPORTED = _unsupported_types()

# Names in a user class body that are bookkeeping, not behaviour.
_CLASS_SKIP = frozenset(
    {
        "__dict__",
        "__weakref__",
        "__module__",
        "__qualname__",
        "__doc__",
        "__annotations__",
        "__annotate__",
        "__annotate_func__",
        "__annotations_cache__",
        "__dataclass_fields__",
        "__dataclass_params__",
        "__match_args__",
        "__orig_bases__",
        "__parameters__",
        "__abstractmethods__",
        "_abc_impl",
        "__firstlineno__",
        "__static_attributes__",
        "__slots__",
        "__classcell__",
    }
)
_DATACLASS_GENERATED = frozenset(
    {
        "__init__",
        "__repr__",
        "__eq__",
        "__hash__",
        "__lt__",
        "__le__",
        "__gt__",
        "__ge__",
        "__setattr__",
        "__delattr__",
        "__getstate__",
        "__setstate__",
        "__replace__",
    }
)

# nn.Module internals that are either hashed explicitly or do not affect outputs.
_MODULE_SKIP = frozenset(
    {
        "_parameters",
        "_buffers",
        "_non_persistent_buffers_set",
        "_modules",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_compiled_call_impl",
    }
)

# transformers bookkeeping: where a model/config was loaded from, which library
# version wrote it, which warnings were shown. None of it changes outputs.
_HF_PROVENANCE = frozenset(
    {"_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "warnings_issued"}
)

_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
_DESCRIPTOR_TYPES = (
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (and its nested code) reads as globals, sorted."""
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in _GLOBAL_OPS and isinstance(ins.argval, str):
                names.add(ins.argval)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return tuple(sorted(names))


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: set for classes created by Python code


def _is_library_class(cls: type) -> bool:
    module = getattr(cls, "__module__", None)
    if module == "builtins" and cls.__flags__ & _HEAPTYPE:
        return False  # defined by exec() in a namespace without __name__
    return _is_library_module(module)


def _has_slots(cls: type) -> bool:
    return any("__slots__" in vars(c) for c in cls.__mro__ if c is not object)


def _seg_for_key(key: object, index: int) -> str:
    if type(key) is str and key.isidentifier():
        return f"[{key!r}]"
    if type(key) in (str, int, float, bool, bytes) or key is None:
        r = repr(key)
        if len(r) <= 40:
            return f"[{r}]"
    return f"[<key {index}>]"


# --------------------------------------------------------------------------- walker


class _Walker:
    """One walk over an object graph; builds the digest and optionally the path tree."""

    def __init__(self, root: str, *, max_depth: int | None) -> None:
        self._root = root
        self._segs: list[str] = []
        self._active: dict[int, int] = {}  # id -> nesting depth, for cycle detection
        self._memo: dict[int, tuple[bytes, str]] = {}
        self._keep: list[object] = []  # keeps memoized objects alive so ids stay unique
        self._min_ref = sys.maxsize  # shallowest ancestor a back-reference pointed to
        self._max_depth = max_depth
        self._mute = 0
        self.tree: dict[str, str] | None = {} if max_depth is not None else None

    # -- paths and the tree

    def _path(self) -> str:
        return self._root + "".join(self._segs)

    def _recording(self, depth: int) -> bool:
        return (
            self.tree is not None
            and not self._mute
            and depth <= self._max_depth  # type: ignore[operator]
            and len(self.tree) < _TREE_CAP
        )

    def _fail(self, obj: object, reason: str = "") -> TypeError:
        extra = f" ({reason})" if reason else ""
        return TypeError(f"cannot fingerprint {_type_name(type(obj))} at {self._path()}{extra}; {_FIX_HINT}")

    # -- entry points

    def run(self, obj: object) -> bytes:
        tok = _scalar_token(obj)
        if tok is None:
            tok = self._composite(obj)
        elif self._recording(0):
            self.tree[self._root] = _short(repr(obj), hashlib.sha256(tok).digest())  # type: ignore[index]
        return hashlib.sha256(_FORMAT + tok).digest()

    def child(self, obj: object, seg: str) -> bytes:
        """Token of ``obj`` reached from the current node through ``seg``."""
        tok = _scalar_token(obj)
        if tok is not None:
            if self.tree is not None and self._recording(len(self._segs) + 1):
                self.tree[self._path() + seg] = _short(repr(obj), hashlib.sha256(tok).digest())
            return tok
        cls = type(obj)
        if cls is tuple or cls is list:
            # Fast path for sequences of scalars (no cycles possible, nothing to memoize);
            # the token equals what the general path produces.
            toks = _scalar_tokens(obj)
            if toks is not None:
                tag = b"tuple" if cls is tuple else b"list"
                digest = _node(tag, toks)
                if self.tree is not None and self._recording(len(self._segs) + 1):
                    self.tree[self._path() + seg] = self._seq_desc(obj, tag, digest)
                return b"D" + digest
        self._segs.append(seg)
        try:
            return self._composite(obj)
        finally:
            self._segs.pop()

    def _composite(self, obj: object) -> bytes:
        depth = len(self._segs)
        oid = id(obj)
        anc = self._active.get(oid)
        if anc is not None:
            # A cycle: refer to the ancestor by relative distance, which is stable.
            self._min_ref = min(self._min_ref, anc)
            if self._recording(depth):
                self.tree[self._path()] = f"<cycle to depth {anc}>"  # type: ignore[index]
            return b"R" + (depth - anc).to_bytes(4, "little")
        hit = self._memo.get(oid)
        if hit is not None:
            if self._recording(depth):
                self.tree[self._path()] = hit[1]  # type: ignore[index]
            return hit[0]
        if depth > _MAX_NESTING:
            raise self._fail(obj, f"nested deeper than {_MAX_NESTING} levels")
        before = len(self.tree) if self.tree is not None else 0
        self._active[oid] = depth
        saved, self._min_ref = self._min_ref, sys.maxsize
        try:
            digest, desc = self._dispatch(obj)
        finally:
            del self._active[oid]
            mine = self._min_ref
            self._min_ref = min(saved, mine)
        tok = b"D" + digest
        if desc is None:
            desc = f"{_type_name(type(obj))} #{digest.hex()[:16]}"
        if mine >= depth:
            # No back-reference escapes this subtree: its token is context free.
            self._memo[oid] = (tok, desc)
            self._keep.append(obj)
        if self.tree is not None and len(self.tree) == before and self._recording(depth):
            self.tree[self._path()] = desc
        return tok

    # -- dispatch

    def _dispatch(self, obj: Any) -> tuple[bytes, str | None]:
        cls = type(obj)
        # Exact builtin containers first: they cannot carry the hook, and they are hot.
        if cls is list or cls is tuple:
            return self._sequence(obj, b"list" if cls is list else b"tuple")
        if cls is dict:
            return self._dict(obj.items(), b"dict"), None
        if cls is set or cls is frozenset:
            return self._set(obj, b"set" if cls is set else b"frozenset")
        if not isinstance(obj, type):
            hook = getattr(cls, "__cachedata_fingerprint__", None)
            if hook is not None:
                value = obj.__cachedata_fingerprint__()
                if not isinstance(value, str):
                    raise TypeError(
                        f"{_type_name(cls)}.__cachedata_fingerprint__() at {self._path()} returned "
                        f"{_type_name(type(value))}, expected str"
                    )
                return _node(b"hook", [_s(_identity(cls)), _s(value)]), None
        if isinstance(obj, enum.Enum):
            return self._enum(obj)
        if isinstance(obj, type):
            return self._class(obj)
        if cls is collections.OrderedDict:
            return self._ordered(obj), None
        if cls is collections.defaultdict:
            factory = self.child(obj.default_factory, ".default_factory")
            return _node(b"defaultdict", [factory, b"D" + self._dict(obj.items(), b"dict")]), None
        if cls is memoryview:
            data = obj.tobytes()
            return _node(b"memoryview", [_s(obj.format), _s(repr(obj.shape)), _big(data)]), None

        torch = sys.modules.get("torch")
        if torch is not None:
            res = self._torch(obj, torch)
            if res is not None:
                return res
        np = sys.modules.get("numpy")
        if np is not None:
            res = self._numpy(obj, np)
            if res is not None:
                return res

        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, types.MethodType):
            parts = [self.child(obj.__func__, ".__func__"), self.child(obj.__self__, ".__self__")]
            return _node(b"method", parts), None
        if isinstance(obj, functools.partial):
            parts = [
                self.child(cls, ".__class__"),
                self.child(obj.func, ".func"),
                b"D" + self._sequence_digest(obj.args, b"tuple", ".args"),
                b"D" + self._dict(obj.keywords.items(), b"dict", ".keywords"),
                b"D" + self._dict(vars(obj).items(), b"dict", ""),
            ]
            return _node(b"partial", parts), None
        if isinstance(obj, types.BuiltinFunctionType):
            owner = obj.__self__
            name = _s(getattr(obj, "__qualname__", obj.__name__))
            if owner is None or isinstance(owner, (types.ModuleType, type)):
                return _node(b"builtin", [_s(str(getattr(obj, "__module__", None))), name]), None
            return _node(b"builtin-method", [name, self.child(owner, ".__self__")]), None
        if isinstance(obj, types.MethodWrapperType):
            return _node(b"method-wrapper", [_s(obj.__name__), self.child(obj.__self__, ".__self__")]), None
        if isinstance(obj, _DESCRIPTOR_TYPES):
            return _node(b"descriptor", [_s(_identity(obj.__objclass__)), _s(obj.__name__)]), None
        if isinstance(obj, (staticmethod, classmethod)):
            tag = b"staticmethod" if isinstance(obj, staticmethod) else b"classmethod"
            return _node(tag, [self.child(obj.__func__, ".__func__")]), None
        if isinstance(obj, property):
            parts = [
                self.child(f, f".{n}")
                for n, f in (("fget", obj.fget), ("fset", obj.fset), ("fdel", obj.fdel))
            ]
            return _node(b"property", parts), None
        if isinstance(obj, types.CodeType):
            return self._code(obj), None
        if isinstance(obj, types.ModuleType):
            version = getattr(obj, "__version__", None)
            version = str(version) if isinstance(version, str) else ""
            desc = f"module {obj.__name__} {version}".rstrip()
            return _node(b"module", [_s(obj.__name__), _s(version)]), desc
        if isinstance(obj, logging.Logger):
            # Loggers never change a transform's output; their handlers hold locks.
            return _node(b"logger", [_s(obj.name)]), f"logger {obj.name!r}"
        if isinstance(obj, random.Random):
            if isinstance(obj, random.SystemRandom):
                raise self._fail(obj, "draws from the operating system, not reproducible")
            return _node(
                b"random", [self.child(cls, ".__class__"), self.child(obj.getstate(), ".getstate()")]
            ), None

        top = (getattr(cls, "__module__", "") or "").partition(".")[0]
        if top == "tokenizers" and callable(getattr(obj, "to_str", None)):
            return _node(b"hf-tokenizer", [self.child(obj.to_str(), ".to_str()")]), None
        if top == "transformers":
            res = self._transformers(obj)
            if res is not None:
                return res
        if top == "h5py" and hasattr(obj, "file") and hasattr(obj, "name"):
            res = self._h5py(obj)
            if res is not None:
                return res
        if top == "PIL" and all(hasattr(obj, a) for a in ("tobytes", "mode", "size", "getpalette")):
            return self._pil(obj)
        if dataclasses.is_dataclass(obj):
            parts = [self.child(cls, ".__class__")]
            for f in dataclasses.fields(obj):
                if hasattr(obj, f.name):
                    parts += [_s(f.name), self.child(getattr(obj, f.name), f".{f.name}")]
            return _node(b"dataclass", parts), None
        if isinstance(obj, _UNSUPPORTED):
            raise self._fail(obj)
        if isinstance(obj, (list, tuple, dict, set, frozenset, str, bytes, bytearray, int, float, complex)):
            return self._builtin_subclass(obj)
        return self._reduce(obj)

    # -- builtin containers

    def _sequence_digest(self, seq: Any, tag: bytes, prefix: str = "") -> bytes:
        depth = len(self._segs)
        toks = _scalar_tokens(seq)
        if toks is not None:
            # Only scalars (the common case: sizes, means, file lists): one tree entry.
            digest = _node(tag, toks)
            if prefix and self._recording(depth + 1):
                self.tree[self._path() + prefix] = self._seq_desc(seq, tag, digest)  # type: ignore[index]
            return digest
        quiet = len(seq) > _BIG_SEQ
        self._mute += quiet
        try:
            recording = self._recording(depth + 1)
            toks = []
            for i, x in enumerate(seq):
                if not recording:
                    # Inlined fast paths of child() for the hot cases (sample lists).
                    t = type(x)
                    enc = _encoder(t)
                    if enc is not None:
                        toks.append(enc(x))
                        continue
                    if t is tuple or t is list:
                        sub = _scalar_tokens(x)
                        if sub is not None:
                            toks.append(b"D" + _node(_SEQ_TAGS[t], sub))
                            continue
                toks.append(self.child(x, f"{prefix}[{i}]"))
        finally:
            self._mute -= quiet
        return _node(tag, toks)

    def _seq_desc(self, seq: Any, tag: bytes, digest: bytes) -> str:
        if len(seq) <= _BIG_SEQ and _scalar_tokens(seq) is not None:
            return _short(repr(list(seq)) if tag == b"list" else repr(tuple(seq)), digest)
        return f"{tag.decode()}[len={len(seq)}] #{digest.hex()[:16]}"

    def _sequence(self, seq: Any, tag: bytes) -> tuple[bytes, str | None]:
        digest = self._sequence_digest(seq, tag)
        return digest, self._seq_desc(seq, tag, digest)

    def _dict(self, items: Iterable[tuple[Any, Any]], tag: bytes, prefix: str | None = None) -> bytes:
        """Order-independent digest of mapping items (sorted by key token).

        ``prefix`` None names values ``[key]``; ``""`` names str keys as attributes
        (``.key``, for object state); any other prefix is prepended (``.keywords['k']``).
        """
        items = list(items)
        quiet = len(items) > _BIG_SEQ
        self._mute += quiet
        try:
            recording = self._recording(len(self._segs) + 1)
            pairs = []
            for i, (k, v) in enumerate(items):
                ktok = _scalar_token(k)
                vtok = None if recording else _scalar_token(v)
                if ktok is None or vtok is None:
                    if prefix == "" and type(k) is str:
                        seg = f".{k}"
                    else:
                        seg = (prefix or "") + _seg_for_key(k, i)
                    if ktok is None:
                        ktok = self.child(k, f"{seg}<key>")
                    if vtok is None:
                        vtok = self.child(v, seg)
                pairs.append((ktok, vtok))
        finally:
            self._mute -= quiet
        pairs.sort(key=lambda p: p[0])
        return _node(tag, [t for pair in pairs for t in pair])

    def _ordered(self, obj: collections.OrderedDict[Any, Any]) -> bytes:
        toks: list[bytes] = []
        quiet = len(obj) > _BIG_SEQ
        self._mute += quiet
        try:
            for i, (k, v) in enumerate(obj.items()):
                seg = _seg_for_key(k, i)
                toks.append(_scalar_token(k) or self.child(k, f"{seg}<key>"))
                toks.append(self.child(v, seg))
        finally:
            self._mute -= quiet
        return _node(b"odict", toks)

    def _set(self, obj: Any, tag: bytes) -> tuple[bytes, str | None]:
        n = len(obj)
        scalars = n <= _SMALL_SEQ and all(_scalar_token(x) is not None for x in obj)
        quiet = scalars or n > _BIG_SEQ
        self._mute += quiet
        try:
            toks = sorted(self.child(x, f"{{{i}}}") for i, x in enumerate(obj))
        finally:
            self._mute -= quiet
        digest = _node(tag, toks)
        if scalars:
            ordered = sorted(obj, key=_scalar_token)  # type: ignore[arg-type]
            return digest, _short("{" + ", ".join(map(repr, ordered)) + "}" if ordered else "set()", digest)
        return digest, None

    def _builtin_subclass(self, obj: Any) -> tuple[bytes, str | None]:
        cls = type(obj)
        parts = [self.child(cls, ".__class__")]
        if isinstance(obj, tuple):
            fields = getattr(cls, "_fields", None)
            if isinstance(fields, tuple) and len(fields) == len(obj):  # namedtuple
                for name, value in zip(fields, tuple.__iter__(obj), strict=True):
                    parts += [_s(str(name)), self.child(value, f".{name}")]
            else:
                parts.append(b"D" + self._sequence_digest(tuple(tuple.__iter__(obj)), b"tuple", ""))
        elif isinstance(obj, list):
            parts.append(b"D" + self._sequence_digest(list(list.__iter__(obj)), b"list", ""))
        elif isinstance(obj, collections.OrderedDict):
            parts.append(b"D" + self._ordered(collections.OrderedDict(collections.OrderedDict.items(obj))))
        elif isinstance(obj, dict):
            parts.append(b"D" + self._dict(list(dict.items(obj)), b"dict"))
        elif isinstance(obj, (set, frozenset)):
            base = set if isinstance(obj, set) else frozenset
            parts.append(b"D" + self._set(base(base.__iter__(obj)), b"set")[0])
        elif isinstance(obj, str):
            parts.append(_scalar_token(str.__str__(obj)))  # type: ignore[arg-type]
        elif isinstance(obj, (bytes, bytearray)):
            parts.append(b"b" + bytes(memoryview(obj)))
        elif isinstance(obj, bool):
            parts.append(b"T" if obj else b"F")
        elif isinstance(obj, int):
            parts.append(_scalar_token(int.__index__(obj)))  # type: ignore[arg-type]
        elif isinstance(obj, float):
            parts.append(b"f" + _pack_d(float.__float__(obj)))
        elif isinstance(obj, complex):
            parts.append(b"c" + _pack_dd(obj.real, obj.imag))
        state = getattr(obj, "__dict__", None)
        if state:
            parts.append(b"D" + self._dict(sorted(state.items()), b"state", ""))
        return _node(b"subclass", parts), None  # type: ignore[arg-type]

    # -- enums, classes, functions

    def _enum(self, obj: enum.Enum) -> tuple[bytes, str | None]:
        self._mute += 1  # the description below says it all
        try:
            value = self.child(obj._value_, ".value")
        finally:
            self._mute -= 1
        desc = f"{type(obj).__qualname__}.{obj._name_}"
        return _node(b"enum", [_s(_identity(type(obj))), _s(str(obj._name_)), value]), desc

    def _class(self, cls: type) -> tuple[bytes, str | None]:
        if _is_library_class(cls):
            return _node(b"class", [_s(_identity(cls))]), f"class {_identity(cls).replace(':', '.')}"
        # User code: the class is what its body says (methods, class attributes, bases).
        parts = [_s(cls.__qualname__)]
        parts += [self.child(b, f".__bases__[{i}]") for i, b in enumerate(cls.__bases__)]
        is_dc = dataclasses.is_dataclass(cls)
        is_enum = issubclass(cls, enum.Enum)
        for name, value in sorted(vars(cls).items()):
            if name in _CLASS_SKIP or isinstance(value, _DESCRIPTOR_TYPES):
                continue
            if is_enum and name.startswith("_") and name.endswith("_") and not name.startswith("__"):
                continue  # enum machinery (_member_map_ ...); members are covered by name below
            if (
                is_dc
                and name in _DATACLASS_GENERATED
                and getattr(getattr(value, "__code__", None), "co_filename", "") == "<string>"
            ):
                continue  # generated from the fields, which instances hash anyway
            parts += [_s(name), self.child(value, f".{name}")]
        digest = _node(b"user-class", parts)
        return digest, f"class {cls.__qualname__} #{digest.hex()[:16]}"

    def _function(self, fn: types.FunctionType) -> tuple[bytes, str | None]:
        qual = fn.__qualname__
        library = _is_library_module(fn.__module__)
        parts = [_s(qual)]
        if library:
            parts.append(_s(str(fn.__module__)))
        if not library:
            code = fn.__code__
            self._mute += 1
            try:
                parts.append(self.child(code, ".__code__"))
            finally:
                self._mute -= 1
            if self._recording(len(self._segs) + 1):
                self.tree[self._path() + ".__code__"] = f"code {qual} #{parts[-1][1:9].hex()}"  # type: ignore[index]
        elif "<locals>" not in qual:
            return _node(b"function-ref", parts), f"function {fn.__module__}.{qual}"
        # Defaults, closure and attributes: also for library closures (factories).
        if fn.__defaults__:
            parts.append(b"D" + self._sequence_digest(fn.__defaults__, b"tuple", ".__defaults__"))
        if fn.__kwdefaults__:
            parts.append(b"D" + self._dict(fn.__kwdefaults__.items(), b"dict", ".__kwdefaults__"))
        if fn.__closure__:
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
                try:
                    contents = cell.cell_contents
                except ValueError:  # empty cell (variable not assigned yet)
                    parts += [_s(name), b"empty-cell"]
                    continue
                parts += [_s(name), self.child(contents, f".__closure__.{name}")]
        if fn.__dict__:
            parts.append(b"D" + self._dict(fn.__dict__.items(), b"dict", ".__dict__"))
        if not library:
            g = fn.__globals__
            for name in _global_names(fn.__code__):
                if name in g:
                    parts += [_s(name), self.child(g[name], f".__globals__.{name}")]
                elif hasattr(builtins, name):
                    parts += [_s(name), b"builtin"]
        digest = _node(b"function", parts)
        return digest, f"function {qual} #{digest.hex()[:16]}"

    def _code(self, code: types.CodeType) -> bytes:
        consts = [self.child(c, f".co_consts[{i}]") for i, c in enumerate(code.co_consts)]
        parts = [
            _s(code.co_name),
            _s(f"{code.co_argcount},{code.co_posonlyargcount},{code.co_kwonlyargcount},{code.co_flags}"),
            code.co_code,
            _s(",".join(code.co_names)),
            _s(",".join(code.co_varnames)),
            _s(",".join(code.co_freevars)),
            _s(",".join(code.co_cellvars)),
            getattr(code, "co_exceptiontable", b""),
            _node(b"consts", consts),
        ]
        return _node(b"code", parts)

    # -- generic objects

    def _reduce(self, obj: Any) -> tuple[bytes, str | None]:
        cls = type(obj)
        try:
            # Same lookup order as pickle: copyreg registrations (re.Pattern...) first.
            reducer = copyreg.dispatch_table.get(cls)
            rv = reducer(obj) if reducer is not None else obj.__reduce_ex__(4)
        except Exception as exc:  # pickle refuses: the object has hidden/unportable state
            raise self._fail(obj, str(exc)) from None
        if isinstance(rv, str):  # pickled by reference (a module-level singleton)
            parts = [_s(_identity(cls)), _s(rv)]
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None:  # e.g. functools.lru_cache: the wrapped function is the code
                parts.append(self.child(wrapped, ".__wrapped__"))
            return _node(b"global", parts), None if wrapped is not None else f"{_type_name(cls)} {rv}"
        if not isinstance(rv, tuple) or len(rv) < 2:
            raise self._fail(obj, "__reduce_ex__ returned an unexpected value")
        rv = rv + (None,) * (5 - len(rv))
        func, args, state, listitems, dictitems = rv[:5]
        parts: list[bytes] = []
        args = tuple(args or ())
        if func in (copyreg.__newobj__, copyreg.__newobj_ex__) and args and isinstance(args[0], type):
            parts.append(self.child(args[0], ".__class__"))
            newargs = args[1:]
        else:
            parts.append(self.child(cls, ".__class__"))
            parts.append(self.child(func, ".<reduce>"))
            newargs = args
        if newargs:
            parts.append(b"D" + self._sequence_digest(newargs, b"tuple", ".<args>"))
        no_state = state is None or (type(state) in (dict, tuple, list) and not state)
        empty = not newargs and no_state and listitems is None and dictitems is None
        if empty and (cls is object or not (hasattr(obj, "__dict__") or _has_slots(cls))):
            raise self._fail(obj, "it has no state besides its identity")
        if state is not None:
            parts.append(self._state(state))
        if listitems is not None:
            parts.append(b"D" + self._sequence_digest(list(listitems), b"list", ""))
        if dictitems is not None:
            parts.append(b"D" + self._dict(list(dictitems), b"dict"))
        return _node(b"object", parts), None

    def _state(self, state: Any) -> bytes:
        """Token of pickle state: attribute dicts are named ``.attr`` in paths."""
        if type(state) is dict:
            return b"D" + self._dict(state.items(), b"state", "")
        if (
            type(state) is tuple
            and len(state) == 2
            and (state[0] is None or type(state[0]) is dict)
            and (type(state[1]) is dict)
        ):
            merged = dict(state[0] or {})
            merged.update(state[1])
            return b"D" + self._dict(merged.items(), b"state", "")
        return self.child(state, ".<state>")

    # -- third-party types

    def _torch(self, obj: Any, torch: Any) -> tuple[bytes, str | None] | None:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, torch)
        jit = getattr(torch, "jit", None)
        if jit is not None and isinstance(obj, getattr(jit, "ScriptFunction", ())):
            return _node(b"script-function", [_s(obj.qualified_name), _s(obj.code)]), None
        if jit is not None and isinstance(obj, getattr(jit, "ScriptModule", ())):
            return self._script_module(obj)
        if isinstance(obj, torch.nn.Module):
            return self._module(obj)
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return _node(b"torch-enum", [_s(type(obj).__name__), _s(str(obj))]), str(obj)
        if isinstance(obj, torch.Generator):
            parts = [_s(str(obj.device)), self.child(obj.get_state(), ".get_state()")]
            return _node(b"torch-generator", parts), None
        return None

    def _tensor(self, t: Any, torch: Any) -> tuple[bytes, str | None]:
        t = t.detach()
        if t.is_meta:
            raise self._fail(t, "a meta tensor has no data")
        extra: list[bytes] = []
        if type(t) not in (torch.Tensor, torch.nn.Parameter):  # tv_tensors and other subclasses
            extra.append(self.child(type(t), ".__class__"))
            state = getattr(t, "__dict__", None)
            if state:
                extra.append(b"D" + self._dict(sorted(state.items()), b"state", ""))
        if t.is_nested:  # ragged: no single shape; hash the components
            parts = [self.child(list(t.unbind()), ".unbind()"), *extra]
            return _node(b"nested-tensor", parts), None
        shape = _s(",".join(map(str, t.shape)))
        dtype = _s(str(t.dtype))
        if t.layout == torch.sparse_coo:
            t = t.coalesce()
            parts = [
                shape,
                dtype,
                self.child(t.indices(), ".indices()"),
                self.child(t.values(), ".values()"),
                *extra,
            ]
            return _node(b"sparse-tensor", parts), None
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_quantized:
            qparts = [_s(str(t.qscheme()))]
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                qparts += [_pack_d(t.q_scale()), _s(str(t.q_zero_point()))]
            else:
                qparts += [
                    self.child(t.q_per_channel_scales(), ".q_per_channel_scales()"),
                    self.child(t.q_per_channel_zero_points(), ".q_per_channel_zero_points()"),
                    _s(str(t.q_per_channel_axis())),
                ]
            extra += qparts
            t = t.int_repr()
        flat = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy()
        digest = _node(b"tensor", [dtype, shape, _big(data), *extra])
        if t.numel() <= _SMALL_SEQ:
            desc = _short(f"tensor({flat.tolist()}, dtype={t.dtype})", digest)
        else:
            desc = f"tensor(shape={list(t.shape)}, dtype={t.dtype}) #{digest.hex()[:16]}"
        return digest, desc

    def _module(self, m: Any) -> tuple[bytes, str | None]:
        parts = [self.child(type(m), ".__class__")]
        skip = (
            _MODULE_SKIP | _HF_PROVENANCE if type(m).__module__.startswith("transformers.") else _MODULE_SKIP
        )
        state = {k: v for k, v in vars(m).items() if k not in skip}
        parts.append(b"D" + self._dict(sorted(state.items()), b"state", ""))
        for tag, table in ((b"params", m._parameters), (b"buffers", m._buffers), (b"modules", m._modules)):
            toks: list[bytes] = []
            for name, value in table.items():
                toks += [_s(name), self.child(value, f".{name}")]
            parts.append(_node(tag, toks))
        for tag, hooks in ((b"pre-hooks", m._forward_pre_hooks), (b"hooks", m._forward_hooks)):
            if hooks:
                parts.append(tag + self._sequence_digest(list(hooks.values()), b"list", f".<{tag.decode()}>"))
        return _node(b"module", parts), None

    def _script_module(self, m: Any) -> tuple[bytes, str | None]:
        parts = [_s(m.original_name)]
        try:
            parts.append(_s(m.code))
        except Exception:  # modules without forward have no code
            parts.append(b"")
        for name, value in sorted(m.named_buffers()) + sorted(m.named_parameters()):
            parts += [_s(name), self.child(value, f".{name}")]
        for name, sub in sorted(m.named_modules()):
            parts += [_s(name), b"T" if sub.training else b"F"]
        return _node(b"script-module", parts), None

    def _numpy(self, obj: Any, np: Any) -> tuple[bytes, str | None] | None:
        if isinstance(obj, np.ndarray):
            return self._array(obj, np, b"ndarray")
        if isinstance(obj, np.generic):
            return self._array(np.asarray(obj), np, b"npscalar")
        if isinstance(obj, np.dtype):
            return _node(b"npdtype", [_s(obj.str), _s(repr(obj.descr))]), str(obj)
        if isinstance(obj, np.ufunc):
            return _node(b"ufunc", [_s(obj.__name__)]), f"numpy.{obj.__name__}"
        return None

    def _array(self, a: Any, np: Any, tag: bytes) -> tuple[bytes, str | None]:
        shape = _s(",".join(map(str, a.shape)))
        extra: list[bytes] = []
        if isinstance(a, np.memmap):
            mapped = self._memmap(a, np, shape)
            if mapped is not None:
                return mapped
        elif type(a) is not np.ndarray and tag == b"ndarray":
            extra.append(self.child(type(a), ".__class__"))
        if a.dtype.hasobject:
            items = self._sequence_digest(list(a.ravel()), b"list", ".flat")
            return _node(tag + b"-object", [shape, items, *extra]), None
        if a.dtype.byteorder == ">" and a.dtype.fields is None:
            a = a.astype(a.dtype.newbyteorder("<"))  # canonical little-endian bytes
        dtype = _s(repr(a.dtype.descr) if a.dtype.fields is not None else a.dtype.str)
        data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        digest = _node(tag, [dtype, shape, _big(data), *extra])
        if a.size <= _SMALL_SEQ:
            desc = _short(f"array({a.tolist()!r}, dtype={a.dtype})", digest)
        else:
            desc = f"array(shape={list(a.shape)}, dtype={a.dtype}) #{digest.hex()[:16]}"
        return digest, desc

    def _memmap(self, a: Any, np: Any, shape: bytes) -> tuple[bytes, str | None] | None:
        """A read-only ``np.memmap`` by file identity and position, not content.

        Token files of many GB (``np.memmap("train.bin")``) would otherwise be read
        in full on every construction. The file's (path, size, mtime_ns) changes
        when it is rewritten, like ``cachedata.keys.file_stat``. Writable maps can
        change without touching the file's mtime, so they are hashed by content.
        """
        mm = getattr(a, "_mmap", None)
        if a.mode != "r" or mm is None or not a.filename:
            return None
        try:
            base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
            st = os.stat(a.filename)
        except (OSError, ValueError, TypeError) as exc:
            logger.debug("fingerprint: memmap %s hashed by content (%s)", a.filename, exc)
            return None  # closed map or vanished file: fall back to the content
        start = a.offset - a.offset % mmap.ALLOCATIONGRANULARITY  # where numpy's map begins
        position = start + a.ctypes.data - base
        ident = f"{os.path.realpath(a.filename)}\x00{st.st_size}\x00{st.st_mtime_ns}\x00{position}"
        layout = f"{a.dtype.str}\x00{a.strides}"
        digest = _node(b"memmap", [_s(ident), _s(layout), shape])
        return digest, f"memmap({a.filename!r}, shape={list(a.shape)}) #{digest.hex()[:16]}"

    def _h5py(self, obj: Any) -> tuple[bytes, str | None] | None:
        """h5py files, groups and datasets by file identity and object name, not content."""
        try:
            filename = obj.file.filename
            name = obj.name
            st = os.stat(filename)
        except Exception:  # closed file or not an h5py node: refuse below
            return None
        mode = getattr(obj.file, "mode", "r")
        if mode != "r":
            raise self._fail(obj, f"the HDF5 file is open for writing (mode {mode!r}); open it read-only")
        parts = [_s(f"{os.path.realpath(filename)}\x00{st.st_size}\x00{st.st_mtime_ns}"), _s(str(name))]
        shape = getattr(obj, "shape", None)
        if shape is not None:
            parts += [_s(repr(tuple(shape))), _s(str(obj.dtype))]
        digest = _node(b"h5py", parts)
        return digest, f"h5py {filename}:{name} #{digest.hex()[:16]}"

    def _transformers(self, obj: Any) -> tuple[bytes, str | None] | None:
        """Duck-typed Hugging Face ``transformers`` objects (never imported here)."""
        backend = getattr(obj, "backend_tokenizer", None)
        if backend is not None and callable(getattr(backend, "to_str", None)):
            settings: dict[str, Any] = {}
            for name in (
                "padding_side",
                "truncation_side",
                "model_max_length",
                "model_input_names",
                "clean_up_tokenization_spaces",
                "split_special_tokens",
                "add_bos_token",
                "add_eos_token",
                "special_tokens_map",
            ):
                value = getattr(obj, name, None)
                if value is not None:
                    settings[name] = value
            added = getattr(obj, "added_tokens_decoder", None)
            if isinstance(added, dict):
                settings["added_tokens"] = sorted((int(k), str(v)) for k, v in added.items())
            parts = [
                self.child(type(obj), ".__class__"),
                self.child(backend.to_str(), ".backend_tokenizer.to_str()"),
                b"D" + self._dict(settings.items(), b"state", ""),
            ]
            return _node(b"hf-fast-tokenizer", parts), None
        to_dict = getattr(obj, "to_dict", None)
        if callable(to_dict):
            config = to_dict()
            if isinstance(config, dict):  # drop where-it-came-from fields: not state
                config = {k: v for k, v in config.items() if k not in _HF_PROVENANCE}
            parts = [self.child(type(obj), ".__class__"), self.child(config, ".to_dict()")]
            # Processors keep their tokenizer / image processor out of to_dict().
            for name in getattr(obj, "attributes", None) or ():
                if isinstance(name, str) and hasattr(obj, name):
                    parts += [_s(name), self.child(getattr(obj, name), f".{name}")]
            return _node(b"hf-config", parts), None
        return None

    def _pil(self, img: Any) -> tuple[bytes, str | None]:
        palette = img.getpalette() if img.mode in ("P", "PA") else None
        parts = [_s(img.mode), _s(repr(img.size)), _big(img.tobytes()), self.child(palette, ".palette")]
        digest = _node(b"pil-image", parts)
        return digest, f"PIL.Image(mode={img.mode}, size={img.size}) #{digest.hex()[:16]}"


# ---------------------------------------------------------------------------- API


def fingerprint(obj: object, *, root: str = "obj") -> str:
    """Hex SHA-256 of ``obj``'s state, stable across processes, runs and hash seeds.

    ``root`` names ``obj`` in error messages (``cannot fingerprint _thread.lock at
    obj.cache._lock``). Raises ``TypeError`` for objects that cannot be
    fingerprinted deterministically; see the module docstring for what is covered.
    """
    return _Walker(root, max_depth=None).run(obj).hex()


def _fingerprint_tree(obj: object, *, root: str, max_depth: int = 4) -> tuple[str, dict[str, str]]:
    """The fingerprint plus a flat ``{attribute path: short description}`` map.

    Leaves (small scalars, short strings, small lists, tensors with their shape)
    are described readably; larger or deeper things by a 16-hex digest. Stored by
    the core in namespace metadata so that ``_diff_trees`` can explain *why* a
    cache was recomputed. The digest equals ``fingerprint(obj)``.
    """
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    walker = _Walker(root, max_depth=max_depth)
    digest = walker.run(obj).hex()
    return digest, dict(walker.tree or {})


def _diff_trees(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Lines ``path: old -> new`` for every entry that differs between two trees."""
    lines: list[str] = []
    for path, before in old.items():
        after = new.get(path)
        if after is None:
            lines.append(f"{path}: {before} -> (absent)")
        elif after != before:
            lines.append(f"{path}: {before} -> {after}")
    for path, after in new.items():
        if path not in old:
            lines.append(f"{path}: (absent) -> {after}")
    return lines
