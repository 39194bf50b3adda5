"""What a training task (MNIST, dependency parsing, POS tagging) gives the training loop."""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class Task(ABC):
    """One data set + model family, trained identically as dense, sparse (sbp) or MSBP.

    The training loop in ``msbp.train`` owns timing, optimizers, progress and results; a task only
    knows its data, its model and its metrics. ``args`` are the parsed command-line options
    (the common ones plus those from ``add_arguments``).
    """

    name: str = ""
    #: the key of ``evaluate()``'s result that selects the best epoch (higher is better)
    metric: str = "accuracy"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Task-specific command-line options (data paths, model sizes, ...)."""
        return None

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh dense model; the loop seeds the RNG before calling it."""

    def sparse_exclude(self) -> list[str]:
        """Qualified names (globs) of linear layers left dense, e.g. the output layer."""
        return []

    @abstractmethod
    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        """The training batches of one epoch, shuffled with ``generator``."""

    def num_train_batches(self) -> int | None:
        """Number of batches per epoch, for progress bars (None if unknown)."""
        return None

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics in percent on ``split`` ("dev" or "test"); must contain ``self.metric``."""
