"""Property-based tests (hypothesis): the fast path equals the oracle over random shapes."""

from __future__ import annotations

import math

import torch
from _helpers import (
    DTYPES,
    LAYOUTS,
    SELECTIONS,
    assert_memory_matches,
    empty_memory_like,
    fast_step,
    make_layer,
    memory_colsum,
    randn,
    ref_step,
    tol,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from msbp import SparseBackpropConfig

MEMORIES = st.sampled_from([0.0, 0.3, 0.8, 1.0])


@st.composite
def cases(draw, memories=MEMORIES):
    d_out = draw(st.integers(1, 12))
    return {
        "d_in": draw(st.integers(1, 9)),
        "d_out": d_out,
        "k": draw(st.integers(1, d_out)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "selection": draw(st.sampled_from(SELECTIONS)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "memory": draw(memories),
        "bias": draw(st.booleans()),
        "batches": draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _config(c, **over):
    fields = dict(
        ratio=None,
        k=c["k"],
        selection=c["selection"],
        memory=c["memory"],
        memory_layout=c["layout"],
    )
    fields.update(over)
    return SparseBackpropConfig(**fields)


@settings(max_examples=100)
@given(cases())
def test_fast_path_equals_reference(c):
    cfg = _config(c)
    dtype, d_in, d_out = c["dtype"], c["d_in"], c["d_out"]
    layer = make_layer(d_in, d_out, cfg, dtype=dtype, seed=c["seed"], bias=c["bias"])
    layer.generator = torch.Generator().manual_seed(c["seed"])
    ref_gen = torch.Generator().manual_seed(c["seed"])
    ref_mem = empty_memory_like(layer) if cfg.memory > 0 else None
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    t = tol(dtype)
    for n in c["batches"]:
        x, g = randn(n, d_in, gen=gen, dtype=dtype), randn(n, d_out, gen=gen, dtype=dtype)
        dx, dW, db = fast_step(layer, x, g)
        rdx, rdW, rdb, ref_mem = ref_step(cfg, x, layer.weight, g, ref_mem, ref_gen)
        torch.testing.assert_close(dx, rdx, **t)
        torch.testing.assert_close(dW, rdW, **t)
        if c["bias"]:
            torch.testing.assert_close(db, rdb, **t)
        if ref_mem is None:
            assert not layer.memory.any()
        else:
            assert_memory_matches(layer.memory, ref_mem, cfg, d_out, **t)


@given(cases(memories=st.just(1.0)))
def test_alpha_one_conserves_column_sums(c):
    cfg = _config(c, memory=1.0)
    d_in, d_out = c["d_in"], c["d_out"]
    layer = make_layer(d_in, d_out, cfg, seed=c["seed"])
    layer.generator = torch.Generator().manual_seed(c["seed"])
    total_g = torch.zeros(d_out, dtype=torch.float64)
    total_p = torch.zeros(d_out, dtype=torch.float64)

    def probe(g, x, p):
        total_g.add_(g.sum(0))
        total_p.add_(p.sum(0))

    layer.probe = probe
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    for n in c["batches"] * 3:
        fast_step(layer, randn(n, d_in, gen=gen), randn(n, d_out, gen=gen))
        torch.testing.assert_close(
            total_p + memory_colsum(layer.memory), total_g, rtol=1e-12, atol=1e-12
        )


@given(cases())
def test_k_out_is_dense_and_memory_zero(c):
    cfg = _config(c, k=c["d_out"])
    d_in, d_out = c["d_in"], c["d_out"]
    layer = make_layer(d_in, d_out, cfg, seed=c["seed"])
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    for n in c["batches"]:
        x, g = randn(n, d_in, gen=gen), randn(n, d_out, gen=gen)
        dx, dW, db = fast_step(layer, x, g)
        torch.testing.assert_close(dx, g @ layer.weight.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dW, g.t() @ x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db, g.sum(0), rtol=1e-12, atol=1e-12)
        assert not layer.memory.any()


@given(
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 12),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_per_example_cosine_bound_single_example(d_in, d_out, data, seed):
    """One example, per-example top-k, no memory: cos(dW_sparse, dW_true) >= sqrt(k/out)."""
    k = data.draw(st.integers(1, d_out))
    cfg = SparseBackpropConfig(ratio=None, k=k, selection="per_example", memory=0.0)
    layer = make_layer(d_in, d_out, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x, g = randn(1, d_in, gen=gen), randn(1, d_out, gen=gen)
    _, dW, _ = fast_step(layer, x, g)
    true = g.t() @ x
    cos = float((dW * true).sum() / (dW.norm() * true.norm()))
    assert cos >= math.sqrt(k / d_out) - 1e-12


@given(
    n=st.integers(1, 8),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 12),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_unified_inner_product_nonnegative(n, d_in, d_out, data, seed):
    """Unified top-k, no memory: <dW_sparse, dW_true> >= 0."""
    k = data.draw(st.integers(1, d_out))
    cfg = SparseBackpropConfig(ratio=None, k=k, selection="unified", memory=0.0)
    layer = make_layer(d_in, d_out, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x, g = randn(n, d_in, gen=gen), randn(n, d_out, gen=gen)
    _, dW, _ = fast_step(layer, x, g)
    assert float((dW * (g.t() @ x)).sum()) >= -1e-12
