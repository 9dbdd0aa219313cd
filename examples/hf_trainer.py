"""Hugging Face ``transformers.Trainer`` on a CachedDataset: tokenized once, then read from the cache.

    python examples/hf_trainer.py [--items 256] [--epochs 2] [--workers 2] [--batch-size 16]
        [--cache-dir DIR] [--log-calls FILE]

Nothing is downloaded: a WordPiece tokenizer is trained here with ``tokenizers``, saved to
``tokenizer.json`` and loaded back as a ``PreTrainedTokenizerFast`` (as one from the hub
would be), and a tiny BERT is built from a ``BertConfig``. ``Tokenize`` is the cached
transform (wrapped to add ``labels``) and ``CachedCollate`` pads ``input_ids`` and
``attention_mask`` per batch, which is the dict the model takes. The Trainer runs with
``dataloader_num_workers`` workers; epoch 2 is all hits.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from text_classification import make_sentences  # examples/ (the script's folder is on sys.path)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from cachedata import CachedCollate, CachedDataset
from cachedata.transforms import Tokenize


def train_tokenizer(texts: list[str], path: Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on ``texts``, saved to ``path`` and loaded back."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             show_progress=False))  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    )
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip


class Sentences(Dataset):
    def __init__(self, rows: list[tuple[str, int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        text, label = self.rows[i]
        return {"text": text, "label": label}


class TokenizeForTrainer:
    """Deterministic, cached: ``{"input_ids", "attention_mask", "labels"}``, what the model takes.

    ``log`` (optional) gets one line per call, from any process: how the tests count calls.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, max_length: int = 48, log: str | None = None
    ) -> None:
        self.tokenize = Tokenize(tokenizer, max_length=max_length)
        self.log = log

    def __call__(self, item: dict) -> dict:
        if self.log is not None:
            with open(self.log, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        return {**self.tokenize(item["text"]), "labels": item["label"]}


class EpochStats(TrainerCallback):
    """Prints the dataset's stats (main process + DataLoader workers) after every epoch."""

    def __init__(self, ds: CachedDataset) -> None:
        self.ds = ds
        self.epochs: list[tuple[int, int]] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        stats = self.ds.stats
        self.epochs.append((stats.hits, stats.misses))
        print(f"epoch {len(self.epochs)}: {stats.hits} hits, {stats.misses} misses (all epochs so far)",
              flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="dataloader_num_workers (default 2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one)")
    ap.add_argument("--log-calls", default=None, help="append one line per transform call to this file")
    args = ap.parse_args(argv)

    rows = make_sentences(args.items)
    with tempfile.TemporaryDirectory(prefix="cachedata-hf-") as tmp:
        cache_dir = args.cache_dir or Path(tmp) / "cache"
        tokenizer = train_tokenizer([text for text, _ in rows], Path(tmp) / "tokenizer.json")
        ds = CachedDataset(
            Sentences(rows), cache_dir, transform=TokenizeForTrainer(tokenizer, log=args.log_calls)
        )
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                            num_labels=3)  # fmt: skip
        training = TrainingArguments(
            output_dir=str(Path(tmp) / "out"),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            dataloader_num_workers=args.workers,
            remove_unused_columns=False,  # the items hold exactly what the model takes
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        stats = EpochStats(ds)
        trainer = Trainer(model=BertForSequenceClassification(config), args=training, train_dataset=ds,
                          data_collator=CachedCollate(), callbacks=[stats])  # fmt: skip
        result = trainer.train()
        ds.merge()
        print(f"training loss {result.training_loss:.3f}", flush=True)
        if len(stats.epochs) > 1:
            (h1, m1), (h2, m2) = stats.epochs[0], stats.epochs[1]
            print(f"warm hit rate {(h2 - h1) / max(1, h2 - h1 + m2 - m1):.0%}", flush=True)
        print(f"cache: {sorted(p.name for p in ds.path.glob('*.h5'))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
