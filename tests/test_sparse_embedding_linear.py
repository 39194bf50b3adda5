"""sparse_embedding_linear: a sparse linear layer fed by embedding rows side by side, whose fused
native backward gives the table its gradient from dx's k-wide factors. Checked against the
reference oracle (embedding, then the reference sparse backward, then the embedding's
chain rule) and against the unfused composition."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import DTYPES, dtype_id, make_cfg, ref_step, tol
from hypothesis import given, settings
from hypothesis import strategies as st

import msbp
import msbp.native
from msbp.functional import sparse_embedding_linear, sparse_linear
from msbp.nn import SparseLinear
from msbp.optim import LazyRowAdam

native_only = pytest.mark.skipif(
    os.environ.get("MSBP_BACKEND") == "python" or not msbp.native.use_native(),
    reason="native kernels unavailable or disabled",
)


def _case(n, nf, rows, d, out, dtype, seed, zero_rows=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (n, nf), generator=gen)
    table = torch.randn(rows, d, generator=gen, dtype=dtype)
    weight = torch.randn(out, nf * d, generator=gen, dtype=dtype)
    bias = torch.randn(out, generator=gen, dtype=dtype)
    grads = [torch.randn(n, out, generator=gen, dtype=dtype) for _ in range(3)]
    for g in grads:
        g[:zero_rows] = 0  # padding rows: no gradient
    return ids, table, weight, bias, grads


def _memory(cfg, n, out, dtype):
    mdt = torch.promote_types(dtype, torch.float32)
    if cfg.memory == 0:
        return None
    shape = (out,) if cfg.memory_layout == "unit" else (n, out)
    return torch.zeros(shape, dtype=mdt)


def _close(a, b, dtype):
    """Equal to rounding: float32 sums of hundreds of terms per table row get an absolute
    tolerance scaled by the largest entry."""
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, **tol(dtype))
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def _run(cfg, ids, table, weight, bias, grads, memory, fn):
    """Three backward passes accumulating into .grad: (table grad, W grad, b grad, memory)."""
    t = table.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    for g in grads:
        fn(ids, t, w, b, memory).backward(g)
    return t.grad, w.grad, b.grad, memory


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["unit", "slot"])
@pytest.mark.parametrize("selection", ["unified", "per_example"])
@pytest.mark.parametrize("memory", [0.0, 0.8])
@pytest.mark.parametrize("n", [30, 2000])  # n k F d below and above the loops' limit (2^20)
def test_matches_reference(backend, dtype, layout, selection, memory, n):
    cfg = make_cfg(selection, layout, memory=memory, k=4)
    nf, rows, d, out = 8, 50, 20, 24
    ids, table, weight, bias, grads = _case(n, nf, rows, d, out, dtype, seed=n)
    mem = _memory(cfg, n, out, dtype)
    got = _run(cfg, ids, table, weight, bias, grads, mem,
               lambda i, t, w, b, m: sparse_embedding_linear(i, t, w, b, m, config=cfg))

    # the oracle: x = T[ids] side by side, the reference backward, dT = dx's rows summed per id
    ref_mem = _memory(cfg, n, out, dtype)
    t_grad = torch.zeros_like(table)
    w_grad = torch.zeros_like(weight)
    b_grad = torch.zeros_like(bias)
    x = F.embedding(ids, table).flatten(-2)
    for g in grads:
        dx, dw, db, new_mem = ref_step(cfg, x, weight, g, ref_mem)
        t_grad.index_add_(0, ids.reshape(-1), dx.reshape(-1, d))
        w_grad += dw
        b_grad += db
        if ref_mem is not None:
            ref_mem = new_mem
    _close(got[0], t_grad, dtype)
    _close(got[1], w_grad, dtype)
    _close(got[2], b_grad, dtype)
    if mem is not None:
        _close(mem, ref_mem, dtype)


def _unfused(cfg):
    return lambda i, t, w, b, m: sparse_linear(F.embedding(i, t).flatten(-2), w, b, m, config=cfg)


def _fused(cfg):
    return lambda i, t, w, b, m: sparse_embedding_linear(i, t, w, b, m, config=cfg)


@given(
    n=st.integers(1, 60), nf=st.integers(1, 6), rows=st.integers(1, 30), d=st.integers(1, 19),
    out=st.integers(1, 40), k=st.integers(1, 45),
    selection=st.sampled_from(["unified", "per_example"]),
    layout=st.sampled_from(["unit", "slot"]), memory=st.sampled_from([0.0, 0.5, 1.0]),
    rows_setting=st.sampled_from(["active", "all"]), zero_rows=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None)
def test_fused_equals_composition(n, nf, rows, d, out, k, selection, layout, memory,
                                  rows_setting, zero_rows, dtype, seed):
    """Random shapes (k >= out, padding rows, memory_rows) against embedding + sparse_linear."""
    cfg = make_cfg(selection, layout, memory=memory, k=k, memory_rows=rows_setting)
    ids, table, weight, bias, grads = _case(n, nf, rows, d, out, dtype, seed, min(zero_rows, n))
    m1, m2 = _memory(cfg, n, out, dtype), _memory(cfg, n, out, dtype)
    got = _run(cfg, ids, table, weight, bias, grads, m1, _fused(cfg))
    want = _run(cfg, ids, table, weight, bias, grads, m2, _unfused(cfg))
    for a, b in zip(got, want, strict=True):
        if b is not None:
            _close(a, b, dtype)


@native_only
def test_fused_op_runs_and_splits_rows_across_threads():
    """The fused op is what runs (its node, not embedding + linear), and the table's gradient is
    the same bit for bit with 1 and 2 threads (threads own ranges of table rows)."""
    cfg = make_cfg("unified", "unit", k=8)
    ids, table, weight, bias, grads = _case(3000, 12, 200, 16, 64, torch.float32, seed=3)
    t = table.clone().requires_grad_()
    y = sparse_embedding_linear(ids, t, weight.requires_grad_(), bias, None, config=cfg)
    assert "Embedding" not in type(y.grad_fn).__name__
    assert y.grad_fn.next_functions[1][0] is not None  # the table's AccumulateGrad
    out = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            out.append(_run(cfg, ids, table, weight.detach(), bias, grads, None, _fused(cfg))[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("trainable", ["weight", "table"])
def test_frozen_table_or_weight(backend, trainable):
    cfg = make_cfg("unified", "unit", k=3)
    ids, table, weight, bias, grads = _case(40, 3, 10, 5, 12, torch.float64, seed=1)
    got = []
    for fn in (_fused(cfg), _unfused(cfg)):
        t, w = table.clone(), weight.clone()
        leaf = (w if trainable == "weight" else t).requires_grad_()
        fn(ids, t, w, bias if trainable == "weight" else None, None).backward(grads[0])
        got.append(leaf.grad)
    torch.testing.assert_close(got[0], got[1])


def test_int32_ids_and_leading_dims(backend):
    cfg = make_cfg("unified", "unit", k=3)
    ids, table, weight, bias, grads = _case(24, 4, 10, 5, 12, torch.float64, seed=2)
    t1 = table.clone().requires_grad_()
    y = sparse_embedding_linear(ids.int().view(2, 12, 4), t1, weight, bias, None, config=cfg)
    assert y.shape == (2, 12, 12)
    y.backward(grads[0].view(2, 12, 12))
    t2 = table.clone().requires_grad_()
    y2 = sparse_linear(F.embedding(ids, t2).flatten(-2), weight, bias, None, config=cfg)
    y2.backward(grads[0])
    torch.testing.assert_close(t1.grad, t2.grad)


def test_bad_input_raises_value_error():
    cfg = make_cfg()
    table, weight = torch.randn(10, 5), torch.randn(8, 20)
    ids = torch.randint(0, 10, (3, 4))
    with pytest.raises(ValueError, match=r"table must be 2-D"):
        sparse_embedding_linear(ids, table.view(2, 5, 5), weight, config=cfg)
    with pytest.raises(ValueError, match=r"ids must be int64 or int32.*\(3, 4\)"):
        sparse_embedding_linear(ids.float(), table, weight, config=cfg)
    with pytest.raises(ValueError, match=r"weight of shape \(8, 21\) does not fit.*\(out, 20\)"):
        sparse_embedding_linear(ids, table, torch.randn(8, 21), config=cfg)
    with pytest.raises(ValueError, match=r"bias of shape \(7,\)"):
        sparse_embedding_linear(ids, table, weight.requires_grad_(), torch.randn(7), config=cfg)
    with pytest.raises(ValueError, match=r"memory of shape \(7,\)"):
        sparse_embedding_linear(ids, table, weight, None, torch.zeros(7), config=cfg)


def test_forward_embedded_equals_call_hooks_and_dense_mode(backend):
    layer = SparseLinear(3 * 5, 12, config=make_cfg("unified", "unit", k=3))
    ids, table, _, _, grads = _case(20, 3, 10, 5, 12, torch.float32, seed=4)
    twin = SparseLinear(3 * 5, 12, config=layer.config)
    twin.load_state_dict(layer.state_dict())
    t1, t2 = table.clone().requires_grad_(), table.clone().requires_grad_()
    for g in grads:
        layer.forward_embedded(ids, t1).backward(g)
        twin(F.embedding(ids, t2).flatten(-2)).backward(g)
    torch.testing.assert_close(t1.grad, t2.grad)
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad)
    torch.testing.assert_close(layer.memory, twin.memory)
    seen = []
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    layer.forward_embedded(ids, table)
    handle.remove()
    assert seen == [torch.Size([20, 15])]  # hooks see the layer's input, as for layer(x)
    with msbp.dense_backward(layer):
        t3 = table.clone().requires_grad_()
        layer.forward_embedded(ids, t3).backward(grads[0])
    t4 = table.clone().requires_grad_()
    F.linear(F.embedding(ids, t4).flatten(-2), layer.weight, layer.bias).backward(grads[0])
    torch.testing.assert_close(t3.grad, t4.grad)


def test_parser_lazy_adam_steps_equal_unfused(backend):
    """ParserMLP (sparsified hidden layer, LazyRowAdam): parameters after 3 steps with the fused
    path equal those of the same model run through embedding + the layer."""
    from msbp.tasks.parse import ParserMLP

    def model(fused: bool):
        torch.manual_seed(0)
        m = ParserMLP(30, 8, 4, embedding_dim=6, hidden_size=40)
        msbp.sparsify(m, msbp.SparseBackpropConfig(k=5, memory=0.8), exclude=["output"])
        if not fused:
            m.hidden.forward_embedded = lambda ids, t: m.hidden(F.embedding(ids, t).flatten(1))
        return m, LazyRowAdam(m.parameters(), lr=1e-2)

    gen = torch.Generator().manual_seed(0)
    feats = torch.randint(0, 4, (64, 48), generator=gen)
    gold = torch.randint(0, 9, (64,), generator=gen)
    runs = []
    for fused in (True, False):
        m, opt = model(fused)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(feats), gold).backward()
            opt.step()
        runs.append(m.state_dict())
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=1e-5, atol=1e-6, msg=key)
