"""The measuring side of bench_peers.py: workloads, the systems compared, and the processes.

``bench_peers.py`` (the orchestrator) imports nothing heavy. It starts this file once per
malloc variant as a *zygote* (``python _peers_runner.py --zygote``, with that variant's
``MALLOC_*`` environment): the zygote imports torch, cachedata, MONAI and Hugging Face
datasets once, then forks one child per (workload, system). Each child builds (cold pass) or
opens its store, calibrates and warms up its readers, and then measures one round of the warm
columns each time the orchestrator asks, so that rounds can be interleaved across systems
while every system keeps its own process (its own peak RSS, its own allocator settings, no
import cost per measurement). One-shot tasks (generating the source files, the 1 ms cold
case, the scaling probes) are forked children too.

Protocol: one JSON object per line on the zygote's stdin, one JSON reply per line on its
original stdout (libraries' prints go to stderr). A reply with an "error" key carries a
traceback.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from _common import reset_hwm, rss, vm_hwm

from cachedata import CachedCollate, CachedDataset

BATCH = 64
FORK = multiprocessing.get_context("fork")

# ============================================================================ workloads
# Every system caches the same function of the same inputs: the source yields a cheap
# descriptor per item (a file path, a record number) and the cached transform reads and
# processes it (decode + resize + normalize, FLAC decode, tokenization), the way MONAI's
# Load* transforms, a Hugging Face map over a column of paths, and cachedata's examples work.


class Descriptors(Dataset):
    """The raw dataset: item i is its descriptor (a path or a record number)."""

    def __init__(self, name: str, items: list) -> None:
        self.name, self.items = name, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def __cachedata_fingerprint__(self) -> str:
        return f"bench-peers-{self.name}-{len(self.items)}-{self.items[0]}-{self.items[-1]}"


class ImagePreprocess:
    """JPEG file -> float32 [3, 224, 224]: DecodeImage, resize (antialiased), scale, normalize."""

    def __init__(self) -> None:
        from torchvision.transforms import v2

        from cachedata.transforms import DecodeImage

        self.decode = DecodeImage("RGB")
        self.resize_normalize = v2.Compose(
            [
                v2.Resize((224, 224), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    def __call__(self, path: str) -> torch.Tensor:
        return self.resize_normalize(self.decode(path))


class AudioPreprocess:
    """FLAC file -> float32 [T] at 16 kHz (DecodeAudio)."""

    def __init__(self) -> None:
        from cachedata.transforms import DecodeAudio

        self.decode = DecodeAudio(16000)

    def __call__(self, path: str) -> torch.Tensor:
        return self.decode(path)


class TokenizeRecord:
    """Record number -> int64 token ids: read the record's UTF-8 text from one text file and map
    its whitespace-separated words through a word-level vocabulary (unknown words -> ``unk``)."""

    VOCAB = 30_000

    def __init__(self, blob: Path, offsets: Path) -> None:
        self.blob, self.offsets_path = str(blob), str(offsets)
        self._mm: np.memmap | None = None
        self._offsets: np.ndarray | None = None
        self._vocab: dict[bytes, int] | None = None

    def _open(self) -> None:
        self._offsets = np.load(self.offsets_path)
        self._mm = np.memmap(self.blob, dtype=np.uint8, mode="r")
        ids = np.random.default_rng(21).permutation(self.VOCAB).tolist()
        self._vocab = {b"w%d" % j: ids[j] for j in range(self.VOCAB)}

    def __call__(self, i: int) -> torch.Tensor:
        if self._vocab is None:
            self._open()
        off, vocab = self._offsets, self._vocab
        text = bytes(self._mm[off[i] : off[i + 1]])  # type: ignore[index]
        unk = self.VOCAB
        ids = [vocab.get(w, unk) for w in text.split()]  # type: ignore[union-attr]
        return torch.from_numpy(np.array(ids, dtype=np.int64))

    def __getstate__(self) -> dict:
        return {
            "blob": self.blob,
            "offsets_path": self.offsets_path,
            "_mm": None,
            "_offsets": None,
            "_vocab": None,
        }

    def __cachedata_fingerprint__(self) -> str:
        return f"TokenizeRecord-v1-{os.path.getsize(self.blob)}-{self.VOCAB}"

    def __repr__(self) -> str:
        return f"TokenizeRecord({Path(self.blob).name}, vocab={self.VOCAB})"


def unwrap(item: Any) -> torch.Tensor:
    """Hugging Face rows are {"x": tensor}; every other system returns the tensor."""
    return item["x"] if isinstance(item, dict) else item


def collate_fixed(batch: list) -> torch.Tensor:
    # default_collate stacks into shared memory inside a DataLoader worker (no extra copy)
    return default_collate([unwrap(b) for b in batch])


def collate_ragged(batch: list) -> torch.Tensor:
    return pad_sequence([unwrap(b) for b in batch], batch_first=True)


class Workload:
    name = ""
    ragged = False
    dtype = "float32"
    item_shape: tuple[int, ...] | None = None

    def __init__(self, root: Path, n: int) -> None:
        self.root, self.n = Path(root), n

    def descriptors(self) -> list:
        raise NotImplementedError

    def transform(self) -> Callable[[Any], torch.Tensor]:
        raise NotImplementedError

    def generate(self) -> None:
        raise NotImplementedError

    def collate(self) -> Callable:
        return collate_ragged if self.ragged else collate_fixed

    def hf_feature(self) -> Any:
        import datasets

        if self.ragged:  # List since datasets 4; Sequence before
            return getattr(datasets, "List", datasets.Sequence)(datasets.Value(self.dtype))
        return datasets.Array3D(shape=self.item_shape, dtype=self.dtype)


class ImageWorkload(Workload):
    name, ragged, dtype, item_shape = "image", False, "float32", (3, 224, 224)
    hf_batch, hf_writer_batch = 64, 64

    def folder(self) -> Path:
        return self.root / "images"

    def descriptors(self) -> list:
        return [str(self.folder() / f"img_{i:05d}.jpg") for i in range(self.n)]

    def transform(self) -> Callable:
        return ImagePreprocess()

    def generate(self) -> None:
        from PIL import Image

        self.folder().mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(self.descriptors()):
            rng = np.random.default_rng([10, i])
            h, w = int(rng.integers(240, 321)), int(rng.integers(240, 321))
            base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
                (w, h), Image.BICUBIC
            )
            arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


class AudioWorkload(Workload):
    name, ragged, dtype = "audio", True, "float32"
    hf_batch, hf_writer_batch = 64, 128

    def folder(self) -> Path:
        return self.root / "audio"

    def descriptors(self) -> list:
        return [str(self.folder() / f"clip_{i:05d}.flac") for i in range(self.n)]

    def transform(self) -> Callable:
        return AudioPreprocess()

    def generate(self) -> None:
        import soundfile as sf

        self.folder().mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(self.descriptors()):
            rng = np.random.default_rng([11, i])
            t = np.arange(int(rng.uniform(1.0, 5.0) * 16000), dtype=np.float32) / 16000
            wave = 0.4 * np.sin(2 * np.pi * float(rng.uniform(100, 1000)) * t)
            wave += 0.05 * rng.standard_normal(t.size, dtype=np.float32)
            sf.write(path, wave, 16000, subtype="PCM_16", format="FLAC")


class TokensWorkload(Workload):
    name, ragged, dtype = "tokens", True, "int64"
    hf_batch, hf_writer_batch = 1000, 1000

    def descriptors(self) -> list:
        return list(range(self.n))

    def transform(self) -> Callable:
        return TokenizeRecord(self.root / "texts.bin", self.root / "texts-offsets.npy")

    def generate(self) -> None:
        rng = np.random.default_rng(20)
        lengths = rng.integers(32, 513, self.n)
        # a few words (1 in 200) are out of the vocabulary and become the unknown id
        words = rng.integers(0, int(TokenizeRecord.VOCAB * 1.005), int(lengths.sum()))
        table = [b"w%d" % j for j in range(int(TokenizeRecord.VOCAB * 1.005) + 1)]
        offsets = np.zeros(self.n + 1, np.int64)
        pos = 0
        with open(self.root / "texts.bin", "wb") as f:
            for i, length in enumerate(lengths.tolist()):
                text = b" ".join([table[j] for j in words[pos : pos + length].tolist()])
                pos += length
                f.write(text)
                offsets[i + 1] = offsets[i] + len(text)
        np.save(self.root / "texts-offsets.npy", offsets)


WORKLOADS: dict[str, type[Workload]] = {
    "image": ImageWorkload,
    "tokens": TokensWorkload,
    "audio": AudioWorkload,
}


# ============================================================================== systems


class Transformed(Dataset):
    """Uncached: ``transform(source[i])`` on every access."""

    def __init__(self, items: list, transform: Callable) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.items[i])


class MemmapItems(Dataset):
    """The limit: the transform outputs concatenated in one raw file, read through np.memmap
    (one copy out of the page cache per item)."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        self.mm = np.memmap(folder / "data.bin", dtype=meta["dtype"], mode="r")
        self.offsets = np.load(folder / "offsets.npy").tolist()  # in elements
        self.shape = tuple(meta["item_shape"]) if meta["item_shape"] else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.mm[self.offsets[i] : self.offsets[i + 1]]))
        return x.view(self.shape) if self.shape else x


class NpzItems(Dataset):
    """One ``np.savez`` file per item, read with ``np.load`` (what projects hand-write)."""

    def __init__(self, folder: Path, n: int) -> None:
        self.paths = [str(folder / f"{i:07d}.npz") for i in range(n)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with np.load(self.paths[i]) as z:
            return torch.from_numpy(z["x"])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cold_epoch(ds: Dataset, wl: Workload, perm: list[int]) -> None:
    """The first training epoch of a lazily filled cache: DataLoader(batch_size=64), random order."""
    loader = DataLoader(ds, batch_size=BATCH, sampler=perm, num_workers=0, collate_fn=wl.collate())
    assert _common.epoch(loader) == len(perm)


class System:
    """build(): the cold pass into an empty store; open(): a reader on the built store."""

    name = ""
    builds_on_open = False  # an in-RAM cache: opening it IS the cold pass

    def __init__(self, wl: Workload, store: Path) -> None:
        self.wl, self.store = wl, Path(store)
        self.build_parts: dict[str, float] = {}  # where a cold pass's time went, when known

    def build(self, perm: list[int]) -> None:
        pass

    def open(self) -> Dataset:
        raise NotImplementedError

    def disk_bytes(self) -> int:
        return folder_bytes(self.store) if self.store.exists() else 0

    def check_after(self, ds: Dataset) -> str | None:
        """A reason the warm reads were not what they claim (e.g. recomputed items), or None."""
        return None

    def collate(self) -> Callable:
        """The DataLoader columns' collate_fn (the workload's stack-or-pad by default)."""
        return self.wl.collate()


class Uncached(System):
    name = "uncached"

    def open(self) -> Dataset:
        return Transformed(self.wl.descriptors(), self.wl.transform())


class Limit(System):
    name = "limit"

    def build(self, perm: list[int]) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        tf = self.wl.transform()
        offsets = [0]
        with open(self.store / "data.bin", "wb") as f:
            for d in self.wl.descriptors():
                a = tf(d).numpy()
                f.write(a.tobytes())
                offsets.append(offsets[-1] + a.size)
        np.save(self.store / "offsets.npy", np.asarray(offsets, np.int64))
        meta = {"dtype": self.wl.dtype, "item_shape": self.wl.item_shape}
        (self.store / "meta.json").write_text(json.dumps(meta))

    def open(self) -> Dataset:
        return MemmapItems(self.store)


class Cachedata(System):
    name = "cachedata"

    def _make(self) -> CachedDataset:
        return CachedDataset(
            Descriptors(self.wl.name, self.wl.descriptors()), self.store, transform=self.wl.transform()
        )

    def build(self, perm: list[int]) -> None:
        cds = self._make()
        t0 = time.perf_counter()
        cold_epoch(cds, self.wl, perm)
        t1 = time.perf_counter()
        cds.merge()
        self.build_parts = {"epoch_seconds": t1 - t0, "merge_seconds": time.perf_counter() - t1}

    def open(self) -> Dataset:
        return self._make()

    def check_after(self, ds: Dataset) -> str | None:
        st = ds.stats  # type: ignore[attr-defined]
        return None if st.misses == 0 else f"cachedata computed {st.misses} items during warm reads"


class CachedataCollate(Cachedata):
    """cachedata as its users run it: the DataLoader columns collate with CachedCollate."""

    name = "cachedata_collate"

    def collate(self) -> Callable:
        return CachedCollate()


def monai_compose(fn: Callable) -> Any:
    """Our transform as one deterministic MONAI Transform (MONAI treats a plain callable as random
    and would not cache it), in a Compose as MONAI's datasets expect."""
    from monai.transforms import Compose, Transform

    class Preprocess(Transform):
        def __init__(self, f: Callable) -> None:
            self.f = f

        def __call__(self, data: Any) -> Any:
            return self.f(data)

    return Compose([Preprocess(fn)])


class MonaiPersistent(System):
    name = "monai_persistent"

    def _make(self) -> Dataset:
        from monai.data import PersistentDataset

        return PersistentDataset(
            data=self.wl.descriptors(), transform=monai_compose(self.wl.transform()), cache_dir=self.store
        )

    def build(self, perm: list[int]) -> None:
        cold_epoch(self._make(), self.wl, perm)

    def open(self) -> Dataset:
        self.files_at_open = sum(1 for _ in self.store.iterdir())
        return self._make()

    def check_after(self, ds: Dataset) -> str | None:
        now = sum(1 for _ in self.store.iterdir())
        return (
            None if now == self.files_at_open else f"MONAI wrote {now - self.files_at_open} new cache files"
        )


class MonaiCache(System):
    name = "monai_cache"
    builds_on_open = True

    def open(self) -> Dataset:
        from monai.data import CacheDataset

        return CacheDataset(
            data=self.wl.descriptors(),
            transform=monai_compose(self.wl.transform()),
            cache_rate=1.0,
            progress=False,
        )

    def disk_bytes(self) -> int:
        return 0


class HFDatasets(System):
    name = "hf_datasets"

    def _map(self, load: bool) -> Any:
        import datasets

        wl, tf = self.wl, self.wl.transform()

        def process(batch: dict) -> dict:
            xs = [tf(d).numpy() for d in batch["d"]]
            return {"x": xs if wl.ragged else np.stack(xs)}

        self.store.mkdir(parents=True, exist_ok=True)
        base = datasets.Dataset.from_dict({"d": wl.descriptors()})
        mapped = base.map(
            process,
            batched=True,
            batch_size=wl.hf_batch,
            writer_batch_size=wl.hf_writer_batch,
            features=datasets.Features({"x": wl.hf_feature()}),
            remove_columns=["d"],
            cache_file_name=str(self.store / "mapped.arrow"),
            load_from_cache_file=load,
            new_fingerprint=f"bench-peers-{wl.name}-{wl.n}",
        )
        files = [c["filename"] for c in mapped.cache_files]
        if files != [str(self.store / "mapped.arrow")]:
            raise RuntimeError(f"Hugging Face map did not use its cache file: {files}")
        return mapped.with_format("torch")

    def build(self, perm: list[int]) -> None:
        self._map(load=False)

    def open(self) -> Dataset:
        return HFBatched(self._map(load=True))


class HFBatched(Dataset):
    """Hugging Face datasets at its best: ``__getitems__`` (what a DataLoader calls per batch)
    is one slice of the memory-mapped Arrow table through ``with_format("torch")``, not one
    row at a time; ``ds[i]`` is one row."""

    def __init__(self, mapped: Any) -> None:
        self.mapped = mapped

    def __len__(self) -> int:
        return len(self.mapped)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.mapped[i]["x"]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        x = self.mapped[indices]["x"]  # a stacked tensor (fixed shape) or a list (ragged)
        return list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)


class _LitdataFn:
    """litdata.optimize's fn: item i -> {"x": ndarray} (a module-level class: it is pickled)."""

    def __init__(self, wl: Workload) -> None:
        self.tf, self.desc = wl.transform(), wl.descriptors()

    def __call__(self, i: int) -> dict:
        return {"x": self.tf(self.desc[i]).numpy()}


class Litdata(System):
    """litdata: ``optimize()`` to a local folder (64 MB chunks, as its docs recommend), read
    through ``StreamingDataset(input_dir=...)``. Every system is read with the same samplers
    and DataLoaders, so this uses its random access ``ds[i]`` rather than its own shuffled
    StreamingDataLoader order (the same chunks and the same decoding per item)."""

    name = "litdata"

    def build(self, perm: list[int]) -> None:
        import litdata

        # One worker keeps the items in index order (the sanity check compares ds[i]).
        litdata.optimize(fn=_LitdataFn(self.wl), inputs=list(range(self.wl.n)), output_dir=str(self.store),
                         chunk_bytes="64MB", num_workers=1, mode="overwrite")  # fmt: skip

    def open(self) -> Dataset:
        import litdata

        return _Field(litdata.StreamingDataset(input_dir=str(self.store)))


class Mosaic(System):
    """Mosaic streaming: ``MDSWriter`` (raw ndarray columns, fixed shape where there is one,
    64 MiB shards, no compression) to a local folder, read through
    ``StreamingDataset(local=...)`` by random access (see Litdata)."""

    name = "mosaic"

    def build(self, perm: list[int]) -> None:
        from streaming import MDSWriter

        wl, tf = self.wl, self.wl.transform()
        shape = "" if wl.ragged else ":" + ",".join(map(str, wl.item_shape))
        with MDSWriter(
            out=str(self.store), columns={"x": f"ndarray:{wl.dtype}{shape}"}, size_limit=1 << 26
        ) as w:
            for d in wl.descriptors():
                w.write({"x": tf(d).numpy()})

    def open(self) -> Dataset:
        import warnings

        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _Field(StreamingDataset(local=str(self.store), shuffle=False, batch_size=BATCH))


class _Field(Dataset):
    """A peer's rows {"x": ndarray} as tensors (torch.from_numpy: no copy)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.ds[i]["x"]))


class Npz(System):
    name = "npz"

    def build(self, perm: list[int]) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        tf = self.wl.transform()
        for i, d in enumerate(self.wl.descriptors()):
            np.savez(self.store / f"{i:07d}.npz", x=tf(d).numpy())

    def open(self) -> Dataset:
        return NpzItems(self.store, self.wl.n)


SYSTEMS: dict[str, type[System]] = {
    s.name: s
    for s in (
        Uncached,
        Limit,
        Cachedata,
        CachedataCollate,
        MonaiPersistent,
        MonaiCache,
        HFDatasets,
        Litdata,
        Mosaic,
        Npz,
    )
}


# ============================================================================ measuring


class Columns:
    """Warm reads of one system: a ``ds[i]`` loop, DataLoader(batch_size=64) with num_workers=0
    or 2 (persistent workers), ``__getitems__`` batches of 256. Each column reads a fixed
    random-order prefix of one permutation, sized at calibration so that one measurement takes
    about ``seconds`` (the whole dataset when that is quicker)."""

    def __init__(
        self, ds: Dataset, wl: Workload, perm: list[int], seconds: float, columns: list[str],
        collate: Callable | None = None,
    ) -> None:  # fmt: skip
        self.ds, self.wl, self.perm, self.seconds, self.columns = ds, wl, perm, seconds, columns
        self.collate = collate or wl.collate()
        self.loaders: dict[str, DataLoader] = {}
        self.k: dict[str, int] = {}

    def calibrate(self) -> float:
        """Size each column, build its loader, and run it once untimed; returns us/item of ds[i]."""
        ds, perm, n = self.ds, self.perm, len(self.perm)
        for i in perm[:2]:
            ds[i]
        m = min(n, 64)
        t0 = time.perf_counter()
        for i in perm[:m]:
            ds[i]
        per_item = max((time.perf_counter() - t0) / m, 1e-7)
        target = self.seconds / per_item

        def size(x: float, lo: int, multiple: int) -> int:
            return min(n, math.ceil(max(x, lo) / multiple) * multiple)

        sizes = {
            "loop": size(target, 32, 1),
            "nw0": size(target, 2 * BATCH, BATCH),
            "nw2": size(1.6 * target, 8 * BATCH, BATCH),  # at least 8 batches: the pipeline fills
            "getitems256": size(target, 4 * 256, 256),
        }
        for col in self.columns:
            self.k[col] = sizes[col]
            if col in ("nw0", "nw2"):
                workers = 2 if col == "nw2" else 0
                self.loaders[col] = DataLoader(
                    ds,
                    batch_size=BATCH,
                    sampler=perm[: self.k[col]],
                    num_workers=workers,
                    persistent_workers=workers > 0,
                    collate_fn=self.collate,
                    multiprocessing_context=FORK if workers else None,
                )
            # warm-up, untimed: first touches, the allocator's steady state, the workers' start
            self._run(col)
        return per_item

    def measure(self, columns: list[str]) -> dict[str, dict[str, float]]:
        out = {}
        for col in columns:
            if col not in self.k:
                continue
            gc.collect()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0 = time.process_time()
            t0 = time.perf_counter()
            self._run(col)
            out[col] = {
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
                # fresh-memory page faults of this process (not of DataLoader workers)
                "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
            }
        return out

    def _run(self, col: str) -> None:
        ds, k = self.ds, self.k[col]
        if col == "loop":
            for i in self.perm[:k]:
                ds[i]
        elif col == "getitems256":
            getitems, idx = ds.__getitems__, self.perm[:k]  # type: ignore[attr-defined]
            for lo in range(0, k, 256):
                getitems(idx[lo : lo + 256])
        else:
            assert _common.epoch(self.loaders[col]) == k

    def close(self) -> None:
        self.loaders.clear()  # persistent workers stop with their iterator
        gc.collect()


def same_item(a: Any, b: torch.Tensor) -> bool:
    a = unwrap(a)
    return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def make(task: dict) -> tuple[Workload, System, list[int]]:
    torch.set_num_threads(task["torch_threads"])
    wl = WORKLOADS[task["workload"]](Path(task["root"]), task["n"])
    system = SYSTEMS[task["system"]](wl, Path(task["store"]))
    return wl, system, np.random.default_rng(7).permutation(wl.n).tolist()


def build_task(task: dict) -> dict:
    """The cold pass of one system, in a process of its own (what a first run pays)."""
    wl, system, perm = make(task)
    gc.collect()
    base = rss()
    reset_hwm()
    t0 = time.perf_counter()
    if system.builds_on_open:
        ds = system.open()
        ds[perm[0]]
    else:
        system.build(perm)
    seconds = time.perf_counter() - t0
    peak = vm_hwm()
    return {
        "seconds": seconds,
        "items_per_s": wl.n / seconds,
        "peak_rss_increase_bytes": None if peak is None else max(0, peak - base),
        "disk_bytes": system.disk_bytes(),
        **system.build_parts,
    }


def system_child(conn: Any, task: dict) -> None:
    """A reader: open the built store, check a few items, calibrate, then measure on request.

    One reader per (workload, system, malloc variant, column), so that every column starts
    from the same allocator state (what one column allocates changes how fast the next one
    runs by up to 2x on this machine) and its peak RSS is its own."""
    wl, system, perm = make(task)
    gc.collect()
    base = rss()
    reset_hwm()
    setup: dict[str, Any] = {"pid": os.getpid()}
    t0 = time.perf_counter()
    ds = system.open()
    first = ds[perm[0]]
    setup["open_seconds"] = time.perf_counter() - t0
    # sanity: the same bytes as the limit's copy (the limit itself: as the transform computes)
    lim = MemmapItems(Path(task["limit_store"]))
    if task["system"] == "limit":
        tf, desc = wl.transform(), wl.descriptors()
        reference = {i: tf(desc[i]) for i in (perm[0], 0, wl.n - 1)}
    else:
        reference = {i: lim[i] for i in (perm[0], 0, wl.n - 1)}
    for i, ref in reference.items():
        got = first if i == perm[0] else ds[i]
        if not same_item(got, ref):
            raise RuntimeError(f"{task['system']} returned different data for {wl.name} item {i}")
    del first, reference
    item_bytes = np.diff(np.asarray(lim.offsets, np.int64)) * np.dtype(wl.dtype).itemsize
    del lim
    cols = Columns(ds, wl, perm, task["seconds"], task["columns"], system.collate())
    setup["calibration_us_per_item"] = cols.calibrate() * 1e6
    setup["items"] = dict(cols.k)
    setup["bytes"] = {c: int(item_bytes[perm[:k]].sum()) for c, k in cols.k.items()}
    conn.send(setup)
    while True:
        msg = conn.recv()
        if msg["op"] == "measure":
            conn.send(cols.measure(msg["columns"]))
        elif msg["op"] == "finish":
            problem = system.check_after(ds)
            cols.close()
            peak = vm_hwm()
            conn.send(
                {"peak_rss_increase_bytes": None if peak is None else max(0, peak - base), "problem": problem}
            )
            return


# ----------------------------------------------------------------------- one-shot tasks


def generate_task(task: dict) -> dict:
    wl = WORKLOADS[task["workload"]](Path(task["root"]), task["n"])
    t0 = time.perf_counter()
    wl.generate()
    source_bytes = (
        folder_bytes(wl.folder()) if hasattr(wl, "folder") else os.path.getsize(wl.root / "texts.bin")
    )
    return {"seconds": time.perf_counter() - t0, "source_bytes": source_bytes}


def cold_target_task(task: dict) -> dict:
    """bench_core's case 3 (a ~1 ms transform, cachedata cold epoch + flush vs uncached)."""
    torch.set_num_threads(task["torch_threads"])
    import bench_core

    return bench_core.case_cold(task["n"], task["repeats"], task["tmp"])


def scale_build_task(task: dict) -> dict:
    torch.set_num_threads(task["torch_threads"])
    import bench_core

    out = {}
    for n in task["sizes"]:
        out[str(n)] = bench_core.build_tiny_cache(n, Path(task["root"]) / f"tiny-{n}")
    return out


def scale_probe_task(task: dict) -> dict:
    torch.set_num_threads(task["torch_threads"])
    import bench_core

    return bench_core.open_probe(task["cache"], task["n"], reads=task["reads"])


ONE_SHOT = {
    "build": build_task,
    "generate": generate_task,
    "cold_target": cold_target_task,
    "scale_build": scale_build_task,
    "scale_probe": scale_probe_task,
}


# ============================================================================== zygote


def _child_entry(conn: Any, task: dict) -> None:
    try:
        if task["kind"] == "system":
            system_child(conn, task)
        else:
            conn.send(ONE_SHOT[task["kind"]](task))
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


class Child:
    def __init__(self, task: dict) -> None:
        self.conn, theirs = FORK.Pipe()
        self.proc = FORK.Process(target=_child_entry, args=(theirs, task))
        self.proc.start()
        theirs.close()  # later children must not inherit it: EOF then means this child died

    def recv(self) -> dict:
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                break
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            return {"error": f"the child process died (exit code {self.proc.exitcode})"}

    def call(self, msg: dict) -> dict:
        self.conn.send(msg)
        return self.recv()

    def join(self) -> None:
        self.conn.close()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def peer_versions(skip: set[str]) -> dict[str, dict[str, str]]:
    """Import each optional peer once (the children inherit the import); record version or reason."""
    out = {}
    for mod in ("monai", "datasets", "litdata", "streaming"):
        if mod in skip:
            out[mod] = {"missing": "skipped with --skip-peers"}
            continue
        try:
            m = __import__(mod)
            if mod == "monai":
                import monai.data
                import monai.transforms  # noqa: F401
            elif mod == "datasets":
                m.disable_progress_bars()
                m.logging.set_verbosity_error()
            out[mod] = {"version": m.__version__}
        except ImportError as exc:
            out[mod] = {"missing": f"not installed ({exc.__class__.__name__}: {exc})"}
    return out


def zygote_main(skip: set[str]) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever libraries print goes to stderr, not into the protocol
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj, default=str) + "\n")
        proto.flush()

    import bench_core  # noqa: F401  (imported once here, for the cold-target children)
    import h5py  # noqa: F401
    import torchvision  # noqa: F401

    peers = peer_versions(skip)
    info = _common.machine()
    info["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    # Move everything imported so far out of the collector's reach: the children's
    # gc.collect() calls then take microseconds, not a scan of every library object.
    gc.collect()
    gc.freeze()
    send({"machine": info, "peers": peers, "pid": os.getpid()})
    children: dict[str, Child] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        try:
            if op == "spawn":
                child = Child(msg["task"])
                reply = child.recv()
                if "error" in reply:
                    child.join()
                else:
                    children[msg["id"]] = child
            elif op == "call":
                reply = children[msg["id"]].call(msg["msg"])
            elif op == "close":
                child = children.pop(msg["id"])
                reply = child.call({"op": "finish"})
                child.join()
            elif op == "run":
                child = Child(msg["task"])
                reply = child.recv()
                child.join()
            elif op == "exit":
                break
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception:
            reply = {"error": traceback.format_exc()}
        send(reply)
    for child in children.values():
        child.join()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--zygote":
        skip = set(sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else set()
        zygote_main(skip)
    else:
        sys.exit("this is the measuring side of bench_peers.py; run benchmarks/bench_peers.py")
