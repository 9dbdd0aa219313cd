"""Linear probe on frozen ResNet-18 features: each item goes through the backbone once, ever.

    python examples/frozen_features.py [--data DIR] [--items 64] [--epochs 10]
        [--workers 2] [--batch-size 16] [--cache-dir DIR]

A torchvision ``resnet18(weights=None)`` built under a fixed seed (so its weights, and the
cache namespace, are the same on every run), its classifier replaced by ``Identity`` and
frozen with ``requires_grad_(False)``, is wrapped in ``Features(model)``: the cached
``transform`` turns a ``3x224x224`` input into a 512-d feature vector, with one stacked
forward pass per batch of misses (``Features.batch``). Inputs are ``--items`` generated
tensors in 4 classes, or the images of an ImageFolder-style ``--data`` folder (decoded and
resized with ``DecodeImage`` first). A linear probe trained on top costs almost nothing once
the features are cached: the first epoch is cold (runs the backbone), later epochs warm.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from _common import (  # examples/_common.py (the script's folder is on sys.path)
    IMAGE_SUFFIXES,
    ClassFolder,
    add_training_args,
    run_epochs,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cachedata import CachedDataset
from cachedata.transforms import DecodeImage, Features

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class GeneratedImages(Dataset):
    """Deterministic 3x224x224 float tensors: per-class color bias and frequency plus noise."""

    def __init__(self, n: int, classes: int = 4) -> None:
        self.n = n
        self.classes = [f"class_{k}" for k in range(classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)  # a local generator: the item is the same on every call
        label = i % len(self.classes)
        yy, xx = np.mgrid[0:224, 0:224] / 224.0
        wave = np.sin(2 * np.pi * (label + 1) * 3 * (xx if label % 2 else yy))
        image = rng.normal(0, 0.5, (3, 224, 224)) + wave
        image[label % 3] += 1.0
        return {"image": torch.from_numpy(image.astype(np.float32)), "label": label}


def frozen_resnet18(seed: int = 0) -> nn.Module:
    """resnet18 with no pretrained weights, initialized under ``seed``, without its classifier, frozen."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    return model.requires_grad_(False).eval()


class BackboneFeatures:
    """Deterministic, cached: (decode + resize +) frozen backbone -> {"features": [512], "label"}."""

    def __init__(self, model: nn.Module, decode: bool = False) -> None:
        self.features = Features(model)
        self.decode = DecodeImage("RGB") if decode else None
        self.prepare = v2.Compose(
            [
                v2.Resize((224, 224), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN, STD),
            ]
        )

    def _input(self, item) -> torch.Tensor:
        if self.decode is None:
            return item["image"]
        return self.prepare(self.decode(item["path"]))

    def __call__(self, item):
        return {"features": self.features(self._input(item)), "label": item["label"]}

    def batch(self, items: list) -> list:
        """All misses of one ``__getitems__`` call in one stacked forward pass."""
        feats = self.features.batch([self._input(item) for item in items])
        return [{"features": f, "label": item["label"]} for f, item in zip(feats, items)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="ImageFolder-style folder (default: generated)")
    ap.add_argument("--items", type=int, default=64, help="inputs to generate without --data (default 64)")
    add_training_args(ap, epochs=10, batch_size=16)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base = ClassFolder(args.data, IMAGE_SUFFIXES) if args.data else GeneratedImages(args.items)
    with tempfile.TemporaryDirectory(prefix="cachedata-features-") as tmp:
        ds = CachedDataset(
            base,
            args.cache_dir or Path(tmp) / "cache",
            transform=BackboneFeatures(frozen_resnet18(seed=0), decode=args.data is not None),
        )
        print(f"{len(ds)} items in {len(base.classes)} classes; cache namespace {ds.path}", flush=True)
        loader = DataLoader(
            ds,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        # a linear probe (features standardized first: a random-init backbone has no fixed scale)
        probe = nn.Sequential(nn.LayerNorm(512, elementwise_affine=False), nn.Linear(512, len(base.classes)))
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        run_epochs(ds, loader, opt, args.epochs, lambda batch: (probe(batch["features"]), batch["label"]))
        del loader  # stop the workers before the temporary folder goes away
        ds.flush()
        ds.merge()  # one consolidated file for the next run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
