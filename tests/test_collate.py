"""CachedCollate: stacking, padding rules, nesting, dtypes, errors, and where outputs are written."""

from __future__ import annotations

import itertools
import numbers
import pickle
import sys
from collections import OrderedDict, UserDict
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, default_collate

import cachedata.collate as collate_module
import cachedata.placement as placement_module
from cachedata.collate import CachedCollate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Deterministic non-trivial values of any dtype (never equal to the pad values used here)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if dtype.is_complex:
        real = torch.rand(shape, generator=gen, dtype=torch.float64) + 1
        return torch.complex(real, real + 1).to(dtype)
    return (torch.randint(1, 100, shape, generator=gen)).to(dtype)


def reference_pad(samples: list[torch.Tensor], pad: float, multiple: int | None = None) -> torch.Tensor:
    """Straightforward padding: batch max per dimension (rounded up on ragged dims), then slices."""
    shapes = [s.shape for s in samples]
    size = [max(dims) for dims in zip(*shapes)]
    if multiple is not None:
        for d, dims in enumerate(zip(*shapes)):
            if min(dims) != max(dims):
                size[d] = -(-size[d] // multiple) * multiple
    out = torch.full((len(samples), *size), pad, dtype=samples[0].dtype)
    for i, s in enumerate(samples):
        out[(i, *[slice(0, n) for n in s.shape])] = s
    return out


def assert_same(a: Any, b: Any) -> None:
    """Equal structure, types, dtypes and values (NaN-free data)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# -- stacking and conversions ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_same_shape_tensors_are_stacked_like_default_collate(dtype: torch.dtype) -> None:
    samples = [make((3, 5), dtype, seed=i) for i in range(4)]
    out = CachedCollate()(samples)
    assert_same(out, default_collate(samples))


def test_zero_dim_tensors_are_stacked() -> None:
    out = CachedCollate()([torch.tensor(1.5), torch.tensor(2.5)])
    assert_same(out, torch.tensor([1.5, 2.5]))


@pytest.mark.parametrize(
    "np_dtype", [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int64, np.bool_]
)
def test_ndarrays_become_tensors(np_dtype: type) -> None:
    arrays = [np.arange(6).reshape(2, 3).astype(np_dtype) + i for i in range(3)]
    out = CachedCollate()(arrays)
    assert_same(out, default_collate(arrays))


def test_ragged_ndarrays_are_padded_to_tensors() -> None:
    arrays = [np.arange(n, dtype=np.float32) + 1 for n in (2, 4, 3)]
    out = CachedCollate(pad_value=-1)(arrays)
    assert_same(out, reference_pad([torch.from_numpy(a) for a in arrays], -1))


def test_big_endian_and_readonly_arrays() -> None:
    big = [np.arange(4, dtype=">f4") + i for i in range(2)]
    assert_same(CachedCollate()(big), torch.tensor([[0.0, 1, 2, 3], [1, 2, 3, 4]]))
    frozen = [np.arange(n, dtype=np.int64) for n in (2, 3)]
    for a in frozen:
        a.flags.writeable = False
    assert_same(CachedCollate()(frozen), torch.tensor([[0, 1, 0], [0, 1, 2]]))


def test_python_numbers_follow_default_collate_dtypes() -> None:
    batch = CachedCollate()(
        [{"b": True, "i": 3, "f": 0.5, "c": 1 + 2j}, {"b": False, "i": -4, "f": 1.5, "c": 3j}]
    )
    assert_same(batch["b"], torch.tensor([True, False]))
    assert_same(batch["i"], torch.tensor([3, -4], dtype=torch.int64))
    assert_same(batch["f"], torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert_same(batch["c"], torch.tensor([1 + 2j, 3j], dtype=torch.complex128))
    reference = default_collate([{"b": True, "i": 3, "f": 0.5}, {"b": False, "i": -4, "f": 1.5}])
    for key in ("b", "i", "f"):
        assert_same(batch[key], reference[key])


def test_large_python_int_that_does_not_fit_int64_is_an_error() -> None:
    with pytest.raises(ValueError, match=r'\["n"\]: numbers do not fit int64'):
        CachedCollate()([{"n": 1}, {"n": 2**70}])


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([np.float16(1.5), np.float16(2)], torch.float16),
        ([np.int8(-3), np.int8(4)], torch.int8),
        ([np.bool_(True), np.bool_(False)], torch.bool),
        ([np.float64(0.25), np.float64(1)], torch.float64),
        ([np.uint16(7), np.uint16(9)], torch.uint16),
    ],
)
def test_numpy_scalars_keep_their_dtype(values: list[Any], dtype: torch.dtype) -> None:
    out = CachedCollate()(values)
    assert out.dtype == dtype
    assert out.tolist() == [v.item() for v in values]


def test_str_bytes_none_and_other_objects_stay_lists() -> None:
    obj = object()
    batch = CachedCollate()(
        [
            {"s": "a", "b": b"x", "n": None, "o": obj, "npstr": np.str_("u"), "arr": np.array(["p", "q"])},
            {"s": "b", "b": b"y", "n": None, "o": obj, "npstr": np.str_("v"), "arr": np.array(["r", "s"])},
        ]
    )
    assert batch["s"] == ["a", "b"]
    assert batch["b"] == [b"x", b"y"]
    assert batch["n"] == [None, None]
    assert batch["o"] == [obj, obj]
    assert batch["npstr"] == ["u", "v"]
    assert [a.tolist() for a in batch["arr"]] == [["p", "q"], ["r", "s"]]


def test_pil_images_stay_lists() -> None:
    pil = pytest.importorskip("PIL.Image")
    images = [pil.new("RGB", (4, 3)), pil.new("RGB", (5, 2))]
    batch = CachedCollate()([{"image": im, "label": i} for i, im in enumerate(images)])
    assert batch["image"] == images
    assert_same(batch["label"], torch.tensor([0, 1]))


class Pair(NamedTuple):
    left: Any
    right: Any


def test_nesting_is_kept() -> None:
    samples = [
        {
            "z": (torch.full((2,), i), [i, float(i)]),
            "a": {"inner": torch.arange(i + 1), "name": f"s{i}"},
            "p": Pair(torch.ones(1) * i, "x"),
        }
        for i in range(3)
    ]
    batch = CachedCollate()(samples)
    assert list(batch) == ["z", "a", "p"]  # sample 0's key order
    assert isinstance(batch["z"], tuple) and isinstance(batch["z"][1], list)
    assert_same(batch["z"][0], torch.tensor([[0, 0], [1, 1], [2, 2]]))
    assert_same(batch["z"][1][0], torch.tensor([0, 1, 2]))
    assert_same(batch["z"][1][1], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    assert list(batch["a"]) == ["inner", "inner_lengths", "name"]
    assert_same(batch["a"]["inner"], torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 2]]))
    assert_same(batch["a"]["inner_lengths"], torch.tensor([1, 2, 3]))
    assert isinstance(batch["p"], Pair)
    assert_same(batch["p"].left, torch.tensor([[0.0], [1.0], [2.0]]))
    assert batch["p"].right == ["x", "x", "x"]


def test_top_level_tuples_and_lists() -> None:
    out = CachedCollate()([(torch.zeros(2), 1), (torch.ones(2), 2)])
    assert isinstance(out, tuple)
    assert_same(out[0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    out = CachedCollate()([[torch.zeros(1)], [torch.ones(1)]])
    assert isinstance(out, list) and out[0].shape == (2, 1)
    assert CachedCollate()([[], []]) == []
    assert CachedCollate()([{}, {}]) == {}


def test_mapping_types_are_kept() -> None:
    out = CachedCollate()([OrderedDict(x=torch.ones(1)), OrderedDict(x=torch.zeros(1))])
    assert type(out) is OrderedDict and out["x"].shape == (2, 1)
    out = CachedCollate()([UserDict(x=1), UserDict(x=2)])
    assert isinstance(out, UserDict) and out["x"].tolist() == [1, 2]


# -- padding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shapes",
    [
        [(3,), (5,), (1,), (4,)],  # only dim 0 ragged (the raw-copy path)
        [(3, 2), (5, 2), (0, 2)],  # dim 0 ragged with a feature dim, an empty sample
        [(2, 3), (4, 1), (3, 3)],  # both dims ragged
        [(2, 3), (2, 5)],  # only the last dim ragged
    ],
    ids=["dim0", "dim0-features", "2d", "last-dim"],
)
def test_ragged_tensors_are_padded_for_every_dtype(dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> None:
    samples = [make(s, dtype, seed=i) for i, s in enumerate(shapes)]
    pad = 0 if dtype == torch.bool else 7
    out = CachedCollate(pad_value=pad)(samples)
    assert_same(out, reference_pad(samples, pad))


def test_same_numel_different_shapes_are_padded() -> None:
    samples = [torch.ones(3, 4), torch.ones(4, 3) * 2]
    out = CachedCollate(pad_value=-1)(samples)
    assert_same(out, reference_pad(samples, -1))


@pytest.mark.parametrize(
    "variant",
    ["noncontiguous", "neg_view", "conj_view", "requires_grad", "subclass", "storage_offset", "ndarray"],
)
def test_padding_copies_every_kind_of_sample(variant: str) -> None:
    """Each sample kind takes the right copy path (raw copy, numpy view, torch) with equal results."""
    lengths = (3, 6, 2)
    if variant == "noncontiguous":
        samples = [torch.arange(2 * n, dtype=torch.float32)[::2] for n in lengths]
    elif variant == "neg_view":
        samples = [
            torch.complex(torch.zeros(n), torch.arange(n, dtype=torch.float32) + 1).conj().imag
            for n in lengths
        ]
        assert samples[0].is_neg()
    elif variant == "conj_view":
        samples = [torch.complex(torch.ones(n), torch.arange(n, dtype=torch.float32)).conj() for n in lengths]
        assert samples[0].is_conj()
    elif variant == "requires_grad":
        samples = [torch.arange(n, dtype=torch.float32).requires_grad_() for n in lengths]
    elif variant == "subclass":
        samples = [
            torch.nn.Parameter(torch.arange(n, dtype=torch.float32), requires_grad=False) for n in lengths
        ]
    elif variant == "storage_offset":
        base = torch.arange(100, dtype=torch.int64)
        samples = [base[10 * i : 10 * i + n] for i, n in enumerate(lengths)]
    else:
        samples = [np.arange(n, dtype=np.float32) + 1 for n in lengths]
    expected = reference_pad([torch.as_tensor(s).detach().resolve_conj().resolve_neg() for s in samples], 9)
    out = CachedCollate(pad_value=9)(samples)
    assert not out.requires_grad
    assert torch.equal(out, expected)


def test_pad_to_multiple_of_rounds_only_ragged_dims() -> None:
    samples = [torch.ones(3, 6), torch.ones(5, 6)]
    out = CachedCollate(pad_to_multiple_of=4)(samples)
    assert out.shape == (2, 8, 6)  # ragged dim 5 -> 8; the common dim 6 stays
    assert_same(out, reference_pad(samples, 0, multiple=4))
    assert CachedCollate(pad_to_multiple_of=8)([torch.ones(8), torch.ones(3)]).shape == (2, 8)
    # a batch that needs no padding is stacked as is
    assert CachedCollate(pad_to_multiple_of=8)([torch.ones(5), torch.ones(5)]).shape == (2, 5)


def test_lengths_are_added_for_padded_dict_keys() -> None:
    samples = [
        {"ids": torch.arange(n) + 1, "feat": torch.ones(n, 2), "img": torch.ones(3, 4), "label": n}
        for n in (2, 5, 3)
    ]
    batch = CachedCollate(pad_to_multiple_of=8)(samples)
    assert list(batch) == ["ids", "ids_lengths", "feat", "feat_lengths", "img", "label"]
    assert_same(batch["ids_lengths"], torch.tensor([2, 5, 3], dtype=torch.int64))
    assert_same(batch["feat_lengths"], torch.tensor([2, 5, 3], dtype=torch.int64))
    assert batch["ids"].shape == (3, 8) and batch["feat"].shape == (3, 8, 2)
    assert "img_lengths" not in batch  # stacked, not padded
    # lengths are along dim 0, also when another dim is the ragged one
    batch = CachedCollate()([{"wave": torch.ones(1, 4)}, {"wave": torch.ones(1, 6)}])
    assert_same(batch["wave_lengths"], torch.tensor([1, 1]))


def test_existing_lengths_key_is_not_overwritten() -> None:
    samples = [{"ids": torch.arange(n), "ids_lengths": n * 10} for n in (2, 3)]
    batch = CachedCollate()(samples)
    assert_same(batch["ids_lengths"], torch.tensor([20, 30]))


def test_attention_mask_is_padded_with_zero_and_no_lengths_are_added() -> None:
    samples = [
        {
            "input_ids": torch.arange(n) + 1,
            "attention_mask": torch.ones(n, dtype=torch.int64),
            "labels": torch.ones(n),
        }
        for n in (2, 4)
    ]
    for pad_value in (5, {"input_ids": 3, "attention_mask": 9, "labels": -100}):
        batch = CachedCollate(pad_value=pad_value)(samples)
        assert list(batch) == ["input_ids", "attention_mask", "labels"]
        assert_same(batch["attention_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert_same(batch["input_ids"], torch.tensor([[1, 2, 3, 3], [1, 2, 3, 4]]))
    assert_same(batch["labels"], torch.tensor([[1.0, 1.0, -100.0, -100.0], [1, 1, 1, 1]]))


def test_per_key_pad_values() -> None:
    samples = [
        {
            "input_ids": torch.arange(n) + 1,
            "labels": torch.arange(n) + 1,
            "other": torch.ones(n, dtype=torch.int64),
        }
        for n in (1, 3)
    ]
    batch = CachedCollate(pad_value={"input_ids": 50, "labels": -100})(samples)
    assert batch["input_ids"].tolist() == [[1, 50, 50], [1, 2, 3]]
    assert batch["labels"].tolist() == [[1, -100, -100], [1, 2, 3]]
    assert batch["other"].tolist() == [[1, 0, 0], [1, 1, 1]]  # not in the dict: 0
    # the nearest enclosing dict key decides, also through lists/tuples
    nested = [{"text": {"labels": (torch.ones(n),)}} for n in (1, 2)]
    out = CachedCollate(pad_value={"labels": -1})(nested)
    assert out["text"]["labels"][0].tolist() == [[1.0, -1.0], [1.0, 1.0]]
    # outside any dict: 0
    assert CachedCollate(pad_value={"x": 4})([torch.ones(1), torch.ones(2)]).tolist() == [[1, 0], [1, 1]]


@pytest.mark.parametrize(
    ("pad", "dtype", "message"),
    [
        (1.5, torch.int64, r"pad value 1\.5 for \[\"x\"\] is not an integer"),
        (300, torch.uint8, r"outside uint8's range"),
        (2, torch.bool, r"does not fit bool"),
        (1j, torch.float32, r"is complex"),
    ],
)
def test_pad_value_that_the_dtype_cannot_hold_is_an_error(
    pad: float, dtype: torch.dtype, message: str
) -> None:
    samples = [{"x": torch.zeros(n, dtype=dtype)} for n in (1, 2)]
    with pytest.raises(ValueError, match=message):
        CachedCollate(pad_value=pad)(samples)


def test_float_pad_value_for_floats_and_integral_float_for_ints() -> None:
    assert CachedCollate(pad_value=-0.5)([torch.ones(1), torch.ones(2)]).tolist() == [[1, -0.5], [1, 1]]
    assert CachedCollate(pad_value=2.0)(
        [torch.ones(1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)]
    ).tolist() == [
        [1, 2],
        [1, 1],
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    ndim=st.integers(1, 3),
    n=st.integers(1, 6),
    dtype=st.sampled_from(
        [torch.int64, torch.float32, torch.bfloat16, torch.uint8, torch.bool, torch.complex64]
    ),
    multiple=st.sampled_from([None, 1, 3, 8]),
)
def test_padding_matches_reference_for_random_shapes(
    data: st.DataObject, ndim: int, n: int, dtype: torch.dtype, multiple: int | None
) -> None:
    shapes = [tuple(data.draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim))) for _ in range(n)]
    samples = [make(s, dtype, seed=i) for i, s in enumerate(shapes)]
    pad = 0 if dtype == torch.bool else 3
    out = CachedCollate(pad_value=pad, pad_to_multiple_of=multiple)([{"x": s} for s in samples])
    if len(set(shapes)) == 1:
        assert_same(out["x"], torch.stack(samples))
        assert "x_lengths" not in out
    else:
        assert_same(out["x"], reference_pad(samples, pad, multiple))
        assert out["x_lengths"].tolist() == [s[0] for s in shapes]


# -- errors --------------------------------------------------------------------------------------


def test_dtype_mismatch_names_sample_and_key() -> None:
    samples = [{"x": torch.zeros(2, dtype=torch.float32)} for _ in range(3)] + [
        {"x": torch.zeros(2, dtype=torch.float64)}
    ]
    with pytest.raises(
        ValueError, match=r'^sample 3 at \["x"\]: dtype float64 differs from sample 0\'s float32$'
    ):
        CachedCollate()(samples)
    arrays = [np.zeros(2, np.float32), np.zeros(3, np.int16)]
    with pytest.raises(ValueError, match=r"^sample 1: dtype int16 differs from sample 0's float32$"):
        CachedCollate()(arrays)
    with pytest.raises(ValueError, match=r"sample 1: type numpy.int8 differs from sample 0's numpy.int16"):
        CachedCollate()([np.int16(1), np.int8(1)])


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (
            [torch.zeros(2), np.zeros(2)],
            r"^sample 1: type numpy\.ndarray differs from sample 0's torch\.Tensor$",
        ),
        (
            [{"a": [1, 2]}, {"a": [1, 2.0]}],
            r'^sample 1 at \["a"\]\[1\]: type float differs from sample 0\'s int$',
        ),
        ([{"a": 1}, {"a": True}], r'sample 1 at \["a"\]: type bool differs from sample 0\'s int'),
        ([{"a": "x"}, {"a": None}], r'sample 1 at \["a"\]: type NoneType differs from sample 0\'s str'),
        (
            [{"a": torch.ones(1)}, {"a": 1.0}],
            r'sample 1 at \["a"\]: type float differs from sample 0\'s torch\.Tensor',
        ),
        (
            [{"m": {"x": 1, "y": 2}}, {"m": {"x": 1, "z": 2}}],
            r"sample 1 at \[\"m\"\]: keys differ from sample 0's \(missing \['y'\], unexpected \['z'\]\)",
        ),
        (
            [{"x": 1}, {"x": 1, "extra": 2}],
            r"sample 1: keys differ from sample 0's \(missing \[\], unexpected \['extra'\]\)",
        ),
        ([(1, 2), (1, 2), (1,)], r"^sample 2: length 1 differs from sample 0's 2$"),
        (
            [{"x": torch.zeros(3)}, {"x": torch.zeros(3, 1)}],
            r'^sample 1 at \["x"\]: 2 dimensions \(shape \(3, 1\)\) differ from sample 0\'s 1 \(shape \(3,\)\)',
        ),
        ([[torch.zeros(2)], [torch.zeros(2, dtype=torch.int32)]], r"^sample 1 at \[0\]: dtype int32 differs"),
    ],
    ids=[
        "tensor-vs-array",
        "int-vs-float",
        "int-vs-bool",
        "str-vs-none",
        "tensor-vs-float",
        "keys",
        "extra-key",
        "length",
        "ndim",
        "list-path",
    ],
)
def test_mismatched_samples_get_a_clear_error(samples: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CachedCollate()(samples)


def test_empty_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty list of samples"):
        CachedCollate()([])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pad_to_multiple_of": 0}, ValueError, r"pad_to_multiple_of=0\).*positive int"),
        ({"pad_to_multiple_of": -8}, ValueError, r"pad_to_multiple_of=-8"),
        ({"pad_to_multiple_of": 2.5}, ValueError, r"pad_to_multiple_of=2\.5"),
        ({"pad_to_multiple_of": True}, ValueError, r"pad_to_multiple_of=True"),
        ({"pad_value": "0"}, TypeError, r"pad_value='0'\): expected a number"),
        ({"pad_value": None}, TypeError, r"pad_value=None"),
        ({"pad_value": {"ids": "x"}}, TypeError, r"pad value for key 'ids' is 'x'"),
        ({"device": "gpu:0"}, ValueError, r"device='gpu:0'\): not a device"),
        ({"device": 1.5}, ValueError, r"device=1\.5"),
        ({"pin_memory": "yes"}, TypeError, r"pin_memory='yes'"),
        ({"non_blocking": None}, TypeError, r"non_blocking=None"),
    ],
)
def test_constructor_validates_options(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        CachedCollate(**kwargs)


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        CachedCollate(0)  # type: ignore[misc]


def test_repr_and_pickle_roundtrip() -> None:
    collate = CachedCollate(pad_value={"ids": 1}, pad_to_multiple_of=8, device="cpu", pin_memory=False)
    clone = pickle.loads(pickle.dumps(collate))
    assert repr(clone) == repr(collate)
    assert "pad_to_multiple_of=8" in repr(collate) and "device='cpu'" in repr(collate)
    samples = [{"ids": torch.arange(n)} for n in (1, 4)]
    assert_same(clone(samples), collate(samples))


# -- where outputs are written --------------------------------------------------------------------


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


class TokenDataset(Dataset):
    """Ragged token ids, fixed-size features, numbers and strings: every kind of output."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = 3 + (i * 7) % 11
        return {
            "input_ids": torch.arange(n, dtype=torch.int64) + i,
            "feat": torch.full((4,), float(i)),
            "label": i % 3,
            "weight": i / 10,
            "id": f"item{i}",
            "pair": (np.arange(2, dtype=np.float32) + i, np.int32(i)),
        }


class RecordingCollate:
    """Runs CachedCollate and records, where it ran, whether each output tensor is in shared memory."""

    def __init__(self, inner: CachedCollate) -> None:
        self.inner = inner

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        batch = self.inner(samples)
        info = torch.utils.data.get_worker_info()
        batch["_in_worker"] = info is not None
        batch["_all_shared"] = all(t.is_shared() for t in _tensors(batch))
        return batch


def _strip(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_path_writes_into_shared_memory(context: str) -> None:
    collate = CachedCollate(pad_value={"input_ids": -1}, pad_to_multiple_of=4)
    dataset = TokenDataset()
    expected = list(DataLoader(dataset, batch_size=5, collate_fn=collate))
    loader = DataLoader(
        dataset,
        batch_size=5,
        num_workers=2,
        collate_fn=RecordingCollate(collate),
        multiprocessing_context=context,
    )
    batches = list(loader)
    assert len(batches) == len(expected) == 5
    for got, want in zip(batches, expected):
        assert got["_in_worker"] is True
        assert got["_all_shared"] is True  # every output tensor was allocated in shared memory
        assert_same(_strip(got), want)
    assert batches[0]["input_ids"].shape[1] % 4 == 0
    assert batches[0]["input_ids_lengths"].tolist() == [3, 10, 6, 13, 9]


def test_main_process_path_uses_ordinary_memory() -> None:
    loader = DataLoader(TokenDataset(), batch_size=6, collate_fn=RecordingCollate(CachedCollate()))
    for batch in loader:
        assert batch["_in_worker"] is False
        assert not any(t.is_shared() or t.is_pinned() for t in _tensors(_strip(batch)))
        assert all(t.device.type == "cpu" for t in _tensors(batch))


def test_worker_path_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same decision without processes: every output kind (stacked, padded, numbers, lengths) is shared."""
    monkeypatch.setattr(placement_module, "get_worker_info", lambda: object())
    samples = [TokenDataset()[i] for i in range(4)]
    batch = CachedCollate(device="cuda")(samples)  # a CUDA target is ignored inside a worker
    tensors = _tensors(batch)
    assert len(tensors) == 7 and all(t.is_shared() and t.device.type == "cpu" for t in tensors)
    monkeypatch.undo()
    assert_same(batch, CachedCollate()(samples))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize(
    "kwargs", [{"device": "cuda"}, {"device": "cuda:0", "pin_memory": True}, {"pin_memory": True}]
)
def test_without_cuda_batches_stay_on_cpu_silently(
    kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    samples = [{"ids": torch.arange(n)} for n in (1, 3)]
    with caplog.at_level("WARNING", logger="cachedata"):
        batch = CachedCollate(**kwargs)(samples)
    assert not caplog.records
    assert all(t.device.type == "cpu" and not t.is_pinned() for t in _tensors(batch))
    assert_same(batch, CachedCollate()(samples))


def test_device_cpu_keeps_batches_on_cpu() -> None:
    batch = CachedCollate(device="cpu")([torch.ones(2), torch.ones(3)])
    assert batch.device.type == "cpu" and not batch.is_pinned()


# -- fast paths and the worker's shared segment ----------------------------------------------------


def _as_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement_module, "get_worker_info", lambda: object())


def _general_paths_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the dict fast paths off: every column goes through _collate / array_leaf."""
    monkeypatch.setattr(collate_module, "stack_plain", lambda batch, n, shared: None)
    monkeypatch.setattr(collate_module, "_SCALAR_DTYPES", {})


def mixed_samples(n: int = 6) -> list[dict[str, Any]]:
    """Every kind of column a dict sample can hold, small and large."""
    return [
        {
            "feat": make((4,), torch.float32, seed=i),
            "img": make((2, 3), torch.uint8, seed=i),
            "half": make((3,), torch.bfloat16, seed=i),
            "cplx": make((2,), torch.complex64, seed=i),
            "mask": torch.ones(5, dtype=torch.bool),
            "ids": torch.arange(1 + i % 3) + 1,  # ragged: padded, with ids_lengths
            "big": make((20_000,), torch.float32, seed=i),  # 80 KB a sample: its own segment
            "param": torch.nn.Parameter(torch.ones(2) * i, requires_grad=False),  # a subclass
            "grad": torch.ones(3).requires_grad_(),
            "label": i % 3,
            "weight": i / 4,
            "flag": i % 2 == 0,
            "z": complex(i, 1),
            "name": f"s{i}",
            "raw": bytes([i]),
            "none": None,
            "np": np.arange(3, dtype=np.float32) + i,
            "np_scalar": np.int16(i),
            "nested": {"t": torch.full((2,), float(i)), "pair": [i, float(i)]},
            "tup": (torch.ones(1) * i, "x"),
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("where", ["main", "worker"])
def test_fast_paths_give_the_general_paths_results(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = mixed_samples()
    collate = CachedCollate(pad_value={"ids": -1})
    reference = collate(samples)  # main process, fast paths on
    if where == "worker":
        _as_worker(monkeypatch)
    fast = collate(samples)
    _general_paths_only(monkeypatch)
    general = collate(samples)
    assert_same(fast, general)
    assert_same(fast, reference)
    assert list(fast) == [*list(samples[0])[:6], "ids_lengths", *list(samples[0])[6:]]
    assert not fast["grad"].requires_grad
    if where == "worker":
        assert all(t.is_shared() for t in _tensors(fast))


def test_worker_small_outputs_share_one_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = mixed_samples()
    expected = CachedCollate()(samples)
    _as_worker(monkeypatch)
    batch = CachedCollate()(samples)
    assert_same(batch, expected)
    tensors = _tensors(batch)
    assert all(t.is_shared() for t in tensors)
    small = [t for t in tensors if t.nbytes <= 64 * 1024]
    big = [t for t in tensors if t.nbytes > 64 * 1024]
    assert len(small) == len(tensors) - 1 and [t.shape for t in big] == [(6, 20_000)]
    segment = small[0].untyped_storage()
    base = segment.data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in small)
    assert big[0].untyped_storage().data_ptr() != base
    # each output in its own aligned slice: no overlap, so writing one changes no other
    spans = sorted((t.data_ptr() - base, t.data_ptr() - base + t.nbytes) for t in small)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))
    assert spans[-1][1] <= segment.nbytes()
    batch["label"].fill_(7)
    assert_same(batch["feat"], expected["feat"])
    assert_same(batch["weight"], expected["weight"])


def test_share_together_keeps_identity_shape_and_values() -> None:
    tensors = [
        torch.arange(5, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.arange(6, dtype=torch.float64).reshape(2, 3).t(),  # non-contiguous
        torch.empty(0, 4),
        torch.tensor([1 + 2j], dtype=torch.complex128),
        torch.tensor(2.5),  # zero-dim
    ]
    expected = [t.clone() for t in tensors]
    ids = [id(t) for t in tensors]
    placement_module.share_together(tensors)
    assert [id(t) for t in tensors] == ids
    for got, want in zip(tensors, expected):
        assert got.is_shared() and got.is_contiguous()
        assert_same(got, want)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1


@pytest.mark.parametrize("where", ["main", "worker"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        # a lower dtype: torch.stack would promote it silently, so it must be caught per sample
        ({"feat": torch.zeros(4, dtype=torch.int32)}, r"dtype int32 differs from sample 0's float32$"),
        ({"feat": torch.zeros(4, dtype=torch.float64)}, r"dtype float64 differs from sample 0's float32$"),
        ({"feat": torch.zeros(4, 1)}, r"2 dimensions \(shape \(4, 1\)\) differ from sample 0's 1"),
        ({"feat": np.zeros(4, np.float32)}, r"type numpy\.ndarray differs from sample 0's torch\.Tensor$"),
        ({"feat": 1.0}, r"type float differs from sample 0's torch\.Tensor$"),
        ({"label": True}, r"type bool differs from sample 0's int$"),
        ({"label": 1.5}, r"type float differs from sample 0's int$"),
        ({"w": 1}, r"type int differs from sample 0's float$"),
        ({"name": None}, r"type NoneType differs from sample 0's str$"),
    ],
    ids=["lower-dtype", "higher-dtype", "ndim", "array", "float", "bool", "int-float", "float-int", "none"],
)
def test_mismatch_in_a_dict_names_position_and_key_path(
    where: str, change: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [{"m": {"feat": torch.ones(4), "label": 1, "w": 0.5, "name": "a"}} for _ in range(8)]
    samples[5]["m"].update(change)
    if where == "worker":
        _as_worker(monkeypatch)
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf'^sample 5 at \["m"\]\["{key}"\]: {message}'):
        CachedCollate()(samples)


@pytest.mark.parametrize("where", ["main", "worker"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(extra=1), r"missing \[\], unexpected \['extra'\]"),
        (lambda d: d.pop("label"), r"missing \['label'\], unexpected \[\]"),
        (lambda d: d.update(lab=d.pop("label")), r"missing \['label'\], unexpected \['lab'\]"),
    ],
    ids=["extra", "missing", "renamed"],
)
def test_key_mismatch_in_a_dict_names_position_and_path(
    where: str, change: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [{"m": {"feat": torch.ones(4), "label": 1}} for _ in range(8)]
    change(samples[6]["m"])
    if where == "worker":
        _as_worker(monkeypatch)
    with pytest.raises(
        ValueError, match=rf"^sample 6 at \[\"m\"\]: keys differ from sample 0's \({message}\)"
    ):
        CachedCollate()(samples)


@pytest.mark.parametrize("where", ["main", "worker"])
def test_ragged_in_the_middle_still_pads(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """First and last samples agree in shape (the fast path's guess), a middle one does not."""
    samples = [{"x": torch.ones(n), "y": i} for i, n in enumerate((3, 5, 3))]
    if where == "worker":
        _as_worker(monkeypatch)
    batch = CachedCollate(pad_value=-1)(samples)
    assert_same(batch["x"], torch.tensor([[1.0, 1, 1, -1, -1], [1, 1, 1, 1, 1], [1, 1, 1, -1, -1]]))
    assert_same(batch["x_lengths"], torch.tensor([3, 5, 3]))
    assert_same(batch["y"], torch.tensor([0, 1, 2]))


def test_grad_mode_is_restored() -> None:
    samples = [{"x": torch.ones(2).requires_grad_(), "y": 1} for _ in range(3)]
    with torch.enable_grad():
        assert not CachedCollate()(samples)["x"].requires_grad
        assert torch.is_grad_enabled()
        with pytest.raises(ValueError):
            CachedCollate()([*samples, {"x": torch.ones(2), "y": 1.5}])
        assert torch.is_grad_enabled()
    with torch.no_grad():
        CachedCollate()(samples)
        assert not torch.is_grad_enabled()


# -- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@cuda
def test_cuda_pin_memory_without_device_gives_pinned_cpu_batches() -> None:
    samples = [{"ids": torch.arange(n), "img": torch.ones(3, 4), "label": n} for n in (2, 5)]
    batch = CachedCollate(pin_memory=True)(samples)
    tensors = _tensors(batch)
    assert tensors and all(t.is_pinned() and t.device.type == "cpu" for t in tensors)
    assert_same(batch, CachedCollate()(samples))


@pytest.mark.cuda
@cuda
def test_cuda_device_collates_into_pinned_memory_then_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    pinned_before_copy: list[bool] = []
    copies: list[bool] = []
    send = CachedCollate._send

    def spy(out: torch.Tensor, call: Any) -> torch.Tensor:
        pinned_before_copy.append(out.is_pinned())
        copies.append(call.non_blocking)
        return send(out, call)

    monkeypatch.setattr(CachedCollate, "_send", staticmethod(spy))
    samples = [{"ids": torch.arange(n) + 1, "img": torch.rand(3, 8, 8), "label": n} for n in (2, 7, 4)]
    batch = CachedCollate(device="cuda", pad_value={"ids": -1})(samples)
    torch.cuda.synchronize()
    assert pinned_before_copy and all(pinned_before_copy) and all(copies)
    assert all(t.is_cuda for t in _tensors(batch))
    monkeypatch.undo()
    expected = CachedCollate(pad_value={"ids": -1})(samples)
    for key in ("ids", "ids_lengths", "img", "label"):
        assert torch.equal(batch[key].cpu(), expected[key])


@pytest.mark.cuda
@cuda
def test_cuda_pin_memory_false_still_copies_to_device() -> None:
    batch = CachedCollate(device="cuda", pin_memory=False, non_blocking=False)([torch.ones(2), torch.ones(3)])
    assert batch.is_cuda and batch.cpu().tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.cuda
@cuda
def test_cuda_samples_already_on_device_are_collated_there() -> None:
    samples = [torch.arange(n, device="cuda") for n in (2, 3)]
    out = CachedCollate(pad_value=-1)(samples)
    assert out.is_cuda and out.cpu().tolist() == [[0, 1, -1], [0, 1, 2]]
    out = CachedCollate()([torch.ones(2, device="cuda")] * 3)
    assert out.is_cuda and out.shape == (3, 2)
    with pytest.raises(ValueError, match=r"sample 1: device cpu differs from sample 0's cuda:0"):
        CachedCollate()([torch.ones(2, device="cuda"), torch.ones(3)])


# -- collate_fn_map: teaching CachedCollate a type ---------------------------------------------------


class Box:
    """A user type CachedCollate has no rule for: kept a list unless collate_fn_map knows it."""

    def __init__(self, ids: torch.Tensor, score: float) -> None:
        self.ids = ids
        self.score = score


class RotatedBox(Box):
    pass


class Boxes(NamedTuple):
    ids: torch.Tensor
    scores: torch.Tensor


def collate_boxes(batch: list[Box], *, collate_fn_map: dict[Any, Any]) -> Boxes:
    """torch's collate_fn_map signature; the parts go back through CachedCollate's own rules."""
    rest = collate_fn_map[object]
    return Boxes(rest([b.ids for b in batch]), rest([b.score for b in batch]))


def boxes(n: int = 3) -> list[dict[str, Any]]:
    return [{"box": Box(torch.arange(1 + i) + 1, i / 2), "label": i} for i in range(n)]


def test_collate_fn_map_teaches_a_type_and_its_parts_are_padded() -> None:
    plain = CachedCollate()(boxes())
    assert all(isinstance(b, Box) for b in plain["box"])  # without the map: a list, like str
    batch = CachedCollate(pad_value={"box": -1}, collate_fn_map={Box: collate_boxes})(boxes())
    assert list(batch) == ["box", "label"]  # a function's output gets no "_lengths" key
    assert isinstance(batch["box"], Boxes)
    assert batch["box"].ids.tolist() == [[1, -1, -1], [1, 2, -1], [1, 2, 3]]  # the key's pad value
    assert_same(batch["box"].scores, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert_same(batch["label"], torch.tensor([0, 1, 2]))


def test_collate_fn_map_resolves_types_like_torch() -> None:
    calls: list[str] = []

    def tagged(tag: str):
        def fn(batch: list[Any], *, collate_fn_map: dict[Any, Any]) -> str:
            calls.append(tag)
            return tag

        return fn

    samples = [{"box": RotatedBox(torch.ones(1), 0.0), "n": 1, "pt": Pair(1, 2), "t": torch.ones(2)}] * 2
    collate = CachedCollate(
        collate_fn_map={numbers.Number: tagged("number"), Box: tagged("box"), tuple: tagged("tuple")}
    )
    batch = collate(samples)
    # a subclass of an entry is taken by it, in the map's order; a namedtuple is a tuple
    assert batch["box"] == "box" and batch["pt"] == "tuple"
    # built-in leaf types are taken over only by an entry for their exact type, as in torch
    assert_same(batch["n"], torch.tensor([1, 1]))
    assert_same(batch["t"], torch.ones(2, 2))
    exact = CachedCollate(collate_fn_map={int: tagged("int"), torch.Tensor: tagged("tensor")})(samples)
    assert exact["n"] == "int" and exact["t"] == "tensor"
    assert "number" not in calls


def test_collate_fn_map_entry_for_mapping_takes_over_the_samples() -> None:
    def keys_only(batch: list[dict[str, Any]], *, collate_fn_map: dict[Any, Any]) -> list[list[str]]:
        return [sorted(d) for d in batch]

    assert CachedCollate(collate_fn_map={dict: keys_only})([{"b": 1, "a": 2}]) == [["a", "b"]]


def test_collate_fn_map_errors_name_the_function_and_place() -> None:
    def broken(batch: list[Box], *, collate_fn_map: dict[Any, Any]) -> None:
        raise RuntimeError("no boxes today")

    with pytest.raises(RuntimeError, match="no boxes today") as info:
        CachedCollate(collate_fn_map={Box: broken})(boxes())
    if sys.version_info >= (3, 11):  # Exception.add_note; on 3.10 the error goes on unannotated
        assert 'collate_fn_map function for test_collate.Box at ["box"]' in "\n".join(info.value.__notes__)


@pytest.mark.parametrize(
    ("fn_map", "message"),
    [
        ([(Box, collate_boxes)], r"collate_fn_map=\[.*\]\): expected a dict mapping types to functions"),
        ({"Box": collate_boxes}, r"key 'Box' is not a type or a tuple of types"),
        ({(): collate_boxes}, r"key \(\) is not a type"),
        ({Box: "collate_boxes"}, r"the value for <class .*Box'> is 'collate_boxes', which is not callable"),
    ],
)
def test_collate_fn_map_is_validated(fn_map: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        CachedCollate(collate_fn_map=fn_map)


def test_collate_fn_map_pickles_and_shows_in_repr() -> None:
    collate = CachedCollate(collate_fn_map={(Box, RotatedBox): collate_boxes})
    assert "collate_fn_map={(<class 'test_collate.Box'>" in repr(collate)
    assert "collate_fn_map" not in repr(CachedCollate())
    clone = pickle.loads(pickle.dumps(collate))
    assert_same(clone(boxes()), collate(boxes()))


class BoxDataset(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"box": Box(torch.arange(1 + i % 3), float(i)), "label": i}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_collate_fn_map_in_workers(context: str) -> None:
    collate = CachedCollate(collate_fn_map={Box: collate_boxes})
    expected = list(DataLoader(BoxDataset(), batch_size=3, collate_fn=collate))
    got = list(
        DataLoader(
            BoxDataset(), batch_size=3, collate_fn=collate, num_workers=2, multiprocessing_context=context
        )
    )
    assert len(got) == 2
    for a, b in zip(got, expected, strict=True):
        assert isinstance(a["box"], Boxes)
        assert_same(a, b)


# -- recycled outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [0, -0.0, 3], ids=["zero", "negative-zero", "three"])
def test_large_padded_outputs_reuse_memory_without_stale_bytes(pad: float) -> None:
    """Outputs of 64 KiB and more come from cachedata.buffers' recycled memory. A zero pad is
    written per row (memset of each tail) instead of a fill of the whole output, so a reused
    buffer must not show the previous batch's bytes in the padding."""
    collate = CachedCollate(pad_value=pad)
    long = [torch.full((41_111,), 9.0), torch.full((30_000,), 8.0)]  # 329 KB (a size class of its own)
    first = collate(long)
    first_ptr = first.data_ptr()
    del first  # idle now: the next batch of the same size may get its memory
    short = [torch.full((41_111,), 1.0), torch.full((5,), 2.0)]
    second = collate(short)
    assert second.data_ptr() == first_ptr, "the first batch's buffer is reused"
    assert_same(second, reference_pad(short, pad))
    negative_zero = str(pad) == "-0.0"
    assert torch.equal(torch.signbit(second[1, 5:]), torch.full((41_106,), negative_zero))


def test_a_batch_still_held_is_never_overwritten() -> None:
    collate = CachedCollate()
    images = [torch.full((3, 128, 128), float(i)) for i in range(8)]  # 1.5 MB: stacked into a recycled buffer
    held = collate(images)
    view = collate([torch.ones(40_000), torch.ones(3)])[1]  # only a view of this batch survives
    expected_held, expected_view = held.clone(), view.clone()
    for _ in range(4):
        collate([torch.full((3, 128, 128), -1.0)] * 8)
        collate([torch.full((40_000,), -1.0), torch.ones(3)])
    assert_same(held, expected_held)
    assert_same(view, expected_view)
