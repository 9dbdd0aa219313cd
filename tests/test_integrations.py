"""cachedata under the frameworks people train with: real Lightning, transformers and torchdata.

Each test runs the matching script in examples/ in a fresh process (as a user would) and
checks what it left behind: transform calls (one log line per call, from any process), the
per-rank stats it recorded, the files in the cache folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import count_calls

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, tmp_path: Path, *args: str, timeout: int = 400) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _data_files(cache: Path) -> list[str]:
    (ns,) = [p for p in cache.iterdir() if p.is_dir()]
    return sorted(p.name for p in ns.glob("*.h5"))


# ----------------------------------------------------------------------------- Lightning

LIGHTNING_ITEMS = 48


@pytest.mark.timeout(450)
@pytest.mark.parametrize(
    ("strategy", "devices", "build_in"),
    [
        ("auto", 1, "setup"),
        # about a minute each on 2 busy CPUs: mostly the two ranks importing Lightning
        pytest.param("ddp_spawn", 2, "init", marks=pytest.mark.slow),
        pytest.param("ddp_spawn", 2, "setup", marks=pytest.mark.slow),
    ],
)
def test_lightning_datamodule(tmp_path, strategy, devices, build_in):
    pytest.importorskip("lightning")
    log, report = tmp_path / "calls.log", tmp_path / "stats.json"
    out = _run(
        "lightning_datamodule.py",
        tmp_path,
        *("--items", str(LIGHTNING_ITEMS), "--batch-size", "8", "--epochs", "2"),
        *("--workers", "2", "--worker-start", "fork"),
        *("--strategy", strategy, "--devices", str(devices), "--build-in", build_in),
        *("--cache-dir", str(tmp_path / "cache"), "--log-calls", str(log), "--report", str(report)),
    )
    assert count_calls(log) == LIGHTNING_ITEMS, "each item is computed once in the whole job"
    per_rank = LIGHTNING_ITEMS // devices
    reports = [json.loads((tmp_path / f"stats.json.rank{r}").read_text()) for r in range(devices)]
    assert len({r["pid"] for r in reports}) == devices
    for rank, rep in enumerate(reports):
        # Each rank's stats are its own (not the job's): its share of misses in epoch 1, and
        # its share of hits in epoch 2 (all hits, though half its items were computed by the
        # other rank).
        assert rep["epochs"] == [
            {"hits": 0, "misses": per_rank},
            {"hits": per_rank, "misses": per_rank},
        ], (rank, rep)
    assert "warm hit rate 100%" in out
    assert _data_files(tmp_path / "cache") == ["merged-000001.h5"], "the cache ends consolidated"


# ----------------------------------------------------------------------------- transformers

HF_ITEMS = 48


@pytest.mark.timeout(400)
def test_hf_trainer_with_tokenize_and_cached_collate(tmp_path):
    pytest.importorskip("transformers")
    log = tmp_path / "calls.log"
    out = _run(
        "hf_trainer.py",
        tmp_path,
        *("--items", str(HF_ITEMS), "--batch-size", "8", "--epochs", "2", "--workers", "2"),
        *("--cache-dir", str(tmp_path / "cache"), "--log-calls", str(log)),
    )
    assert count_calls(log) == HF_ITEMS
    # The main process's stats include its dataloader_num_workers workers' counts.
    assert f"epoch 1: 0 hits, {HF_ITEMS} misses" in out
    assert f"epoch 2: {HF_ITEMS} hits, {HF_ITEMS} misses" in out
    assert "warm hit rate 100%" in out and "training loss" in out
    assert _data_files(tmp_path / "cache") == ["merged-000001.h5"]


def test_hf_tokenizer_round_trips_through_json_and_collates_what_the_model_takes(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from hf_trainer import Sentences, TokenizeForTrainer, train_tokenizer
        from text_classification import make_sentences
    finally:
        sys.path.remove(str(EXAMPLES))
    from transformers import PreTrainedTokenizerFast

    from cachedata import CachedCollate, CachedDataset, fingerprint

    rows = make_sentences(12)
    tok = train_tokenizer([t for t, _ in rows], tmp_path / "tokenizer.json")
    again = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="[PAD]")
    assert fingerprint(TokenizeForTrainer(tok)) == fingerprint(TokenizeForTrainer(again))
    ds = CachedDataset(Sentences(rows), tmp_path / "c", transform=TokenizeForTrainer(tok))
    batch = CachedCollate()([ds[i] for i in range(4)])
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].tolist() == [
        0,
        1,
        2,
        0,
    ]
    want = again([rows[i][0] for i in range(4)], padding=True, truncation=True, max_length=48)
    assert batch["input_ids"].tolist() == want["input_ids"]
    assert batch["attention_mask"].tolist() == want["attention_mask"]


# ----------------------------------------------------------------------------- torchdata

STATEFUL_ITEMS = 96


@pytest.mark.timeout(400)
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_in_a_new_process(tmp_path, workers):
    pytest.importorskip("torchdata")
    log = tmp_path / "calls.log"
    common = [
        *("--items", str(STATEFUL_ITEMS), "--batch-size", "8", "--workers", str(workers)),
        *("--stop-after", "4", "--cache-dir", str(tmp_path / "cache"), "--state", str(tmp_path / "state.pt")),
        *("--log-calls", str(log)),
    ]
    _run("stateful_resume.py", tmp_path, *common, "--phase", "first", "--report", str(tmp_path / "a.json"))
    first = json.loads((tmp_path / "a.json").read_text())
    first_calls = count_calls(log)
    assert len(first["seen"]) == 32
    # Every transform call is counted, including those for batches that the workers had
    # prefetched when the loader stopped (these were lost from stats before).
    assert first["misses"] == first_calls >= 32
    _run("stateful_resume.py", tmp_path, *common, "--phase", "resume", "--report", str(tmp_path / "b.json"))
    second = json.loads((tmp_path / "b.json").read_text())
    seen = first["seen"] + second["seen"]
    assert sorted(seen) == list(range(STATEFUL_ITEMS)), "every index is seen exactly once"
    calls = [int(line) for line in log.read_text().split()]
    assert sorted(calls) == list(range(STATEFUL_ITEMS)), "nothing already computed is computed again"
    assert second["misses"] == len(calls) - first_calls
    assert second["hits"] == first_calls - 32, "what the first process prefetched is a hit"
    assert second["warm"] == {"seen": STATEFUL_ITEMS, "hits": STATEFUL_ITEMS, "misses": 0}
