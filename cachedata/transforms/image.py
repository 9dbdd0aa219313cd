"""DecodeImage: an image file (path or bytes) -> a ``uint8`` tensor ``[C, H, W]``."""

from __future__ import annotations

import io
import logging

import numpy as np
import torch

from ..fingerprint import fingerprint
from .common import PathOrBytes, open_file, reason, require, source, version

__all__ = ["DecodeImage"]

logger = logging.getLogger("cachedata")

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

    # Defined in a submodule, named where it is imported from: the class's module is part of
    # its fingerprint (and of its pickles), which must not change when the code moves.
    __module__ = "cachedata.transforms"

    _REVISION = 1

    def __init__(self, mode: str = "RGB") -> None:
        if mode not in _IMAGE_MODES:
            raise ValueError(f"DecodeImage: mode must be one of {sorted(_IMAGE_MODES)}, got {mode!r}")
        self.mode = mode
        require("torchvision.io", "vision", "DecodeImage")

    def __call__(self, item: PathOrBytes) -> torch.Tensor:
        path, buf, name = source(item, "DecodeImage")
        if path is not None:
            with open_file(path, "DecodeImage") as fh:
                buf = fh.read()
        fmt = _sniff(buf)
        tv_error: str | None = None
        if fmt is not None:
            try:
                return self._torchvision(buf, fmt)
            except RuntimeError as exc:
                tv_error = reason(exc)
                logger.debug("DecodeImage: torchvision cannot decode %s (%s); trying Pillow", name, tv_error)
        try:
            return self._pil(buf)
        except ImportError:
            raise
        except Exception as exc:
            if tv_error is not None:
                why = f"torchvision: {tv_error}; Pillow: {reason(exc)}"
            else:
                why = f"not a JPEG, PNG, WebP or GIF file, and Pillow: {reason(exc)}"
            raise ValueError(f"DecodeImage: cannot decode {name}: {why}") from exc

    def _torchvision(self, buf: bytes | bytearray, fmt: str) -> torch.Tensor:
        io_mod = require("torchvision.io", "vision", "DecodeImage")
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
        Image = require("PIL.Image", "vision", "DecodeImage")
        ImageOps = require("PIL.ImageOps", "vision", "DecodeImage")
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
                "torchvision": version("torchvision"),
                "pillow": version("pillow"),
            }
        )

    def __repr__(self) -> str:
        return f"DecodeImage(mode={self.mode!r})"
