"""cachedata.fingerprint: deterministic, content-based, and loud about what it cannot see."""

from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import functools
import importlib.util
import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedata.fingerprint import diff_trees, fingerprint, fingerprint_tree

REPO = Path(__file__).resolve().parents[1]


def fp(obj: object) -> str:
    return fingerprint(obj)


def _import_file(path: Path, name: str) -> Any:
    """Import a module from a file under a fresh name (no caching between calls)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _exec(source: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(source), namespace)
    return namespace


# ------------------------------------------------------------------------- scalars


def test_result_is_hex_sha256() -> None:
    out = fp({"a": 1})
    assert isinstance(out, str) and len(out) == 64
    int(out, 16)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (None, False),
        (False, 0),
        (True, 1),
        (1, 1.0),
        (0.0, -0.0),
        (1.0, 1 + 0j),
        ("a", b"a"),
        (b"a", bytearray(b"a")),
        ((1, 2), [1, 2]),
        ({1, 2}, frozenset({1, 2})),
        ([], {}),
        ("", None),
        (2**70, 2**70 + 1),
        (-1, 1),
        ("1", 1),
        ({"a": 1}, {"a": 1.0}),
    ],
)
def test_distinct_values_are_distinct(a: object, b: object) -> None:
    assert fp(a) != fp(b)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**200),
        1.5,
        float("nan"),
        float("inf"),
        -0.0,
        3 - 4j,
        "héllo \ud800",
        b"\x00\xff",
        bytearray(b"xy"),
        "x" * 200_000,
        b"y" * 200_000,
        (1, (2, [3, {4: 5}])),
        {"a": [1, 2], "b": {"c": None}},
        {1, "two", (3,)},
        frozenset({"a", frozenset({"b"})}),
    ],
)
def test_equal_values_fingerprint_equal(value: object) -> None:
    assert fp(value) == fp(copy.deepcopy(value))


def test_memoryview_by_content() -> None:
    assert fp(memoryview(b"abc")) == fp(memoryview(bytearray(b"abc")))
    assert fp(memoryview(b"abc")) != fp(memoryview(b"abd"))


def test_nan_is_stable_and_huge_ints_work() -> None:
    assert fp(float("nan")) == fp(float("nan"))
    assert fp(10**5000) != fp(10**5000 + 1)  # beyond the int->str digit limit


def test_dicts_are_order_independent_but_ordered_dicts_are_not() -> None:
    assert fp({"a": 1, "b": 2}) == fp({"b": 2, "a": 1})
    assert fp({"a": 1, "b": 2}) != fp({"a": 2, "b": 1})
    od1 = collections.OrderedDict([("a", 1), ("b", 2)])
    od2 = collections.OrderedDict([("b", 2), ("a", 1)])
    assert fp(od1) != fp(od2)
    assert fp(od1) != fp(dict(od1))


def test_dict_and_set_subclasses_and_namedtuples() -> None:
    Point = collections.namedtuple("Point", ["x", "y"])
    assert fp(Point(1, 2)) == fp(Point(1, 2))
    assert fp(Point(1, 2)) != fp(Point(1, 3))
    assert fp(Point(1, 2)) != fp((1, 2))
    assert fp(collections.Counter("aab")) == fp(collections.Counter("aba"))
    assert fp(collections.Counter("aab")) != fp({"a": 2, "b": 1})
    dd1 = collections.defaultdict(list, {"a": [1]})
    assert fp(dd1) == fp(collections.defaultdict(list, {"a": [1]}))
    assert fp(dd1) != fp(collections.defaultdict(set, {"a": [1]}))


def test_enums_by_class_and_name() -> None:
    class Color(enum.Enum):
        RED = 1
        GREEN = 2

    class Level(enum.IntEnum):
        LOW = 1

    assert fp(Color.RED) == fp(Color.RED)
    assert fp(Color.RED) != fp(Color.GREEN)
    assert fp(Level.LOW) != fp(1)


def test_classes_by_identity() -> None:
    assert fp(int) == fp(int)
    assert fp(int) != fp(float)
    assert fp(torch.nn.Linear) != fp(torch.nn.Conv2d)


# -------------------------------------------------------------------- dataclasses


@dataclasses.dataclass
class _Resize:
    size: int
    mode: str = "bilinear"


@dataclasses.dataclass
class _Crop:
    size: int
    mode: str = "bilinear"


@dataclasses.dataclass(frozen=True)
class _Frozen:
    values: tuple[int, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def test_dataclasses_by_class_and_fields() -> None:
    assert fp(_Resize(224)) == fp(_Resize(224))
    assert fp(_Resize(224)) != fp(_Resize(256))
    assert fp(_Resize(224)) != fp(_Resize(224, "nearest"))
    assert fp(_Resize(224)) != fp(_Crop(224))
    assert fp(_Frozen((1, 2))) == fp(_Frozen((1, 2), {}))
    assert fp(_Frozen((1, 2), {"a": 1})) != fp(_Frozen((1, 2)))


# ------------------------------------------------------------------------- arrays


def test_numpy_arrays_content_dtype_shape() -> None:
    a = np.arange(12, dtype=np.float32)
    assert fp(a) == fp(a.copy())
    assert fp(a) != fp(a.astype(np.float64))
    assert fp(a) != fp(a.reshape(3, 4))
    b = a.copy()
    b[5] += 1
    assert fp(a) != fp(b)
    z32, zf = np.zeros(4, np.int32), np.zeros(4, np.float32)  # same bytes, different dtype
    assert fp(z32) != fp(zf)


def test_numpy_views_byteorder_and_object_arrays() -> None:
    a = np.arange(20, dtype=np.int64).reshape(4, 5)
    assert fp(a[:, ::2]) == fp(np.ascontiguousarray(a[:, ::2]))
    assert fp(a.T) == fp(np.ascontiguousarray(a.T))
    assert fp(np.arange(3, dtype=">i4")) == fp(np.arange(3, dtype="<i4"))
    objs = np.array([{"a": 1}, "x", None], dtype=object)
    assert fp(objs) == fp(copy.deepcopy(objs))
    assert fp(objs) != fp(np.array([{"a": 2}, "x", None], dtype=object))
    assert fp(np.array(["ab", "c"])) != fp(np.array(["ab", "d"]))
    assert fp(np.datetime64("2020-01-01")) != fp(np.datetime64("2020-01-02"))


def test_numpy_scalars() -> None:
    assert fp(np.float32(1.5)) == fp(np.float32(1.5))
    assert fp(np.float32(1.5)) != fp(np.float64(1.5))
    assert fp(np.float64(1.5)) != fp(1.5)
    assert fp(np.int64(3)) != fp(np.array([3], dtype=np.int64))
    assert fp(np.dtype("float32")) != fp(np.dtype("float16"))


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.complex64, torch.uint8],
)
def test_tensors_content_dtype_shape(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(4, 6, generator=g) * 10).to(dtype)
    assert fp(t) == fp(t.clone())
    assert fp(t) != fp(t.reshape(6, 4))
    other = torch.float64 if dtype != torch.float64 else torch.float32
    assert fp(t) != fp(t.to(other))
    u = t.clone()
    u[0, 0] = 1 if dtype != torch.bool else not bool(t[0, 0])
    if not torch.equal(u, t):
        assert fp(u) != fp(t)


def test_tensor_views_grad_and_special_layouts() -> None:
    t = torch.arange(30.0).reshape(5, 6)
    assert fp(t[:, 1::2]) == fp(t[:, 1::2].contiguous())
    assert fp(t[2:]) == fp(t[2:].clone())  # storage offset does not leak in
    p = torch.nn.Parameter(t.clone())
    assert fp(p) == fp(t)
    z = torch.randn(3, dtype=torch.complex64)
    assert fp(z.conj()) == fp(z.conj().resolve_conj())
    assert fp(z.conj()) != fp(z)
    s = torch.tensor([[0.0, 1.0], [2.0, 0.0]]).to_sparse()
    assert fp(s) == fp(torch.tensor([[0.0, 1.0], [2.0, 0.0]]).to_sparse())
    assert fp(s) != fp(torch.tensor([[0.0, 1.0], [3.0, 0.0]]).to_sparse())
    assert fp(torch.zeros(0)) != fp(torch.zeros(0, 2))
    assert fp(torch.tensor(1.0)) != fp(torch.tensor([1.0]))


def test_quantized_and_nested_tensors() -> None:
    x = torch.linspace(-1, 1, 16)
    q1 = torch.quantize_per_tensor(x, scale=0.1, zero_point=0, dtype=torch.qint8)
    q2 = torch.quantize_per_tensor(x, scale=0.2, zero_point=0, dtype=torch.qint8)
    assert fp(q1) == fp(torch.quantize_per_tensor(x, scale=0.1, zero_point=0, dtype=torch.qint8))
    assert fp(q1) != fp(q2)
    n1 = torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)])
    n2 = torch.nested.nested_tensor([torch.arange(3.0), torch.arange(4.0)])
    assert fp(n1) != fp(n2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moving_to_cuda_does_not_change_it() -> None:
    t = torch.randn(64, 3, dtype=torch.bfloat16)
    assert fp(t.cuda()) == fp(t)
    m = _mlp()
    assert fp(copy.deepcopy(m).cuda()) == fp(m)
    assert fp(copy.deepcopy(m).cuda().half()) != fp(m)


def test_read_only_memmap_by_file_identity(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    np.arange(10_000, dtype=np.uint16).tofile(path)
    os.utime(path, ns=(1_700_000_000_000_000_000,) * 2)
    a = np.memmap(path, dtype=np.uint16, mode="r")
    b = np.memmap(path, dtype=np.uint16, mode="r")
    assert fp(a) == fp(b)
    assert fp(a[100:200]) == fp(b[100:200])
    assert fp(a[100:200]) != fp(a[101:201])
    assert fp(np.memmap(path, dtype=np.uint16, mode="r", offset=2)) != fp(a)
    assert fp(np.memmap(path, dtype=np.int16, mode="r")) != fp(a)
    del a, b
    np.arange(1, 10_001, dtype=np.uint16).tofile(path)  # rewritten in place: same size
    os.utime(path, ns=(1_700_000_000_000_000_001,) * 2)
    before = fp(np.array(np.arange(10_000, dtype=np.uint16)))
    assert fp(np.memmap(path, dtype=np.uint16, mode="r")) != before


def test_writable_memmap_by_content(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    m = np.memmap(path, dtype=np.float32, mode="w+", shape=(8,))
    before = fp(m)
    m[0] = 1.0
    assert fp(m) != before


def test_h5py_datasets_by_file_and_name(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
        f["y"] = np.arange(10)
        with pytest.raises(TypeError, match="open for writing"):
            fingerprint({"file": f}, root="dataset")
    with h5py.File(path, "r") as f:
        assert fp(f["x"]) == fp(f["x"])
        assert fp(f["x"]) != fp(f["y"])
        assert fp(f) != fp(f["x"])


def test_meta_tensor_is_refused() -> None:
    with pytest.raises(TypeError, match="meta"):
        fingerprint({"w": torch.empty(3, device="meta")}, root="transform")


def test_torch_dtype_device_generator() -> None:
    assert fp(torch.float32) != fp(torch.float16)
    assert fp(torch.device("cpu")) == fp(torch.device("cpu"))
    assert fp(torch.Generator().manual_seed(1)) != fp(torch.Generator().manual_seed(2))


def test_large_tensor_is_hashed() -> None:
    big = torch.randn(25_000_000)  # 100 MB of float32
    digest = fp(big)
    assert digest == fp(big)
    big[-1] += 1
    assert fp(big) != digest


# ------------------------------------------------------------------------- modules


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )


def test_module_weights_change_fingerprint() -> None:
    m = _mlp()
    before = fp(m)
    assert fp(_mlp()) == before
    assert fp(_mlp(seed=1)) != before
    with torch.no_grad():
        m[3].weight[0, 0] += 1e-3
    assert fp(m) != before


def test_module_copy_and_same_dtype_move_do_not_change_it() -> None:
    m = _mlp()
    assert fp(copy.deepcopy(m)) == fp(m)
    assert fp(m.to("cpu", torch.float32)) == fp(_mlp())
    assert fp(_mlp().half()) != fp(_mlp())
    m.extra_setting = 3  # a plain attribute can change what forward does
    assert fp(m) != fp(_mlp())


def test_train_and_eval_differ_for_every_submodule() -> None:
    m = _mlp()
    train = fp(m)
    m.eval()
    assert fp(m) != train
    m.train()
    assert fp(m) == train
    m[1].eval()  # only the BatchNorm
    assert fp(m) != train


def test_buffers_count_including_non_persistent() -> None:
    class WithBuffer(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.register_buffer("window", torch.full((4,), value), persistent=False)

    assert "window" not in WithBuffer(1.0).state_dict()
    assert fp(WithBuffer(1.0)) == fp(WithBuffer(1.0))
    assert fp(WithBuffer(1.0)) != fp(WithBuffer(2.0))
    bn = _mlp()
    bn[1].running_mean += 1  # persistent buffer
    assert fp(bn) != fp(_mlp())


def test_user_module_code_changes_fingerprint() -> None:
    src = """
    import torch
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = 2.0
        def forward(self, x):
            return x * self.factor{extra}
    """
    a = _exec(src.format(extra=""))["Scale"]()
    b = _exec(src.format(extra=""))["Scale"]()
    c = _exec(src.format(extra=" + 1"))["Scale"]()
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)


def test_forward_hooks_count() -> None:
    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * 2

    m = _mlp()
    before = fp(m)
    handle = m.register_forward_hook(hook)
    assert fp(m) != before
    handle.remove()
    assert fp(m) == before


def test_script_module() -> None:
    scripted = torch.jit.script(_mlp().eval())
    assert fp(scripted) == fp(torch.jit.script(_mlp().eval()))
    assert fp(scripted) != fp(torch.jit.script(_mlp(seed=3).eval()))


# -------------------------------------------------------------------- torchvision


def _v1(
    size: int = 224, mean: float = 0.5, std: float = 0.25, interp: Any = None, antialias: bool = True
) -> Any:
    import torchvision.transforms as T

    interp = interp if interp is not None else T.InterpolationMode.BILINEAR
    return T.Compose(
        [
            T.Resize(size, interpolation=interp, antialias=antialias),
            T.CenterCrop(200),
            T.ToTensor(),
            T.Normalize([mean] * 3, [std] * 3),
        ]
    )


def _v2(
    size: int = 224, mean: float = 0.5, std: float = 0.25, interp: Any = None, antialias: bool = True
) -> Any:
    import torchvision.transforms.v2 as T

    interp = interp if interp is not None else T.InterpolationMode.BILINEAR
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interp, antialias=antialias),
            T.Resize(size, interpolation=interp, antialias=antialias),
            T.CenterCrop(200),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([mean] * 3, [std] * 3),
        ]
    )


@pytest.mark.parametrize("build", [_v1, _v2], ids=["v1", "v2"])
def test_torchvision_parameters_change_fingerprint(build: Any) -> None:
    from torchvision.transforms import InterpolationMode

    base = fp(build())
    assert fp(build()) == base
    variants = {
        "size": build(size=256),
        "mean": build(mean=0.4),
        "std": build(std=0.3),
        "interpolation": build(interp=InterpolationMode.BICUBIC),
        "antialias": build(antialias=False),
    }
    digests = {name: fp(t) for name, t in variants.items()}
    for name, digest in digests.items():
        assert digest != base, name
    assert len(set(digests.values())) == len(digests)


def test_torchvision_tree_diff_names_the_parameter() -> None:
    old = fingerprint_tree(_v1(224), root="transform").entries
    new = fingerprint_tree(_v1(256), root="transform").entries
    assert diff_trees(old, new) == ["transform.transforms[0].size: 224 -> 256"]
    new_mean = fingerprint_tree(_v1(mean=0.4), root="transform").entries
    assert diff_trees(old, new_mean) == ["transform.transforms[3].mean: [0.5, 0.5, 0.5] -> [0.4, 0.4, 0.4]"]


# --------------------------------------------------------------------- torchaudio


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("make", "a", "b"),
    [
        ("Resample", {"orig_freq": 16000, "new_freq": 8000}, {"orig_freq": 16000, "new_freq": 22050}),
        ("Resample", {"orig_freq": 16000, "new_freq": 8000}, {"orig_freq": 44100, "new_freq": 8000}),
        ("MelSpectrogram", {"sample_rate": 16000, "n_mels": 64}, {"sample_rate": 16000, "n_mels": 80}),
        ("MelSpectrogram", {"sample_rate": 16000}, {"sample_rate": 22050}),
        ("MelSpectrogram", {"n_fft": 400}, {"n_fft": 512}),
        ("Spectrogram", {"n_fft": 400}, {"n_fft": 512}),
        ("Spectrogram", {"power": 2.0}, {"power": 1.0}),
        ("MFCC", {"n_mfcc": 13}, {"n_mfcc": 20}),
        ("MFCC", {"sample_rate": 16000}, {"sample_rate": 8000}),
    ],
)
def test_torchaudio_parameters_change_fingerprint(make: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    import torchaudio.transforms as AT

    cls = getattr(AT, make)
    assert fp(cls(**a)) == fp(cls(**a))
    assert fp(cls(**a)) != fp(cls(**b))


def test_torchaudio_window_is_covered() -> None:
    import torchaudio.transforms as AT

    hann = AT.Spectrogram(n_fft=400)
    hamming = AT.Spectrogram(n_fft=400, window_fn=torch.hamming_window)
    assert fp(hann) != fp(hamming)


# ----------------------------------------------------------------------- tokenizers


def _corpus() -> list[str]:
    rng = random.Random(1234)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(30)) for _ in range(800)]


def _bpe(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def test_tokenizers_bpe_vocab_size() -> None:
    a, b, c = _bpe(200), _bpe(200), _bpe(300)
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)
    b.enable_padding(pad_token="[PAD]", length=16)
    assert fp(a) != fp(b)
    a.enable_truncation(max_length=8)
    assert fp(a) != fp(_bpe(200))


def test_transformers_objects_by_duck_typing() -> None:
    # Stand-ins for transformers classes (the package is not installed): what
    # matters is the class's module name and the duck-typed methods.
    class FastTokenizer:
        def __init__(self, backend: Any, padding_side: str = "right") -> None:
            self.backend_tokenizer = backend
            self.padding_side = padding_side
            self.special_tokens_map = {"pad_token": "[PAD]"}

    class ImageProcessor:
        def __init__(self, **config: Any) -> None:
            self._config = config
            self._lock = threading.Lock()  # never looked at: to_dict() is the state

        def to_dict(self) -> dict[str, Any]:
            return dict(self._config)

    for cls in (FastTokenizer, ImageProcessor):
        cls.__module__ = "transformers.models.fake.processing_fake"

    tok = _bpe(200)
    # (transformers may be installed and imported by other tests: the fakes above stand alone)
    assert fp(FastTokenizer(tok)) == fp(FastTokenizer(_bpe(200)))
    assert fp(FastTokenizer(tok)) != fp(FastTokenizer(_bpe(300)))
    assert fp(FastTokenizer(tok)) != fp(FastTokenizer(tok, padding_side="left"))
    a = ImageProcessor(size={"shortest_edge": 224}, image_mean=[0.5, 0.5, 0.5], do_resize=True)
    b = ImageProcessor(size={"shortest_edge": 224}, image_mean=[0.5, 0.5, 0.5], do_resize=True)
    c = ImageProcessor(size={"shortest_edge": 256}, image_mean=[0.5, 0.5, 0.5], do_resize=True)
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)
    moved = ImageProcessor(size={"shortest_edge": 224}, image_mean=[0.5, 0.5, 0.5], do_resize=True)
    moved._config["_name_or_path"] = "/somewhere/else"  # provenance, not state
    assert fp(moved) == fp(a)
    # (transformers may be installed and imported by other tests: the fakes above stand alone)


# ------------------------------------------------------------------------ functions


def test_lambdas_by_code_and_constants() -> None:
    assert fp(lambda x: x + 1) == fp(lambda x: x + 1)
    assert fp(lambda x: x + 1) != fp(lambda x: x + 2)
    assert fp(lambda x: x + 1) != fp(lambda x: x - 1)
    assert fp(lambda x: x + 1) != fp(lambda y: y + 1)


def test_moving_code_does_not_matter_but_editing_does() -> None:
    src = "def f(x):\n    return x * 2 + len('abc')\n"
    a = _exec(src)["f"]
    b = _exec("\n\n\n# a comment\n" + src)["f"]
    c = _exec(src.replace("2", "3"))["f"]
    assert a.__code__.co_firstlineno != b.__code__.co_firstlineno
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)


def test_defaults_and_kwdefaults() -> None:
    def make(default: int) -> Any:
        def f(x: int, y: int = default, *, z: int = default) -> int:
            return x + y + z

        return f

    assert fp(make(1)) == fp(make(1))
    assert fp(make(1)) != fp(make(2))


def test_closures() -> None:
    def scale_by(k: float) -> Any:
        return lambda x: x * k

    assert fp(scale_by(2.0)) == fp(scale_by(2.0))
    assert fp(scale_by(2.0)) != fp(scale_by(3.0))
    table = {"a": [1, 2]}
    assert fp(lambda: table) == fp(lambda: table)
    before = fp(lambda: table)
    table["a"].append(3)
    assert fp(lambda: table) != before


def test_module_globals_read_by_functions(tmp_path: Path) -> None:
    src = """
    import math

    SIZE = {size}
    UNUSED = object()  # not read by any function below: must not matter

    def _helper(x):
        return x * SIZE

    def transform(x):
        return _helper(x) + math.pi

    def nested():
        def inner(x):
            return x + SIZE
        return inner
    """
    mods = {}
    for name, size in (("a", 224), ("b", 256), ("c", 224)):
        path = tmp_path / f"fpglobals_{name}.py"
        path.write_text(textwrap.dedent(src.format(size=size)))
        mods[name] = _import_file(path, f"fpglobals_{name}")
    a, b, c = mods["a"], mods["b"], mods["c"]
    assert fp(a.transform) == fp(c.transform)  # module name and file do not matter
    assert fp(a.transform) != fp(b.transform)  # SIZE is read through _helper
    assert fp(a.nested()) == fp(c.nested())
    assert fp(a.nested()) != fp(b.nested())  # read by a nested function's code


def test_globals_in_exec_namespace() -> None:
    src = """
    import numpy as np
    SIZE = {size}
    def f(x):
        return np.resize(x, SIZE)
    """
    a = _exec(src.format(size=224))["f"]
    b = _exec(src.format(size=256))["f"]
    c = _exec(src.format(size=224))["f"]
    assert fp(a) == fp(c)
    assert fp(a) != fp(b)


def test_recursive_functions_terminate() -> None:
    ns = _exec(
        """
        def even(n):
            return n == 0 or odd(n - 1)
        def odd(n):
            return n != 0 and even(n - 1)
        """
    )
    assert fp(ns["even"]) == fp(ns["even"])
    assert fp(ns["even"]) != fp(ns["odd"])


def test_partial() -> None:
    def resize(x: Any, size: int, mode: str = "bilinear") -> Any:
        return x

    assert fp(functools.partial(resize, size=224)) == fp(functools.partial(resize, size=224))
    assert fp(functools.partial(resize, size=224)) != fp(functools.partial(resize, size=256))
    assert fp(functools.partial(resize, 1)) != fp(functools.partial(resize, size=1))
    assert fp(functools.partial(resize, size=1, mode="a")) == fp(functools.partial(resize, mode="a", size=1))


class _Scaler:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: float) -> float:
        return x * self.factor

    def apply(self, x: float) -> float:
        return x * self.factor


class _Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b


def test_bound_methods_and_callable_instances() -> None:
    assert fp(_Scaler(2).apply) == fp(_Scaler(2).apply)
    assert fp(_Scaler(2).apply) != fp(_Scaler(3).apply)
    assert fp(_Scaler(2).apply) != fp(_Scaler(2).__call__)
    assert fp(_Scaler(2)) == fp(_Scaler(2))
    assert fp(_Scaler(2)) != fp(_Scaler(3))
    assert fp(_Slotted(1, 2)) == fp(_Slotted(1, 2))
    assert fp(_Slotted(1, 2)) != fp(_Slotted(2, 1))


def test_user_class_method_code_counts() -> None:
    src = """
    class Transform:
        def __init__(self):
            self.size = 4
        def __call__(self, x):
            return x[: self.size]{extra}
    """
    a = _exec(src.format(extra=""))["Transform"]()
    b = _exec(src.format(extra=""))["Transform"]()
    c = _exec(src.format(extra="[::-1]"))["Transform"]()
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)


def test_decorated_functions_keep_their_code() -> None:
    src = """
    import functools
    import torch
    @functools.lru_cache(maxsize=None)
    def cached(x):
        return x * {k}
    @torch.no_grad()
    def no_grad(x):
        return x * {k}
    """
    a, b, c = _exec(src.format(k=2)), _exec(src.format(k=2)), _exec(src.format(k=3))
    for name in ("cached", "no_grad"):
        assert fp(a[name]) == fp(b[name]), name
        assert fp(a[name]) != fp(c[name]), name


def test_builtins_and_library_functions() -> None:
    assert fp(len) == fp(len)
    assert fp(len) != fp(sum)
    assert fp(math.sqrt) != fp(math.exp)
    assert fp(torch.relu) != fp(torch.sigmoid)
    assert fp(np.add) != fp(np.multiply)
    assert fp(str.lower) != fp(str.upper)
    assert fp([1].append) != fp([2].append)


def test_other_stateful_objects_via_pickle_state() -> None:
    import datetime
    import pathlib
    import re

    assert fp(pathlib.Path("/a/b")) != fp(pathlib.Path("/a/c"))
    assert fp(re.compile("a+")) != fp(re.compile("a*"))
    assert fp(datetime.date(2020, 1, 1)) != fp(datetime.date(2020, 1, 2))
    assert fp(random.Random(0)) == fp(random.Random(0))
    assert fp(random.Random(0)) != fp(random.Random(1))
    assert fp(np.random.default_rng(0)) != fp(np.random.default_rng(1))
    assert fp(range(3)) != fp(range(4))


def test_pil_images() -> None:
    from PIL import Image

    a = Image.new("RGB", (4, 4), (1, 2, 3))
    assert fp(a) == fp(a.copy())
    assert fp(a) != fp(Image.new("RGB", (4, 4), (1, 2, 4)))
    assert fp(a) != fp(a.convert("L"))


# ---------------------------------------------------------------------------- hook


class _Hooked:
    def __init__(self, version: str) -> None:
        self.version = version
        self.lock = threading.Lock()  # would be refused without the hook

    def __cachedata_fingerprint__(self) -> str:
        return f"hooked-{self.version}"


def test_hook_takes_precedence() -> None:
    assert fp(_Hooked("1")) == fp(_Hooked("1"))
    assert fp(_Hooked("1")) != fp(_Hooked("2"))
    assert fp([_Hooked("1")]) != fp([_Hooked("2")])


def test_hook_must_return_str() -> None:
    class Bad:
        def __cachedata_fingerprint__(self) -> Any:
            return 3

    with pytest.raises(TypeError, match="expected str"):
        fp(Bad())


def test_hook_on_a_module_ignores_its_tensors() -> None:
    class Loader(torch.nn.Module):
        def __cachedata_fingerprint__(self) -> str:
            return "loader-v1"

    m = Loader()
    m.register_buffer("x", torch.randn(3))
    assert fp(m) == fp(Loader())


# -------------------------------------------------------------------------- cycles


class _Node:
    def __init__(self, value: int) -> None:
        self.value = value
        self.next: _Node | None = None


def test_cycles_terminate_and_are_deterministic() -> None:
    def ring(values: list[int]) -> _Node:
        nodes = [_Node(v) for v in values]
        for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True):
            a.next = b
        return nodes[0]

    assert fp(ring([1, 2, 3])) == fp(ring([1, 2, 3]))
    assert fp(ring([1, 2, 3])) != fp(ring([1, 2, 4]))
    lst: list[Any] = [1]
    lst.append(lst)
    assert fp(lst) == fp(lst)
    other: list[Any] = [1]
    other.append(other)
    assert fp(lst) == fp(other)
    d: dict[str, Any] = {}
    d["self"] = d
    assert fp(d)


def test_shared_references_are_not_cycles() -> None:
    shared = [1, 2]
    assert fp([shared, shared]) == fp([[1, 2], [1, 2]])


# ------------------------------------------------------------- unfingerprintable


class _Holder:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


def test_open_file_is_refused_with_path(tmp_path: Path) -> None:
    with (tmp_path / "f.txt").open("w") as handle:
        obj = _Holder(inner=_Holder(files=[1, handle]))
        with pytest.raises(TypeError) as info:
            fingerprint(obj, root="transform")
    msg = str(info.value)
    assert "TextIOWrapper" in msg
    assert "transform.inner.files[1]" in msg
    assert "version=" in msg


def test_socket_is_refused_with_path() -> None:
    with socket.socket() as sock:
        with pytest.raises(TypeError, match=r"socket\.socket at obj\['conn'\]"):
            fingerprint({"conn": sock})


def test_lock_is_refused_with_path() -> None:
    transform = _Holder(tokenizer=_Holder(vocab={"a": 1}, _lock=threading.Lock()))
    with pytest.raises(TypeError) as info:
        fingerprint(transform, root="transform")
    assert "_thread.lock" in str(info.value)
    assert "transform.tokenizer._lock" in str(info.value)


def test_lock_read_as_a_global_is_refused() -> None:
    ns = _exec(
        """
        import threading
        LOCK = threading.Lock()
        def f(x):
            with LOCK:
                return x
        """
    )
    with pytest.raises(TypeError, match=r"_thread\.lock at transform\.__globals__\.LOCK"):
        fingerprint(ns["f"], root="transform")


@pytest.mark.parametrize(
    "make",
    [
        lambda: object(),
        lambda: (i for i in range(3)),
        lambda: iter([1, 2]),
        lambda: threading.Thread(target=print),
        lambda: threading.Event(),
        lambda: threading.RLock(),
        lambda: random.SystemRandom(),
    ],
    ids=["object", "generator", "iterator", "thread", "event", "rlock", "systemrandom"],
)
def test_stateless_or_hidden_state_objects_are_refused(make: Any) -> None:
    obj = make()
    with pytest.raises(TypeError, match=r"cannot fingerprint .* at transform\.x\[0\]"):
        fingerprint(_Holder(x=[obj]), root="transform")


def test_error_names_the_type() -> None:
    with pytest.raises(TypeError, match="cannot fingerprint object at obj"):
        fingerprint(object())


# ---------------------------------------------------------------------------- tree


def test_tree_digest_matches_fingerprint_and_describes_leaves() -> None:
    value = {"size": [224], "name": "resize", "weights": torch.zeros(100, 100), "big": list(range(100))}
    got = fingerprint_tree(value, root="transform")
    digest, tree = got.digest, got.entries
    assert digest == fp(value)
    assert tree["transform['size']"] == "[224]"
    assert tree["transform['name']"] == "'resize'"
    assert tree["transform['weights']"].startswith("tensor(shape=[100, 100], dtype=torch.float32) #")
    assert tree["transform['big']"].startswith("list[len=100] #")
    json.dumps(tree)  # stored as JSON metadata by the core


def test_tree_respects_max_depth_and_truncates() -> None:
    deep = {"a": {"b": {"c": {"d": {"e": 1}}}}, "long": "x" * 500}
    tree = fingerprint_tree(deep, root="r", max_depth=2).entries
    assert all(k.count("[") <= 2 for k in tree)
    assert "r['a']['b']" in tree and "#" in tree["r['a']['b']"]
    assert len(tree["r['long']"]) < 80 and "#" in tree["r['long']"]
    tree0 = fingerprint_tree(deep, root="r", max_depth=0).entries
    assert list(tree0) == ["r"]


def test_diff_trees_added_removed_changed() -> None:
    old = fingerprint_tree({"a": 1, "b": 2}, root="t").entries
    new = fingerprint_tree({"a": 1, "b": 3, "c": "x"}, root="t").entries
    assert diff_trees(old, new) == ["t['b']: 2 -> 3", "t['c']: (absent) -> 'x'"]
    assert diff_trees(new, old) == ["t['b']: 3 -> 2", "t['c']: 'x' -> (absent)"]
    assert diff_trees(old, old) == []


def test_tree_of_function_shows_globals() -> None:
    a = _exec("SIZE = 224\ndef f(x):\n    return x * SIZE\n")["f"]
    b = _exec("SIZE = 256\ndef f(x):\n    return x * SIZE\n")["f"]
    ta = fingerprint_tree(a, root="transform").entries
    tb = fingerprint_tree(b, root="transform").entries
    assert diff_trees(ta, tb) == ["transform.__globals__.SIZE: 224 -> 256"]


# ------------------------------------------------------------ across processes

_DETERMINISM_SCRIPT = """
import functools, json, sys
import torch
import torchaudio.transforms as AT
import torchvision.transforms.v2 as T
from tokenizers import Tokenizer, models, pre_tokenizers
from cachedata.fingerprint import fingerprint, fingerprint_tree

SIZE = 224

def scale(x):
    return x * SIZE

class Pipeline:
    def __init__(self):
        self.steps = {"resize": SIZE, "names": {"b", "a", "c"}}
    def __call__(self, x):
        return scale(x)

def build():
    torch.manual_seed(0)
    return {
        "set": {"alpha", "beta", "gamma", "delta", 3, 4.5, (1, "x"), frozenset({"p", "q"})},
        "dict": {"zeta": 1, "alpha": {"x", "y", "z"}, 3: [1, 2], ("t", 1): None},
        "lambda": lambda x: x + SIZE,
        "function": scale,
        "partial": functools.partial(scale),
        "instance": Pipeline(),
        "method": Pipeline().__call__,
        "module": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()),
        "tv2": T.Compose([T.ToImage(), T.Resize(SIZE), T.CenterCrop(200),
                          T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.25] * 3)]),
        "strings": {str(i) * 3 for i in range(50)},
        "mel": AT.MelSpectrogram(sample_rate=16000, n_mels=64),
        "tokenizer": tokenizer(),
    }

def tokenizer():
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(letters)}}
    merges = [(a, b) for a, b in zip(letters[::2], letters[1::2])]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    tok.enable_padding(pad_id=0, pad_token="[UNK]", length=32)
    return tok

if __name__ == "__main__":
    out = {k: fingerprint(v) for k, v in build().items()}
    out["tree"] = fingerprint_tree(build()["tv2"], root="transform").entries
    print(json.dumps(out))
"""


def test_deterministic_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    script = tmp_path / "fp_determinism.py"
    script.write_text(_DETERMINISM_SCRIPT)
    outputs = []
    for seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, check=False, timeout=240
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    # And the same in this process, where the script is an imported module, not __main__.
    module = _import_file(script, "fp_determinism_inproc")
    here: dict[str, Any] = {k: fp(v) for k, v in module.build().items()}
    here["tree"] = fingerprint_tree(module.build()["tv2"], root="transform").entries
    assert here == outputs[0]
    assert len(outputs[0]["tree"]) > 10


# ---------------------------------------------------------------------- property

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
        | st.frozensets(st.integers() | st.text(max_size=5), max_size=5)
    ),
    max_leaves=25,
)


def _perturb(value: Any) -> tuple[Any, bool]:
    """The value with its first scalar leaf replaced by a different one."""
    t = type(value)
    if value is None:
        return 0, True
    if t is bool:
        return not value, True
    if t is int:
        return value + 1, True
    if t is float:
        return (2.5 if value == 1.5 else 1.5), True
    if t is str:
        return value + "!", True
    if t is bytes:
        return value + b"!", True
    if t in (list, tuple):
        items = list(value)
        for i, item in enumerate(items):
            new, done = _perturb(item)
            if done:
                items[i] = new
                return t(items), True
        return value, False
    if t is dict:
        for k, v in value.items():
            new, done = _perturb(v)
            if done:
                return {**value, k: new}, True
        return value, False
    return value, False  # frozensets: perturbing could collide with another member


@settings(max_examples=200, deadline=None)
@given(_values)
def test_property_equal_structures_equal_and_perturbed_differ(value: Any) -> None:
    assert fp(value) == fp(copy.deepcopy(value))
    perturbed, changed = _perturb(value)
    if changed:
        assert fp(perturbed) != fp(value)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6) | st.integers(), _scalars, max_size=8))
def test_property_dict_insertion_order_does_not_matter(mapping: dict[Any, Any]) -> None:
    reordered = dict(reversed(list(mapping.items())))
    assert fp(mapping) == fp(reordered)
