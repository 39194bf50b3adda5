"""``msbp``: the command line. Thin: every subcommand calls one library function.

    msbp train   --task mnist --method msbp [options]   -> msbp.train.train
    msbp compare --task mnist [options] [--plots DIR]   -> msbp.train.compare
    msbp info                                           -> msbp.environment.info
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from msbp.tasks import TASKS

DEFAULT_TASK = "mnist"
#: exit statuses: bad options, paths, data or checkpoint (one line on stderr, nothing trained);
#: a run whose loss or gradients became non-finite; Ctrl-C
EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
#: the model, data or a batch did not fit in memory (one line on stderr)
EXIT_MEMORY = 4


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _task_from_argv(argv: Sequence[str]) -> str:
    """The value of ``--task`` in ``argv`` (before parsing: it decides which options exist)."""
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return DEFAULT_TASK


def build_parser(task: str = DEFAULT_TASK) -> argparse.ArgumentParser:
    """The ``msbp`` parser; ``train``/``compare`` carry the options of ``task``."""
    from msbp.train import METHODS, add_common_arguments

    parser = _Parser(prog="msbp", description="Sparse backpropagation with memory (MSBP).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def with_task(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK,
                       help=f"default {DEFAULT_TASK}")
        add_common_arguments(p)
        if task in TASKS:
            TASKS[task].add_arguments(p)

    p_train = sub.add_parser("train", help="train one model with one method")
    p_train.add_argument("--method", choices=METHODS, default="msbp", help="default msbp")
    with_task(p_train)

    p_cmp = sub.add_parser("compare", help="train dense, sbp and msbp on the same seed and data")
    p_cmp.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS),
        help="which methods, in order (default: all three)",
    )
    p_cmp.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    with_task(p_cmp)

    p_info = sub.add_parser("info", help="versions, threads, devices, fast paths")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` (without the program name) as ``msbp`` would.

    The options depend on the task, so the task is read first; where argparse reads another one
    than ``_task_from_argv`` (an abbreviation such as ``--ta parse``, or ``--task`` given twice:
    the last wins), the command line is parsed again with that task's options, so that a task
    never trains with another task's options silently dropped or taken."""
    argv = list(argv)
    task = _task_from_argv(argv)
    first = [a for a in argv if a not in ("-h", "--help")]  # the help of the task chosen
    chosen, _ = build_parser(task).parse_known_args(first)
    chosen_task = getattr(chosen, "task", task)
    return build_parser(chosen_task if chosen_task in TASKS else task).parse_args(argv)


def _print_info(as_json: bool) -> None:
    from msbp.environment import info

    data = info()
    if as_json:
        print(json.dumps(data, indent=1))
        return
    env = data.pop("environment")
    for key, value in {**env, **data}.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={'yes' if v is True else 'no' if v is False else v}"
                              for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"{key:16} {value}")


def _stdout_closed() -> int:
    """The reader of stdout went away (``msbp info | head -3``): end quietly, as Unix tools do,
    with Python's flush at exit pointed at /dev/null instead of the closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (a GPU), or the
    CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    import torch

    return (isinstance(err, MemoryError | torch.OutOfMemoryError)
            or "can't allocate memory" in str(err))


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``msbp`` console script; returns the exit status.

    Ctrl-C anywhere (parsing, loading data, building the kernels) ends with one line and status
    130; an ``MSBP_BACKEND`` that names no backend, or ``native`` where the kernels cannot be
    built, with one line and status 2 (not the compiler's output)."""
    from msbp import native

    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("msbp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except native.BackendNameError as err:
        print(f"msbp: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except native.NativeUnavailableError:
        print(f"msbp: error: {native.BACKEND_ENV}=native, but the native kernels could not be "
              f"built (`msbp info` says why); set {native.BACKEND_ENV}=auto or python for the "
              "PyTorch path", file=sys.stderr)
        return EXIT_USAGE


def _main(argv: Sequence[str] | None) -> int:
    from msbp.data.errors import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return 2
    if args.command == "info":
        try:
            _print_info(args.json)
        except BrokenPipeError:
            return _stdout_closed()
        return 0

    from msbp import train as training
    from msbp.train import TrainingDiverged, UsageError, compare, format_table, train

    # under torchrun every process runs this; rank 0 speaks for all of them, except of a
    # divergence, which one process may meet alone
    main = training.process_rank() == 0
    where = "" if training.launched_world_size() == 1 else f" (rank {training.process_rank()})"
    try:
        if args.command == "train":
            results = train(TASKS[args.task], args)
        else:
            results = compare(TASKS[args.task], args)
    except (UsageError, DataError) as err:
        if main:
            print(f"msbp: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as err:
        print(f"msbp: error{where}: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        print(f"msbp: error{where}: out of memory ({_one_line(err, 200)}); try smaller sizes "
              "(hidden units, width, --batch-size, --limit-train)", file=sys.stderr)
        return EXIT_MEMORY
    except KeyboardInterrupt:
        if main:
            print("msbp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not main:
        return 0
    try:
        print(format_table(results))
    except BrokenPipeError:  # the results JSON is written already
        return _stdout_closed()
    if args.out:
        print(f"results: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
