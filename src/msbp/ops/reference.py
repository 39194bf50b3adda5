"""The oracle: selection and the MSBP backward of a linear layer, in short plain PyTorch.

Everything here works on masks and dense GEMMs, so it is slow but easy to read; the fast path in
``msbp.ops.autograd`` must give the same results. Shapes: ``n`` rows (all leading dimensions of the
input flattened), ``in`` input features, ``out`` output features, ``k`` kept units.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_ref(scores: Tensor, k: int, dim: int = -1) -> Tensor:
    """Indices of the k largest ``scores`` along ``dim``, equal scores taken lowest index first
    (the native kernels' rule; ``torch.topk`` leaves the order of ties unspecified, and exact
    ties are common in bfloat16)."""
    return torch.sort(scores, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)


def select_mask_ref(
    u: Tensor, k: int, selection: str, generator: torch.Generator | None = None
) -> Tensor:
    """Boolean mask (n, out) of the entries of ``u`` (n, out) that are propagated."""
    n, out = u.shape
    mask = torch.zeros(n, out, dtype=torch.bool, device=u.device)
    if k >= out:
        return mask.fill_(True)
    if selection == "unified":
        cols = topk_ref(u.abs().sum(0), k)  # (k,) by column sum of |u|
        mask[:, cols] = True
    elif selection == "per_example":
        idx = topk_ref(u.abs(), k, dim=1)  # (n, k) per row
        mask.scatter_(1, idx, True)
    elif selection == "random":
        cols = torch.randperm(out, generator=generator, device=u.device)[:k]  # (k,)
        mask[:, cols] = True
    else:
        raise ValueError(f"unknown selection {selection!r}")
    return mask


def memory_to_rows_ref(memory: Tensor, n: int, layout: str) -> Tensor:
    """The memory as an (n, out) addend to the output gradient.

    ``unit`` memory (out,) holds a batch sum and is spread evenly over the n rows; ``slot`` memory
    (r, out) is used row for row when r == n, else (new batch shape) spread evenly as well, which
    keeps the column sums, i.e. nothing is lost.
    """
    if layout == "unit":
        return memory.unsqueeze(0).expand(n, -1) / n
    if memory.shape[0] == n:
        return memory
    return (memory.sum(0) / n).unsqueeze(0).expand(n, -1)


def active_rows_ref(g: Tensor) -> Tensor:
    """(n,) bool: the rows of ``g`` (n, out) with an entry that is not zero (NaN, inf count)."""
    return (g != 0).any(1)


def sparse_linear_backward_ref(
    x: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    memory: Tensor | None,
    *,
    k: int,
    selection: str = "unified",
    alpha: float = 0.0,
    layout: str = "unit",
    generator: torch.Generator | None = None,
    rows: str = "active",
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """MSBP backward of ``y = x W^T + b``: returns ``(dx, dW, db, new_memory)``.

    x: (*, in); weight: (out, in); grad_out: (*, out); memory: (out,) for ``unit``, (r, out) for
    ``slot``, or None (no memory). dx: (*, in); dW: (out, in); db: (out,); new_memory like memory
    (slot: (n, out)); an empty batch (n = 0) returns zero gradients and the memory unchanged.

    ``rows="active"`` (``memory_rows``): the all-zero rows of the gradient are dropped, the
    backward below runs on the others, and the zero rows get dx = 0 and keep their slot memory
    (a slot memory of another batch shape is first spread evenly over all n rows); with no
    active row the memory is returned unchanged. ``rows="all"``: every row takes part.
    """
    out, d_in = weight.shape
    g = grad_out.reshape(-1, out)  # (n, out)
    n = g.shape[0]
    use_memory = memory is not None and alpha > 0
    if n == 0:  # an empty batch propagates nothing and leaves the memory as it is
        return torch.zeros_like(x), torch.zeros_like(weight, dtype=x.dtype), g.sum(0), memory
    if rows == "all":
        return _backward_all_rows(x, weight, grad_out, memory, k, selection, alpha, layout,
                                  generator)
    active = active_rows_ref(g)
    if use_memory and layout == "slot" and memory.shape[0] != n:
        memory = memory_to_rows_ref(memory, n, layout).clone()  # the new batch shape
    idx = active.nonzero().squeeze(1)  # (n_active,)
    x2 = x.reshape(-1, d_in)
    mem_a = memory
    if use_memory and layout == "slot":
        mem_a = memory[idx]
    dx_a, dW, _, new_a = _backward_all_rows(x2[idx], weight, g[idx], mem_a, k, selection, alpha,
                                           layout, generator)
    dx = torch.zeros(n, d_in, dtype=dx_a.dtype, device=dx_a.device).index_copy_(0, idx, dx_a)
    new_memory = memory
    if use_memory and idx.numel() > 0:
        new_memory = new_a if layout == "unit" else memory.clone().index_copy_(0, idx, new_a)
    return dx.reshape(x.shape), dW, g.sum(0), new_memory


def _backward_all_rows(x, weight, grad_out, memory, k, selection, alpha, layout, generator):
    """``sparse_linear_backward_ref`` with every row taking part (``rows="all"``)."""
    out, d_in = weight.shape
    x2 = x.reshape(-1, d_in)  # (n, in)
    g = grad_out.reshape(-1, out)  # (n, out)
    n = g.shape[0]
    acc = torch.promote_types(g.dtype, torch.float32)
    u = g.to(acc)  # (n, out) U = G + M
    if memory is not None and alpha > 0:
        u = u + memory_to_rows_ref(memory, n, layout).to(acc)
    mask = select_mask_ref(u, k, selection, generator)  # (n, out)
    g_hat = torch.where(mask, u, torch.zeros_like(u))  # (n, out) what is propagated
    g_hat_c = g_hat.to(x.dtype)
    dx = (g_hat_c @ weight).reshape(x.shape)  # (*, in)
    dW = g_hat_c.t() @ x2  # (out, in)
    db = g.sum(0)  # (out,) dense, from the raw gradient
    new_memory = memory  # alpha = 0: the memory is neither read nor written
    if memory is not None and alpha > 0:
        residual = alpha * (u - g_hat)  # (n, out) not propagated, decayed
        new_memory = residual.sum(0) if layout == "unit" else residual
        new_memory = new_memory.to(memory.dtype)
    return dx, dW, db, new_memory


class _LinearRef(torch.autograd.Function):
    """``h W^T + b`` whose backward is ``sparse_linear_backward_ref``; ``box[0]`` is the memory,
    replaced by the new one at every backward call."""

    @staticmethod
    def forward(ctx, h, weight, bias, box, options):
        ctx.save_for_backward(h, weight)
        ctx.box, ctx.options = box, options
        return torch.nn.functional.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        dh, dW, db, ctx.box[0] = sparse_linear_backward_ref(
            h, weight, grad_out, ctx.box[0], **ctx.options
        )
        # autograd rejects a gradient for an input that was None (bias=False)
        return dh, dW, db if ctx.needs_input_grad[2] else None, None, None


def sparse_linear_ref(
    h: Tensor, weight: Tensor, bias: Tensor | None, box: list, **options
) -> Tensor:
    """``h W^T + b`` (h: (n, in), weight: (out, in), bias: (out,) or None) as an autograd node
    whose backward is ``sparse_linear_backward_ref`` (``options``: its k, selection, alpha,
    layout, generator), reading and replacing the memory in ``box[0]`` at every backward call."""
    return _LinearRef.apply(h, weight, bias, box, options)


def lstm_recurrence_ref(
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    box: list,
    *,
    reverse: bool = False,
    **options,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction as a stepwise autograd graph: out (T, B, H), h_n, c_n.

    gates_x: (T, B, 4H) = x W_ih^T + b_ih; h0, c0: (B, H); w_hh: (4H, H). The recurrent transform
    of every step backpropagates with ``sparse_linear_backward_ref`` (``options``: its k,
    selection, alpha, layout, generator), reading and replacing the memory in ``box[0]`` once per
    step, from the last step to the first. The oracle of ``msbp.ops.recurrent``.
    """
    steps = gates_x.shape[0]
    h, c = h0, c0
    outputs: list[Tensor] = [h0] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        gates = gates_x[t] + sparse_linear_ref(h, w_hh, b_hh, box, **options)  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs[t] = h
    return torch.stack(outputs), h, c


# --- convolutions: rows = N x spatial positions, units = output channels ----------------------


def conv_group_k_ref(k: int, out_channels: int, groups: int) -> int:
    """Channels kept per group: ceil(k / groups), at most the group's out_channels / groups
    (so the kept channels still form a grouped convolution)."""
    return min(out_channels // groups, -(-k // groups))


def select_channels_ref(
    u: Tensor, k: int, selection: str, groups: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Boolean mask (C_out,) of the output channels of ``u`` (N, C_out, *spatial) propagated:
    ``conv_group_k_ref`` channels of every group, by the sum of ``|u|`` over N and the spatial
    positions (``unified``) or at random (``random``; one ``randperm`` for groups == 1, else one
    per group, in group order)."""
    c = u.shape[1]
    per = c // groups
    kg = conv_group_k_ref(k, c, groups)
    mask = torch.zeros(c, dtype=torch.bool, device=u.device)
    if kg >= per:
        return mask.fill_(True)
    if selection == "unified":
        scores = u.abs().transpose(0, 1).reshape(c, -1).sum(1)  # (C_out,)
        for gi in range(groups):
            mask[gi * per + torch.topk(scores[gi * per:(gi + 1) * per], kg).indices] = True
    elif selection == "random":
        for gi in range(groups):
            perm = torch.randperm(c if groups == 1 else per, generator=generator, device=u.device)
            mask[gi * per + perm[:kg]] = True
    else:
        raise ValueError(f"selection {selection!r} is not supported for convolutions")
    return mask


def sparse_conv2d_backward_ref(
    x: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    memory: Tensor | None,
    *,
    k: int,
    selection: str = "unified",
    alpha: float = 0.0,
    layout: str = "unit",
    generator: torch.Generator | None = None,
    rows: str = "active",
    stride: tuple[int, ...] = (1, 1),
    padding: tuple[int, ...] = (0, 0),
    dilation: tuple[int, ...] = (1, 1),
    groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """MSBP backward of ``y = conv(x, W) + b`` with a channel mask: ``(dx, dW, db, new_memory)``.

    x: (N, C_in, *spatial), 2-D (a Conv2d) or 1-D (a Conv1d) spatial; weight: (C_out, C_in /
    groups, *kernel); grad_out: (N, C_out, *spatial_out); memory: (C_out,) for ``unit`` (the
    residual summed over the N x spatial_out rows, spread back as M / rows), (r, C_out) for
    ``slot`` (rows in (N, *spatial_out) order), or None. The masked gradient goes through
    ``torch.nn.grad``'s dense convolution gradients. ``rows="active"`` as for
    ``sparse_linear_backward_ref``: the rows whose C_out gradients are all zero take no memory
    and keep their slot; M / n_active for ``unit``; no active row: the memory is unchanged.
    """
    c = weight.shape[0]
    n_rows = grad_out.numel() // c
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    u = grad_out.to(acc)  # (N, C_out, *sp)
    to_rows = lambda t: t.movedim(1, -1).reshape(n_rows, c)  # noqa: E731  (rows, C_out)
    from_rows = lambda t: t.reshape(*u.movedim(1, -1).shape).movedim(-1, 1)  # noqa: E731
    use_memory = memory is not None and alpha > 0
    active = torch.ones(n_rows, dtype=torch.bool, device=u.device)
    if rows == "active":
        active = active_rows_ref(to_rows(grad_out))
        if use_memory and layout == "slot" and memory.shape[0] != n_rows:
            memory = memory_to_rows_ref(memory, n_rows, layout).clone()
    n_active = int(active.sum())
    if use_memory and n_active > 0:
        if layout == "slot":
            addend = memory_to_rows_ref(memory, n_rows, layout)
        else:
            addend = (memory / n_active).unsqueeze(0).expand(n_rows, -1)
        addend = torch.where(active.unsqueeze(1), addend.to(acc), 0)  # (rows, C_out)
        u = u + from_rows(addend)
    keep = select_channels_ref(u, k, selection, groups, generator)  # (C_out,)
    shape = (1, c) + (1,) * (u.dim() - 2)
    g_hat = torch.where(keep.view(shape), u, torch.zeros_like(u))
    g_hat_c = g_hat.to(x.dtype)
    grad = torch.nn.grad
    conv_input, conv_weight = (
        (grad.conv2d_input, grad.conv2d_weight) if x.dim() == 4
        else (grad.conv1d_input, grad.conv1d_weight)
    )
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    dx = conv_input(x.shape, weight, g_hat_c, **geometry)
    dW = conv_weight(x, weight.shape, g_hat_c, **geometry)
    db = to_rows(grad_out).sum(0)  # (C_out,) dense, from the raw gradient
    new_memory = memory
    if use_memory and n_active > 0:
        residual = alpha * to_rows(u - g_hat)  # (rows, C_out)
        new_memory = residual.sum(0) if layout == "unit" else residual
        new_memory = new_memory.to(memory.dtype)
        if layout == "slot" and rows == "active":  # zero rows keep their slots
            new_memory = torch.where(active.unsqueeze(1), new_memory, memory)
    return dx, dW, db, new_memory
