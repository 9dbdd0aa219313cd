"""Deterministic building blocks for ``CachedDataset(transform=...)``: decode, tokenize, embed.

Each transform is a picklable callable with a readable ``repr`` and an exact
``__cachedata_fingerprint__``: the fingerprint covers every parameter that changes the
output, plus the version of the library that defines the output where an upgrade could
change it (decoders, resampler, tokenizer), and an internal revision number bumped when
this package changes what a transform returns.

- ``DecodeImage(mode="RGB")``: a path or bytes -> ``uint8`` tensor ``[C, H, W]``
  (:mod:`~cachedata.transforms.image`).
- ``DecodeAudio(sample_rate=16000, mono=True, max_seconds=None, resample=True)``: a path or
  bytes -> ``float32`` tensor ``[T]`` (mono) or ``[C, T]`` (:mod:`~cachedata.transforms.audio`).
- ``Tokenize(tokenizer, max_length=None, add_special_tokens=True)``: a string ->
  ``{"input_ids", "attention_mask"}`` ``int64`` tensors ``[T]`` (:mod:`~cachedata.transforms.text`).
- ``Features(model, device="cpu", allow_trainable=False, max_batch_size=None)``: an input
  tensor -> a frozen model's output for it, on the CPU. ``Features.batch`` runs all misses of
  one ``__getitems__`` call in stacked forward passes of at most ``max_batch_size`` items
  (None: all of them at once) (:mod:`~cachedata.transforms.features`).

Import them from here (``from cachedata.transforms import Tokenize``): the classes say
``cachedata.transforms`` is their module, which is part of their fingerprints and pickles.

The heavy libraries (torchvision, Pillow, soundfile, torchaudio, tokenizers) are imported
when a transform is built or first used, so ``import cachedata.transforms`` works without
the extras; a missing one raises an ``ImportError`` that names the extra to install.
"""

from __future__ import annotations

from .audio import DecodeAudio
from .features import Features
from .image import DecodeImage
from .text import Tokenize

__all__ = ["DecodeAudio", "DecodeImage", "Features", "Tokenize"]
