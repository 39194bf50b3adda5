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


def ranking_keys(scores: Tensor) -> Tensor:
    """Keys (..., out), float64, whose ``torch.topk`` over the last dimension takes what the native
    kernels and the reference (``reference.topk_ref``) take from ``scores`` (..., out), each >= 0
    or NaN: equal scores lowest index first, whatever ``torch.topk``'s own order among ties
    (unspecified). Zeros (ReLU and padding make them common; top-k fills up with them where
    fewer than k scores are non-zero, and which ones decides the rows a backward logs for
    ``LazyRowAdam``) become -1 - their index, below every positive score. Other ties (common in
    bfloat16) are broken by scaling score i by 1 - i 2**-50, exact in float64, which keeps the
    order of distinct float32 (or narrower) scores: these are at least 2**-24 apart, relatively,
    and the scaling moves none by more than 2**-26 while out <= 2**24. Distinct float64 scores
    may be closer than that: there only zeros are ranked."""
    out = scores.shape[-1]
    index = torch.arange(out, dtype=torch.float64, device=scores.device)
    keys = scores.to(torch.float64, copy=True)
    if scores.dtype != torch.float64 and out <= 2**24:
        keys.mul_(index.mul(-(2.0**-50)).add_(1))
    # + (1 - sign) (-1 - index): + an exact 0 where positive, -1 - index where zero, NaN stays
    # NaN (a comparison and torch.where cost ten times as much on the CPU here)
    return keys.addcmul_(keys.sign().neg_().add_(1), index.add_(1).neg_())


def topk_by_index(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(scores, k, sorted=False)`` over the last dimension as (indices, values), ties
    taken lowest index first on the CPU (``ranking_keys``); elsewhere in ``torch.topk``'s own
    order, sparing a GPU the extra kernels. ``scores`` (..., out), each >= 0 or NaN."""
    out = scores.shape[-1]
    if not scores.is_cpu or k >= out or k == 0:
        top = torch.topk(scores, k, sorted=False)
        return top.indices, top.values
    # only where a tie straddles the k-th place can another set be taken: those rows are ranked
    # again by their keys (at 1024 x 4096, k = 164, keys for every row cost 2.3x the topk)
    top = torch.topk(scores, k + 1, sorted=True)
    idx, vals = top.indices[..., :k].contiguous(), top.values[..., :k].contiguous()
    straddles = top.values[..., k - 1] == top.values[..., k]  # (...)
    if not bool(straddles.any()):
        return idx, vals
    flat, flat_idx = scores.reshape(-1, out), idx.reshape(-1, k).clone()
    rows = straddles.reshape(-1).nonzero().squeeze(1)
    flat_idx[rows] = torch.topk(ranking_keys(flat[rows]), k, sorted=False).indices
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
