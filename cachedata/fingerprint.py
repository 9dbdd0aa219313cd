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
change fingerprints unless the state of the objects changes. A module that user
code reads as a global (e.g. ``np`` in ``np.clip(...)``) contributes its own
``__version__`` attribute, so that user code is re-run when a library it calls
directly is upgraded.

What is not covered, and raises ``TypeError`` naming the type and the attribute
path (e.g. ``transform.tokenizer._lock``): open files, sockets, locks, threads,
generators, iterators and other objects with hidden state, and objects whose
only state is their identity (``object()``). The fix is ``version=`` on
``CachedDataset``, a ``__cachedata_fingerprint__`` method, or ``register_fingerprint``.

Known limits (what a fingerprint cannot see): files, environment variables and
network resources a transform reads when it runs; the code of library functions
and classes (a library upgrade that changes results is invisible, bump
``version=``); global variables read by library code; module names and file
locations of user code (deliberately: moving code keeps caches). A user module
that is pip-installed on one machine and a plain checkout on another is library
code on the first and user code on the second, so their fingerprints differ.

Stability: a fingerprint depends only on state that determines outputs, never on
what pickling, copying, ``isinstance`` checks or use leave behind: class-level caches
(``__slotnames__``, ABC and ``typing.Protocol`` caches, ``__weakref__``), descriptors,
``functools.cached_property`` values and ``lru_cache`` contents are not part of it.

Types you do not own: ``register_fingerprint(cls, fn)`` makes ``fn(obj)`` stand for
instances of ``cls`` (and its subclasses), like ``copyreg.pickle`` does for pickling.

Layout: ``fingerprint_walker`` holds the walker (paths, memo, cycles, the tree) and the
handler registry; ``fingerprint_builtins`` and ``fingerprint_libraries`` register the
shipped handlers the same way ``register_fingerprint`` registers yours.

Diagnostics: ``fingerprint_tree`` returns the same digest plus a flat
``{attribute path: short description}`` map and ``diff_trees`` turns two maps
into ``transform.transforms[0].size: 224 -> 256`` lines (``transform.tokenizer.vocabulary:
changed (30,522 -> 30,519 tokens)`` for large objects), so the core can say *why* a
namespace changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import fingerprint_builtins as _builtins  # noqa: F401  (registers the builtin handlers)
from . import fingerprint_libraries as _libraries  # noqa: F401  (registers library handlers)
from .checks import type_name
from .fingerprint_walker import (
    BUILTIN_VALUE_TYPES,
    Result,
    Walker,
    node,
    register_type,
)

__all__ = [
    "FingerprintTree",
    "describe_change",
    "diff_trees",
    "fingerprint",
    "fingerprint_tree",
    "register_fingerprint",
]


def fingerprint(obj: object, *, root: str = "obj") -> str:
    """Hex SHA-256 of ``obj``'s state, stable across processes, runs and hash seeds.

    ``root`` names ``obj`` in error messages (``cannot fingerprint _thread.lock at
    obj.cache._lock``). Raises ``TypeError`` for objects that cannot be
    fingerprinted deterministically; see the module docstring for what is covered.
    """
    return Walker(root, max_depth=None).run(obj).hex()


@dataclass(frozen=True)
class FingerprintTree:
    """A fingerprint and the readable map behind it.

    ``entries`` maps attribute paths (``transform.transforms[0].size``) to short
    descriptions (``224``, ``tensor(shape=[64, 3], dtype=torch.float32) #…``,
    ``30,522 tokens #…``). ``digest`` equals ``fingerprint(obj)``.
    """

    digest: str
    entries: dict[str, str] = field(default_factory=dict)


def fingerprint_tree(obj: object, *, root: str = "obj", max_depth: int = 4) -> FingerprintTree:
    """The fingerprint of ``obj`` plus a flat ``{attribute path: description}`` map.

    Leaves (small scalars, short strings, small lists, tensors with their shape) are
    described readably, large library objects in words (a tokenizer's vocabulary size,
    a model's parameter count), anything deeper than ``max_depth`` by a 16-hex digest.
    ``CachedDataset`` stores it in each namespace's ``meta.json`` so that ``diff_trees``
    can say *why* a cache was recomputed.
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"fingerprint_tree: max_depth must be an int >= 0, got {max_depth!r}")
    walker = Walker(root, max_depth=max_depth)
    digest = walker.run(obj).hex()
    return FingerprintTree(digest, dict(walker.tree or {}))


_HASHED = re.compile(r"^(.*) #([0-9a-f]{16})$", re.DOTALL)


def _label(description: str) -> tuple[str, bool]:
    """(description without its trailing digest, whether it had one)."""
    m = _HASHED.match(description)
    return (m.group(1), True) if m else (description, False)


def describe_change(before: str, after: str) -> str:
    """``224 -> 256``, or in words when the descriptions carry digests:
    ``changed (30,522 -> 30,519 tokens)``, ``changed (tensor(shape=[3], dtype=...))``."""
    old, old_hashed = _label(before)
    new, new_hashed = _label(after)
    if not (old_hashed or new_hashed):
        return f"{before} -> {after}"
    if old == new:
        return f"changed ({old})"
    old_head, _, old_unit = old.rpartition(" ")
    new_head, _, new_unit = new.rpartition(" ")
    if old_head and new_head and old_unit == new_unit and old_unit.isalpha():
        return f"changed ({old_head} -> {new_head} {old_unit})"
    return f"changed ({old} -> {new})"


def diff_trees(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Lines ``path: what changed`` for every entry that differs between two trees.

    Plain values read ``transform.transforms[0].size: 224 -> 256``; hashed ones are
    said in words (``transform.tokenizer.vocabulary: changed (30,522 -> 30,519 tokens)``);
    entries present on one side only read ``(absent)`` on the other.
    """
    lines: list[str] = []
    for path, before in old.items():
        after = new.get(path)
        if after is None:
            lines.append(f"{path}: {_label(before)[0]} -> (absent)")
        elif after != before:
            lines.append(f"{path}: {describe_change(before, after)}")
    for path, after in new.items():
        if path not in old:
            lines.append(f"{path}: (absent) -> {_label(after)[0]}")
    return lines


_NOT_REGISTRABLE = (*BUILTIN_VALUE_TYPES, bool, type(None), object, type)


def register_fingerprint(cls: type, fn: Callable[[Any], object]) -> None:
    """Fingerprint instances of ``cls`` (and its subclasses) by ``fn(obj)``.

    ``fn`` returns any fingerprintable value that stands for ``obj``: its parameters, a
    config dict, a file's path and mtime. Like ``copyreg.pickle`` for pickling, this is
    for types you do not own; your own classes can define
    ``__cachedata_fingerprint__(self) -> str`` instead (which takes precedence). The
    class of ``obj`` is part of the fingerprint too. A later registration for the same
    class replaces the earlier one.
    """
    if not isinstance(cls, type):
        raise TypeError(
            f"register_fingerprint: cls must be a class, got {type(cls).__name__} {cls!r}; "
            "pass the type whose instances fn stands for"
        )
    if cls in _NOT_REGISTRABLE:
        raise ValueError(
            f"register_fingerprint: {type_name(cls)} is fingerprinted by cachedata itself and cannot be "
            "replaced; register a subclass of it instead"
        )
    if not callable(fn):
        raise TypeError(
            f"register_fingerprint: fn must be callable (obj -> stand-in value), got {type(fn).__name__} "
            f"{fn!r} for {type_name(cls)}"
        )

    def handler(w: Walker, obj: Any) -> Result:
        value = fn(obj)
        if value is obj:
            raise TypeError(
                f"register_fingerprint: the function registered for {type_name(cls)} returned the object "
                f"itself at {w.path()}; return a value that stands for it (its parameters, a config dict)"
            )
        with w.muted():
            cls_tok = w.child(type(obj), ".__class__")
        # Named like the object itself: the stand-in's tree entries describe it.
        return node(b"registered", [cls_tok, w.child(value, "")]), None

    register_type(cls, handler)
