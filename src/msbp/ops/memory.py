"""The memory of a sparse transform: adding it back to the output gradient and storing the rest.

``unit`` memory (out,) holds the batch-summed residual and is spread as ``M / n`` over the n rows;
``slot`` memory (n, out) holds it row for row. Kept in unscaled units: under a GradScaler of
scale s the gradient is ``s`` times too large, so ``M * s`` is added and ``residual / s`` stored.

Padding (``memory_rows="active"``, the default): only the *active* rows of the output gradient,
those with a non-zero (or non-finite) entry, take part. A unit memory is spread as
``M / n_active`` over them; a slot memory is added to and stored into their slots only, a zero
row's slot keeps what it held; a step without active rows leaves the memory unchanged. An
all-zero row (padding, a masked token, an ignored label) thus gets nothing and changes nothing.
``active`` masks below are (n,) bool, or None for "every row is active" (then nothing is masked).
"""

from __future__ import annotations

import torch
from torch import Tensor


def active_rows(g: Tensor) -> Tensor | None:
    """The rows of ``g`` (n, out) with an entry that is not zero (NaN and inf count): (n,) bool,
    or None when every row is active (the common case: no mask to apply)."""
    active = g.ne(0).any(1)
    return None if bool(active.all()) else active


def add_memory_(u: Tensor, memory: Tensor, layout: str, active: Tensor | None = None) -> Tensor:
    """``u`` (n, out) += the memory spread over its (active) rows; see
    ``reference.memory_to_rows_ref``."""
    n = u.shape[0]
    if active is None:
        if layout == "slot" and memory.shape[0] == n:
            return u.add_(memory)
        total = memory if layout == "unit" else memory.sum(0)  # (out,)
        return u.add_(total / n)
    n_active = int(active.sum())
    if n_active == 0:
        return u
    mask = active.unsqueeze(1)
    if layout == "slot" and memory.shape[0] == n:
        return u.add_(torch.where(mask, memory, 0))
    total = memory if layout == "unit" else memory.sum(0)  # (out,)
    return u.add_(torch.where(mask, total / n_active, 0))


def store_memory_(
    memory: Tensor,
    residual: Tensor,
    layout: str,
    alpha: float,
    scale: Tensor | None = None,
    active: Tensor | None = None,
) -> None:
    """memory <- alpha * residual (n, out) / scale, batch-summed for ``unit``; in place (slot:
    resized to the residual's rows). With ``active``: unchanged when no row is active; a slot
    memory's inactive rows keep their values (the memory must then already be (n, out))."""
    factor = alpha if scale is None else alpha / scale.double()
    if active is not None:
        if not bool(active.any()):
            return
        if layout == "slot":
            value = torch.mul(residual, factor).to(memory.dtype)
            memory.copy_(torch.where(active.unsqueeze(1), value, memory))
            return
    if layout == "unit":
        value = residual.sum(0)
    else:
        memory.resize_(residual.shape)
        value = residual
    torch.mul(value, factor, out=memory)


def spread_slot_memory_(memory: Tensor, rows: int) -> Tensor | None:
    """Give a slot memory (r, out) ``rows`` rows for a new batch shape, its column sums spread
    evenly, in place. Returns the memory as it was (for ``restore_memory_``, should the backward
    not take place: a non-finite gradient leaves the memory untouched), or None if it already
    had ``rows`` rows."""
    if memory.shape[0] == rows:
        return None
    with torch.no_grad():
        before = memory.clone()
        total = memory.sum(0) / rows
        memory.resize_(rows, memory.shape[1]).copy_(total.expand(rows, memory.shape[1]))
    return before


def restore_memory_(memory: Tensor, before: Tensor | None) -> None:
    """Put back the memory ``spread_slot_memory_`` changed (no-op for None)."""
    if before is not None:
        with torch.no_grad():
            memory.resize_(before.shape).copy_(before)
