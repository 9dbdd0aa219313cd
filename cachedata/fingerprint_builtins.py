"""Fingerprint handlers for the standard library: containers, code, classes, generic objects.

Registered with ``fingerprint_walker`` on import (``cachedata.fingerprint`` imports this
module). Each handler turns one kind of object into a node; the walker provides paths,
memo, cycles and the tree. What is hashed (and what is deliberately left out) is
described in ``cachedata.fingerprint``'s docstring.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import dataclasses
import dis
import enum
import functools
import io
import logging
import os
import random
import site
import socket
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import AsyncGenerator, Coroutine, Iterator
from typing import Any

from .checks import type_name
from .fingerprint_walker import (
    BUILTIN_VALUE_TYPES,
    Handler,
    Result,
    Walker,
    big,
    identity,
    node,
    pack_d,
    pack_dd,
    register_predicate,
    register_type,
    resolve,
    scalar_token,
    text,
)

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


def is_library_module(name: str | None) -> bool:
    """True for stdlib/installed modules (fingerprinted by name), False for user code."""
    if not isinstance(name, str) or not name or name == "__main__":  # Cython: a descriptor
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


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: set for classes created by Python code


def is_library_class(cls: type) -> bool:
    """True for classes of installed libraries and the stdlib (named, not hashed by code)."""
    module = getattr(cls, "__module__", None)
    if module == "builtins" and cls.__flags__ & _HEAPTYPE:
        return False  # defined by exec() in a namespace without __name__
    return is_library_module(module)


def _has_slots(cls: type) -> bool:
    return any("__slots__" in vars(c) for c in cls.__mro__ if c is not object)


def cached_property_names(cls: type) -> frozenset[str]:
    """Names of ``functools.cached_property`` attributes of ``cls``: their values in an
    instance's ``__dict__`` are caches left behind by use, never state."""
    return frozenset(
        name
        for c in cls.__mro__
        if c is not object
        for name, value in vars(c).items()
        if isinstance(value, functools.cached_property)
    )


# ----------------------------------------------------------------- what is skipped

# Names in a user class body that are bookkeeping, not behaviour. Several are written
# onto the class after it was created: by pickle/copy (``__slotnames__``), by isinstance
# checks (ABC and typing.Protocol caches), by the pure-Python ``_py_abc`` fallback.
CLASS_SKIP = frozenset(
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
        "_abc_registry",
        "_abc_cache",
        "_abc_negative_cache",
        "_abc_negative_cache_version",
        "__slotnames__",  # replaced by a computed value in _class
        "__protocol_attrs__",
        "__non_callable_proto_members__",
        "__callable_proto_members_only__",
        "_is_protocol",
        "_is_runtime_protocol",
        "__firstlineno__",
        "__static_attributes__",
        "__slots__",
        "__classcell__",
    }
)
_SLOTNAMES = "__slotnames__"
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
_DESCRIPTOR_TYPES = (
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})

_UNSUPPORTED: tuple[type, ...] = (
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


# ------------------------------------------------------------------------- handlers


def _hook(w: Walker, obj: Any) -> Result:
    """``__cachedata_fingerprint__``: that string (plus the class) and nothing else."""
    cls = type(obj)
    value = obj.__cachedata_fingerprint__()
    if not isinstance(value, str):
        raise TypeError(
            f"{type_name(cls)}.__cachedata_fingerprint__() at {w.path()} returned "
            f"{type_name(type(value))}, expected str"
        )
    # The digest is the hook's; the tree still shows the attributes, so that a diff can
    # name what changed (e.g. a Tokenize's tokenizer vocabulary).
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict) and state:
        w.describe_only(lambda sub: sub.state(dict(state)))
    return node(b"hook", [text(identity(cls)), text(value)]), None


def _sequence(w: Walker, obj: Any) -> Result | None:
    cls = type(obj)
    if cls is not list and cls is not tuple:
        return None  # a subclass: class identity + contents (builtin-subclass handler)
    return w.sequence(obj, b"list" if cls is list else b"tuple")


def _dict(w: Walker, obj: Any) -> Result | None:
    return (w.dict_digest(obj.items(), b"dict"), None) if type(obj) is dict else None


def _set(w: Walker, obj: Any) -> Result | None:
    cls = type(obj)
    if cls is not set and cls is not frozenset:
        return None
    return w.set_digest(obj, b"set" if cls is set else b"frozenset")


def _ordered(w: Walker, obj: Any) -> Result | None:
    if type(obj) is not collections.OrderedDict:
        return None
    return w.ordered_digest(obj.items()), None


def _defaultdict(w: Walker, obj: Any) -> Result | None:
    if type(obj) is not collections.defaultdict:
        return None
    factory = w.child(obj.default_factory, ".default_factory")
    return node(b"defaultdict", [factory, b"D" + w.dict_digest(obj.items(), b"dict")]), None


def _memoryview(w: Walker, obj: memoryview) -> Result:
    return node(b"memoryview", [text(obj.format), text(repr(obj.shape)), big(obj.tobytes())]), None


def _builtin_subclass(w: Walker, obj: Any) -> Result:
    """An instance of a subclass of a builtin value type: class identity + contents."""
    cls = type(obj)
    parts = [w.child(cls, ".__class__")]
    if isinstance(obj, tuple):
        fields = getattr(cls, "_fields", None)
        if isinstance(fields, tuple) and len(fields) == len(obj):  # namedtuple
            for name, value in zip(fields, tuple.__iter__(obj), strict=True):
                parts += [text(str(name)), w.child(value, f".{name}")]
        else:
            parts.append(b"D" + w.sequence_digest(tuple(tuple.__iter__(obj)), b"tuple", ""))
    elif isinstance(obj, list):
        parts.append(b"D" + w.sequence_digest(list(list.__iter__(obj)), b"list", ""))
    elif isinstance(obj, collections.OrderedDict):
        parts.append(b"D" + w.ordered_digest(collections.OrderedDict.items(obj)))
    elif isinstance(obj, dict):
        parts.append(b"D" + w.dict_digest(list(dict.items(obj)), b"dict"))
    elif isinstance(obj, (set, frozenset)):
        base = set if isinstance(obj, set) else frozenset
        parts.append(b"D" + w.set_digest(base(base.__iter__(obj)), b"set")[0])
    elif isinstance(obj, str):
        parts.append(scalar_token(str.__str__(obj)))  # type: ignore[arg-type]
    elif isinstance(obj, (bytes, bytearray)):
        parts.append(b"b" + bytes(memoryview(obj)))
    elif isinstance(obj, bool):
        parts.append(b"T" if obj else b"F")
    elif isinstance(obj, int):
        parts.append(scalar_token(int.__index__(obj)))  # type: ignore[arg-type]
    elif isinstance(obj, float):
        parts.append(b"f" + pack_d(float.__float__(obj)))
    elif isinstance(obj, complex):
        parts.append(b"c" + pack_dd(obj.real, obj.imag))
    state = getattr(obj, "__dict__", None)
    if state:
        parts.append(b"D" + w.dict_digest(sorted(state.items()), b"state", ""))
    return node(b"subclass", parts), None  # type: ignore[arg-type]


def _enum(w: Walker, obj: enum.Enum) -> Result:
    with w.muted():  # the description below says it all
        value = w.child(obj._value_, ".value")
    desc = f"{type(obj).__qualname__}.{obj._name_}"
    return node(b"enum", [text(identity(type(obj))), text(str(obj._name_)), value]), desc


def _class(w: Walker, cls: type) -> Result:
    if is_library_class(cls):
        return node(b"class", [text(identity(cls))]), f"class {identity(cls).replace(':', '.')}"
    # User code: the class is what its body says (methods, class attributes, bases).
    parts = [text(cls.__qualname__)]
    parts += [w.child(b, f".__bases__[{i}]") for i, b in enumerate(cls.__bases__)]
    is_dc = dataclasses.is_dataclass(cls)
    is_enum = issubclass(cls, enum.Enum)
    body = {k: v for k, v in vars(cls).items() if k not in CLASS_SKIP}
    if resolve(cls)[0] is _reduce:
        # Compatibility: fingerprints of plain classes have always held the pickle slot
        # names (the generic handler's __reduce_ex__ wrote them onto the class first).
        # Computed here rather than read, so they no longer depend on pickling order.
        body[_SLOTNAMES] = copyreg._slotnames(cls)  # type: ignore[attr-defined]
    for name, value in sorted(body.items()):
        if isinstance(value, _DESCRIPTOR_TYPES):
            continue
        if is_enum and name.startswith("_") and name.endswith("_") and not name.startswith("__"):
            continue  # enum machinery (_member_map_ ...); members are covered by name below
        if (
            is_dc
            and name in _DATACLASS_GENERATED
            and getattr(getattr(value, "__code__", None), "co_filename", "") == "<string>"
        ):
            continue  # generated from the fields, which instances hash anyway
        parts += [text(name), w.child(value, f".{name}")]
    digest = node(b"user-class", parts)
    return digest, f"class {cls.__qualname__} #{digest.hex()[:16]}"


def _function(w: Walker, fn: types.FunctionType) -> Result:
    qual = fn.__qualname__
    library = is_library_module(fn.__module__)
    parts = [text(qual)]
    if library:
        parts.append(text(str(fn.__module__)))
    if not library:
        with w.muted():
            parts.append(w.child(fn.__code__, ".__code__"))
        w.record(".__code__", f"code {qual} #{parts[-1][1:9].hex()}")
    elif "<locals>" not in qual:
        return node(b"function-ref", parts), f"function {fn.__module__}.{qual}"
    # Defaults, closure and attributes: also for library closures (factories).
    if fn.__defaults__:
        parts.append(b"D" + w.sequence_digest(fn.__defaults__, b"tuple", ".__defaults__"))
    if fn.__kwdefaults__:
        parts.append(b"D" + w.dict_digest(fn.__kwdefaults__.items(), b"dict", ".__kwdefaults__"))
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
            try:
                contents = cell.cell_contents
            except ValueError:  # empty cell (variable not assigned yet)
                parts += [text(name), b"empty-cell"]
                continue
            parts += [text(name), w.child(contents, f".__closure__.{name}")]
    if fn.__dict__:
        parts.append(b"D" + w.dict_digest(fn.__dict__.items(), b"dict", ".__dict__"))
    if not library:
        g = fn.__globals__
        for name in _global_names(fn.__code__):
            if name in g:
                parts += [text(name), w.child(g[name], f".__globals__.{name}")]
            elif hasattr(builtins, name):
                parts += [text(name), b"builtin"]
    digest = node(b"function", parts)
    return digest, f"function {qual} #{digest.hex()[:16]}"


def _code(w: Walker, code: types.CodeType) -> Result:
    consts = [w.child(c, f".co_consts[{i}]") for i, c in enumerate(code.co_consts)]
    parts = [
        text(code.co_name),
        text(f"{code.co_argcount},{code.co_posonlyargcount},{code.co_kwonlyargcount},{code.co_flags}"),
        code.co_code,
        text(",".join(code.co_names)),
        text(",".join(code.co_varnames)),
        text(",".join(code.co_freevars)),
        text(",".join(code.co_cellvars)),
        getattr(code, "co_exceptiontable", b""),
        node(b"consts", consts),
    ]
    return node(b"code", parts), None


def _method(w: Walker, obj: types.MethodType) -> Result:
    parts = [w.child(obj.__func__, ".__func__"), w.child(obj.__self__, ".__self__")]
    return node(b"method", parts), None


def _partial(w: Walker, obj: functools.partial) -> Result:
    parts = [
        w.child(type(obj), ".__class__"),
        w.child(obj.func, ".func"),
        b"D" + w.sequence_digest(obj.args, b"tuple", ".args"),
        b"D" + w.dict_digest(obj.keywords.items(), b"dict", ".keywords"),
        b"D" + w.dict_digest(vars(obj).items(), b"dict", ""),
    ]
    return node(b"partial", parts), None


def _builtin_function(w: Walker, obj: Any) -> Result:
    owner = obj.__self__
    name = text(getattr(obj, "__qualname__", obj.__name__))
    if owner is None or isinstance(owner, (types.ModuleType, type)):
        return node(b"builtin", [text(str(getattr(obj, "__module__", None))), name]), None
    return node(b"builtin-method", [name, w.child(owner, ".__self__")]), None


def _method_wrapper(w: Walker, obj: Any) -> Result:
    return node(b"method-wrapper", [text(obj.__name__), w.child(obj.__self__, ".__self__")]), None


def _descriptor(w: Walker, obj: Any) -> Result:
    return node(b"descriptor", [text(identity(obj.__objclass__)), text(obj.__name__)]), None


def _static_or_class_method(w: Walker, obj: Any) -> Result:
    tag = b"staticmethod" if isinstance(obj, staticmethod) else b"classmethod"
    return node(tag, [w.child(obj.__func__, ".__func__")]), None


def _property(w: Walker, obj: property) -> Result:
    parts = [w.child(f, f".{n}") for n, f in (("fget", obj.fget), ("fset", obj.fset), ("fdel", obj.fdel))]
    return node(b"property", parts), None


def _cached_property(w: Walker, obj: functools.cached_property) -> Result:
    """The function and the attribute name; not the lock that Python 3.11 keeps in it."""
    parts = [w.child(obj.func, ".func"), text(str(obj.attrname))]
    return node(b"cached-property", parts), None


def _module(w: Walker, obj: types.ModuleType) -> Result:
    version = getattr(obj, "__version__", None)
    version = str(version) if isinstance(version, str) else ""
    desc = f"module {obj.__name__} {version}".rstrip()
    return node(b"module", [text(obj.__name__), text(version)]), desc


def _logger(w: Walker, obj: logging.Logger) -> Result:
    # Loggers never change a transform's output; their handlers hold locks.
    return node(b"logger", [text(obj.name)]), f"logger {obj.name!r}"


def _random(w: Walker, obj: random.Random) -> Result:
    if isinstance(obj, random.SystemRandom):
        raise w.fail(obj, "draws from the operating system, not reproducible")
    parts = [w.child(type(obj), ".__class__"), w.child(obj.getstate(), ".getstate()")]
    return node(b"random", parts), None


def _dataclass(w: Walker, obj: Any) -> Result:
    parts = [w.child(type(obj), ".__class__")]
    for f in dataclasses.fields(obj):
        if hasattr(obj, f.name):
            parts += [text(f.name), w.child(getattr(obj, f.name), f".{f.name}")]
    return node(b"dataclass", parts), None


def _unsupported(w: Walker, obj: Any) -> Result:
    raise w.fail(obj)


def _reduce(w: Walker, obj: Any) -> Result:
    """Any other object: the state pickle would save (``__reduce_ex__``, copyreg first)."""
    cls = type(obj)
    try:
        # Same lookup order as pickle: copyreg registrations (re.Pattern...) first.
        reducer = copyreg.dispatch_table.get(cls)
        rv = reducer(obj) if reducer is not None else obj.__reduce_ex__(4)
    except Exception as exc:  # pickle refuses: the object has hidden/unportable state
        raise w.fail(obj, str(exc)) from None
    if isinstance(rv, str):  # pickled by reference (a module-level singleton)
        parts = [text(identity(cls)), text(rv)]
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None:  # e.g. functools.lru_cache: the wrapped function is the code
            parts.append(w.child(wrapped, ".__wrapped__"))
        return node(b"global", parts), None if wrapped is not None else f"{type_name(cls)} {rv}"
    if not isinstance(rv, tuple) or len(rv) < 2:
        raise w.fail(obj, "__reduce_ex__ returned an unexpected value")
    rv = rv + (None,) * (5 - len(rv))
    func, args, state, listitems, dictitems = rv[:5]
    parts: list[bytes] = []
    args = tuple(args or ())
    if func in (copyreg.__newobj__, copyreg.__newobj_ex__) and args and isinstance(args[0], type):
        parts.append(w.child(args[0], ".__class__"))
        newargs = args[1:]
    else:
        parts.append(w.child(cls, ".__class__"))
        parts.append(w.child(func, ".<reduce>"))
        newargs = args
    if newargs:
        parts.append(b"D" + w.sequence_digest(newargs, b"tuple", ".<args>"))
    no_state = state is None or (type(state) in (dict, tuple, list) and not state)
    empty = not newargs and no_state and listitems is None and dictitems is None
    if empty and (cls is object or not (hasattr(obj, "__dict__") or _has_slots(cls))):
        raise w.fail(obj, "it has no state besides its identity")
    if state is not None:
        parts.append(w.state(_without_caches(cls, state)))
    if listitems is not None:
        parts.append(b"D" + w.sequence_digest(list(listitems), b"list", ""))
    if dictitems is not None:
        parts.append(b"D" + w.dict_digest(list(dictitems), b"dict"))
    return node(b"object", parts), None


def _without_caches(cls: type, state: Any) -> Any:
    """Pickle state minus the values ``functools.cached_property`` left in ``__dict__``."""
    names = cached_property_names(cls)
    if not names:
        return state
    if type(state) is dict:
        return {k: v for k, v in state.items() if k not in names}
    if type(state) is tuple and len(state) == 2 and type(state[0]) is dict:
        return ({k: v for k, v in state[0].items() if k not in names}, state[1])
    return state


# --------------------------------------------------------------------- registration


def _has_hook(cls: type) -> bool:
    return not issubclass(cls, type) and hasattr(cls, "__cachedata_fingerprint__")


#: Handlers by type, for the type and its subclasses (the nearest class in the MRO wins).
_HANDLERS: tuple[tuple[type, Handler], ...] = (
    (list, _sequence),
    (tuple, _sequence),
    (dict, _dict),
    (set, _set),
    (frozenset, _set),
    (collections.OrderedDict, _ordered),
    (collections.defaultdict, _defaultdict),
    (memoryview, _memoryview),
    (enum.Enum, _enum),
    (type, _class),
    (types.FunctionType, _function),
    (types.CodeType, _code),
    (types.MethodType, _method),
    (functools.partial, _partial),
    (types.BuiltinFunctionType, _builtin_function),
    (types.MethodWrapperType, _method_wrapper),
    *((t, _descriptor) for t in _DESCRIPTOR_TYPES),
    (staticmethod, _static_or_class_method),
    (classmethod, _static_or_class_method),
    (property, _property),
    (functools.cached_property, _cached_property),
    (types.ModuleType, _module),
    (logging.Logger, _logger),
    (random.Random, _random),
    (object, _reduce),
)

register_predicate(_has_hook, _hook, order=-1)
for _t, _handler in _HANDLERS:
    register_type(_t, _handler)
register_predicate(dataclasses.is_dataclass, _dataclass, order=10)
register_predicate(lambda cls: issubclass(cls, _UNSUPPORTED), _unsupported, order=20)
register_predicate(lambda cls: issubclass(cls, BUILTIN_VALUE_TYPES), _builtin_subclass, order=30)
