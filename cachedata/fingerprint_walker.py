"""The core of ``cachedata.fingerprint``: tokens, the object-graph walker and the handler registry.

The walker knows paths (``transform.transforms[0].size``), the memo of objects already
hashed, cycles, and the diagnostic tree; it knows nothing about any particular type. What
an object of a given type contributes is decided by a *handler* found in the registry:

- ``register_type(cls, handler)``: for ``cls`` and its subclasses (the most specific class
  in the MRO wins);
- ``register_lazy(module, install)``: ``install(module)`` registers types of a library the
  first time a walk starts after that library was imported (nothing is imported here);
- ``register_predicate(test, handler, order=...)``: for classes that ``test(cls)`` accepts
  (dataclasses, virtual ABC subclasses such as iterators, duck-typed libraries).

A handler is ``handler(walker, obj) -> (digest, description) | None``; None passes the
object on to the next candidate (ending with the generic handler registered for
``object``). ``fingerprint_builtins`` and ``fingerprint_libraries`` register the shipped
handlers; ``cachedata.register_fingerprint`` registers user stand-ins the same way.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import xxhash

from .checks import type_name

# Bumped only when the token format changes (which invalidates every cache).
FORMAT = b"cachedata.fingerprint/1\x00"

# Strings/bytes longer than this are reduced to (length, xxh3-128) inside tokens.
INLINE_MAX = 1 << 16
# Deeper object graphs are refused instead of overflowing the C stack.
MAX_NESTING = 400
# Tree (diagnostics) limits.
TREE_CAP = 5000
SMALL_SEQ = 8
BIG_SEQ = 16
DESC_MAX = 60

FIX_HINT = (
    "pass version= to CachedDataset, define __cachedata_fingerprint__, "
    "or cachedata.register_fingerprint(type, fn)"
)

pack_d = struct.Struct("<d").pack
pack_dd = struct.Struct("<dd").pack

#: What a handler returns: the node digest and an optional readable description.
Result = tuple[bytes, "str | None"]
Handler = Callable[["Walker", Any], "Result | None"]


# --------------------------------------------------------------------------- tokens


def big(data: Any) -> bytes:
    """(length, xxh3-128) of a bytes-like object: the fast hash for bulk content."""
    return len(data).to_bytes(8, "little") + xxhash.xxh3_128_digest(data)


def _tok_str(x: str) -> bytes:
    b = x.encode("utf-8", "surrogatepass")
    return b"s" + b if len(b) <= INLINE_MAX else b"S" + big(b)


def _tok_int(x: int) -> bytes:
    return b"i" + x.to_bytes(x.bit_length() // 8 + 1, "little", signed=True)


def _tok_float(x: float) -> bytes:
    return b"f" + pack_d(x)  # bit pattern: -0.0 and NaN payloads stay distinct


def _tok_bytes(x: bytes) -> bytes:
    return b"b" + x if len(x) <= INLINE_MAX else b"B" + big(x)


def _tok_bytearray(x: bytearray) -> bytes:
    return b"a" + bytes(x) if len(x) <= INLINE_MAX else b"A" + big(x)


# Exact types only: subclasses (IntEnum, numpy.float64, str enums...) carry a class.
_SCALAR_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    str: _tok_str,
    int: _tok_int,
    float: _tok_float,
    bool: lambda x: b"T" if x else b"F",
    type(None): lambda x: b"N",
    bytes: _tok_bytes,
    complex: lambda x: b"c" + pack_dd(x.real, x.imag),
    bytearray: _tok_bytearray,
}
_encoder = _SCALAR_ENCODERS.get


def scalar_token(x: object) -> bytes | None:
    """Inline token of an exact builtin scalar, or None for anything else."""
    enc = _encoder(type(x))
    return enc(x) if enc is not None else None


def scalar_tokens(seq: Iterable[object]) -> list[bytes] | None:
    """Tokens of a sequence made only of scalars, or None if anything else is in it."""
    out = []
    for x in seq:
        enc = _encoder(type(x))
        if enc is None:
            return None
        out.append(enc(x))
    return out


def node(tag: bytes, parts: Iterable[bytes]) -> bytes:
    """SHA-256 over a tag and the length-prefixed tokens of the children."""
    h = hashlib.sha256(tag + b"\x00")
    update = h.update
    for p in parts:
        update(len(p).to_bytes(8, "little"))
        update(p)
    return h.digest()


SEQ_TAGS = {tuple: b"tuple", list: b"list"}


def text(value: str) -> bytes:
    """UTF-8 bytes of ``value`` (lone surrogates kept) for use inside a node."""
    return value.encode("utf-8", "surrogatepass")


def identity(obj: Any) -> str:
    """``module:qualname`` of a class or function: how library code is named in a node."""
    return f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def short(description: str, digest: bytes) -> str:
    """Readable description: the text if short, else a prefix plus digest."""
    if len(description) <= DESC_MAX:
        return description
    return f"{description[:40]}… #{digest.hex()[:16]}"


def seg_for_key(key: object, index: int) -> str:
    """Path segment of a mapping key: ``['name']``, ``[3]``, or ``[<key 5>]`` for others."""
    if type(key) is str and key.isidentifier():
        return f"[{key!r}]"
    if type(key) in (str, int, float, bool, bytes) or key is None:
        r = repr(key)
        if len(r) <= 40:
            return f"[{r}]"
    return f"[<key {index}>]"


# ------------------------------------------------------------------------- registry


_BY_TYPE: dict[type, Handler] = {}
_PREDICATES: list[tuple[float, int, Callable[[type], bool], Handler]] = []
_LAZY: dict[str, list[Callable[[Any], None]]] = {}
_RESOLVED: weakref.WeakKeyDictionary[type, tuple[Handler, ...]] = weakref.WeakKeyDictionary()
#: Builtin value types: for their subclasses, the class-level handlers (Enum, OrderedDict...)
#: come first and the "builtin subclass" predicate afterwards.
BUILTIN_VALUE_TYPES = (list, tuple, dict, set, frozenset, str, bytes, bytearray, int, float, complex)


def register_type(cls: type, handler: Handler, *, replace: bool = True) -> None:
    """Use ``handler`` for ``cls`` and its subclasses.

    A later registration replaces an earlier one unless ``replace`` is False (how shipped
    library handlers are installed, so that a user's ``register_fingerprint`` made before
    the library was first walked stays in force).
    """
    if replace or cls not in _BY_TYPE:
        _BY_TYPE[cls] = handler
        _RESOLVED.clear()


def register_predicate(test: Callable[[type], bool], handler: Handler, *, order: float) -> None:
    """Use ``handler`` for classes that ``test`` accepts and that no type handler claimed.

    Predicates are tried by ascending ``order`` (then registration order); those with a
    negative order come before every type handler (``__cachedata_fingerprint__``).
    """
    _PREDICATES.append((order, len(_PREDICATES), test, handler))
    _PREDICATES.sort(key=lambda p: (p[0], p[1]))
    _RESOLVED.clear()


def register_lazy(module: str, install: Callable[[Any], None]) -> None:
    """Call ``install(sys.modules[module])`` once that module has been imported by someone."""
    _LAZY.setdefault(module, []).append(install)


def _install_lazy() -> None:
    for name in [n for n in _LAZY if n in sys.modules]:
        for install in _LAZY.pop(name):
            install(sys.modules[name])


def resolve(cls: type) -> tuple[Handler, ...]:
    """The handlers to try for instances of ``cls``, most specific first (cached per class)."""
    got = _RESOLVED.get(cls)
    if got is not None:
        return got
    chain: list[Handler] = [h for order, _, test, h in _PREDICATES if order < 0 and test(cls)]
    for c in cls.__mro__:
        if c is object or (c in BUILTIN_VALUE_TYPES and c is not cls):
            continue
        h = _BY_TYPE.get(c)
        if h is not None and h not in chain:
            chain.append(h)
    for order, _, test, h in _PREDICATES:
        if order >= 0 and h not in chain and test(cls):
            chain.append(h)
    chain.append(_BY_TYPE[object])
    got = tuple(chain)
    _RESOLVED[cls] = got
    return got


# --------------------------------------------------------------------------- walker


class Walker:
    """One walk over an object graph; builds the digest and optionally the path tree."""

    def __init__(self, root: str, *, max_depth: int | None) -> None:
        self.root = root
        self._segs: list[str] = []
        self._active: dict[int, int] = {}  # id -> nesting depth, for cycle detection
        self._memo: dict[int, tuple[bytes, str]] = {}
        self._keep: list[object] = []  # keeps memoized objects alive so ids stay unique
        self._min_ref = sys.maxsize  # shallowest ancestor a back-reference pointed to
        self.max_depth = max_depth
        self._mute = 0
        self.tree: dict[str, str] | None = {} if max_depth is not None else None

    # -- paths and the tree

    @property
    def depth(self) -> int:
        """Nesting depth of the node being hashed (0 for the root)."""
        return len(self._segs)

    def path(self) -> str:
        """Attribute path of the node being hashed, e.g. ``transform.transforms[0]``."""
        return self.root + "".join(self._segs)

    def recording(self, depth: int) -> bool:
        """True when a tree entry at ``depth`` would be kept."""
        return (
            self.tree is not None
            and not self._mute
            and depth <= self.max_depth  # type: ignore[operator]
            and len(self.tree) < TREE_CAP
        )

    def record(self, seg: str, description: str) -> None:
        """Add the tree entry ``path + seg`` (a child of the current node) if recording."""
        if self.recording(len(self._segs) + 1):
            self.tree[self.path() + seg] = description  # type: ignore[index]

    @contextmanager
    def muted(self, on: bool = True) -> Iterator[None]:
        """Hash without adding tree entries (the caller describes the node itself)."""
        self._mute += on
        try:
            yield
        finally:
            self._mute -= on

    def fail(self, obj: object, reason: str = "") -> TypeError:
        """The error for an object that cannot be fingerprinted here (raise it)."""
        extra = f" ({reason})" if reason else ""
        return TypeError(f"cannot fingerprint {type_name(type(obj))} at {self.path()}{extra}; {FIX_HINT}")

    # -- entry points

    def run(self, obj: object) -> bytes:
        """The digest of ``obj`` (the root)."""
        _install_lazy()
        tok = scalar_token(obj)
        if tok is None:
            tok = self._composite(obj)
        elif self.recording(0):
            self.tree[self.root] = short(repr(obj), hashlib.sha256(tok).digest())  # type: ignore[index]
        return hashlib.sha256(FORMAT + tok).digest()

    def child(self, obj: object, seg: str) -> bytes:
        """Token of ``obj`` reached from the current node through ``seg``."""
        tok = scalar_token(obj)
        if tok is not None:
            if self.tree is not None and self.recording(len(self._segs) + 1):
                self.tree[self.path() + seg] = short(repr(obj), hashlib.sha256(tok).digest())
            return tok
        cls = type(obj)
        if cls is tuple or cls is list:
            # Fast path for sequences of scalars (no cycles possible, nothing to memoize);
            # the token equals what the general path produces.
            toks = scalar_tokens(obj)
            if toks is not None:
                tag = b"tuple" if cls is tuple else b"list"
                digest = node(tag, toks)
                if self.tree is not None and self.recording(len(self._segs) + 1):
                    self.tree[self.path() + seg] = self.seq_desc(obj, tag, digest)
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
            if self.recording(depth):
                self.tree[self.path()] = f"<cycle to depth {anc}>"  # type: ignore[index]
            return b"R" + (depth - anc).to_bytes(4, "little")
        hit = self._memo.get(oid)
        if hit is not None:
            if self.recording(depth):
                self.tree[self.path()] = hit[1]  # type: ignore[index]
            return hit[0]
        if depth > MAX_NESTING:
            raise self.fail(obj, f"nested deeper than {MAX_NESTING} levels")
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
            desc = f"{type_name(type(obj))} #{digest.hex()[:16]}"
        if mine >= depth:
            # No back-reference escapes this subtree: its token is context free.
            self._memo[oid] = (tok, desc)
            self._keep.append(obj)
        if self.tree is not None and len(self.tree) == before and self.recording(depth):
            self.tree[self.path()] = desc
        return tok

    def _dispatch(self, obj: Any) -> Result:
        for handler in resolve(type(obj)):
            res = handler(self, obj)
            if res is not None:
                return res
        raise self.fail(obj)  # the generic handler never declines; kept for safety

    # -- builtin containers (the walker's own structure, used by every handler)

    def sequence_digest(self, seq: Any, tag: bytes, prefix: str = "") -> bytes:
        """Digest of an ordered sequence; items are named ``prefix[i]`` in the tree."""
        depth = len(self._segs)
        toks = scalar_tokens(seq)
        if toks is not None:
            # Only scalars (the common case: sizes, means, file lists): one tree entry.
            digest = node(tag, toks)
            if prefix and self.recording(depth + 1):
                self.tree[self.path() + prefix] = self.seq_desc(seq, tag, digest)  # type: ignore[index]
            return digest
        quiet = len(seq) > BIG_SEQ
        self._mute += quiet
        try:
            recording = self.recording(depth + 1)
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
                        sub = scalar_tokens(x)
                        if sub is not None:
                            toks.append(b"D" + node(SEQ_TAGS[t], sub))
                            continue
                toks.append(self.child(x, f"{prefix}[{i}]"))
        finally:
            self._mute -= quiet
        return node(tag, toks)

    def seq_desc(self, seq: Any, tag: bytes, digest: bytes) -> str:
        """Description of a sequence: its items when few and scalar, else length and digest."""
        if len(seq) <= BIG_SEQ and scalar_tokens(seq) is not None:
            return short(repr(list(seq)) if tag == b"list" else repr(tuple(seq)), digest)
        return f"{tag.decode()}[len={len(seq)}] #{digest.hex()[:16]}"

    def sequence(self, seq: Any, tag: bytes) -> Result:
        """Digest and description of a list or tuple."""
        digest = self.sequence_digest(seq, tag)
        return digest, self.seq_desc(seq, tag, digest)

    def dict_digest(self, items: Iterable[tuple[Any, Any]], tag: bytes, prefix: str | None = None) -> bytes:
        """Order-independent digest of mapping items (sorted by key token).

        ``prefix`` None names values ``[key]``; ``""`` names str keys as attributes
        (``.key``, for object state); any other prefix is prepended (``.keywords['k']``).
        """
        items = list(items)
        quiet = len(items) > BIG_SEQ
        self._mute += quiet
        try:
            recording = self.recording(len(self._segs) + 1)
            pairs = []
            for i, (k, v) in enumerate(items):
                ktok = scalar_token(k)
                vtok = None if recording else scalar_token(v)
                if ktok is None or vtok is None:
                    if prefix == "" and type(k) is str:
                        seg = f".{k}"
                    else:
                        seg = (prefix or "") + seg_for_key(k, i)
                    if ktok is None:
                        ktok = self.child(k, f"{seg}<key>")
                    if vtok is None:
                        vtok = self.child(v, seg)
                pairs.append((ktok, vtok))
        finally:
            self._mute -= quiet
        pairs.sort(key=lambda p: p[0])
        return node(tag, [t for pair in pairs for t in pair])

    def ordered_digest(self, items: Iterable[tuple[Any, Any]]) -> bytes:
        """Order-sensitive digest of mapping items (an OrderedDict)."""
        items = list(items)
        toks: list[bytes] = []
        quiet = len(items) > BIG_SEQ
        self._mute += quiet
        try:
            for i, (k, v) in enumerate(items):
                seg = seg_for_key(k, i)
                toks.append(scalar_token(k) or self.child(k, f"{seg}<key>"))
                toks.append(self.child(v, seg))
        finally:
            self._mute -= quiet
        return node(b"odict", toks)

    def set_digest(self, obj: Any, tag: bytes) -> Result:
        """Order-independent digest of a set (sorted by item token)."""
        n = len(obj)
        scalars = n <= SMALL_SEQ and all(scalar_token(x) is not None for x in obj)
        quiet = scalars or n > BIG_SEQ
        self._mute += quiet
        try:
            toks = sorted(self.child(x, f"{{{i}}}") for i, x in enumerate(obj))
        finally:
            self._mute -= quiet
        digest = node(tag, toks)
        if scalars:
            ordered = sorted(obj, key=scalar_token)  # type: ignore[arg-type]
            return digest, short("{" + ", ".join(map(repr, ordered)) + "}" if ordered else "set()", digest)
        return digest, None

    def state(self, state: Any) -> bytes:
        """Token of pickle-style state: attribute dicts are named ``.attr`` in paths."""
        if type(state) is dict:
            return b"D" + self.dict_digest(state.items(), b"state", "")
        if (
            type(state) is tuple
            and len(state) == 2
            and (state[0] is None or type(state[0]) is dict)
            and (type(state[1]) is dict)
        ):
            merged = dict(state[0] or {})
            merged.update(state[1])
            return b"D" + self.dict_digest(merged.items(), b"state", "")
        return self.child(state, ".<state>")

    def describe_only(self, build: Callable[[Walker], None]) -> None:
        """Add tree entries computed by ``build(sub_walker)`` without touching the digest.

        For objects whose digest comes from elsewhere (``__cachedata_fingerprint__``): the
        tree still shows their attributes so that a diff can say what changed. Anything
        that cannot be described is left out silently.
        """
        if self.tree is None or not self.recording(len(self._segs)):
            return
        sub = Walker(self.path(), max_depth=max(0, self.max_depth - len(self._segs)))  # type: ignore[operator]
        try:
            build(sub)
        except (TypeError, ValueError, AttributeError, RuntimeError, OSError):
            return
        for path, desc in (sub.tree or {}).items():
            if len(self.tree) >= TREE_CAP:
                break
            self.tree[path] = desc
