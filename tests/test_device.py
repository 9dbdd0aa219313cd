"""DeviceLoader: CPU pass-through, len/iteration, validation, and (with CUDA) stream-ordered prefetch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cachedata.collate import CachedCollate
from cachedata.device import DeviceLoader

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Pair(NamedTuple):
    left: Any
    right: Any


def nested_batches(count: int = 5, size: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "x": torch.full((size, 3), float(i)),
            "ids": [torch.arange(size) + i, (torch.ones(2, dtype=torch.bool), "tag")],
            "pair": Pair(torch.tensor([i]), i),
            "name": f"batch{i}",
            "n": None,
        }
        for i in range(count)
    ]


class Squares(Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ids": torch.arange(1 + i % 5) * i, "y": i * i}


# -- CPU -----------------------------------------------------------------------------------------


def test_cpu_is_a_pass_through() -> None:
    batches = nested_batches()
    out = list(DeviceLoader(batches, "cpu"))
    assert len(out) == len(batches)
    assert all(got is want for got, want in zip(out, batches))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_cuda_is_a_pass_through(device: Any) -> None:
    batches = nested_batches()
    out = list(DeviceLoader(batches, device, prefetch=3))
    assert all(got is want for got, want in zip(out, batches, strict=True))


def test_len_equals_the_loaders() -> None:
    assert len(DeviceLoader(nested_batches(7), "cpu")) == 7
    loader = DataLoader(Squares(), batch_size=6)
    assert len(DeviceLoader(loader, "cuda")) == len(loader) == 4


def test_len_without_loader_len_is_a_type_error() -> None:
    generator = (b for b in nested_batches())
    with pytest.raises(TypeError, match=r"DeviceLoader has no len\(\): the wrapped generator has none"):
        len(DeviceLoader(generator, "cpu"))


def test_each_iter_starts_a_new_pass() -> None:
    loader = DataLoader(Squares(), batch_size=5, collate_fn=CachedCollate())
    wrapped = DeviceLoader(loader, "cpu")
    first = [b["y"].tolist() for b in wrapped]
    second = [b["y"].tolist() for b in wrapped]
    assert first == second and len(first) == 4
    # two live iterators are independent
    a, b = iter(wrapped), iter(wrapped)
    assert next(a)["y"].tolist() == next(b)["y"].tolist() == first[0]


@pytest.mark.parametrize(
    ("prefetch", "error", "message"),
    [
        (0, ValueError, r"prefetch=0\): expected an int >= 1"),
        (-2, ValueError, r"prefetch=-2"),
        (1.5, TypeError, r"prefetch=1\.5\): expected an int"),
        (True, TypeError, r"prefetch=True"),
    ],
)
def test_prefetch_is_validated(prefetch: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        DeviceLoader([], "cpu", prefetch=prefetch)


def test_device_is_validated() -> None:
    with pytest.raises(ValueError, match=r"device='gpu'\): not a device"):
        DeviceLoader([], "gpu")


def test_prefetch_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        DeviceLoader([], "cpu", 2)  # type: ignore[misc]


def test_other_devices_get_a_plain_copy_keeping_the_structure() -> None:
    """A non-CUDA accelerator (the meta device stands in) gets .to(device); non-tensors are kept."""
    batches = nested_batches(2)
    out = list(DeviceLoader(batches, "meta"))
    for got, want in zip(out, batches, strict=True):
        assert list(got) == list(want)
        assert got["x"].device.type == "meta" and got["x"].shape == want["x"].shape
        assert isinstance(got["ids"], list) and isinstance(got["ids"][1], tuple)
        assert got["ids"][1][0].device.type == "meta" and got["ids"][1][1] == "tag"
        assert isinstance(got["pair"], Pair) and got["pair"].right == want["pair"].right
        assert got["name"] == want["name"] and got["n"] is None


@pytest.mark.timeout(120)
def test_with_dataloader_workers_on_cpu() -> None:
    loader = DataLoader(Squares(), batch_size=4, num_workers=2, collate_fn=CachedCollate(pad_value=-1))
    batches = list(DeviceLoader(loader, "cpu"))
    assert len(batches) == 5
    assert torch.equal(batches[0]["y"], torch.tensor([0, 1, 4, 9]))
    assert batches[0]["ids"].tolist() == [[0, -1, -1, -1], [0, 1, -1, -1], [0, 2, 4, -1], [0, 3, 6, 9]]


# -- CUDA -----------------------------------------------------------------------------------------


def _assert_moved(got: Any, want: Any, device: torch.device) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.device == device
        assert torch.equal(got.cpu(), want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_moved(got[k], want[k], device)
    elif isinstance(want, (list, tuple)):
        for g, w in zip(got, want, strict=True):
            _assert_moved(g, w, device)
    else:
        assert got == want


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("prefetch", [1, 2, 4])
def test_cuda_values_equal_after_transfer(prefetch: int) -> None:
    batches = nested_batches(6)
    device = torch.device("cuda", torch.cuda.current_device())
    out = list(DeviceLoader(batches, "cuda", prefetch=prefetch))
    torch.cuda.synchronize()
    assert len(out) == 6
    for got, want in zip(out, batches, strict=True):
        _assert_moved(got, want, device)


@pytest.mark.cuda
@cuda
def test_cuda_copies_on_a_side_stream_and_orders_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[tuple[Any, Any]] = []
    recorded: list[Any] = []
    pins: list[bool] = []
    wait_stream = torch.cuda.Stream.wait_stream
    record_stream = torch.Tensor.record_stream
    pin_memory = torch.Tensor.pin_memory
    to = torch.Tensor.to
    copy_streams: list[Any] = []
    non_blocking: list[bool] = []

    def spy_wait(self: Any, stream: Any) -> None:
        waits.append((self, stream))
        wait_stream(self, stream)

    def spy_record(self: torch.Tensor, stream: Any) -> None:
        recorded.append(stream)
        record_stream(self, stream)

    def spy_pin(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pins.append(True)
        return pin_memory(self, *args, **kwargs)

    def spy_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        copy_streams.append(torch.cuda.current_stream())
        non_blocking.append(kwargs.get("non_blocking", False))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.Stream, "wait_stream", spy_wait)
    monkeypatch.setattr(torch.Tensor, "record_stream", spy_record)
    monkeypatch.setattr(torch.Tensor, "pin_memory", spy_pin)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    consumer = torch.cuda.current_stream()
    batches = [{"a": torch.rand(256, 256), "b": torch.rand(8).pin_memory()} for _ in range(3)]
    pins.clear()
    for batch in DeviceLoader(batches, "cuda", prefetch=2):
        assert torch.cuda.current_stream() == consumer  # the consumer's stream is left alone
        assert batch["a"].is_cuda and batch["b"].is_cuda
    assert len(pins) == 3  # only the pageable "a" tensors were pinned
    assert all(non_blocking) and len(non_blocking) == 6
    assert all(s != consumer for s in copy_streams)  # copies ran on side streams
    assert len(waits) == 3 and all(w[0] == consumer and w[1] != consumer for w in waits)
    assert len(recorded) == 6 and all(r == consumer for r in recorded)


@pytest.mark.cuda
@cuda
def test_cuda_stream_ordering_under_load() -> None:
    """Big copies racing consumer kernels: results are right only if the consumer waits for the copy."""
    batches = [torch.full((4096, 1024), i, dtype=torch.int64) for i in range(8)]
    sums = []
    for batch in DeviceLoader(batches, "cuda", prefetch=3):
        # queue work on the consumer stream that reads the batch at once, then free it
        sums.append((batch * 2).sum())
        del batch
    torch.cuda.synchronize()
    assert [s.item() for s in sums] == [2 * i * 4096 * 1024 for i in range(8)]


@pytest.mark.cuda
@cuda
def test_cuda_len_iterate_twice_and_device_tensors_untouched() -> None:
    on_device = torch.ones(3, device="cuda")
    batches = [{"x": on_device, "y": torch.zeros(2)}]
    wrapped = DeviceLoader(batches, "cuda")
    assert len(wrapped) == 1
    for _ in range(2):
        (batch,) = list(wrapped)
        assert batch["x"] is on_device and batch["y"].is_cuda


@pytest.mark.cuda
@cuda
@pytest.mark.timeout(120)
def test_cuda_with_workers_and_cached_collate() -> None:
    loader = DataLoader(Squares(), batch_size=4, num_workers=2, collate_fn=CachedCollate(device="cuda"))
    reference = list(DataLoader(Squares(), batch_size=4, collate_fn=CachedCollate()))
    out = list(DeviceLoader(loader, "cuda", prefetch=2))
    assert len(out) == len(reference) == 5
    for got, want in zip(out, reference, strict=True):
        for key in want:
            assert got[key].is_cuda and torch.equal(got[key].cpu(), want[key])


def _count(n: int) -> Iterator[torch.Tensor]:
    for i in range(n):
        yield torch.tensor([i])


@pytest.mark.cuda
@cuda
def test_cuda_early_break_and_generators() -> None:
    wrapped = DeviceLoader(_count(10), "cuda", prefetch=4)
    first = []
    for batch in wrapped:
        first.append(batch.item())
        if len(first) == 2:
            break
    assert first == [0, 1]


class Failing:
    """Yields two batches, then raises."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield torch.zeros(1)
        yield torch.ones(1)
        raise RuntimeError("loader broke")


@pytest.mark.cuda
@cuda
def test_cuda_loader_error_comes_after_the_good_batches() -> None:
    got = []
    with pytest.raises(RuntimeError, match="loader broke"):
        for batch in DeviceLoader(Failing(), "cuda", prefetch=3):
            got.append(batch.item())
    assert got == [0.0, 1.0]


def test_cpu_loader_error_propagates() -> None:
    with pytest.raises(RuntimeError, match="loader broke"):
        list(DeviceLoader(Failing(), "cpu"))
