"""Triton GPU kernels, one module per op stem (``kernels/sparse_linear.py``): imported lazily by
the op's CUDA registration (``msbp.ops.sparse_linear_cuda``), never needed on the CPU.

Triton is an optional extra (``pip install msbp[gpu]``); importing this package does not import
it. The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before the kernel module is first imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import importlib

_available: bool | None = None


def available() -> bool:
    """Whether Triton can be imported here (cached)."""
    global _available
    if _available is None:
        try:
            importlib.import_module("triton")
            _available = True
        except Exception:  # ImportError, or a broken install: the PyTorch path then
            _available = False
    return _available
