"""Text classification with a BPE tokenizer: every sentence is tokenized once, then read from the cache.

    python examples/text_classification.py [--data FILE] [--items 2000] [--epochs 2]
        [--max-length 64] [--workers 2] [--batch-size 64] [--cache-dir DIR]

``--data`` is a text file with one ``label<TAB>sentence`` per line; without it, ``--items``
sentences in 3 classes (sports, cooking, weather) are generated. A byte-pair-encoding
tokenizer is trained locally with ``tokenizers`` on the sentences; ``Tokenize(tok,
max_length=64)`` is the cached ``transform`` (wrapped to add the label), random token
dropout is the ``post_transform``, ``CachedCollate()`` pads the ragged ``input_ids`` and
``attention_mask`` per batch, and a small embedding-bag classifier is trained. The first epoch is
cold (tokenizes and stores), the second warm (reads back); times and hit rates are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import add_training_args, run_epochs  # examples/_common.py (the script's folder is on sys.path)
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cachedata import CachedCollate, CachedDataset
from cachedata.transforms import Tokenize

TOPICS = {
    "sports": ["team", "goal", "match", "coach", "players", "stadium", "score", "season", "referee"],
    "cooking": ["recipe", "oven", "garlic", "sauce", "butter", "simmer", "kitchen", "flour", "taste"],
    "weather": ["rain", "storm", "forecast", "sunny", "clouds", "wind", "temperature", "snow", "humid"],
}
FILLER = ["the", "a", "was", "really", "today", "and", "with", "after", "very", "we", "our", "new", "this"]


def make_sentences(n: int) -> list[tuple[str, int]]:
    """``n`` deterministic (sentence, label) pairs of 4 to 40 words."""
    names = sorted(TOPICS)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        label = i % len(names)
        words = TOPICS[names[label]]
        length = int(rng.integers(4, 41))
        picks = [
            words[j % len(words)] if rng.random() < 0.4 else FILLER[j % len(FILLER)]
            for j in rng.integers(0, 99, length)
        ]
        out.append((" ".join(w if k else w.capitalize() for k, w in enumerate(picks)) + ".", label))
    return out


def read_sentences(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            label, text = line.split("\t", 1)
            rows.append((text, int(label)))
    return rows


def train_bpe(texts: list[str], vocab_size: int = 500) -> Tokenizer:
    """A BPE tokenizer trained here, with [CLS] ... [SEP] added around every sequence."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return tok


class Sentences(Dataset):
    def __init__(self, rows: list[tuple[str, int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        text, label = self.rows[i]
        return {"text": text, "label": label}


class TokenizeWithLabel:
    """Deterministic, cached: ``Tokenize`` returns {input_ids, attention_mask}; the label is added."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = 64) -> None:
        self.tokenize = Tokenize(tokenizer, max_length=max_length)

    def __call__(self, item):
        return {**self.tokenize(item["text"]), "label": item["label"]}

    def batch(self, items: list) -> list:
        """All misses of one batch at once (the tokenizer's parallel ``encode_batch``)."""
        encoded = self.tokenize.batch([item["text"] for item in items])
        return [{**enc, "label": item["label"]} for enc, item in zip(encoded, items)]


class TokenDropout:
    """Random, not cached: replaces a few tokens by [UNK] on every access."""

    def __init__(self, unk_id: int, p: float = 0.1) -> None:
        self.unk_id = unk_id
        self.p = p

    def __call__(self, item):
        ids = item["input_ids"]
        drop = torch.rand(ids.shape) < self.p
        drop[0] = drop[-1] = False  # keep [CLS] and [SEP]
        item["input_ids"] = ids.masked_fill(drop, self.unk_id)
        return item


class BagOfTokens(nn.Module):
    """Mean of the token embeddings under the attention mask (an EmbeddingBag), then an MLP."""

    def __init__(self, vocab_size: int, classes: int, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="sum")
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.float()
        summed = self.embed(input_ids, per_sample_weights=weights)
        return self.head(summed / weights.sum(1, keepdim=True).clamp_min(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="label<TAB>sentence lines (default: generated)")
    ap.add_argument("--items", type=int, default=2000, help="sentences to generate without --data")
    ap.add_argument("--max-length", type=int, default=64)
    add_training_args(ap, epochs=2, batch_size=64)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    rows = read_sentences(args.data) if args.data else make_sentences(args.items)
    tok = train_bpe([text for text, _ in rows])
    print(f"{len(rows)} sentences; BPE vocabulary of {tok.get_vocab_size()} tokens", flush=True)
    with tempfile.TemporaryDirectory(prefix="cachedata-text-") as tmp:
        ds = CachedDataset(
            Sentences(rows),
            args.cache_dir or Path(tmp) / "cache",
            transform=TokenizeWithLabel(tok, args.max_length),
            post_transform=TokenDropout(tok.token_to_id("[UNK]")),
        )
        print(f"cache namespace {ds.path}", flush=True)
        loader = DataLoader(
            ds,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            collate_fn=CachedCollate(),  # pads input_ids with 0 ([PAD]) and attention_mask with 0
        )
        model = BagOfTokens(tok.get_vocab_size(), 1 + max(label for _, label in rows))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        run_epochs(
            ds, loader, opt, args.epochs, lambda b: (model(b["input_ids"], b["attention_mask"]), b["label"])
        )
        del loader  # stop the workers before the temporary folder goes away
        ds.flush()
        ds.merge()  # one consolidated file for the next run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
