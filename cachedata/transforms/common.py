"""What the transforms share: optional imports, library versions, reading a path or bytes.

``require`` imports an extra's library or raises an ImportError naming the extra; ``version`` is
the ``major.minor`` of an installed library (part of a fingerprint where an upgrade could
change outputs); ``source``/``open_file`` turn an item into bytes with errors that name the
transform and the path; ``reason`` strips C++ noise from a decoder's error message.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import re
from typing import Any

import torch

from ..checks import type_name

__all__ = ["PathOrBytes", "major_minor", "open_file", "reason", "require", "source", "version"]

PathOrBytes = str | os.PathLike | bytes | bytearray | memoryview


def require(module: str, extra: str, who: str) -> Any:
    """Import ``module`` or fail with an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{who} needs {module.split('.')[0]}, which is not installed ({exc}); "
            f"install it with: pip install 'cachedata[{extra}]'"
        ) from exc


@functools.cache
def version(dist: str) -> str | None:
    """``major.minor`` of an installed distribution (None when absent), for fingerprints."""
    from importlib import metadata

    try:
        return major_minor(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return None


def major_minor(version: str) -> str:
    return ".".join(re.split(r"[.+]", version)[:2])


def source(item: Any, who: str) -> tuple[str | None, bytes | bytearray | None, str]:
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
        f"{who} expects a file path (str or os.PathLike) or the file's bytes, got {type_name(type(item))}"
    )


def open_file(path: str, who: str) -> io.BufferedReader:
    """``open(path, "rb")`` with errors that name the transform and the path."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{who}: no such file", path) from None
    except OSError as exc:
        raise type(exc)(exc.errno, f"{who}: cannot read the file ({exc.strerror})", path) from None


def reason(exc: BaseException) -> str:
    """A decoder's error message without C++ source locations and object addresses."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)  # "decode_jpeg, /path/decode_jpeg.cpp:167, "
    return re.sub(r" ?<_io\.\w+ (object at 0x[0-9a-f]+|name=[^>]*)>", "", text)
