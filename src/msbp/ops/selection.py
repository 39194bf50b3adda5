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


def zeros_ranked_by_index_(scores: Tensor) -> Tensor:
    """``scores`` (..., out), each >= 0 or NaN, float32 or wider, with every exact zero replaced
    in place by -1 - its index along the last dimension: ``torch.topk`` of the result takes zero
    scores lowest index first, the rule of the native kernels and of the reference
    (``reference.topk_ref``); its order among equal non-zero scores stays unspecified. Zero is
    the tie that matters in practice: ReLU and padding make exact zeros common, top-k fills up
    with them where fewer than k scores are non-zero, and which ones it takes decides the rows a
    backward logs for ``LazyRowAdam`` (which on the CPU steps every row of zero gradient that a
    backward logged where it logged every row, as a dense step; elsewhere it steps them always:
    so the selections apply this on the CPU only, sparing a GPU its extra kernels). Exact while
    out <= 2**24; ``clamp_min(0)`` of a taken value gives its score back."""
    rank = torch.arange(-1, -scores.shape[-1] - 1, -1, dtype=scores.dtype, device=scores.device)
    # + (1 - sign) * rank: + an exact 0 where positive, rank where zero, NaN stays NaN (a
    # comparison and torch.where cost ten times as much on the CPU: 32 x 2000, 37 against 420 us)
    return scores.addcmul_(scores.sign().neg_().add_(1), rank)


def topk_zeros_by_index(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(scores, k, sorted=False)`` over the last dimension as (indices, values), zero
    scores taken lowest index first on the CPU (``zeros_ranked_by_index_``, which changes
    ``scores``: pass a tensor of your own). ``scores`` (..., out), each >= 0 or NaN."""
    if not scores.is_cpu:
        top = torch.topk(scores, k, sorted=False)
        return top.indices, top.values
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()  # ranks need float32's integers
    top = torch.topk(zeros_ranked_by_index_(scores), k, sorted=False)
    return top.indices, top.values.clamp_min(0)


def select_topk_unified(u: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k columns of ``u`` (n, out) with the largest column sum of ``|u|``, and those sums:
    (k,), (k,). On the CPU columns of zero sum are taken lowest index first."""
    return topk_zeros_by_index(column_scores(u), k)


def select_topk_per_example(u: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For every row of ``u`` (n, out) the k entries of largest ``|u|``, and their ``|u|``:
    (n, k), (n, k). On the CPU zero entries are taken lowest index first."""
    return topk_zeros_by_index(u.abs(), k)


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
