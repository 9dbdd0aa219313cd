"""Features: a frozen ``nn.Module``'s output for an item, batched over a ``__getitems__`` call's misses."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..checks import is_positive_int, type_name
from ..device import parse_device
from ..fingerprint import fingerprint

__all__ = ["Features"]

logger = logging.getLogger("cachedata")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with every submodule in eval mode; submodules found in training mode are restored."""
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _on_device(model: torch.nn.Module, device: torch.device) -> bool:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return False
    return True


def _as_tensor(x: Any, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(
        f"Features expects a tensor, a numpy array, or a dict/tuple/list of them per item; "
        f"got {type_name(type(x))} at {where}"
    )


def _leaves(item: Any, where: str) -> tuple[Any, list[torch.Tensor]]:
    """(structure, tensors) of one input item: a tensor/array, a str-keyed mapping, a tuple/list."""
    if isinstance(item, Mapping):
        keys = tuple(item)
        return ("dict", keys), [_as_tensor(item[k], f"{where}[{k!r}]") for k in keys]
    if isinstance(item, (tuple, list)):
        return ("args", len(item)), [_as_tensor(v, f"{where}[{i}]") for i, v in enumerate(item)]
    return ("tensor",), [_as_tensor(item, where)]


def _split(out: Any, n: int, where: str) -> list[Any]:
    """Cut a batched model output into ``n`` per-item outputs: fresh CPU tensors, same structure."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"Features: the model's {where} has shape {tuple(out.shape)}; every tensor it returns "
                f"needs a leading batch dimension (of size {n} here)"
            )
        out = out.to("cpu")
        return [out[i].clone() for i in range(n)]  # clone: a normal tensor, not an inference one
    if isinstance(out, Mapping):
        parts = {k: _split(v, n, f"{where}[{k!r}]") for k, v in out.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(n)]
    if isinstance(out, (tuple, list)):
        seq = [_split(v, n, f"{where}[{j}]") for j, v in enumerate(out)]
        kind = list if isinstance(out, list) else tuple  # namedtuples become plain tuples
        return [kind(p[i] for p in seq) for i in range(n)]
    if out is None or isinstance(out, (bool, int, float, str)):
        return [out] * n
    raise TypeError(
        f"Features: the model's {where} is a {type_name(type(out))}; "
        "expected tensors, possibly in a dict, tuple or list"
    )


class Features:
    """The output of a frozen ``nn.Module`` for one item, computed without autograd.

    ``Features(model)(x)`` is ``model(x.unsqueeze(0))`` with the batch dimension removed,
    run in eval mode under ``torch.inference_mode()`` on ``device``, returned as fresh
    CPU tensors (a tensor, or the dict/tuple/list of tensors the model returns). An item
    may also be a dict of tensors (passed as keyword arguments: ``model(**batch)``) or a
    tuple/list (positional arguments); numpy arrays are accepted as tensors.

    The model: ``model.eval()`` is called at construction; if it is later switched back to
    training mode, each forward pass (and the fingerprint) uses eval mode and restores the
    flags afterwards. The model is never moved: when its weights are not on ``device``, a
    private copy is moved there on the first call (so the model's weights must not change
    after that). A model with trainable parameters (``requires_grad=True``) is refused
    unless ``allow_trainable=True``: features of weights that are still being trained
    would be stale in the cache. Freeze it with ``model.requires_grad_(False)``.

    ``batch(items)`` (called by CachedDataset with all misses of one ``__getitems__``)
    stacks items of the same input shapes and dtypes into one forward pass of at most
    ``max_batch_size`` items (None: no limit); items with other shapes run in their own
    groups, ragged ones one by one. Batched results equal one-by-one results within
    floating-point tolerance, not bit for bit (kernels differ with the batch size).

    Fingerprint: the model's class and full state (every parameter and buffer by content,
    submodule attributes, forward hooks), taken in eval mode. It is device-independent
    (tensors are hashed from their CPU bytes and ``device`` is left out), so features
    computed on a GPU and on the CPU share one cache: they agree within float tolerance.
    ``allow_trainable`` and ``max_batch_size`` do not change outputs and are left out.
    """

    # Defined in a submodule, named where it is imported from: the class's module is part of
    # its fingerprint (and of its pickles), which must not change when the code moves.
    __module__ = "cachedata.transforms"

    _REVISION = 1

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        allow_trainable: bool = False,
        max_batch_size: int | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Features needs a torch.nn.Module, got {type_name(type(model))}")
        self.device = parse_device(device, owner="Features")
        if max_batch_size is not None and not is_positive_int(max_batch_size):
            raise ValueError(
                f"Features: max_batch_size must be a positive int or None, got {max_batch_size!r}"
            )
        self.allow_trainable = bool(allow_trainable)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if trainable and not self.allow_trainable:
            shown = ", ".join(trainable[:3]) + (", ..." if len(trainable) > 3 else "")
            raise ValueError(
                f"Features: {type(model).__name__} has {len(trainable)} trainable parameter tensor(s) "
                f"({shown}); cached features of weights that still change would go stale. Freeze it "
                "with model.requires_grad_(False), or pass allow_trainable=True if its weights are fixed"
            )
        self.model = model.eval()
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self._placed: torch.nn.Module | None = None

    def __call__(self, item: Any) -> Any:
        structure, tensors = _leaves(item, "item")
        return self._forward(structure, [tensors])[0]

    def batch(self, items: list) -> list:
        """Outputs for many items: one stacked forward pass per group of equal input shapes."""
        groups: dict[Any, list[int]] = {}
        leaves: list[tuple[Any, list[torch.Tensor]]] = []
        for i, item in enumerate(items):
            structure, tensors = _leaves(item, f"item {i}")
            leaves.append((structure, tensors))
            sig = (structure, tuple((tuple(t.shape), t.dtype) for t in tensors))
            groups.setdefault(sig, []).append(i)
        out: list[Any] = [None] * len(items)
        step = self.max_batch_size or max(len(items), 1)
        for (structure, _), members in groups.items():
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                for i, value in zip(chunk, self._forward(structure, [leaves[i][1] for i in chunk])):
                    out[i] = value
        return out

    def _forward(self, structure: Any, per_item: list[list[torch.Tensor]]) -> list:
        """One forward pass over items of one structure with equal shapes and dtypes."""
        if len(per_item) == 1:
            inputs = [t.unsqueeze(0) for t in per_item[0]]
        else:
            inputs = [torch.stack(ts) for ts in zip(*per_item)]
        inputs = [t.to(self.device) for t in inputs]
        model = self._model_on_device()
        with _eval_mode(model), torch.inference_mode():
            if structure[0] == "dict":
                result = model(**dict(zip(structure[1], inputs)))
            else:
                result = model(*inputs)
        return _split(result, len(per_item), "output")

    def _model_on_device(self) -> torch.nn.Module:
        placed = self._placed
        if placed is None:
            if _on_device(self.model, self.device):
                placed = self.model
            else:
                logger.info("Features: running a copy of %s on %s", type(self.model).__name__, self.device)
                placed = copy.deepcopy(self.model).to(self.device)
            self._placed = placed
        return placed

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_placed"] = None  # a device copy is made again where it is used
        return state

    def __cachedata_fingerprint__(self) -> str:
        with _eval_mode(self.model):
            return fingerprint(
                {"transform": "Features", "revision": self._REVISION, "model": self.model},
                root="Features",
            )

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"Features({type(self.model).__name__}({n:,} params), device={str(self.device)!r}, "
            f"allow_trainable={self.allow_trainable})"
        )
