"""Consensus selection: under ``torch.distributed`` every rank propagates the same k units.

With ``SparseBackpropConfig(consensus=True)`` and an initialised process group of W > 1
processes, the backward of a sparse linear transform runs here instead of in
``sparse_linear_backward``:

    U   = G + M / n_active (unit) or G + M (slot)  # as in the ordinary backward (active rows)
    buf = [non-finite?, active rows, colsum |U|, colsum U]  # one all-reduce (SUM), 2 + 2 out
    S   = top-k of the summed colsum |U|           # the same on every rank
    dx  = U_S W_S,  dW = U_S^T x (k rows)           # local, as always
    M   = alpha * (summed colsum U, S zeroed) / W   # unit: shared, the same on every rank

Why the memory is shared for ``unit``: DDP averages gradients over the W ranks and each rank's
loss is a mean over its n local rows, so rank r's output gradient rows are W times the rows that
one process would see on the concatenated batch of W n rows (loss a mean over W n rows). One
process adds ``M / (W n)`` to each row; rank r must add W times that, ``M / n``, with the *same*
M: the single process's memory, which is the mean over ranks of each rank's residual column sums
(colsum of rank r's residual is W times its share). With a per-rank memory the add-back would
differ from rank to rank and from one process. ``slot`` memory needs no sharing: rank r's rows of
the residual are exactly W times one process's rows for the same examples, so each rank keeps its
own rows (only where the batch shape changes does the spreading of a slot memory differ: each rank
spreads its own column sums over its own rows).

``random`` selection: every rank draws from its own generator (so generator streams stay in
step with a single process) and rank 0's draw is used, sent in the same all-reduce as a 0/1 mask.

The kept rows of each weight are recorded for ``msbp.distributed.row_sparse_allreduce_hook``,
which all-reduces only those rows. Every rank must run the same sparse transforms in the same
order (each backward is a collective).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from msbp.ops.memory import active_rows, add_memory_, store_memory_
from msbp.ops.touched_rows import WEIGHT_TIED, row_block_of

#: attribute on a weight: the list of row tensors (or None: every row) its consensus backwards
#: kept since the communication hook last took them
ROWS = "_msbp_consensus_rows"
#: attribute on a weight stored transposed, (in, out) (transformers' ``Conv1D``): the kept
#: units are its columns, and the hook exchanges those (set by ``record_rows``)
COLUMNS = "_msbp_consensus_columns"
#: attribute on a weight: set (True) by ``msbp.distributed`` when a hook will take the rows;
#: without it nothing is recorded (a list nobody takes would grow for ever)
WANTED = "_msbp_consensus_wanted"

_FOLD_AT = 64
_group: list = [None]  # the process group consensus runs over; None: the world


def set_group(group) -> None:
    """Run the consensus all-reduces over ``group`` (None: the default group)."""
    _group[0] = group


def get_group():
    """The process group consensus runs over (None: the default group)."""
    return _group[0]


def active() -> bool:
    """Whether consensus has anything to agree on: an initialised group of more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(_group[0]) > 1


def refuse(enabled: bool, what: str) -> None:
    """Raise ``ValueError`` for a transform that cannot agree on its units (``what`` names it)
    when consensus is asked for and active; without a process group consensus is a no-op."""
    if enabled and active():
        raise ValueError(
            f"consensus=True is supported by SparseLinear (and layers built on it, such as "
            f"SparseMultiheadAttention and SparseLSTM's input transform), not by {what}: its "
            "ranks would select on their own; give it a config with consensus=False"
        )


def record_rows(weight: Tensor, rows: Tensor | None) -> None:
    """Note that a backward kept ``rows`` (k,) of ``weight``'s gradient (None: all rows), for the
    communication hook; a no-op unless a hook asked for it (``WANTED``).

    A weight that is a block of rows of a Parameter (attention's q, k and v slices of
    ``in_proj_weight``) records its rows in that Parameter, shifted to the block. A weight tied
    to a module that is not a sparse layer (``weight_tied``: a tied embedding) records every
    row: the other module's gradient rows differ from rank to rank and are in no log.
    A weight that is the transpose of a Parameter (``SparseHFConv1D``'s) records its rows as
    that Parameter's columns (``COLUMNS``)."""
    block = row_block_of(weight)
    param, offset = (weight, 0) if block is None else block
    if block is None and _is_transpose_of_leaf(weight):
        param = weight._base
        if param.__dict__.get(WANTED):
            param.__dict__[COLUMNS] = True
    if not param.__dict__.get(WANTED):
        return
    if rows is not None and param.__dict__.get(WEIGHT_TIED):
        rows = None
    elif rows is not None and offset:
        rows = rows + offset
    log = param.__dict__.setdefault(ROWS, [])
    log.append(rows)
    if len(log) >= _FOLD_AT:  # many backwards between two exchanges (no_sync): keep it bounded
        log[:] = [None if any(r is None for r in log) else torch.unique(torch.cat(log))]


def _is_transpose_of_leaf(weight: Tensor) -> bool:
    base = weight._base
    return (
        base is not None and base.is_leaf and base.requires_grad and base.dim() == 2
        and weight.dim() == 2 and weight.shape == base.shape[::-1]
        and weight.stride() == base.stride()[::-1]
        and weight.storage_offset() == base.storage_offset()
    )


def take_rows(weight: Tensor) -> Tensor | None:
    """Remove and return the rows kept since the last take, distinct and ascending, or None when
    the whole gradient must be exchanged (nothing recorded, or some backward kept every row)."""
    log = weight.__dict__.pop(ROWS, None)
    if not log or any(r is None for r in log):
        return None
    if len(log) == 1:
        return log[0]
    return torch.unique(torch.cat(log))


def backward(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    memory: Tensor | None,
    random_cols: Tensor | None,
    scale: Tensor | None,
    k: int,
    alpha: float,
    slot: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    skip_nonfinite: bool,
    probe: Callable[[Tensor, Tensor, Tensor], None] | None = None,
    all_rows: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, bool]:
    """The consensus backward of ``y = x W^T + b`` (a collective over ``get_group()``).

    g: (n, out); x: (n, in); weight: (out, in); memory: (out,) or, ``slot``, (n, out), updated in
    place (None: no memory); random_cols: (k,) this rank's random draw, or None for unified
    top-k; scale: a GradScaler's scale or None. Returns ``(dx (n, in), dW (out, in) dense, db
    (out,), rows, skipped)``: rows (k,) ascending, the rows of dW that may be non-zero, the same
    on every rank, or None when every row may be (k = out, or a non-finite gradient on any rank
    went through densely: then skipped is True and the memory was not touched). Raises
    ``RuntimeError`` marked ``msbp-nonfinite`` on every rank when one has a non-finite gradient
    and ``skip_nonfinite`` is off.
    """
    from msbp.ops.sparse_linear import NONFINITE_MARK  # sparse_linear imports this module

    group = _group[0]
    world = dist.get_world_size(group)
    n, out = g.shape
    use_memory = memory is not None and alpha > 0
    acc = memory.dtype if use_memory else torch.promote_types(g.dtype, torch.float32)
    unit_memory = use_memory and not slot
    u = g.to(acc, copy=True)  # (n, out)
    # padding-safe (memory_rows="active"): this rank's zero rows take no memory; the add-back
    # divides by this rank's active rows (equal to one process's when the ranks are balanced)
    active = active_rows(g) if use_memory and not all_rows else None
    if use_memory:
        add_memory_(u, memory if scale is None else memory * scale, "slot" if slot else "unit",
                    active)
    buf = torch.empty(2 + out * (2 if unit_memory else 1), dtype=acc, device=g.device)
    buf[0] = (~torch.isfinite(u)).any()
    buf[1] = n if active is None else active.sum()  # active rows, summed over the ranks
    picks = buf[2 : 2 + out]
    if random_cols is None:
        torch.sum(u.abs(), 0, dtype=acc, out=picks)  # column scores
    else:  # rank 0's columns win: a 0/1 mask that only rank 0 fills
        picks.zero_()
        if dist.get_rank(group) == 0:
            picks.index_fill_(0, random_cols, 1)
    if unit_memory:
        torch.sum(u, 0, dtype=acc, out=buf[2 + out :])
    dist.all_reduce(buf, group=group)
    db = g.sum(0, dtype=acc) if need_b else None

    if bool(buf[0] != 0):  # the same answer on every rank: no rank waits for another
        if not skip_nonfinite:
            raise RuntimeError(f"{NONFINITE_MARK}: non-finite output gradient (on some rank)")
        gc = g.to(x.dtype)
        dx = gc @ weight if need_x else None
        dW = gc.t() @ x if need_w else None
        return dx, dW, db, None, True

    if k >= out:  # every unit kept: nothing to choose (the all-reduce agreed on finiteness)
        idx = torch.arange(out, device=g.device)
    else:
        idx = torch.topk(picks, k, sorted=False).indices.sort().values  # (k,), same everywhere
    u_sel = u.index_select(1, idx)  # (n, k)
    if probe is not None:
        probe(g, x, torch.zeros_like(u).index_copy_(1, idx, u_sel))
    u_k = u_sel if u_sel.dtype == x.dtype else u_sel.to(x.dtype)
    dx = u_k @ weight.index_select(0, idx) if need_x else None
    dW = None
    if need_w:
        dW = torch.zeros_like(weight).index_copy_(0, idx, (u_k.t() @ x).to(weight.dtype))
    if use_memory:
        factor = alpha / world if scale is None else alpha / world / scale.double()
        if unit_memory:  # the mean residual column sums: one process's memory, on every rank
            if bool(buf[1] != 0):  # no active row on any rank: the memory waits, unchanged
                torch.mul(buf[2 + out :], factor, out=memory)
                memory.index_fill_(0, idx, 0)
        else:
            store_memory_(memory, u.index_fill_(1, idx, 0), "slot", alpha, scale, active)
    return dx, dW, db, idx if k < out else None, False
