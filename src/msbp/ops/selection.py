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


def select_topk_unified(u: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k columns of ``u`` (n, out) with the largest column sum of ``|u|``, and those sums:
    (k,), (k,)."""
    top = torch.topk(column_scores(u), k, sorted=False)
    return top.indices, top.values


def select_topk_per_example(u: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For every row of ``u`` (n, out) the k entries of largest ``|u|``, and their ``|u|``:
    (n, k), (n, k)."""
    top = torch.topk(u.abs(), k, dim=1, sorted=False)
    return top.indices, top.values


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
