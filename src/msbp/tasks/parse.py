"""Dependency parsing: a Chen & Manning (2014) transition-based parser (arc-standard, labelled).

Model: 48 features (18 words, 18 tags, 12 labels) -> 50-dim embeddings -> 2,400 inputs -> hidden
layer of 500 (cube activation, or ReLU) -> softmax over the 2L+1 transitions. The hidden layer is
the one sparsified; the output layer stays dense (as meProp's output layers).

Training uses the static arc-standard oracle on projective trees; trees the oracle cannot derive
(non-projective ones) are left out of training, counted in the log, and kept for evaluation.
Decoding is greedy over legal transitions, batched across sentences.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp.data.conll import Sentence, choose_tag_column, is_projective, read_conll
from msbp.data.errors import DataError
from msbp.nn import SparseLinear
from msbp.tasks.base import Task, check_limit, check_option, content_digest, set_task_default

log = logging.getLogger(__name__)

NULL, UNK, ROOT = 0, 1, 2  # reserved ids of the word and tag vocabularies; labels: NULL only
N_WORD_FEATS, N_TAG_FEATS, N_LABEL_FEATS = 18, 18, 12
N_FEATS = N_WORD_FEATS + N_TAG_FEATS + N_LABEL_FEATS  # 48

SHIFT = 0  # transition ids: 0 shift, 1..L left-arc(label), L+1..2L right-arc(label)


# ----------------------------------------------------------------------------- transition system


class State:
    """A parser configuration: stack, buffer (tokens ``i..n``) and the arcs built so far.

    Token 0 is the artificial root. ``left[t]`` / ``right[t]`` list t's children in attachment
    order; in arc-standard every new left child lies left of the earlier ones and every new right
    child right of them, so ``left[t][-1]`` is the leftmost and ``right[t][-1]`` the rightmost.
    With ``multi_root`` the root may take several children (CoNLL-X treebanks that attach
    punctuation or several clauses to it); else it takes one, last.
    """

    __slots__ = ("n", "multi_root", "stack", "i", "head", "label", "left", "right")

    def __init__(self, n: int, multi_root: bool = False) -> None:
        self.n = n
        self.multi_root = multi_root
        self.stack = [0]
        self.i = 1
        self.head = [-1] * (n + 1)
        self.label = [-1] * (n + 1)
        self.left: list[list[int]] = [[] for _ in range(n + 1)]
        self.right: list[list[int]] = [[] for _ in range(n + 1)]

    def terminal(self) -> bool:
        return self.i > self.n and len(self.stack) == 1

    def legal(self) -> tuple[bool, bool, bool]:
        """Whether shift, left-arc and right-arc are allowed (without ``multi_root`` the root
        attaches last, once)."""
        depth = len(self.stack)
        buffer_empty = self.i > self.n
        return (
            not buffer_empty,
            depth > 2,
            depth > 2 or (depth == 2 and (buffer_empty or self.multi_root)),
        )

    def apply(self, transition: int, num_labels: int) -> None:
        if transition == SHIFT:
            self.stack.append(self.i)
            self.i += 1
        elif transition <= num_labels:  # left-arc: s2 <- s1
            s1 = self.stack.pop()
            s2 = self.stack.pop()
            self.head[s2], self.label[s2] = s1, transition - 1
            self.left[s1].append(s2)
            self.stack.append(s1)
        else:  # right-arc: s2 -> s1
            s1 = self.stack.pop()
            s2 = self.stack[-1]
            self.head[s1], self.label[s1] = s2, transition - 1 - num_labels
            self.right[s2].append(s1)


def static_oracle(
    state: State, gold_head: Sequence[int], gold_label: Sequence[int], num_children: Sequence[int],
    num_labels: int,
) -> int | None:
    """The arc-standard oracle's transition for ``state``; None when the tree is not derivable.

    ``gold_head`` / ``gold_label`` / ``num_children`` are indexed by token (index 0 = root).
    A right-arc waits until s1 has all its gold children. A root child attaches as soon as it is
    complete under ``multi_root``, else only once the buffer is empty (for a single-rooted tree
    both give the same sequence: its root is complete only when every other token is).
    """
    stack = state.stack
    if len(stack) >= 2:
        s1, s2 = stack[-1], stack[-2]
        if s2 > 0 and gold_head[s2] == s1:
            return 1 + gold_label[s2]
        if (
            gold_head[s1] == s2
            and len(state.left[s1]) + len(state.right[s1]) == num_children[s1]
            and (s2 > 0 or state.i > state.n or state.multi_root)
        ):
            return 1 + num_labels + gold_label[s1]
    if state.i <= state.n:
        return SHIFT
    return None


def oracle_transitions(
    heads: Sequence[int], labels: Sequence[int], num_labels: int, multi_root: bool = False
) -> list[int] | None:
    """The oracle's transition sequence for a tree (``heads[j]`` = head of token j+1, 0 = root).

    Returns None unless the sequence rebuilds exactly this tree: None for non-projective trees,
    and for multi-rooted ones unless ``multi_root``.
    """
    n = len(heads)
    gold_head = [-1, *heads]
    gold_label = [-1, *labels]
    num_children = [0] * (n + 1)
    for h in heads:
        num_children[h] += 1
    state = State(n, multi_root)
    out: list[int] = []
    while not state.terminal():
        t = static_oracle(state, gold_head, gold_label, num_children, num_labels)
        if t is None:
            return None
        ok = state.legal()
        if not ok[0 if t == SHIFT else (1 if t <= num_labels else 2)]:
            return None
        state.apply(t, num_labels)
        out.append(t)
    if state.head[1:] != list(heads) or state.label[1:] != list(labels):
        return None
    return out


def features(state: State, words: Sequence[int], tags: Sequence[int]) -> list[int]:
    """The 48 feature ids of ``state``: 18 words, 18 tags, 12 labels (Chen & Manning 2014).

    Positions: s1..s3, b1..b3; then for s1 and s2: lc1, rc1, lc2, rc2, lc1(lc1), rc1(rc1).
    ``words`` / ``tags`` are indexed by token (index 0 = root). Label ids are shifted by one so
    that 0 is NULL.
    """
    stack, i, n, left, right, label = (
        state.stack, state.i, state.n, state.left, state.right, state.label
    )
    depth = len(stack)
    pos = [
        stack[-1] if depth >= 1 else -1,
        stack[-2] if depth >= 2 else -1,
        stack[-3] if depth >= 3 else -1,
        i if i <= n else -1,
        i + 1 if i + 1 <= n else -1,
        i + 2 if i + 2 <= n else -1,
    ]
    for s in pos[:2]:
        if s < 0:
            pos.extend((-1, -1, -1, -1, -1, -1))
            continue
        lefts, rights = left[s], right[s]
        lc1 = lefts[-1] if lefts else -1
        rc1 = rights[-1] if rights else -1
        pos.append(lc1)
        pos.append(rc1)
        pos.append(lefts[-2] if len(lefts) >= 2 else -1)
        pos.append(rights[-2] if len(rights) >= 2 else -1)
        pos.append(left[lc1][-1] if lc1 >= 0 and left[lc1] else -1)
        pos.append(right[rc1][-1] if rc1 >= 0 and right[rc1] else -1)
    feats = [words[p] if p >= 0 else NULL for p in pos]
    feats += [tags[p] if p >= 0 else NULL for p in pos]
    feats += [label[p] + 1 if p >= 0 else NULL for p in pos[6:]]
    return feats


# ----------------------------------------------------------------------------- vocabularies


class Vocab:
    """Word, tag and label ids built from training sentences."""

    def __init__(self, sentences: Sequence[Sentence], tag_column: str = "xpos",
                 lowercase: bool = True) -> None:
        self.tag_column = tag_column
        self.lowercase = lowercase
        words = Counter(self._form(t) for s in sentences for t in s)
        tags = sorted({getattr(t, tag_column) for s in sentences for t in s})
        labels = sorted({t.deprel for s in sentences for t in s})
        self.words = {w: j + 3 for j, w in enumerate(sorted(words))}
        self.tags = {t: j + 3 for j, t in enumerate(tags)}
        self.labels = {lab: j for j, lab in enumerate(labels)}
        self.label_names = labels

    def _form(self, tok: Any) -> str:
        return tok.form.lower() if self.lowercase else tok.form

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def encode(self, sent: Sentence) -> tuple[list[int], list[int]]:
        """Word and tag ids of a sentence, index 0 = root."""
        words = [ROOT] + [self.words.get(self._form(t), UNK) for t in sent]
        tags = [ROOT] + [self.tags.get(getattr(t, self.tag_column), UNK) for t in sent]
        return words, tags

    def label_ids(self, sent: Sentence) -> list[int] | None:
        """Gold label ids, or None if a label never occurs in training."""
        ids = [self.labels.get(t.deprel) for t in sent]
        return None if any(i is None for i in ids) else ids  # type: ignore[return-value]


def training_examples(
    sentences: Sequence[Sentence], vocab: Vocab, multi_root: bool = False
) -> tuple[Tensor, Tensor, dict[str, int]]:
    """Features (N, 48) int64 and oracle transitions (N,) of all derivable training trees.

    Also returns counts: sentences used, non-projective and otherwise underivable ones skipped
    (multi-rooted trees are underivable unless ``multi_root``).
    """
    feats: list[list[int]] = []
    gold: list[int] = []
    counts = {"used": 0, "non_projective": 0, "underivable": 0}
    L = vocab.num_labels
    for sent in sentences:
        heads = [t.head for t in sent]
        if not is_projective(heads):
            counts["non_projective"] += 1
            continue
        labels = vocab.label_ids(sent)
        seq = oracle_transitions(heads, labels, L, multi_root) if labels is not None else None
        if seq is None:
            counts["underivable"] += 1
            continue
        counts["used"] += 1
        words, tags = vocab.encode(sent)
        state = State(len(sent), multi_root)
        for t in seq:
            feats.append(features(state, words, tags))
            gold.append(t)
            state.apply(t, L)
    x = torch.tensor(feats, dtype=torch.long).reshape(-1, N_FEATS)
    return x, torch.tensor(gold, dtype=torch.long), counts


# ----------------------------------------------------------------------------- model


class _Cube(torch.autograd.Function):
    """``h.pow(3)`` whose backward gives PyTorch's gradient bit for bit, ``g * (3 * h.pow(2))``,
    in one buffer where ``pow``'s backward makes three: at the parser's 10,000 x 500 that
    backward took ~24 ms a step (three fresh 20 MB tensors; ~12 ms so), in the dense and the
    sparse runs alike."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return h.pow(3)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return h.pow(2.0).mul_(3.0).mul_(grad)


def cube(h: Tensor) -> Tensor:
    """``h ** 3`` (any shape), with a leaner backward of the same values (``_Cube``)."""
    return _Cube.apply(h)


class ParserMLP(nn.Module):
    """Chen & Manning's network: embeddings (48 x dim) -> ``hidden`` -> act -> ``output``.

    Input: feature ids (B, 48) int64; output: transition scores (B, 2L+1).
    """

    def __init__(
        self, num_words: int, num_tags: int, num_labels: int, *, embedding_dim: int = 50,
        hidden_size: int = 500, activation: str = "cube", dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ("cube", "relu", "tanh"):
            raise ValueError(f"activation must be 'cube', 'relu' or 'tanh', got {activation!r}")
        self.activation = activation
        self.word_embedding = nn.Embedding(num_words, embedding_dim)
        self.tag_embedding = nn.Embedding(num_tags, embedding_dim)
        self.label_embedding = nn.Embedding(num_labels + 1, embedding_dim)
        for emb in (self.word_embedding, self.tag_embedding, self.label_embedding):
            # small embeddings keep the cube's inputs near its well-behaved range at the start
            nn.init.uniform_(emb.weight, -0.1, 0.1)
        self.hidden = nn.Linear(N_FEATS * embedding_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, 2 * num_labels + 1)
        # where each feature's ids start in the three tables stacked (word, tag, label)
        starts = [0] * N_WORD_FEATS + [num_words] * N_TAG_FEATS
        starts += [num_words + num_tags] * N_LABEL_FEATS
        self.register_buffer("_starts", torch.tensor(starts), persistent=False)

    def forward(self, feats: Tensor) -> Tensor:
        # one lookup in the stacked tables: the embedded features come out already in place,
        # (B, 48, d), where three lookups and a cat cost 40% more (forward and backward)
        table = torch.cat((self.word_embedding.weight, self.tag_embedding.weight,
                           self.label_embedding.weight))
        ids = feats + self._starts
        if isinstance(self.hidden, SparseLinear):
            # the table's gradient straight from the sparse backward's k-wide factors
            h = self.hidden.forward_embedded(ids, table)  # (B, hidden)
        else:
            h = self.hidden(F.embedding(ids, table).flatten(1))  # (B, 48 d) -> (B, hidden)
        if self.activation == "cube":
            h = cube(h)
        elif self.activation == "relu":
            h = torch.relu(h)
        else:
            h = torch.tanh(h)
        return self.output(self.dropout(h))  # (B, 2L+1)


@torch.no_grad()
def parse(
    model: nn.Module, sentences: Sequence[Sentence], vocab: Vocab, chunk: int = 2048, *,
    multi_root: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """Greedy decoding, batched across sentences: (heads, label ids) per sentence (1-based).

    ``multi_root`` lets the root take several children (see ``State``)."""
    was_training = model.training
    model.eval()
    L = vocab.num_labels
    kinds = torch.tensor([0] + [1] * L + [2] * L)  # (2L+1,): shift / left / right
    results: list[tuple[list[int], list[int]]] = []
    for lo in range(0, len(sentences), chunk):
        part = sentences[lo : lo + chunk]
        encoded = [vocab.encode(s) for s in part]
        states = [State(len(s), multi_root) for s in part]
        active = [j for j, st in enumerate(states) if not st.terminal()]
        while active:
            feats = torch.tensor(
                [features(states[j], *encoded[j]) for j in active], dtype=torch.long
            )  # (A, 48)
            scores = model(feats)  # (A, 2L+1)
            legal = torch.tensor([states[j].legal() for j in active])  # (A, 3)
            scores = scores.masked_fill(~legal[:, kinds], float("-inf"))
            best = scores.argmax(1).tolist()
            for j, t in zip(active, best, strict=True):
                states[j].apply(t, L)
            active = [j for j in active if not states[j].terminal()]
        results.extend((st.head[1:], st.label[1:]) for st in states)
    model.train(was_training)
    return results


def attachment_scores(
    sentences: Sequence[Sentence], predicted: Sequence[tuple[list[int], list[int]]], vocab: Vocab
) -> dict[str, float]:
    """UAS / LAS in percent, without punctuation (``uas``, ``las``, as Chen & Manning) and with
    it (``uas_all``, ``las_all``)."""
    total = total_np = ua = la = ua_np = la_np = 0
    for sent, (heads, labels) in zip(sentences, predicted, strict=True):
        for tok, h, lab in zip(sent, heads, labels, strict=True):
            head_ok = h == tok.head
            label_ok = head_ok and vocab.label_names[lab] == tok.deprel
            total += 1
            ua += head_ok
            la += label_ok
            if not tok.is_punct:
                total_np += 1
                ua_np += head_ok
                la_np += label_ok
    pct = lambda a, b: 100.0 * a / max(b, 1)  # noqa: E731
    return {
        "uas": pct(ua_np, total_np), "las": pct(la_np, total_np),
        "uas_all": pct(ua, total), "las_all": pct(la, total),
    }


# ----------------------------------------------------------------------------- task


def find_data_dir(name: str) -> Path:
    """``../shared/data/<name>`` beside the repository root or the current directory."""
    here = Path(__file__).resolve()
    cwd = Path.cwd().resolve()
    bases = (cwd, *here.parents, *cwd.parents)  # the repo sits beside shared/: /work/{main,shared}
    candidates = [p / "shared" / "data" / name for p in bases]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        f"no data folder {name!r} found under ../shared/data near {here} or {Path.cwd()}; "
        "pass the paths explicitly"
    )


def treebank_paths(args: argparse.Namespace, default_folder: str = "ud_en_ewt") -> dict[str, Path]:
    """The train / dev / test treebank files: ``--train/--dev/--test`` where given, else the
    ``*{split}.conll*`` file of ``--data-dir`` (default ``../shared/data/<default_folder>``)."""
    paths = {}
    for split in ("train", "dev", "test"):
        given = getattr(args, f"{split}_path", None)
        if given is None:
            data_dir = getattr(args, "data_dir", None)
            folder = Path(data_dir) if data_dir else find_data_dir(default_folder)
            found = sorted(folder.glob(f"*{split}.conll*"))
            if not found:
                raise DataError(f"no {split} treebank (*{split}.conll*) in {folder}")
            given = found[0]
        paths[split] = Path(given)
    return paths


def read_treebank(path: Path) -> list[Sentence]:
    """``read_conll`` with every problem (unreadable, malformed, empty) as a ``DataError``."""
    try:
        sentences = read_conll(path)
    except (ValueError, OSError) as err:  # the CLI reports DataError in one line
        msg = str(err)
        # the reader names the file only (name:line: ...); give the whole path once
        if msg.startswith(f"{path.name}:"):
            raise DataError(f"{path}{msg[len(path.name):]}") from None
        raise DataError(f"{path}: {msg}") from None
    if not sentences:
        raise DataError(f"{path}: no sentences (is it a CoNLL-U / CoNLL-X treebank?)")
    return sentences


def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the common CLI already defines it (e.g. --batch-size)."""
    if any(f in parser._option_string_actions for f in flags):
        if "default" in kwargs and "dest" in kwargs:
            parser.set_defaults(**{kwargs["dest"]: kwargs["default"]})
        return
    parser.add_argument(*flags, **kwargs)


class ParseTask(Task):
    """Chen & Manning parser on CoNLL-U / CoNLL-X treebanks (default: UD English EWT)."""

    name = "parse"
    metric = "uas"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("parse")
        _add(g, "--data-dir", dest="data_dir", default=None,
             help="folder with {train,dev,test}.conllu(.gz) (default: ../shared/data/ud_en_ewt)")
        _add(g, "--train", dest="train_path", default=None, help="training treebank")
        _add(g, "--dev", dest="dev_path", default=None, help="development treebank")
        _add(g, "--test", dest="test_path", default=None, help="test treebank")
        _add(g, "--limit-train", "--max-train-sentences", dest="limit_train", type=int,
             default=None, help="use only the first N training sentences")
        _add(g, "--limit-eval", dest="limit_eval", type=int, default=None,
             help="use only the first N dev/test sentences")
        _add(g, "--tag-column", dest="tag_column", choices=("xpos", "upos"), default="xpos")
        _add(g, "--roots", dest="roots", choices=("auto", "single", "multiple"), default="auto",
             help="children of the root per tree: one (UD), several (CoNLL-X treebanks that "
             "attach punctuation to it), or auto: several if some training tree has several "
             "(default)")
        _add(g, "--hidden-size", dest="hidden_size", type=int, default=500)
        _add(g, "--embedding-dim", dest="embedding_dim", type=int, default=50)
        _add(g, "--activation", dest="activation", choices=("cube", "relu", "tanh"),
             default="cube")
        _add(g, "--dropout", dest="dropout", type=float, default=0.0)
        # meProp (after Chen & Manning) used mini-batches of 10,000 transitions
        set_task_default(parser, "--batch-size", 10_000,
                         "transitions per batch (default 10000, meProp)")
        # at 10,000 transitions a batch, one set of k units for the batch (meProp's minibatch
        # operator) is the one that compacts to dense GEMMs; per-example gains far less
        set_task_default(parser, "--selection", "unified",
                         "unified top-k (default for parsing), per_example or random")

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        for name in ("hidden_size", "embedding_dim"):
            check_option(args, name, low=1)
        check_option(args, "dropout", low=0, high=1, high_open=True)
        check_limit(args, "limit_train")
        check_limit(args, "limit_eval")

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.check_args(args)
        opt = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        paths = treebank_paths(args)
        t0 = time.perf_counter()
        train = read_treebank(paths["train"])
        if opt("limit_train") is not None:
            train = train[: opt("limit_train")]
        self.splits: dict[str, list[Sentence]] = {"train": train}
        for split in ("dev", "test"):
            sents = read_treebank(paths[split])
            if opt("limit_eval") is not None:
                sents = sents[: opt("limit_eval")]
            self.splits[split] = sents
        tag_column, tag_note = choose_tag_column(train, opt("tag_column", "xpos"))
        self.vocab = Vocab(train, tag_column=tag_column)
        multi_rooted = sum(sum(t.head == 0 for t in s) > 1 for s in train)
        roots = opt("roots", "auto")
        self.multi_root = roots == "multiple" or (roots == "auto" and multi_rooted > 0)
        self.features, self.targets, counts = training_examples(
            train, self.vocab, self.multi_root
        )
        if not counts["used"]:
            raise DataError(
                f"{paths['train']}: none of its {len(train)} training trees can be derived by the "
                f"arc-standard oracle ({counts['non_projective']} non-projective, {multi_rooted} "
                "with several roots)"
            )
        self.batch_size = int(opt("batch_size") or 10_000)
        left_out = len(train) - counts["used"]
        summary = (
            f"parse: {len(train)} training sentences ({counts['used']} used; "
            f"{counts['non_projective']} non-projective and {counts['underivable']} underivable "
            f"left out of training), {len(self.targets)} transitions, {len(self.vocab.words)} "
            f"words, {len(self.vocab.tags)} tags ({tag_column}), {self.vocab.num_labels} labels; "
            "dev/test "
            f"{len(self.splits['dev'])}/{len(self.splits['test'])} sentences (all kept); "
            f"features in {time.perf_counter() - t0:.1f} s"
        )
        if multi_rooted:
            summary += f"; {multi_rooted} training trees have several roots"
        summary += f"; the root takes {'several children' if self.multi_root else 'one child'}"
        if tag_note:
            summary += f"; {tag_note}"
        if left_out > 0.2 * len(train):  # e.g. a treebank that attaches punctuation to the root
            summary += f"; warning: {100 * left_out / len(train):.0f}% of training trees unused"
        log.info(summary)
        if not opt("quiet", False):
            print(summary, file=sys.stderr, flush=True)
        self.counts = counts
        self.paths = paths

    def fingerprint(self) -> dict[str, str]:
        if not hasattr(self, "_fingerprint"):
            v, column = self.vocab, self.vocab.tag_column

            def scored(sents: list[Sentence]) -> list[list[tuple]]:
                # what decoding and scoring read of each token
                return [[(t.form, getattr(t, column), t.head, t.deprel, t.is_punct) for t in s]
                        for s in sents]

            self._fingerprint = {
                "vocabulary": content_digest(
                    v.words, v.tags, v.labels, column, v.lowercase, self.multi_root
                ),
                "train": content_digest(self.features, self.targets),
                "dev": content_digest(scored(self.splits["dev"])),
                "test": content_digest(scored(self.splits["test"])),
            }
        return self._fingerprint

    def build_model(self) -> nn.Module:
        a = self.args
        return ParserMLP(
            len(self.vocab.words) + 3, len(self.vocab.tags) + 3, self.vocab.num_labels,
            embedding_dim=getattr(a, "embedding_dim", 50),
            hidden_size=getattr(a, "hidden_size", 500),
            activation=getattr(a, "activation", "cube"),
            dropout=getattr(a, "dropout", 0.0),
        )

    def sparse_exclude(self) -> list[str]:
        return ["output"]

    def num_train_batches(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def train_batches(
        self, epoch: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.targets), generator=generator)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            yield self.features[idx], self.targets[idx]  # (B, 48), (B,)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        feats, gold = batch
        return F.cross_entropy(model(feats), gold)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        sents = self.splits[split]
        predicted = parse(model, sents, self.vocab, multi_root=self.multi_root)
        return attachment_scores(sents, predicted, self.vocab)
