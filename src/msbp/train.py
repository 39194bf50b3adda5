"""The training loop shared by every task: dense, sparse backprop (sbp) and MSBP, timed alike.

``train_run(task, method, args)`` trains one model and returns its run record;
``train(task_cls, args)`` and ``compare(task_cls, args)`` wrap it for ``msbp train`` and
``msbp compare`` and return the results document (schema in ``make_results``).

Every method starts from the same initial weights (the torch RNG is seeded with ``--seed`` just
before ``build_model``) and sees the same data order (a ``torch.Generator`` seeded with ``--seed``
shuffles the batches), so the methods differ only in their backward pass.

Under ``torchrun --nproc-per-node N -m msbp ...`` (``WORLD_SIZE`` > 1 in the environment) every
process joins one process group (gloo on the CPU, nccl with ``--device cuda``), draws the same
global batches of N x ``--batch-size`` rows and trains on its own part of each
(``Task.shard_batch``) with the model in ``DistributedDataParallel``; rank 0 evaluates, prints,
and writes the results, plots and checkpoints (with every process's memory and RNG states).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from msbp import native
from msbp.config import MEMORY_LAYOUTS, MEMORY_ROWS, SELECTIONS, SparseBackpropConfig
from msbp.convert import dense_backward, sparsify
from msbp.data.errors import DataError
from msbp.distributed import wrap_ddp
from msbp.environment import DENORMAL_MODES, auto_threads, denormals
from msbp.info import InfoLossMeter
from msbp.nn import SparseLinear, SparseLSTM
from msbp.nn.memory import MemoryMixin, gather_memory_state, load_memory_state
from msbp.optim import LazyRowAdam
from msbp.tasks.base import Task, UsageError, check_option, content_digest

METHODS = ("dense", "sbp", "msbp")
METHOD_LABELS = {"dense": "dense", "sbp": "+ sparse backprop", "msbp": "+ MSBP"}
#: options that may change between a checkpoint and its resumption
RESUMABLE_CHANGES = frozenset(
    {"epochs", "resume", "checkpoint", "out", "quiet", "threads", "plots", "command", "methods"}
)
#: what the results JSON says of its timings when several processes trained
DISTRIBUTED_TIMING = (
    "rank 0's wall time; loss.backward() includes DistributedDataParallel's all-reduce of the "
    "gradients, and the first step after an evaluation includes waiting for rank 0"
)
#: what ``torch.manual_seed`` and ``torch.Generator.manual_seed`` take, with room for the
#: per-layer seeds ``seed + 1 + i`` of random selection
MAX_SEED = 2**63 - 1
#: the most ``--threads`` taken (``torch.set_num_threads`` takes a C int; a larger count would
#: overflow it, and OpenMP would start that many threads)
MAX_THREADS = 1024
CHECKPOINT_FORMAT = "msbp-checkpoint"
CHECKPOINT_VERSION = 2  # 1: before the checksum and the data fingerprint (never resumed)
#: on a GPU, the loss sum is read (a device sync) every CHECK_EVERY steps to spot divergence
CHECK_EVERY = 100


class TrainingDiverged(RuntimeError):
    """The training loss or a gradient became non-finite; the CLI prints the message (which run,
    epoch and step, what to try) and exits with status 3."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every task shares: method configuration, optimisation, run control."""
    sp = parser.add_argument_group("sparse backprop")
    sp.add_argument("--ratio", type=float, default=0.04, help="k = ratio * out (default 0.04)")
    sp.add_argument("--k", type=int, default=None, help="kept units per layer; wins over --ratio")
    sp.add_argument(
        "--memory", type=float, default=0.8,
        help="memory ratio alpha of msbp (default 0.8, the paper's); sbp always uses 0",
    )
    sp.add_argument(
        "--selection", choices=SELECTIONS, default="per_example",
        help="top-k per example (meProp's original, default), unified top-k of columns, "
        "or random-k columns",
    )
    sp.add_argument(
        "--memory-layout", choices=MEMORY_LAYOUTS, default="unit",
        help="memory per output unit (default) or per gradient slot",
    )
    sp.add_argument(
        # SUPPRESS: see --consensus
        "--memory-rows", choices=MEMORY_ROWS, default=argparse.SUPPRESS,
        help="rows that take the memory: those with a non-zero gradient (default; padding "
        "changes nothing) or all rows (the old behaviour)",
    )
    sp.add_argument("--align", type=int, default=1, help="round k up to a multiple (default 1)")
    sp.add_argument(
        # SUPPRESS: see --consensus
        "--dense-warmup", type=int, default=argparse.SUPPRESS, metavar="N",
        help="sbp and msbp train their first N epochs with exact dense backprop (the sparse "
        "layers run as plain PyTorch ops, the memory stays empty), then sparse (default 0)",
    )
    sp.add_argument(
        # SUPPRESS: absent from the options unless given, so checkpoints written before this
        # flag existed keep their fingerprint
        "--consensus", action="store_true", default=argparse.SUPPRESS,
        help="under torchrun: all processes keep the same k units (unified or random selection) "
        "and exchange only those rows of the sparse weight gradients",
    )
    sp.add_argument(
        "--dense-impl", choices=("torch", "msbp"), default="torch",
        help="dense runs use PyTorch's own layers (default), or msbp's layers with k = out, i.e. "
        "the same code as the sparse runs with dense GEMMs (isolates what sparsity saves)",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20, help="default 20 (meProp)")
    opt.add_argument(
        "--batch-size", type=int, default=10, help="default 10 (meProp's MNIST mini-batch)"
    )
    opt.add_argument(
        "--optimizer", choices=("adam", "lazy_adam", "sgd"), default="adam",
        help="adam: torch's Adam (fused) on every weight; lazy_adam: msbp.optim.LazyRowAdam, "
        "Adam on only the rows sparse backprop touched (meProp's sparse update; equals adam for "
        "dense runs); sgd",
    )
    opt.add_argument("--lr", type=float, default=1e-3, help="default 1e-3 (meProp's Adam)")
    opt.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    opt.add_argument("--seed", type=int, default=1)

    run = parser.add_argument_group("run")
    run.add_argument(
        "--threads", type=_threads, default="auto",
        help="torch threads, at most 1024; auto (default): 2, or 1 where another job keeps a core "
        "busy, and each process's share under torchrun",
    )
    run.add_argument(
        "--denormals", choices=DENORMAL_MODES, default="flush",
        help="flush (default): denormal floats become zero, for every method alike (on an Intel "
        "Xeon they slowed dense Adam's step 25x where a gradient stays zero, which would "
        "flatter sparse runs); keep: IEEE arithmetic (PyTorch's default, and this command's "
        "before 2026-12)",
    )
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--out", default=None, metavar="PATH", help="write the results JSON here")
    run.add_argument(
        "--eval-test", choices=("every", "best"), default="every",
        help="evaluate test every epoch (default) or once, on a copy of the best-dev epoch",
    )
    run.add_argument(
        "--checkpoint", default=None, metavar="PATH",
        help="save model, optimizer, RNG and results at every epoch end",
    )
    run.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    info = parser.add_argument_group("information loss")
    info.add_argument(
        "--measure-info-loss", action="store_true",
        help="record information-loss measures per sparse layer (slows training; timings then "
        "include the measurement)",
    )
    info.add_argument("--info-every", type=int, default=1000, help="a window starts every N steps")
    info.add_argument("--info-window", type=int, default=100, help="steps per window")


def sparse_config(method: str, args: argparse.Namespace) -> SparseBackpropConfig | None:
    """The layer config of ``method``: memory 0 for sbp, ``--memory`` for msbp; for dense, None
    (PyTorch's layers) or, with ``--dense-impl msbp``, k = 0 (msbp's layers, every unit kept)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "dense":
        if getattr(args, "dense_impl", "torch") == "msbp":
            return SparseBackpropConfig(k=0, memory=0.0)
        return None
    try:
        return SparseBackpropConfig(
            ratio=args.ratio,
            k=args.k,
            selection=args.selection,
            memory=0.0 if method == "sbp" else args.memory,
            memory_layout=args.memory_layout,
            memory_rows=getattr(args, "memory_rows", "active"),
            align=args.align,
            consensus=getattr(args, "consensus", False),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def make_optimizer(
    model: nn.Module, method: str, args: argparse.Namespace
) -> torch.optim.Optimizer:
    """The optimizer of every run: Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8, as meProp), its
    row-sparse form ``LazyRowAdam``, or SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adam":
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    if args.optimizer == "lazy_adam":
        return LazyRowAdam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    raise UsageError(f"unknown optimizer {args.optimizer!r}")


# -- several processes (torchrun) ----------------------------------------------------------------


def launched_world_size() -> int:
    """How many processes ``torchrun`` started for this run (``WORLD_SIZE``); 1 without it."""
    return _env_count("WORLD_SIZE")


def _env_count(name: str) -> int:
    """A process count torchrun sets in the environment variable ``name``; 1 if unset or bad."""
    try:
        return max(1, int(os.environ.get(name, "1")))
    except ValueError:
        return 1


def process_world_size() -> int:
    """Processes in the default ``torch.distributed`` group; 1 if none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def process_rank() -> int:
    """This process's rank: in the initialised group, else ``torchrun``'s ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if launched_world_size() > 1:
        try:
            return int(os.environ.get("RANK", "0"))
        except ValueError:
            return 0
    return 0


@contextlib.contextmanager
def process_group(args: argparse.Namespace):
    """Join ``torchrun``'s process group for one command and leave it afterwards: gloo on the
    CPU, nccl with ``--device cuda`` (one GPU per process, ``LOCAL_RANK``). Does nothing in a
    plain run or when a group is already initialised (the caller's, kept)."""
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    backend = "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend)
    finished = False
    try:
        yield
        finished = True
    finally:
        if finished:  # a process that left while another still talked to it aborted the other
            dist.barrier()
        # DDP's reducer and hooks form reference cycles that keep the gloo group alive past
        # destroy_process_group, to be freed during interpreter shutdown, where its worker
        # threads' teardown can abort the process (SIGABRT, "terminate called"): free them now
        gc.collect()
        dist.destroy_process_group()


def _wrap_for_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (``msbp.distributed.wrap_ddp``): the processes'
    gradients averaged at every backward, only the kept rows exchanged for consensus layers; the
    sparse layers' memory stays per process (it is no buffer) unless consensus shares it."""
    on_gpu = any(p.is_cuda for p in model.parameters())
    device_ids = [torch.cuda.current_device()] if on_gpu else None
    return wrap_ddp(model, device_ids=device_ids, **ddp_kwargs)


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (a collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _threads(text: str) -> int | str:
    """``--threads``: ``auto`` or a whole number (checked by ``check_args``)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        msg = f"expected a whole number or 'auto', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def check_args(args: argparse.Namespace) -> None:
    """Raise ``UsageError`` for option values no run can use."""
    for name in ("epochs", "batch_size", "info_every", "info_window"):
        check_option(args, name, low=1)
    if args.threads != "auto":
        check_option(args, "threads", low=1, high=MAX_THREADS)
    check_option(args, "lr", low=0, low_open=True)
    check_option(args, "momentum", low=0)
    check_option(args, "seed", low=0, high=MAX_SEED)
    check_option(args, "dense_warmup", low=0)
    if args.info_window > args.info_every:
        raise UsageError(
            f"--info-window ({args.info_window}) must not exceed --info-every ({args.info_every})"
        )
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available (see `msbp info`)")
    world = max(launched_world_size(), process_world_size())
    if world > 1 and args.measure_info_loss:
        raise UsageError(f"--measure-info-loss needs a single process, this run has {world} "
                         "(torchrun); measure it with `python -m msbp`")
    for method in METHODS:
        sparse_config(method, args)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_can_create_in(option: str, value: str, folder: Path) -> None:
    """``folder`` or, where it does not exist yet, its nearest existing ancestor must be a
    directory in which a file can be created (the missing folders are made at write time)."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise UsageError(f"{option} {value}: cannot be written, {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {value}: cannot be written, no write permission in {base}")
    try:  # permissions are not the whole story (read-only mounts, quotas, ACLs): try it
        fd, probe = tempfile.mkstemp(prefix=".msbp-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(
            f"{option} {value}: cannot be written in {base} ({err.strerror})"
        ) from None


def _check_file_target(option: str, value: str, path: Path | None = None) -> None:
    """``path`` (default ``value``, the option's value) must be a file that can be written."""
    path = Path(value) if path is None else path
    for target in (path, path.with_name(path.name + ".tmp")):  # the temp file of atomic writes
        if target.is_dir():
            raise UsageError(f"{option} {value}: {target} is a directory; give a file path")
    _check_can_create_in(option, value, path.parent)


def check_paths(args: argparse.Namespace, checkpoints: list[str]) -> None:
    """Raise ``UsageError`` before any training when ``--out``, the ``checkpoints`` (the files
    ``--checkpoint`` names: one per method under ``compare``) or ``--plots`` cannot be written,
    or ``--resume`` finds none of the checkpoints."""
    if getattr(args, "out", None):
        _check_file_target("--out", args.out)
    plots = getattr(args, "plots", None)
    if plots:
        if Path(plots).exists() and not Path(plots).is_dir():
            raise UsageError(f"--plots {plots}: is not a directory")
        _check_can_create_in("--plots", plots, Path(plots))
    for path in checkpoints:
        _check_file_target("--checkpoint", args.checkpoint, Path(path))
    # one file for two things: the results JSON would replace a checkpoint (or the checkpoint's
    # atomic write, through PATH.tmp, the JSON), or --plots could not make its folder
    written: dict[Path, str] = {}
    targets = [("--out", args.out, [args.out] if getattr(args, "out", None) else [])]
    targets.append(("--checkpoint", args.checkpoint, checkpoints))
    for option, value, files in targets:
        for file in files:
            for target in (Path(file), Path(f"{file}.tmp")):
                key = target.resolve()
                other = written.get(key)
                if other is not None and other != option:
                    raise UsageError(f"{option} {value}: {target} is also written by {other}; "
                                     "give them different paths")
                written[key] = option
    if plots and Path(plots).resolve() in written:
        raise UsageError(f"--plots {plots}: is also a file written by "
                         f"{written[Path(plots).resolve()]}; give a folder of its own")
    if checkpoints and getattr(args, "resume", False):
        if not any(Path(f).is_file() for f in checkpoints):
            raise UsageError(f"--resume: no checkpoint at {' or '.join(checkpoints)}; leave out "
                             "--resume to start afresh")


def setup_runtime(args: argparse.Namespace) -> None:
    """Validate ``args`` and set the torch thread count (``auto``: see ``auto_threads``)."""
    check_args(args)
    if args.threads == "auto":
        args.threads = auto_threads(2, _env_count("LOCAL_WORLD_SIZE"))
        if args.threads < 2:
            _log(args, f"--threads auto: {args.threads} (the cores free of other jobs, or this "
                 "process's share of them)")
    torch.set_num_threads(args.threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain(obj: Any) -> Any:
    """``obj`` as JSON types (numpy floats, paths, tuples become float, str, list): what a
    checkpoint holds besides tensors, so that ``torch.load(weights_only=True)`` reads it back."""
    return json.loads(json.dumps(obj, default=str))


def _args_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    return _plain({
        k: v for k, v in sorted(vars(args).items())
        if k not in RESUMABLE_CHANGES and not callable(v)
    })


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with its format, version and SHA-256 (``content_digest``), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "sha256": content_digest(state), **state}, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(
    path: str | os.PathLike[str], method: str, args: argparse.Namespace, task: Task,
    device: torch.device | str = "cpu", world_size: int | None = None,
) -> dict[str, Any]:
    """The state saved in checkpoint ``path``, verified to continue ``method`` on ``task``.

    Raises ``DataError`` when the file is not an intact msbp checkpoint (unreadable, truncated,
    foreign, or its SHA-256 does not match its contents) and ``UsageError`` when it was made by
    another number of processes (``world_size``, default this run's), by another method, with
    other options, or on other data (``task.fingerprint()``).
    """
    afresh = "start afresh without --resume"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: an empty file, not a checkpoint; {afresh}")
    try:  # weights_only: tensors and plain containers only, no code runs from the file
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # zip, pickle, EOF and OS errors all mean: not usable
        raise DataError(f"{path}: not a readable checkpoint ({_first_line(err)}); {afresh}"
                        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not an msbp checkpoint (or one from an msbp without "
                        f"checksums); {afresh}")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: checkpoint version {ckpt.get('version')!r}, this msbp reads "
                        f"version {CHECKPOINT_VERSION}; {afresh}")
    state = {k: v for k, v in ckpt.items() if k not in ("format", "version", "sha256")}
    if content_digest(state) != ckpt.get("sha256"):
        raise DataError(f"{path}: damaged checkpoint (its SHA-256 does not match its contents); "
                        f"{afresh}")
    world = process_world_size() if world_size is None else world_size
    saved_world = state.get("world_size", 1)  # checkpoints before torchrun support: 1
    if saved_world != world:
        how = "python -m msbp" if saved_world == 1 else f"torchrun --nproc-per-node {saved_world}"
        raise UsageError(
            f"checkpoint {path} was written by {saved_world} process(es), this run has {world} "
            f"(every process keeps its own memory); resume it with {how}, or {afresh}"
        )
    # checkpoints from before --denormals kept them
    theirs, ours = {"denormals": "keep", **state.get("args", {})}, _args_fingerprint(args)
    # the method is compared on its own (`msbp train --method M` has the option, `msbp compare`
    # not; both train M alike, so a checkpoint of one resumes under the other)
    theirs.pop("method", None)
    ours.pop("method", None)
    if state.get("method") != method or theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise UsageError(
            f"checkpoint {path} was made with other options ({state.get('method')}; differs "
            f"in {diff or 'method'}); {afresh}"
        )
    done = state.get("epoch")
    if isinstance(done, int) and done > args.epochs:
        raise UsageError(
            f"checkpoint {path} has trained {done} epochs, more than --epochs {args.epochs}; "
            f"resume it with --epochs {done} or more, or {afresh}"
        )
    theirs, ours = state.get("data", {}), task.fingerprint()
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise UsageError(
            f"checkpoint {path} was made on other data (its {', '.join(diff)} differ from this "
            f"run's {task.name} data); {afresh}"
        )
    return state


def _reads_loss_each_step(device: torch.device) -> bool:
    """Whether reading the loss at every step is free (no device to wait for)."""
    return device.type == "cpu"


def _diverged(
    method: str, args: argparse.Namespace, epoch: int, step: int, what: str,
    since: int | None = None,
) -> TrainingDiverged:
    """The error of a diverged run: which run, epoch and step (1-based), what to try."""
    where = f"step {step}" if since is None or since >= step else f"steps {since}-{step}"
    return TrainingDiverged(
        f"{method} diverged at epoch {epoch + 1}, {where}: {what}; try a lower --lr "
        f"(now {args.lr:g})"
    )


def _progress(iterable, total: int | None, desc: str, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, mininterval=0.5)


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet and process_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def train_run(task: Task, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model of ``task`` with ``method`` ("dense", "sbp", "msbp"); returns its record.

    The record: ``{"method", "backprop_seconds", "total_seconds", "dev_accuracy",
    "test_accuracy", "best_epoch", "epochs": [per-epoch dicts], "info_loss": dict | None}``.
    ``backprop_seconds`` is the wall time inside ``loss.backward()``; ``total_seconds`` the whole
    training loop (forward, backward, optimizer, batching) without evaluation and checkpoints.
    Accuracies are ``task.metric`` in percent; test is taken at the best-dev epoch.

    With several processes (an initialised ``torch.distributed`` group; ``task`` built with the
    global batch size, see ``task_args``) every process trains on its part of each batch in
    ``DistributedDataParallel``; ``train_loss`` is the mean over the processes, the timings are
    rank 0's, only rank 0 evaluates and writes checkpoints, and every process returns rank 0's
    record.
    """
    world, rank = process_world_size(), process_rank()
    main = rank == 0
    device = torch.device(args.device)
    config = sparse_config(method, args)
    torch.manual_seed(args.seed)  # same initial weights for every method
    model = task.build_model().to(device)
    if config is not None:
        config_fn = task.sparse_config_fn(config)
        if config_fn is None:
            model = sparsify(model, config, exclude=task.sparse_exclude() or None)
        else:
            model = sparsify(model, config_fn=config_fn, exclude=task.sparse_exclude() or None)
    sparse_layers = [m for m in model.modules() if isinstance(m, SparseLinear | SparseLSTM)]
    # every sparse layer kind (linear, LSTM, convolution, attention) draws its random columns from
    # a generator of its own, seeded from --seed and saved in checkpoints
    random_layers = [m for m in model.modules() if isinstance(m, MemoryMixin)
                     and hasattr(m, "generator")]
    for i, layer in enumerate(random_layers):
        if config is not None and config.selection == "random":
            layer.generator = torch.Generator(device=device).manual_seed(args.seed + 1 + i)
    model.train()
    optimizer = make_optimizer(model, method, args)
    data_order = torch.Generator().manual_seed(args.seed)  # same batches for every method
    meter = None
    if args.measure_info_loss and config is not None and not sparse_layers:
        raise UsageError(f"--measure-info-loss measures sparse linear and LSTM layers; the "
                         f"{task.name} model has none under {method}")
    if args.measure_info_loss and sparse_layers:
        meter = InfoLossMeter(model, every=args.info_every, window=args.info_window)

    run: dict[str, Any] = {
        "method": method,
        "backprop_seconds": 0.0,
        "total_seconds": 0.0,
        "dev_accuracy": None,
        "test_accuracy": None,
        "best_epoch": None,
        "epochs": [],
        "info_loss": None,
    }
    start_epoch, step = 0, 0
    best_state: dict[str, Any] | None = None
    ckpt_path = Path(args.checkpoint) if args.checkpoint else None
    if ckpt_path is not None and args.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, method, args, task, device, world)
        try:
            model.load_state_dict(ckpt["model"])  # rank 0's memory ...
            if world > 1:
                load_memory_state(model, ckpt["memories"], rank)  # ... replaced by this rank's
            optimizer.load_state_dict(ckpt["optimizer"])
            rng = ckpt["rank_rng"][rank] if world > 1 else ckpt["rng"]
            torch.set_rng_state(rng["torch"].cpu())
            data_order.set_state(rng["data_order"].cpu())
            for layer, state in zip(random_layers, rng["selection"], strict=True):
                if layer.generator is not None and state is not None:
                    layer.generator.set_state(state.cpu())
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
            run = ckpt["run"]
            best_state = ckpt.get("best_state")
            start_epoch, step = ckpt["epoch"], ckpt["step"]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"{ckpt_path}: does not fit this {method} model "
                            f"({_first_line(err)}); start afresh without --resume") from None
        if meter is not None and run.get("info_loss"):
            meter.load_records(run["info_loss"]["layers"])
        _log(args, f"{method}: resumed from {ckpt_path} after epoch {start_epoch}")
    # what the loss runs through: under torchrun, DDP averages the processes' gradients
    net = _wrap_for_ddp(model) if world > 1 else model

    best = -float("inf")
    for row in run["epochs"]:
        if row[f"dev_{task.metric}"] > best:
            best = row[f"dev_{task.metric}"]
    n_batches = task.num_train_batches()
    check_each_step = _reads_loss_each_step(device)
    native.prepare()  # a first build of the kernels must not count as training time
    warmup = getattr(args, "dense_warmup", 0) or 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        # --dense-warmup: the same model and optimizer, its sparse layers flagged to compute
        # with plain PyTorch ops (exact dense backprop, memory untouched) for the first epochs
        mode = (dense_backward(model) if config is not None and epoch < warmup
                else contextlib.nullcontext())
        backprop = 0.0
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        steps = 0
        batches = _progress(
            task.train_batches(epoch, data_order), n_batches,
            f"{method} epoch {epoch + 1}/{args.epochs}", args.quiet or not main,
        )
        _sync(device)
        t_start = time.perf_counter()
        with mode:
            for batch in batches:
                weight = 1.0
                if world > 1:  # every process drew the same global batch: keep this rank's part
                    part = task.shard_batch(batch, rank, world)
                    if part is None:  # fewer rows than processes: every process skips it
                        continue
                    batch, weight = part
                if meter is not None:  # on measured steps: a dense pass for the true gradients
                    meter.start_step(step, lambda batch=batch: task.loss(model, batch))
                # the fastest ordinary loop; sparse layers put back their own gradient buffer
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(net, batch)
                if weight != 1.0:  # a last batch that the processes share unevenly
                    loss = loss * weight
                # reading the loss costs nothing on the CPU; on a GPU it would wait for the device
                # at every step, so there the running sum is read every CHECK_EVERY steps instead
                if check_each_step and not math.isfinite(loss.item()):
                    raise _diverged(method, args, epoch, steps + 1, f"the loss is {loss.item()}")
                _sync(device)
                t_bwd = time.perf_counter()
                try:
                    loss.backward()
                except FloatingPointError as err:  # a sparse layer met a non-finite gradient
                    what = str(err).split(";")[0]
                    raise _diverged(method, args, epoch, steps + 1, what) from None
                _sync(device)
                backprop += time.perf_counter() - t_bwd
                optimizer.step()
                loss_sum += loss.detach()
                if meter is not None:
                    meter.end_step(step)
                step += 1
                steps += 1
                if (not check_each_step and steps % CHECK_EVERY == 0
                        and not math.isfinite(loss_sum)):
                    raise _diverged(method, args, epoch, steps, "the loss became non-finite",
                                    since=steps - CHECK_EVERY + 1)
        _sync(device)
        seconds = time.perf_counter() - t_start
        if world > 1:  # the mean of the processes' (weighted) losses: the global batch's loss
            dist.all_reduce(loss_sum)
            loss_sum /= world
        if not math.isfinite(loss_sum):
            raise _diverged(method, args, epoch, steps, "the loss became non-finite",
                            since=steps - steps % CHECK_EVERY + 1)

        if main:  # the parameters are the same in every process: one evaluates
            dev = task.evaluate(model, "dev")
            test = task.evaluate(model, "test") if args.eval_test == "every" else None
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "steps": steps,
                "train_loss": float(loss_sum) / max(steps, 1),
                "backprop_seconds": backprop,
                "total_seconds": seconds,
            }
            row.update({f"dev_{k}": v for k, v in dev.items()})
            if test is not None:
                row.update({f"test_{k}": v for k, v in test.items()})
            run["epochs"].append(row)
            run["backprop_seconds"] += backprop
            run["total_seconds"] += seconds
            if dev[task.metric] > best:
                best = dev[task.metric]
                run["best_epoch"] = epoch + 1
                run["dev_accuracy"] = dev[task.metric]
                if test is not None:
                    run["test_accuracy"] = test[task.metric]
                else:
                    best_state = copy.deepcopy(model.state_dict())
            if meter is not None:
                run["info_loss"] = meter.result()
            test_text = f" test {test[task.metric]:.2f}" if test is not None else ""
            _log(
                args,
                f"{method} epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.4f} "
                f"dev {dev[task.metric]:.2f}{test_text} "
                f"({seconds:.1f} s, backprop {backprop:.1f} s)",
            )
        if ckpt_path is not None:
            rng = {
                "torch": torch.get_rng_state(),
                "data_order": data_order.get_state(),
                "selection": [
                    layer.generator.get_state() if layer.generator is not None else None
                    for layer in random_layers
                ],
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
            saved: dict[str, Any] = {
                "method": method,
                "args": _args_fingerprint(args),
                "data": task.fingerprint(),
                "world_size": world,
                "epoch": epoch + 1,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng,
                "run": _plain(run),
                "best_state": best_state,
            }
            if world > 1:  # collectives: every process's memory and RNG states
                saved["memories"] = gather_memory_state(model)
                saved["rank_rng"] = [None] * world
                dist.all_gather_object(saved["rank_rng"], rng)
            if main:
                _save_checkpoint(ckpt_path, saved)

    if meter is not None:
        meter.close()
        run["info_loss"] = meter.result()
    if main and args.eval_test == "best" and best_state is not None:
        final_state = copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        run["test_accuracy"] = task.evaluate(model, "test")[task.metric]
        model.load_state_dict(final_state)
    if world > 1:
        run = _from_rank0(run)
    return run


def make_results(
    task: Task, args: argparse.Namespace, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The results document: ``{"task", "config", "runs", "environment"}``.

    ``environment["world_size"]`` is the number of processes that trained (1 for a plain run);
    with more, ``environment["timing"]`` says whose times these are.

    ``config`` holds the options (JSON-safe), the task's metric and the layer config of each
    method present; accuracies are in percent.
    """
    from msbp.environment import environment

    options = {
        k: v for k, v in sorted(vars(args).items())
        if isinstance(v, str | int | float | bool | type(None)) and k != "command"
    }
    options["metric"] = task.metric
    options["sparse_config"] = {
        run["method"]: (c.to_dict() if (c := sparse_config(run["method"], args)) else None)
        for run in runs
    }
    world = process_world_size()
    env = environment(torch.device(args.device), world)
    if world > 1:
        env["timing"] = DISTRIBUTED_TIMING
    return {"task": task.name, "config": options, "runs": runs, "environment": env}


def write_json(path: str | os.PathLike[str], document: dict[str, Any]) -> None:
    """Write ``document`` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


def _method_checkpoint(path: str | None, method: str) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{method}{p.suffix or '.pt'}"))


def task_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options a task is built with: ``args`` in a single process; with W processes a copy
    whose ``batch_size`` is the global batch, W x ``--batch-size`` (each process keeps its part),
    and ``quiet`` on every rank but 0."""
    world = process_world_size()
    if world == 1:
        return args
    args = copy.copy(args)
    args.batch_size *= world
    args.quiet = args.quiet or process_rank() != 0
    return args


def train(task_cls: type[Task], args: argparse.Namespace) -> dict[str, Any]:
    """``msbp train``: one method (``args.method``); returns (and writes to ``--out``) results.
    Under ``torchrun`` every process calls it; rank 0 writes."""
    setup_runtime(args)
    task_cls.check_args(args)
    check_paths(args, [args.checkpoint] if args.checkpoint else [])
    with process_group(args), denormals(args.denormals):
        task = task_cls(task_args(args))
        run = train_run(task, args.method, args)
        results = make_results(task, args, [run])
        if args.out and process_rank() == 0:
            write_json(args.out, results)
    return results


def compare(task_cls: type[Task], args: argparse.Namespace) -> dict[str, Any]:
    """``msbp compare``: dense, sbp and msbp one after the other on one data order and seed.

    One checkpoint per method (``ckpt.pt`` -> ``ckpt.dense.pt``, ...); the results JSON is
    rewritten after each method, so an interrupted comparison keeps what it finished.
    """
    setup_runtime(args)
    task_cls.check_args(args)
    methods = getattr(args, "methods", None) or list(METHODS)
    checkpoints = [_method_checkpoint(args.checkpoint, m) for m in methods]
    check_paths(args, [c for c in checkpoints if c is not None])
    with process_group(args), denormals(args.denormals):
        main = process_rank() == 0
        task = task_cls(task_args(args))
        if args.resume:  # a damaged or mismatched checkpoint of a later method: say so now
            for method, path in zip(methods, checkpoints, strict=True):
                if path is not None and Path(path).exists():
                    load_checkpoint(path, method, args, task, args.device)
        runs = []
        results: dict[str, Any] = {}
        for method, checkpoint in zip(methods, checkpoints, strict=True):
            run_args = copy.copy(args)
            run_args.checkpoint = checkpoint
            runs.append(train_run(task, method, run_args))
            results = make_results(task, args, runs)
            if args.out and main:
                write_json(args.out, results)
        if getattr(args, "plots", None) and main:
            from msbp.plots import write_plots

            write_plots(results, args.plots)
    return results


def _fmt_seconds(value: float, dense: float | None) -> str:
    if dense is None or value <= 0:
        return f"{value:.1f}"
    return f"{value:.1f} ({dense / value:.2f}x)"


def format_table(results: dict[str, Any]) -> str:
    """The paper's table as markdown: backprop s, total s, test metric at the best-dev epoch.

    Speedups and metric differences are relative to the dense run when there is one:
    ``6.6 (10.18x)``, ``98.23 (+0.37)``.
    """
    metric = results["config"].get("metric", "accuracy")
    dense = next((r for r in results["runs"] if r["method"] == "dense"), None)
    lines = [
        f"| {results['task']} | backprop time (s) | total time (s) | test {metric} (%) | "
        "best epoch |",
        "|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        base = dense if dense is not None and run is not dense else None
        bp = _fmt_seconds(run["backprop_seconds"], dense and dense["backprop_seconds"])
        tot = _fmt_seconds(run["total_seconds"], dense and dense["total_seconds"])
        acc = run["test_accuracy"]
        acc_text = "n/a" if acc is None else f"{acc:.2f}"
        if acc is not None and base is not None and base["test_accuracy"] is not None:
            acc_text += f" ({acc - base['test_accuracy']:+.2f})"
        lines.append(
            f"| {METHOD_LABELS.get(run['method'], run['method'])} | {bp} | {tot} | {acc_text} | "
            f"{run['best_epoch']} |"
        )
    return "\n".join(lines)
