"""Selection operators: which output units of the gradient are propagated.

Each takes ``u`` (n, out), the output gradient plus memory, and returns indices: ``(k,)`` column
indices for the operators that keep the same units for the whole batch, ``(n, k)`` for per-example
selection; the top-k operators also return the scores of what they kept. Indices come back
unsorted.
"""

from __future__ import annotations

import torch
from torch import Tensor


def column_scores(u: Tensor) -> Tensor:
    """Column sums of ``|u|`` (n, out) -> (out,), in float32 or wider."""
    acc = torch.promote_types(u.dtype, torch.float32)
    if u.device.type == "cuda":  # one fused pass, no temporary (3x faster there)
        return torch.linalg.vector_norm(u, 1, dim=0, dtype=acc)
    # on the CPU vector_norm over dim 0 is a slow strided reduction (60 us against 6 us at 10x500)
    return u.abs().sum(0, dtype=acc)


def topk_by_index(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(scores, k, sorted=False)`` over the last dimension as (indices, values), ties
    taken lowest index first on the CPU, as the native kernels and the reference
    (``reference.topk_ref``) take them, whatever ``torch.topk``'s own order among ties
    (unspecified): ReLU and padding make zeros common (top-k fills up with them where fewer than
    k scores are non-zero, and which ones decides the rows a backward logs for ``LazyRowAdam``),
    bfloat16 equal values. Elsewhere in ``torch.topk``'s order, sparing a GPU the extra kernels.
    ``scores`` (..., out), each >= 0 or NaN (NaN ranks above every number, as in topk)."""
    out = scores.shape[-1]
    if not scores.is_cpu or k >= out or k == 0:
        top = torch.topk(scores, k, sorted=False)
        return top.indices, top.values
    # only where a tie straddles the k-th place can another set be taken: those rows are ranked
    # again (at 1024 x 4096, k = 164, ranking every row would cost more than the topk)
    top = torch.topk(scores, k + 1, sorted=True)
    idx, vals = top.indices[..., :k].contiguous(), top.values[..., :k].contiguous()
    straddles = top.values[..., k - 1] == top.values[..., k]  # (...)
    if not bool(straddles.any()):
        return idx, vals
    flat, flat_idx = scores.reshape(-1, out), idx.reshape(-1, k).clone()
    rows = straddles.reshape(-1).nonzero().squeeze(1)
    sub = flat[rows]  # (r, out)
    if sub.dtype == torch.float64 or out >= 2**31:
        # no room for an index beside 63 bits: a stable sort (ties are rare in float64)
        flat_idx[rows] = torch.sort(sub, dim=1, descending=True, stable=True).indices[:, :k]
    else:
        # keys (|score| bits, 2**31 - 1 - index): as integers, the bits of a float >= 0 order as
        # the floats do (a NaN above inf, whatever its sign), so the keys order as (score desc,
        # index asc), exactly (`sub` is a copy: the scores are not touched)
        bits = sub.float().view(torch.int32).bitwise_and_(0x7FFFFFFF).to(torch.int64)
        low = torch.arange(2**31 - 1, 2**31 - 1 - out, -1, device=sub.device)
        keys = bits.bitwise_left_shift_(31).add_(low)
        flat_idx[rows] = torch.topk(keys, k, sorted=False).indices
    idx = flat_idx.view(idx.shape)
    return idx, scores.gather(-1, idx)


def select_topk_unified(u: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k columns of ``u`` (n, out) with the largest column sum of ``|u|``, and those sums:
    (k,), (k,). On the CPU equal sums are taken lowest index first."""
    return topk_by_index(column_scores(u), k)


def select_topk_per_example(u: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For every row of ``u`` (n, out) the k entries of largest ``|u|``, and their ``|u|``:
    (n, k), (n, k). On the CPU equal entries are taken lowest index first."""
    return topk_by_index(u.abs(), k)


def select_random(u: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k random columns of ``u`` (n, out), the same for all rows: (k,)."""
    return torch.randperm(u.shape[1], generator=generator, device=u.device)[:k]


UNIFIED_SELECTIONS = frozenset({"unified", "random"})


def select(
    u: Tensor, k: int, selection: str, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Dispatch on the selection name: ``(indices, witness)``.

    indices: (k,) columns, or (n, k) for ``per_example``. witness: a tensor that is all finite
    exactly when ``u`` is: the selected scores for top-k (a NaN or inf always wins a slot), ``u``
    itself for random selection. Checking it costs k numbers instead of n x out.
    """
    if selection == "unified":
        return select_topk_unified(u, k)
    if selection == "per_example":
        return select_topk_per_example(u, k)
    if selection == "random":
        return select_random(u, k, generator), u
    raise ValueError(f"unknown selection {selection!r}")
