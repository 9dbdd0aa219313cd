"""Tokenize: a string -> ``{"input_ids", "attention_mask"}`` ``int64`` tensors, by a fast tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from ..checks import is_positive_int, type_name
from ..fingerprint import fingerprint
from .common import require, version

__all__ = ["Tokenize"]


class Tokenize:
    """Tokenize a string to ``{"input_ids": int64 [T], "attention_mask": int64 [T]}``.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a Hugging Face fast tokenizer (anything
    with a ``backend_tokenizer``; transformers is never imported). A private copy of its
    (backend) tokenizer is made at construction, so later changes to ``tokenizer`` do not
    reach this transform, and ``max_length`` is set on the copy as its truncation length:
    sequences are cut to at most ``max_length`` ids *including* the special tokens the
    post-processor adds (as ``tokenizer(text, truncation=True, max_length=...)`` in
    transformers). Padding or truncation configured on a ``tokenizers.Tokenizer`` is kept;
    on a transformers tokenizer they are per-call options, so its backend's leftover
    truncation and padding are cleared (no padding; truncation only by ``max_length``).

    Fingerprint: the copy's full serialization (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, truncation, padding), ``max_length``,
    ``add_special_tokens`` and the tokenizers major.minor version.
    ``batch`` encodes a list of strings with ``encode_batch`` (parallel, same ids).
    """

    # Defined in a submodule, named where it is imported from: the class's module is part of
    # its fingerprint (and of its pickles), which must not change when the code moves.
    __module__ = "cachedata.transforms"

    _REVISION = 1

    def __init__(
        self, tokenizer: Any, *, max_length: int | None = None, add_special_tokens: bool = True
    ) -> None:
        tk = require("tokenizers", "text", "Tokenize")
        backend = (
            tokenizer
            if isinstance(tokenizer, tk.Tokenizer)
            else getattr(tokenizer, "backend_tokenizer", None)
        )
        if not isinstance(backend, tk.Tokenizer):
            raise TypeError(
                "Tokenize needs a tokenizers.Tokenizer or a Hugging Face fast tokenizer (with a "
                f"backend_tokenizer), got {type_name(type(tokenizer))}"
            )
        if max_length is not None and not is_positive_int(max_length):
            raise ValueError(f"Tokenize: max_length must be a positive int or None, got {max_length!r}")
        self.max_length = None if max_length is None else int(max_length)
        self.add_special_tokens = bool(add_special_tokens)
        self._source = _describe_tokenizer(tokenizer, backend)
        tok = tk.Tokenizer.from_str(backend.to_str())
        if backend is not tokenizer:
            # transformers sets truncation and padding on its backend per call and leaves
            # them there: they are leftovers of the last call, not settings.
            tok.no_truncation()
            tok.no_padding()
        if self.max_length is not None:
            options = dict(tok.truncation or {})
            options["max_length"] = self.max_length
            tok.enable_truncation(**options)
        self._tokenizer = tok

    def __call__(self, text: str) -> dict[str, torch.Tensor]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenize expects a str, got {type(text).__name__}")
        return _encoding(self._tokenizer.encode(text, add_special_tokens=self.add_special_tokens))

    def batch(self, items: list) -> list:
        """Tokenize many strings at once (the tokenizer's parallel ``encode_batch``)."""
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"Tokenize expects a str, got {type(text).__name__} at position {i}")
        if len(items) < 2:
            return [self(t) for t in items]
        encodings = self._tokenizer.encode_batch(items, add_special_tokens=self.add_special_tokens)
        return [_encoding(e) for e in encodings]

    def __cachedata_fingerprint__(self) -> str:
        return fingerprint(
            {
                "transform": "Tokenize",
                "revision": self._REVISION,
                "tokenizer": self._tokenizer.to_str(),
                "max_length": self.max_length,
                "add_special_tokens": self.add_special_tokens,
                "tokenizers": version("tokenizers"),
            }
        )

    def __repr__(self) -> str:
        return (
            f"Tokenize({self._source}, max_length={self.max_length}, "
            f"add_special_tokens={self.add_special_tokens})"
        )


def _encoding(enc: Any) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor(enc.ids, dtype=torch.int64),
        "attention_mask": torch.tensor(enc.attention_mask, dtype=torch.int64),
    }


def _describe_tokenizer(tokenizer: Any, backend: Any) -> str:
    try:
        model = type(backend.model).__name__
        size = backend.get_vocab_size(with_added_tokens=True)
    except Exception:  # a describing failure must not break construction
        return type(tokenizer).__name__
    return f"{type(tokenizer).__name__}({model}, vocab_size={size})"
