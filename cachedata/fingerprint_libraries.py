"""Fingerprint handlers for third-party objects: torch, numpy, PIL, h5py, Hugging Face.

Nothing here imports those libraries: each handler set is installed by
``fingerprint_walker.register_lazy`` the first time a walk starts after the library was
imported by someone else (an object of a library that was never imported cannot exist).
Hugging Face ``transformers`` objects are recognised by duck typing (their package name
and ``backend_tokenizer``/``to_dict``), so that package is never needed either.

Large-state objects (tokenizers, models) also describe themselves in words in the
diagnostic tree (vocabulary size, parameter count) so that a diff can say what changed.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from typing import Any

from .fingerprint_builtins import cached_property_names
from .fingerprint_walker import (
    SMALL_SEQ,
    Result,
    Walker,
    big,
    node,
    pack_d,
    register_lazy,
    register_predicate,
    register_type,
    short,
    text,
)

logger = logging.getLogger("cachedata")

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


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" if n != 1 else f"1 {what.rstrip('s')}"


# ---------------------------------------------------------------------------- torch


def _install_torch(torch: Any) -> None:
    def tensor(w: Walker, t: Any) -> Result:
        return _tensor(w, t, torch)

    register_type(torch.Tensor, tensor, replace=False)
    register_type(torch.nn.Module, _module, replace=False)
    jit = getattr(torch, "jit", None)
    if jit is not None:
        script_function = getattr(jit, "ScriptFunction", None)
        if isinstance(script_function, type):
            register_type(script_function, _script_function, replace=False)
        script_module = getattr(jit, "ScriptModule", None)
        if isinstance(script_module, type):
            register_type(script_module, _script_module, replace=False)
    for cls in (torch.dtype, torch.device, torch.layout, torch.memory_format):
        register_type(cls, _torch_enum, replace=False)
    register_type(torch.Generator, _generator, replace=False)


def _script_function(w: Walker, obj: Any) -> Result:
    return node(b"script-function", [text(obj.qualified_name), text(obj.code)]), None


def _torch_enum(w: Walker, obj: Any) -> Result:
    return node(b"torch-enum", [text(type(obj).__name__), text(str(obj))]), str(obj)


def _generator(w: Walker, obj: Any) -> Result:
    parts = [text(str(obj.device)), w.child(obj.get_state(), ".get_state()")]
    return node(b"torch-generator", parts), None


def _tensor(w: Walker, t: Any, torch: Any) -> Result:
    t = t.detach()
    if t.is_meta:
        raise w.fail(t, "a meta tensor has no data")
    extra: list[bytes] = []
    if type(t) not in (torch.Tensor, torch.nn.Parameter):  # tv_tensors and other subclasses
        extra.append(w.child(type(t), ".__class__"))
        state = getattr(t, "__dict__", None)
        if state:
            extra.append(b"D" + w.dict_digest(sorted(state.items()), b"state", ""))
    if t.is_nested:  # ragged: no single shape; hash the components
        parts = [w.child(list(t.unbind()), ".unbind()"), *extra]
        return node(b"nested-tensor", parts), None
    shape = text(",".join(map(str, t.shape)))
    dtype = text(str(t.dtype))
    if t.layout == torch.sparse_coo:
        t = t.coalesce()
        parts = [
            shape,
            dtype,
            w.child(t.indices(), ".indices()"),
            w.child(t.values(), ".values()"),
            *extra,
        ]
        return node(b"sparse-tensor", parts), None
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        qparts = [text(str(t.qscheme()))]
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            qparts += [pack_d(t.q_scale()), text(str(t.q_zero_point()))]
        else:
            qparts += [
                w.child(t.q_per_channel_scales(), ".q_per_channel_scales()"),
                w.child(t.q_per_channel_zero_points(), ".q_per_channel_zero_points()"),
                text(str(t.q_per_channel_axis())),
            ]
        extra += qparts
        t = t.int_repr()
    flat = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy()
    digest = node(b"tensor", [dtype, shape, big(data), *extra])
    if t.numel() <= SMALL_SEQ:
        desc = short(f"tensor({flat.tolist()}, dtype={t.dtype})", digest)
    else:
        desc = f"tensor(shape={list(t.shape)}, dtype={t.dtype}) #{digest.hex()[:16]}"
    return digest, desc


def _module(w: Walker, m: Any) -> Result:
    """nn.Module: class, attributes, parameters, buffers, submodules, forward hooks."""
    cls = type(m)
    parts = [w.child(cls, ".__class__")]
    skip = _MODULE_SKIP | _HF_PROVENANCE if cls.__module__.startswith("transformers.") else _MODULE_SKIP
    skip = skip | cached_property_names(cls)
    state = {k: v for k, v in vars(m).items() if k not in skip}
    parts.append(b"D" + w.dict_digest(sorted(state.items()), b"state", ""))
    for tag, table in ((b"params", m._parameters), (b"buffers", m._buffers), (b"modules", m._modules)):
        toks: list[bytes] = []
        for name, value in table.items():
            toks += [text(name), w.child(value, f".{name}")]
        parts.append(node(tag, toks))
    for tag, hooks in ((b"pre-hooks", m._forward_pre_hooks), (b"hooks", m._forward_hooks)):
        if hooks:
            parts.append(tag + w.sequence_digest(list(hooks.values()), b"list", f".<{tag.decode()}>"))
    digest = node(b"module", parts)
    return digest, f"{_module_summary(m)} #{digest.hex()[:16]}"


def _module_summary(m: Any) -> str:
    """``Linear: 55 parameters in 2 tensors``: what a model diff shows instead of two hashes."""
    try:
        tensors = list(m.parameters())
        n = sum(int(p.numel()) for p in tensors)
    except Exception:  # a module whose parameters() is broken still gets a name
        return type(m).__name__
    if not tensors:
        return type(m).__name__
    return f"{type(m).__name__}: {_count(n, 'parameters')} in {_count(len(tensors), 'tensors')}"


def _script_module(w: Walker, m: Any) -> Result:
    parts = [text(m.original_name)]
    try:
        parts.append(text(m.code))
    except Exception:  # modules without forward have no code
        parts.append(b"")
    for name, value in sorted(m.named_buffers()) + sorted(m.named_parameters()):
        parts += [text(name), w.child(value, f".{name}")]
    for name, sub in sorted(m.named_modules()):
        parts += [text(name), b"T" if sub.training else b"F"]
    digest = node(b"script-module", parts)
    return digest, f"{_module_summary(m)} #{digest.hex()[:16]}"


# ---------------------------------------------------------------------------- numpy


def _install_numpy(np: Any) -> None:
    def array(w: Walker, a: Any) -> Result:
        return _array(w, a, np, b"ndarray")

    def scalar(w: Walker, a: Any) -> Result:
        return _array(w, np.asarray(a), np, b"npscalar")

    register_type(np.ndarray, array, replace=False)
    register_type(np.generic, scalar, replace=False)
    register_type(np.dtype, _np_dtype, replace=False)
    register_type(np.ufunc, _ufunc, replace=False)


def _np_dtype(w: Walker, obj: Any) -> Result:
    return node(b"npdtype", [text(obj.str), text(repr(obj.descr))]), str(obj)


def _ufunc(w: Walker, obj: Any) -> Result:
    return node(b"ufunc", [text(obj.__name__)]), f"numpy.{obj.__name__}"


def _array(w: Walker, a: Any, np: Any, tag: bytes) -> Result:
    shape = text(",".join(map(str, a.shape)))
    extra: list[bytes] = []
    if isinstance(a, np.memmap):
        mapped = _memmap(a, np, shape)
        if mapped is not None:
            return mapped
    elif type(a) is not np.ndarray and tag == b"ndarray":
        extra.append(w.child(type(a), ".__class__"))
    if a.dtype.hasobject:
        items = w.sequence_digest(list(a.ravel()), b"list", ".flat")
        return node(tag + b"-object", [shape, items, *extra]), None
    if a.dtype.byteorder == ">" and a.dtype.fields is None:
        a = a.astype(a.dtype.newbyteorder("<"))  # canonical little-endian bytes
    dtype = text(repr(a.dtype.descr) if a.dtype.fields is not None else a.dtype.str)
    data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    digest = node(tag, [dtype, shape, big(data), *extra])
    if a.size <= SMALL_SEQ:
        desc = short(f"array({a.tolist()!r}, dtype={a.dtype})", digest)
    else:
        desc = f"array(shape={list(a.shape)}, dtype={a.dtype}) #{digest.hex()[:16]}"
    return digest, desc


def _memmap(a: Any, np: Any, shape: bytes) -> Result | None:
    """A read-only ``np.memmap`` by file identity and position, not content.

    Token files of many GB (``np.memmap("train.bin")``) would otherwise be read in full
    on every construction. The file's (path, size, mtime_ns) changes when it is
    rewritten, like ``cachedata.keys.file_stat``. Writable maps can change without
    touching the file's mtime, so they are hashed by content.
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
    digest = node(b"memmap", [text(ident), text(layout), shape])
    return digest, f"memmap({a.filename!r}, shape={list(a.shape)}) #{digest.hex()[:16]}"


# ------------------------------------------------------------------------------ PIL


def _install_pil(image_module: Any) -> None:
    register_type(image_module.Image, _pil, replace=False)


def _pil(w: Walker, img: Any) -> Result:
    palette = img.getpalette() if img.mode in ("P", "PA") else None
    parts = [text(img.mode), text(repr(img.size)), big(img.tobytes()), w.child(palette, ".palette")]
    digest = node(b"pil-image", parts)
    return digest, f"PIL.Image(mode={img.mode}, size={img.size}) #{digest.hex()[:16]}"


# ----------------------------------------------------------------------------- h5py


def _install_h5py(h5py: Any) -> None:
    for name in ("Group", "Dataset", "Datatype"):
        cls = getattr(h5py, name, None)
        if isinstance(cls, type):
            register_type(cls, _h5py, replace=False)


def _h5py(w: Walker, obj: Any) -> Result | None:
    """h5py files, groups and datasets by file identity and object name, not content."""
    try:
        filename = obj.file.filename
        name = obj.name
        st = os.stat(filename)
    except Exception:  # closed file: the generic handler refuses it
        return None
    mode = getattr(obj.file, "mode", "r")
    if mode != "r":
        raise w.fail(obj, f"the HDF5 file is open for writing (mode {mode!r}); open it read-only")
    parts = [text(f"{os.path.realpath(filename)}\x00{st.st_size}\x00{st.st_mtime_ns}"), text(str(name))]
    shape = getattr(obj, "shape", None)
    if shape is not None:
        parts += [text(repr(tuple(shape))), text(str(obj.dtype))]
    digest = node(b"h5py", parts)
    return digest, f"h5py {filename}:{name} #{digest.hex()[:16]}"


# ------------------------------------------------------------------- Hugging Face


def _install_tokenizers(tokenizers: Any) -> None:
    cls = getattr(tokenizers, "Tokenizer", None)
    if isinstance(cls, type):
        register_type(cls, _tokenizer, replace=False)


def _tokenizer(w: Walker, tok: Any) -> Result:
    """A ``tokenizers.Tokenizer`` by its full serialization (``to_str()``)."""
    serialized = tok.to_str()
    with w.muted():
        digest = node(b"hf-tokenizer", [w.child(serialized, ".to_str()")])
    _describe_tokenizer(w, serialized)
    return digest, f"tokenizer #{digest.hex()[:16]}"


def _describe_tokenizer(w: Walker, serialized: str) -> None:
    """Tree entries in words: model type, vocabulary and merges sizes, each component."""
    if w.tree is None or not w.recording(w.depth + 1):
        return
    try:
        spec = json.loads(serialized)
    except ValueError:
        return
    if not isinstance(spec, dict):
        return
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    vocab = model.get("vocab")
    if isinstance(vocab, (dict, list)):
        w.record(".vocabulary", f"{_count(len(vocab), 'tokens')} #{_json_hash(vocab)}")
    merges = model.get("merges")
    if isinstance(merges, list):
        w.record(".merges", f"{_count(len(merges), 'merges')} #{_json_hash(merges)}")
    rest = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    w.record(".model", _json_desc(rest))
    added = spec.get("added_tokens")
    if isinstance(added, list):
        w.record(".added_tokens", f"{_count(len(added), 'tokens')} #{_json_hash(added)}")
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "padding", "truncation"):
        if key in spec:
            w.record(f".{key}", _json_desc(spec[key]))


def _json_hash(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return node(b"json", [data]).hex()[:16]


def _json_desc(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return short(data, node(b"json", [data.encode("utf-8", "surrogatepass")]))


_HF_TOKENIZER_SETTINGS = (
    "padding_side",
    "truncation_side",
    "model_max_length",
    "model_input_names",
    "clean_up_tokenization_spaces",
    "split_special_tokens",
    "add_bos_token",
    "add_eos_token",
    "special_tokens_map",
)


def _is_transformers_class(cls: type) -> bool:
    module = getattr(cls, "__module__", None)  # a descriptor on some compiled classes (Cython)
    return isinstance(module, str) and module.startswith("transformers.")


def _transformers(w: Walker, obj: Any) -> Result | None:
    """Duck-typed ``transformers`` fast tokenizers, image processors and feature extractors."""
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        settings: dict[str, Any] = {}
        for name in _HF_TOKENIZER_SETTINGS:
            value = getattr(obj, name, None)
            if value is not None:
                settings[name] = value
        added = getattr(obj, "added_tokens_decoder", None)
        if isinstance(added, dict):
            settings["added_tokens"] = sorted((int(k), str(v)) for k, v in added.items())
        serialized = backend.to_str()
        parts = [w.child(type(obj), ".__class__")]
        with w.muted():
            parts.append(w.child(serialized, ".backend_tokenizer.to_str()"))
        parts.append(b"D" + w.dict_digest(settings.items(), b"state", ""))
        _describe_tokenizer(w, serialized)
        return node(b"hf-fast-tokenizer", parts), None
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        config = to_dict()
        if isinstance(config, dict):  # drop where-it-came-from fields: not state
            config = {k: v for k, v in config.items() if k not in _HF_PROVENANCE}
        parts = [w.child(type(obj), ".__class__"), w.child(config, ".to_dict()")]
        # Processors keep their tokenizer / image processor out of to_dict().
        for name in getattr(obj, "attributes", None) or ():
            if isinstance(name, str) and hasattr(obj, name):
                parts += [text(name), w.child(getattr(obj, name), f".{name}")]
        return node(b"hf-config", parts), None
    return None


register_lazy("torch", _install_torch)
register_lazy("numpy", _install_numpy)
register_lazy("PIL.Image", _install_pil)
register_lazy("h5py", _install_h5py)
register_lazy("tokenizers", _install_tokenizers)
register_predicate(_is_transformers_class, _transformers, order=5)
