"""Part-of-speech tagging with a one-layer LSTM (meProp's POS setting: hidden 500, k = 5).

Input per word: a word embedding (lowercased form), embeddings of its last 2 and last 3 letters,
and a word-shape embedding (capitalisation x digit x hyphen); then the LSTM and a linear output
layer over the tags. Sparse backprop applies to the LSTM's input and recurrent transforms (the
output layer stays dense). The metric is per-word accuracy over all tokens.

Data: UD English EWT with PTB tags (XPOS, default), or ``--pos-data conll2000``: the NLTK
CoNLL-2000 WSJ sample, split deterministically into train = the first 7,936 sentences of
``train.txt`` (WSJ 15-18), dev = its last 1,000 sentences, test = ``test.txt`` (WSJ 20, 2,012).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp.data.conll import choose_tag_column, read_conll2000
from msbp.data.errors import DataError
from msbp.tasks.base import (
    Task,
    bucketed_batches,
    check_limit,
    check_option,
    content_digest,
    set_task_default,
)
from msbp.tasks.parse import find_data_dir, read_treebank, treebank_paths

log = logging.getLogger(__name__)

PAD, UNK = 0, 1
CONLL2000_DEV = 1000  # the last sentences of conll2000 train.txt form the dev set
IGNORE = -100  # target of padding positions


def word_shape(word: str) -> int:
    """A shape id in [2, 22): capitalisation (5 kinds) x has digit x has hyphen; 0, 1 reserved."""
    letters = [ch for ch in word if ch.isalpha()]
    if not letters:
        case = 0
    elif all(ch.isupper() for ch in letters):
        case = 1
    elif word[0].isupper():
        case = 2
    elif any(ch.isupper() for ch in letters):
        case = 3
    else:
        case = 4
    digit = any(ch.isdigit() for ch in word)
    hyphen = "-" in word
    return 2 + case * 4 + digit * 2 + hyphen


NUM_SHAPES = 22


def _index(items: Counter, min_count: int = 1) -> dict[str, int]:
    return {w: j + 2 for j, w in enumerate(sorted(w for w, c in items.items() if c >= min_count))}


class TaggerVocab:
    """Ids of words (seen at least twice), suffixes and tags from tagged training sentences."""

    def __init__(self, sentences: Sequence[Sequence[tuple[str, str]]]) -> None:
        words = Counter(w.lower() for s in sentences for w, _ in s)
        # singletons map to UNK, so that the UNK embedding is trained on rare words
        self.words = _index(words, min_count=2)
        self.suffix2 = _index(Counter(w.lower()[-2:] for s in sentences for w, _ in s))
        self.suffix3 = _index(Counter(w.lower()[-3:] for s in sentences for w, _ in s))
        self.tags = {t: j for j, t in enumerate(sorted({t for s in sentences for _, t in s}))}

    def encode(self, sent: Sequence[tuple[str, str]]) -> tuple[Tensor, Tensor]:
        """Features (T, 4) int64 (word, suffix2, suffix3, shape) and tag ids (T,)."""
        feats = [
            (
                self.words.get(w.lower(), UNK),
                self.suffix2.get(w.lower()[-2:], UNK),
                self.suffix3.get(w.lower()[-3:], UNK),
                word_shape(w),
            )
            for w, _ in sent
        ]
        tags = [self.tags.get(t, IGNORE) for _, t in sent]  # an unseen tag counts as an error
        return torch.tensor(feats, dtype=torch.long), torch.tensor(tags, dtype=torch.long)


class LSTMTagger(nn.Module):
    """Embeddings -> ``lstm`` (one layer) -> ``output``: (B, T, 4) ids -> (B, T, tags) scores."""

    def __init__(
        self, num_words: int, num_suffix2: int, num_suffix3: int, num_tags: int, *,
        word_dim: int = 100, suffix_dim: int = 30, shape_dim: int = 10, hidden_size: int = 500,
        bidirectional: bool = False, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.word_embedding = nn.Embedding(num_words, word_dim, padding_idx=PAD)
        self.suffix2_embedding = nn.Embedding(num_suffix2, suffix_dim, padding_idx=PAD)
        self.suffix3_embedding = nn.Embedding(num_suffix3, suffix_dim, padding_idx=PAD)
        self.shape_embedding = nn.Embedding(NUM_SHAPES, shape_dim, padding_idx=PAD)
        inputs = word_dim + 2 * suffix_dim + shape_dim
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(inputs, hidden_size, batch_first=True, bidirectional=bidirectional)
        self.output = nn.Linear(hidden_size * (2 if bidirectional else 1), num_tags)

    def forward(self, feats: Tensor) -> Tensor:
        x = torch.cat(
            (
                self.word_embedding(feats[..., 0]),
                self.suffix2_embedding(feats[..., 1]),
                self.suffix3_embedding(feats[..., 2]),
                self.shape_embedding(feats[..., 3]),
            ),
            dim=-1,
        )  # (B, T, inputs)
        h, _ = self.lstm(self.dropout(x))  # (B, T, D hidden)
        return self.output(self.dropout(h))  # (B, T, tags)


def pad_batch(items: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Pad (T_i, 4) features and (T_i,) tags to (B, T, 4) and (B, T); padding tags = -100."""
    length = max(f.shape[0] for f, _ in items)
    feats = torch.zeros(len(items), length, 4, dtype=torch.long)
    tags = torch.full((len(items), length), IGNORE, dtype=torch.long)
    for j, (f, t) in enumerate(items):
        feats[j, : f.shape[0]] = f
        tags[j, : t.shape[0]] = t
    return feats, tags


class PosTask(Task):
    """LSTM POS tagger on UD English EWT (PTB tags in XPOS) or the NLTK CoNLL-2000 WSJ sample."""

    name = "pos"
    metric = "accuracy"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("pos")
        g.add_argument("--pos-data", choices=("ud", "conll2000"), default="ud",
                       help="UD English EWT, XPOS tags (default), or NLTK's CoNLL-2000 WSJ")
        g.add_argument("--data-dir", default=None,
                       help="folder with {train,dev,test}.conllu(.gz) or conll2000.zip "
                       "(default: ../shared/data/ud_en_ewt or ../shared/data/nltk)")
        for split in ("train", "dev", "test"):
            g.add_argument(f"--{split}", dest=f"{split}_path", default=None, metavar="PATH",
                           help=f"{split} treebank, CoNLL-U or CoNLL-X (plain or gzip); "
                           "wins over --data-dir")
        g.add_argument("--limit-train", type=int, default=None, metavar="N",
                       help="train on the first N sentences only")
        g.add_argument("--limit-eval", type=int, default=None, metavar="N",
                       help="evaluate on the first N dev/test sentences only")
        g.add_argument("--hidden-size", type=int, default=500, help="LSTM units (default 500)")
        g.add_argument("--word-dim", type=int, default=100)
        g.add_argument("--suffix-dim", type=int, default=30)
        g.add_argument("--bidirectional", action="store_true", help="a BiLSTM (default: one way)")
        g.add_argument("--dropout", type=float, default=0.0)
        g.add_argument("--bucket", type=int, default=20,
                       help="batches per length-sorted bucket (less padding; default 20)")
        # 32 sentences keep the per-time-step loop of SparseLSTM busy enough
        set_task_default(parser, "--batch-size", 32, "sentences per batch (default 32)")

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        for name in ("hidden_size", "word_dim", "suffix_dim", "bucket"):
            check_option(args, name, low=1)
        check_option(args, "dropout", low=0, high=1, high_open=True)
        check_limit(args, "limit_train")
        check_limit(args, "limit_eval")

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.check_args(args)
        opt = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        splits, tag_note = self._load(args)
        if opt("limit_train") is not None:
            splits["train"] = splits["train"][: opt("limit_train")]
        if opt("limit_eval") is not None:
            for s in ("dev", "test"):
                splits[s] = splits[s][: opt("limit_eval")]
        self.vocab = TaggerVocab(splits["train"])
        self.data = {name: [self.vocab.encode(s) for s in sents] for name, sents in splits.items()}
        self.batch_size = int(opt("batch_size") or 32)
        summary = (
            f"pos ({opt('pos_data', 'ud')}): "
            + "/".join(str(len(v)) for v in self.data.values())
            + f" sentences train/dev/test, {len(self.vocab.words)} words, "
            f"{len(self.vocab.tags)} tags"
            + (f"; {tag_note}" if tag_note else "")
        )
        log.info(summary)
        if not opt("quiet", False):
            print(summary, file=sys.stderr, flush=True)

    @staticmethod
    def _load(args: argparse.Namespace) -> tuple[dict[str, list[list[tuple[str, str]]]], str]:
        """(form, tag) sentences per split, and a note when the tag column had to change.

        Treebanks are tagged with XPOS (PTB tags in EWT), or with UPOS when the training XPOS
        column is empty (``choose_tag_column``).
        """
        source, data_dir = getattr(args, "pos_data", "ud"), getattr(args, "data_dir", None)
        given = [s for s in ("train", "dev", "test") if getattr(args, f"{s}_path", None)]
        if source == "conll2000" and given:
            raise DataError(
                f"--{given[0]} reads a CoNLL-U/CoNLL-X treebank; it does not combine with "
                "--pos-data conll2000"
            )
        try:
            if source == "conll2000":
                folder = Path(data_dir) if data_dir else find_data_dir("nltk")
                path = folder / "conll2000.zip"
                train = read_conll2000(path, "train.txt")
                return {
                    "train": train[:-CONLL2000_DEV],
                    "dev": train[-CONLL2000_DEV:],
                    "test": read_conll2000(path, "test.txt"),
                }, ""
            treebanks = {
                split: read_treebank(path) for split, path in treebank_paths(args).items()
            }
            column, note = choose_tag_column(treebanks["train"], "xpos")
            out = {
                split: [[(t.form, getattr(t, column)) for t in s] for s in sents]
                for split, sents in treebanks.items()
            }
            return out, note
        except (ValueError, FileNotFoundError) as err:
            raise DataError(str(err)) from None

    def fingerprint(self) -> dict[str, str]:
        if not hasattr(self, "_fingerprint"):
            v = self.vocab
            self._fingerprint = {
                "vocabulary": content_digest(v.words, v.suffix2, v.suffix3, v.tags),
                **{split: content_digest(data) for split, data in self.data.items()},
            }
        return self._fingerprint

    def build_model(self) -> nn.Module:
        a = self.args
        v = self.vocab
        return LSTMTagger(
            len(v.words) + 2, len(v.suffix2) + 2, len(v.suffix3) + 2, len(v.tags),
            word_dim=getattr(a, "word_dim", 100), suffix_dim=getattr(a, "suffix_dim", 30),
            hidden_size=getattr(a, "hidden_size", 500),
            bidirectional=getattr(a, "bidirectional", False), dropout=getattr(a, "dropout", 0.0),
        )

    def sparse_exclude(self) -> list[str]:
        return ["output"]

    def num_train_batches(self) -> int:
        return -(-len(self.data["train"]) // self.batch_size)

    def train_batches(
        self, epoch: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled sentences, sorted by length within buckets of ``--bucket`` batches (less
        padding, hence fewer LSTM steps), batches in shuffled order: (B, T, 4), (B, T)."""
        data = self.data["train"]
        lengths = [example[0].shape[0] for example in data]
        bucket = int(getattr(self.args, "bucket", 20))
        for batch in bucketed_batches(lengths, self.batch_size, bucket, generator):
            yield pad_batch([data[j] for j in batch])

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        feats, tags = batch
        scores = model(feats)  # (B, T, tags)
        return F.cross_entropy(scores.flatten(0, 1), tags.flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        data = self.data[split]
        order = sorted(range(len(data)), key=lambda j: data[j][0].shape[0])
        correct = total = 0
        for lo in range(0, len(order), 256):
            feats, tags = pad_batch([data[j] for j in order[lo : lo + 256]])
            pred = model(feats).argmax(-1)  # (B, T)
            mask = tags != IGNORE
            correct += int((pred[mask] == tags[mask]).sum())
            # tokens whose gold tag never occurs in training are counted, as errors
            total += sum(d[1].shape[0] for d in (data[j] for j in order[lo : lo + 256]))
        model.train(was_training)
        return {"accuracy": 100.0 * correct / max(total, 1)}
