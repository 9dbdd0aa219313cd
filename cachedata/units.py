"""Human-readable sizes and durations, as the command line and ``max_bytes=`` read and print them.

Sizes: ``50G``, ``512M``, ``1.5T``: K, M, G, T, P (also KiB, MiB, ...) are powers of 1024, as
in ``du -h``; KB, MB, GB, ... are powers of 1000; a bare number is bytes. Durations: ``7d``,
``12h``, ``30m``, ``45s``, ``1d12h``; every number needs a unit. The only place in cachedata
that parses either.
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


# ----------------------------------------------------------------------------- durations

_DURATION_TOKEN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)
_DURATION_UNITS: dict[str, int] = {
    name: seconds
    for names, seconds in (
        (("s", "sec", "secs", "second", "seconds"), 1),
        (("m", "min", "mins", "minute", "minutes"), 60),
        (("h", "hr", "hrs", "hour", "hours"), 3600),
        (("d", "day", "days"), 86400),
        (("w", "wk", "wks", "week", "weeks"), 7 * 86400),
    )
    for name in names
}
_DURATION_HELP = "a number with a unit s, m, h, d or w, e.g. 7d, 12h, 30m, 45s, 1d12h"


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``7d``, ``12h``, ``30m``, ``45s``, ``1.5h`` or ``1d12h``.

    Every number needs a unit (s, m, h, d, w; also sec, min, hours, days, weeks...).
    Raises ValueError naming the text and the expected form.
    """
    total = 0.0
    pos = 0
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    for m in _DURATION_TOKEN.finditer(stripped):
        if stripped[pos : m.start()].strip():
            break
        unit = m.group(2).lower()
        if not unit:
            raise ValueError(f"invalid duration {text!r}: {m.group(1)} has no unit; write e.g. {m.group(1)}d")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"invalid duration {text!r}: unknown unit {unit!r}; expected {_DURATION_HELP}")
        total += float(m.group(1)) * _DURATION_UNITS[unit]
        pos = m.end()
    if pos == 0 or stripped[pos:].strip():
        raise ValueError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    return total


def format_duration(seconds: float, parts: int | None = 2) -> str:
    """Whole seconds as ``3d4h``, ``2h30m``, ``45s`` (at most ``parts`` units; None: all, exact).

    The units shown are the largest one present and the ones right below it, so the text
    is at most 1/24 short of ``seconds``; fractions of a second are dropped.
    """
    left = max(0, int(seconds))
    counts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        counts.append((count, unit))
    first = next((i for i, (count, _) in enumerate(counts) if count), len(counts))
    shown = counts[first:] if parts is None else counts[first : first + parts]
    return "".join(f"{count}{unit}" for count, unit in shown if count) or "0s"
