"""What a training task (MNIST, dependency parsing, POS tagging) gives the training loop."""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class UsageError(ValueError):
    """A bad option or combination of options; the CLI prints the message and exits with 2."""


def check_option(
    args: argparse.Namespace, name: str, *, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False, hint: str = "",
) -> None:
    """Raise ``UsageError`` unless option ``name`` (a dest, e.g. ``"limit_train"``) is None or a
    finite number within ``[low, high]`` (``low_open`` / ``high_open``: that end excluded).

    The message names the flag and the value: ``--dropout must be in [0, 1), got 1.5``.
    """
    value = getattr(args, name, None)
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        bounds = f"{'<' if high_open else '<='} {high}"
    else:
        bounds = ""
    if isinstance(value, float) and not math.isfinite(value):
        bounds = f"finite and {bounds}" if bounds else "finite"
    raise UsageError(f"--{name.replace('_', '-')} must be {bounds}, got {value}{hint}")


def trains_sparse(args: argparse.Namespace) -> bool:
    """Whether the command trains sbp or msbp (``train --method``, ``compare --methods``)."""
    methods = [getattr(args, "method", None), *(getattr(args, "methods", None) or [])]
    return any(m in ("sbp", "msbp") for m in methods)


def check_limit(args: argparse.Namespace, name: str) -> None:
    """``--limit-train`` / ``--limit-eval``: absent (all data) or >= 1; 0 is an error, not 'all'."""
    check_option(args, name, low=1, hint=f"; leave out --{name.replace('_', '-')} to use all")


def _bytes_of(t: Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t``, read in place. Not through ``t.numpy()``, which
    makes the storage it shares with ``t`` unable to grow: a checkpoint's digest of
    ``model.state_dict()`` (whose memories are the layers' own tensors) then made the next batch
    with more rows than any before fail to resize a ``slot`` memory ("Trying to resize storage
    that is not resizable"), e.g. the first sparse step after ``--dense-warmup``."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr()))


def content_digest(*objects: Any) -> str:
    """SHA-256 (hex) of nested dicts, lists, tuples, tensors and scalars, by content.

    Tensors count by dtype, shape and bytes (wherever they live), scalars by ``repr``, so the
    digest of an object survives a ``torch.save`` / ``torch.load`` round trip unchanged.
    """
    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, Tensor):
            t = obj.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
            h.update(_bytes_of(t))
        elif isinstance(obj, dict):
            h.update(b"{%d:" % len(obj))
            for key, value in obj.items():
                walk(key)
                walk(value)
        elif isinstance(obj, list | tuple):
            h.update(b"[%d:" % len(obj) if isinstance(obj, list) else b"(%d:" % len(obj))
            for item in obj:
                walk(item)
        elif isinstance(obj, bytes):
            h.update(b"b%d:" % len(obj) + obj)
        else:  # str, int, float, bool, None, dtypes: repr is exact and stable
            text = repr(obj).encode()
            h.update(b"%s%d:" % (type(obj).__name__.encode(), len(text)) + text)

    for obj in objects:
        walk(obj)
    return h.hexdigest()


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

    @staticmethod
    def check_args(args: argparse.Namespace) -> None:
        """Raise ``UsageError`` for task option values no run can use (before any data loads)."""
        return None

    def fingerprint(self) -> dict[str, str]:
        """Digests of what a checkpoint depends on besides the options, by part (e.g.
        ``{"vocabulary": ..., "train": ..., "dev": ..., "test": ...}``); resuming from a
        checkpoint whose parts differ is refused. Default: ``{}`` (nothing to compare)."""
        return {}

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh dense model; the loop seeds the RNG before calling it."""

    def sparse_exclude(self) -> list[str]:
        """Qualified names (globs) of linear layers left dense, e.g. the output layer."""
        return []

    def sparse_config_fn(self, config: Any) -> Any:
        """None (default: every layer not excluded gets ``config``), or a ``config_fn`` for
        ``msbp.sparsify``: ``(name, module) -> SparseBackpropConfig | None`` built from the
        method's ``config``, giving layers their own k or leaving them dense (None)."""
        return None

    @abstractmethod
    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        """The training batches of one epoch, shuffled with ``generator``."""

    def num_train_batches(self) -> int | None:
        """Number of batches per epoch, for progress bars (None if unknown)."""
        return None

    def shard_batch(self, batch: Any, rank: int, world: int) -> tuple[Any, float] | None:
        """This process's part of one training batch under ``torchrun`` (``world`` > 1).

        The loop makes every process draw the same global batches (``--batch-size`` x ``world``
        rows, same shuffle) and keeps part ``rank`` of each: ``(part, weight)``, where the loss of
        the part is multiplied by ``weight`` so that the average of the processes' gradients
        (what ``DistributedDataParallel`` takes) is the gradient of the whole batch; None if the
        batch is too small to give every process a row (every process then skips it). Default:
        ``split_batch``, for batches that are a tensor or tuples / lists / dicts of tensors with
        the examples along dim 0 and a loss that is a mean over those rows. A task whose batches
        or loss are otherwise (e.g. a mean over tokens of padded sentences) overrides this.
        """
        return split_batch(batch, rank, world)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics in percent on ``split`` ("dev" or "test"); must contain ``self.metric``."""


def bucketed_batches(
    lengths: list[int], batch_size: int, bucket: int, generator: torch.Generator
) -> list[list[int]]:
    """Example indices in batches for one epoch: shuffled, sorted by ``lengths`` within spans of
    ``bucket`` batches (less padding), the batches in shuffled order (two draws from
    ``generator``)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * max(1, bucket)
    batches: list[list[int]] = []
    for lo in range(0, len(order), span):
        chunk = sorted(order[lo : lo + span], key=lengths.__getitem__)
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]


def _batch_rows(batch: Any) -> set[int]:
    if isinstance(batch, Tensor):
        return {batch.shape[0]} if batch.dim() else set()
    if isinstance(batch, tuple | list):
        return set().union(*(_batch_rows(b) for b in batch))
    if isinstance(batch, dict):
        return set().union(*(_batch_rows(b) for b in batch.values()))
    raise TypeError(
        f"cannot split a batch part of type {type(batch).__name__} across processes; the task "
        "must override Task.shard_batch"
    )


def _slice_batch(batch: Any, lo: int, hi: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[lo:hi] if batch.dim() else batch
    if isinstance(batch, tuple | list):
        return type(batch)(_slice_batch(b, lo, hi) for b in batch)
    return {k: _slice_batch(v, lo, hi) for k, v in batch.items()}


def shard_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch of ``rows`` that process ``rank`` of ``world`` takes:
    contiguous, disjoint, covering, sizes differing by at most one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return rank * rows // world, (rank + 1) * rows // world


def split_batch(batch: Any, rank: int, world: int) -> tuple[Any, float] | None:
    """Part ``rank`` of ``world`` of a batch whose tensors all hold the examples along dim 0
    (a tensor, or tuples / lists / dicts of them; 0-dim tensors are passed whole), with the
    weight ``rows of the part * world / rows of the batch`` (exactly 1.0 when ``world``
    divides the rows) that makes the processes' mean gradient the whole batch's for a mean loss;
    None if the batch has fewer rows than there are processes. ``ValueError`` if the tensors
    disagree on the number of rows."""
    sizes = _batch_rows(batch)
    if len(sizes) != 1:
        raise ValueError(
            f"cannot split a batch across processes: its tensors have {sorted(sizes)} rows "
            "(dim 0), not one common number; the task must override Task.shard_batch"
        )
    (rows,) = sizes
    if rows < world:
        return None
    lo, hi = shard_bounds(rows, rank, world)
    weight = 1.0 if rows % world == 0 else (hi - lo) * world / rows
    return _slice_batch(batch, lo, hi), weight


def set_task_default(
    parser: argparse.ArgumentParser, flag: str, default: Any, help_text: str
) -> None:
    """Give a common option (``--batch-size``, ``--selection``) a task-specific default and
    meaning."""
    action = parser._option_string_actions.get(flag)
    if action is not None:
        parser.set_defaults(**{action.dest: default})
        action.help = help_text
