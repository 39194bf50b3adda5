"""The native CPU kernels (``msbp/csrc/*.cpp``): built once at first use into a cache, or absent.

Why at first use and not at install time: a compiled wheel or an install-time build must match the
user's exact torch build, and building at install time needs torch inside pip's isolated build
environment, where an unpinned ``torch`` pulls a multi-GB CUDA build. Building at first use
against the torch that is actually imported (``torch.utils.cpp_extension.load`` with ninja, as
many PyTorch projects do) costs the first process about a minute on two cores; later processes
load the cached library in milliseconds. Where no compiler exists, or the build fails, msbp warns
once and runs the pure-PyTorch path, which is also the oracle the native path is tested against.

Backend selection, by the environment variable ``MSBP_BACKEND`` (read at first use, or set with
``set_backend``):

- ``auto`` (default): native if it builds, else the PyTorch path with one warning;
- ``native``: native or an error saying why not;
- ``python``: never build or load; the pure-PyTorch path everywhere.

The ops are registered under ``torch.ops.msbp`` by the C++ sources (``TORCH_LIBRARY_FRAGMENT``);
each op's Python slice (``msbp.ops.<stem>``) declares its schema's fake implementation and calls
``use_native()`` to decide. The library is also a Python module (``csrc/bindings.cpp``) with
direct bindings of the eager entry points called at every step: see ``eager_ops``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

BACKEND_ENV = "MSBP_BACKEND"
CACHE_ENV = "MSBP_CACHE_DIR"
BACKENDS = ("auto", "native", "python")
CSRC = Path(__file__).parent / "csrc"

_lock = threading.Lock()
_state: dict[str, Any] = {
    "backend": None, "loaded": None, "error": None, "path": None, "module": None
}
_on_load: list[Callable[[], None]] = []
_device_ops: dict[tuple[str, str], Callable[[], bool]] = {}


class NativeUnavailableError(RuntimeError):
    """``MSBP_BACKEND=native`` was asked for, but the native kernels could not be built."""


class BackendNameError(ValueError):
    """``MSBP_BACKEND`` names no backend (``auto``, ``native``, ``python``)."""


def _requested() -> str:
    if _state["backend"] is None:
        want = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if want not in BACKENDS:
            raise BackendNameError(f"{BACKEND_ENV}={want!r}: expected one of {BACKENDS}")
        _state["backend"] = want
    return _state["backend"]


def set_backend(name: str) -> None:
    """Force the backend for this process: ``"auto"``, ``"native"`` or ``"python"``.

    ``"native"`` builds (or loads) the kernels now and raises ``NativeUnavailableError`` if that
    fails.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state["backend"] = name
    if name == "native":
        _ensure_loaded(strict=True)


def cpu_flags() -> list[str]:
    """Compiler flags for this CPU, from the vector ISA PyTorch's own kernels run here
    (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2`` lowers it):
    AVX2/FMA, plus AVX-512 (F, DQ, BW, VL) where PyTorch runs AVX-512, else the architecture's
    baseline. Never ``-march=native``: the flags name an ISA level, and the build's cache key
    holds them, so a machine of another level sharing the cache builds its own."""
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":
        # the dense GEMMs (MKL) run AVX-512 here: msbp's loops at half their width had made the
        # sparse backward of a 10 x 784 x 500 layer ~1.2x slower than it is with 64-byte vectors
        flags += ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]
    return flags


def sources() -> list[Path]:
    """The C++ sources of the extension, one file per op stem."""
    return sorted(CSRC.glob("*.cpp"))


def _build_key(srcs: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    # the checkout's path too: ninja's build file names the sources by path, so two checkouts
    # with equal sources sharing one build folder would rebuild each other's build every time
    for part in (torch.__version__, sys.version, " ".join(flags), str(CSRC.resolve())):
        h.update(part.encode())
    for src in sorted(list(srcs) + sorted(CSRC.glob("*.h"))):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where builds are kept: ``$MSBP_CACHE_DIR`` or ``~/.cache/msbp/native``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msbp", "native"
    )
    return Path(root)


def _build() -> tuple[str, Any]:
    from torch.utils import cpp_extension

    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no C++ sources in {CSRC}")
    flags = cpu_flags()
    key = _build_key(srcs, flags)
    name = f"msbp_native_{key}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(build_dir):
        module = cpp_extension.load(
            name=name,
            sources=[str(s) for s in srcs],
            extra_cflags=flags + [f"-I{CSRC}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=True,
            verbose=os.environ.get("MSBP_BUILD_VERBOSE", "") not in ("", "0"),
        )
    return str(build_dir), module


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold ``build_dir`` for one build or load at a time, by an OS lock that ends with the
    process holding it. torch's own lock is a file (``lock``) it deletes when done: a build
    killed by a signal (``kill``, a CI timeout, a container stopped) leaves it behind, and every
    later process waited for it forever. Under this lock such a file is stale, and goes.
    Where there is no ``fcntl`` (Windows) torch's lock alone serves."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(build_dir / "msbp.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_loaded(strict: bool) -> bool:
    if _state["loaded"] is None:
        with _lock:
            if _state["loaded"] is None:
                try:
                    _state["path"], _state["module"] = _build()
                    _state["loaded"] = True
                    for fn in _on_load:
                        fn()
                except Exception as exc:  # a missing compiler, a failed build: fall back
                    _state["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
                    _state["loaded"] = False
                    if not strict:
                        warnings.warn(
                            "msbp: the native kernels could not be built, using the PyTorch "
                            f"path (set {BACKEND_ENV}=python to silence this): "
                            f"{_state['error'][:500]}",
                            RuntimeWarning,
                            stacklevel=3,
                        )
    if strict and not _state["loaded"]:
        raise NativeUnavailableError(
            f"{BACKEND_ENV}=native, but the native kernels are unavailable: {_state['error']}"
        )
    return bool(_state["loaded"])


def eager_ops() -> Any:
    """Where eager code finds the native entry points that have direct bindings
    (``csrc/bindings.h``: ``sparse_linear_fast``, ``sparse_embedding_linear_fast``,
    ``place_grad_rows_``, ``lazy_row_adam_step_``, ``zero_masked_rows_``): the library's Python
    module, which calls the ops' C++ functions without the dispatcher's boxing (3 us a call of
    the sparse layer at MNIST's size, 15 us an optimizer step), or ``torch.ops.msbp`` while a
    ``TorchDispatchMode`` is active, so that it sees the ops it would see through the
    dispatcher. Only once the kernels are loaded. The module also has
    ``lstm_recurrence_backward_eager`` (it may overwrite an input) and
    ``lstm_recurrence_forward``, which are no ops: callers use them only when this returns the
    module."""
    module = _state["module"]
    if module is None or torch._C._len_torch_dispatch_stack():
        return torch.ops.msbp
    return module


def eager_module() -> Any:
    """The library's Python module of the loaded kernels (``csrc/bindings.cpp``), for entry
    points that read Python objects themselves (``sparse_linear_try``). Only once
    ``use_native()`` said so."""
    return _state["module"]


def register_flop_formula(op: str, formula: Callable[..., int]) -> None:
    """Give ``torch.ops.msbp.<op>`` a formula for ``torch.utils.flop_counter`` (called with its
    inputs' shapes, as the formulas of aten ops are), once; nothing on a torch without one."""
    try:
        from torch.utils.flop_counter import flop_registry
        from torch.utils.flop_counter import register_flop_formula as register
    except ImportError:
        return
    packet = getattr(torch.ops.msbp, op)
    if packet not in flop_registry:
        register(packet)(formula)


def on_load(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the kernels are loaded (now, if they are): for Python registrations that
    need the ops to exist, such as their fake implementations."""
    if _state["loaded"]:
        fn()
    else:
        _on_load.append(fn)


def register_device_op(device_type: str, op: str, ready: Callable[[], bool]) -> None:
    """Declare a kernel of the op ``msbp::<op>`` for a device other than the CPU (``"cuda"``: the
    Triton kernels); ``ready()`` says whether it can run now (and may define the op's schema
    itself where the C++ library is unavailable)."""
    _device_ops[(device_type, op)] = ready


def try_load() -> bool:
    """Build or load the C++ library unless the backend is ``"python"``; whether it is loaded
    (``MSBP_BACKEND=native`` raises ``NativeUnavailableError`` instead of saying no)."""
    want = _requested()
    return want != "python" and _ensure_loaded(strict=want == "native")


def prepare() -> None:
    """Build or load the kernels now if the backend wants them (layers call this when they are
    built, so that no build starts inside a traced or compiled region)."""
    if _requested() != "python":
        _ensure_loaded(strict=_requested() == "native")


def use_native(device: torch.device | None = None, op: str | None = None) -> bool:
    """Whether ops on ``device`` should run the native kernels: the C++ ones on the CPU; on other
    devices only an ``op`` with a registered device kernel (``register_device_op``)."""
    if _state["loaded"] and device is None and _state["backend"] != "python":
        return True  # the common case, asked at every call of a sparse layer: no more to check
    if device is not None and device.type != "cpu":
        ready = _device_ops.get((device.type, op)) if op is not None else None
        return ready is not None and _requested() != "python" and ready()
    want = _requested()
    if want == "python":
        return False
    return _ensure_loaded(strict=want == "native")


def status() -> dict[str, Any]:
    """For ``msbp info``: the backend asked for, the one active, and why not native if not."""
    want = _requested()
    active = "python"
    if want != "python":
        try:
            active = "native" if _ensure_loaded(strict=False) else "python"
        except Exception:  # status must never fail
            active = "python"
    return {
        "requested": want,
        "active": active,
        "build_dir": _state["path"],
        "error": _state["error"],
        "cflags": cpu_flags(),
        "sources": [s.name for s in sources()],
        "device_ops": sorted(f"{dev}:{op}" for dev, op in _device_ops),
    }
