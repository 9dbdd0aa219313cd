"""benchmarks/bench_scale.py runs end to end with tiny sizes (its numbers mean nothing here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_tiny_run_measures_every_case(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_scale.py"),
            "--tiny",
            "--tmp",
            str(tmp_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["big_cache"]["misses"] == got["big_cache"]["items"]  # epoch 2 was all hits
    assert got["growth"]["first_step_written_over_size"] <= 0.15
    assert got["merge_vs_cp"]["files_after"] == 1
    assert all("spawned_private_bytes_per_item" in v for v in got["index"].values()), got["index"]
    assert got["big_cache_no_stall"]["misses"] == got["big_cache_no_stall"]["items"]  # the control run
    assert got["fragmented"]["misses"] == 0
    assert set(got["patterns"]["vs_direct"]) == {"direct", "subset_outside", "subset_sampler"}
    assert "merge vs cp" in proc.stdout and "first len() of epoch 2" in proc.stdout
    assert not list(tmp_path.glob("cachedata-bench-scale-*"))  # cleaned up
