"""The autograd function of an LSTM's recurrence with an MSBP backward on its recurrent transform.

One call runs all T time steps of one layer and direction, so the backward is one node of the
autograd graph instead of a dozen per step: at the tagger's size (hidden 500, 32 sentences) the
per-step dispatch of a stepwise graph cost more than the sparse products it saved.

Forward, per step (PyTorch's gate order i, f, g, o; ``gates_x`` already holds ``x W_ih^T + b_ih``)::

    a   = gates_x[t] + b_hh + h_{t-1} W_hh^T     # (B, 4H)
    c_t = sig(f) c_{t-1} + sig(i) tanh(g);  h_t = sig(o) tanh(c_t)

Backward, per step from the last to the first: the cell's chain rule gives the gate gradient
``G_t`` (B, 4H), which is returned whole as the gradient of ``gates_x`` (the input transform
selects on its own, in its own ``SparseLinearFunction``). The recurrent transform is the MSBP
backward of ``h_{t-1} W_hh^T``, applied at every step with the memory updated every step::

    U = G_t + M;  S = select_k(U);  dh_{t-1} += U_S W_hh;  M = alpha * (U - U_S)

which is exactly what a stepwise graph of ``sparse_linear`` calls computes (the reference,
``msbp.ops.reference.lstm_recurrence_ref``). ``dW_hh`` is summed over the steps once at the end:
``sum_t U_S,t^T h_{t-1}``, a sparse product over the T B k kept entries; ``db_hh`` is the dense sum
of the raw ``G_t`` (meProp). Finiteness is checked once per call (on U's entries, never on a sum
of them, which overflows on finite values): on a non-finite gradient the memory is left as it
was, then either ``FloatingPointError`` is raised or (``on_nonfinite="skip"``) the whole backward
is redone densely from the raw gradients.

Two implementations of the backward, tested against each other and the reference: the native op
``msbp::lstm_recurrence_backward`` (``msbp/csrc/recurrent.cpp``: the whole time loop in C++, one
fused pass over the gates per step; float32 / float64 on the CPU, see ``_native_fits``) and the
Python loop below (``_backward_steps``), used elsewhere (autocast's 16-bit types, CUDA, probes,
``MSBP_BACKEND=python``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor

from msbp import native
from msbp.ops import scaling
from msbp.ops.memory import active_rows as _active_rows
from msbp.ops.memory import add_memory_ as _add_memory_
from msbp.ops.memory import spread_slot_memory_
from msbp.ops.memory import store_memory_ as _store_memory_
from msbp.ops.selection import UNIFIED_SELECTIONS, select, select_random
from msbp.ops.sparse_linear import (
    _DW_SPARSE_RATIO,
    _WIDE,
    BackwardPlan,
    _as,
    column_csr,
    group_columns,
    nonfinite_error,
    place_weight_rows,
    rows_product,
    sparse_backward,
)
from msbp.ops.sparse_linear import autocast_arg as _autocast_arg
from msbp.ops.sparse_linear import autocast_dtype as _autocast_dtype
from msbp.ops.sparse_linear import csr_pays as _csr_pays
from msbp.ops.touched_rows import forget_touched_rows, log_touched_rows

_W_HH = 3  # position of w_hh among the inputs of SparseLSTMRecurrence.forward
# grad * y (1 - y) and grad * (1 - y^2) for y = sigmoid(.), tanh(.): one op each
_SIGMOID_BWD = torch.ops.aten.sigmoid_backward
_TANH_BWD = torch.ops.aten.tanh_backward
_SIGMOID_BWD_OUT = torch.ops.aten.sigmoid_backward.grad_input
_TANH_BWD_OUT = torch.ops.aten.tanh_backward.grad_input


# MKL's GEMM with its right operand packed once (the op inductor's freezing uses), where this
# torch has it: the recurrence multiplies by the same W_hh^T at every step, and sgemm repacked
# it at each (at the tagger's 32 x 500 x 2,000 step: 869 against 672 us, packing once 473 us)
_MKL = torch.backends.mkl.is_available()
_MKL_LINEAR = getattr(torch.ops.mkl, "_mkl_linear", None) if _MKL else None
_MKL_PACK = getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None) if _MKL else None
# steps and rows from which packing W_hh repays itself (measured break-even: about 2.5 steps at
# 32 x 500 and 10 x 300 rows x hidden, 47 steps at one row)
_PACK_MIN_STEPS, _PACK_MIN_ROWS = 4, 8


def _packs_w_hh(gates_x: Tensor) -> bool:
    """Whether the recurrence runs its steps' products on W_hh^T packed once (float32 on the CPU,
    eager, enough steps and rows); both paths ask this, so that their bits stay the same."""
    return (
        _MKL_LINEAR is not None and _MKL_PACK is not None and gates_x.dtype == torch.float32
        and gates_x.is_cpu and gates_x.shape[0] >= _PACK_MIN_STEPS
        and gates_x.shape[1] >= _PACK_MIN_ROWS and not torch.compiler.is_compiling()
    )


def _lstm_steps(
    gates_x: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Tensor | None, reverse: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The recurrence, no autograd: (act (T, B, 4H) activated gates, cells (T, B, H),
    tanh of the cells (T, B, H), out (T, B, H)). The native one (``lstm_recurrence_forward``,
    the same ATen ops, bit for bit) where eager on the CPU."""
    packed = _packs_w_hh(gates_x)
    if (
        gates_x.is_cpu and not torch.compiler.is_compiling() and native.use_native()
        and native.eager_ops() is native.eager_module()
    ):
        return native.eager_module().lstm_recurrence_forward(
            gates_x, h0, c0, w_hh, b_hh, reverse, packed
        )
    steps, batch, four_h = gates_x.shape
    hidden = four_h // 4
    act = gates_x.new_empty(steps, batch, four_h)
    cells = gates_x.new_empty(steps, batch, hidden)
    tanh_c = torch.empty_like(cells)
    out = torch.empty_like(cells)
    h, c = h0, c0
    w_t = w_hh.t()
    w_packed = _MKL_PACK(w_hh, batch) if packed else None
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        a = act[t]  # (B, 4H)
        if packed:  # h W_hh^T + b_hh, then + gates_x[t]
            torch.add(gates_x[t], _MKL_LINEAR(h.contiguous(), w_packed, w_hh, b_hh, batch), out=a)
        else:
            # the bias added step by step into act (instead of into a (T, B, 4H) copy of
            # gates_x, which addmm then copied into act again: 0.6 of the tagger's 32 ms)
            if b_hh is not None:
                torch.add(gates_x[t], b_hh, out=a)
            else:
                a.copy_(gates_x[t])
            a.addmm_(h, w_t)
        a[:, : 2 * hidden].sigmoid_()  # i, f
        a[:, 2 * hidden : 3 * hidden].tanh_()  # g
        a[:, 3 * hidden :].sigmoid_()  # o
        i, f, g, o = a.chunk(4, dim=1)
        c = torch.mul(f, c, out=cells[t]).addcmul_(i, g)
        h = torch.mul(o, torch.tanh(c, out=tanh_c[t]), out=out[t])
    return act, cells, tanh_c, out


def _shifted(seq: Tensor, first: Tensor, reverse: bool) -> Tensor:
    """The previous step's value at every step: ``first`` (B, H) then ``seq`` (T, B, H) shifted
    by one in the direction of the recurrence."""
    if reverse:
        return torch.cat((seq[1:], first.unsqueeze(0)))
    return torch.cat((first.unsqueeze(0), seq[:-1]))


def _finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite: its minimum and maximum in one NaN-propagating
    pass. Unlike a sum, this never overflows on finite values (fp16 at 65504, float32 summed
    near 3e38)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


# the native op's codes for the selection rules
_SELECTION_CODES = {"unified": 0, "per_example": 1, "random": 2}


def _native_fits(act: Tensor, memory: Tensor | None, plan: BackwardPlan) -> bool:
    """Whether ``msbp::lstm_recurrence_backward`` runs this backward: float32 / float64 on the
    CPU, a contiguous memory of the same dtype, no probe (probes need every step's propagated
    gradient), a non-empty batch, and the native backend on."""
    return (
        act.dtype in _WIDE
        and act.shape[1] > 0
        and plan.probe is None
        # the op writes the memory through its data pointer: a strided one takes the loop
        and (memory is None or plan.alpha == 0 or (
            memory.dtype == act.dtype and memory.is_contiguous()
        ))
        and native.use_native(act.device)
    )


def _register_fake() -> None:
    """Give the native op its fake implementation (for torch.compile), once it exists: the op
    is defined by the C++ library, which is loaded at first use."""
    torch.library.register_fake("msbp::lstm_recurrence_backward", _lstm_recurrence_backward_fake)


# whether the running backward keeps its graph (retain_graph): a private binding; where a torch
# lacks it, the activations are never overwritten
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _may_overwrite_act(plan: BackwardPlan) -> bool:
    """Whether the native backward may write the gate gradients over the saved activations
    (``lstm_recurrence_backward_eager``, 15% of the layer's backward at the tagger's size):
    eager, no TorchDispatchMode, a backward that frees the graph (no ``retain_graph``), and no
    ``on_nonfinite="skip"`` (whose dense rerun reads the activations again)."""
    if torch.compiler.is_compiling() or plan.on_nonfinite == "skip":
        return False
    if native.eager_ops() is torch.ops.msbp or _keep_graph is None:
        return False
    return not _keep_graph()


def _rows_placed(weight: Tensor, buffer: tuple, cols: Tensor, dw: Tensor) -> bool:
    """``msbp::place_grad_rows_``: whether W_hh's rows (``cols``, values ``dw``) went straight
    into its ``.grad``; if that was None, the log of the gradient discarded is dropped."""
    discarded = weight.grad is None
    placed = native.eager_ops().place_grad_rows_(
        weight, buffer[0], buffer[1], cols, _as(dw, weight.dtype)
    )
    if placed != 1:
        return False
    if discarded:
        forget_touched_rows(weight)
    return True


def _native_backward(ctx, saved: tuple[Tensor, ...], d_out: Tensor | None, d_hn: Tensor | None,
                     d_cn: Tensor | None, buffer: tuple[Tensor, Tensor] | None = None):
    """SparseLSTMRecurrence.backward as one native op (``msbp/csrc/recurrent.cpp``); ``saved``:
    ``ctx.saved_tensors``, unpacked once by the caller (``checkpoint(use_reentrant=False)``
    allows one unpack per backward); ``buffer``: W_hh's kept gradient buffer and state, for
    ``msbp::place_grad_rows_``."""
    act, cells, tanh_c, out, h0, c0, w = saved
    plan: BackwardPlan = ctx.plan
    memory: Tensor | None = ctx.memory
    gx_dtype, h0_dtype, c0_dtype, b_dtype = ctx.dtypes
    need_gx, need_h0, need_c0, need_w, need_b = ctx.needs_input_grad[:5]
    steps, _, four_h = act.shape
    random_cols = None
    if plan.selection == "random" and plan.k < four_h:
        # the Python loop's draws, one per step in the order it visits them
        random_cols = torch.stack(
            [select_random(act[0], plan.k, plan.generator) for _ in range(steps)]
        )
    args = (
        act, cells, tanh_c, out, h0, c0, w, d_out, d_hn, d_cn,
        memory if plan.alpha > 0 else None, random_cols, plan.k,
        _SELECTION_CODES[plan.selection], plan.alpha, plan.layout == "slot", ctx.reverse,
        need_w, plan.on_nonfinite == "skip", plan.all_rows,
    )
    try:
        if _may_overwrite_act(plan):
            ctx.act_overwritten = True
            outputs = native.eager_ops().lstm_recurrence_backward_eager(*args, True)
        else:
            outputs = torch.ops.msbp.lstm_recurrence_backward(*args)
        dgates, dh0, dc0, cols, dw, db, _ = outputs
    except RuntimeError as exc:
        if "msbp-nonfinite" in str(exc):
            raise nonfinite_error(plan, "gate gradient", act.shape) from None
        raise
    d_w = None
    if need_w:
        if plan.k >= four_h:
            if not torch.compiler.is_compiling():
                log_touched_rows(ctx.weight, None)
            d_w = _as(dw, ctx.weight.dtype)
        elif buffer is not None and plan.grad_inplace and not torch.compiler.is_compiling() and (
            _rows_placed(ctx.weight, buffer, cols, dw)
        ):  # the rows went straight into .grad: no dW for autograd
            log_touched_rows(ctx.weight, cols)
        else:  # k rows per step (all rows, in order, if a non-finite gradient was skipped)
            d_w = place_weight_rows(ctx, ctx.weight, _W_HH, cols, dw, plan.grad_inplace)
    return (
        _as(dgates, gx_dtype) if need_gx else None,
        _as(dh0, h0_dtype) if need_h0 else None,
        _as(dc0, c0_dtype) if need_c0 else None,
        d_w,
        _as(db, b_dtype) if need_b else None,
        None, None, None, None,
    )


def _meta_backward(ctx, saved: tuple[Tensor, ...]) -> tuple:
    """The backward on the meta device, where there are shapes but no values to select by (what
    Lightning's ``measure_flops`` runs under ``FlopCounterMode``): each step's products of the
    first min(k, 4H) gate columns, the shapes a CPU run gives them (its FLOP count); the memory
    is untouched."""
    act, _, _, out, h0, _, w = saved
    gx_dtype, h0_dtype, c0_dtype, b_dtype = ctx.dtypes
    need_gx, need_h0, need_c0, need_w, need_b = ctx.needs_input_grad[:5]
    steps, batch, four_h = act.shape
    k = min(ctx.plan.k, four_h)
    dgates = act.new_empty(steps, batch, four_h)
    h_prev = _shifted(out, h0, ctx.reverse)
    dh = h0.new_empty(h0.shape)
    dw = w.new_zeros(four_h, w.shape[1])
    for t in range(steps):
        dh = dgates[t, :, :k] @ w[:k]  # (B, H)
        if need_w:
            dw[:k] += dgates[t, :, :k].t() @ h_prev[t]
    return (
        _as(dgates, gx_dtype) if need_gx else None,
        _as(dh, h0_dtype) if need_h0 else None,
        act.new_empty(h0.shape, dtype=c0_dtype) if need_c0 else None,
        _as(dw, ctx.weight.dtype) if need_w else None,
        act.new_empty(four_h, dtype=b_dtype) if need_b else None,
        None, None, None, None,
    )


def _lstm_recurrence_backward_fake(
    act, cells, tanh_c, out, h0, c0, w_hh, d_out, d_hn, d_cn, memory, random_cols, k,
    selection, alpha, slot, reverse, need_w, skip_nonfinite, all_rows=False,
):
    steps, batch, four_h = act.shape
    hidden = four_h // 4
    if not need_w:
        rows = 0
    elif k >= four_h:
        rows = four_h
    else:  # the distinct kept columns of all steps
        rows = torch.library.get_ctx().new_dynamic_size()
    return (
        act.new_empty(steps, batch, four_h),  # gate gradients
        act.new_empty(batch, hidden),  # dh0
        act.new_empty(batch, hidden),  # dc0
        act.new_empty(rows, dtype=torch.long),  # the kept columns, ascending
        act.new_empty(rows, hidden),  # those rows
        act.new_empty(four_h),  # db
        act.new_empty((), dtype=torch.long),  # 1 if a non-finite gradient was skipped
    )


native.on_load(_register_fake)


def _flops(act, cells, tanh_c, out, h0, c0, w_hh, d_out, d_hn, d_cn, memory, random_cols, k,
           selection, alpha, slot, reverse, need_w, *args, out_shape=None, **kwargs) -> int:
    """The op's products for ``FlopCounterMode``, from its inputs' shapes: each of T steps
    2 B min(k, 4H) H for the recurrent input gradient and as many for W_hh's kept rows."""
    steps, batch, four_h = act
    return 2 * steps * batch * min(k, four_h) * w_hh[1] * (1 + int(need_w))


native.on_load(lambda: native.register_flop_formula("lstm_recurrence_backward", _flops))


class SparseLSTMRecurrence(torch.autograd.Function):
    """All steps of one LSTM layer and direction; MSBP backward on the recurrent transform.

    Inputs: gates_x (T, B, 4H) = x W_ih^T + b_ih; h0, c0 (B, H); w_hh (4H, H); b_hh (4H,) or
    None; memory of the recurrent transform ((4H,) unit / (rows, 4H) slot, updated in place by
    backward) or None; the plan; reverse. Outputs: out (T, B, H), h_n (B, H), c_n (B, H).
    """

    @staticmethod
    def forward(ctx, gates_x, h0, c0, w_hh, b_hh, memory, plan: BackwardPlan, reverse: bool,
                grad_buffer: tuple[Tensor, Tensor] | None = None):
        cast = _autocast_dtype(gates_x.device.type)
        # autocast's rule, as for the input transform: a float64 layer stays float64 (as
        # nn.LSTM does); cast to bfloat16 its output met the next layer's float64 W_ih
        dtype = gates_x.dtype if cast is None else _autocast_arg(gates_x, cast).dtype
        # (autocast off here only where it is on: the meta device has none to turn off)
        with torch.autocast(gates_x.device.type, enabled=False) if cast else nullcontext():
            gx, h0c, c0c, w = (_as(t, dtype) for t in (gates_x, h0, c0, w_hh))
            b = _as(b_hh, dtype) if b_hh is not None else None
            act, cells, tanh_c, out = _lstm_steps(gx, h0c, c0c, w, b, reverse)
        ctx.save_for_backward(act, cells, tanh_c, out, h0c, c0c, w)
        ctx.memory = memory  # state, mutated by backward: kept out of save_for_backward
        ctx.plan = plan
        ctx.reverse = reverse
        ctx.weight = w_hh
        # (kept buffer, state) of msbp.functional.kept_grad_buffer: the native backward adds
        # dW_hh's rows into .grad itself where it may (msbp::place_grad_rows_)
        ctx.grad_buffer = grad_buffer
        ctx.dtypes = (gates_x.dtype, h0.dtype, c0.dtype, b_hh.dtype if b_hh is not None else None)
        last = 0 if reverse else out.shape[0] - 1
        return out, out[last].clone(), cells[last].clone()

    @staticmethod
    @sparse_backward
    def backward(ctx, d_out, d_hn, d_cn):
        if getattr(ctx, "act_overwritten", False):  # a backward that failed, run again
            raise RuntimeError(
                "msbp: this graph's SparseLSTM backward already ran once without "
                "retain_graph=True (it wrote the gate gradients over its saved activations); "
                "run the forward pass again"
            )
        saved = ctx.saved_tensors
        act, cells, tanh_c, out, h0, c0, w = saved
        plan: BackwardPlan = ctx.plan
        memory: Tensor | None = ctx.memory
        # the graph outlives this backward: it must not keep the buffer, or the next step sees
        # it held and cannot put it back
        buffer, ctx.grad_buffer = ctx.grad_buffer, None
        # under msbp.amp.GradScaler: the memory kept unscaled (the Python loop scales it)
        ctx.scale = None if torch.compiler.is_compiling() else scaling.current_scale()
        if (
            torch.compiler.is_compiling() and memory is not None and plan.alpha > 0
            and plan.layout == "slot" and memory.shape[0] != act.shape[1]
        ):
            # a slot memory of another batch shape (its first step, a new batch size): the
            # native op resizes it in place, which a traced graph cannot write back (it copied
            # the op's result into the memory's old shape and raised). The spread here breaks
            # the graph as SparseLinear's does, so that this layer's backward runs eagerly
            spread_slot_memory_(memory, act.shape[1])
        if act.is_meta:
            return _meta_backward(ctx, saved)
        if ctx.scale is None and _native_fits(act, memory, plan):
            return _native_backward(ctx, saved, d_out, d_hn, d_cn, buffer)
        if ctx.scale is not None and memory is not None and plan.alpha > 0:
            scaling.snapshot(memory)
        gx_dtype, h0_dtype, c0_dtype, b_dtype = ctx.dtypes
        need_gx, need_h0, need_c0, need_w, need_b = ctx.needs_input_grad[:5]
        steps, batch, four_h = act.shape
        hidden = four_h // 4
        use_memory = memory is not None and plan.alpha > 0
        # k >= 4H keeps every entry, but a memory left by backward passes at a smaller k (a k
        # schedule, a loaded checkpoint) must still be added in and propagated, as SparseLinear
        # does at k = out: the loop with the memory does that at its first step. Only an empty
        # memory allows the dense loop. The host read is paid at k >= 4H only; a traced
        # backward cannot read it and always takes the loop with the memory.
        dense = plan.k >= four_h and not (
            use_memory and (torch.compiler.is_compiling() or bool(memory.any()))
        )
        zeros = out.new_zeros(batch, hidden)
        d_out = d_out if d_out is not None else out.new_zeros(out.shape)
        d_hn = _as(d_hn, out.dtype) if d_hn is not None else zeros
        d_cn = _as(d_cn, out.dtype) if d_cn is not None else zeros
        h_prev = _shifted(out, h0, ctx.reverse)  # (T, B, H)
        c_prev = _shifted(cells, c0, ctx.reverse)
        # the cell's local derivatives at every step at once: a few large ops instead of T small
        # ones; aten's sigmoid/tanh backward ops give each factor in one pass
        i, f, g, o = act.chunk(4, dim=2)
        dh_to_do = _SIGMOID_BWD(tanh_c, o)  # (T, B, H): d o_pre = dh * this
        dh_to_dc = _TANH_BWD(o, tanh_c)  # (T, B, H): dc += dh * this
        dc_to_dgates = act.new_empty(steps, batch, 3, hidden)  # d [i f g]_pre = dc * this
        _SIGMOID_BWD_OUT(g, i, grad_input=dc_to_dgates[:, :, 0])
        _SIGMOID_BWD_OUT(c_prev, f, grad_input=dc_to_dgates[:, :, 1])
        _TANH_BWD_OUT(i, g, grad_input=dc_to_dgates[:, :, 2])

        parts = (ctx, d_out, d_hn, d_cn, dh_to_do, dh_to_dc, dc_to_dgates, f, w)
        if batch == 0:  # an empty batch propagates nothing and leaves the memory as it is
            grads = _backward_steps(*parts, dense=True, raw=True)
        else:
            saved = memory.clone() if use_memory and not dense else None
            grads = _backward_steps(*parts, dense=dense)
            if not _finite(grads.witness()):
                if saved is not None:  # leave the memory as it was before this backward
                    memory.resize_(saved.shape).copy_(saved)
                if plan.on_nonfinite == "raise" and ctx.scale is None:
                    raise nonfinite_error(plan, "gate gradient", act.shape)
                grads = _backward_steps(*parts, dense=True, raw=True)
            elif dense and use_memory:
                # an empty memory, everything propagated: it stays empty (slot: of this batch)
                if plan.layout == "slot":
                    memory.resize_(batch, four_h)
                memory.zero_()
        dgates = grads.dgates  # (T, B, 4H)
        g2 = dgates.view(-1, four_h)  # (T B, 4H)
        h2 = h_prev.reshape(-1, hidden)  # (T B, H)
        if plan.probe is not None:
            plan.probe(g2, h2, grads.propagated_dense(g2))
        d_w = None
        if need_w:
            d_w = grads.weight_grad(ctx, g2, h2)
        d_b = None
        if need_b:
            d_b = _as(g2.sum(0, dtype=torch.promote_types(g2.dtype, torch.float32)), b_dtype)
        return (
            _as(dgates, gx_dtype) if need_gx else None,
            _as(grads.dh, h0_dtype) if need_h0 else None,
            _as(grads.dc, c0_dtype) if need_c0 else None,
            d_w, d_b, None, None, None, None,
        )


class _StepGrads:
    """What the backward loop produced: gate gradients, dh0, dc0, and the propagated entries of
    every step (columns and values), from which the recurrent weight gradient is formed."""

    def __init__(self, dgates: Tensor, dense: bool, per_example: bool, time_reversed: bool):
        self.dgates = dgates  # (T, B, 4H) raw gate gradients, in time order
        self.dense = dense
        self.per_example = per_example
        self.time_reversed = time_reversed  # the loop visits the last time step first
        self.idx: list[Tensor] = []  # per visited step: (B, k) columns, or (k,) for the batch
        self.vals: list[Tensor] = []  # per visited step: (B, k) propagated values
        # per visited step: the kept |u| (per-example), or u's minimum and maximum
        self.witnesses: list[Tensor] = []
        # per visited step: (B,) bool of the rows with a non-zero gate gradient, None for all
        self.active: list[Tensor | None] = []
        self.dh = self.dc = dgates[0, :, :0]  # (B, H) each, set at the end of the loop

    def witness(self) -> Tensor:
        """All finite exactly when every step's selection input was."""
        if self.dense:
            return self.dgates
        return torch.cat([w.reshape(-1) for w in self.witnesses])

    def _stacked(self) -> tuple[Tensor, Tensor]:
        """Columns ((T, B, k) or (T, k)) and values (T, B, k) of all steps, in time order."""
        idx, vals = torch.stack(self.idx), torch.stack(self.vals)
        if self.time_reversed:
            idx, vals = idx.flip(0), vals.flip(0)
        return idx, vals

    def propagated_dense(self, g2: Tensor) -> Tensor:
        """The propagated gradient (T B, 4H), for information-loss probes only."""
        if self.dense:
            return g2
        idx, vals = self._stacked()
        steps, batch, k = vals.shape
        idx = idx.expand(steps, batch, k) if idx.dim() == 3 else idx.unsqueeze(1).expand_as(vals)
        return torch.zeros_like(g2).scatter_(1, idx.reshape(-1, k), _as(vals, g2.dtype).view(-1, k))

    def weight_grad(self, ctx, g2: Tensor, h2: Tensor) -> Tensor | None:
        """dW_hh (4H, H): the propagated entries of all steps times h_{t-1}, ``h2`` (T B, H);
        written into ``weight.grad`` directly where allowed (then None is returned)."""
        weight = ctx.weight
        four_h, hidden = weight.shape
        if self.dense:
            log_touched_rows(weight, None)
            return _as(g2.t() @ h2, weight.dtype)
        idx, vals = self._stacked()
        steps, batch, k = vals.shape
        vals = _as(vals, h2.dtype)
        if not self.per_example:  # k columns per step: dense (k, B) x (B, H) products
            rows = torch.bmm(vals.transpose(1, 2), h2.view(steps, batch, hidden))  # (T, k, H)
            cols, pos = torch.unique(idx, sorted=True, return_inverse=True)  # (c,), (T, k)
            dw_c = h2.new_zeros(cols.numel(), hidden).index_add_(
                0, pos.reshape(-1), rows.view(-1, hidden))
        else:
            idx, vals = idx.reshape(-1, k), vals.reshape(-1, k)  # (T B, k)
            if any(a is not None for a in self.active):  # zero rows kept nothing
                ones = torch.ones(batch, dtype=torch.bool, device=idx.device)
                act = torch.stack([ones if a is None else a for a in self.active])
                act = (act.flip(0) if self.time_reversed else act).reshape(-1)  # (T B,)
                idx, vals, h2 = idx[act], vals[act], h2[act]
            groups = group_columns(idx)
            cols = groups[1]  # (c,) distinct columns, sorted
            if _csr_pays(h2, k, cols.numel(), _DW_SPARSE_RATIO):
                dw_c = torch.sparse.mm(column_csr(groups, vals), h2)  # (c, H): T B k H
            else:
                g_c = torch.zeros(h2.shape[0], cols.numel(), dtype=h2.dtype, device=h2.device)
                dw_c = g_c.scatter_(1, torch.searchsorted(cols, idx), vals).t() @ h2
        return place_weight_rows(ctx, weight, _W_HH, cols, dw_c, ctx.plan.grad_inplace)


def _backward_steps(
    ctx, d_out: Tensor, d_hn: Tensor, d_cn: Tensor, dh_to_do: Tensor, dh_to_dc: Tensor,
    dc_to_dgates: Tensor, f: Tensor, w: Tensor, *, dense: bool, raw: bool = False,
) -> _StepGrads:
    """The loop over time steps, last to first. ``dense``: every gate gradient is propagated;
    ``raw``: the memory is neither read nor written (empty batches, the non-finite fallback)."""
    plan: BackwardPlan = ctx.plan
    memory: Tensor | None = ctx.memory
    steps, batch, _, hidden = dc_to_dgates.shape
    four_h = 4 * hidden
    k = plan.k
    use_memory = memory is not None and plan.alpha > 0 and not raw
    scale = getattr(ctx, "scale", None)
    dgates = d_out.new_empty(steps, batch, four_h)
    # k >= 4H without the dense loop (a memory to flush): every column of every step is kept,
    # whatever the selection, and random selection draws nothing (as the reference)
    keep_all = k >= four_h
    per_example = plan.selection not in UNIFIED_SELECTIONS and not keep_all
    grads = _StepGrads(dgates, dense, per_example, time_reversed=not ctx.reverse)
    fast_rows = w.device.type == "cpu" and w.dtype in _WIDE
    unit_memory = use_memory and plan.layout == "unit"
    # memory_rows="active": zero rows of a step's gate gradient take no memory, select nothing
    track = not dense and not plan.all_rows and (use_memory or per_example)
    if use_memory and plan.layout == "slot" and not dense:
        # a new batch shape: the column sums spread evenly over all rows (as SparseLinear); the
        # caller's copy of the memory undoes it on a non-finite gradient. The dense loop never
        # reads the memory (empty, it is resized after a finite pass) and its caller keeps no
        # copy: a spread there outlived a non-finite gradient's raise
        spread_slot_memory_(memory, batch)
    # per-step views made once: indexing inside the loop costs a dispatch each
    d_outs, to_dc, to_do, forget, gates = (
        t.unbind(0) for t in (d_out, dh_to_dc, dh_to_do, f, dgates)
    )
    dh, dc = d_hn, d_cn
    for t in range(steps) if ctx.reverse else range(steps - 1, -1, -1):
        dh = d_outs[t] + dh  # (B, H): from the output and from step t + 1
        dc = torch.addcmul(dc, dh, to_dc[t])
        gate = gates[t]  # (B, 4H)
        ifg = gate[:, : 3 * hidden].view(batch, 3, hidden)
        torch.mul(dc_to_dgates[t], dc.unsqueeze(1), out=ifg)
        torch.mul(dh, to_do[t], out=gate[:, 3 * hidden :])
        dc = dc * forget[t]
        if dense:
            dh = gate @ w
            continue
        active = _active_rows(gate) if track else None
        grads.active.append(active)
        if scale is not None and use_memory:  # U = G + M s (the memory is unscaled)
            u = _add_memory_(gate.to(memory.dtype, copy=True), memory * scale, plan.layout,
                             active)
        elif unit_memory and active is None:  # U = G + M / B in one op
            u = torch.add(gate.to(memory.dtype), memory, alpha=1.0 / batch)
        elif use_memory:
            u = _add_memory_(gate.to(memory.dtype, copy=True), memory, plan.layout, active)
        else:
            u = gate
        if keep_all:
            idx, witness = torch.arange(four_h, device=u.device), u
        else:
            idx, witness = select(u, k, plan.selection, plan.generator)
        if per_example:  # the kept |u|: a NaN or inf always wins a slot
            grads.witnesses.append(witness)
        else:  # u's extremes: a column score (a sum) may overflow where u does not
            grads.witnesses.extend(torch.aminmax(u))
        if per_example:
            vals = u.gather(1, idx)  # (B, k)
            v = _as(vals, w.dtype)
            if fast_rows:
                dh = rows_product(idx, v, w)  # (B, H)
            else:
                dh = torch.zeros(batch, four_h, dtype=w.dtype, device=w.device).scatter_(
                    1, idx, v) @ w
            if use_memory:
                _store_memory_(memory, u.scatter_(1, idx, 0), plan.layout, plan.alpha, scale,
                               active)
        else:  # idx: (k,) columns for the whole batch
            vals = u.index_select(1, idx)  # (B, k)
            dh = _as(vals, w.dtype) @ w.index_select(0, idx)
            if use_memory:
                _store_memory_(memory, u.index_fill_(1, idx, 0), plan.layout, plan.alpha, scale,
                               active)
        grads.idx.append(idx)
        grads.vals.append(vals)
    grads.dh, grads.dc = dh, dc
    return grads
