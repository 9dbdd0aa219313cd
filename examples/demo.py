"""cachedata demo: a folder of JPEG files, decoded + resized + normalized once, then read back.

    python examples/demo.py [--images 600] [--workers 2] [--cache-dir DIR]

Generates the JPEG files (no download), wraps the dataset in CachedDataset, runs a cold
epoch (computes and stores every item) and a warm epoch (reads them back), and ends with a
table: cold epoch, warm epoch, speed-up, hit rate and cache size on disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.io  # noqa: F401 - imported once here, inherited by forked workers
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cachedata import CachedDataset


def make_jpegs(folder: Path, n: int, *, size: int = 384) -> list[Path]:
    """Write ``n`` deterministic JPEG files (smooth gradients plus noise) into ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        p = folder / f"img_{i:05d}.jpg"
        if not p.exists():
            rng = np.random.default_rng(i)
            base = np.stack(
                [(xx * (i % 5 + 1) + yy) % 256, (yy * 2 + i) % 256, (xx + yy * (i % 3)) % 256], -1
            )
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


class JpegFolder(Dataset):
    """(file bytes, label) pairs; the expensive part is left to the transform."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return {"path": self.paths[i], "label": i % 10}


class DecodeResizeNormalize:
    """JPEG decode -> resize -> float32 normalize: deterministic, so it belongs in `transform`."""

    def __init__(self, size: int = 224) -> None:
        self.size = size
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)

    def __call__(self, item):
        from torchvision.io import decode_jpeg, read_file
        from torchvision.transforms.v2 import functional as F

        img = decode_jpeg(read_file(item["path"]))
        img = F.resize(img, [self.size, self.size], antialias=True)
        img = F.normalize(F.to_dtype(img, torch.float32, scale=True), self.mean, self.std)
        return {"image": img, "label": item["label"]}


def random_flip(item):
    """Random augmentation stays live: it runs after the cache on every access."""
    if torch.rand(()) < 0.5:
        item["image"] = item["image"].flip(-1)
    return item


def run_epoch(loader: DataLoader, desc: str) -> float:
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, unit="batch"):
        batch["image"].mean()  # stand-in for a training step
    return time.perf_counter() - start


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="number of JPEG files to generate (default 600)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cachedata-demo-") as tmp:
        tmp = Path(tmp)
        print(f"writing {args.images} JPEG files ...")
        paths = make_jpegs(tmp / "images", args.images)
        cache_dir = args.cache_dir or tmp / "cache"
        ds = CachedDataset(
            JpegFolder(paths), cache_dir, transform=DecodeResizeNormalize(224), post_transform=random_flip
        )
        loader = DataLoader(
            ds,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        cold = run_epoch(loader, "cold epoch (decode + resize + store)")
        after_cold = ds.stats
        warm = run_epoch(loader, "warm epoch (read from cache)")
        total = ds.stats
        warm_hits = total.hits - after_cold.hits
        warm_lookups = warm_hits + total.misses - after_cold.misses
        rows = [
            ("cold epoch", f"{cold:.2f} s"),
            ("warm epoch", f"{warm:.2f} s"),
            ("speed-up", f"{cold / warm:.1f}x"),
            ("warm hit rate", f"{warm_hits / max(1, warm_lookups):.0%}"),
            ("hits / misses (both epochs)", f"{total.hits} / {total.misses}"),
            ("transform time (cold)", f"{total.compute_seconds:.2f} s"),
            ("cache size on disk", f"{folder_bytes(ds.path) / 2**20:.1f} MiB"),
            ("cache folder", str(ds.path)),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
