"""The oracle (msbp.ops.reference) and the selection operators, against exact identities."""

from __future__ import annotations

import pytest
import torch
from _helpers import LAYOUTS, SELECTIONS, randn, tol

import msbp
from msbp.ops import selection as sel_ops
from msbp.ops.reference import memory_to_rows_ref, select_mask_ref, sparse_linear_backward_ref


def _dense_grads(x, w, b, g):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    torch.nn.functional.linear(x, w, b).backward(g)
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_select_mask_ref_shape_and_count(selection, k):
    gen = torch.Generator().manual_seed(k)
    u = randn(5, 7, gen=gen)
    mask = select_mask_ref(u, k, selection, torch.Generator().manual_seed(0))
    assert mask.shape == u.shape and mask.dtype == torch.bool
    assert (mask.sum(1) == k).all()
    if selection != "per_example":  # the same columns for every row
        assert (mask == mask[0:1]).all()


def test_select_mask_ref_unified_keeps_largest_column_sums():
    gen = torch.Generator().manual_seed(1)
    u = randn(6, 9, gen=gen)
    mask = select_mask_ref(u, 4, "unified")
    score = u.abs().sum(0)
    kept, dropped = score[mask[0]], score[~mask[0]]
    assert kept.min() > dropped.max()


def test_select_mask_ref_per_example_keeps_largest_entries_per_row():
    gen = torch.Generator().manual_seed(2)
    u = randn(6, 9, gen=gen)
    mask = select_mask_ref(u, 3, "per_example")
    for row, m in zip(u.abs(), mask, strict=True):
        assert row[m].min() > row[~m].max()


def test_select_mask_ref_random_reproducible_with_seed():
    u = torch.zeros(3, 10)
    a = select_mask_ref(u, 4, "random", torch.Generator().manual_seed(5))
    b = select_mask_ref(u, 4, "random", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_select_mask_ref_unknown_selection():
    with pytest.raises(ValueError, match="foo"):
        select_mask_ref(torch.zeros(2, 3), 1, "foo")


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_selection_operators_match_reference_mask(selection, k):
    gen = torch.Generator().manual_seed(10 + k)
    u = randn(4, 8, gen=gen)
    idx, witness = sel_ops.select(u, k, selection, torch.Generator().manual_seed(3))
    assert torch.isfinite(witness).all()
    mask = torch.zeros_like(u, dtype=torch.bool)
    if selection == "per_example":
        assert idx.shape == (4, k)
        mask.scatter_(1, idx, True)
    else:
        assert idx.shape == (k,)
        mask[:, idx] = True
    assert torch.equal(mask, select_mask_ref(u, k, selection, torch.Generator().manual_seed(3)))


def test_select_dispatch_unknown():
    with pytest.raises(ValueError, match="foo"):
        sel_ops.select(torch.zeros(2, 3), 1, "foo")


def test_column_scores_is_column_abs_sum():
    gen = torch.Generator().manual_seed(4)
    u = randn(5, 6, gen=gen, dtype=torch.float32).bfloat16()
    s = sel_ops.column_scores(u)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, u.float().abs().sum(0))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_ref_k_out_is_dense(alpha, selection, layout):
    gen = torch.Generator().manual_seed(0)
    x, w, b, g = randn(4, 3, gen=gen), randn(5, 3, gen=gen), randn(5, gen=gen), randn(4, 5, gen=gen)
    memory = (
        torch.zeros(5, dtype=torch.float64)
        if layout == "unit"
        else torch.zeros(4, 5, dtype=torch.float64)
    )
    dx, dW, db, new_mem = sparse_linear_backward_ref(
        x, w, g, memory, k=5, selection=selection, alpha=alpha, layout=layout
    )
    ex, ew, eb = _dense_grads(x, w, b, g)
    torch.testing.assert_close(dx, ex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dW, ew, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, eb, rtol=1e-12, atol=1e-12)
    assert not new_mem.any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_ref_gradients_are_the_masked_chain_rule(selection, layout):
    """dx = Ĝ W, dW = Ĝ^T x, db = colsum(G), M' = alpha (U - Ĝ), with Ĝ = U on the mask."""
    gen = torch.Generator().manual_seed(1)
    n, d_in, out, k, alpha = 4, 3, 6, 2, 0.7
    x, w, g = randn(n, d_in, gen=gen), randn(out, d_in, gen=gen), randn(n, out, gen=gen)
    memory = randn(out, gen=gen) if layout == "unit" else randn(n, out, gen=gen)
    dx, dW, db, new_mem = sparse_linear_backward_ref(
        x,
        w,
        g,
        memory,
        k=k,
        selection=selection,
        alpha=alpha,
        layout=layout,
        generator=torch.Generator().manual_seed(9),
    )
    u = g + (memory / n if layout == "unit" else memory)
    mask = select_mask_ref(u, k, selection, torch.Generator().manual_seed(9))
    g_hat = u * mask
    assert int((dW.abs().sum(1) > 0).sum()) <= (k if selection != "per_example" else out)
    torch.testing.assert_close(dx, g_hat @ w)
    torch.testing.assert_close(dW, g_hat.t() @ x)
    torch.testing.assert_close(db, g.sum(0))
    resid = alpha * (u - g_hat)
    torch.testing.assert_close(new_mem, resid.sum(0) if layout == "unit" else resid)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ref_alpha_zero_does_not_touch_memory(layout):
    gen = torch.Generator().manual_seed(2)
    x, w, g = randn(3, 4, gen=gen), randn(5, 4, gen=gen), randn(3, 5, gen=gen)
    memory = randn(5, gen=gen) if layout == "unit" else randn(3, 5, gen=gen)
    before = memory.clone()
    with_mem = sparse_linear_backward_ref(x, w, g, memory, k=2, alpha=0.0, layout=layout)
    without = sparse_linear_backward_ref(x, w, g, None, k=2, alpha=0.0, layout=layout)
    assert with_mem[3] is memory and torch.equal(memory, before)
    assert without[3] is None
    for a, b in zip(with_mem[:3], without[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3, 4, 7])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_to_rows_keeps_column_sums(layout, n):
    gen = torch.Generator().manual_seed(n)
    memory = randn(6, gen=gen) if layout == "unit" else randn(4, 6, gen=gen)
    rows = memory_to_rows_ref(memory, n, layout)
    assert rows.shape == (n, 6)
    total = memory if layout == "unit" else memory.sum(0)
    torch.testing.assert_close(rows.sum(0), total)
    if layout == "slot" and n == 4:
        assert torch.equal(rows, memory)  # same batch shape: row for row


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_ref_alpha_one_conserves_mass(selection, layout):
    gen = torch.Generator().manual_seed(3)
    g = randn(4, 6, gen=gen)
    memory = randn(6, gen=gen) if layout == "unit" else randn(4, 6, gen=gen)
    # with a column of ones as input, dW's single column is the column sum of the propagated part
    ones = torch.ones(4, 1, dtype=torch.float64)
    _, dW1, _, new_mem1 = sparse_linear_backward_ref(
        ones,
        torch.zeros(6, 1, dtype=torch.float64),
        g,
        memory.clone(),
        k=2,
        selection=selection,
        alpha=1.0,
        layout=layout,
        generator=torch.Generator().manual_seed(0),
    )
    mem_sum = new_mem1 if layout == "unit" else new_mem1.sum(0)
    old_sum = memory if layout == "unit" else memory.sum(0)
    torch.testing.assert_close(dW1[:, 0] + mem_sum, g.sum(0) + old_sum)


@pytest.mark.parametrize("rows", ["active", "all"])
@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_ref_empty_batch_keeps_memory(layout, rows):
    """n = 0: zero gradients and the memory unchanged (as the library's layers), not a slot
    memory spread over no rows."""
    w = torch.randn(3, 4, dtype=torch.float64)
    memory = torch.randn(3, dtype=torch.float64) if layout == "unit" else torch.randn(
        2, 3, dtype=torch.float64)
    dx, dW, db, new = sparse_linear_backward_ref(
        torch.zeros(0, 4, dtype=torch.float64), w, torch.zeros(0, 3, dtype=torch.float64),
        memory, k=1, alpha=0.5, layout=layout, rows=rows,
    )
    assert dx.shape == (0, 4) and torch.equal(dW, torch.zeros_like(w))
    assert torch.equal(db, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(new, memory)


@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_native_and_reference_break_ties_alike(selection):
    """Exactly equal scores (common in bfloat16): the native kernels and the reference both keep
    the lowest index first, so they agree entry for entry."""
    if not msbp.native.use_native():
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(0)
    n, d_in, out, k = 6, 4, 12, 3
    # every row: the same magnitude in 8 columns (signs vary), smaller elsewhere
    g = torch.full((n, out), 0.25)
    g[:, 2:10] = 1.0
    g = g * torch.where(torch.rand(n, out, generator=gen) < 0.5, -1.0, 1.0)
    x = torch.randn(n, d_in, generator=gen)
    w = torch.randn(out, d_in, generator=gen, requires_grad=True)
    memory = torch.zeros(out)
    cfg = msbp.SparseBackpropConfig(k=k, memory=0.5, selection=selection)
    xr = x.clone().requires_grad_(True)
    msbp.functional.sparse_linear(xr, w, None, memory, config=cfg).backward(g)
    dx, dW, _, mem = sparse_linear_backward_ref(
        x, w.detach(), g, torch.zeros(out), k=k, selection=selection, alpha=0.5
    )
    torch.testing.assert_close(xr.grad, dx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, dW, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(memory, mem, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("selection", ["unified", "per_example"])
@pytest.mark.parametrize(
    ("out", "k", "levels", "dtype"),
    [
        (500, 20, 0, torch.float32),  # block maxima and candidates ranked by counting
        (500, 20, 3, torch.float32),  # three magnitudes: over 128 candidates, nth_element
        (2000, 5, 0, torch.float32),  # few kept of many blocks: nth_element on the maxima
        (1200, 30, 7, torch.float64),
        (4096, 164, 0, torch.float32),  # 512 blocks
        (4096, 164, 5, torch.float32),  # 512 blocks, ties among ~4,000 candidates
        (70, 9, 4, torch.float64),
    ],
)
def test_native_topk_paths_match_reference(selection, out, k, levels, dtype):
    """Each path of the native top-k (csrc/topk.h: ranks counted in registers for short lists,
    nth_element for long ones) keeps exactly the reference's entries, ties (levels > 0: only
    that many magnitudes) taken lowest index first."""
    if not msbp.native.use_native():
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(out + k)
    n, d_in = 7, 5
    if levels:
        g = torch.randint(1, levels + 1, (n, out), generator=gen).to(dtype)
    else:
        g = torch.randn(n, out, generator=gen, dtype=dtype)
    g = g * torch.where(torch.rand(n, out, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    w = torch.randn(out, d_in, generator=gen, dtype=dtype, requires_grad=True)
    memory = torch.zeros(n, out, dtype=dtype)
    cfg = msbp.SparseBackpropConfig(k=k, memory=1.0, selection=selection, memory_layout="slot")
    xr = x.clone().requires_grad_(True)
    msbp.functional.sparse_linear(xr, w, None, memory, config=cfg).backward(g)
    dx, dW, _, mem = sparse_linear_backward_ref(
        x, w.detach(), g, torch.zeros(n, out, dtype=dtype), k=k, selection=selection,
        alpha=1.0, layout="slot",
    )
    assert torch.equal(memory == 0, mem == 0)  # the same entries kept
    # products summed in another order (MKL's kernel depends on the CPU: AVX-512 rounds apart)
    torch.testing.assert_close(memory, mem, **tol(dtype))
    torch.testing.assert_close(w.grad, dW, **tol(dtype))
    torch.testing.assert_close(xr.grad, dx, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tie_ranking_keeps_nans_and_leaves_scores_alone(dtype):
    # a NaN score (of either sign bit) always wins a slot, as in torch.topk, also in a row whose
    # ties are ranked again: the selected scores are the finiteness check's witness
    nan = float("nan")
    scores = torch.tensor([[1.0, nan, 1.0, 1.0, 0.0, -nan, 1.0],
                           [2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]], dtype=dtype)
    before = scores.clone()
    idx, vals = sel_ops.topk_by_index(scores, 3)
    assert idx[0].sort().values.tolist() == [0, 1, 5]  # both NaNs, then the first tied 1.0
    assert idx[1].sort().values.tolist() == [0, 1, 2]
    torch.testing.assert_close(vals, scores.gather(1, idx), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(scores, before, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("what", ["unified", "per_example", "channels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_pytorch_path_breaks_ties_lowest_index_first(what, dtype):
    # ReLU and padding make exact zeros common, bfloat16 equal values: the PyTorch path (on the
    # CPU) must keep the tied units the native kernels and the reference keep, whatever
    # torch.topk's own order among ties; zeros decide the rows a backward logs for LazyRowAdam
    from msbp.ops.reference import topk_ref
    from msbp.ops.sparse_conv import select_channels

    gen = torch.Generator().manual_seed(0)
    n, out, k = 40, 300, 30
    u = (torch.randn(n, out, generator=gen) * 3).round().to(dtype)  # a few values, many ties
    u[torch.rand(n, out, generator=gen) < 0.9] = 0  # ~30 non-zero entries per row: ties at k
    # the scores' type on the CPU path (float32 for 16-bit gradients)
    u = u.double() if dtype == torch.float64 else u.float()
    if what == "per_example":
        idx, vals = sel_ops.select(u, k, "per_example")
        assert torch.equal(vals, u.abs().gather(1, idx))
        got = idx.sort(1).values
        want = topk_ref(u.abs(), k, dim=1).sort(1).values
    elif what == "unified":
        u[:, 100:] = 0  # ~100 columns with a non-zero sum: ties at zero (k = 150) or not
        got = torch.cat([sel_ops.select(u, kk, "unified")[0].sort().values for kk in (30, 150)])
        want = torch.cat([topk_ref(u.abs().sum(0), kk).sort().values for kk in (30, 150)])
    else:
        u4 = u[:, :100].reshape(n, 100, 1, 1).clone()
        u4[:, 40:] = 0
        got = select_channels(u4, 30, "unified", 2, None)  # 30 of 50 per group
        scores = u4.abs().sum((0, 2, 3)).view(2, 50)
        want = (topk_ref(scores, 30, dim=1) + torch.tensor([[0], [50]])).reshape(-1).sort().values
    assert torch.equal(got, want)
