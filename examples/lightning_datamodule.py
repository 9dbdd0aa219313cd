"""Lightning: a LightningDataModule serving a CachedDataset through CachedCollate.

    python examples/lightning_datamodule.py [--items 512] [--epochs 2] [--workers 2]
        [--batch-size 32] [--strategy auto|ddp_spawn] [--devices 1] [--build-in setup|init]
        [--cache-dir DIR] [--report FILE]

The DataModule builds its ``CachedDataset`` either in ``setup()`` (once per rank) or in
``__init__`` (once, in the launching process; ``ddp_spawn`` then pickles it to every rank).
Either way each item's transform runs once in the whole job, the second epoch reads every
item from the cache, and each rank's ``stats`` count only that rank's reads. After
``fit`` one ``merge()`` leaves a single consolidated file for the next run.
``--report FILE`` writes per-rank, per-epoch stats as JSON (the tests read it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cachedata import CachedCollate, CachedDataset

CLASSES = 4


class Signals(Dataset):
    """Deterministic raw signals of 64 to 256 samples: a class-dependent frequency plus noise."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        label = i % CLASSES
        length = 64 + int(torch.randint(0, 193, (), generator=g))
        t = torch.arange(length) / 64
        return {"signal": torch.sin(6.28 * (label + 1) * t) + 0.3 * torch.randn(length, generator=g),
                "label": label}  # fmt: skip


class Spectrum:
    """Deterministic, cached: 32 log-magnitude FFT bins of the signal.

    ``log`` (optional) gets one line per call, from any process: how the tests count calls.
    """

    def __init__(self, bins: int = 32, log: str | None = None) -> None:
        self.bins = bins
        self.log = log

    def __call__(self, item: dict) -> dict:
        if self.log is not None:
            with open(self.log, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        spectrum = torch.fft.rfft(item["signal"], n=2 * self.bins).abs()[: self.bins]
        return {"features": spectrum.log1p(), "label": item["label"]}


class SignalsDataModule(L.LightningDataModule):
    def __init__(
        self, cache_dir: Path, *, items: int, batch_size: int, workers: int, worker_start: str | None = None,
        build_in: str = "setup", log: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.cache_dir, self.items, self.log = cache_dir, items, log
        self.batch_size, self.workers, self.worker_start = batch_size, workers, worker_start
        self.train_ds: CachedDataset | None = self._build() if build_in == "init" else None

    def _build(self) -> CachedDataset:
        return CachedDataset(Signals(self.items), self.cache_dir, transform=Spectrum(log=self.log))

    def setup(self, stage: str) -> None:
        if self.train_ds is None:  # build_in == "setup": every rank builds its own
            self.train_ds = self._build()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_ds,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.workers,
            persistent_workers=self.workers > 0,
            multiprocessing_context=self.worker_start if self.workers > 0 else None,
            collate_fn=CachedCollate(),
        )


class Classifier(L.LightningModule):
    def __init__(self, bins: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(bins, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["features"]), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class EpochStats(L.Callback):
    """Records this rank's ``stats`` at the end of every epoch (into ``report`` as JSON)."""

    def __init__(self, report: Path | None) -> None:
        self.report = report
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        stats = trainer.datamodule.train_ds.stats
        self.epochs.append({"hits": stats.hits, "misses": stats.misses})
        print(f"rank {trainer.global_rank} epoch {len(self.epochs)}: {stats.hits} hits, "
              f"{stats.misses} misses (this rank, all epochs so far)", flush=True)  # fmt: skip
        if self.report is not None:
            path = self.report.with_name(f"{self.report.name}.rank{trainer.global_rank}")
            path.write_text(json.dumps({"pid": os.getpid(), "epochs": self.epochs}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (default 2)")
    ap.add_argument("--worker-start", choices=("fork", "spawn", "forkserver"), default=None,
                    help="DataLoader workers' start method (default: the platform's)")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--strategy", default="auto", help="auto (one process) or ddp_spawn")
    ap.add_argument("--devices", type=int, default=1, help="CPU ranks (default 1)")
    ap.add_argument("--build-in", choices=("setup", "init"), default="setup")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one)")
    ap.add_argument("--log-calls", default=None, help="append one line per transform call to this file")
    ap.add_argument("--report", type=Path, default=None, help="write per-rank stats as JSON here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cachedata-lightning-") as tmp:
        cache_dir = args.cache_dir or Path(tmp) / "cache"
        dm = SignalsDataModule(cache_dir, items=args.items, batch_size=args.batch_size,
                               workers=args.workers, worker_start=args.worker_start,
                               build_in=args.build_in, log=args.log_calls)  # fmt: skip
        stats = EpochStats(args.report)
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=args.devices,
            strategy=args.strategy,
            callbacks=[stats],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        trainer.fit(Classifier(), datamodule=dm)
        # One consolidated file for the next run (rank 0 of this job is this process again).
        ds = dm.train_ds if dm.train_ds is not None else dm._build()
        ds.merge()
        if stats.epochs and len(stats.epochs) > 1:  # ranks ran here (not spawned)
            warm = stats.epochs[1]["hits"] - stats.epochs[0]["hits"]
            missed = stats.epochs[1]["misses"] - stats.epochs[0]["misses"]
            print(f"warm hit rate {warm / max(1, warm + missed):.0%}", flush=True)
        elif args.report is not None:  # ddp_spawn: read what the ranks recorded
            reports = [
                json.loads(p.read_text())
                for p in sorted(args.report.parent.glob(args.report.name + ".rank*"))
            ]
            warm = sum(r["epochs"][-1]["hits"] - r["epochs"][0]["hits"] for r in reports)
            missed = sum(r["epochs"][-1]["misses"] - r["epochs"][0]["misses"] for r in reports)
            print(f"warm hit rate {warm / max(1, warm + missed):.0%}", flush=True)
        print(f"cache: {sorted(p.name for p in ds.path.glob('*.h5'))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
