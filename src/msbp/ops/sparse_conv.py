"""The sparse convolution op: exact forward, MSBP backward over output channels.

The output gradient G (N, C_out, *spatial) is read as rows = N x spatial positions and units =
output channels. Per backward call (``msbp.ops.reference.sparse_conv2d_backward_ref`` is the
oracle):

    U  = G + M * s           # unit: M (C_out,) spread as M / rows; slot: M (rows, C_out)
                             # (rows: the active ones, see msbp.ops.memory)
    S  = k channels of U     # unified: by the sum of |U| over N x spatial; random: at random
    dx, dW_S = conv backward of U_S with W_S    # a dense convolution of width k, not a mask
    M  = alpha * (U - U_S) / s
    db = G summed over N x spatial (dense, meProp)

With ``groups`` > 1 every group keeps ceil(k / groups) of its channels, so that the kept channels
are a grouped convolution again (a depthwise convolution, one channel per group, stays dense).
Per-example selection is not offered: each row (one position of one example) would keep its own
channels, and the result is no longer a convolution with a shared weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from msbp import native
from msbp.ops import scaling
from msbp.ops.memory import restore_memory_, spread_slot_memory_, store_memory_
from msbp.ops.selection import topk_by_index
from msbp.ops.sparse_linear import (
    BackwardPlan,
    forward_and_save,
    nonfinite_error,
    sparse_backward,
)
from msbp.ops.touched_rows import log_touched_rows, note_sparse_weight

PER_EXAMPLE_ERROR = (
    "selection='per_example' is not supported for convolutions: every row of the output "
    "gradient (one spatial position of one example) would keep its own output channels, which "
    "is no longer a convolution with one shared weight (so neither exact nor cheaper); use "
    "selection='unified' or 'random' for convolution layers (sparsify(..., config_fn=...) gives "
    "them their own config)"
)


@dataclass(frozen=True)
class ConvGeometry:
    """The integer geometry of a convolution (string padding already resolved)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def group_k(k: int, out_channels: int, groups: int) -> int:
    """Channels kept in each group: ceil(k / groups), at most out_channels / groups."""
    return min(out_channels // groups, -(-k // groups))


def channel_scores(u: Tensor) -> Tensor:
    """The sum of |u| per channel over N x spatial: (N, C_out, *sp) -> (C_out,), u's dtype."""
    return u.abs().sum([0, *range(2, u.dim())])


def select_channels(
    u: Tensor, kg: int, selection: str, groups: int, generator: torch.Generator | None,
    scores: Tensor | None = None,
) -> Tensor:
    """The kept channels (groups * kg,), ascending: kg per group of ``u`` (N, C_out, *sp);
    ``scores`` (C_out,), if given, are ``channel_scores(u)`` computed already."""
    c = u.shape[1]
    per = c // groups
    if selection == "random":
        parts = [
            torch.randperm(per, generator=generator, device=u.device)[:kg] + gi * per
            for gi in range(groups)
        ]
        idx = parts[0] if groups == 1 else torch.cat(parts)
    else:
        if scores is None:
            scores = channel_scores(u)  # (C_out,) in u's dtype (float32 or wider)
        top = topk_by_index(scores.view(groups, per), kg)[0]  # (groups, kg)
        if groups > 1:
            top = top + torch.arange(groups, device=u.device).unsqueeze(1) * per
        idx = top.reshape(-1)
    return idx.sort().values


def _channel_shape(u: Tensor) -> tuple[int, ...]:
    return (1, u.shape[1]) + (1,) * (u.dim() - 2)


def _to_rows(t: Tensor) -> Tensor:
    """(N, C, *sp) -> (rows, C), rows in (N, *sp) order (a copy unless channels-last)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _active_rows(g: Tensor) -> Tensor | None:
    """The rows (N x spatial positions) of ``g`` (N, C, *sp) with a non-zero (or non-finite)
    channel: (N, 1, *sp) bool, or None when all are (see ``msbp.ops.memory``)."""
    if (native.use_native(g.device) and not torch.compiler.is_compiling()
            and torch.ops.msbp.conv_all_positions_active(g)):
        # the common case without a pass over g (a full `ne(0).any(1)` cost about 30% of the
        # sparse backward of a 64 x 64 x 32 x 32 gradient)
        return None
    active = g.ne(0).any(1, keepdim=True)
    return None if bool(active.all()) else active


def _with_memory(
    grad_out: Tensor, memory: Tensor, slot: bool, scale: Tensor | None,
    active: Tensor | None = None,
) -> Tensor:
    """A new tensor ``grad_out`` + the memory (unit (C,) spread over the rows, slot (rows, C)),
    in the memory's dtype: one pass, no copy followed by an in-place add. With ``active``
    (N, 1, *sp): only the active rows take it (unit: divided by their number)."""
    m = memory if scale is None else memory * scale
    g = grad_out.to(memory.dtype)
    n_rows = g.numel() // g.shape[1]
    if active is not None:
        n_rows = int(active.sum())
        if n_rows == 0:
            return g.clone() if g is grad_out else g
    if slot:
        add = m.view(*g.movedim(1, -1).shape).movedim(-1, 1)
    else:
        add = (m / n_rows).view(_channel_shape(g))
    return g + (add if active is None else torch.where(active, add, 0))


def _store_memory_(
    memory: Tensor, u: Tensor, idx: Tensor | None, slot: bool, alpha: float,
    scale: Tensor | None, active: Tensor | None = None,
) -> None:
    """memory <- alpha * (u with the kept channels ``idx`` zeroed) / scale, summed per channel
    (unit) or row for row (slot). ``u`` (N, C, *sp) is scratch: slot zeroes it in place. With
    ``active`` (N, 1, *sp): unchanged when no row is active, zero rows keep their slots."""
    if slot:  # row for row, as a linear layer's slot memory
        residual = _to_rows(u.zero_() if idx is None else u.index_fill_(1, idx, 0))
        rows = None if active is None else _to_rows(active).reshape(-1)
        store_memory_(memory, residual, "slot", alpha, scale, rows)
        return
    if active is not None and not bool(active.any()):
        return
    # channels are independent: sum all, then zero the kept ones (no pass over u)
    value = u.sum([0, *range(2, u.dim())])
    if idx is None:
        value.zero_()
    else:
        value.index_fill_(0, idx, 0)
    torch.mul(value, alpha if scale is None else alpha / scale.double(), out=memory)


def _channels_last(t: Tensor) -> bool:
    """Whether ``t`` is 4-D in the channels-last layout (and not also plain contiguous)."""
    return (
        t.dim() == 4 and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    )


def _conv_backward(g: Tensor, x: Tensor, w: Tensor, geo: ConvGeometry, need_x: bool,
                   need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    d = x.dim() - 2
    dx, dw, _ = torch.ops.aten.convolution_backward(
        g, x, w, None, geo.stride, geo.padding, geo.dilation, False, [0] * d, geo.groups,
        [need_x, need_w, False],
    )
    return dx, dw


class SparseConvFunction(torch.autograd.Function):
    """``y = conv(x, W) + b`` (1-D or 2-D) with the MSBP backward over output channels; the
    memory tensor is updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, memory, plan: BackwardPlan, geo: ConvGeometry):
        ctx.geo = geo
        d = x.dim() - 2
        return forward_and_save(
            ctx, torch.convolution, x, weight, bias, memory, plan,
            geo.stride, geo.padding, geo.dilation, False, [0] * d, geo.groups,
        )

    @staticmethod
    @sparse_backward
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        plan: BackwardPlan = ctx.plan
        geo: ConvGeometry = ctx.geo
        memory: Tensor | None = ctx.memory
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        weight = ctx.weight
        c = w.shape[0]
        rows = grad_out.numel() // c
        sum_dims = [0, *range(2, grad_out.dim())]

        if rows == 0:  # an empty batch propagates nothing and leaves the memory as it is
            dx = torch.zeros_like(x, dtype=ctx.x_dtype) if need_x else None
            dW = torch.zeros_like(weight) if need_w else None
            db = torch.zeros(c, dtype=ctx.bias_dtype, device=x.device) if need_b else None
            return dx, dW, db, None, None, None

        kg = group_k(plan.k, c, geo.groups)
        if grad_out.is_meta:
            return _meta_backward(ctx, grad_out, x, w, kg)
        dense = kg * geo.groups >= c
        use_memory = memory is not None and plan.alpha > 0
        slot = plan.layout == "slot"
        scale = scaling.current_scale() if not torch.compiler.is_compiling() else None
        if use_memory and scale is not None:
            scaling.snapshot(memory)  # before the spread: a skipped step restores its shape
        # a new batch shape: the slot memory's sums spread over its rows (undone if no step)
        before = spread_slot_memory_(memory, rows) if use_memory and slot else None
        acc = memory.dtype if use_memory else torch.promote_types(grad_out.dtype, torch.float32)
        random_idx = None
        if not dense and plan.selection == "random":  # drawn whatever happens next, as linear
            random_idx = select_channels(grad_out, kg, "random", geo.groups, plan.generator)
        db = grad_out.sum(sum_dims, dtype=acc) if need_b else None
        # memory_rows="active": positions whose C_out gradients are all zero take no memory
        active = _active_rows(grad_out) if use_memory and not plan.all_rows else None
        # the fused native pass: scores and the unit memory's sums straight from grad_out and
        # the memory (no u = G + M / rows materialised); slot memory needs u itself
        fused = (
            not slot and active is None and grad_out.dtype == acc
            and acc in (torch.float32, torch.float64) and native.use_native(grad_out.device)
            and not torch.compiler.is_compiling()
        )
        u = shift = sums = scores = None
        if fused:
            if use_memory:
                shift = (memory if scale is None else memory * scale) / rows  # (C_out,)
            scores, sums = torch.ops.msbp.conv_channel_sums(grad_out, shift, use_memory)
        else:
            # u (N, C_out, *sp): a new tensor with the memory added, else grad_out (read only)
            u = (_with_memory(grad_out, memory, slot, scale, active) if use_memory
                 else grad_out.to(acc))
            scores = channel_scores(u)  # two passes; torch.isfinite(u).all() takes about five
        # a finite sum of |u| proves every entry finite (no extra pass); an infinite one may be
        # an overflow of finite entries, which the full check tells apart
        finite = bool(torch.isfinite(scores).all())
        if not finite:
            if u is None:
                u = _with_memory(grad_out, memory, slot, scale, active) if use_memory else grad_out
            finite = bool(torch.isfinite(u).all())
        if not finite:
            restore_memory_(memory, before)  # untouched: no sparse step takes place
            if not (plan.on_nonfinite == "skip" or scale is not None):
                raise nonfinite_error(plan, "output gradient", grad_out.shape)
            dx, dW = _conv_backward(grad_out.to(x.dtype), x, w, geo, need_x, need_w)
            log_touched_rows(weight, None)
            return (
                dx.to(ctx.x_dtype) if need_x else None,
                dW.to(weight.dtype) if need_w else None,
                db.to(ctx.bias_dtype) if need_b else None,
                None, None, None,
            )
        if dense:
            idx = None
            if u is None:
                u = _with_memory(grad_out, memory, slot, scale, active) if use_memory else grad_out
            u_k, w_k = u.to(x.dtype), w
        else:
            idx = random_idx if random_idx is not None else select_channels(
                grad_out, kg, plan.selection, geo.groups, None, scores
            )
            if fused:
                u_k = grad_out.index_select(1, idx)  # (N, k, *sp)
                if shift is not None:
                    u_k = u_k + shift[idx].view(_channel_shape(u_k))
                u_k = u_k.to(x.dtype)
            else:
                u_k = u.index_select(1, idx).to(x.dtype)  # (N, k, *sp)
            if _channels_last(grad_out):  # keep oneDNN on its faster channels-last kernels
                u_k = u_k.contiguous(memory_format=torch.channels_last)
            w_k = w.index_select(0, idx)  # (k, C_in / groups, *kernel)
        dx, dW_k = _conv_backward(u_k, x, w_k, geo, need_x, need_w)
        dW = None
        if need_w:
            log_touched_rows(weight, idx)
            dW_k = dW_k.to(weight.dtype)
            dW = dW_k if idx is None else torch.zeros_like(weight).index_copy_(0, idx, dW_k)
        if use_memory and sums is not None:  # fused: the residual's sums are ``sums`` minus kept
            if idx is None:
                sums.zero_()
            else:
                sums.index_fill_(0, idx, 0)
            torch.mul(sums, plan.alpha if scale is None else plan.alpha / scale.double(),
                      out=memory)
        elif use_memory:
            _store_memory_(memory, u, idx, slot, plan.alpha, scale, active)
        return (
            dx.to(ctx.x_dtype) if need_x else None,
            dW,
            db.to(ctx.bias_dtype) if need_b else None,
            None, None, None,
        )


def _meta_backward(ctx, grad_out: Tensor, x: Tensor, w: Tensor, kg: int) -> tuple:
    """The backward on the meta device, where there are shapes but no values to select by (what
    Lightning's ``measure_flops`` runs under ``FlopCounterMode``; the selection read values and
    failed there: "Tensor.item() cannot be called on meta tensors"): the k-wide convolutions of
    the first kg channels of each group, as the linear layer's meta backward; the memory is
    untouched."""
    geo: ConvGeometry = ctx.geo
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    per = w.shape[0] // geo.groups
    idx = (torch.arange(kg).unsqueeze(0) + torch.arange(geo.groups).unsqueeze(1) * per).reshape(-1)
    idx = idx.to(grad_out.device)
    dx, dW_k = _conv_backward(grad_out.index_select(1, idx).to(x.dtype), x, w.index_select(0, idx),
                              geo, need_x, need_w)
    dW = torch.zeros_like(ctx.weight).index_copy(0, idx, dW_k.to(ctx.weight.dtype)) if (
        need_w
    ) else None
    db = grad_out.sum([0, *range(2, grad_out.dim())]).to(ctx.bias_dtype) if need_b else None
    return dx.to(ctx.x_dtype) if need_x else None, dW, db, None, None, None


def sparse_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    memory: Tensor | None,
    plan: BackwardPlan,
    geo: ConvGeometry,
) -> Tensor:
    """``conv(x, W) + b`` with the MSBP backward of ``plan`` (x: (N, C_in, *sp) with 1 or 2
    spatial dims; weight: (C_out, C_in / groups, *kernel); memory: (C_out,) for ``unit``,
    (rows, C_out) for ``slot``, or None). Zero padding only: pad beforehand for other modes."""
    if plan.selection == "per_example":
        where = f" (layer {plan.name!r})" if plan.name else ""
        raise ValueError(PER_EXAMPLE_ERROR + where)
    note_sparse_weight(weight)
    return SparseConvFunction.apply(x, weight, bias, memory, plan, geo)
