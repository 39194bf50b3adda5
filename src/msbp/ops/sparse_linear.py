"""The sparse linear op: exact forward, compacted MSBP backward as one op.

Backward, per call (n rows, out units, k kept; ``msbp.ops.reference`` is the oracle):

    U  = G + M * s          # the memory is added back (float32 or wider), s: GradScaler's scale
    S  = select_k(U)        # unified / random: k columns; per-example: k entries per row
    dx = U_S W_S            # only the k selected rows of W are read
    dW = U_S^T x            # only k rows of dW are written
    M  = alpha * (U - U_S) / s   # what was not propagated, decayed, unscaled
    db = colsum(G)          # dense, from the raw gradient (meProp)

The backward is the op ``torch.ops.msbp.sparse_linear_backward`` (C++, ``csrc/sparse_linear.cpp``)
when the native kernels are available, else ``sparse_linear_backward_torch`` below, its
pure-PyTorch twin with the same signature (the fallback, and what the native op is tested
against besides the reference).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from msbp import native
from msbp.ops import consensus, scaling
from msbp.ops.memory import (
    active_rows,
    add_memory_,
    restore_memory_,
    spread_slot_memory_,
    store_memory_,
)
from msbp.ops.selection import select
from msbp.ops.touched_rows import (
    engine_runs,
    forget_touched_rows,
    graph_task_id,
    log_touched_rows,
    log_weight_rows,
    row_block_of,
)
from msbp.ops.transient import TransientList, TransientTuple, first_item_held_elsewhere

SELECTION_CODES = {"unified": 0, "per_example": 1, "random": 2}
NOT_DIFFERENTIABLE = "msbp: the sparse backward is not differentiable (create_graph=True)"


def sparse_backward(fn):
    """``once_differentiable`` for the backward of a sparse layer's autograd Function, raising
    the native op's error under ``create_graph=True``. ``once_differentiable`` alone let such a
    backward run (updating the memory) and failed only at a second-order backward, with
    PyTorch's generic message, while the C++ autograd function raised at once: the two backends
    parted, and convolutions, LSTMs and autocast, which always come here, never raised."""
    inner = once_differentiable(fn)

    @functools.wraps(fn)
    def backward(ctx, *grads):
        # the engine runs a backward with grad mode on exactly when create_graph=True
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                f"{NOT_DIFFERENTIABLE}: its memory update is not a function autograd can "
                "differentiate; for higher-order gradients run the layers dense (inside "
                "msbp.dense_backward(model), or after msbp.densify(model))"
            )
        return inner(ctx, *grads)

    return backward


NONFINITE_MARK = "msbp-nonfinite"

# Per-example products on the CPU: the sparse form costs n k in multiply-adds, the dense GEMM over
# the c kept columns n c in. The native blocked loops win from c >= 3k on (benchmarks/
# bench_cpu.py); torch's sparse products are slower, so the fallback takes them later
# (embedding_bag for dx from c >= 2k, a CSR product for dW only from c >= 20k: on real parser
# gradients at c = 14k the CSR product took 154 ms against 75 ms for the GEMM).
NATIVE_SPARSE_RATIO = 3.0
_DX_SPARSE_RATIO = 2
_DW_SPARSE_RATIO = 20


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
    backend: str = "sparse"  # or "auto": sparse only where it measured faster than dense
    consensus: bool = False  # under torch.distributed: the same k units on every rank
    # memory_rows="all": every row takes the memory, zero rows too (else only the active rows)
    all_rows: bool = False
    # probe(g (n, out), x (n, in), propagated (n, out)): called once per backward when set, for
    # measuring information loss; never set in normal training.
    probe: Callable[[Tensor, Tensor, Tensor], None] | None = None


def nonfinite_error(plan: BackwardPlan, what: str, shape: torch.Size) -> FloatingPointError:
    """The error of ``on_nonfinite="raise"``: which layer, which gradient, what to do."""
    where = f" in layer {plan.name!r}" if plan.name else ""
    return FloatingPointError(
        f"non-finite {what}{where} (shape {tuple(shape)}); the memory was left unchanged. Use "
        "on_nonfinite='skip' to propagate it densely, or msbp.amp.GradScaler under mixed "
        "precision."
    )


_WIDE = (torch.float32, torch.float64)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Tensor.to costs a dispatch even when it has nothing to do: on small layers that adds up
    return t if t.dtype == dtype else t.to(dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` if autocast is on there, else None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_arg(t: Tensor | None, cast: torch.dtype) -> Tensor | None:
    """``t`` as autocast casts an argument of a lower-precision op: floating tensors other than
    float64 go to ``cast``; float64 (and non-floating) tensors are left alone, as for nn.Linear."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return _as(t, cast)


# --- the pure-PyTorch backward (fallback of the native op) -------------------------------------


def rows_product(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """``sum_j vals[r, j] * weight[idx[r, j]]`` for every row r: (n, k), (n, k), (out, in) ->
    (n, in), i.e. the sparse gradient times W at n k in multiply-adds (one ``embedding_bag``)."""
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
    ``groups`` (from ``group_columns``), compacted to those c columns: a (c, n) CSR matrix, so
    that ``csr @ x`` is the (c, in) weight gradient at n k in multiply-adds."""
    order, cols, counts = groups
    n, k = vals.shape
    crow = torch.zeros(cols.numel() + 1, dtype=torch.long, device=vals.device)
    torch.cumsum(counts, 0, out=crow[1:])
    rows = order.div(k, rounding_mode="floor")  # the row of every entry, ascending per column
    with warnings.catch_warnings():  # CSR support is "beta": we rely on it
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, rows, vals.reshape(-1)[order], size=(cols.numel(), n), check_invariants=False
        )


def csr_pays(x: Tensor, k: int, c: int, ratio: float) -> bool:
    """Whether a sparse product over the n k kept entries beats a GEMM over c columns."""
    return x.device.type == "cpu" and x.dtype in _WIDE and c >= ratio * k


def _place_rows(rows: Tensor, src: Tensor, weight: Tensor, compact: bool) -> Tensor:
    """dW from its rows ``rows`` (r,) with values ``src`` (r, in): ``src`` itself in the
    weight's dtype when ``compact``, else a dense (out, in) with zeros elsewhere."""
    if compact:
        return _as(src, weight.dtype)
    return torch.zeros_like(weight).index_copy_(0, rows, _as(src, weight.dtype))


def sparse_linear_backward_torch(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    memory: Tensor | None,
    random_cols: Tensor | None,
    scale: Tensor | None,
    k: int,
    selection: int,
    alpha: float,
    slot: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    compact_dw: bool,
    skip_nonfinite: bool,
    csr_ratio: float = NATIVE_SPARSE_RATIO,
    all_rows: bool = False,
    probe: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> list[Tensor]:
    """The PyTorch twin of ``torch.ops.msbp.sparse_linear_backward``: same arguments, results.

    grad_out: (n, out); x: (n, in); weight: (out, in); memory (out,) or, ``slot``, (n, out),
    updated in place. Returns ``[dx (n, in), dW, db (out,), rows (r,), skipped ()]``: dW is
    (out, in), or only its rows ``rows`` (r, in) when ``compact_dw``; dx / dW / db are empty
    when not needed; rows: the rows of dW that may be non-zero, ascending; skipped: 1 when a
    non-finite gradient went through densely (dW then dense whatever ``compact_dw``). Raises
    ``RuntimeError`` marked ``msbp-nonfinite`` (``skip_nonfinite`` off). Unless ``all_rows``,
    the all-zero rows of ``grad_out`` take no part (see ``msbp.ops.memory``): the backward runs
    on the other rows only, and the zero rows get dx = 0 and keep their slot memory.
    """
    n, out = grad_out.shape
    use_memory = memory is not None and alpha > 0
    if not all_rows and (use_memory or (selection == SELECTION_CODES["per_example"] and k < out)):
        active = active_rows(grad_out)
        if active is not None:
            return _backward_active_rows(
                active, grad_out, x, weight, memory, random_cols, scale, k, selection, alpha,
                slot, need_x, need_w, need_b, compact_dw, skip_nonfinite, csr_ratio, probe,
            )
    acc = memory.dtype if use_memory else torch.promote_types(grad_out.dtype, torch.float32)
    layout = "slot" if slot else "unit"
    u = grad_out.to(acc, copy=True)  # (n, out)
    if use_memory:
        add_memory_(u, memory if scale is None else memory * scale, layout)
    db = grad_out.sum(0, dtype=acc) if need_b else u.new_empty(0)
    empty = x.new_empty(0)
    long = dict(dtype=torch.long, device=grad_out.device)
    if not bool(torch.isfinite(u).all()):  # no overflow, unlike a sum
        if not skip_nonfinite:
            raise RuntimeError(f"{NONFINITE_MARK}: non-finite output gradient")
        gc = grad_out.to(x.dtype)
        dx = gc @ weight if need_x else empty
        dW = gc.t() @ x if need_w else empty
        return [dx, dW, db, torch.arange(out, **long), torch.ones((), **long)]
    dx = dW = empty
    if k >= out or selection != SELECTION_CODES["per_example"]:
        if k >= out:
            idx = torch.arange(out, **long)
        elif selection == SELECTION_CODES["random"]:
            idx = random_cols.sort().values
        else:
            idx = select(u, k, "unified")[0].sort().values
        u_sel = u if k >= out else u.index_select(1, idx)  # (n, k)
        if probe is not None:
            probe(grad_out, x, torch.zeros_like(u).index_copy_(1, idx, u_sel))
        u_k = _as(u_sel, x.dtype)
        if need_x:
            dx = u_k @ (weight if k >= out else weight.index_select(0, idx))  # (n, in)
        if need_w:
            dW = _place_rows(idx, u_k.t() @ x, weight, compact_dw)  # k rows
        if use_memory:
            store_memory_(memory, u.index_fill_(1, idx, 0), layout, alpha, scale)
        rows = idx
    else:  # per example: idx (n, k) entries per row, c distinct columns in the batch
        idx = select(u, k, "per_example")[0]
        vals = u.gather(1, idx)
        if probe is not None:
            probe(grad_out, x, torch.zeros_like(u).scatter_(1, idx, vals))
        vals = _as(vals, x.dtype)  # (n, k)
        groups = group_columns(idx)
        cols = groups[1]  # (c,) distinct columns, sorted
        c = cols.numel()
        sparse_dx = csr_pays(x, k, c, _DX_SPARSE_RATIO)
        sparse_dw = csr_pays(x, k, c, _DW_SPARSE_RATIO)
        g_c = None
        if not (sparse_dx and sparse_dw):  # the propagated gradient over the c kept columns
            g_c = torch.zeros(n, c, dtype=x.dtype, device=x.device)
            g_c.scatter_(1, torch.searchsorted(cols, idx), vals)  # (n, c)
        if need_x:
            if sparse_dx:
                dx = rows_product(idx, vals, weight)
            else:
                dx = g_c @ weight.index_select(0, cols)
        if need_w:
            if sparse_dw:
                dW_c = torch.sparse.mm(column_csr(groups, vals), x)  # (c, in): n k in
            else:
                dW_c = g_c.t() @ x  # (c, in): n c in
            dW = _place_rows(cols, dW_c, weight, compact_dw)
        if use_memory:
            store_memory_(memory, u.scatter_(1, idx, 0), layout, alpha, scale)
        rows = cols
    return [dx, dW, db, rows, torch.zeros((), **long)]


def _backward_active_rows(
    active, grad_out, x, weight, memory, random_cols, scale, k, selection, alpha, slot, need_x,
    need_w, need_b, compact_dw, skip_nonfinite, csr_ratio, probe,
) -> list[Tensor]:
    """``sparse_linear_backward_torch`` on the rows ``active`` (n,) bool of a batch with zero
    rows: the others get dx = 0, keep their slot memory, add nothing to db; no active row leaves
    the memory as it is (an empty step)."""
    n, out = grad_out.shape
    use_memory = memory is not None and alpha > 0
    acc = memory.dtype if use_memory else torch.promote_types(grad_out.dtype, torch.float32)
    idx = active.nonzero().squeeze(1)  # (n_active,)
    mem = memory if use_memory and idx.numel() > 0 else None
    if mem is not None and slot:
        mem = memory.index_select(0, idx)
    dx, dW, _, rows, skipped = sparse_linear_backward_torch(
        grad_out.index_select(0, idx), x.index_select(0, idx), weight, mem, random_cols, scale,
        k, selection, alpha, slot, need_x, need_w, False, compact_dw, skip_nonfinite, csr_ratio,
        True, probe,
    )
    if mem is not None and slot:
        memory.index_copy_(0, idx, mem)
    if need_x:
        dx = x.new_zeros(n, x.shape[1]).index_copy_(0, idx, dx)
    db = grad_out.sum(0, dtype=acc) if need_b else grad_out.new_empty(0, dtype=acc)
    return [dx, dW, db, rows, skipped]


# --- the op's fake implementation (torch.compile traces through it) ----------------------------

_fake_registered = False


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("msbp::sparse_linear_backward")
    def _fake(grad_out, x, weight, memory, random_cols, scale, k, selection, alpha, slot,
              need_x, need_w, need_b, compact_dw, skip_nonfinite, csr_ratio, all_rows=False):
        n, out = grad_out.shape
        use_memory = memory is not None and alpha > 0
        acc = memory.dtype if use_memory else torch.promote_types(grad_out.dtype, torch.float32)
        dx = x.new_empty(n, x.shape[1]) if need_x else x.new_empty(0)
        db = grad_out.new_empty(out, dtype=acc) if need_b else grad_out.new_empty(0, dtype=acc)
        if k >= out or selection != SELECTION_CODES["per_example"]:
            r = min(k, out)
        else:
            r = torch.library.get_ctx().new_dynamic_size()
        rows = grad_out.new_empty(r, dtype=torch.long)
        dW = x.new_empty(0)
        if need_w:
            # dense: in the weight's layout, as the op returns it (W^T's storage for a
            # transposed weight, SparseHFConv1D's: inductor checks the strides)
            dW = weight.new_empty((r, weight.shape[1])) if compact_dw else (
                torch.empty_like(weight)
            )
        return dx, dW, db, rows, grad_out.new_empty((), dtype=torch.long)

    _fake_registered = True


native.on_load(_register_fake)


def _flops(grad_out, x, weight, memory, random_cols, scale, k, selection, alpha, slot, need_x,
           need_w, *args, out_shape=None, **kwargs) -> int:
    """The op's products for ``FlopCounterMode`` (and what builds on it, such as Lightning's
    ``measure_flops``), from its inputs' shapes: 2 n min(k, out) in for dx and as many for dW's
    kept rows, as ``aten.mm`` counts a dense layer's (selection and memory, O(n out), not)."""
    n, out = grad_out
    return 2 * n * min(k, out) * x[1] * (int(need_x) + int(need_w))


native.on_load(lambda: native.register_flop_formula("sparse_linear_backward", _flops))


def run_backward(native_ok: bool, *args, probe=None) -> list[Tensor]:
    """``sparse_linear_backward`` through the native op when ``native_ok``, else through the
    PyTorch twin. A ``probe`` is fed by the twin; on the native path the twin then runs on a copy
    of the memory for the probe alone, so that measuring never changes the numbers."""
    if not native_ok:
        return sparse_linear_backward_torch(*args, probe=probe)
    memory = args[3]
    if probe is not None:
        sparse_linear_backward_torch(
            *args[:3], None if memory is None else memory.clone(), *args[4:], probe=probe
        )
    if memory is not None and not memory.is_contiguous():
        # the op writes the memory through its data pointer: a strided view (the functional
        # API's memory argument, a memory loaded with assign=True) goes through a copy
        work = memory.contiguous()
        outs = torch.ops.msbp.sparse_linear_backward(*args[:3], work, *args[4:])
        with torch.no_grad():
            memory.copy_(work)
        return outs
    return torch.ops.msbp.sparse_linear_backward(*args)


# --- backend="auto": sparse only where it pays ------------------------------------------------

_AUTO_DECISIONS: dict[tuple, bool] = {}
_AUTO_REPEATS = 5


def auto_decisions() -> dict[tuple, bool]:
    """What ``backend="auto"`` decided so far: key (out, in, rows rounded up to a power of two,
    x dtype, grad dtype, device, selection, k, memory, slot, need_x, need_w) -> sparse or not."""
    return dict(_AUTO_DECISIONS)


def _auto_key(w, n, x_dtype, g_dtype, device, selection, k, has_memory, slot, need_x,
              need_w) -> tuple:
    # the weight's layout too: a transposed one (GPT-2's W^T) takes other routes
    return (w.shape[0], w.shape[1], w.is_contiguous(), 1 << max(0, n - 1).bit_length(), x_dtype,
            g_dtype, str(device), selection, k, has_memory, slot, need_x, need_w)


def sparse_pays(native_ok: bool, args: tuple, n: int) -> bool:
    """Whether the sparse backward of ``args`` (``run_backward``'s) beats the dense one (k =
    out), measured once per key on copies of the inputs (interleaved, medians); cached."""
    import time

    g, x, w, memory, random_cols, scale, k, selection, alpha, slot, need_x, need_w = args[:12]
    key = _auto_key(w, n, x.dtype, g.dtype, g.device, selection, k, memory is not None,
                    slot, need_x, need_w)
    decision = _AUTO_DECISIONS.get(key)
    if decision is not None:
        return decision
    out = w.shape[0]
    times: dict[int, list[float]] = {k: [], out: []}
    with torch.no_grad():
        for rep in range(_AUTO_REPEATS + 1):  # the first round warms up
            for kk in (k, out):
                mem = None if memory is None else memory.clone()
                call = (g, x, w, mem, random_cols, scale, kk, *args[7:])
                t0 = time.perf_counter()
                run_backward(native_ok, *call)
                if g.device.type == "cuda":
                    torch.cuda.synchronize(g.device)
                if rep:
                    times[kk].append(time.perf_counter() - t0)
    decision = sorted(times[k])[len(times[k]) // 2] < sorted(times[out])[len(times[out]) // 2]
    _AUTO_DECISIONS[key] = decision
    return decision


def auto_keeps_sparse(x: Tensor, weight: Tensor, memory: Tensor | None, config) -> bool:
    """``backend="auto"``: whether this call should run sparse, decided at forward time from
    ``sparse_pays`` on a random output gradient of the call's shape (measured once per key)."""
    out, d_in = weight.shape
    n = x.numel() // max(d_in, 1)
    k = config.k_for(out)
    if k >= out or n == 0:
        return True
    use_memory = memory is not None and config.memory > 0
    selection = SELECTION_CODES[config.selection]
    slot = config.memory_layout == "slot"
    decided = _AUTO_DECISIONS.get(_auto_key(
        weight, n, x.dtype, x.dtype, x.device, selection, k, use_memory, slot, True, True
    ))
    if decided is not None:  # asked at every forward: the probe's inputs only on a first call
        return decided
    x2 = x.detach().reshape(n, d_in)
    g = torch.randn(n, out, dtype=x2.dtype, device=x2.device)
    if use_memory and config.memory_layout == "slot" and memory.shape[0] != n:
        memory = torch.zeros(n, out, dtype=memory.dtype, device=memory.device)
    cols = None
    if config.selection == "random":
        cols = torch.randperm(out, device=x2.device)[:k]
    # dW's rows go into .grad (compact) as the layer's call would: for a Parameter or a block of
    # one's rows, not for another view (a transposed weight: a dense dW in its layout)
    compact = weight.is_leaf or row_block_of(weight) is not None
    args = (g, x2, weight.detach(), memory if use_memory else None, cols, None, k, selection,
            float(config.memory), slot, True, True, True, compact, True, NATIVE_SPARSE_RATIO)
    return sparse_pays(native.use_native(x2.device, "sparse_linear_backward"), args, n)


# --- where the k rows of dW go -----------------------------------------------------------------

_BUFFER = "_msbp_grad_buffer"


def _engine_will_accumulate(ctx, weight: Tensor, index: int) -> bool:
    """Whether this backward pass runs the weight's AccumulateGrad node (a ``.backward()`` that
    reaches it; not ``torch.autograd.grad``), so that writing ``.grad`` is what autograd would
    do itself."""
    if not weight.is_leaf or not weight.requires_grad:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False  # DDP's reducer hooks the accumulation, which must therefore happen
    if weight._backward_hooks or getattr(weight, "_post_accumulate_grad_hooks", None):
        return False
    node = ctx.next_functions[index][0]  # the weight's AccumulateGrad node
    return node is not None and engine_runs(node)


def prepare_grad_buffer(ctx, weight: Tensor, index: int) -> bool:
    """Make ``weight.grad`` a dense buffer that the k rows of dW can be added into, and say
    whether to hand autograd the rows as a row-sparse gradient (True) or a dense dW (False).

    The rows go through the weight's AccumulateGrad node as a sparse COO gradient, which adds
    them into the dense ``.grad`` at the cost of k rows and lets hooks on that node see them.
    When ``.grad`` is None (``zero_grad(set_to_none=True)``), the buffer this layer handed over
    last time is put back if nobody else holds it: only the rows it wrote are cleared when
    nothing modified it in place since (its version counter says so), else all of it. A fresh
    zero dW each step would cost more than the sparse backward itself at small sizes.
    """
    if not _engine_will_accumulate(ctx, weight, index):
        return False
    if weight.dtype == torch.float16 and weight.device.type == "cpu":
        # autograd sums the gradients of a weight used twice in one graph (a shared layer)
        # before its one AccumulateGrad, and PyTorch's CPU kernel for adding two sparse tensors
        # has no float16 ("cadd_sparse" not implemented for 'Half'): a dense dW there
        return False
    grad = weight.grad
    if grad is not None:
        return grad.layout == torch.strided and grad.shape == weight.shape and (
            grad.dtype == weight.dtype
        )
    forget_touched_rows(weight)  # the gradient they were written into was discarded
    kept = weight.__dict__.get(_BUFFER)
    if kept is not None:
        alone = not first_item_held_elsewhere(kept)
        buf, version, rows = kept
        # storage: buf and the temporary storage object asked for the count (more: another
        # tensor shares it, a view or .data of an old gradient)
        alone = alone and torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2
        if alone and buf.shape == weight.shape and buf.dtype == weight.dtype:
            if buf._version == version and rows is not None:
                buf.index_fill_(0, rows, 0)
            else:
                buf.zero_()
            record_buffer_clean(weight, buf)
            weight.grad = buf
            return True
    weight.grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    record_buffer_clean(weight, weight.grad)
    return True


def buffer_listed_rows(weight: Tensor, grad: Tensor) -> Tensor | None:
    """The rows this path's record lists as the only ones that went into ``grad`` since the
    record was clean, or None where it does not know (see
    ``msbp.functional.grad_rows_listed``)."""
    kept = weight.__dict__.get(_BUFFER)
    if kept is not None and kept[0] is grad and kept[2] is not None and (
        kept[1] == grad._version
    ):
        return kept[2]
    return None


def record_buffer_clean(weight: Tensor, buf: Tensor, *, if_recorded: bool = False) -> None:
    """Record ``buf`` (zeroed, ``weight``'s ``.grad``) as the buffer with no row written since,
    at its version (see ``row_sparse_grad``); with ``if_recorded``, only where this path keeps
    a record for ``weight`` already."""
    if if_recorded and _BUFFER not in weight.__dict__:
        return
    weight.__dict__[_BUFFER] = TransientTuple((buf, buf._version, _no_rows(buf.device)))


@functools.cache
def _no_rows(device: torch.device) -> Tensor:
    # one empty row list per device, shared: records only read it
    return torch.empty(0, dtype=torch.long, device=device)


def row_sparse_grad(weight: Tensor, rows: Tensor, values: Tensor, node) -> Tensor:
    """dW as a coalesced sparse COO tensor: ``values`` (r, in) at the ascending ``rows`` (r,),
    remembered so that the next step can reuse ``weight.grad`` by clearing just these rows."""
    grad = weight.grad
    if grad is not None:
        kept = weight.__dict__.get(_BUFFER)
        # the rows are added to those listed only where the buffer is as the record left it:
        # clean (prepare_grad_buffer), or its last rows added, in a later backward (version ==
        # expected) or in the same one (autograd sums both before its one add: expected - 1);
        # else anything may have written into it (a dense dW, an in-place change): None, the
        # whole buffer is to be cleared
        rows_all = None
        if kept is not None and kept[0] is grad and kept[2] is not None and (
            kept[1] - 1 <= grad._version <= kept[1]
        ):
            rows_all = torch.cat((kept[2], rows)) if kept[2].numel() else rows
        # AccumulateGrad's `grad += dW` will bump the version once
        weight.__dict__[_BUFFER] = TransientTuple((grad, grad._version + 1, rows_all))
        if rows_all is not None:
            _watch_sole_rows(weight, node, rows)
    # distinct ascending rows: a valid coalesced tensor, no check needed
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, weight.shape, is_coalesced=True, check_invariants=False
    )


_WATCH = "_msbp_sole_rows_watch"


def _watch_sole_rows(weight: Tensor, node, rows: Tensor) -> None:
    """Check, as the weight's AccumulateGrad ``node`` runs, that what it adds is only the rows
    sparse layers handed it in this backward pass (their row-sparse dWs, summed): autograd
    sums every gradient of a weight before its one in-place add, so the version counter cannot
    tell a dense part (weight tying, a penalty on the weight in the loss) from the rows, and a
    reused buffer cleared row by row would keep that part into the next step."""
    task = graph_task_id()
    watch = weight.__dict__.get(_WATCH)
    if watch is not None and watch[0] == task:
        watch[1].append(rows)  # another call of the layer in this pass: autograd sums both
        return
    if watch is not None:
        watch[2].remove()  # left by a pass that stopped before the node ran
    ref = weakref.ref(weight)
    watch = TransientList([task, [rows], None])

    def check(grad_inputs):
        watch[2].remove()  # one pass only
        w = ref()
        if w is None or w.__dict__.get(_WATCH) is not watch:
            return None
        del w.__dict__[_WATCH]
        if watch[0] != graph_task_id() or not _only_rows(grad_inputs[0], watch[1]):
            _clear_whole_next_time(w)  # (another pass: the one that listed the rows stopped)
        return None

    watch[2] = node.register_prehook(check)
    weight.__dict__[_WATCH] = watch


def _only_rows(grad: Tensor | None, rows: list[Tensor]) -> bool:
    """Whether ``grad``, what AccumulateGrad received, holds entries in ``rows`` only (each the
    distinct rows of one coalesced dW this pass handed it). One dW: it is that dW exactly iff
    its entries are as many (anything summed in adds entries or makes it dense). Several:
    autograd may merge them, so their entries are matched against the rows (a host read,
    taken on the CPU only: elsewhere the buffer is cleared whole)."""
    if grad is None or not grad.is_sparse:
        return False
    if len(rows) == 1:
        return grad._nnz() == rows[0].numel()
    if grad.device.type != "cpu":
        return False
    return bool(torch.isin(grad._indices()[0], torch.cat(rows)).all())


def _clear_whole_next_time(weight: Tensor) -> None:
    kept = weight.__dict__.get(_BUFFER)
    if kept is not None:
        weight.__dict__[_BUFFER] = TransientTuple((kept[0], kept[1], None))


# --- autograd ----------------------------------------------------------------------------------


def forward_and_save(ctx, op, x, weight, bias, memory, plan, *args):
    """``op(x, weight, bias, *args)``, cast once by autocast's rules so that the backward runs on
    the forward's very operands, which are saved on ``ctx`` with what a sparse backward needs."""
    cast = autocast_dtype(x.device.type)
    xc, wc, bc = x, weight, bias
    if cast is None:
        y = op(x, weight, bias, *args)
    else:
        xc, wc, bc = autocast_arg(x, cast), autocast_arg(weight, cast), autocast_arg(bias, cast)
        with torch.autocast(x.device.type, enabled=False):
            y = op(xc, wc, bc, *args)
    # F.linear of a (*, in) input with a bias returns a view of its 2-d result, and an autograd
    # Function's output that is a view of a tensor made inside it cannot be modified in place
    # (`Linear -> ReLU(inplace=True)` raised); detach is a free alias that is no view (always:
    # dynamo cannot trace _is_view)
    y = y.detach()
    ctx.save_for_backward(xc, wc)
    # The memory is state, not an input of the graph: it is mutated in backward, so it must not
    # go through save_for_backward (whose version check would trip on that).
    ctx.memory = memory
    ctx.plan = plan
    ctx.weight = weight
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    return y


class SparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with the MSBP backward; the memory tensor is updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, memory, plan: BackwardPlan):
        return forward_and_save(ctx, F.linear, x, weight, bias, memory, plan)

    @staticmethod
    @sparse_backward
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        plan: BackwardPlan = ctx.plan
        memory: Tensor | None = ctx.memory
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        out, d_in = w.shape
        # n from the leading dimensions: reshape(-1, 0) of a layer with no input (or output)
        # features is ambiguous, and raised there in backward
        n = grad_out.shape[:-1].numel()
        g = grad_out.reshape(n, out)  # (n, out)
        x2 = x.reshape(n, d_in)  # (n, in)
        x_shape = (*grad_out.shape[:-1], d_in)
        k = min(plan.k, out)
        weight = ctx.weight

        # a collective: a rank with an empty batch still takes part (and gets the shared memory);
        # k = out too, so that a non-finite gradient on one rank makes every rank raise
        agree = plan.consensus and consensus.active()
        if n == 0 and not agree:  # an empty batch propagates nothing, leaves the memory as is
            dx = x.new_zeros(x_shape, dtype=ctx.x_dtype) if need_x else None
            dW = torch.zeros_like(weight) if need_w else None
            db = torch.zeros(out, dtype=ctx.bias_dtype, device=x.device) if need_b else None
            if need_w and not torch.compiler.is_compiling():
                # no row: a row-sparse optimizer leaves the weight alone, as after the C++ path
                log_weight_rows(weight, torch.empty(0, dtype=torch.long, device=x.device))
            return dx, dW, db, None, None
        if g.is_meta:
            return _meta_backward(ctx, g, x2, w, k, x_shape)

        use_memory = memory is not None and plan.alpha > 0
        slot = plan.layout == "slot"
        compiling = torch.compiler.is_compiling()
        scale = scaling.current_scale() if not compiling else None
        if use_memory and scale is not None:
            scaling.snapshot(memory)  # before the spread: a skipped step restores its shape
        # a new batch shape: the slot memory's sums spread over its rows (undone if no step)
        before = spread_slot_memory_(memory, n) if use_memory and slot else None
        skip = plan.on_nonfinite == "skip" or scale is not None
        random_cols = None
        if k < out and plan.selection == "random":
            random_cols = torch.randperm(out, generator=plan.generator, device=g.device)[:k]
        if agree:
            try:
                grads, skipped = _consensus_backward(ctx, g, x2, w, memory if use_memory else None,
                                                     random_cols, scale, k, slot, skip, x_shape)
            except FloatingPointError:
                restore_memory_(memory, before)
                raise
            if skipped:  # went through densely on every rank: the memory as it was
                restore_memory_(memory, before)
            return grads
        fresh = need_w and weight.is_leaf and weight.grad is None
        compact = bool(need_w and plan.grad_inplace and not compiling) and (
            prepare_grad_buffer(ctx, weight, 1)
        )

        def undo() -> None:
            """Before a raise: the memory as it was, and .grad None again where it was and a
            buffer was put back, as autograd leaves it after a failure."""
            restore_memory_(memory, before)
            if compact and fresh:
                weight.grad = None

        native_ok = native.use_native(g.device, "sparse_linear_backward")
        args = [g, x2, w, memory if use_memory else None, random_cols, scale, k,
                SELECTION_CODES[plan.selection], plan.alpha, slot, need_x, need_w, need_b,
                compact, skip, NATIVE_SPARSE_RATIO, plan.all_rows]
        try:
            dx, dW, db, rows, skipped = run_backward(native_ok, *args, probe=plan.probe)
        except RuntimeError as exc:
            undo()
            if NONFINITE_MARK in str(exc):
                raise nonfinite_error(plan, "output gradient", grad_out.shape) from None
            raise
        if native_ok and g.device.type != "cpu":  # GPU kernels: flagged on the device, dW's
            # shape kept (msbp.kernels.sparse_linear); "raise" costs one host read, never traced
            if not (skip or compiling or torch.cuda.is_current_stream_capturing()) and bool(
                skipped
            ):
                undo()
                raise nonfinite_error(plan, "output gradient", grad_out.shape)
            skipped = 0
        elif before is not None and not compiling and bool(skipped):
            restore_memory_(memory, before)  # skipped densely: the memory as it was
        if not need_w:
            dW = None
        elif compiling:  # compact is off: a dense dW, nothing read back from the op
            dW = _as(dW, weight.dtype)
        else:
            dense_dw = k >= out or bool(skipped)
            log_weight_rows(weight, None if dense_dw else rows)
            dW = row_sparse_grad(weight, rows, dW, ctx.next_functions[1][0]) if (
                compact and not dense_dw
            ) else (
                _as(dW, weight.dtype)
            )
        dx = _as(dx.reshape(x_shape), ctx.x_dtype) if need_x else None
        db = _as(db, ctx.bias_dtype) if need_b else None
        return dx, dW, db, None, None


def _consensus_backward(ctx, g, x2, w, memory, random_cols, scale, k, slot, skip, x_shape):
    """``SparseLinearFunction.backward``'s gradients with the ranks agreeing on the k units
    (see ``msbp.ops.consensus``), and whether a non-finite gradient (on some rank) made them
    go through densely; dW goes to autograd dense, as DDP's reducer needs."""
    plan: BackwardPlan = ctx.plan
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    try:
        dx, dW, db, rows, skipped = consensus.backward(
            g, x2, w, memory, random_cols, scale, k, plan.alpha, slot, need_x, need_w, need_b,
            skip, probe=plan.probe, all_rows=plan.all_rows,
        )
    except RuntimeError as exc:
        if NONFINITE_MARK in str(exc):
            raise nonfinite_error(plan, "output gradient", g.shape) from None
        raise
    weight = ctx.weight
    if need_w:
        log_weight_rows(weight, rows)
        consensus.record_rows(weight, rows)
        dW = _as(dW, weight.dtype)
    dx = _as(dx.reshape(x_shape), ctx.x_dtype) if need_x else None
    db = _as(db, ctx.bias_dtype) if need_b else None
    return (dx, dW, db, None, None), skipped


def _meta_backward(ctx, g: Tensor, x2: Tensor, w: Tensor, k: int, x_shape) -> tuple:
    """The backward on the meta device, where there are shapes but no values to select by (what
    Lightning's ``measure_flops`` runs under ``FlopCounterMode``): the k-wide products of the
    first k units, as the op's FLOP formula counts them; the memory is untouched."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g_k = g[:, :k].to(x2.dtype)  # (n, k)
    dx = (g_k @ w[:k]).reshape(x_shape).to(ctx.x_dtype) if need_x else None
    dW = None
    if need_w:
        dW = torch.zeros_like(ctx.weight)
        dW[:k] = (g_k.t() @ x2).to(dW.dtype)
    db = g.sum(0).to(ctx.bias_dtype) if need_b else None
    return dx, dW, db, None, None


def place_weight_rows(
    ctx, weight: Tensor, index: int, rows: Tensor, src: Tensor, grad_inplace: bool
) -> Tensor:
    """dW for a Function whose input ``index`` is ``weight``, from its distinct ascending rows
    ``rows`` (r,) with values ``src`` (r, in): row-sparse into a kept ``.grad`` buffer where
    allowed (see ``prepare_grad_buffer``), else dense."""
    if torch.compiler.is_compiling():  # traced: a dense dW, no log (as the linear op does)
        return _place_rows(rows, src, weight, False)
    compact = grad_inplace and prepare_grad_buffer(ctx, weight, index)  # may drop an old log
    log_touched_rows(weight, rows)
    if compact:
        return row_sparse_grad(weight, rows, _as(src, weight.dtype), ctx.next_functions[index][0])
    return _place_rows(rows, src, weight, False)
