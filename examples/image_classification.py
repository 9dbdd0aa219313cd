"""Image classification over a folder of JPEG files, decoded and resized once, read from the cache after.

    python examples/image_classification.py [--data PATH] [--items 400] [--epochs 2]
        [--size 64] [--workers 2] [--batch-size 32] [--cache-dir DIR]

``--data`` is an ImageFolder-style folder (one subfolder per class, image files inside);
without it, ``--items`` JPEG files in 4 classes are generated in a temporary folder. The
deterministic part (``DecodeImage()`` then a torchvision v2 resize + normalize) is the
cached ``transform``; the random flip and crop are the ``post_transform`` and run on every
access. A small CNN is trained for two epochs: the first is cold (decodes and stores every
item), the second warm (reads them back); both times and the warm hit rate are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import (  # examples/_common.py (the script's folder is on sys.path)
    IMAGE_SUFFIXES,
    ClassFolder,
    add_training_args,
    run_epochs,
)
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from cachedata import CachedDataset
from cachedata.transforms import DecodeImage

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_image_folder(root: Path, n: int, *, classes: int = 4) -> Path:
    """Write ``n`` deterministic JPEG files into ``root/class_k/`` (stripes, checks, rings).

    Sides are 320 to 512 pixels, about the size of ImageNet's photos, so decoding costs
    what it costs in a real pipeline.
    """
    from PIL import Image

    for i in range(n):
        label = i % classes
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        h, w = int(rng.integers(320, 513)), int(rng.integers(320, 513))
        yy, xx = np.mgrid[0:h, 0:w]
        period = int(rng.integers(8, 24))
        pattern = [
            (yy // period) % 2,
            (xx // period) % 2,
            ((yy // period) + (xx // period)) % 2,
            (np.hypot(yy - h / 2, xx - w / 2) // period) % 2,
        ][label % 4]
        color = rng.integers(60, 256, 3)
        img = pattern[..., None] * color + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)
    return root


class Preprocess:
    """Deterministic, cached: decode -> resize -> float32 -> normalize."""

    def __init__(self, size: int = 64) -> None:
        self.decode = DecodeImage("RGB")
        self.resize_normalize = v2.Compose(
            [
                v2.Resize((size, size), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN, STD),
            ]
        )

    def __call__(self, sample):
        return self.resize_normalize(self.decode(sample["path"])), sample["label"]


class Augment:
    """Random, not cached: runs after the cache on every access."""

    def __init__(self, size: int = 64) -> None:
        self.augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(size, padding=size // 8)])

    def __call__(self, sample):
        image, label = sample
        return self.augment(image), label


class SmallCNN(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="ImageFolder-style folder (default: generated)")
    ap.add_argument("--items", type=int, default=400, help="images to generate without --data (default 400)")
    ap.add_argument("--size", type=int, default=64, help="resize to SIZE x SIZE (default 64)")
    add_training_args(ap, epochs=2, batch_size=32)
    return ap


def train(
    args: argparse.Namespace, tmp: Path, *, progress: bool = False
) -> tuple[CachedDataset, list[float], list[float]]:
    """Build the cached dataset from ``args`` (generating images under ``tmp``) and train.

    Returns the dataset and, per epoch, its time in seconds and its hit rate (0..1).
    ``progress`` shows a tqdm bar per epoch.
    """
    torch.manual_seed(0)
    data = args.data
    if data is None:
        print(f"writing {args.items} JPEG files ...", flush=True)
        data = make_image_folder(tmp / "images", args.items)
    files = ClassFolder(data, IMAGE_SUFFIXES)
    ds = CachedDataset(
        files,
        args.cache_dir or tmp / "cache",
        transform=Preprocess(args.size),
        post_transform=Augment(args.size),
    )
    print(f"{len(ds)} images in {len(files.classes)} classes; cache namespace {ds.path}", flush=True)
    loader = DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    model = SmallCNN(len(files.classes))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    times, rates = run_epochs(ds, loader, opt, args.epochs, lambda b: (model(b[0]), b[1]), progress=progress)
    del loader  # stop the workers before the temporary folder goes away
    ds.flush()
    ds.merge()  # one consolidated file for the next run
    return ds, times, rates


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cachedata-images-") as tmp:
        train(args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
