"""The CUDA kernel of ``msbp::sparse_linear_backward``: another registration of the same op.

The CUDA kernel runs the Triton kernels (``msbp.kernels.sparse_linear``, imported at its first
call) when Triton is importable, else the PyTorch twin. ``SparseLinearFunction`` sends CUDA
tensors through the op only when Triton is there (``native.use_native(device, OP)``), because the
two differ on a non-finite gradient: the twin raises or propagates densely (host reads), the
Triton path flags it on the device and keeps every shape.

The schema comes from the C++ library (``csrc/sparse_linear.cpp``) when it loads; where it cannot
be built, the first CUDA call defines the same schema here, with the twin as its CPU kernel, so
that the GPU path never needs a C++ compiler. Nothing here needs CUDA or Triton at import.
"""

from __future__ import annotations

import torch

from msbp import kernels, native
from msbp.ops import sparse_linear

OP = "sparse_linear_backward"
SCHEMA = (
    "sparse_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor(a!)? memory, "
    "Tensor? random_cols, Tensor? scale, int k, int selection, float alpha, bool slot, "
    "bool need_x, bool need_w, bool need_b, bool compact_dw, bool skip_nonfinite, "
    "float csr_ratio, bool all_rows=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_libraries: list[torch.library.Library] = []  # kept alive: a dropped Library unregisters
_state = {"cuda": False, "python_schema": False, "ready": False}


def cuda_kernel(*args) -> tuple:
    """The op on CUDA tensors: the Triton launcher, or the twin without Triton."""
    if kernels.available():
        from msbp.kernels.sparse_linear import sparse_linear_backward

        return tuple(sparse_linear_backward(*args))
    return tuple(sparse_linear.sparse_linear_backward_torch(*args))


def _cpu_twin(*args) -> tuple:
    return tuple(sparse_linear.sparse_linear_backward_torch(*args))


def register_cuda() -> None:
    """Register ``cuda_kernel`` for the CUDA dispatch key (once; the op must exist)."""
    if _state["cuda"]:
        return
    lib = torch.library.Library("msbp", "IMPL")
    lib.impl(OP, cuda_kernel, "CUDA")
    _libraries.append(lib)
    _state["cuda"] = True


def define_in_python() -> None:
    """The op without the C++ library: the schema, the twin on the CPU, the CUDA kernel and the
    fake. Only where the C++ library failed to load (both would define the same name)."""
    if _state["python_schema"]:
        return
    lib = torch.library.Library("msbp", "FRAGMENT")
    lib.define(SCHEMA)
    lib.impl(OP, _cpu_twin, "CPU")
    _libraries.append(lib)
    _state["python_schema"] = True
    register_cuda()
    sparse_linear._register_fake()


def cuda_ready() -> bool:
    """Whether CUDA calls of the sparse linear backward go through the op: Triton importable,
    and the op defined (by the C++ library, else here)."""
    if not _state["ready"]:
        if not kernels.available():
            return False
        if not native.try_load():  # no C++ library: the schema is defined here
            define_in_python()
        _state["ready"] = True
    return True


native.on_load(register_cuda)
native.register_device_op("cuda", OP, cuda_ready)
