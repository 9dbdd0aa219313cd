"""Audio classification on log-mel features: decode, resample and mel once, read from the cache after.

    python examples/audio_features.py [--data DIR] [--items 120] [--epochs 2]
        [--workers 2] [--batch-size 16] [--cache-dir DIR]

``--data`` is a folder with one subfolder per class holding audio files (anything
libsndfile reads); without it, ``--items`` FLAC and WAV files (tones, noise and two-tone
chords, 1 to 3 s, at 8, 16 and 44.1 kHz) are written with soundfile. The cached
``transform`` is ``DecodeAudio(16000)`` (decode + resample to 16 kHz) then a torchaudio
``MelSpectrogram`` and a log, giving ``[frames, 40]`` per file; random gain and time masking
are the ``post_transform``. ``CachedCollate()`` pads the ragged batches and adds
``mel_lengths``, which the small model uses for a masked mean over time. The first epoch is
cold (decodes and stores), the second warm (reads back); times and hit rates are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchaudio
from _common import (  # examples/_common.py (the script's folder is on sys.path)
    AUDIO_SUFFIXES,
    ClassFolder,
    add_training_args,
    run_epochs,
)
from torch import nn
from torch.utils.data import DataLoader

from cachedata import CachedCollate, CachedDataset
from cachedata.transforms import DecodeAudio

CLASSES = ("tone", "noise", "chord")


def make_audio_folder(root: Path, n: int) -> Path:
    """Write ``n`` deterministic audio files into ``root/<class>/`` at mixed rates and formats."""
    import soundfile as sf

    for i in range(n):
        rng = np.random.default_rng(i)
        label = i % len(CLASSES)
        rate = (8000, 16000, 44100)[(i // len(CLASSES)) % 3]
        seconds = float(rng.uniform(1.0, 3.0))
        t = np.arange(int(seconds * rate)) / rate
        f0 = float(rng.uniform(200, 1500))
        if CLASSES[label] == "tone":
            wave = np.sin(2 * np.pi * f0 * t)
        elif CLASSES[label] == "noise":
            wave = rng.standard_normal(t.shape) * 0.4
        else:
            wave = 0.5 * np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(2 * np.pi * f0 * 1.5 * t)
        wave = 0.5 * wave + 0.02 * rng.standard_normal(t.shape)
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".flac" if i % 2 else ".wav"
        sf.write(folder / f"clip_{i:05d}{suffix}", wave.astype(np.float32), rate, subtype="PCM_16")
    return root


class LogMel:
    """Deterministic, cached: decode + resample to 16 kHz, mel spectrogram, log -> [frames, n_mels]."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 40) -> None:
        self.decode = DecodeAudio(sample_rate)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=400, hop_length=160, n_mels=n_mels
        )

    def __call__(self, item):
        wave = self.decode(item["path"])
        mel = (self.mel(wave) + 1e-6).log()  # [n_mels, frames]
        return {"mel": mel.T.contiguous(), "label": item["label"]}  # time first: padded, with lengths


class GainAndMask:
    """Random, not cached: a random gain (a shift of the log-mel) and one time mask."""

    def __init__(self, max_mask: int = 20) -> None:
        self.max_mask = max_mask

    def __call__(self, item):
        mel = item["mel"] + (torch.rand(()) - 0.5)
        width = int(torch.randint(0, self.max_mask + 1, ()))
        start = int(torch.randint(0, max(1, mel.shape[0] - width), ()))
        mel[start : start + width] = mel.mean()
        item["mel"] = mel
        return item


class MelClassifier(nn.Module):
    def __init__(self, n_mels: int, classes: int, dim: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(n_mels, dim, 5, padding=2), nn.ReLU(), nn.Conv1d(dim, dim, 5, padding=2), nn.ReLU()
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.conv(mel.transpose(1, 2))  # [B, dim, T]
        mask = (torch.arange(h.shape[-1]) < lengths[:, None]).unsqueeze(1)
        pooled = (h * mask).sum(-1) / lengths[:, None].clamp_min(1)
        return self.head(pooled)


def mel_and_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded mel batch and its lengths (CachedCollate adds ``mel_lengths`` only when ragged)."""
    mel = batch["mel"]
    return mel, batch.get("mel_lengths", torch.full((len(mel),), mel.shape[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=None, help="class-per-subfolder audio files (default: generated)"
    )
    ap.add_argument("--items", type=int, default=120, help="files to generate without --data (default 120)")
    add_training_args(ap, epochs=2, batch_size=16)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="cachedata-audio-") as tmp:
        tmp = Path(tmp)
        if args.data is None:
            print(f"writing {args.items} FLAC/WAV files ...", flush=True)
            args.data = make_audio_folder(tmp / "audio", args.items)
        files = ClassFolder(args.data, AUDIO_SUFFIXES)
        ds = CachedDataset(
            files, args.cache_dir or tmp / "cache", transform=LogMel(16000, 40), post_transform=GainAndMask()
        )
        print(f"{len(ds)} files in {len(files.classes)} classes; cache namespace {ds.path}", flush=True)
        loader = DataLoader(
            ds,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            collate_fn=CachedCollate(),  # pads "mel" along time and adds "mel_lengths"
        )
        model = MelClassifier(40, len(files.classes))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        run_epochs(
            ds, loader, opt, args.epochs, lambda batch: (model(*mel_and_lengths(batch)), batch["label"])
        )
        del loader  # stop the workers before the temporary folder goes away
        ds.flush()
        ds.merge()  # one consolidated file for the next run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
