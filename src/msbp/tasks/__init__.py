"""The registry of training tasks: ``TASKS[name]`` is the ``Task`` class, imported on first use.

Adding a task is one line in ``_TASK_CLASSES`` ("name": "module:Class"); modules are imported
lazily so that ``msbp info`` and ``msbp --help`` never pay for a task's imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from msbp.tasks.base import Task

_TASK_CLASSES: dict[str, str] = {
    "cifar10": "msbp.tasks.cifar10:Cifar10Task",
    "mnist": "msbp.tasks.mnist:MnistTask",
    "parse": "msbp.tasks.parse:ParseTask",
    "polarity": "msbp.tasks.polarity:PolarityTask",
    "pos": "msbp.tasks.pos:PosTask",
}


class _LazyTasks(Mapping[str, type[Task]]):
    """A read-only ``name -> Task class`` mapping that imports each task module on lookup."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths

    def __getitem__(self, name: str) -> type[Task]:
        try:
            module_name, _, cls_name = self._paths[name].partition(":")
        except KeyError:
            raise KeyError(f"unknown task {name!r}; known tasks: {sorted(self._paths)}") from None
        return getattr(importlib.import_module(module_name), cls_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


#: task name -> Task subclass (``TASKS["mnist"]`` imports ``msbp.tasks.mnist``)
TASKS: Mapping[str, type[Task]] = _LazyTasks(_TASK_CLASSES)

__all__ = ["TASKS", "Task"]
