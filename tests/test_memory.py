"""The memory: alpha = 0 / 1 identities, boundedness, when it changes, dtype and copies."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import (
    LAYOUTS,
    SELECTIONS,
    assert_memory_matches,
    empty_memory_like,
    fast_step,
    make_cfg,
    make_layer,
    memory_colsum,
    randn,
    ref_step,
    tol,
)
from torch import nn

from msbp import sparsify
from msbp.functional import sparse_linear

D_IN, D_OUT = 5, 8


def _cfg(*args, k=2, **kw):
    return make_cfg(*args, k=k, **kw)


# --- alpha = 0 is plain sparse backprop -------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_memory_zero_is_sparse_backprop_without_memory(selection, layout):
    cfg0 = _cfg(selection, layout, memory=0.0)
    layer = make_layer(D_IN, D_OUT, cfg0)
    layer.generator = torch.Generator().manual_seed(11)
    fn_gen = torch.Generator().manual_seed(11)
    ref_gen = torch.Generator().manual_seed(11)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    # the functional form with memory=None ignores config.memory, so give it 0.8 on purpose
    cfg_fn = cfg0.replace(memory=0.8)
    gen = torch.Generator().manual_seed(0)
    for n in (4, 4, 3, 6, 4):
        x, g = randn(n, D_IN, gen=gen), randn(n, D_OUT, gen=gen)
        dx, dW, db = fast_step(layer, x, g)
        xf = x.clone().requires_grad_(True)
        w.grad = b.grad = None
        sparse_linear(xf, w, b, None, config=cfg_fn, generator=fn_gen).backward(g)
        rdx, rdW, rdb, rmem = ref_step(cfg0, x, w, g, None, ref_gen)
        assert rmem is None
        for got, fn, want in ((dx, xf.grad, rdx), (dW, w.grad, rdW), (db, b.grad, rdb)):
            torch.testing.assert_close(got, want, **tol(torch.float64))
            torch.testing.assert_close(fn, want, **tol(torch.float64))
        assert not layer.memory.any()


def test_functional_alpha_zero_leaves_given_memory_alone():
    memory = torch.arange(D_OUT, dtype=torch.float64)
    before = memory.clone()
    gen = torch.Generator().manual_seed(0)
    w = randn(D_OUT, D_IN, gen=gen).requires_grad_(True)
    x, g = randn(3, D_IN, gen=gen), randn(3, D_OUT, gen=gen)
    sparse_linear(x, w, None, memory, config=_cfg(memory=0.0)).backward(g)
    assert torch.equal(memory, before)
    torch.testing.assert_close(w.grad, ref_step(_cfg(memory=0.0), x, w, g, None)[1])


# --- alpha = 1: nothing lost, only delayed ----------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_memory_one_conserves_gradient_mass(selection, layout):
    layer = make_layer(D_IN, D_OUT, _cfg(selection, layout, memory=1.0, k=2))
    layer.generator = torch.Generator().manual_seed(1)
    totals = {"g": torch.zeros(D_OUT, dtype=torch.float64), "p": None}
    totals["p"] = torch.zeros_like(totals["g"])

    def probe(g, x, propagated):
        totals["g"] += g.sum(0)
        totals["p"] += propagated.sum(0)

    layer.probe = probe
    gen = torch.Generator().manual_seed(2)
    sizes = [4, 4, 3, 5, 5, 2, 4, 4, 6, 1] * 2
    for step, n in enumerate(sizes):
        # changing inputs, and gradients with a drift so that some columns keep losing
        x = randn(n, D_IN, gen=gen)
        g = randn(n, D_OUT, gen=gen) + torch.linspace(-1, 1, D_OUT, dtype=torch.float64)
        fast_step(layer, x, g)
        lhs = totals["p"] + memory_colsum(layer.memory)
        torch.testing.assert_close(lhs, totals["g"], rtol=1e-12, atol=1e-12)
        if step == 0:
            assert layer.memory.abs().sum() > 0  # something was actually delayed
    assert len(sizes) == 20


# --- alpha < 1: the memory stays bounded (method.md section 3) --------------------------------


def _bounded_run(cfg, n, steps=60, seed=0):
    """Yield (memory, max |G| so far, max |colsum G| so far, max colsum |G| so far)."""
    layer = make_layer(D_IN, D_OUT, cfg, seed=seed)
    layer.generator = torch.Generator().manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    drift = torch.linspace(0.2, 1.0, D_OUT, dtype=torch.float64)
    max_g = max_colsum = max_abs_colsum = 0.0
    for _ in range(steps):
        g = randn(n, D_OUT, gen=gen) * 0.3 + drift  # same sign: the memory piles up
        max_g = max(max_g, float(g.abs().max()))
        max_colsum = max(max_colsum, float(g.sum(0).abs().max()))
        max_abs_colsum = max(max_abs_colsum, float(g.abs().sum(0).max()))
        fast_step(layer, randn(n, D_IN, gen=gen), g)
        yield layer.memory.clone(), max_g, max_colsum, max_abs_colsum


EPS = 1e-12


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_slot_memory_bounded_entrywise(selection, alpha):
    """Slot (fixed batch): |M_ij| <= alpha/(1-alpha) max|G| entry by entry."""
    c = alpha / (1 - alpha)
    peak = 0.0
    for mem, max_g, _, _ in _bounded_run(_cfg(selection, "slot", alpha, k=2), n=4):
        assert float(mem.abs().max()) <= c * max_g * (1 + EPS)
        peak = max(peak, float(mem.abs().max()) / (c * max_g))
    assert peak > 0.05  # the bound is not vacuous for this run


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_unit_memory_bounded_per_row(selection, alpha):
    """Unit memory is a batch sum; per row (M / n, what is added to each row) the same bound
    holds as for slot: |M_j| / n <= alpha/(1-alpha) max|G|. Tighter: |M_j| <= alpha/(1-alpha)
    max_t sum_i |G_ij|."""
    c = alpha / (1 - alpha)
    n = 4
    for mem, max_g, _, max_abs_colsum in _bounded_run(_cfg(selection, "unit", alpha), n=n):
        assert float(mem.abs().max()) / n <= c * max_g * (1 + EPS)
        assert float(mem.abs().max()) <= c * max_abs_colsum * (1 + EPS)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("selection", ["unified", "random"])
def test_unit_memory_bounded_by_column_sums_for_whole_columns(selection, alpha):
    """Unified / random keep or drop whole columns, so M_j' = alpha (colsum_j G + M_j):
    |M_j| <= alpha/(1-alpha) max_t |colsum_j G_t|."""
    c = alpha / (1 - alpha)
    peak = 0.0
    for mem, _, max_colsum, _ in _bounded_run(_cfg(selection, "unit", alpha), n=4):
        assert float(mem.abs().max()) <= c * max_colsum * (1 + EPS)
        peak = max(peak, float(mem.abs().max()) / (c * max_colsum))
    assert peak > 0.05


# --- when the memory changes ------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_gradient_accumulation_memory_once_per_backward(selection, layout):
    cfg = _cfg(selection, layout, 0.8)
    layer = make_layer(D_IN, D_OUT, cfg)
    layer.generator = torch.Generator().manual_seed(4)
    ref_gen = torch.Generator().manual_seed(4)
    ref_mem = empty_memory_like(layer)
    gen = torch.Generator().manual_seed(5)
    sum_dW = torch.zeros_like(layer.weight)
    sum_db = torch.zeros_like(layer.bias)
    layer.zero_grad(set_to_none=True)
    for _ in range(4):  # 4 micro-batches, one optimizer step
        x, g = randn(3, D_IN, gen=gen), randn(3, D_OUT, gen=gen)
        before = layer.memory.clone()
        y = layer(x)
        assert torch.equal(layer.memory, before)  # forward does not touch it
        y.backward(g)
        _, rdW, rdb, ref_mem = ref_step(cfg, x, layer.weight, g, ref_mem, ref_gen)
        sum_dW += rdW
        sum_db += rdb
        assert not torch.equal(layer.memory, before)
        assert_memory_matches(layer.memory, ref_mem, cfg, D_OUT, **tol(torch.float64))
        torch.testing.assert_close(layer.weight.grad, sum_dW, **tol(torch.float64))
        torch.testing.assert_close(layer.bias.grad, sum_db, **tol(torch.float64))


@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_two_backward_calls_accumulate(selection):
    """Two backward calls == the sum of two single calls (the second with the updated memory)."""
    cfg = _cfg(selection, "unit", 0.8)
    gen = torch.Generator().manual_seed(6)
    xs = [randn(4, D_IN, gen=gen) for _ in range(2)]
    gs = [randn(4, D_OUT, gen=gen) for _ in range(2)]
    acc = make_layer(D_IN, D_OUT, cfg)
    for x, g in zip(xs, gs, strict=True):
        acc(x).backward(g)
    single = make_layer(D_IN, D_OUT, cfg)
    parts = [fast_step(single, x, g) for x, g in zip(xs, gs, strict=True)]
    torch.testing.assert_close(acc.weight.grad, parts[0][1] + parts[1][1])
    torch.testing.assert_close(acc.bias.grad, parts[0][2] + parts[1][2])
    torch.testing.assert_close(acc.memory, single.memory)


@pytest.mark.parametrize(
    "context",
    [torch.no_grad, torch.inference_mode, torch.enable_grad],
    ids=["no_grad", "inference_mode", "forward_only"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_unchanged_without_backward(layout, context):
    layer = make_layer(D_IN, D_OUT, _cfg("unified", layout, 0.8))
    gen = torch.Generator().manual_seed(0)
    fast_step(layer, randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen))
    before = layer.memory.clone()
    x = randn(4, D_IN, gen=gen).requires_grad_(True)
    with context():
        y = layer(x)
    assert torch.equal(layer.memory, before)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_layer_used_twice_in_one_graph(selection, layout):
    """Two calls of one layer in one graph: one memory update per call (in backward order),
    and both sparse weight gradients land in the existing weight.grad."""
    cfg = _cfg(selection, layout, 0.8)
    layer = make_layer(D_IN, D_OUT, cfg)
    gen = torch.Generator().manual_seed(0)
    fast_step(layer, randn(3, D_IN, gen=gen), randn(3, D_OUT, gen=gen))  # weight.grad exists
    grad0, mem0 = layer.weight.grad.clone(), layer.memory.clone()
    x1, x2 = randn(3, D_IN, gen=gen), randn(5, D_IN, gen=gen)
    g1, g2 = randn(3, D_OUT, gen=gen), randn(5, D_OUT, gen=gen)
    ((layer(x1) * g1).sum() + (layer(x2) * g2).sum()).backward()
    matches = 0
    for order in (((x2, g2), (x1, g1)), ((x1, g1), (x2, g2))):  # the engine picks the order
        mem, total = mem0.clone(), grad0.clone()
        for x, g in order:
            _, dW, _, mem = ref_step(cfg, x, layer.weight, g, mem)
            total += dW
        matches += bool(
            mem.shape == layer.memory.shape
            and torch.allclose(mem, layer.memory, rtol=1e-10, atol=1e-12)
            and torch.allclose(total, layer.weight.grad, rtol=1e-10, atol=1e-12)
        )
    assert matches == 1


def test_nested_model_conversion_keeps_memory_float32():
    model = sparsify(
        nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 5))),
        _cfg("unified", "unit", 0.8),
    )
    model(torch.randn(6, 3)).square().sum().backward()
    before = [model[0].memory.clone(), model[1][1].memory.clone()]
    assert before[0].any() and before[1].any()
    model.half()
    for layer, mem in zip((model[0], model[1][1]), before, strict=True):
        assert layer.weight.dtype == torch.float16
        assert layer.memory.dtype == torch.float32
        assert torch.equal(layer.memory, mem)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_switching_to_dense_flushes_memory(selection, layout):
    """k = out after sparse steps: U = G + M goes through whole, and the memory empties."""
    cfg = _cfg(selection, layout, 0.8)
    layer = make_layer(D_IN, D_OUT, cfg)
    layer.generator = torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        fast_step(layer, randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen))
    assert layer.memory.any()
    layer.config = cfg.replace(k=D_OUT)
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    rdx, rdW, rdb, rmem = ref_step(layer.config, x, layer.weight, g, layer.memory.clone())
    dx, dW, db = fast_step(layer, x, g)
    torch.testing.assert_close(dx, rdx, **tol(torch.float64))
    torch.testing.assert_close(dW, rdW, **tol(torch.float64))
    torch.testing.assert_close(db, rdb, **tol(torch.float64))
    assert not rmem.any()
    assert not layer.memory.any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reset_memory(layout):
    layer = make_layer(D_IN, D_OUT, _cfg("unified", layout, 0.8))
    gen = torch.Generator().manual_seed(0)
    fast_step(layer, randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen))
    assert layer.memory.any()
    layer.reset_memory()
    assert not layer.memory.any()
    assert tuple(layer.memory.shape) == tuple(empty_memory_like(layer).shape)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_empty_batch_keeps_memory(selection, layout):
    layer = make_layer(D_IN, D_OUT, _cfg(selection, layout, 1.0))
    gen = torch.Generator().manual_seed(0)
    fast_step(layer, randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen))
    before = memory_colsum(layer.memory).clone()
    dx, dW, db = fast_step(layer, randn(0, D_IN, gen=gen), randn(0, D_OUT, gen=gen))
    assert dx.shape == (0, D_IN) and not dW.any() and not db.any()
    # alpha = 1: nothing may be lost, and an empty batch propagates nothing
    torch.testing.assert_close(memory_colsum(layer.memory), before)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_empty_batch_without_memory(selection):
    layer = make_layer(D_IN, D_OUT, _cfg(selection, "unit", 0.0))
    dx, dW, db = fast_step(
        layer, torch.zeros(0, D_IN, dtype=torch.float64), torch.zeros(0, D_OUT, dtype=torch.float64)
    )
    assert dx.shape == (0, D_IN) and not dW.any() and not db.any()


# --- dtype conversion and copies --------------------------------------------------------------


def _trained(layout="unit", dtype=torch.float32):
    layer = make_layer(D_IN, D_OUT, _cfg("unified", layout, 0.8), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        fast_step(
            layer, randn(4, D_IN, gen=gen, dtype=dtype), randn(4, D_OUT, gen=gen, dtype=dtype)
        )
    assert layer.memory.any()
    return layer


@pytest.mark.parametrize(
    ("convert", "want"),
    [
        pytest.param(lambda m: m.half(), torch.float32, id="half"),
        pytest.param(lambda m: m.bfloat16(), torch.float32, id="bfloat16"),
        pytest.param(lambda m: m.to(torch.bfloat16), torch.float32, id="to-bf16"),
        pytest.param(lambda m: m.to(torch.float16), torch.float32, id="to-f16"),
        pytest.param(lambda m: m.double(), torch.float64, id="double"),
        pytest.param(lambda m: m.to(torch.float64), torch.float64, id="to-f64"),
        pytest.param(lambda m: m.to("cpu", torch.float64), torch.float64, id="to-cpu-f64"),
        pytest.param(lambda m: m.float(), torch.float32, id="float"),
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtype_conversion_keeps_memory(layout, convert, want):
    layer = _trained(layout)
    before = layer.memory.clone()
    out = convert(layer)
    assert out is layer
    assert layer.memory.dtype == want
    assert layer.memory.shape == before.shape
    torch.testing.assert_close(layer.memory, before.to(want), rtol=0, atol=0)
    assert dict(layer.named_memories())["memory"] is layer.memory
    assert torch.equal(layer.state_dict()["memory"], layer.memory)


def test_conversion_round_trip_keeps_memory():
    layer = _trained("slot")
    before = layer.memory.clone()
    layer.half().double().bfloat16().float()
    assert layer.memory.dtype == torch.float32
    torch.testing.assert_close(layer.memory, before, rtol=0, atol=0)


def test_float64_layer_has_float64_memory():
    layer = _trained(dtype=torch.float64)
    assert layer.memory.dtype == torch.float64
    before = layer.memory.clone()
    layer.half()
    assert layer.memory.dtype == torch.float32
    torch.testing.assert_close(layer.memory, before.float(), rtol=0, atol=0)


def test_bf16_layer_trains_with_float32_memory():
    layer = _trained().bfloat16()
    gen = torch.Generator().manual_seed(3)
    x = randn(4, D_IN, gen=gen, dtype=torch.bfloat16)
    g = randn(4, D_OUT, gen=gen, dtype=torch.bfloat16)
    layer(x).backward(g)
    assert layer.memory.dtype == torch.float32
    assert layer.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(layer.memory).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deepcopy_is_independent(layout):
    layer = _trained(layout, dtype=torch.float64)
    twin = copy.deepcopy(layer)
    assert twin.config == layer.config
    assert twin.memory.data_ptr() != layer.memory.data_ptr()
    torch.testing.assert_close(twin.memory, layer.memory, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(9)
    x, g = randn(4, D_IN, gen=gen), randn(4, D_OUT, gen=gen)
    before = layer.memory.clone()
    a = fast_step(twin, x, g)
    assert torch.equal(layer.memory, before)  # the original did not move
    b = fast_step(layer, x, g)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    torch.testing.assert_close(twin.memory, layer.memory, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["unit", "slot"])
@pytest.mark.parametrize("value", [None, [0.0] * 10, 3.0])
def test_a_memory_set_to_a_non_tensor_is_refused_by_name(backend, layout, value):
    """``layer.memory = None`` means no memory (as the functional API's ``memory=None``) with
    either layout; a ``slot`` layer failed with "'NoneType' object has no attribute
    'untyped_storage'" (the check that its storage can grow). Any other non-tensor failed with
    an AttributeError from deep inside; now a TypeError naming the type. Found by the
    malformed-input fuzz."""
    import msbp

    layer = msbp.SparseLinear(7, 10, config=msbp.SparseBackpropConfig(k=3, memory_layout=layout))
    layer.memory = value
    x = torch.randn(6, 7)
    if value is None:
        layer(x).sum().backward()
        assert int((layer.weight.grad.abs().sum(1) > 0).sum()) == 3
    else:
        want = f"memory must be a Tensor or None, got {type(value).__name__}"
        with pytest.raises(TypeError, match=want):
            layer(x)
