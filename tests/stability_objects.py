"""Transforms of every common shape, for the fingerprint stability tests.

Importable by spawned processes. Run as a script it prints, as JSON, the fingerprints of
every object before anything else touched their classes ("before") and after pickling
with every protocol, copying, isinstance checks and use ("after").
"""

from __future__ import annotations

import abc
import collections.abc
import copy
import dataclasses
import functools
import json
import pickle
import sys
from typing import Any, Protocol, runtime_checkable

import torch


@dataclasses.dataclass
class Scale:
    factor: float = 2.0
    offsets: list[int] = dataclasses.field(default_factory=lambda: [1, 2])

    def __call__(self, x: Any) -> Any:
        return x * self.factor


@dataclasses.dataclass(frozen=True)
class FrozenScale:
    factor: float = 3.0

    def __call__(self, x: Any) -> Any:
        return x * self.factor


@dataclasses.dataclass(frozen=True, slots=True)
class SlottedScale:
    factor: float = 4.0

    def __call__(self, x: Any) -> Any:
        return x * self.factor


class Plain:
    def __init__(self, factor: float = 5.0) -> None:
        self.factor = factor

    def __call__(self, x: Any) -> Any:
        return x * self.factor


class Slots:
    __slots__ = ("factor", "name")

    def __init__(self, factor: float = 6.0) -> None:
        self.factor = factor
        self.name = "slots"

    def __call__(self, x: Any) -> Any:
        return x * self.factor


class Base(abc.ABC):
    @abc.abstractmethod
    def __call__(self, x: Any) -> Any: ...


class FromABC(Base):
    def __init__(self, factor: float = 7.0) -> None:
        self.factor = factor

    def __call__(self, x: Any) -> Any:
        return x * self.factor


@runtime_checkable
class Transform(Protocol):
    def __call__(self, x: Any) -> Any: ...


class FromProtocol(Transform):
    def __init__(self, factor: float = 8.0) -> None:
        self.factor = factor

    def __call__(self, x: Any) -> Any:
        return x * self.factor


class Cached:
    """Uses functools caches: their contents are never part of the fingerprint."""

    def __init__(self, factor: float = 9.0) -> None:
        self.factor = factor

    @functools.cached_property
    def double(self) -> float:
        return self.factor * 2

    @functools.lru_cache(maxsize=8)  # noqa: B019  (the test wants a cache on the class)
    def table(self, n: int) -> list[float]:
        return [self.factor * i for i in range(n)]

    def __call__(self, x: Any) -> Any:
        return x * self.double + self.table(3)[1]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.LayerNorm(8))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _corpus() -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [" ".join(words[(i * k) % len(words)] + str(k % 5) for k in range(12)) for i in range(200)]


def tokenizer(vocab_size: int = 120) -> Any:
    """A BPE tokenizer trained on generated text (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def build() -> dict[str, Any]:
    """One object of every kind the stability guarantee covers."""
    import torchvision.transforms as T1
    import torchvision.transforms.v2 as T2

    from cachedata.transforms import Tokenize

    tok = tokenizer()
    padded = tokenizer()
    padded.enable_padding(pad_token="[PAD]", length=16)
    net = Net().eval()
    return {
        "dataclass": Scale(),
        "frozen_dataclass": FrozenScale(),
        "slots_dataclass": SlottedScale(),
        "plain": Plain(),
        "slots": Slots(),
        "abc": FromABC(),
        "protocol": FromProtocol(),
        "cached": Cached(),
        "module": net,
        "tv1": T1.Compose(
            [T1.Resize(24, antialias=True), T1.CenterCrop(20), T1.Normalize([0.5] * 3, [0.2] * 3)]
        ),
        "tv2": T2.Compose(
            [
                T2.Resize(24, antialias=True),
                T2.CenterCrop(20),
                T2.ToDtype(torch.float32, scale=True),
                T2.Normalize([0.5] * 3, [0.2] * 3),
            ]
        ),
        "tokenizer": tok,
        "padded_tokenizer": padded,
        "Tokenize": Tokenize(tok, max_length=8),
        "classes": [Scale, Plain, Slots, FromABC, FromProtocol, Cached, Net],
    }


def use(objs: dict[str, Any]) -> None:
    """Apply every object the way a data pipeline would."""
    for name in (
        "dataclass",
        "frozen_dataclass",
        "slots_dataclass",
        "plain",
        "slots",
        "abc",
        "protocol",
        "cached",
    ):
        objs[name](torch.ones(3))
    with torch.no_grad():
        objs["module"](torch.ones(5, 4))
    image = torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8)
    objs["tv1"](image.float() / 255)
    objs["tv2"](image)
    text = ["alpha1 beta2 gamma3", "delta4 epsilon0 zeta1 eta2", "theta3"]
    objs["tokenizer"].encode_batch(text)
    objs["padded_tokenizer"].encode_batch(text)
    objs["Tokenize"].batch(text)
    objs["Tokenize"](text[0])


def disturb(objs: dict[str, Any]) -> list[Any]:
    """Pickle (every protocol), copy, type-check and use every object; return the copies."""
    copies: list[Any] = []
    for obj in objs.values():
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            try:
                copies.append(pickle.loads(pickle.dumps(obj, protocol=protocol)))
            except TypeError:
                # Protocols 0 and 1 refuse __slots__ classes without __getstate__ (by design).
                assert protocol < 2, f"{obj!r} cannot be pickled with protocol {protocol}"
                copies.append(obj)
        copies.append(copy.deepcopy(obj))
        copies.append(copy.copy(obj))
        for abc_type in (
            collections.abc.Callable,
            collections.abc.Hashable,
            collections.abc.Sized,
            collections.abc.Iterable,
            Base,
            Transform,
        ):
            isinstance(obj, abc_type)
            isinstance(copies[-1], abc_type)
    use(objs)
    return copies


def fingerprints(objs: dict[str, Any]) -> dict[str, str]:
    from cachedata.fingerprint import fingerprint

    return {name: fingerprint(obj) for name, obj in objs.items()}


def main() -> None:
    objs = build()
    before = fingerprints(objs)
    copies = disturb(objs)
    after = fingerprints(objs)
    from cachedata.fingerprint import fingerprint

    n = pickle.HIGHEST_PROTOCOL + 3  # copies per object
    copied = {
        name: sorted({fingerprint(c) for c in copies[i * n : (i + 1) * n]}) for i, name in enumerate(objs)
    }
    json.dump({"before": before, "after": after, "copies": copied}, sys.stdout)


if __name__ == "__main__":
    main()
