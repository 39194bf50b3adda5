"""The autograd function of a sparse linear layer: exact forward, compacted MSBP backward.

Backward, per call (n rows, out units, k kept; see ``msbp.ops.reference`` for the oracle):

    U  = G + M              # the memory is added back (in float32 or wider)
    S  = select_k(U)        # unified / random: k columns; per-example: k entries per row
    dx = U_S W_S            # only the k selected rows of W are read
    dW = U_S^T x            # only k rows of dW are written
    M  = alpha * (U - U_S)  # what was not propagated, decayed
    db = colsum(G)          # dense, from the raw gradient (meProp)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from msbp.ops.selection import UNIFIED_SELECTIONS, select
from msbp.ops.touched_rows import log_touched_rows


@dataclass(frozen=True)
class BackwardPlan:
    """What one call's backward does; resolved from a config and the layer's shape."""

    k: int
    selection: str
    alpha: float
    layout: str
    on_nonfinite: str
    grad_inplace: bool
    generator: torch.Generator | None = None
    name: str = ""
    # probe(g (n, out), x (n, in), propagated (n, out)): called once per backward when set, for
    # measuring information loss; never set in normal training.
    probe: Callable[[Tensor, Tensor, Tensor], None] | None = None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _add_memory_(u: Tensor, memory: Tensor, layout: str) -> Tensor:
    """``u`` (n, out) += the memory spread over its rows; see ``reference.memory_to_rows_ref``."""
    n = u.shape[0]
    if layout == "slot" and memory.shape[0] == n:
        return u.add_(memory)
    total = memory if layout == "unit" else memory.sum(0)  # (out,)
    return u.add_(total, alpha=1.0 / n)


def _store_memory_(memory: Tensor, residual: Tensor, layout: str, alpha: float) -> None:
    """memory <- alpha * residual (n, out), batch-summed for ``unit``; in place (slot: resized)."""
    if layout == "unit":
        torch.mul(residual.sum(0), alpha, out=memory)
    else:
        memory.resize_(residual.shape)
        torch.mul(residual, alpha, out=memory)


def _inplace_grad_target(ctx, weight: Tensor, index: int) -> Tensor | None:
    """``weight.grad`` if the k rows of dW may be added into it directly, else None.

    Only when autograd itself would accumulate into that very buffer in this backward pass (a
    ``.backward()`` that reaches the weight's AccumulateGrad node, no hooks to run), so that
    ``torch.autograd.grad`` and hooks still see an ordinary dense gradient.
    """
    grad = weight.grad
    if grad is None or not weight.is_leaf or grad.layout != torch.strided:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None  # DDP's reducer hooks the accumulation, which must therefore happen
    if grad.dtype != weight.dtype or grad.shape != weight.shape:
        return None
    if weight._backward_hooks or getattr(weight, "_post_accumulate_grad_hooks", None):
        return None
    node = ctx.next_functions[index][0]  # the weight's AccumulateGrad node
    if node is None:
        return None
    try:
        will_accumulate = torch._C._will_engine_execute_node(node)
    except RuntimeError:  # torch.autograd.grad(): the gradient is captured, not accumulated
        return None
    return grad if will_accumulate else None


class SparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with the MSBP backward; the memory tensor is updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, memory, plan: BackwardPlan):
        cast = _autocast_dtype(x.device.type)
        xc, wc, bc = x, weight, bias
        if cast is None:
            y = F.linear(x, weight, bias)
        else:  # cast once here, so that backward runs on the very operands of the forward
            xc, wc = x.to(cast), weight.to(cast)
            bc = bias.to(cast) if bias is not None else None
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        # The memory is state, not an input of the graph: it is mutated in backward, so it must
        # not go through save_for_backward (whose version check would trip on that).
        ctx.memory = memory
        ctx.plan = plan
        ctx.weight = weight
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        plan: BackwardPlan = ctx.plan
        memory: Tensor | None = ctx.memory
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        out, d_in = w.shape
        g = grad_out.reshape(-1, out)  # (n, out)
        x2 = x.reshape(-1, d_in)  # (n, in)
        n = g.shape[0]
        x_shape = (*grad_out.shape[:-1], d_in)
        k = plan.k
        use_memory = memory is not None and plan.alpha > 0

        if n == 0:  # an empty batch propagates nothing and leaves the memory as it is
            dx = x.new_zeros(x_shape, dtype=ctx.x_dtype) if need_x else None
            dW = torch.zeros_like(ctx.weight) if need_w else None
            db = torch.zeros(out, dtype=ctx.bias_dtype, device=x.device) if need_b else None
            return dx, dW, db, None, None

        db = None
        if need_b:
            db = g.sum(0) if g.dtype in _WIDE else g.sum(0, dtype=torch.float32)
            db = _as(db, ctx.bias_dtype)

        if use_memory:
            u = _add_memory_(g.to(memory.dtype, copy=True), memory, plan.layout)  # (n, out)
        else:
            u = g

        idx, witness = (None, u) if k >= out else select(u, k, plan.selection, plan.generator)
        if not _all_finite(witness):
            if plan.on_nonfinite == "raise":
                raise nonfinite_error(plan, "output gradient", grad_out.shape)
            # skip: memory untouched, the raw gradient goes through the dense chain rule
            gc = g.to(x.dtype)
            dx = (gc @ w).reshape(x_shape) if need_x else None
            dW = None
            if need_w:
                dW = (gc.t() @ x2).to(ctx.weight.dtype)
                log_touched_rows(ctx.weight, None)
            return _cast_dx(ctx, dx), dW, db, None, None

        dx = dW = None
        if k >= out:
            uc = u.to(x.dtype)
            if plan.probe is not None:
                plan.probe(g, x2, u)
            if need_x:
                dx = uc @ w
            if need_w:
                dW = (uc.t() @ x2).to(ctx.weight.dtype)
                log_touched_rows(ctx.weight, None)
            if use_memory:  # everything was propagated
                if plan.layout == "slot":
                    memory.resize_(n, out)
                memory.zero_()
        elif plan.selection in UNIFIED_SELECTIONS:  # idx: (k,) columns for the whole batch
            u_sel = u.index_select(1, idx)  # (n, k)
            u_k = _as(u_sel, x.dtype)
            if plan.probe is not None:
                plan.probe(g, x2, torch.zeros_like(u).index_copy_(1, idx, u_sel))
            if need_x:
                dx = u_k @ w.index_select(0, idx)  # (n, in)
            if need_w:
                dW_k = u_k.t() @ x2  # (k, in)
                dW = _scatter_rows(ctx, idx, dW_k, out, d_in)
            if use_memory:
                _store_memory_(memory, u.index_fill_(1, idx, 0), plan.layout, plan.alpha)
        else:  # per example: idx (n, k) entries per row, c distinct columns in the batch
            vals = _as(u.gather(1, idx), x.dtype)  # (n, k)
            if plan.probe is not None:
                plan.probe(g, x2, torch.zeros_like(u).scatter_(1, idx, u.gather(1, idx)))
            groups = group_columns(idx)
            cols = groups[1]  # (c,) distinct columns, sorted
            c = cols.numel()
            g_c = None
            if not (_csr_pays(x, k, c, _DX_SPARSE_RATIO) and _csr_pays(x, k, c, _DW_SPARSE_RATIO)):
                # the propagated gradient compacted to the kept columns: GEMMs of width c
                g_c = torch.zeros(n, c, dtype=x.dtype, device=x.device)
                g_c.scatter_(1, torch.searchsorted(cols, idx), vals)  # (n, c)
            if need_x:
                if _csr_pays(x, k, c, _DX_SPARSE_RATIO):
                    dx = rows_product(idx, vals, w)  # (n, in): n k in multiply-adds
                else:
                    dx = g_c @ w.index_select(0, cols)  # (n, in): n c in
            if need_w:
                if _csr_pays(x, k, c, _DW_SPARSE_RATIO):
                    dW_c = torch.sparse.mm(column_csr(groups, vals), x2)  # (c, in): n k in
                else:
                    dW_c = g_c.t() @ x2  # (c, in): n c in
                dW = _scatter_rows(ctx, cols, dW_c, out, d_in)
            if use_memory:
                _store_memory_(memory, u.scatter_(1, idx, 0), plan.layout, plan.alpha)

        if dx is not None:
            dx = dx.reshape(x_shape)
        return _cast_dx(ctx, dx), dW, db, None, None


def nonfinite_error(plan: BackwardPlan, what: str, shape: torch.Size) -> FloatingPointError:
    """The error of ``on_nonfinite="raise"``: which layer, which gradient, what to do."""
    where = f" in layer {plan.name!r}" if plan.name else ""
    return FloatingPointError(
        f"non-finite {what}{where} (shape {tuple(shape)}); the memory was left unchanged. Use "
        "on_nonfinite='skip' to propagate it densely (e.g. with a GradScaler)."
    )


def _all_finite(t: Tensor) -> bool:
    # one reduction and one host read; a sum is non-finite iff an entry is (barring overflow
    # near 3e38, which would be a false alarm, never a miss)
    return math.isfinite(t.sum().item())


def _cast_dx(ctx, dx: Tensor | None) -> Tensor | None:
    return _as(dx, ctx.x_dtype) if dx is not None else None


_WIDE = (torch.float32, torch.float64)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Tensor.to costs a dispatch even when it has nothing to do: on small layers that adds up
    return t if t.dtype == dtype else t.to(dtype)


# Per-example products on the CPU: the sparse form costs n k in multiply-adds at a few GFLOP/s,
# the dense GEMM over the c kept columns n c in at ~75. Measured (benchmarks/bench_cpu.py, and real
# parser gradients at 10000 x 2400 x 500, k = 20): embedding_bag's dx wins from c = 2k on; the CSR
# dW only from c ~ 20k (at c = 14k, on skewed real columns, it took 154 ms against 75 ms).
_DX_SPARSE_RATIO = 2
_DW_SPARSE_RATIO = 20


def _csr_pays(x: Tensor, k: int, c: int, ratio: int) -> bool:
    # CUDA and 16-bit sparse products are not reliably fast
    return x.device.type == "cpu" and x.dtype in _WIDE and c >= ratio * k


def _sparse_csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # CSR support is "beta": we rely on it
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def rows_product(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """``sum_j vals[r, j] * weight[idx[r, j]]`` for every row r: (n, k), (n, k), (out, in) ->
    (n, in), i.e. the sparse gradient times W at n k in multiply-adds.

    ``embedding_bag`` computes exactly this in one fused op, twice as fast as a CSR product on
    the CPU at the layer sizes measured (benchmarks/bench_cpu.py)."""
    return F.embedding_bag(idx, weight, per_sample_weights=vals, mode="sum")


def group_columns(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kept entries ``idx`` (n, k) grouped by column with one stable sort: ``order`` (n k,)
    (flat entry positions, column by column, rows ascending), the distinct columns ``cols`` (c,)
    sorted, and the number of entries of each ``counts`` (c,)."""
    flat_cols, order = torch.sort(idx.reshape(-1), stable=True)
    cols, counts = torch.unique_consecutive(flat_cols, return_counts=True)
    return order, cols, counts


def column_csr(groups: tuple[Tensor, Tensor, Tensor], vals: Tensor) -> Tensor:
    """The transpose of the (n, out) matrix holding ``vals`` (n, k) at the columns grouped in
    ``groups`` (from ``group_columns``), compacted to those c columns: a (c, n) CSR matrix.

    ``csr @ x`` is the (c, in) weight gradient at n k in multiply-adds. Built directly, because
    torch's transpose of a CSR matrix is slow."""
    order, cols, counts = groups
    n, k = vals.shape
    crow = torch.zeros(cols.numel() + 1, dtype=torch.long, device=vals.device)
    torch.cumsum(counts, 0, out=crow[1:])
    rows = order.div(k, rounding_mode="floor")  # the row of every entry, ascending per column
    return _sparse_csr(crow, rows, vals.reshape(-1)[order], (cols.numel(), n))


def _scatter_rows(
    ctx, rows: Tensor, src: Tensor, out: int, d_in: int, weight_index: int = 1
) -> Tensor | None:
    """Put ``src`` (r, in) into the distinct rows ``rows`` (r,) of dW (out, in).

    Adds into ``weight.grad`` directly where allowed (then returns None, so autograd adds
    nothing); else returns a fresh dense dW for autograd to accumulate. ``weight_index`` is the
    weight's position among the inputs of ``ctx``'s function.
    """
    weight = ctx.weight
    log_touched_rows(weight, rows)
    target = (
        _inplace_grad_target(ctx, weight, weight_index) if ctx.plan.grad_inplace else None
    )
    if target is not None:
        target.index_add_(0, rows, _as(src, target.dtype))
        return None
    dW = torch.zeros(out, d_in, dtype=weight.dtype, device=weight.device)
    return dW.index_copy_(0, rows, _as(src, weight.dtype))
