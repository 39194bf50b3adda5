"""SparseLinear / functional.sparse_linear: the compacted fast path against the oracle."""

from __future__ import annotations

import copy
import math
import re
import weakref

import pytest
import torch
from _helpers import (
    DTYPES,
    LAYOUTS,
    SELECTIONS,
    assert_memory_matches,
    dtype_id,
    empty_memory_like,
    fast_step,
    logged_rows,
    make_cfg,
    make_layer,
    randn,
    ref_step,
    rel_err,
    tol,
    track_rows,
    written_rows,
)
from torch import nn

import msbp
from msbp import SparseLinear
from msbp.functional import memory_dtype, sparse_linear
from msbp.ops.reference import sparse_linear_backward_ref

D_IN, D_OUT = 5, 9


def _cfg(*args, k=3, **kw):
    return make_cfg(*args, k=k, **kw)


def _dense_twin(layer: SparseLinear) -> nn.Linear:
    dense = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype
    )
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "memory"})
    return dense


# --- k = out: exactly dense -------------------------------------------------------------------


@pytest.mark.parametrize("memory", [0.0, 0.8], ids=["mem0", "mem0.8"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("k", [D_OUT, 0, 100], ids=["k=out", "k=0", "k>out"])
def test_k_out_gives_dense_gradients(k, selection, layout, memory):
    cfg = _cfg(selection, layout, memory, k=k)
    layer = make_layer(D_IN, D_OUT, cfg)
    layer.generator = torch.Generator().manual_seed(0)
    dense = _dense_twin(layer)
    gen = torch.Generator().manual_seed(1)
    for n in (4, 4, 3):
        x, g = randn(n, D_IN, gen=gen), randn(n, D_OUT, gen=gen)
        dx, dW, db = fast_step(layer, x, g)
        dense.zero_grad(set_to_none=True)
        xd = x.clone().requires_grad_(True)
        dense(xd).backward(g)
        torch.testing.assert_close(dx, xd.grad, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(dW, dense.weight.grad, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(db, dense.bias.grad, rtol=1e-13, atol=1e-13)
        assert not layer.memory.any()


def test_forward_is_exactly_linear():
    layer = make_layer(D_IN, D_OUT, _cfg(), dtype=torch.float32)
    x = randn(6, D_IN, gen=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


# --- compacted fast path == masked reference --------------------------------------------------


def _run_against_reference(cfg, dtype, batch_sizes, *, bias=True, seed=0, x_shape=None):
    layer = make_layer(D_IN, D_OUT, cfg, dtype=dtype, seed=seed, bias=bias)
    layer.generator = torch.Generator().manual_seed(seed + 100)
    ref_gen = torch.Generator().manual_seed(seed + 100)
    ref_mem = empty_memory_like(layer) if cfg.memory > 0 else None
    gen = torch.Generator().manual_seed(seed + 1)
    t = tol(dtype)
    for n in batch_sizes:
        lead = (n,) if x_shape is None else (n, *x_shape)
        x, g = randn(*lead, D_IN, gen=gen, dtype=dtype), randn(*lead, D_OUT, gen=gen, dtype=dtype)
        dx, dW, db = fast_step(layer, x, g)
        rdx, rdW, rdb, ref_mem = ref_step(cfg, x, layer.weight, g, ref_mem, ref_gen)
        assert dx.shape == x.shape and dx.dtype == dtype
        torch.testing.assert_close(dx, rdx, **t)
        torch.testing.assert_close(dW, rdW, **t)
        if bias:
            torch.testing.assert_close(db, rdb, **t)
        if ref_mem is not None:
            assert_memory_matches(layer.memory, ref_mem, cfg, D_OUT, **t)
        else:
            assert not layer.memory.any()
    return layer


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("memory", [0.0, 0.8, 1.0], ids=["mem0", "mem0.8", "mem1"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_fast_path_matches_reference(selection, layout, memory, dtype):
    _run_against_reference(_cfg(selection, layout, memory), dtype, (4, 4, 4, 4, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_fast_path_matches_reference_changing_batch(selection, layout, dtype):
    """Slot memory from a batch of another size is spread evenly (column sums kept)."""
    _run_against_reference(_cfg(selection, layout, 0.8), dtype, (4, 4, 3, 5, 5, 1, 2, 2))


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_fast_path_matches_reference_k(selection, k):
    _run_against_reference(_cfg(selection, "unit", 0.8, k=k), torch.float64, (3, 3, 3))


@pytest.mark.parametrize("selection", SELECTIONS)
def test_fast_path_matches_reference_no_bias(selection):
    layer = _run_against_reference(_cfg(selection), torch.float64, (4, 4), bias=False)
    assert layer.bias is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_nd_input_equals_flattened_reference(selection, layout):
    cfg = _cfg(selection, layout, 0.8)
    layer = make_layer(D_IN, D_OUT, cfg)
    layer.generator = torch.Generator().manual_seed(7)
    ref_gen = torch.Generator().manual_seed(7)
    ref_mem = empty_memory_like(layer)
    gen = torch.Generator().manual_seed(8)
    for batch, time in ((2, 3), (2, 3), (3, 2), (1, 4)):
        x, g = randn(batch, time, D_IN, gen=gen), randn(batch, time, D_OUT, gen=gen)
        dx, dW, db = fast_step(layer, x, g)
        rdx, rdW, rdb, ref_mem = ref_step(
            cfg, x.reshape(-1, D_IN), layer.weight, g.reshape(-1, D_OUT), ref_mem, ref_gen
        )
        assert dx.shape == (batch, time, D_IN)
        torch.testing.assert_close(dx.reshape(-1, D_IN), rdx, **tol(torch.float64))
        torch.testing.assert_close(dW, rdW, **tol(torch.float64))
        torch.testing.assert_close(db, rdb, **tol(torch.float64))
        assert_memory_matches(layer.memory, ref_mem, cfg, D_OUT, **tol(torch.float64))


@pytest.mark.parametrize("selection", ["unified", "random"])
def test_unified_weight_grad_has_k_nonzero_rows(selection):
    cfg = _cfg(selection, k=3)
    layer = make_layer(D_IN, D_OUT, cfg)
    gen = torch.Generator().manual_seed(0)
    _, dW, db = fast_step(layer, randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen))
    assert int((dW.abs().sum(1) > 0).sum()) == 3
    assert bool((db != 0).all())  # the bias gradient stays dense


def test_functional_needs_no_memory():
    cfg = _cfg("per_example", memory=0.8)
    gen = torch.Generator().manual_seed(0)
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    w = randn(D_OUT, D_IN, gen=gen).requires_grad_(True)
    sparse_linear(x, w, None, None, config=cfg).backward(g)
    _, rdW, _, _ = ref_step(cfg, x, w, g, None)
    torch.testing.assert_close(w.grad, rdW, **tol(torch.float64))


def test_probe_receives_raw_grad_input_and_propagated():
    cfg = _cfg("per_example", memory=0.8)
    layer = make_layer(D_IN, D_OUT, cfg)
    seen = []
    layer.probe = lambda g, x, p: seen.append((g.clone(), x.clone(), p.clone()))
    gen = torch.Generator().manual_seed(0)
    ref_mem = empty_memory_like(layer)
    for _ in range(2):
        x, g = randn(2, 3, D_IN, gen=gen), randn(2, 3, D_OUT, gen=gen)
        _, rdW, _, new_mem = ref_step(cfg, x, layer.weight, g, ref_mem)
        fast_step(layer, x, g)
        pg, px, pp = seen[-1]
        torch.testing.assert_close(pg, g.reshape(-1, D_OUT), rtol=0, atol=0)
        torch.testing.assert_close(px, x.reshape(-1, D_IN), rtol=0, atol=0)
        # the propagated part, pushed through the chain rule, is the reference's dW
        torch.testing.assert_close(pp.t() @ px, rdW, **tol(torch.float64))
        assert int((pp != 0).sum(1).max()) <= cfg.k
        ref_mem = new_mem
    assert len(seen) == 2


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_activation_checkpointing_same_as_plain(selection, reentrant):
    """Recomputing the forward in backward must not update the memory a second time."""
    from torch.utils.checkpoint import checkpoint

    cfg = _cfg(selection, "unit", 0.8)
    plain, ckpt = make_layer(D_IN, D_OUT, cfg), make_layer(D_IN, D_OUT, cfg)
    ref_mem = empty_memory_like(plain)
    total = torch.zeros_like(plain.weight)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
        plain(x).backward(g)
        xc = x.clone().requires_grad_(True)
        checkpoint(ckpt, xc, use_reentrant=reentrant).backward(g)
        rdx, rdW, _, ref_mem = ref_step(cfg, x, plain.weight, g, ref_mem)
        total += rdW
        torch.testing.assert_close(xc.grad, rdx, **tol(torch.float64))
        for layer in (plain, ckpt):
            torch.testing.assert_close(layer.weight.grad, total, **tol(torch.float64))
            torch.testing.assert_close(layer.memory, ref_mem, **tol(torch.float64))


# --- autocast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_autocast_bf16_cpu(selection, layout):
    cfg = _cfg(selection, layout, 0.8, k=3)
    layer = make_layer(6, 8, cfg, dtype=torch.float32)
    ref_mem = empty_memory_like(layer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = randn(5, 6, gen=gen, dtype=torch.float32).requires_grad_(True)
        g = randn(5, 8, gen=gen, dtype=torch.float32).bfloat16()
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.backward(g)
        rdx, rdW, rdb, ref_mem = ref_step(
            cfg, x.detach().bfloat16(), layer.weight.detach().bfloat16(), g, ref_mem
        )
        assert layer.memory.dtype == torch.float32
        assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
        for got in (x.grad, layer.weight.grad, layer.bias.grad, layer.memory):
            assert torch.isfinite(got).all()
        assert rel_err(x.grad, rdx) < 2e-2
        assert rel_err(layer.weight.grad, rdW) < 2e-2
        assert rel_err(layer.bias.grad, rdb) < 2e-2
        assert rel_err(layer.memory, ref_mem) < 2e-2


# --- weight.grad in place ---------------------------------------------------------------------


@pytest.mark.parametrize("selection", SELECTIONS)
def test_inplace_weight_grad_same_buffer(selection):
    cfg = _cfg(selection, memory=0.8)
    layer = make_layer(D_IN, D_OUT, cfg)
    layer.generator = torch.Generator().manual_seed(3)
    ref_gen = torch.Generator().manual_seed(3)
    gen = torch.Generator().manual_seed(0)
    ref_mem = empty_memory_like(layer)
    expected = torch.zeros_like(layer.weight)
    ptr = None
    for _ in range(3):
        x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
        layer(x).backward(g)
        _, rdW, _, ref_mem = ref_step(cfg, x, layer.weight, g, ref_mem, ref_gen)
        expected += rdW
        if ptr is None:
            ptr = layer.weight.grad.data_ptr()
        assert layer.weight.grad.data_ptr() == ptr
        torch.testing.assert_close(layer.weight.grad, expected, **tol(torch.float64))


def test_inplace_preexisting_zero_grad():
    cfg = _cfg("per_example", memory=0.0)
    layer = make_layer(D_IN, D_OUT, cfg)
    layer.weight.grad = torch.zeros_like(layer.weight)
    ptr = layer.weight.grad.data_ptr()
    gen = torch.Generator().manual_seed(0)
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    layer(x).backward(g)
    assert layer.weight.grad.data_ptr() == ptr
    torch.testing.assert_close(layer.weight.grad, ref_step(cfg, x, layer.weight, g, None)[1])


@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_autograd_grad_returns_dense_gradient(selection):
    cfg = _cfg(selection, memory=0.0)
    layer = make_layer(D_IN, D_OUT, cfg)
    gen = torch.Generator().manual_seed(0)
    layer(randn(4, D_IN, gen=gen)).sum().backward()  # weight.grad now exists
    before = layer.weight.grad.clone()
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    (dW,) = torch.autograd.grad(layer(x), [layer.weight], g)
    torch.testing.assert_close(dW, ref_step(cfg, x, layer.weight, g, None)[1])
    assert torch.equal(layer.weight.grad, before)


def test_backward_inputs_x_leaves_weight_grad():
    cfg = _cfg("unified", memory=0.0)
    layer = make_layer(D_IN, D_OUT, cfg)
    gen = torch.Generator().manual_seed(0)
    layer(randn(4, D_IN, gen=gen)).sum().backward()
    before = layer.weight.grad.clone()
    x, g = randn(4, D_IN, gen=gen).requires_grad_(True), randn(4, D_OUT, gen=gen)
    layer(x).backward(g, inputs=[x])
    assert torch.equal(layer.weight.grad, before)
    torch.testing.assert_close(x.grad, ref_step(cfg, x, layer.weight, g, None)[0])


def test_weight_hook_sees_dense_gradient():
    cfg = _cfg("unified", memory=0.0)
    layer = make_layer(D_IN, D_OUT, cfg)
    gen = torch.Generator().manual_seed(0)
    layer(randn(4, D_IN, gen=gen)).sum().backward()
    first = layer.weight.grad.clone()
    seen = []
    layer.weight.register_hook(lambda grad: seen.append(grad.clone()))
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    layer(x).backward(g)
    rdW = ref_step(cfg, x, layer.weight, g, None)[1]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], rdW)
    torch.testing.assert_close(layer.weight.grad, first + rdW)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_grad_inplace_false_same_numbers(selection, layout):
    layers = []
    for inplace in (True, False):
        layer = make_layer(D_IN, D_OUT, _cfg(selection, layout, 0.8, grad_inplace=inplace))
        layer.generator = torch.Generator().manual_seed(5)
        layers.append(layer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # accumulate: from the second step on, weight.grad exists
        x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
        for layer in layers:
            layer(x).backward(g)
        a, b = layers
        torch.testing.assert_close(a.weight.grad, b.weight.grad, **tol(torch.float64))
        torch.testing.assert_close(a.bias.grad, b.bias.grad, **tol(torch.float64))
        torch.testing.assert_close(a.memory, b.memory, **tol(torch.float64))


# --- bad input --------------------------------------------------------------------------------


def test_mismatched_input_raises_with_shapes():
    layer = SparseLinear(4, 7)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(3, 5))
    assert "(3, 5)" in str(info.value) and "(7, 4)" in str(info.value)


def test_functional_mismatched_input_raises_with_shapes():
    with pytest.raises(ValueError) as info:
        sparse_linear(torch.randn(2, 3, 6), torch.randn(7, 4), config=_cfg())
    assert "(2, 3, 6)" in str(info.value) and "(7, 4)" in str(info.value)


def test_scalar_input_raises():
    with pytest.raises(ValueError):
        sparse_linear(torch.tensor(1.0), torch.randn(7, 1), config=_cfg())


def test_weight_not_2d_raises():
    with pytest.raises(ValueError, match=r"\(7, 4, 1\)"):
        sparse_linear(torch.randn(3, 4), torch.randn(7, 4, 1), config=_cfg())


def test_bad_bias_shape_raises():
    with pytest.raises(ValueError) as info:
        sparse_linear(torch.randn(3, 4), torch.randn(7, 4), torch.randn(6), config=_cfg())
    assert "(6,)" in str(info.value) and "(7,)" in str(info.value)


@pytest.mark.parametrize(
    ("layout", "memory"),
    [
        pytest.param("unit", torch.zeros(6), id="unit-wrong-out"),
        pytest.param("unit", torch.zeros(3, 7), id="unit-given-2d"),
        pytest.param("slot", torch.zeros(7), id="slot-given-1d"),
        pytest.param("slot", torch.zeros(3, 6), id="slot-wrong-out"),
        pytest.param("unit", torch.zeros(7, dtype=torch.int64), id="int-dtype"),
        pytest.param("unit", torch.zeros(7, dtype=torch.float16), id="half-dtype"),
        pytest.param("unit", torch.zeros(7, requires_grad=True), id="requires-grad"),
    ],
)
def test_bad_memory_raises(layout, memory):
    w = torch.randn(7, 4, requires_grad=True)
    with pytest.raises(ValueError):
        sparse_linear(torch.randn(3, 4), w, None, memory, config=_cfg(layout=layout))


def test_bad_memory_shape_message_names_shape():
    with pytest.raises(ValueError, match=r"\(6,\)"):
        sparse_linear(torch.randn(3, 4), torch.randn(7, 4), None, torch.zeros(6), config=_cfg())


def test_layer_check_memory_detects_corruption():
    layer = SparseLinear(4, 7, config=_cfg())
    layer.check_memory()
    layer.memory = torch.zeros(5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        layer.check_memory()


# --- non-finite gradients ---------------------------------------------------------------------


def _warm_layer(cfg):
    layer = make_layer(D_IN, D_OUT, cfg)
    layer.generator = torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        fast_step(layer, randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen))
    assert layer.memory.any()
    return layer


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_nonfinite_raises_and_keeps_memory(selection, layout, bad):
    layer = _warm_layer(_cfg(selection, layout, 0.8))
    before = layer.memory.clone()
    gen = torch.Generator().manual_seed(2)
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    g[1, 2] = bad
    with pytest.raises(FloatingPointError):
        layer(x).backward(g)
    assert torch.equal(layer.memory, before)


@pytest.mark.parametrize("shape", [(D_OUT,), (4, D_OUT), (2, 3, D_OUT)], ids=len)
def test_nonfinite_error_names_the_shape_as_a_tuple(backend, shape):
    """The FloatingPointError names the layer and the gradient's shape as Python prints it, on
    both backends: the C++ path had written "(shape [2, 3, 9])"."""
    layer = SparseLinear(D_IN, D_OUT, config=_cfg())
    layer.name = "head"
    g = torch.ones(shape)
    g.view(-1)[1] = float("inf")
    want = f"non-finite output gradient in layer 'head' (shape {shape});"
    with pytest.raises(FloatingPointError, match=re.escape(want)):
        layer(torch.randn(*shape[:-1], D_IN)).backward(g)


@pytest.mark.parametrize("how", ["layer", "block"])
def test_nonfinite_raise_leaves_a_discarded_grad_none(backend, how):
    """A backward that raises FloatingPointError leaves a ``.grad`` that was None as None, as
    autograd leaves it after a failure (an optimizer then skips the weight instead of stepping
    it on zeros). Both paths had put the kept buffer back as ``.grad`` before the op raised
    (the PyTorch path not for a block of a Parameter's rows, the C++ one for both)."""
    gen = torch.Generator().manual_seed(5)
    if how == "layer":
        layer = SparseLinear(D_IN, D_OUT, config=_cfg())
        param, call = layer.weight, layer
    else:
        param = nn.Parameter(randn(2 * D_OUT, D_IN, gen=gen))
        memory = torch.zeros(D_OUT, dtype=param.dtype)

        def call(x):
            return sparse_linear(x, param[D_OUT:], None, memory, config=_cfg())
    x = randn(4, D_IN, gen=gen).to(param.dtype)
    call(x).backward(randn(4, D_OUT, gen=gen).to(param.dtype))  # a buffer to put back
    param.grad = None
    g = randn(4, D_OUT, gen=gen).to(param.dtype)
    g[1, 2] = float("inf")
    with pytest.raises(FloatingPointError):
        call(x).backward(g)
    assert param.grad is None
    call(x).backward(g.nan_to_num(posinf=0.0))  # the next backward still writes its rows
    assert int((param.grad.abs().sum(1) > 0).sum()) == 3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_nonfinite_skip_is_dense_and_keeps_memory(selection, layout):
    layer = _warm_layer(_cfg(selection, layout, 0.8, on_nonfinite="skip"))
    before = layer.memory.clone()
    gen = torch.Generator().manual_seed(2)
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    g[1, 2] = float("nan")
    g[3, 0] = float("inf")
    dx, dW, db = fast_step(layer, x, g)
    assert torch.equal(layer.memory, before)
    assert not torch.isfinite(dW).all()
    torch.testing.assert_close(dW, g.t() @ x, equal_nan=True)
    torch.testing.assert_close(dx, g @ layer.weight.detach(), equal_nan=True)
    torch.testing.assert_close(db, g.sum(0), equal_nan=True)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_nonfinite_keeps_slot_memory_of_another_batch_shape(backend, on_nonfinite):
    """A non-finite gradient in a batch of a new shape leaves a slot memory as it was, rows and
    values: its sums are spread over the new rows only when the sparse step takes place."""
    layer = _warm_layer(_cfg("per_example", "slot", 0.8, on_nonfinite=on_nonfinite))
    before = layer.memory.clone()  # 4 rows
    gen = torch.Generator().manual_seed(2)
    x, g = randn(3, D_IN, gen=gen), randn(3, D_OUT, gen=gen)
    g[1, 2] = float("inf")
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            fast_step(layer, x, g)
    else:
        dx, dW, _ = fast_step(layer, x, g)
        torch.testing.assert_close(dW, g.t() @ x)  # dense
    assert torch.equal(layer.memory, before)
    fast_step(layer, x, g.nan_to_num(posinf=0.0))  # a finite step then spreads it
    assert layer.memory.shape == (3, D_OUT)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_nonfinite_keeps_slot_memory_after_another_call_resized_it(backend, on_nonfinite):
    """Two calls of different batch shapes in one graph: the later call's backward (run first)
    spreads the slot memory over its rows; a non-finite gradient in the earlier call's backward
    then leaves the memory as that step left it (the native op's own spreading undone)."""
    cfg = _cfg("unified", "slot", 0.8, on_nonfinite=on_nonfinite)
    layer = _warm_layer(cfg)  # memory of 4 rows
    twin = _warm_layer(cfg)
    gen = torch.Generator().manual_seed(3)
    xa, ga = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    xb, gb = randn(3, D_IN, gen=gen), randn(3, D_OUT, gen=gen)
    ga[0, 1] = float("nan")
    fast_step(twin, xb, gb)  # the later call's step alone
    loss = (layer(xa) * ga).sum() + (layer(xb) * gb).sum()
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            loss.backward()
    else:
        loss.backward()
    assert torch.equal(layer.memory, twin.memory)


@pytest.mark.parametrize("how", ["functional", "embedding", "loaded"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_strided_memory_is_updated_in_place_as_the_oracle_says(backend, how, layout, selection):
    """A memory that is a strided view (a column of a larger state tensor given to the
    functional API, or one loaded with assign=True) gets the oracle's values,
    in place. The native op writes through the memory's data pointer and raised "memory must be
    contiguous" in the backward, where the PyTorch path takes any strides."""
    cfg = _cfg(selection, layout, 0.8)
    gen = torch.Generator().manual_seed(4)
    n = 4
    x, g = randn(n, D_IN, gen=gen), randn(n, D_OUT, gen=gen)
    w = randn(D_OUT, D_IN, gen=gen)
    start = randn(D_OUT, gen=gen) if layout == "unit" else randn(n, D_OUT, gen=gen)
    memory = torch.stack((start, start), -1)[..., 1]  # a strided view of a larger tensor
    weight = w.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    if how == "functional":
        y = sparse_linear(xr, weight, None, memory, config=cfg)
    elif how == "embedding":  # ids 0..n-1 into a table that is x itself: x as its embedding
        xr = x.clone().requires_grad_()
        y = msbp.functional.sparse_embedding_linear(
            torch.arange(n).unsqueeze(1), xr, weight, None, memory, config=cfg)
    else:
        layer = SparseLinear(D_IN, D_OUT, bias=False, config=cfg, device="meta")
        layer.load_state_dict({"weight": w.clone(), "memory": memory}, assign=True)
        weight, memory = layer.weight, layer.memory
        y = layer(xr)
    assert not memory.is_contiguous()
    (y * g).sum().backward()
    dx, dW, _, new = sparse_linear_backward_ref(
        x, w, g, start.clone(), k=3, selection=selection, alpha=0.8, layout=layout)
    torch.testing.assert_close(memory, new)
    torch.testing.assert_close(weight.grad, dW)
    torch.testing.assert_close(xr.grad, dx)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "rows, shared", [(64, False), (3, False), (16, True)],
    ids=["sparse dx and dW", "sparse dx, dense dW", "dense dx and dW"],
)
def test_per_example_products_match_reference(rows, shared, dtype):
    """Each CPU route of per-example selection (embedding_bag / CSR / GEMM over the c kept
    columns, chosen by c / k) gives the reference's gradients."""
    out, k = 96, 2
    cfg = make_cfg("per_example", "unit", 0.8, k=k)
    layer = make_layer(10, out, cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    x = randn(rows, 10, gen=gen, dtype=dtype)
    g = randn(rows, out, gen=gen, dtype=dtype)
    if shared:  # every row keeps the same k columns: c = k
        g = g[:1].expand(rows, out) * torch.linspace(1, 2, rows, dtype=dtype).unsqueeze(1)
    c = torch.topk(g.abs(), k, dim=1).indices.unique().numel()
    assert (c >= 20 * k) == (rows == 64) and (c >= 2 * k) == (not shared)
    dx, dW, db = fast_step(layer, x, g)
    rdx, rdW, rdb, _ = ref_step(cfg, x, layer.weight, g, torch.zeros(out, dtype=dtype))
    for fast, ref in ((dx, rdx), (dW, rdW), (db, rdb)):
        torch.testing.assert_close(fast, ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows", [6, 30000], ids=["loops", "gemm"])  # n k in above 2^20: GEMMs
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_rows_are_added_into_an_existing_gradient(selection, rows, dtype):
    """dW's rows land on top of what .grad holds: a second backward without zero_grad and a
    second call of the layer in one graph add to it (small products write the rows straight into
    the buffer, unified top-k's GEMMs go through a compact dW; both must accumulate, never
    overwrite)."""
    out, k = 64, 4
    cfg = make_cfg(selection, "unit", 0.0, k=k)
    layer = make_layer(12, out, cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(11)
    xs = [randn(rows, 12, gen=gen, dtype=dtype) for _ in range(3)]
    gs = [randn(rows, out, gen=gen, dtype=dtype) for _ in range(3)]
    if selection == "per_example":  # the blocked loops, not the GEMM over few columns
        c = torch.topk(gs[0].abs(), k, dim=1).indices.unique().numel()
        assert c >= 3 * k
    # the same output gradient twice: the same rows of dW, which must add up
    pairs = [(xs[0], gs[0]), (xs[1], gs[0]), (xs[1], gs[1]), (xs[2], 2 * gs[1])]
    want = [ref_step(cfg, x, layer.weight, g, None)[1] for x, g in pairs]
    t = tol(dtype)
    if rows > 1000 and dtype == torch.float32:  # sums of 30,000 float32 terms, in another order
        t = dict(rtol=1e-4, atol=1e-5 * float(want[0].abs().max()))
    layer.zero_grad(set_to_none=True)
    layer(pairs[0][0]).backward(pairs[0][1])
    layer(pairs[1][0]).backward(pairs[1][1])  # accumulated without zero_grad
    torch.testing.assert_close(layer.weight.grad, want[0] + want[1], **t)
    layer.zero_grad(set_to_none=True)
    ((layer(pairs[2][0]) * pairs[2][1]).sum() + (layer(pairs[3][0]) * pairs[3][1]).sum()).backward()
    torch.testing.assert_close(layer.weight.grad, want[2] + want[3], **t)


def test_per_example_products_of_large_operands_match_reference():
    """Operands of 8 MB and more are gathered from packed column blocks (dx from W's, dW from
    x's): the same gradients as the reference."""
    n, d_in, out, k = 1024, 1024, 1024, 4  # float64: W and x are 8 MB each
    cfg = make_cfg("per_example", "unit", 0.8, k=k)
    layer = make_layer(d_in, out, cfg, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x, g = randn(n, d_in, gen=gen), randn(n, out, gen=gen)
    dx, dW, db = fast_step(layer, x, g)
    rdx, rdW, rdb, _ = ref_step(cfg, x, layer.weight, g, torch.zeros(out, dtype=torch.float64))
    for fast, ref in ((dx, rdx), (dW, rdW), (db, rdb)):
        torch.testing.assert_close(fast, ref, **tol(torch.float64))


def test_per_example_unit_memory_keeps_float32_precision(backend):
    """Per-example selection keeping most of each row (k/out near 1): the unit memory is the
    column sum of the small residual, within float32 rounding of the float64 reference (the
    native kernel once took colsum(U) minus the kept entries: 5e-5 relative at n = 1000)."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, out, k = 1000, 16, 256, 245
    f32 = torch.float32
    x, g = randn(n, d_in, gen=gen, dtype=f32), randn(n, out, gen=gen, dtype=f32)
    weight = randn(out, d_in, gen=gen, dtype=f32).requires_grad_(True)
    memory = torch.zeros(out)
    cfg = _cfg("per_example", "unit", 1.0, k=k)
    sparse_linear(x, weight, None, memory, config=cfg).backward(g)
    want = sparse_linear_backward_ref(
        x.double(), weight.detach().double(), g.double(), torch.zeros(out, dtype=torch.float64),
        k=k, selection="per_example", alpha=1.0,
    )[3]
    assert ((memory.double() - want).abs().max() / want.abs().max()).item() < 1e-6


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_reused_gradient_buffer_is_cleared_after_untracked_writes(backend, layout):
    """The gradient buffer a layer puts back after ``zero_grad(set_to_none=True)`` is cleared
    whole, not just in the rows last listed, once anything the layer cannot list went into it
    since: more rows than it has over several accumulated backward passes, or the dense
    gradient of a step skipped for a non-finite output gradient, followed by more rows."""
    out, d_in, k = 8, 3, 4
    cfg = make_cfg("unified", layout, 0.5, k=k, on_nonfinite="skip")
    layer = make_layer(d_in, out, cfg)
    gen = torch.Generator().manual_seed(3)
    batches = [(randn(2, d_in, gen=gen), randn(2, out, gen=gen)) for _ in range(5)]
    bad = randn(2, out, gen=gen)
    bad[0, 0] = float("inf")
    for steps in (batches[:4], [(batches[0][0], bad), batches[1]]):
        layer.zero_grad(set_to_none=True)
        for x, g in steps:  # accumulated: 16 rows of 8, or a dense gradient then 4 rows
            layer(x).backward(g)
        layer.zero_grad(set_to_none=True)
        x, g = batches[4]
        memory = layer.memory.clone()
        layer(x).backward(g)
        want = ref_step(cfg, x, layer.weight, g, memory)[1]
        torch.testing.assert_close(layer.weight.grad, want, **tol(torch.float64))


@pytest.mark.parametrize("other", ["penalty", "tie"])
@pytest.mark.parametrize("hook", [None, "node_pre", "node_post"])
def test_other_gradients_of_the_weight_do_not_stay_in_the_put_back_buffer(backend, other, hook):
    """The weight also gets a dense gradient from elsewhere in the graph (an L2 penalty in the
    loss, or weight tying with an embedding lookup), with ``zero_grad(set_to_none=True)``: each
    step's gradient is that step's alone. Autograd sums both parts before its one add into the
    buffer (always on the PyTorch path, natively with hooks on the AccumulateGrad node), so the
    buffer must be cleared whole, not in the layer's rows only."""
    cfg = make_cfg("unified", "unit", 0.5, k=2)
    layer = make_layer(4, 8, cfg)
    w = layer.weight
    layer(randn(1, 4, gen=torch.Generator())).sum().backward()  # the AccumulateGrad node exists
    node = torch.autograd.graph.get_gradient_edge(w).node
    if hook == "node_pre":
        node.register_prehook(lambda grads: None)
    elif hook == "node_post":
        node.register_hook(lambda grads_in, grads_out: None)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        x, g = randn(3, 4, gen=gen), randn(3, 8, gen=gen)
        ids = torch.randint(0, 8, (5,), generator=gen)
        memory = layer.memory.clone()
        layer.zero_grad(set_to_none=True)
        loss = (layer(x) * g).sum()
        free = w.detach().clone().requires_grad_(True)  # the dense part, by autograd
        extra = free.square().sum() * 0.3 if other == "penalty" else (
            torch.nn.functional.embedding(ids, free).sin().sum()
        )
        loss = loss + (w.square().sum() * 0.3 if other == "penalty" else (
            torch.nn.functional.embedding(ids, w).sin().sum()
        ))
        loss.backward()
        extra.backward()
        want = ref_step(cfg, x, w, g, memory)[1] + free.grad
        torch.testing.assert_close(w.grad, want, **tol(torch.float64))


def test_two_calls_and_a_sparse_gradient_from_elsewhere_leave_nothing_behind(backend):
    """The layer twice in one graph, both calls keeping the same units (autograd merges their
    row-sparse dWs into the union of their rows), and a sparse embedding lookup of the weight
    adding as many other rows as the calls share: each step's gradient is that step's alone."""
    layer = make_layer(3, 5, make_cfg("unified", "unit", 0.0, k=2), bias=False)
    x = randn(2, 3, gen=torch.Generator().manual_seed(0))
    g = torch.tensor([[5.0, 4.0, 0.1, 0.1, 0.1]] * 2, dtype=torch.float64)  # units 0 and 1

    def loss_of(model, lookup):
        loss = (model(x) * g).sum() + (model(x) * g).sum()
        if lookup:  # rows 3 and 4: as many entries as the two calls share
            ids = torch.tensor([3, 4])
            loss = loss + nn.functional.embedding(ids, model.weight, sparse=True).sum()
        return loss

    for lookup in (True, False):
        layer.zero_grad(set_to_none=True)
        fresh = copy.deepcopy(layer)
        loss_of(layer, lookup).backward()
        loss_of(fresh, lookup).backward()
        torch.testing.assert_close(layer.weight.grad, fresh.weight.grad, rtol=0, atol=0)


@pytest.mark.parametrize("zero_before", [True, False])
def test_gradient_buffer_is_put_back_every_step(backend, zero_before):
    """``zero_grad(set_to_none=True)`` then backward, before or after the forward: the layer puts
    back the same buffer every step (no fresh ``(out, in)`` allocation and zeroing), and the
    gradient is that step's alone."""
    cfg = make_cfg("unified", "unit", 0.0, k=2)
    layer = make_layer(4, 8, cfg)
    gen = torch.Generator().manual_seed(7)
    grads = []
    for _ in range(4):
        x, g = randn(3, 4, gen=gen), randn(3, 8, gen=gen)
        if zero_before:
            layer.zero_grad(set_to_none=True)
        y = layer(x)
        if not zero_before:
            layer.zero_grad(set_to_none=True)
        y.backward(g)
        grads.append(weakref.ref(layer.weight.grad))  # no reference that would stop the reuse
        want = ref_step(cfg, x, layer.weight, g, None)[1]
        torch.testing.assert_close(layer.weight.grad, want, **tol(torch.float64))
    assert all(ref() is layer.weight.grad for ref in grads[1:])


def test_a_removed_hook_leaves_the_buffer_route(backend):
    """``register_hook(f).remove()`` leaves torch's C++ hook on the weight with nothing in it:
    the rows still go into the buffer the layer puts back (not a fresh dense dW every step),
    and the gradient is as without the hook."""
    cfg = make_cfg("unified", "unit", 0.0, k=2)
    layer = make_layer(4, 8, cfg)
    layer.weight.register_hook(lambda g: g * 2).remove()
    gen = torch.Generator().manual_seed(3)
    grads = []
    for _ in range(3):
        x, g = randn(3, 4, gen=gen), randn(3, 8, gen=gen)
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)
        grads.append(weakref.ref(layer.weight.grad))
        want = ref_step(cfg, x, layer.weight, g, None)[1]
        torch.testing.assert_close(layer.weight.grad, want, **tol(torch.float64))
    assert all(ref() is layer.weight.grad for ref in grads[1:])


@pytest.mark.parametrize("between", ["nothing", "forward", "autograd_grad"])
def test_old_gradient_kept_after_the_forward_is_not_overwritten(backend, between):
    """``loss = layer(x); old = p.grad; zero_grad(set_to_none=True); loss.backward()``: the old
    .grad the caller kept must stay as it was and not become .grad again, however the layer
    chose its buffer at the forward; also with another forward of the layer between
    ``zero_grad`` and the backward (an evaluation left with grad enabled, or
    ``torch.autograd.grad`` of the input only), which found the old buffer held and recorded a
    new one (the native path had put it back as .grad and added into it: it had captured that
    buffer at its forward, and once the record no longer held it the caller's reference looked
    like msbp's own)."""
    cfg = make_cfg("unified", "unit", 0.0, k=2)
    layer = make_layer(4, 8, cfg)
    gen = torch.Generator().manual_seed(7)
    x1, g1, x2, g2 = (randn(3, d, gen=gen) for d in (4, 8, 4, 8))
    layer(x1).backward(g1)
    y = layer(x2)  # while .grad exists
    old = layer.weight.grad
    before = old.clone()
    layer.zero_grad(set_to_none=True)
    x3 = randn(2, 4, gen=gen).requires_grad_()
    if between == "forward":
        layer(x3).sum()  # never backpropagated
    elif between == "autograd_grad":
        torch.autograd.grad(layer(x3).sum(), [x3])  # .grad stays None
    assert layer.weight.grad is None
    y.backward(g2)
    assert torch.equal(old, before)
    assert layer.weight.grad is not old
    want = ref_step(cfg, x2, layer.weight, g2, None)[1]
    torch.testing.assert_close(layer.weight.grad, want, **tol(torch.float64))


@pytest.mark.parametrize("hook", ["prehook", "posthook"])
def test_two_calls_with_a_hook_on_the_accumulator_leave_no_stale_rows(backend, hook):
    """A layer called twice in one graph while .grad is None, with a hook on the weight's
    AccumulateGrad node (both calls' rows reach .grad in its one add): after
    ``zero_grad(set_to_none=True)`` the next gradient holds that backward's rows alone."""
    cfg = make_cfg("unified", "unit", 0.0, k=1)
    layer = make_layer(7, 3, cfg)
    acc = layer.weight.view_as(layer.weight).grad_fn.next_functions[0][0]
    if hook == "prehook":
        acc.register_prehook(lambda grad_outputs: None)
    else:
        acc.register_hook(lambda grad_inputs, grad_outputs: None)
    gen = torch.Generator().manual_seed(6)
    x, x2 = randn(8, 7, gen=gen), randn(8, 7, gen=gen)
    g_a, g_b, g_c = (torch.zeros(8, 3, dtype=torch.float64) for _ in range(3))
    g_a[:, 0], g_b[:, 2], g_c[:, 1] = 1.0, 1.0, 1.0  # each call keeps one row of its own
    ((layer(x) * g_a).sum() + (layer(x) * g_b).sum()).backward()
    layer.zero_grad(set_to_none=True)
    layer(x2).backward(g_c)
    want = ref_step(cfg, x2, layer.weight, g_c, None)[1]
    torch.testing.assert_close(layer.weight.grad, want, **tol(torch.float64))


@pytest.mark.parametrize(
    "case", ["steady", "held", "log", "no_grad", "dtype", "view", "untracked_mask", "new_mask"]
)
def test_repeated_call_reads_buffer_and_mask_in_cpp_only_where_it_may(case):
    """A SparseLinear's repeated call reads its weight's kept gradient buffer and row mask in
    C++ (``sparse_linear_try``); wherever ``_fast_args`` would do more than read them (a buffer
    somebody holds, a row log to drop, a mask to make) or the call would not take the C++ path,
    that returns None and the checked path runs."""
    from msbp import native
    from msbp.ops.touched_rows import ROWS_LOG, ROWS_MASK

    if not native.use_native():
        pytest.skip(f"native kernels unavailable: {native.status()['error']}")
    layer = make_layer(6, 9, make_cfg("unified", "unit", 0.8, k=2), dtype=torch.float32)
    opt = msbp.optim.LazyRowAdam(layer.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    opt.zero_grad()
    w, held = layer.weight, None
    if case == "held":
        held = w.__dict__["_msbp_kept_grad_buffer"][0]
    elif case == "log":
        w.__dict__[ROWS_LOG] = [torch.tensor([1])]
    elif case == "dtype":
        x = x.double()
    elif case == "view":
        w = w[:]
    elif case == "new_mask":
        del w.__dict__[ROWS_MASK]
    elif case == "untracked_mask":
        del opt  # no optimizer tracks the rows: no mask wanted, none looked up
        del w.__dict__[ROWS_MASK]
    try_ = native.eager_module().sparse_linear_try
    with torch.set_grad_enabled(case != "no_grad"):
        y = try_(x, w, layer.bias, layer.memory, layer._fast[5])
    assert (y is not None) == (case in ("steady", "untracked_mask")), case
    if y is not None:
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, layer.bias))
        y.square().sum().backward()
        assert layer.weight.grad is w.__dict__["_msbp_kept_grad_buffer"][0]
    del held


@pytest.mark.parametrize("how", ["detach", "data", "numpy"])
def test_kept_alias_of_an_old_gradient_is_not_overwritten(backend, how):
    """A .detach(), .data or NumPy view of an old .grad, kept after zero_grad(set_to_none=True),
    shares the memory of the buffer the layer would put back: the next backward must leave it
    as it was and still give the right gradient (the layer takes fresh memory)."""
    cfg = make_cfg("unified", "unit", 0.0, k=2)
    layer = make_layer(4, 8, cfg)
    gen = torch.Generator().manual_seed(2)
    x1, g1, x2, g2 = (randn(3, d, gen=gen) for d in (4, 8, 4, 8))
    layer(x1).backward(g1)
    grad = layer.weight.grad
    old = grad.detach() if how == "detach" else grad.data if how == "data" else grad.numpy()
    before = torch.as_tensor(old).clone()
    layer.zero_grad(set_to_none=True)
    del grad
    layer(x2).backward(g2)
    assert torch.equal(torch.as_tensor(old), before)
    want = ref_step(cfg, x2, layer.weight, g2, None)[1]
    torch.testing.assert_close(layer.weight.grad, want, **tol(torch.float64))


@pytest.mark.parametrize("shape", [(3, 4, D_IN), (1, 2, 3, D_IN)])
@pytest.mark.parametrize("bias", [True, False])
def test_output_of_a_batched_input_can_be_modified_in_place(backend, shape, bias):
    """F.linear returns a view of its 2-d result for a (*, in) input with more than one batch
    dim; a custom autograd function's output that is such a view cannot be modified in place,
    so `Linear -> ReLU(inplace=True)` (timm SwinV2's position-bias MLP) raised."""
    layer = make_layer(D_IN, D_OUT, make_cfg(k=3, memory=0.8), bias=bias)
    twin = copy.deepcopy(layer)
    x = randn(*shape, gen=torch.Generator().manual_seed(1))
    torch.relu_(layer(x)).square().sum().backward()
    torch.relu(twin(x)).square().sum().backward()  # the out-of-place twin as the reference
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.memory, twin.memory, rtol=0, atol=0)
    assert layer.memory.any()


# (input shape, out, k, options): the corners of the op's domain
_EDGE_CASES = [
    ((1, 5), 3, 1, {}),
    ((4, 1), 7, 2, {}),  # in = 1
    ((4, 6), 1, 1, {}),  # out = 1
    ((4, 6), 7, 7, {}),  # k = out
    ((2, 3, 6), 9, 2, {}),
    ((2, 3, 6), 9, 2, {"noncontig": True}),
    ((5, 6), 9, 2, {"bias": False}),
    ((5, 6), 9, 2, {"mem": False}),
    ((5, 6), 9, 2, {"alpha": 0.0}),
    ((5, 6), 9, 2, {"xgrad": False}),
    ((5, 6), 9, 2, {"wgrad": False}),
    ((5, 6), 9, 2, {"zero_rows": (0, 3)}),
    ((5, 6), 9, 2, {"zero_rows": (0, 1, 2, 3, 4)}),
    ((5, 6), 9, 2, {"zero_rows": (0, 3), "rows": "all"}),
    ((0, 6), 9, 2, {}),  # an empty batch
    ((3, 0, 6), 9, 2, {}),
    ((5, 6), 9, 2, {"gscale": 2.0**-100}),  # exact scaling: below float16's range
    ((64, 300), 700, 30, {}),
    ((33, 17), 129, 5, {"noncontig": True, "zero_rows": (2, 31)}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=dtype_id)
@pytest.mark.parametrize("layout", ["unit", "slot"])
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_functional_corner_cases_match_reference(selection, layout, dtype):
    """Empty batches, a zero dimension, in / out = 1, k = out, non-contiguous inputs, no bias or
    memory, one operand requiring grad, zero rows, tiny gradients, 16-bit dtypes: the active
    backend equals the oracle, over two steps (the memory carried from the first)."""
    low = dtype in (torch.bfloat16, torch.float16)
    close = {"rtol": 1e-2, "atol": 1e-2} if low else tol(dtype)
    gen = torch.Generator().manual_seed(0)
    mem_dtype = memory_dtype(dtype)
    for shape, out, k, opts in _EDGE_CASES:
        alpha = opts.get("alpha", 0.8)
        d_in, rows = shape[-1], math.prod(shape[:-1])
        w0 = torch.randn(out, d_in, generator=gen).to(dtype)
        w = w0.clone().requires_grad_(opts.get("wgrad", True))
        b = torch.randn(out, generator=gen).to(dtype).requires_grad_(True) if opts.get(
            "bias", True) else None
        memory = None
        if opts.get("mem", True):
            memory = torch.zeros((out,) if layout == "unit" else (rows, out), dtype=mem_dtype)
        ref_memory = None if memory is None else memory.clone()
        cfg = msbp.SparseBackpropConfig(k=k, memory=alpha, selection=selection,
                                        memory_layout=layout,
                                        memory_rows=opts.get("rows", "active"))
        # in 16 bits exact ties are common (at the k-th place in most rows of 64 x 700): every
        # backend keeps the tied units of lowest index, as the reference does
        for _ in range(2):
            if opts.get("noncontig"):
                x0 = torch.randn(*shape[:-1], 2 * d_in, generator=gen).to(dtype)[..., ::2]
            else:
                x0 = torch.randn(*shape, generator=gen).to(dtype)
            g = torch.randn(*shape[:-1], out, generator=gen).to(dtype) * opts.get("gscale", 1.0)
            for r in opts.get("zero_rows", ()):
                g.view(-1, out)[r] = 0
            # (a clone of the strided view would be contiguous)
            x = x0 if opts.get("noncontig") else x0.clone()
            x.requires_grad_(opts.get("xgrad", True))
            w.grad = None
            if b is not None:
                b.grad = None
            sparse_linear(x, w, b, memory, config=cfg).backward(g)
            dx, dW, db, ref_memory = sparse_linear_backward_ref(
                x0.detach(), w0, g, ref_memory, k=k, selection=selection, alpha=alpha,
                layout=layout, rows=opts.get("rows", "active"),
            )
            case = f"{shape} out={out} k={k} {opts}"

            def msg(m: str, case: str = case) -> str:
                return f"{case}: {m}"

            if x.requires_grad:
                torch.testing.assert_close(x.grad, dx.to(dtype), **close, msg=msg)
            if w.requires_grad:
                torch.testing.assert_close(w.grad, dW.to(dtype), **close, msg=msg)
            if b is not None:
                torch.testing.assert_close(b.grad, db.to(dtype), **close, msg=msg)
            if memory is not None and alpha > 0:
                torch.testing.assert_close(memory, ref_memory, **close, msg=msg)


# --- the short path of a repeated call (SparseLinear.forward) ------------------------------------


def _calls_of_checked_path(monkeypatch) -> list:
    import msbp.nn.linear as linear_mod

    calls = []
    checked = linear_mod.sparse_linear_checked

    def spy(*args, **kwargs):
        calls.append(1)
        return checked(*args, **kwargs)

    monkeypatch.setattr(linear_mod, "sparse_linear_checked", spy)
    return calls


def test_repeated_calls_take_the_short_path_with_the_same_results(monkeypatch):
    """After one checked call the layer's later calls skip the checks (native backend; the
    PyTorch path always checks) and train exactly as calls through ``sparse_linear`` do."""
    if not msbp.native.use_native():
        pytest.skip("the short path is the C++ path's")
    calls = _calls_of_checked_path(monkeypatch)
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.8, selection="per_example")
    layer = SparseLinear(D_IN, D_OUT, config=cfg)
    twin = copy.deepcopy(layer)
    assert twin._fast is None  # a copy finds its own objects again
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, g = torch.randn(6, D_IN, generator=gen), torch.randn(6, D_OUT, generator=gen)
        for p in (*layer.parameters(), *twin.parameters()):
            p.grad = None
        layer(x).backward(g)
        sparse_linear(x, twin.weight, twin.bias, twin.memory, config=cfg).backward(g)
        assert torch.equal(layer.weight.grad, twin.weight.grad)
        assert torch.equal(layer.bias.grad, twin.bias.grad)
        assert torch.equal(layer.memory, twin.memory)
    assert len(calls) == 1  # the first call only


def _change_config(layer):
    layer.config = layer.config.replace(k=5)


def _change_memory(layer):
    layer.memory = torch.full_like(layer.memory, 0.5)


def _change_name(layer):
    layer.name = "renamed"


def _change_probe(layer):
    layer.probe = lambda g, x, propagated: layer.__dict__.setdefault("probed", []).append(1)


def _change_weight(layer):
    layer.weight = nn.Parameter(layer.weight.detach() * 2)


def _change_bias(layer):
    layer.bias = None


def _freeze_weight(layer):
    layer.weight.requires_grad_(False)


@pytest.mark.parametrize("change", [
    _change_config, _change_memory, _change_name, _change_probe, _change_weight, _change_bias,
    _freeze_weight,
], ids=lambda f: f.__name__[1:])
def test_repeated_call_sees_what_changed(change, backend):
    """A change to the layer between calls is honoured: its result equals a fresh layer's in
    the same state (k, memory, weight, bias, requires_grad), and the call records the new state
    for the next one."""
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.8)
    layer = SparseLinear(D_IN, D_OUT, config=cfg)
    gen = torch.Generator().manual_seed(0)
    layer(torch.randn(4, D_IN, generator=gen)).sum().backward()  # checked, then recorded
    change(layer)
    fresh = copy.deepcopy(layer)
    x, g = torch.randn(4, D_IN, generator=gen), torch.randn(4, D_OUT, generator=gen)
    outs = []
    for m in (layer, fresh):
        m.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        y = m(xr)
        y.backward(g)
        outs.append((y, xr.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for got, want in ((layer.weight.grad, fresh.weight.grad), (layer.memory, fresh.memory)):
        assert (got is None and want is None) or torch.equal(got, want)
    if layer.bias is not None:
        assert torch.equal(layer.bias.grad, fresh.bias.grad)
    if change is _change_config:  # the new k reached the backward: 5 rows of dW
        assert int((layer.weight.grad.abs().sum(1) > 0).sum()) == 5
    if change is _change_probe:  # the copy shares the probe: called by both layers
        assert layer.probed == [1, 1]
    if change is _change_name:  # the backward's errors name the layer as it is called now
        g_bad = torch.full((4, D_OUT), float("nan"))
        with pytest.raises(FloatingPointError, match="'renamed'"):
            layer(x).backward(g_bad)


@pytest.mark.parametrize("what", ["bias", "memory", "weight"])
def test_repeated_call_after_an_in_place_reshape_raises_value_error(what, backend):
    """A tensor of the layer reshaped in place (``.data = ...``: the same object) between calls
    gets the ValueError a first call gives, in the forward (the bias and memory once raised
    at::linear's or the backward kernel's RuntimeError)."""
    layer = SparseLinear(D_IN, D_OUT, config=msbp.SparseBackpropConfig(k=3, memory=0.8))
    x = torch.randn(4, D_IN)
    for _ in range(2):
        layer(x).sum().backward()
    tensor = getattr(layer, what)
    tensor.data = torch.zeros(*tensor.shape[:-1], tensor.shape[-1] - 1)
    with pytest.raises(ValueError, match=f"{what} of shape"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_repeated_call_after_an_in_place_dtype_change_is_checked(dtype, monkeypatch):
    """``layer.to(dtype)`` converts the Parameters in place (the same objects): the next call
    must take the path a first call in that dtype takes (16-bit: not the C++ function)."""
    calls = _calls_of_checked_path(monkeypatch)
    layer = SparseLinear(D_IN, D_OUT, config=msbp.SparseBackpropConfig(k=3, memory=0.8))
    layer(torch.randn(4, D_IN)).sum().backward()
    layer.to(dtype)
    x, g = torch.randn(4, D_IN, dtype=dtype), torch.randn(4, D_OUT, dtype=dtype)
    twin = copy.deepcopy(layer)
    for m in (layer, twin):
        m.zero_grad(set_to_none=True)
    layer(x).backward(g)
    sparse_linear(x, twin.weight, twin.bias, twin.memory, config=twin.config).backward(g)
    assert len(calls) == 2  # checked again after the change
    assert torch.equal(layer.weight.grad, twin.weight.grad)
    assert torch.equal(layer.memory, twin.memory)


def test_repeated_call_still_rejects_bad_input():
    layer = SparseLinear(D_IN, D_OUT, config=msbp.SparseBackpropConfig(k=3, memory=0.8))
    layer(torch.randn(4, D_IN)).sum().backward()
    with pytest.raises(ValueError, match=r"input of shape \(4, 7\) does not match weight"):
        layer(torch.randn(4, 7))
    with torch.no_grad():  # the plain product, no graph
        assert not layer(torch.randn(4, D_IN)).requires_grad
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda x: layer(x).sum())(torch.randn(4, D_IN))


@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (64, 128, 600, 150), (40, 96, 300, 300)],
                         ids=["loops", "gemm", "dense_k"])
@pytest.mark.parametrize("selection", ["unified", "per_example", "random"])
@pytest.mark.parametrize("memory", [0.0, 0.8])
def test_transposed_weight_equals_the_contiguous_one(shape, selection, memory, backend):
    """transformers' Conv1D stores W^T, and SparseHFConv1D passes weight.t() (strides (1, out)):
    outputs, gradients and memory over three steps (.grad kept or set to None) equal those of a
    SparseLinear on a contiguous copy of the weight, and the gradient reaches W^T contiguous
    (the native backward makes dW in the weight's layout: copying the weight whole and adding
    a transposed dW into .grad had made a 768 x 3072 layer's backward slower than dense)."""
    from msbp.nn.hf_conv1d import SparseHFConv1D

    n, d_in, out, k = shape
    cfg = msbp.SparseBackpropConfig(k=k, memory=memory, selection=selection)
    conv = SparseHFConv1D(out, d_in, config=cfg, dtype=torch.float64)
    lin = SparseLinear(d_in, out, config=cfg, dtype=torch.float64)
    with torch.no_grad():
        conv.bias.normal_()
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    gens = [torch.Generator().manual_seed(5) for _ in range(2)]
    if selection == "random":
        conv.generator, lin.generator = gens
    data = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(n, d_in, generator=data, dtype=torch.float64)
        g = torch.randn(n, out, generator=data, dtype=torch.float64)
        results = []
        for m in (conv, lin):
            m.zero_grad(set_to_none=step == 1)
            xr = x.clone().requires_grad_(True)
            y = m(xr)
            y.backward(g)
            results.append((y, xr.grad, m.bias.grad, m.memory))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(conv.weight.grad, lin.weight.grad.t(), rtol=1e-12, atol=1e-12)
    # the gradient as autograd hands it over, before AccumulateGrad lays it out like .grad
    w = conv.weight.detach().clone().requires_grad_(True)
    y = msbp.functional.sparse_linear(x, w.t(), None, None, config=cfg)
    (gw,) = torch.autograd.grad(y, w, g)
    kept = int((gw.abs().sum(0) > 0).sum())
    # (where most rows are kept, per-example, a contiguous dW and autograd's transposing copy)
    assert gw.is_contiguous() or 2 * kept >= out


@pytest.mark.parametrize("hot", [None, 60, 4], ids=["copy", "gather", "gemm"])
@pytest.mark.parametrize("n", [100, 200], ids=["few_rows", "many_rows"])
def test_transposed_weight_per_example_routes(hot, n, backend):
    """Per-example top-k on a transposed weight takes one of four native routes by the rows and
    the kept columns: with more than an eighth of the columns kept, GEMMs over the scattered
    entries (up to 128 rows) or loops on a copy of W; with fewer, loops on its gathered kept
    rows, or GEMMs over them (fewer than 3k columns). The gradient's large entries in `hot` of
    600 columns steer the columns. Each equals a SparseLinear on the contiguous weight, as in
    the test above."""
    from msbp.nn.hf_conv1d import SparseHFConv1D

    d_in, out, k = 40, 600, 2
    cfg = msbp.SparseBackpropConfig(k=k, memory=0.8, selection="per_example")
    conv = SparseHFConv1D(out, d_in, config=cfg, dtype=torch.float64)
    lin = SparseLinear(d_in, out, config=cfg, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    data = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(n, d_in, generator=data, dtype=torch.float64)
        g = torch.randn(n, out, generator=data, dtype=torch.float64)
        if hot is not None:
            g[:, hot:] *= 1e-3
        grads = []
        for m in (conv, lin):
            m.zero_grad(set_to_none=True)
            xr = x.clone().requires_grad_(True)
            m(xr).backward(g)
            grads.append((xr.grad, m.bias.grad, m.memory))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(conv.weight.grad, lin.weight.grad.t(), rtol=1e-12, atol=1e-12)
        assert conv.weight.grad.is_contiguous()


@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_a_block_of_a_parameters_rows_adds_into_its_grad(selection, backend):
    """A weight that is the rows [8, 14) of a leaf Parameter (as attention's in_proj slices):
    its kept rows go into the Parameter's .grad and row log, shifted by 8, and the native path
    adds them in place, into a buffer it reuses from step to step, clearing only the rows it
    wrote where nothing else did. Over steps with .grad set to None, kept, and added to by a
    dense penalty, the gradient is a SparseLinear's on a copy of the block, at the block's rows."""
    from msbp.ops.touched_rows import take_touched_rows

    cfg = msbp.SparseBackpropConfig(k=2, memory=0.8, selection=selection)
    big = nn.Parameter(torch.randn(20, 5, dtype=torch.float64))
    lin = SparseLinear(5, 6, bias=False, config=cfg, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(big[8:14])
    memory = torch.zeros(6, dtype=torch.float64)
    track_rows(big)
    gen = torch.Generator().manual_seed(2)
    pointers = []
    for step, (none, penalty) in enumerate([(True, 0), (False, 0), (True, 0), (False, 1),
                                            (True, 0), (True, 0)]):
        x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        g = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        for p in (big, lin.weight):
            if none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        if none:
            take_touched_rows(big)
        loss = (sparse_linear(x, big[8:14], None, memory, config=cfg) * g).sum()
        twin = (lin(x) * g).sum()
        if penalty:  # (a term of weight 0 would still add a dense gradient)
            loss, twin = loss + big[8:14].square().sum(), twin + lin.weight.square().sum()
        loss.backward()
        twin.backward()
        want = torch.zeros_like(big)
        want[8:14] = lin.weight.grad
        torch.testing.assert_close(big.grad, want, rtol=1e-12, atol=1e-12, msg=f"step {step}")
        torch.testing.assert_close(memory, lin.memory, rtol=1e-12, atol=1e-12)
        if none:
            assert logged_rows(big) == written_rows(big)
        pointers.append(big.grad.data_ptr())
    if backend == "native":
        assert len(set(pointers)) == 1  # one buffer throughout


@pytest.mark.parametrize("k", [0, 1, 5], ids=["k0", "k1", "k_out"])
def test_a_block_of_rows_logs_what_it_writes(k, backend):
    """The rows logged for a block P[a:b] of a Parameter are those its backward wrote: shifted
    by a once, also where it runs dense (k = 0 or k >= out: they had been shifted twice, past
    the end of P for its last block); a backward that finds P.grad None drops the rows logged
    into the discarded gradient (the PyTorch path had kept them); and one that uses P whole and
    a block of it keeps both calls' rows (the whole call had dropped the block's, logged first
    in the same backward)."""
    cfg = msbp.SparseBackpropConfig(k=k, memory=0.8)
    gen = torch.Generator().manual_seed(0)
    P = nn.Parameter(torch.randn(8, 3, dtype=torch.float64, generator=gen))
    track_rows(P)
    for _ in range(3):
        P.grad = None
        x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
        g = torch.randn(4, 3, dtype=torch.float64, generator=gen)
        (sparse_linear(x, P[5:8], None, torch.zeros(3, dtype=torch.float64), config=cfg)
         * g).sum().backward()
        assert logged_rows(P) == written_rows(P)
        assert set(written_rows(P)) <= {5, 6, 7}
    P.grad = None
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    g1 = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    g2 = torch.randn(4, 2, dtype=torch.float64, generator=gen)
    whole = sparse_linear(x, P, None, None, config=cfg)
    block = sparse_linear(x, P[0:2], None, None, config=cfg)
    ((whole * g1).sum() + (block * g2).sum()).backward()
    assert logged_rows(P) == written_rows(P)


def test_kept_buffer_of_an_old_dtype_is_not_put_back_after_to(backend):
    """The C++ path keeps the gradient buffer it handed over as .grad. When .grad was another
    tensor at a .to(float32) (a gradient autograd made: here through functional_call with
    computed parameters), .to() converted that one and the float64 buffer stayed kept; a
    forward that found .grad set, then zero_grad() before the backward, put the float64 buffer
    back: backward failed ("expected scalar type Float but found Double"). Found by the
    API-combination fuzz (a float64 .grad of a float32 weight after such a sequence)."""
    torch.manual_seed(0)
    layer = SparseLinear(4, 6, config=msbp.SparseBackpropConfig(k=2, memory=0.0)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    layer(x).square().sum().backward()  # .grad is the kept buffer
    layer.zero_grad()
    params = {k: v * 1.0 for k, v in layer.named_parameters()}
    torch.func.functional_call(layer, params, (x,)).square().sum().backward()  # a fresh .grad
    layer.to(torch.float32)
    loss = layer(x.float()).square().sum()  # .grad is set at this forward
    layer.zero_grad()
    loss.backward()
    assert layer.weight.grad.dtype == torch.float32
    want = sparse_linear_backward_ref(
        x.float(), layer.weight.detach(), 2 * (x.float() @ layer.weight.detach().t()
                                               + layer.bias.detach()), None, k=2
    )[1]
    torch.testing.assert_close(layer.weight.grad, want)


@pytest.mark.parametrize("selection", ["unified", "per_example"])
@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 7)])
def test_a_layer_with_no_input_features_backpropagates_as_nn_linear(backend, selection, shape):
    """``SparseLinear(0, out)`` (an x of shape (*, 0)): nn.Linear gives dx of shape (*, 0), an
    empty dW and db. Its backward reshaped x with reshape(-1, 0), which is ambiguous (both
    backends raised "cannot reshape tensor of 0 elements" in backward), and the native kernels
    divided by the column block width, 0 (SIGFPE: the process died). Found by the
    malformed-input fuzz (a 6 x 0 input)."""
    torch.manual_seed(0)
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.5, selection=selection)
    layer = SparseLinear(0, 10, config=cfg)
    dense = nn.Linear(0, 10)
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "memory"})
    x = torch.randn(*shape[:-1], 0, requires_grad=True)
    xd = x.detach().clone().requires_grad_()
    g = torch.randn(*shape[:-1], 10)
    layer(x).backward(g)
    dense(xd).backward(g)
    assert x.grad.shape == x.shape
    assert layer.weight.grad.shape == (10, 0)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    assert torch.isfinite(layer.memory).all()


@pytest.mark.parametrize("how", ["expand", "as_strided"])
@pytest.mark.parametrize("layout", ["unit", "slot"])
@pytest.mark.parametrize("via", ["functional", "layer"])
def test_a_memory_sharing_its_own_storage_is_refused_at_the_call(backend, how, layout, via):
    """A memory whose elements share storage cannot be updated in place: an expand()ed one
    passed the call and the backward failed with PyTorch's "more than one element of the
    written-to tensor refers to a single memory location"; an as_strided one over itself
    (strides (1, 1)) was written over itself without an error. Now a ValueError at the call
    naming the shape and strides. Found by the malformed-input fuzz."""
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.5, memory_layout=layout)
    shape = (10,) if layout == "unit" else (6, 10)
    memory = (torch.zeros(1).expand(shape) if how == "expand"
              else torch.zeros(16).as_strided(shape, (0,) if layout == "unit" else (1, 1)))
    x = torch.randn(6, 7, requires_grad=True)
    with pytest.raises(ValueError, match=r"memory of shape .* strides .* share storage"):
        if via == "functional":
            sparse_linear(x, torch.randn(10, 7, requires_grad=True), None, memory, config=cfg)
        else:
            layer = SparseLinear(7, 10, config=cfg)
            layer.memory = memory
            layer(x)


@pytest.mark.parametrize("generator", [3, "seed", [1]])
def test_a_generator_of_another_type_is_refused_at_the_call(backend, generator):
    """``selection="random"`` reads the generator in backward only: an int passed the call and
    failed there with randperm's TypeError (an unhashable one with lru_cache's). Now a TypeError
    at the call naming the type. Found by the malformed-input fuzz."""
    cfg = msbp.SparseBackpropConfig(k=3, selection="random")
    layer = SparseLinear(7, 10, config=cfg)
    layer.generator = generator
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        layer(torch.randn(6, 7))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        sparse_linear(torch.randn(6, 7), layer.weight, None, None, config=cfg, generator=generator)
