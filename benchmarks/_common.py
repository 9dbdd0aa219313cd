"""Helpers shared by the benchmark scripts (bench_core, bench_peers and its runner, bench_scale, bench_features).

Statistics (``summary``), timing (``timed``, ``interleaved``, ``epoch``), memory probes
(``vm_hwm``, ``reset_hwm``, ``rss``), the machine description and an atomic JSON writer.
Importing it is cheap: torch, h5py and cachedata are imported inside the functions that need
them, so bench_peers.py's orchestrating process stays light. The scripts put their own folder
on ``sys.path``, so ``import _common`` finds this file.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ---------------------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict[str, float]:
    """Median, min, max, n and spread = (max - min) / median of ``values``."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else 0.0,
        "n": len(values),
    }


def maybe_summary(values: list[float | None]) -> dict[str, float] | None:
    return None if any(v is None for v in values) else summary(values)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- timing


def epoch(loader: Any, *, into: list | None = None) -> int:
    """Iterate ``loader`` once; returns the item count (``len`` of each batch). ``into``: a
    list that collects the items, for loaders whose batches are lists (``collate_fn=list``)."""
    n = 0
    for batch in loader:
        n += len(batch)
        if into is not None:
            into.extend(batch)
    return n


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Wall seconds of each function per repeat, alternating the order so noise hits all of them.

    ``cpu``, when given, receives this process's CPU seconds per run: unlike wall time, it
    hardly grows when other jobs compete for the CPUs (a diagnostic on a shared machine).
    """
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    if cpu is not None:
        cpu.update({k: [] for k in names})
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            c0 = time.process_time()
            out[name].append(timed(fns[name]))
            if cpu is not None:
                cpu[name].append(time.process_time() - c0)
    return out


def check_equal(a: Any, b: Any, what: str) -> None:
    import torch

    if not (isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)):
        raise SystemExit(f"benchmark sanity check failed: {what}: cachedata returned different data")


def make_tmp(root: str | None, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"cachedata-bench-{tag}-", dir=root))


# -------------------------------------------------------------------------------- memory


def vm_hwm() -> int | None:
    """Peak RSS of this process in bytes (VmHWM), or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss() -> int:
    """Current RSS of this process in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


# ------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        mem = None
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import h5py
    import numpy as np
    import torch

    import cachedata

    return {
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "cachedata": cachedata.__version__,
    }


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (a temporary file renamed into place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    return out
