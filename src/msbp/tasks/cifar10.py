"""CIFAR-10 with a small VGG-like convolutional network; the first convolution and the linear
head stay dense, the other convolutions are sparsified over their output channels.

The split: dev = 5,000 training images (a fixed, seeded choice, about 500 per class), train =
the other 45,000, test = the 10,000 test images. Images live as uint8 tensors; a batch is
cropped (4 pixels of zero padding, random 32 x 32 window) and flipped at random, then
normalised, all in a few tensor operations per batch (no DataLoader).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp.config import SparseBackpropConfig
from msbp.data.cifar10 import ARCHIVE_NAME, Cifar10Arrays, load_cifar10
from msbp.data.errors import DataError
from msbp.tasks.base import (
    Task,
    UsageError,
    check_limit,
    check_option,
    content_digest,
    set_task_default,
    trains_sparse,
)

DEV_SIZE = 5000
SPLIT_SEED = 0  # the fixed permutation that picks dev and orders --limit-* subsets
PAD = 4
EVAL_CHUNK = 500
#: the layers ``--layer-ratios`` can name (each a convolution ``<name>.0``, or the linear head)
LAYERS = ("stem", "block1", "block2", "block3", "head")
DENSE = "dense"  # a --layer-ratios value: the layer stays a plain PyTorch layer
# the per-channel statistics of the CIFAR-10 training set
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (no bias: BatchNorm follows), BatchNorm, ReLU; spatial size kept."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def parse_layer_ratios(text: str | None) -> dict[str, float | None]:
    """``--layer-ratios``: ``"block1=0.5,block3=dense"`` -> ``{"block1": 0.5, "block3": None}``
    (None: the layer stays dense); None or ``""`` -> ``{}``. Names are ``LAYERS``; a ratio is
    k / C_out in (0, 1]. Raises ``UsageError`` naming the bad item."""
    if text is None or not text.strip():
        return {}
    ratios: dict[str, float | None] = {}
    for item in text.split(","):
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not name or not value:
            raise UsageError(f"--layer-ratios: {item.strip()!r} is not LAYER=RATIO (e.g. "
                             f"block1=0.5 or block3={DENSE})")
        if name not in LAYERS:
            raise UsageError(f"--layer-ratios: unknown layer {name!r}; choose from "
                             f"{', '.join(LAYERS)}")
        if name in ratios:
            raise UsageError(f"--layer-ratios: {name} is given twice")
        if value == DENSE:
            ratios[name] = None
            continue
        try:
            ratio = float(value)
        except ValueError:
            ratio = math.nan
        if not 0.0 < ratio <= 1.0:  # also false for nan
            raise UsageError(f"--layer-ratios: {name}={value}: the ratio must be a number in "
                             f"(0, 1] or {DENSE!r}")
        ratios[name] = ratio
    return ratios


class CifarNet(nn.Module):
    """A VGG-like net: (n, 3, 32, 32) -> (n, 10) logits.

    ``stem`` (3 -> w, 32x32), ``block1`` (w -> 2w, pool to 16x16), ``block2`` (2w -> 4w, pool to
    8x8), ``block3`` (4w -> 4w, pool to 4x4), global max pool, ``head`` (linear 4w -> 10).
    The convolutions are ``stem.0``, ``block1.0``, ``block2.0``, ``block3.0``.
    """

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn(3, w)
        self.block1 = conv_bn(w, 2 * w)
        self.block2 = conv_bn(2 * w, 4 * w)
        self.block3 = conv_bn(4 * w, 4 * w)
        self.head = nn.Linear(4 * w, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        x = F.max_pool2d(self.block3(x), 2)
        return self.head(torch.amax(x, dim=(2, 3)))


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random 32x32 crops of the zero-padded images and random horizontal flips:
    (n, 3, 32, 32) uint8 -> (n, 3, 32, 32) uint8."""
    n, _, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)).to(images.device)  # (n, h)
    cols = dx[:, None] + torch.arange(w)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(images.device)
    idx_n = torch.arange(n, device=images.device)[:, None, None, None]
    idx_c = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


class Cifar10Task(Task):
    """CIFAR-10 image classification (the JPEG archive in ../shared/data/cifar10), accuracy in
    percent; dense vs SBP vs MSBP on ``CifarNet``."""

    name = "cifar10"
    metric = "accuracy"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        # per-example selection is not a convolution (see msbp.ops.sparse_conv): one channel
        # set per batch
        set_task_default(
            parser, "--selection", "unified",
            "unified (default for cifar10): the k output channels with the largest summed "
            "|gradient| over the batch and positions; random; per_example is not offered for "
            "convolutions",
        )
        set_task_default(parser, "--ratio", 0.1, "k = ratio * output channels (default 0.1)")
        set_task_default(parser, "--batch-size", 64, "images per batch (default 64)")
        set_task_default(parser, "--epochs", 10, "default 10")
        g = parser.add_argument_group("cifar10")
        g.add_argument(
            "--data-dir", default=None,
            help=f"folder holding {ARCHIVE_NAME} (train/<class>/*.jpg, test/<class>/*.jpg), or "
            "the archive itself (default: ../shared/data/cifar10); decoded once into "
            "$MSBP_CACHE_DIR (default ~/.cache/msbp)",
        )
        g.add_argument("--limit-train", type=int, default=None, metavar="N",
                       help="train on N training images only (a fixed, seeded subset)")
        g.add_argument("--limit-eval", type=int, default=None, metavar="N",
                       help="evaluate on N dev and N test images only (fixed subsets)")
        g.add_argument("--dev-size", type=int, default=DEV_SIZE, metavar="N",
                       help=f"training images held out as dev (default {DEV_SIZE})")
        g.add_argument("--width", type=int, default=32,
                       help="channels of the first convolution; then 2x, 4x, 4x (default 32)")
        g.add_argument(
            "--channels-last", action=argparse.BooleanOptionalAction, default=False,
            help="model and images in the channels-last memory format (oneDNN's faster "
            "convolutions on the CPU; default off)",
        )
        g.add_argument("--no-augment", dest="augment", action="store_false",
                       help="no random crops and flips")
        g.add_argument(
            "--sparse-layers", default="blocks", choices=("blocks", "all"),
            help="blocks (default): the first convolution and the head stay dense; all: every "
            "convolution and the head are sparsified",
        )
        g.add_argument(
            "--layer-ratios", default=None, metavar="LIST",
            help="per-layer k / C_out, e.g. 'block1=0.5,block2=0.1' or 'block3=dense' (left "
            f"dense); layers: {', '.join(LAYERS[1:4])} (stem and head with --sparse-layers "
            "all); unnamed layers keep --ratio / --k",
        )

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        check_option(args, "width", low=1)
        check_option(args, "dev_size", low=1)
        check_limit(args, "limit_train")
        check_limit(args, "limit_eval")
        ratios = parse_layer_ratios(getattr(args, "layer_ratios", None))
        excluded = [n for n in ratios if n in ("stem", "head")]
        if excluded and getattr(args, "sparse_layers", "blocks") != "all":
            raise UsageError(f"--layer-ratios names {', '.join(excluded)}, which stay dense "
                             "unless --sparse-layers all")
        every = [n for n in LAYERS if n.startswith("block")
                 or getattr(args, "sparse_layers", "blocks") == "all"]
        if trains_sparse(args) and all(n in ratios and ratios[n] is None for n in every):
            raise UsageError(f"--layer-ratios {args.layer_ratios}: every sparse layer is left "
                             f"dense ({', '.join(every)}), so sbp and msbp would train no sparse "
                             "layer; leave one sparse, or train --method dense")
        head_sparse = (getattr(args, "sparse_layers", "blocks") == "all"
                       and ratios.get("head", 1.0) is not None)
        if getattr(args, "measure_info_loss", False) and trains_sparse(args) and not head_sparse:
            raise UsageError("--measure-info-loss measures sparse linear and LSTM layers; this "
                             "model's sparse layers are convolutions (only the head, with "
                             "--sparse-layers all, would be measured)")
        if getattr(args, "selection", "unified") == "per_example":
            raise UsageError(
                "--selection per_example is not supported for convolutions (each position "
                "would keep its own channels: no longer a convolution); use unified or random"
            )

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.check_args(args)
        opt = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        data_dir = opt("data_dir")
        if data_dir is None:
            from msbp.tasks.parse import find_data_dir

            data_dir = find_data_dir("cifar10")
        arrays: Cifar10Arrays = load_cifar10(data_dir, quiet=bool(opt("quiet", False)))
        if len(arrays.classes) < 2:
            raise DataError(f"{arrays.source}: {len(arrays.classes)} class folder(s); "
                            "classification needs at least 2")
        n = arrays.train_images.shape[0]
        dev_size = int(opt("dev_size", DEV_SIZE))
        if dev_size >= n:
            raise UsageError(f"--dev-size {dev_size} leaves no training images of the {n} in "
                             f"{Path(arrays.source).name}")
        g = torch.Generator().manual_seed(SPLIT_SEED)
        order = torch.randperm(n, generator=g)
        dev_idx, train_idx = order[:dev_size], order[dev_size:]
        test_idx = torch.randperm(arrays.test_images.shape[0], generator=g)
        if opt("limit_train") is not None:
            train_idx = train_idx[: opt("limit_train")]
        if opt("limit_eval") is not None:
            dev_idx, test_idx = dev_idx[: opt("limit_eval")], test_idx[: opt("limit_eval")]
        device = torch.device(opt("device", "cpu"))
        self.classes = arrays.classes
        self.data = {
            "train": (arrays.train_images[train_idx], arrays.train_labels[train_idx]),
            "dev": (arrays.train_images[dev_idx], arrays.train_labels[dev_idx]),
            "test": (arrays.test_images[test_idx], arrays.test_labels[test_idx]),
        }
        self.data = {k: (x.to(device), y.to(device)) for k, (x, y) in self.data.items()}
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.batch_size = int(opt("batch_size") or 64)
        if not opt("quiet", False):
            sizes = "/".join(str(v[0].shape[0]) for v in self.data.values())
            print(f"cifar10: {sizes} images train/dev/test, {len(self.classes)} classes",
                  file=sys.stderr, flush=True)

    def fingerprint(self) -> dict[str, str]:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = {
                "classes": content_digest(self.classes),
                **{split: content_digest(x, y) for split, (x, y) in self.data.items()},
            }
        return self._fingerprint

    def build_model(self) -> nn.Module:
        model = CifarNet(int(getattr(self.args, "width", 32)), len(self.classes))
        if getattr(self.args, "channels_last", False):
            model = model.to(memory_format=torch.channels_last)
        return model

    def sparse_exclude(self) -> list[str]:
        if getattr(self.args, "sparse_layers", "blocks") == "all":
            return []
        # the stem has 3 input channels (its backward is cheap and needs no dx) and the
        # 10-way head is tiny: sparsifying them saves nothing and costs accuracy
        return ["stem.0", "head"]

    def sparse_config_fn(
        self, config: SparseBackpropConfig
    ) -> Callable[[str, nn.Module], SparseBackpropConfig | None] | None:
        """With ``--layer-ratios``: the named layers get ``config`` with their own ratio (or stay
        dense), the others ``config``; without it, None (every layer gets ``config``)."""
        ratios = parse_layer_ratios(getattr(self.args, "layer_ratios", None))
        if not ratios:
            return None
        if config.k == 0:  # --dense-impl msbp: every layer sparse-coded with k = out
            return lambda name, module: config

        def config_fn(name: str, module: nn.Module) -> SparseBackpropConfig | None:
            layer = name.split(".")[0]
            if layer not in ratios:
                return config
            ratio = ratios[layer]
            return None if ratio is None else config.replace(ratio=ratio, k=None)

        return config_fn

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (n, 3, 32, 32) -> normalised float32 (channels-last with --channels-last)."""
        out = (images.float() - self.mean) / self.std
        if getattr(self.args, "channels_last", False):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def num_train_batches(self) -> int:
        return -(-self.data["train"][0].shape[0] // self.batch_size)

    def train_batches(
        self, epoch: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.data["train"]
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        do_augment = getattr(self.args, "augment", True)
        for start in range(0, x.shape[0], self.batch_size):
            idx = order[start : start + self.batch_size]
            images = x[idx]
            if do_augment:
                images = augment(images, generator)
            yield self.normalize(images), y[idx]  # (b, 3, 32, 32), (b,)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if split not in ("dev", "test"):
            raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
        x, y = self.data[split]
        was_training = model.training
        model.eval()
        correct, loss = 0, 0.0
        for start in range(0, x.shape[0], EVAL_CHUNK):
            logits = model(self.normalize(x[start : start + EVAL_CHUNK]))
            target = y[start : start + EVAL_CHUNK]
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
        model.train(was_training)
        n = max(x.shape[0], 1)
        return {"accuracy": 100.0 * correct / n, "loss": loss / n}
