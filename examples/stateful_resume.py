"""torchdata's StatefulDataLoader over a CachedDataset: stop mid-epoch, resume in a new process.

    python examples/stateful_resume.py [--items 256] [--batch-size 16] [--workers 2]
        [--stop-after 5] [--cache-dir DIR]

The first process reads ``--stop-after`` batches, saves ``loader.state_dict()`` with
``torch.save`` and exits (as a preempted job would). A second process builds the same
dataset and loader, ``load_state_dict()``s and finishes the epoch: every index is seen exactly
once over both, and items that the first process computed (including the batches its
workers had prefetched but not yet handed over) are hits, not recomputed. Then a warm epoch.
The phases can be run by hand with ``--phase first|resume --state FILE``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from cachedata import CachedCollate, CachedDataset


class Tokens(Dataset):
    """Deterministic ragged token sequences of 8..64 ids."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        length = 8 + int(torch.randint(0, 57, (), generator=g))
        return {"input_ids": torch.randint(0, 1000, (length,), generator=g), "index": i}


class Shift:
    """Deterministic, cached: adds an offset to the ids; ``log`` gets one line per call."""

    def __init__(self, offset: int = 1, log: str | None = None) -> None:
        self.offset = offset
        self.log = log

    def __call__(self, item: dict) -> dict:
        if self.log is not None:
            with open(self.log, "a") as fh:
                fh.write(f"{item['index']}\n")
        return {"input_ids": item["input_ids"] + self.offset, "index": item["index"]}


def build(args: argparse.Namespace) -> tuple[CachedDataset, StatefulDataLoader]:
    ds = CachedDataset(Tokens(args.items), args.cache_dir, transform=Shift(log=args.log_calls))
    loader = StatefulDataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=CachedCollate(),
        generator=torch.Generator().manual_seed(0),
    )
    return ds, loader


def run_phase(args: argparse.Namespace) -> dict:
    """One process's part: ``first`` stops after ``--stop-after`` batches, ``resume`` finishes."""
    ds, loader = build(args)
    seen: list[int] = []
    if args.phase == "resume":
        loader.load_state_dict(torch.load(args.state, weights_only=False))
    for b, batch in enumerate(loader):
        seen += batch["index"].tolist()
        if args.phase == "first" and b + 1 == args.stop_after:
            torch.save(loader.state_dict(), args.state)
            break
    del loader  # stop the workers: their counts are final now
    stats = ds.stats
    report = {"phase": args.phase, "seen": seen, "hits": stats.hits, "misses": stats.misses}
    if args.phase == "resume":  # and a warm epoch
        ds, loader = build(args)
        warm = [i for batch in loader for i in batch["index"].tolist()]
        del loader
        report["warm"] = {"seen": len(warm), "hits": ds.stats.hits, "misses": ds.stats.misses}
        ds.merge()
    print(f"{args.phase}: {len(seen)} items, {stats.hits} hits, {stats.misses} misses", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stop-after", type=int, default=5, help="batches before the first process stops")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one)")
    ap.add_argument("--phase", choices=("both", "first", "resume"), default="both")
    ap.add_argument("--state", type=Path, default=None, help="where the loader's state_dict goes")
    ap.add_argument("--log-calls", default=None, help="append one line per transform call to this file")
    ap.add_argument("--report", type=Path, default=None, help="write this phase's report as JSON here")
    args = ap.parse_args(argv)
    if args.phase != "both":
        report = run_phase(args)
        if args.report is not None:
            args.report.write_text(json.dumps(report))
        return 0
    with tempfile.TemporaryDirectory(prefix="cachedata-stateful-") as tmp:
        common = [sys.argv[0], "--items", str(args.items), "--batch-size", str(args.batch_size),
                  "--workers", str(args.workers), "--stop-after", str(args.stop_after),
                  "--cache-dir", str(args.cache_dir or Path(tmp) / "cache"), "--state", str(Path(tmp) / "state.pt")]  # fmt: skip
        reports = []
        for phase in ("first", "resume"):  # each in a new process
            out = Path(tmp) / f"{phase}.json"
            subprocess.run([sys.executable, *common, "--phase", phase, "--report", str(out)], check=True)
            reports.append(json.loads(out.read_text()))
        seen = reports[0]["seen"] + reports[1]["seen"]
        print(f"indices seen: {len(seen)} ({len(set(seen))} distinct) of {args.items}", flush=True)
        warm = reports[1]["warm"]
        rate = warm["hits"] / max(1, warm["hits"] + warm["misses"])
        print(f"warm hit rate {rate:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
