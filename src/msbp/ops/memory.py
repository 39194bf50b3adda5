"""The memory of a sparse transform: adding it back to the output gradient and storing the rest.

``unit`` memory (out,) holds the batch-summed residual and is spread as ``M / n`` over the n rows;
``slot`` memory (n, out) holds it row for row. Kept in unscaled units: under a GradScaler of
scale s the gradient is ``s`` times too large, so ``M * s`` is added and ``residual / s`` stored.
"""

from __future__ import annotations

import torch
from torch import Tensor


def add_memory_(u: Tensor, memory: Tensor, layout: str) -> Tensor:
    """``u`` (n, out) += the memory spread over its rows; see ``reference.memory_to_rows_ref``."""
    n = u.shape[0]
    if layout == "slot" and memory.shape[0] == n:
        return u.add_(memory)
    total = memory if layout == "unit" else memory.sum(0)  # (out,)
    return u.add_(total / n)


def store_memory_(
    memory: Tensor, residual: Tensor, layout: str, alpha: float, scale: Tensor | None = None
) -> None:
    """memory <- alpha * residual (n, out) / scale, batch-summed for ``unit``; in place (slot:
    resized to the residual's rows)."""
    if layout == "unit":
        value = residual.sum(0)
    else:
        memory.resize_(residual.shape)
        value = residual
    torch.mul(value, alpha if scale is None else alpha / scale.double(), out=memory)
