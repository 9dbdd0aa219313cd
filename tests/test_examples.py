"""The examples run end to end with tiny sizes: exit 0, a warm epoch with a 100% hit rate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--cache-dir", str(tmp_path / "cache"), *args],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "warm hit rate 100%" in proc.stdout, output
    return proc.stdout


@pytest.mark.timeout(300)
def test_image_classification(tmp_path):
    run_example("image_classification.py", tmp_path, "--items", "24", "--batch-size", "8", "--size", "32")


@pytest.mark.timeout(300)
def test_image_classification_image_folder(tmp_path):
    # benchmarks/ and examples/ both have a top-level _common module: import the examples' own.
    saved = sys.modules.pop("_common", None)
    sys.path.insert(0, str(EXAMPLES))
    try:
        from image_classification import make_image_folder
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("_common", None)
        if saved is not None:
            sys.modules["_common"] = saved
    data = make_image_folder(tmp_path / "images", 12, classes=3)
    out = run_example(
        "image_classification.py", tmp_path, "--data", str(data), "--batch-size", "4", "--size", "32"
    )
    assert "12 images in 3 classes" in out


@pytest.mark.timeout(300)
def test_demo_runs_the_image_example_and_ends_with_a_table(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "demo.py"),
            "--images",
            "16",
            "--size",
            "16",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = dict(
        re.match(r"  (.+?)\s{2,}(.+)$", line).groups()
        for line in proc.stdout.splitlines()
        if line.startswith("  ")
    )
    assert table["warm hit rate"] == "100%", proc.stdout
    assert table["hits / misses (both epochs)"] == "16 / 16", proc.stdout
    for key in ("cold epoch (decode, resize, store, train)", "warm epoch (read, train)", "speed-up"):
        assert re.fullmatch(r"\d+\.\d+ s|\d+\.\dx", table[key]), (key, proc.stdout)
    size_mib = float(table["cache size on disk"].removesuffix(" MiB"))
    assert size_mib > 16 * 3 * 16 * 16 * 4 / 2**20  # at least the float32 images themselves
    assert Path(table["cache folder"]).parent == tmp_path / "c"
    assert "epoch 1 (cold)" in proc.stderr  # the tqdm progress bar


@pytest.mark.timeout(300)
def test_text_classification(tmp_path):
    run_example("text_classification.py", tmp_path, "--items", "60", "--batch-size", "16")


@pytest.mark.timeout(300)
def test_audio_features(tmp_path):
    run_example("audio_features.py", tmp_path, "--items", "12", "--batch-size", "4")


@pytest.mark.timeout(300)
def test_frozen_features(tmp_path):
    run_example("frozen_features.py", tmp_path, "--items", "8", "--batch-size", "4", "--epochs", "2")


@pytest.mark.timeout(300)
def test_kfold_calls_transform_once_per_item(tmp_path):
    n = 40
    out = run_example("kfold.py", tmp_path, "--items", str(n), "--batch-size", "8", "--epochs", "1")
    match = re.search(r"transform calls: (\d+) for (\d+) items and 5 folds", out)
    assert match, out
    assert int(match.group(1)) == n == int(match.group(2))


# The framework examples (their full checks: tests/test_integrations.py, which also runs
# examples/hf_trainer.py). Here: each as a user starts it, without the test-only options.


@pytest.mark.timeout(300)
def test_lightning_datamodule(tmp_path):
    pytest.importorskip("lightning")
    out = run_example("lightning_datamodule.py", tmp_path, "--items", "32", "--batch-size", "8")
    assert "cache: ['merged-000001.h5']" in out


@pytest.mark.timeout(300)
def test_stateful_resume_runs_both_phases_in_new_processes(tmp_path):
    pytest.importorskip("torchdata")
    out = run_example(
        "stateful_resume.py", tmp_path, "--items", "48", "--batch-size", "8", "--stop-after", "2"
    )
    assert "indices seen: 48 (48 distinct) of 48" in out
