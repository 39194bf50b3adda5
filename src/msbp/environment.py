"""What a result was measured on, and which fast paths this installation has."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: ``denormals``' modes (and ``msbp train --denormals``)
DENORMAL_MODES = ("flush", "keep")


def flushing_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (``torch.set_flush_denormal``)."""
    return torch.tensor([1e-39]).mul_(1.0).item() == 0.0


@contextlib.contextmanager
def denormals(mode: str) -> Iterator[None]:
    """Flush denormal floats to zero (``"flush"``) or keep them (``"keep"``) inside the block;
    the calling thread's setting before it comes back after, on every intra-op thread (with
    the native kernels; without them only the calling thread's changes, and intra-op threads
    started before keep theirs).

    On an Intel Xeon a fused Adam step over a state of denormals took 42 ms against 1.7 ms
    flushed (2M parameters, 1 thread). Adam's moments pass through them wherever a gradient
    stays zero for a few hundred steps (MNIST's pixels near the border), which slows a dense
    run and not a run whose optimizer skips those rows: a comparison of the two must flush.
    """
    if mode not in DENORMAL_MODES:
        choices = " or ".join(map(repr, DENORMAL_MODES))
        raise ValueError(f"denormals mode {mode!r}: choose {choices}")
    before = flushing_denormals()
    workers = _worker_threads()
    torch.set_flush_denormal(mode == "flush")  # False (a no-op) where the CPU cannot
    if workers is not None:
        workers(mode == "flush")
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
        if workers is not None:  # the calling thread's setting, on every thread
            workers(before)


def _worker_threads():
    """The native kernels' ``flush_denormal_threads(on)``, which sets (and reports) the
    setting on every intra-op thread, not only the calling one as ``torch.set_flush_denormal``
    does; None without the kernels (``MSBP_BACKEND=python``, no compiler): then threads started
    before keep their setting."""
    from msbp import native

    if not native.try_load():
        return None
    # (a TorchDispatchMode makes eager_ops torch.ops.msbp, which has no such function)
    return getattr(native.eager_ops(), "flush_denormal_threads", None)


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(idle, total) jiffies of ``cpus`` from /proc/stat; None where it cannot be read."""
    idle = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                    continue
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq ...
                idle += ticks[3] + ticks[4]
                total += sum(ticks)
    except (OSError, ValueError, IndexError):
        return None
    return (idle, total) if total > 0 else None


def _own_cpus() -> set[int]:
    """The CPUs this process may run on (empty where the platform does not say)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def free_cores(window: float = 0.3) -> float | None:
    """How many of this process's cores other processes left idle over the next ``window``
    seconds (this process sleeps meanwhile); None where /proc/stat cannot be read."""
    cpus = _own_cpus()
    before = _cpu_times(cpus)
    time.sleep(window)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU limit of this process's cgroup in cores (a container's ``--cpus``): cgroup v2
    ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``; None where there is none."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def auto_threads(cap: int = 2, processes: int = 1, free: float | None = None) -> int:
    """Torch threads for a timed run: at most ``cap``, this process's share (of ``processes``
    started together) of the cores it may use (affinity, and a container's CPU limit), and no
    more than other processes leave free (OpenMP threads waiting for a core another job holds
    made a dense MNIST step ~40x slower). ``free``: ``free_cores()`` if already measured."""
    cores = len(_own_cpus()) or os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:  # threads beyond it are throttled like threads on a busy core
        cores = min(cores, max(1, int(quota)))
    share = cores // max(processes, 1)
    if free is None:
        free = free_cores()
    if free is not None:
        share = min(share, int(free + 0.5) // max(processes, 1))
    return max(1, min(cap, share))


def environment(device: torch.device | str = "cpu", world_size: int = 1) -> dict[str, Any]:
    """Versions, threads, CPU and device of this process, for the results JSON; ``world_size``:
    how many processes trained together (``torchrun``), 1 for a plain run."""
    import numpy

    from msbp import __version__

    device = torch.device(device)
    env: dict[str, Any] = {
        "msbp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        # the vector ISA PyTorch's kernels (and MKL's) run here, and msbp's kernels are built
        # for (native.cpu_flags): dense timings differ by up to 2x between AVX2 and AVX512
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "flush_denormal": flushing_denormals(),
        "device": str(device),
        "device_name": cpu_name(),
        "cuda": torch.version.cuda,
        "kernels": _kernels(),
        "world_size": world_size,
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _kernels() -> str:
    from msbp import native

    return native.status()["active"]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def info() -> dict[str, Any]:
    """``msbp info``: versions, threads, devices, and which fast paths are available."""
    from msbp import native
    from msbp.data.mnist import pureml_zarr_path
    from msbp.tasks import TASKS

    cuda = torch.cuda.is_available()
    mnist = pureml_zarr_path()
    return {
        "environment": environment("cuda" if cuda else "cpu"),
        "executable": sys.executable,
        "interop_threads": torch.get_num_interop_threads(),
        # what `--threads auto` would take now, and the cores other jobs left idle just now
        "threads_auto": auto_threads(free=(free := free_cores())),
        "free_cores": None if free is None else round(free, 1),
        "cpu_quota": cpu_quota(),
        "devices": ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda
        else ["cpu"],
        "fast_paths": {
            "cuda": cuda,
            "triton": _importable("triton"),
            "msbp.kernels": _importable("msbp.kernels"),
            "mkl": torch.backends.mkl.is_available(),
            "openmp": torch.backends.openmp.is_available(),
        },
        "kernels": native.status(),
        "tasks": sorted(TASKS),
        "mnist_data": str(mnist) if mnist else None,
        "matplotlib": _importable("matplotlib"),
    }
