"""Item encoding: every storable type round-trips bit-exactly; the rest is refused by path."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from helpers import assert_same
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cachedata import buffers, schema

TORCH_DTYPES = [
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.bool, torch.complex64,
    torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
]  # fmt: skip


def roundtrip(item):
    enc = schema.encode(item)
    text = schema.dumps(enc.schema)
    dec = schema.Decoder(schema.load(text))
    assert dec.nslots == len(enc.slots)
    return dec.decode(bytearray(enc.payload), 0, enc.slots)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (0, 3)])
def test_tensor_dtypes_and_shapes(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype) if dtype != torch.bool else torch.randn(shape) > 0
    got = roundtrip(t)
    assert_same(got, t)
    assert got.is_contiguous()


def test_nan_negative_zero_and_special_floats():
    t = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")])
    assert_same(roundtrip(t), t)
    for x in (float("nan"), -0.0, float("inf"), 1e-310):
        assert_same(roundtrip(x), x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.randn(3, dtype=torch.complex64).conj(),
        lambda: torch._neg_view(torch.randn(4)),
        lambda: torch.randn(2, 3, requires_grad=True) * 2,
        lambda: torch.nn.Parameter(torch.randn(3)),
        lambda: torch.arange(10.0)[3:7],
        lambda: torch.arange(10.0)[::2],
        lambda: torch.arange(6.0).reshape(2, 3)[:, :1],
        lambda: torch.randn(4).to_sparse(),
        lambda: torch.randn(3, 1).expand(3, 4),
    ],
    ids="transposed conj neg grad parameter offset strided column sparse expanded".split(),
)
def test_tensors_that_need_converting_store_their_values(make):
    """A view, a conj or neg bit, grad or a sparse layout: stored as the dense values."""
    t = make()
    want = t.detach().resolve_conj().resolve_neg()
    if want.layout == torch.sparse_coo:
        with pytest.raises(TypeError, match=r"cannot store a torch\.sparse_coo"):
            schema.encode(t)
        return
    got = roundtrip(t)
    assert type(got) is torch.Tensor and got.is_contiguous() and not got.requires_grad
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(6, dtype=">f8").reshape(2, 3),
        np.array([1, 2, 3], dtype=np.uint16),
        np.array([True, False]),
        np.array(["ab", "xyz"]),
        np.array([b"a", b"bcd"]),
        np.zeros((0, 4), np.float32),
        np.array(3.5, np.float32),
        np.array(["2020-01-01"], dtype="datetime64[ns]"),
        np.arange(4, dtype=np.complex128),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    ],
    ids=lambda a: f"{a.dtype.str}{a.shape}",
)
def test_ndarrays(arr):
    got = roundtrip(arr)
    assert type(got) is np.ndarray and got.dtype == arr.dtype and got.shape == arr.shape
    assert np.array_equal(got, arr) or got.tobytes() == np.ascontiguousarray(arr).tobytes()
    got[...] = got  # writable


def test_numpy_scalars():
    for v in (np.float32(1.5), np.int64(-3), np.bool_(True), np.str_("héllo"), np.complex64(1 + 2j)):
        assert_same(roundtrip(v), v)


def test_python_scalars_containers_and_key_order():
    item = {
        "z": 1,
        "a": [1, 2, 3],
        0: (True, None, 2.5, "s\ud800", b"\x00\xff", bytearray(b"ab"), 3 + 4j),
        "big": 2**100,
        "neg": -(2**70),
        "words": ["a", "bé", ""],
        "floats": [0.5, -0.0],
        "mixed": [1, "a", None],
        "empty": ([], {}, ()),
    }
    got = roundtrip(item)
    assert_same(got, item)
    assert list(got) == ["z", "a", 0, "big", "neg", "words", "floats", "mixed", "empty"]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGB", "RGBA", "CMYK", "I", "I;16", "F"])
def test_pil_images(mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8), "RGB").convert(mode)
    got = roundtrip(img)
    assert_same(got, img)


def test_unstorable_leaf_names_its_path_and_type():
    s = socket.socket()
    try:
        with pytest.raises(TypeError, match=r'at \["meta"\]\[2\]: cannot store socket'):
            schema.encode({"meta": [1, 2, s]})
    finally:
        s.close()
    with pytest.raises(TypeError, match="object"):
        schema.encode(object())
    with pytest.raises(TypeError, match="dict key"):
        schema.encode({(1, 2): 3})
    with pytest.raises(TypeError, match="dtype object"):
        schema.encode(np.array([object()]))
    with pytest.raises(TypeError, match="mode 'P'"):
        schema.encode(Image.new("P", (2, 2)))


def test_difference_names_path_and_change():
    a = schema.encode({"x": torch.zeros(2), "y": [1, 2]}).schema
    b = schema.encode({"x": torch.zeros(2, dtype=torch.float64), "y": [1, 2]}).schema
    c = schema.encode({"x": torch.zeros(2), "z": 1}).schema
    assert schema.difference(a, a) is None
    assert schema.difference(a, schema.encode({"x": torch.zeros(9), "y": [4, 5, 6]}).schema) is None
    assert '["x"]: dtype float64 where earlier items have float32' in schema.difference(a, b)
    assert "keys ['x', 'z']" in schema.difference(a, c)


def test_load_refuses_bad_schemas():
    for bad in ('{"t": "pickle"}', '{"t": "tensor", "dtype": "Tensor", "ndim": 1}', "[1]",
                '{"t": "ndarray", "dtype": "|O", "ndim": 1}'):  # fmt: skip
        with pytest.raises(ValueError):
            schema.load(bad)


# -- property-based: generated nested items round-trip exactly ---------------------------------

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.builds(
        lambda shape, dtype, seed: (
            torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 50
        ).to(dtype),
        st.lists(st.integers(0, 3), max_size=3).map(tuple),
        st.sampled_from([torch.float32, torch.bfloat16, torch.int16, torch.complex64, torch.float16]),
        st.integers(0, 1000),
    ),
    st.builds(
        lambda shape, dtype: np.arange(math.prod(shape), dtype=dtype).reshape(shape),
        st.lists(st.integers(0, 3), max_size=3).map(tuple),
        st.sampled_from([np.float32, np.int8, np.uint64, np.float16]),
    ),
)
items = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-5, 5)), children, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(items)
def test_hypothesis_roundtrip(item):
    assert_same(roundtrip(item), item)


def test_padding_between_leaves_is_zeros_in_a_recycled_buffer(monkeypatch):
    """Large payloads are encoded into recycled buffers, which still hold old bytes: the gaps
    that align each leaf are zeroed, so no stale bytes reach the cache."""
    monkeypatch.setattr(buffers, "_pool", buffers._Pool())
    item = {"a": np.arange(100_001, dtype=np.int64).astype(np.uint8), "b": np.arange(4, dtype=np.int64)}
    size = 100_008 + 4 * 8
    junk = buffers.take(size)
    junk[:] = 0xFF
    del junk  # idle: the next request of its size class gets it back
    enc = schema.encode(item)
    assert buffers.stats().reused == 1
    raw = np.asarray(enc.payload)
    assert len(raw) == size and not raw[100_001:100_008].any()
    assert_same(roundtrip(item), item)
