"""Human-readable byte sizes, as the command line and ``max_bytes=`` read and print them.

``50G``, ``512M``, ``1.5T``: K, M, G, T, P (also KiB, MiB, ...) are powers of 1024, as in
``du -h``; KB, MB, GB, ... are powers of 1000; a bare number is bytes.
"""

from __future__ import annotations

import math
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE_HELP = "a number with an optional unit B, K, M, G, T or P, e.g. 50G, 512M, 1.5T"


def parse_size(text: str) -> int:
    """Bytes in a human-readable size such as ``50G``, ``512M``, ``1.5T``, ``100KB`` or ``4096``.

    K, M, G, T, P (also KiB, MiB, ...) are powers of 1024, as in ``du -h``; KB, MB, GB, ...
    are powers of 1000. Raises ValueError naming the text and the expected form.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r}: expected {_SIZE_HELP}")
    number, prefix, suffix = m.group(1), m.group(2).lower(), (m.group(3) or "").lower()
    base = 1000 if suffix == "b" and prefix else 1024
    value = float(number) * base ** _SIZE_POWERS[prefix]
    if not math.isfinite(value):
        raise ValueError(f"invalid size {text!r}: too large")
    return round(value)


def format_size(nbytes: int) -> str:
    """``nbytes`` as ``1023B``, ``1.5K``, ``512M``, ``12G`` (powers of 1024, <= 5% rounding)."""
    if nbytes < 1024:
        return f"{int(nbytes)}B"
    for power, unit in enumerate("KMGTP", start=1):
        value = nbytes / 1024**power
        text = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
        if float(text) < 1024 or unit == "P":
            return f"{text.removesuffix('.0')}{unit}"
    raise AssertionError("unreachable")
