"""Padding never changes a gradient or the memory (``memory_rows="active"``, the default).

Every test runs a batch twice over several steps, carrying the memory: trimmed, and padded
with rows whose output gradient is all zero (padding, masked tokens, ignored labels), and
requires the same dW, db, dx of the real rows (dx = 0 on the pad rows) and the same memory
(slot: the real rows' slots equal, the pad rows' slots untouched, here zero).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import msbp
import msbp.native
from msbp.ops.reference import sparse_linear_backward_ref
from msbp.ops.sparse_linear import SELECTION_CODES, _register_fake, sparse_linear_backward_torch

SELECTIONS = ("unified", "per_example", "random")
LAYOUTS = ("unit", "slot")
ALPHAS = (0.5, 0.8, 1.0)
TOL = dict(rtol=1e-10, atol=1e-12)  # float64: only the summation order may differ
STEPS = 3


def _native_op(*args):
    _register_fake()
    return torch.ops.msbp.sparse_linear_backward(*args)


def _reference_op(g, x, w, memory, cols, scale, k, selection, alpha, slot, *rest):
    """The reference with the op's signature: dense dW, rows = every row."""
    name = {v: s for s, v in SELECTION_CODES.items()}[selection]
    if name == "random" and k < w.shape[0]:
        name = "random_fixed"
    dx, dW, db, new = _ref(x, w, g, memory, k, name, alpha, "slot" if slot else "unit", cols)
    if memory is not None and alpha > 0:
        memory.resize_(new.shape).copy_(new)
    return [dx, dW, db, torch.arange(w.shape[0]), torch.zeros((), dtype=torch.long)]


def _ref(x, w, g, memory, k, selection, alpha, layout, cols):
    if selection != "random_fixed":
        return sparse_linear_backward_ref(
            x, w, g, memory, k=k, selection=selection, alpha=alpha, layout=layout)
    # the op's random columns: a generator that yields exactly ``cols`` first
    out = w.shape[0]
    perm = torch.cat([cols, torch.tensor([c for c in range(out) if c not in set(cols.tolist())],
                                         dtype=torch.long)])

    orig = torch.randperm
    try:
        torch.randperm = lambda *a, **kw: perm.clone()  # type: ignore[assignment]
        return sparse_linear_backward_ref(
            x, w, g, memory, k=k, selection="random", alpha=alpha, layout=layout)
    finally:
        torch.randperm = orig  # type: ignore[assignment]


OPS = {"reference": _reference_op, "torch": sparse_linear_backward_torch}
if os.environ.get("MSBP_BACKEND") != "python" and msbp.native.use_native():
    OPS["native"] = _native_op


def _pad_positions(n_real: int, n_pad: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Where the real rows go in a padded batch of n_real + n_pad rows (ascending), and the pad
    rows."""
    perm = torch.randperm(n_real + n_pad, generator=gen)
    real = perm[:n_real].sort().values
    pad = perm[n_real:].sort().values
    return real, pad


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_op_padding_changes_nothing(op, selection, layout, alpha):
    fn = OPS[op]
    gen = torch.Generator().manual_seed(7)
    n, n_pad, d_in, out, k = 6, 5, 9, 12, 3
    real, pad = _pad_positions(n, n_pad, gen)
    w = torch.randn(out, d_in, generator=gen, dtype=torch.float64)
    mem_t = torch.zeros((out,) if layout == "unit" else (n, out), dtype=torch.float64)
    mem_p = torch.zeros((out,) if layout == "unit" else (n + n_pad, out), dtype=torch.float64)
    for step in range(STEPS + 1):
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        g = torch.randn(n, out, generator=gen, dtype=torch.float64)
        if step == STEPS:  # an empty step: every row zero, nothing changes
            g.zero_()
        x_p = torch.randn(n + n_pad, d_in, generator=gen, dtype=torch.float64)
        x_p[real] = x
        g_p = torch.zeros(n + n_pad, out, dtype=torch.float64)
        g_p[real] = g
        if step % 2:  # pad rows of -0.0 are zero rows too
            g_p[pad] = -0.0
        cols = torch.randperm(out, generator=gen)[:k]
        before = mem_t.clone()
        res = {}
        for name, gg, xx, mem in (("trim", g, x, mem_t), ("pad", g_p, x_p, mem_p)):
            dx, dW, db, rows, _ = fn(
                gg, xx, w, mem, cols, None, k, SELECTION_CODES[selection], alpha,
                layout == "slot", True, True, True, False, False, 3.0,
            )
            res[name] = dx, dW, db, sorted(rows.tolist())
        (dx_t, dW_t, db_t, rows_t), (dx_p, dW_p, db_p, rows_p) = res["trim"], res["pad"]
        torch.testing.assert_close(dx_p[real], dx_t, **TOL)
        assert not dx_p[pad].any()
        torch.testing.assert_close(dW_p, dW_t, **TOL)
        torch.testing.assert_close(db_p, db_t, **TOL)
        assert rows_p == rows_t  # the same rows of dW touched (LazyRowAdam)
        if layout == "unit":
            torch.testing.assert_close(mem_p, mem_t, **TOL)
        else:
            torch.testing.assert_close(mem_p[real], mem_t, **TOL)
            assert not mem_p[pad].any()  # a zero row's slot keeps what it held
        if step == STEPS:
            torch.testing.assert_close(mem_t, before, rtol=0, atol=0)
            assert not dW_p.any() and not dx_p.any()


@pytest.mark.parametrize("selection", SELECTIONS)
def test_memory_rows_all_keeps_the_old_spread(selection):
    """memory_rows="all": M / rows onto every row, zero rows included (the old behaviour)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    g[1] = 0
    memory = torch.randn(6, generator=gen, dtype=torch.float64)
    cols = torch.randperm(6, generator=gen)[:2]
    dx, dW, _, _, _ = sparse_linear_backward_torch(
        g, x, w, memory.clone(), cols, None, 2, SELECTION_CODES[selection], 0.8, False,
        True, True, True, False, False, 3.0, True,
    )
    assert dx[1].any()  # the zero row got M / 5 back
    dx_a, _, _, _, _ = sparse_linear_backward_torch(
        g, x, w, memory.clone(), cols, None, 2, SELECTION_CODES[selection], 0.8, False,
        True, True, True, False, False, 3.0,
    )
    assert not dx_a[1].any()
    assert msbp.SparseBackpropConfig().memory_rows == "active"
    with pytest.raises(ValueError, match="memory_rows"):
        msbp.SparseBackpropConfig(memory_rows="some")


# --- layers: padded sequences, masked losses ----------------------------------------------------


def _configs(selections=SELECTIONS):
    """Every selection and layout; memory 0.8 by default, 0.5 and 1 in the slow run (the op
    tests above cover every alpha by default)."""
    for selection in selections:
        for layout in LAYOUTS:
            for alpha in ALPHAS:
                cfg = msbp.SparseBackpropConfig(k=3, selection=selection, memory=alpha,
                                                memory_layout=layout)
                marks = () if alpha == 0.8 else (pytest.mark.slow,)
                yield pytest.param(cfg, marks=marks, id=f"{selection}-{layout}-{alpha}")


def _same_grads(model_t, model_p):
    pairs = zip(model_t.named_parameters(), model_p.named_parameters(), strict=True)
    for (name, p_t), (_, p_p) in pairs:
        if p_t.grad is None:
            assert p_p.grad is None or not p_p.grad.any(), name
            continue
        torch.testing.assert_close(p_p.grad, p_t.grad, **TOL, msg=name)


def _layer_pair(make, seed=0):
    torch.manual_seed(seed)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("config", list(_configs()))
def test_linear_layer_padded_sequences(backend, config):
    """SparseLinear on (B, T, in) sequences padded in T and with all-pad batch entries; the loss
    reads the real tokens only. Covers the C++ fast path (native) and the PyTorch glue."""
    t_real, t_pad, b_real, b_pad = 4, 3, 3, 2
    lt, lp = _layer_pair(lambda: msbp.SparseLinear(5, 8, config=config, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    lengths = [4, 2, 3]
    for _ in range(STEPS):
        x = torch.randn(b_real, t_real, 5, generator=gen, dtype=torch.float64)
        target = torch.randn(b_real, t_real, 8, generator=gen, dtype=torch.float64)
        mask = torch.zeros(b_real, t_real, 1, dtype=torch.float64)
        for b, length in enumerate(lengths):
            mask[b, :length] = 1
        x_p = torch.randn(b_real + b_pad, t_real + t_pad, 5, generator=gen, dtype=torch.float64)
        x_p[:b_real, :t_real] = x
        tgt_p = torch.zeros(b_real + b_pad, t_real + t_pad, 8, dtype=torch.float64)
        tgt_p[:b_real, :t_real] = target
        mask_p = torch.zeros(b_real + b_pad, t_real + t_pad, 1, dtype=torch.float64)
        mask_p[:b_real, :t_real] = mask
        grads = []
        for layer, xx, tt, mm in ((lt, x, target, mask), (lp, x_p, tgt_p, mask_p)):
            layer.zero_grad(set_to_none=True)
            xx = xx.clone().requires_grad_()
            torch.manual_seed(10)  # random selection: the same draw for both
            ((layer(xx) - tt) ** 2 * mm).sum().backward()
            grads.append(xx.grad)
        _same_grads(lt, lp)
        torch.testing.assert_close(grads[1][:b_real, :t_real], grads[0], **TOL)
        assert not grads[1][b_real:].any() and not grads[1][:, t_real:].any()
        if config.memory_layout == "unit":
            torch.testing.assert_close(lp.memory, lt.memory, **TOL)
        else:  # rows in (B, T) order
            mp = lp.memory.view(b_real + b_pad, t_real + t_pad, 8)
            torch.testing.assert_close(mp[:b_real, :t_real].reshape(-1, 8), lt.memory, **TOL)
            assert not mp[b_real:].any() and not mp[:, t_real:].any()


def _mask(lengths, steps, batch, dim, time_major=False):
    """(B, T, dim) (or (T, B, dim)) float mask: 1 at the first lengths[b] steps of entry b."""
    m = torch.zeros(batch, steps, dim, dtype=torch.float64)
    for b, length in enumerate(lengths):
        m[b, :length] = 1
    return m.transpose(0, 1) if time_major else m


@pytest.mark.parametrize("config", list(_configs()))
def test_lstm_padded_steps_and_entries(backend, config):
    """SparseLSTM (native recurrence and the Python loop): extra time steps at the end and
    all-pad batch entries, the loss on the real tokens only (random selection: entries only, as
    it draws columns once per time step)."""
    b_real, b_pad, t_real = 3, 2, 4
    t_pad = 0 if config.selection == "random" else 2
    lengths = [4, 2, 3]

    def make():
        return msbp.SparseLSTM.from_dense(nn.LSTM(5, 6, batch_first=True, dtype=torch.float64),
                                          config)

    lt, lp = _layer_pair(make)
    gen = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        x = torch.randn(b_real, t_real, 5, generator=gen, dtype=torch.float64)
        tgt = torch.randn(b_real, t_real, 6, generator=gen, dtype=torch.float64)
        x_p = torch.randn(b_real + b_pad, t_real + t_pad, 5, generator=gen, dtype=torch.float64)
        x_p[:b_real, :t_real] = x
        tgt_p = torch.zeros(b_real + b_pad, t_real + t_pad, 6, dtype=torch.float64)
        tgt_p[:b_real, :t_real] = tgt
        xs = []
        for layer, xx, tt, bb, steps in ((lt, x, tgt, b_real, t_real),
                                         (lp, x_p, tgt_p, b_real + b_pad, t_real + t_pad)):
            layer.zero_grad(set_to_none=True)
            xx = xx.clone().requires_grad_()
            torch.manual_seed(100 + step)  # random selection: the same draws for both
            out, _ = layer(xx)
            ((out - tt) ** 2 * _mask(lengths, steps, bb, 1)).sum().backward()
            xs.append(xx.grad)
        _same_grads(lt, lp)
        torch.testing.assert_close(xs[1][:b_real, :t_real], xs[0], **TOL)
        assert not xs[1][b_real:].any() and not xs[1][:, t_real:].any()
        for name, mem_t in lt.named_memories():
            mem_p = dict(lp.named_memories())[name]
            if config.memory_layout == "unit":
                torch.testing.assert_close(mem_p, mem_t, **TOL, msg=name)
            elif name.startswith("memory_hh"):  # (B, 4H)
                torch.testing.assert_close(mem_p[:b_real], mem_t, **TOL, msg=name)
                assert not mem_p[b_real:].any()
            else:  # input transform: (T B, 4H) rows, time-major
                mp = mem_p.view(t_real + t_pad, b_real + b_pad, -1)
                torch.testing.assert_close(mp[:t_real, :b_real].reshape(mem_t.shape), mem_t,
                                           **TOL, msg=name)
                assert not mp[t_real:].any() and not mp[:, b_real:].any()


@pytest.mark.parametrize("config", list(_configs(("unified", "random"))))
def test_conv_padded_batch(config):
    """SparseConv2d: rows = N x H x W; extra images whose loss is ignored change nothing."""
    n_real, n_pad = 3, 2

    def make():
        return msbp.SparseConv2d.from_dense(
            nn.Conv2d(3, 8, 3, padding=1, dtype=torch.float64), config)

    lt, lp = _layer_pair(make)
    gen = torch.Generator().manual_seed(4)
    for step in range(STEPS):
        x = torch.randn(n_real, 3, 5, 5, generator=gen, dtype=torch.float64)
        tgt = torch.randn(n_real, 8, 5, 5, generator=gen, dtype=torch.float64)
        x_p = torch.randn(n_real + n_pad, 3, 5, 5, generator=gen, dtype=torch.float64)
        x_p[:n_real] = x
        tgt_p = torch.zeros(n_real + n_pad, 8, 5, 5, dtype=torch.float64)
        tgt_p[:n_real] = tgt
        mask_p = torch.zeros(n_real + n_pad, 1, 1, 1, dtype=torch.float64)
        mask_p[:n_real] = 1
        xs = []
        for layer, xx, tt, mm in ((lt, x, tgt, 1.0), (lp, x_p, tgt_p, mask_p)):
            layer.zero_grad(set_to_none=True)
            xx = xx.clone().requires_grad_()
            torch.manual_seed(200 + step)
            ((layer(xx) - tt) ** 2 * mm).sum().backward()
            xs.append(xx.grad)
        _same_grads(lt, lp)
        torch.testing.assert_close(xs[1][:n_real], xs[0], **TOL)
        assert not xs[1][n_real:].any()
        if config.memory_layout == "unit":
            torch.testing.assert_close(lp.memory, lt.memory, **TOL)
        else:  # rows in (N, H, W) order: the real images first
            rows = n_real * 25
            torch.testing.assert_close(lp.memory[:rows], lt.memory, **TOL)
            assert not lp.memory[rows:].any()


@pytest.mark.parametrize("config", list(_configs()))
def test_attention_key_padding(backend, config):
    """SparseMultiheadAttention: pad tokens masked by key_padding_mask and ignored by the loss
    give zero rows to the q, k, v and output projections: nothing changes."""
    l_real, l_pad, batch = 4, 2, 2
    lengths = [4, 3]

    def make():
        return msbp.SparseMultiheadAttention.from_dense(
            nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64), config)

    lt, lp = _layer_pair(make)
    gen = torch.Generator().manual_seed(5)
    for step in range(STEPS):
        x = torch.randn(batch, l_real, 8, generator=gen, dtype=torch.float64)
        tgt = torch.randn(batch, l_real, 8, generator=gen, dtype=torch.float64)
        x_p = torch.randn(batch, l_real + l_pad, 8, generator=gen, dtype=torch.float64)
        x_p[:, :l_real] = x
        tgt_p = torch.zeros(batch, l_real + l_pad, 8, dtype=torch.float64)
        tgt_p[:, :l_real] = tgt
        xs = []
        for layer, xx, tt, length in ((lt, x, tgt, l_real), (lp, x_p, tgt_p, l_real + l_pad)):
            layer.zero_grad(set_to_none=True)
            xx = xx.clone().requires_grad_()
            mask = _mask(lengths, length, batch, 1)
            torch.manual_seed(300 + step)
            out, _ = layer(xx, xx, xx, key_padding_mask=mask[..., 0] == 0)
            ((out - tt) ** 2 * mask).sum().backward()
            xs.append(xx.grad)
        _same_grads(lt, lp)
        torch.testing.assert_close(xs[1][:, :l_real], xs[0], **TOL)
        assert not xs[1][:, l_real:].any()
        for (name, mem_t), (_, mem_p) in zip(lt.named_memories(), lp.named_memories(), strict=True):
            if config.memory_layout == "unit":
                torch.testing.assert_close(mem_p, mem_t, **TOL, msg=name)
            else:  # rows in (L, N) order
                mp = mem_p.view(l_real + l_pad, batch, -1)
                torch.testing.assert_close(mp[:l_real].reshape(mem_t.shape), mem_t, **TOL,
                                           msg=name)
                assert not mp[l_real:].any()
