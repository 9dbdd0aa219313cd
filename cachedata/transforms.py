"""Deterministic building blocks for ``CachedDataset(transform=...)``: decode, tokenize, embed.

Each transform is a picklable callable with a readable ``repr`` and an exact
``__cachedata_fingerprint__``: the fingerprint covers every parameter that changes the
output, plus the version of the library that defines the output where an upgrade could
change it (decoders, resampler, tokenizer), and an internal revision number bumped when
this module changes what a transform returns.

- ``DecodeImage(mode="RGB")``: a path or bytes -> ``uint8`` tensor ``[C, H, W]``.
- ``DecodeAudio(sample_rate=16000, mono=True, max_seconds=None, resample=True)``: a path or
  bytes -> ``float32`` tensor ``[T]`` (mono) or ``[C, T]``.
- ``Tokenize(tokenizer, max_length=None, add_special_tokens=True)``: a string ->
  ``{"input_ids", "attention_mask"}`` ``int64`` tensors ``[T]``.
- ``Features(model, device="cpu", allow_trainable=False)``: an input tensor -> a frozen
  model's output for it, on the CPU. ``Features.batch`` runs all misses of one
  ``__getitems__`` call in one stacked forward pass.

The heavy libraries (torchvision, Pillow, soundfile, torchaudio, tokenizers) are imported
when a transform is built or first used, so ``import cachedata.transforms`` works without
the extras; a missing one raises an ``ImportError`` that names the extra to install.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import io
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .fingerprint import fingerprint

__all__ = ["DecodeAudio", "DecodeImage", "Features", "Tokenize"]

logger = logging.getLogger("cachedata")

PathOrBytes = str | os.PathLike | bytes | bytearray | memoryview


# ----------------------------------------------------------------------------- helpers


def _require(module: str, extra: str, who: str) -> Any:
    """Import ``module`` or fail with an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{who} needs {module.split('.')[0]}, which is not installed ({exc}); "
            f"install it with: pip install 'cachedata[{extra}]'"
        ) from exc


@functools.cache
def _version(dist: str) -> str | None:
    """``major.minor`` of an installed distribution (None when absent), for fingerprints."""
    from importlib import metadata

    try:
        return _major_minor(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> str:
    return ".".join(re.split(r"[.+]", version)[:2])


def _source(item: Any, who: str) -> tuple[str | None, bytes | bytearray | None, str]:
    """(path, None, name) for a path item, (None, bytes, name) for bytes; name is for messages."""
    if isinstance(item, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(item))
        return path, None, repr(path)
    if isinstance(item, (bytes, bytearray)):
        return None, item, f"<{len(item)} bytes>"
    if isinstance(item, memoryview):
        return None, item.tobytes(), f"<{item.nbytes} bytes>"
    if isinstance(item, torch.Tensor) and item.dtype == torch.uint8 and item.dim() == 1:
        return None, item.cpu().numpy().tobytes(), f"<{item.numel()} bytes>"
    raise TypeError(
        f"{who} expects a file path (str or os.PathLike) or the file's bytes, "
        f"got {type(item).__module__}.{type(item).__qualname__}"
    )


def _open(path: str, who: str) -> io.BufferedReader:
    """``open(path, "rb")`` with errors that name the transform and the path."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{who}: no such file", path) from None
    except OSError as exc:
        raise type(exc)(exc.errno, f"{who}: cannot read the file ({exc.strerror})", path) from None


def _reason(exc: BaseException) -> str:
    """A decoder's error message without C++ source locations and object addresses."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)  # "decode_jpeg, /path/decode_jpeg.cpp:167, "
    return re.sub(r" ?<_io\.\w+ (object at 0x[0-9a-f]+|name=[^>]*)>", "", text)


# ------------------------------------------------------------------------------ images

# Output modes and their channel counts.
_IMAGE_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
# torchvision.io.ImageReadMode to ask each decoder for, per output mode: the closest one it
# honours (decode_gif ignores the mode and returns RGB, decode_webp has no gray, decode_jpeg
# no alpha); _to_channels converts the rest.
_READ_MODES = {
    "png": {"L": "GRAY", "LA": "GRAY_ALPHA", "RGB": "RGB", "RGBA": "RGB_ALPHA"},
    "jpeg": {"L": "GRAY", "LA": "GRAY", "RGB": "RGB", "RGBA": "RGB"},
    "webp": {"L": "RGB", "LA": "RGB_ALPHA", "RGB": "RGB", "RGBA": "RGB_ALPHA"},
    "gif": {"L": "UNCHANGED", "LA": "UNCHANGED", "RGB": "UNCHANGED", "RGBA": "UNCHANGED"},
}
_EXIF_ORIENTATION = 0x0112


def _sniff(buf: bytes | bytearray) -> str | None:
    """The format of encoded image bytes if torchvision's decode_image reads it, else None."""
    head = bytes(buf[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _palette_png_without_alpha(buf: bytes | bytearray) -> bool:
    """True for a palette PNG without a tRNS chunk.

    torchvision 0.28's decode_png leaves the alpha channel of such a file uninitialized
    (different bytes on every call) when asked for RGB_ALPHA or GRAY_ALPHA; it is then
    decoded without alpha and given an opaque one.
    """
    if len(buf) < 33 or buf[25] != 3:  # IHDR color type 3: palette
        return False
    pos = 8
    while pos + 8 <= len(buf):
        kind = bytes(buf[pos + 4 : pos + 8])
        if kind == b"tRNS":
            return False
        if kind in (b"IDAT", b"IEND"):  # tRNS must come before the image data
            return True
        pos += 12 + int.from_bytes(buf[pos : pos + 4], "big")
    return True


def _gray(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of a ``uint8 [3, H, W]`` tensor, rounded exactly as Pillow's ``convert("L")``."""
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def _to_channels(img: torch.Tensor, mode: str) -> torch.Tensor:
    """Convert a ``uint8 [C, H, W]`` image (C in 1..4: L, LA, RGB, RGBA) to ``mode``.

    Like Pillow: alpha is dropped (not composited), gray is repeated into RGB, a missing
    alpha is 255 and RGB becomes gray by ITU-R 601-2 luma.
    """
    want = _IMAGE_MODES[mode]
    have = img.shape[0]
    if have == want:
        return img
    has_alpha = have in (2, 4)
    color = img[: have - 1] if has_alpha else img
    if want in (1, 2):
        base = color if color.shape[0] == 1 else _gray(color)
    else:
        base = color if color.shape[0] == 3 else color.expand(3, -1, -1)
    if want in (2, 4):
        alpha = img[-1:] if has_alpha else torch.full_like(img[:1], 255)
        base = torch.cat([base, alpha])
    return base.contiguous()


def _orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a ``[C, H, W]`` tensor, as ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return img.rot90(-1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.rot90(1, (-2, -1))
    return img


def _webp_orientation(buf: bytes | bytearray) -> int:
    """EXIF orientation of a WebP file (torchvision's decode_webp ignores it), 1 when none.

    Only an extended (VP8X) file with its EXIF flag set is opened with Pillow, which reads
    the header and metadata without decoding pixels.
    """
    if bytes(buf[12:16]) != b"VP8X" or len(buf) < 21 or not buf[20] & 0x08:
        return 1
    try:
        from PIL import Image

        with Image.open(io.BytesIO(buf)) as im:
            value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # unreadable metadata: keep the pixels as stored
        logger.debug("DecodeImage: cannot read WebP EXIF orientation (%s)", exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


class DecodeImage:
    """Decode an image file (path or bytes) to a ``uint8`` tensor ``[C, H, W]`` in ``mode``.

    ``mode`` is ``"RGB"`` (3 channels), ``"RGBA"`` (4), ``"L"`` (1, gray) or ``"LA"`` (2).

    JPEG, PNG, WebP and GIF go through ``torchvision.io.decode_image`` (libjpeg-turbo,
    libpng, libwebp, giflib); anything else, or a file those refuse, through Pillow. EXIF
    orientation is applied (torchvision does it for JPEG and PNG, this class for WebP,
    ``ImageOps.exif_transpose`` on the Pillow path). Where a decoder cannot produce
    ``mode`` itself (GIF is always RGB, WebP has no gray, JPEG no alpha), channels are
    converted like Pillow does: alpha dropped, missing alpha 255, gray = ITU-R 601-2 luma.
    Only the first frame of an animation is decoded; 16-bit images are scaled to 8 bits
    (``value >> 8``).

    Fingerprint: ``mode``, plus the major.minor versions of torchvision and Pillow, since
    a new decoder release (libjpeg-turbo's IDCT, chroma upsampling) can change pixels.
    """

    _REVISION = 1

    def __init__(self, mode: str = "RGB") -> None:
        if mode not in _IMAGE_MODES:
            raise ValueError(f"DecodeImage: mode must be one of {sorted(_IMAGE_MODES)}, got {mode!r}")
        self.mode = mode
        _require("torchvision.io", "vision", "DecodeImage")

    def __call__(self, item: PathOrBytes) -> torch.Tensor:
        path, buf, name = _source(item, "DecodeImage")
        if path is not None:
            with _open(path, "DecodeImage") as fh:
                buf = fh.read()
        fmt = _sniff(buf)
        tv_error: str | None = None
        if fmt is not None:
            try:
                return self._torchvision(buf, fmt)
            except RuntimeError as exc:
                tv_error = _reason(exc)
                logger.debug("DecodeImage: torchvision cannot decode %s (%s); trying Pillow", name, tv_error)
        try:
            return self._pil(buf)
        except ImportError:
            raise
        except Exception as exc:
            if tv_error is not None:
                reason = f"torchvision: {tv_error}; Pillow: {_reason(exc)}"
            else:
                reason = f"not a JPEG, PNG, WebP or GIF file, and Pillow: {_reason(exc)}"
            raise ValueError(f"DecodeImage: cannot decode {name}: {reason}") from exc

    def _torchvision(self, buf: bytes | bytearray, fmt: str) -> torch.Tensor:
        io_mod = _require("torchvision.io", "vision", "DecodeImage")
        name = _READ_MODES[fmt][self.mode]
        if name.endswith("_ALPHA") and fmt == "png" and _palette_png_without_alpha(buf):
            name = name[: -len("_ALPHA")]
        read_mode = io_mod.ImageReadMode[name]
        data = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
        img = io_mod.decode_image(data, mode=read_mode, apply_exif_orientation=True)
        if img.dim() == 4:  # an animated GIF: [frames, C, H, W]
            img = img[0]
        if img.dtype == torch.uint16:  # 16-bit PNG
            img = (img.to(torch.int32) >> 8).to(torch.uint8)
        if fmt == "webp":
            img = _orient(img, _webp_orientation(buf))
        return _to_channels(img, self.mode).contiguous()

    def _pil(self, buf: bytes | bytearray) -> torch.Tensor:
        Image = _require("PIL.Image", "vision", "DecodeImage")
        ImageOps = _require("PIL.ImageOps", "vision", "DecodeImage")
        with Image.open(io.BytesIO(buf)) as src:
            im = ImageOps.exif_transpose(src)  # a loaded copy
        if im.mode.startswith("I;16"):
            arr = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
            im = Image.fromarray(arr, "L")
        arr = np.array(im.convert(self.mode))  # a writable copy
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __cachedata_fingerprint__(self) -> str:
        return fingerprint(
            {
                "transform": "DecodeImage",
                "revision": self._REVISION,
                "mode": self.mode,
                "torchvision": _version("torchvision"),
                "pillow": _version("pillow"),
            }
        )

    def __repr__(self) -> str:
        return f"DecodeImage(mode={self.mode!r})"


# ------------------------------------------------------------------------------- audio


class DecodeAudio:
    """Decode an audio file (path or bytes) with soundfile to a ``float32`` waveform in [-1, 1].

    Returns ``[T]`` when ``mono`` (channels mixed by their mean) or ``[C, T]``
    (channels first) otherwise, at ``sample_rate`` Hz: a file at another rate is resampled
    with ``torchaudio.functional.resample`` (default sinc filter), or refused with a
    ``ValueError`` naming the file and both rates when ``resample=False``.

    ``max_seconds`` keeps ``max_frames = floor(max_seconds * sample_rate)`` output samples
    at most, and only the start of the file is decoded: its first
    ``ceil(max_frames * file_rate / sample_rate)`` frames are read, mixed, resampled and
    cut to ``max_frames`` (the resampler sees the cut as the end of the signal).

    Anything libsndfile reads works (WAV, FLAC, OGG/Vorbis, Opus, MP3 with libsndfile >= 1.1,
    AIFF...); ``torchaudio.load`` is not used (it needs torchcodec).

    Fingerprint: every parameter, plus the major.minor versions of soundfile and
    libsndfile (they decode) and, when ``resample``, of torchaudio (its filter).
    """

    _REVISION = 1

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        mono: bool = True,
        max_seconds: float | None = None,
        resample: bool = True,
    ) -> None:
        if (
            isinstance(sample_rate, bool)
            or not isinstance(sample_rate, (int, np.integer))
            or sample_rate <= 0
        ):
            raise ValueError(f"DecodeAudio: sample_rate must be a positive int (Hz), got {sample_rate!r}")
        if max_seconds is not None and (
            isinstance(max_seconds, bool)
            or not isinstance(max_seconds, (int, float, np.number))
            or not 0 < float(max_seconds) < math.inf
        ):
            raise ValueError(
                f"DecodeAudio: max_seconds must be a positive number of seconds or None, got {max_seconds!r}"
            )
        self.sample_rate = int(sample_rate)
        self.mono = bool(mono)
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.resample = bool(resample)
        _require("soundfile", "audio", "DecodeAudio")

    @property
    def max_frames(self) -> int | None:
        """``max_seconds`` in output samples (None: no limit)."""
        if self.max_seconds is None:
            return None
        return max(1, math.floor(self.max_seconds * self.sample_rate + 1e-6))

    def __call__(self, item: PathOrBytes) -> torch.Tensor:
        sf = _require("soundfile", "audio", "DecodeAudio")
        path, buf, name = _source(item, "DecodeAudio")
        fh = _open(path, "DecodeAudio") if path is not None else io.BytesIO(buf)
        with fh:
            try:
                f = sf.SoundFile(fh)
            except (RuntimeError, EOFError, ValueError) as exc:
                raise ValueError(f"DecodeAudio: cannot decode {name}: {_sf_reason(exc)}") from exc
            with f:
                rate = f.samplerate
                if rate != self.sample_rate and not self.resample:
                    raise ValueError(
                        f"DecodeAudio: {name} has a sample rate of {rate} Hz, not the {self.sample_rate} Hz "
                        f"asked for; pass resample=True to resample it, or sample_rate={rate} to keep it"
                    )
                limit = self.max_frames
                frames = -1 if limit is None else -(-limit * rate // self.sample_rate)
                try:
                    data = f.read(frames=frames, dtype="float32", always_2d=True)
                except (RuntimeError, EOFError, ValueError) as exc:
                    raise ValueError(f"DecodeAudio: cannot decode {name}: {_sf_reason(exc)}") from exc
        wave = torch.from_numpy(data.T)  # [C, T]
        if self.mono:
            wave = wave.mean(0)
        if rate != self.sample_rate:
            F = _require("torchaudio.functional", "audio", "DecodeAudio")
            wave = F.resample(wave, rate, self.sample_rate)
        if limit is not None:
            wave = wave[..., :limit]
        return wave.contiguous()

    def __cachedata_fingerprint__(self) -> str:
        sf = _require("soundfile", "audio", "DecodeAudio")
        return fingerprint(
            {
                "transform": "DecodeAudio",
                "revision": self._REVISION,
                "sample_rate": self.sample_rate,
                "mono": self.mono,
                "max_seconds": self.max_seconds,
                "resample": self.resample,
                "soundfile": _version("soundfile"),
                "libsndfile": _major_minor(str(getattr(sf, "__libsndfile_version__", "?"))),
                "torchaudio": _version("torchaudio") if self.resample else None,
            }
        )

    def __repr__(self) -> str:
        return (
            f"DecodeAudio(sample_rate={self.sample_rate}, mono={self.mono}, "
            f"max_seconds={self.max_seconds}, resample={self.resample})"
        )


def _sf_reason(exc: BaseException) -> str:
    return getattr(exc, "error_string", None) or _reason(exc)


# -------------------------------------------------------------------------------- text


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

    _REVISION = 1

    def __init__(
        self, tokenizer: Any, *, max_length: int | None = None, add_special_tokens: bool = True
    ) -> None:
        tk = _require("tokenizers", "text", "Tokenize")
        backend = (
            tokenizer
            if isinstance(tokenizer, tk.Tokenizer)
            else getattr(tokenizer, "backend_tokenizer", None)
        )
        if not isinstance(backend, tk.Tokenizer):
            raise TypeError(
                "Tokenize needs a tokenizers.Tokenizer or a Hugging Face fast tokenizer (with a "
                f"backend_tokenizer), got {type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
            )
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1
        ):
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
                "tokenizers": _version("tokenizers"),
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


# ---------------------------------------------------------------------------- features


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
        f"got {type(x).__module__}.{type(x).__qualname__} at {where}"
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
        f"Features: the model's {where} is a {type(out).__module__}.{type(out).__qualname__}; "
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
            raise TypeError(
                f"Features needs a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}"
            )
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"Features: device {device!r} is not a torch device ({exc})") from None
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
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
        self.max_batch_size = max_batch_size
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
