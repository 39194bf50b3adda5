"""Triton kernels of the sparse linear backward: ``msbp::sparse_linear_backward`` on CUDA.

Semantics: ``msbp.ops.sparse_linear`` (the op, its PyTorch twin); oracle: ``msbp.ops.reference``.
One call, with U = G + M s (the memory added back, in float32 or float64):

1. ``_score_kernel``: one pass over G (n, out) and the memory: the column scores sum_r |U|
   (unified), db = colsum(G), colsum(U) (what a unit memory keeps of unkept columns) and the
   non-finite flag, all on the device; for per-example selection also |U| for a per-row
   ``torch.topk``.
2. ``torch.topk`` with a fixed k (no host read), the k columns sorted ascending.
3. ``_gather_kernel`` (unit memory or none): the k kept columns of U in x's dtype into an
   (n, k_pad) buffer whose last k_pad - k columns are zero; the unit memory then takes its
   residual in ``_unit_store_kernel`` (out elements). Slot memory and per-example selection
   instead run ``_residual_kernel``: one pass over G and the memory writing the kept entries and
   alpha (U - U_S) / s back into the memory.
4. Two cuBLAS GEMMs over k_pad, a multiple of ``K_ALIGN`` (64): GEMMs with an unaligned k ran up
   to 4.4x slower on an H100 (docs/performance.md); the zero columns change no result.

No host synchronisation anywhere (CUDA graphs and ``torch.compile`` can take the op whole). The
non-finite check is a device-side flag: when U holds a NaN or an inf, the memory is left
unchanged, dx and the kept rows of dW become NaN (so the non-finite value still reaches the loss
scaler and every upstream layer, which is what the CPU path's dense propagation is for), no shape
changes, and the flag comes back as ``skipped``. This path never raises (that would need a host
read): a caller wanting ``on_nonfinite="raise"`` reads ``skipped``.

Per-example selection keeps k entries per row, so the columns touched depend on the data; without
a host read their number is unknown, so here dx and dW are products over the dense-shaped
(n, out) kept gradient and ``rows`` is every row: exact, but no faster than dense.

The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which is how ``tests/test_sparse_linear_triton.py`` checks them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

K_ALIGN = 64
PER_EXAMPLE = 1
RANDOM = 2

_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _load_scale(scale_ptr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr):
    if HAS_SCALE:
        return tl.load(scale_ptr).to(ACC)
    return tl.full((), 1.0, ACC)


@triton.jit
def _add_memory(g, mem_ptr, rowdiv_ptr, offs, rows, rmask, m2, mcol, s,
                MEM: tl.constexpr, ACC: tl.constexpr):
    """U = G + the memory: MEM 0 none; 1 a column memory ``mcol`` (out,) already times s, spread
    as mcol / rowdiv[r] (the unit layout); 2 a slot memory (n, out) row for row."""
    if MEM == 1:
        div = tl.load(rowdiv_ptr + rows, mask=rmask, other=1.0).to(ACC)
        return g + mcol[None, :] / div[:, None]
    if MEM == 2:
        return g + tl.load(mem_ptr + offs, mask=m2, other=0.0).to(ACC) * s
    return g


@triton.jit
def _score_kernel(g_ptr, mem_ptr, rowdiv_ptr, scale_ptr, score_ptr, db_ptr, usum_ptr, absu_ptr,
                  flag_ptr, n, out, rows_per_prog,
                  MEM: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_SCORE: tl.constexpr,
                  NEED_DB: tl.constexpr, NEED_USUM: tl.constexpr, NEED_ABS: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # a column block over a slice of the rows; slices add their sums atomically (zeroed outputs)
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < out
    s = _load_scale(scale_ptr, HAS_SCALE, ACC)
    mcol = tl.zeros((BLOCK_C,), dtype=ACC)
    if MEM == 1:
        mcol = tl.load(mem_ptr + cols, mask=cmask, other=0.0).to(ACC) * s
    score = tl.zeros((BLOCK_C,), dtype=ACC)
    db = tl.zeros((BLOCK_C,), dtype=ACC)
    usum = tl.zeros((BLOCK_C,), dtype=ACC)
    bad = tl.zeros((BLOCK_C,), dtype=tl.int32)
    r_begin = pid_r * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        rows = r_begin + r0 + tl.arange(0, BLOCK_R)
        rmask = rows < n
        m2 = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * out + cols[None, :]
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(ACC)
        u = _add_memory(g, mem_ptr, rowdiv_ptr, offs, rows, rmask, m2, mcol, s, MEM, ACC)
        u = tl.where(m2, u, 0.0)
        a = tl.abs(u)
        # NaN compares false: counted with the infinities; finite values never overflow a count
        bad += tl.sum(tl.where(a < float("inf"), 0, 1), axis=0)
        if NEED_SCORE:
            score += tl.sum(a, axis=0)
        if NEED_DB:
            db += tl.sum(g, axis=0)
        if NEED_USUM:
            usum += tl.sum(u, axis=0)
        if NEED_ABS:
            tl.store(absu_ptr + offs, a.to(absu_ptr.dtype.element_ty), mask=m2)
    if NEED_SCORE:
        tl.atomic_add(score_ptr + cols, score, mask=cmask)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, db, mask=cmask)
    if NEED_USUM:
        tl.atomic_add(usum_ptr + cols, usum, mask=cmask)
    tl.atomic_max(flag_ptr, (tl.sum(bad, axis=0) > 0).to(tl.int32))


@triton.jit
def _gather_kernel(g_ptr, mem_ptr, rowdiv_ptr, scale_ptr, idx_ptr, flag_ptr, dst_ptr,
                   n, out, k, k_pad,
                   MEM: tl.constexpr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # dst (n, k_pad) <- U[:, idx] in dst's dtype, zero in the padding columns j >= k
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < n
    jmask = js < k
    m2 = rmask[:, None] & jmask[None, :]
    col = tl.load(idx_ptr + js, mask=jmask, other=0)
    rows64 = rows.to(tl.int64)
    offs = rows64[:, None] * out + col[None, :]
    s = _load_scale(scale_ptr, HAS_SCALE, ACC)
    mcol = tl.zeros((BLOCK_K,), dtype=ACC)
    if MEM == 1:
        mcol = tl.load(mem_ptr + col, mask=jmask, other=0.0).to(ACC) * s
    g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(ACC)
    u = _add_memory(g, mem_ptr, rowdiv_ptr, offs, rows, rmask, m2, mcol, s, MEM, ACC)
    u = tl.where(tl.load(flag_ptr) != 0, float("nan"), u)
    u = tl.where(m2, u, 0.0)
    dst = dst_ptr + rows64[:, None] * k_pad + js[None, :]
    tl.store(dst, u.to(dst_ptr.dtype.element_ty), mask=rmask[:, None] & (js < k_pad)[None, :])


@triton.jit
def _residual_kernel(g_ptr, mem_ptr, rowdiv_ptr, scale_ptr, coef_ptr, sel_ptr, flag_ptr, dst_ptr,
                     res_ptr, n, out, k_pad,
                     MEM: tl.constexpr, SEL: tl.constexpr, HAS_SCALE: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One pass over a tile of U. SEL 0: column positions pos (out,) (-1: not kept), the kept
    # columns go to dst (n, k_pad) at their position; SEL 1: an entry mask (n, out), dst (n, out)
    # is the kept gradient. The residual goes to the memory: MEM 2 slot, in place; MEM 1 unit,
    # its column sums added into res (out,) for _unit_store_kernel; MEM 0 nowhere.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n
    cmask = cols < out
    m2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    offs = rows64[:, None] * out + cols[None, :]
    s = _load_scale(scale_ptr, HAS_SCALE, ACC)
    mcol = tl.zeros((BLOCK_C,), dtype=ACC)
    if MEM == 1:
        mcol = tl.load(mem_ptr + cols, mask=cmask, other=0.0).to(ACC) * s
    g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(ACC)
    u = _add_memory(g, mem_ptr, rowdiv_ptr, offs, rows, rmask, m2, mcol, s, MEM, ACC)
    u = tl.where(m2, u, 0.0)
    bad = tl.load(flag_ptr) != 0
    sent = tl.where(bad, float("nan"), u)
    if SEL == 0:
        pos = tl.load(sel_ptr + cols, mask=cmask, other=-1)
        keep = m2 & (pos >= 0)[None, :]
        dst = dst_ptr + rows64[:, None] * k_pad + pos[None, :]
        tl.store(dst, sent.to(dst_ptr.dtype.element_ty), mask=keep)
    else:
        keep = m2 & (tl.load(sel_ptr + offs, mask=m2, other=0) != 0)
        tl.store(dst_ptr + offs, tl.where(keep, sent, 0.0).to(dst_ptr.dtype.element_ty), mask=m2)
    resid = tl.where(keep, 0.0, u)
    if MEM == 2:
        coef = tl.load(coef_ptr).to(ACC)
        # a scalar condition broadcast by hand: the interpreter rejects a scalar in a mask
        ok = (offs * 0 + tl.load(flag_ptr)) == 0
        tl.store(mem_ptr + offs, (resid * coef).to(mem_ptr.dtype.element_ty), mask=m2 & ok)
    if MEM == 1:
        tl.atomic_add(res_ptr + cols, tl.sum(resid, axis=0), mask=cmask)


@triton.jit
def _unit_store_kernel(mem_ptr, src_ptr, pos_ptr, coef_ptr, flag_ptr, out,
                       HAS_POS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # memory (out,) <- coef * src, zero at the kept columns (pos >= 0); unchanged when non-finite
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < out
    v = tl.load(src_ptr + cols, mask=cmask, other=0.0).to(ACC)
    if HAS_POS:
        v = tl.where(tl.load(pos_ptr + cols, mask=cmask, other=-1) >= 0, 0.0, v)
    v = v * tl.load(coef_ptr).to(ACC)
    ok = (cols * 0 + tl.load(flag_ptr)) == 0
    tl.store(mem_ptr + cols, v.to(mem_ptr.dtype.element_ty), mask=cmask & ok)


# --- launcher -----------------------------------------------------------------------------------


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _blocks(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return dict(r=32, c=128, gr=64, gk=64, unit=1024, programs=4 * _multiprocessors(
            device.index if device.index is not None else torch.cuda.current_device()))
    # the interpreter runs every program in numpy: small blocks and several programs per kernel
    # so that the tests cross block edges and the atomic adds of row slices
    return dict(r=16, c=32, gr=16, gk=32, unit=32, programs=8)


def _row_divisors(g: Tensor, acc: torch.dtype, all_rows: bool) -> tuple[Tensor, Tensor | None]:
    """``(divisors (n,), n_active () or None)``: what a unit memory is divided by on each row
    when it is added back. ``all_rows``: n everywhere (the memory spread over the batch); else
    n_active on the rows with a non-zero entry (NaN counts) and inf on all-zero rows, which take
    nothing (padding-safe), all on the device."""
    n = g.shape[0]
    if all_rows:
        return torch.full((n,), n, dtype=acc, device=g.device), None
    active = g.ne(0).any(1)
    n_active = active.sum()
    inf = torch.full((), float("inf"), dtype=acc, device=g.device)
    return torch.where(active, n_active.to(acc), inf), n_active


def supports(grad_out: Tensor, x: Tensor, weight: Tensor, memory: Tensor | None,
             random_cols: Tensor | None, k: int, selection: int, alpha: float,
             slot: bool) -> bool:
    """Whether the kernels take this call; the PyTorch twin takes the rest (empty shapes, a
    memory that is not float32/float64 or not contiguous, a slot memory of another batch's shape,
    which ``SparseLinearFunction`` reshapes before it calls the op)."""
    n, out = grad_out.shape
    if n == 0 or out == 0 or x.shape[1] == 0 or k < 1:
        return False
    if grad_out.dtype not in _GRAD_DTYPES:
        return False
    if selection == RANDOM and k < out and random_cols is None:
        return False
    if memory is not None and alpha > 0:
        if memory.dtype not in _ACC or not memory.is_contiguous():
            return False
        if slot and (memory.dim() != 2 or memory.shape[0] != n):
            return False
    return True


def sparse_linear_backward(
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
    csr_ratio: float = 3.0,
    all_rows: bool = False,
    *,
    k_align: int = K_ALIGN,
) -> list[Tensor]:
    """``torch.ops.msbp.sparse_linear_backward`` through the Triton kernels: same arguments and
    results (grad_out (n, out), x (n, in), weight (out, in), memory (out,) or slot (n, out)
    updated in place; returns dx (n, in), dW (out, in) or its rows (r, in), db (out,), rows (r,),
    skipped ()), except that a non-finite gradient is flagged, not raised or sent densely (see
    the module docstring), and per-example ``rows`` is every row. ``csr_ratio`` is a CPU knob,
    unused here; ``k_align``: the kept width is padded to a multiple of it with zero columns.
    ``all_rows`` False (padding-safe, ``memory_rows="active"``): rows of G that are all zero take
    no memory; the twin takes a slot memory then (its zero rows keep their slots).
    """
    padding_safe_slot = slot and not all_rows and memory is not None and alpha > 0
    if padding_safe_slot or not supports(
        grad_out, x, weight, memory, random_cols, k, selection, alpha, slot
    ):
        from msbp.ops.sparse_linear import sparse_linear_backward_torch

        return sparse_linear_backward_torch(
            grad_out, x, weight, memory, random_cols, scale, k, selection, alpha, slot, need_x,
            need_w, need_b, compact_dw, skip_nonfinite, csr_ratio, all_rows)
    dev = grad_out.device
    n, out = grad_out.shape
    k = min(k, out)
    use_memory = memory is not None and alpha > 0
    acc = memory.dtype if use_memory else torch.promote_types(grad_out.dtype, torch.float32)
    ACC = _ACC[acc]
    per_example = selection == PER_EXAMPLE and k < out
    mem_mode = 0 if not use_memory else (2 if slot else 1)
    unit = mem_mode == 1
    g = grad_out.contiguous()
    x = x.contiguous()
    blk = _blocks(dev)
    long = dict(dtype=torch.long, device=dev)

    flag = torch.zeros((), dtype=torch.int32, device=dev)
    dummy = flag
    rowdiv, n_active = _row_divisors(g, acc, all_rows) if unit else (dummy, None)
    # a step without an active row leaves the memory as it was: kept here, put back at the end
    # on the device (no host read)
    before = memory.clone() if n_active is not None else None
    mem = memory if use_memory else dummy
    has_scale = scale is not None and use_memory  # the scale only reaches the memory terms
    sc = scale.reshape(()) if has_scale else dummy
    if use_memory:  # alpha / s on the device: a float kernel argument would be float32
        coef = torch.full((), alpha, dtype=acc, device=dev)
        if has_scale:
            coef = coef / sc.to(acc)
    need_score = not per_example and selection != RANDOM and k < out
    need_usum = unit and not per_example
    zeros = functools.partial(torch.zeros, dtype=acc, device=dev)
    sums = zeros(need_score + need_b + need_usum, out)  # one memset for the atomic sums
    score = sums[0] if need_score else dummy
    db = sums[int(need_score)] if need_b else torch.empty(0, dtype=acc, device=dev)
    usum = sums[-1] if need_usum else dummy
    absu = torch.empty(n, out, dtype=acc, device=dev) if per_example else dummy

    col_blocks = triton.cdiv(out, blk["c"])
    row_blocks = triton.cdiv(n, blk["r"])
    splits = max(1, min(row_blocks, triton.cdiv(blk["programs"], col_blocks)))
    rows_per_prog = triton.cdiv(row_blocks, splits) * blk["r"]
    splits = triton.cdiv(n, rows_per_prog)
    _score_kernel[(col_blocks, splits)](
        g, mem, rowdiv, sc, score, db if need_b else dummy, usum, absu, flag, n, out,
        rows_per_prog, MEM=mem_mode, HAS_SCALE=has_scale, NEED_SCORE=need_score, NEED_DB=need_b,
        NEED_USUM=need_usum, NEED_ABS=per_example, ACC=ACC, BLOCK_R=blk["r"], BLOCK_C=blk["c"])

    empty = x.new_empty(0)
    dx = dW = empty
    tiles = (row_blocks, col_blocks)
    if per_example:
        idx = torch.topk(absu, k, dim=1, sorted=False).indices  # (n, k)
        sel = torch.zeros(n, out, dtype=torch.int8, device=dev).scatter_(1, idx, 1)
        kept = torch.empty(n, out, dtype=x.dtype, device=dev)  # the propagated gradient
        res = zeros(out) if unit else dummy
        _residual_kernel[tiles](
            g, mem, rowdiv, sc, coef if use_memory else dummy, sel, flag, kept, res, n, out, out,
            MEM=mem_mode, SEL=1, HAS_SCALE=has_scale, ACC=ACC, BLOCK_R=blk["r"],
            BLOCK_C=blk["c"])
        if unit:
            _unit_store_kernel[(triton.cdiv(out, blk["unit"]),)](
                memory, res, dummy, coef, flag, out, HAS_POS=False, ACC=ACC, BLOCK=blk["unit"])
        if need_x:
            dx = kept @ weight
        if need_w:
            dW = (kept.t() @ x).to(weight.dtype)
        rows = torch.arange(out, **long)
    else:
        if k >= out:
            idx = torch.arange(out, **long)
        elif selection == RANDOM:
            idx = random_cols.to(dev).sort().values
        else:
            idx = torch.topk(score, k, sorted=False).indices.sort().values
        k_pad = triton.cdiv(k, k_align) * k_align
        pos = dummy
        if use_memory:
            pos = torch.full((out,), -1, dtype=torch.int32, device=dev)
            pos.scatter_(0, idx, torch.arange(k, dtype=torch.int32, device=dev))
        if mem_mode == 2:  # one pass over G and the memory: kept columns out, residual back
            kept = torch.zeros(n, k_pad, dtype=x.dtype, device=dev)
            _residual_kernel[tiles](
                g, mem, dummy, sc, coef, pos, flag, kept, dummy, n, out, k_pad,
                MEM=2, SEL=0, HAS_SCALE=has_scale, ACC=ACC, BLOCK_R=blk["r"], BLOCK_C=blk["c"])
        else:  # read only the k kept columns of G
            kept = torch.empty(n, k_pad, dtype=x.dtype, device=dev)
            _gather_kernel[(triton.cdiv(n, blk["gr"]), triton.cdiv(k_pad, blk["gk"]))](
                g, mem, rowdiv, sc, idx, flag, kept, n, out, k, k_pad,
                MEM=mem_mode, HAS_SCALE=has_scale, ACC=ACC, BLOCK_R=blk["gr"], BLOCK_K=blk["gk"])
            if unit:  # after the gather, which still read the old memory
                _unit_store_kernel[(triton.cdiv(out, blk["unit"]),)](
                    memory, usum, pos, coef, flag, out, HAS_POS=True, ACC=ACC,
                    BLOCK=blk["unit"])
        if need_x:
            w_k = weight.new_empty(k_pad, weight.shape[1])
            torch.index_select(weight, 0, idx, out=w_k[:k])
            w_k[k:].zero_()  # zero rows: a stray inf in a weight row must not meet a zero column
            dx = kept @ w_k  # (n, in)
        if need_w:
            dw_k = (kept.t() @ x)[:k]  # (k, in)
            if compact_dw:
                dW = dw_k.to(weight.dtype)
            else:
                dW = torch.zeros_like(weight).index_copy_(0, idx, dw_k.to(weight.dtype))
        rows = idx
    if not need_x:
        dx = empty
    if before is not None:
        torch.where(n_active > 0, memory, before, out=memory)
    return [dx, dW, db, rows, flag.to(torch.long)]
