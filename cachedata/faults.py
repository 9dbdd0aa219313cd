"""What a failure means: a file that cannot be trusted, or an environment that failed.

Only a failed checksum or a malformed file is corruption (its items are recomputed). Too many
open files, no memory, an interrupted call or a transient I/O error is not: the file is kept,
the work is retried or deferred, and the warning names the limit to raise (``limit_hint``).
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from . import fileset

logger = logging.getLogger("cachedata")
_warned: set[tuple[str, str]] = set()


def warn_once(
    kind: str,
    folder: Path,
    message: str,
    *args: object,
    level: int = logging.WARNING,
    repeat: int | None = None,
) -> None:
    """Log ``message`` at ``level`` once per process for each (kind, folder); later ones are
    dropped, or logged at ``repeat`` (say logging.INFO) when given."""
    key = (kind, str(folder))
    if key in _warned:
        if repeat is not None:
            logger.log(repeat, message, *args)
        return
    _warned.add(key)
    logger.log(level, message, *args)


def warn_transient(folder: Path, exc: BaseException) -> None:
    """One warning per folder and process for an environmental failure, naming the limit."""
    warn_once(
        "transient", folder,
        "cachedata: %s: %s. Nothing is lost: the files stay, and the work is retried or "
        "deferred (an item that cannot be read now is recomputed). Raise %s.",
        folder, exc, limit_hint(exc),
    )  # fmt: skip


class CorruptFileError(Exception):
    """A cache file that cannot be trusted (malformed, inconsistent, or tampered with)."""


class TransientError(OSError):
    """An environmental failure (too many open files, no memory, a transient I/O error).

    Never a sign of corruption: the file is kept and the work is retried or deferred.
    """


def transient(exc: BaseException) -> bool:
    """True when ``exc`` is a resource or transient I/O error rather than a bad file.

    h5py reports a failed open as an OSError whose message carries the errno, so both the
    attribute and the text are checked.
    """
    if isinstance(exc, (TransientError, fileset.ListingError)):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        if exc.errno in fileset.TRANSIENT_ERRNOS:
            return True
        text = str(exc)
        return any(f"errno = {e}," in text for e in fileset.TRANSIENT_ERRNOS) or "Too many open files" in text
    return False


def limit_hint(exc: BaseException) -> str:
    """Which limit to raise for a transient error, in words."""
    text = str(exc)
    if "open files" in text or getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE):
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
            if target <= soft:
                return (
                    f"the open-files limit (now {soft}; raise it with `ulimit -n 65536` after raising "
                    f"the hard limit, also {hard}, in /etc/security/limits.conf or your job scheduler)"
                )
            return f"the open-files limit (now {soft}; raise it with `ulimit -n {target}`)"
        except (ImportError, OSError, ValueError):
            return "the open-files limit (`ulimit -n`)"
    if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == errno.ENOMEM:
        return "the memory available to this process"
    return "nothing: a transient I/O error; the work is retried later"
