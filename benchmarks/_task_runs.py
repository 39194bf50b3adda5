"""The models of a task's timing loop (``bench_train_loop.py``, ``bench_tagger_step.py``): dense
and MSBP with unified and per-example top-k, from the same initial weights, each with the
optimizer ``msbp train`` gives it (the task's default), set up as ``msbp train`` does."""

from __future__ import annotations

import argparse

import torch
from torch import nn

import msbp
from msbp import train as training
from msbp.cli import TASKS, parse_args

METHODS = ("dense", "unified", "per_example")


def task_runs(
    task_name: str, argv: list[str]
) -> tuple[object, argparse.Namespace, dict[str, tuple[nn.Module, torch.optim.Optimizer]]]:
    """``(task, args, {method: (model, optimizer)})`` for ``msbp train --task task_name *argv``,
    denormals flushed (``--denormals flush``, the default)."""
    args = parse_args(["train", "--task", task_name, *argv, "--quiet"])
    training.setup_runtime(args)
    torch.set_flush_denormal(True)
    task = TASKS[task_name](training.task_args(args))
    runs = {}
    for method in METHODS:
        args.selection = "unified" if method == "dense" else method
        torch.manual_seed(0)
        model = task.build_model()
        kind = "dense" if method == "dense" else "msbp"
        config = training.sparse_config(kind, args)
        if config is not None:
            model = msbp.sparsify(model, config, exclude=task.sparse_exclude() or None)
        runs[method] = (model, training.make_optimizer(model, kind, args))
    return task, args, runs
