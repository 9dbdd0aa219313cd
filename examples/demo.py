"""cachedata demo: the image example end to end, with a progress bar and a summary table.

    python examples/demo.py [--images 600] [--size 32] [--workers 2] [--cache-dir DIR]

Generates ``--images`` JPEG files (no download) and runs ``image_classification.py`` on
them: the decode + resize + normalize ``transform`` is cached, the random flip and crop
stay live in ``post_transform``, and a small CNN trains for two epochs. The first epoch is
cold (decodes and stores every image), the second warm (reads them back). The table at
the end shows both epochs, the speed-up, the warm hit rate and the cache's size on disk.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from image_classification import build_parser, train  # examples/ is on sys.path


def folder_bytes(path: Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="JPEG files to generate (default 600)")
    ap.add_argument("--size", type=int, default=32, help="train on SIZE x SIZE images (default 32)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one)")
    args = ap.parse_args(argv)

    example_args = build_parser().parse_args(
        [
            "--items",
            str(args.images),
            "--size",
            str(args.size),
            "--workers",
            str(args.workers),
            "--epochs",
            "2",
        ]
    )
    example_args.cache_dir = args.cache_dir
    with tempfile.TemporaryDirectory(prefix="cachedata-demo-") as tmp:
        ds, times, rates = train(example_args, Path(tmp), progress=True)
        stats = ds.stats
        rows = [
            ("cold epoch (decode, resize, store, train)", f"{times[0]:.2f} s"),
            ("warm epoch (read, train)", f"{times[1]:.2f} s"),
            ("speed-up", f"{times[0] / times[1]:.1f}x"),
            ("warm hit rate", f"{rates[1]:.0%}"),
            ("hits / misses (both epochs)", f"{stats.hits} / {stats.misses}"),
            ("transform time, all workers (cold)", f"{stats.compute_seconds:.2f} s"),
            ("cache size on disk", f"{folder_bytes(ds.path) / 2**20:.1f} MiB"),
            ("cache folder", str(ds.path) if args.cache_dir else "temporary (pass --cache-dir to keep it)"),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        for key, value in rows:
            print(f"  {key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
