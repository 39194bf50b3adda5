"""The sparse linear backward op: native kernel == PyTorch twin == reference, on random cases."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import msbp
import msbp.native
from msbp.ops.reference import sparse_linear_backward_ref
from msbp.ops.sparse_linear import (
    SELECTION_CODES,
    _register_fake,
    sparse_linear_backward_torch,
)

native_only = pytest.mark.skipif(
    os.environ.get("MSBP_BACKEND") == "python" or not msbp.native.use_native(),
    reason="native kernels unavailable or disabled",
)


def test_native_builds_in_ci():
    """Where a compiler exists (CI), the native kernels must build: no silent fallback."""
    if os.environ.get("CI") and os.environ.get("MSBP_BACKEND", "auto") != "python":
        assert msbp.native.use_native(), msbp.native.status()["error"]


def _native(*args):
    _register_fake()
    return torch.ops.msbp.sparse_linear_backward(*args)


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-11)
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-4, atol=1e-5)


case = st.fixed_dictionaries({
    "n": st.integers(1, 40),
    "d_in": st.integers(1, 150),
    "out": st.integers(1, 60),
    "k_frac": st.floats(0.01, 1.2),
    "selection": st.sampled_from(sorted(SELECTION_CODES)),
    "layout": st.sampled_from(["unit", "slot"]),
    "alpha": st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    "compact": st.booleans(),
    "need": st.sampled_from([(True, True, True), (True, False, False), (False, True, True)]),
    "scale": st.sampled_from([None, 1.0, 1024.0]),
    "seed": st.integers(0, 2**31 - 1),
    # rows of G set to zero (padding): they take no memory and select nothing; 1.0: all but one
    "zero_rows": st.sampled_from([0.0, 0.0, 0.3, 1.0]),
})


def _inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    n, d_in, out = c["n"], c["d_in"], c["out"]
    wide = torch.float64 if c["dtype"] == torch.float64 else torch.float32
    x = torch.randn(n, d_in, generator=gen, dtype=wide).to(c["dtype"])
    w = torch.randn(out, d_in, generator=gen, dtype=wide).to(c["dtype"])
    g = torch.randn(n, out, generator=gen, dtype=wide)  # wide: no ties in the selection
    zero = torch.rand(n, generator=gen) < c["zero_rows"]
    zero[0] = False  # an all-zero G ties every unit (tests/test_padding.py has that case)
    g[zero] = 0
    shape = (out,) if c["layout"] == "unit" else (n, out)
    memory = torch.randn(shape, generator=gen, dtype=wide)
    k = max(1, min(round(c["k_frac"] * out), out + 3))
    cols = torch.randperm(out, generator=gen)[: min(k, out)]
    return x, w, g, memory, k, cols


def _run(fn, c, x, w, g, memory, k, cols):
    need_x, need_w, need_b = c["need"]
    scale = None if c["scale"] is None else torch.tensor(c["scale"])
    g_in = g if scale is None else g * c["scale"]
    return fn(
        g_in, x, w, memory, cols if c["selection"] == "random" else None, scale,
        k, SELECTION_CODES[c["selection"]], c["alpha"], c["layout"] == "slot", need_x, need_w,
        need_b, c["compact"], False, 3.0,
    )


@native_only
@given(case)
def test_native_equals_torch_twin_and_reference(c):
    x, w, g, memory, k, cols = _inputs(c)
    results = {}
    for name, fn in (("native", _native), ("torch", sparse_linear_backward_torch)):
        mem = memory.clone()
        dx, dW, db, rows, skipped = _run(fn, c, x, w, g, mem, k, cols)
        if c["compact"] and c["need"][1]:  # only the rows `rows` of dW
            assert dW.shape == (rows.numel(), w.shape[1])
            dW = torch.zeros_like(w).index_copy_(0, rows, dW)
        results[name] = (dx, dW, db, mem, sorted(rows.tolist()), int(skipped))
    need_x, need_w, need_b = c["need"]
    s = 1.0 if c["scale"] is None else c["scale"]
    if c["selection"] == "random" and k < c["out"]:  # the op's columns, not a generator's
        dx_r, dW_r, db_r, mem_r = _random_ref(x, w, g, memory, cols, c)
    else:
        dx_r, dW_r, db_r, mem_r = sparse_linear_backward_ref(
            x, w, g, memory.clone(), k=k, selection=c["selection"], alpha=c["alpha"],
            layout=c["layout"],
        )
    tol = _tol(c["dtype"])
    for name, (dx, dW, db, mem, rows, skipped) in results.items():
        assert skipped == 0
        if need_w:  # rows: every row of dW that can be non-zero, each once
            assert len(set(rows)) == len(rows)
            assert set(dW_r.abs().sum(1).nonzero().flatten().tolist()) <= set(rows)
        if need_x:
            torch.testing.assert_close(dx.double() / s, dx_r.double(), **tol, msg=name)
        if need_w:
            torch.testing.assert_close(dW.double() / s, dW_r.double(), **tol, msg=name)
        if need_b:
            torch.testing.assert_close(db.double() / s, db_r.double(), **tol, msg=name)
        if c["alpha"] > 0:
            torch.testing.assert_close(mem.double(), mem_r.double(), **tol, msg=name)
    assert results["native"][4] == results["torch"][4]


def _random_ref(x, w, g, memory, cols, c):
    """The reference's masked backward for random selection with the op's columns ``cols``,
    on the active (not all-zero) rows only."""
    n, out = g.shape
    active = (g != 0).any(1)
    n_act = int(active.sum())
    u = g.double()
    if c["alpha"] > 0 and n_act:
        add = memory.double() / n_act if c["layout"] == "unit" else memory.double()
        u = u + torch.where(active.unsqueeze(1), add, 0.0)
    mask = torch.zeros(n, out, dtype=torch.bool)
    mask[:, cols] = True
    g_hat = torch.where(mask, u, 0.0)
    dx = g_hat.to(x.dtype) @ w
    dW = g_hat.to(x.dtype).t() @ x
    resid = c["alpha"] * (u - g_hat)
    mem = resid.sum(0) if c["layout"] == "unit" else torch.where(
        active.unsqueeze(1), resid, memory.double())
    if not n_act:
        mem = memory
    return dx, dW, g.sum(0), mem.to(memory.dtype)


@pytest.mark.parametrize("selection", sorted(SELECTION_CODES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_large_finite_gradients_are_finite(backend, selection, dtype):
    """Finite values are never called non-finite: fp16 values whose sum overflows 65504 and
    float32 values near 1e37 summed over the batch (both raised before)."""
    big = 6e4 if dtype == torch.float16 else (3e38 if dtype == torch.bfloat16 else 1e37)
    layer = msbp.SparseLinear(4, 8, config=msbp.SparseBackpropConfig(
        k=2, memory=0.0, selection=selection))
    x = torch.randn(64, 4, requires_grad=True)
    y = layer(x)
    g = torch.full_like(y, big, dtype=dtype).to(y.dtype) if dtype == torch.float32 else None
    if g is None:
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x.to(dtype))
        g = torch.full(y.shape, big, dtype=y.dtype)
    y.backward(g)  # must not raise FloatingPointError
    assert x.grad is not None


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_backend_auto_dense_decision_flushes_memory(backend, layout, monkeypatch):
    """backend="auto" that chose dense: U = G + M goes through whole, the memory is emptied;
    that chose sparse: the ordinary sparse backward. Decisions are cached per key."""
    from msbp.ops import sparse_linear as sl

    cfg = msbp.SparseBackpropConfig(k=2, memory=0.8, memory_layout=layout, backend="auto")
    for sparse in (False, True):
        monkeypatch.setattr(sl, "_AUTO_DECISIONS", {})  # a decision cached earlier is not asked
        monkeypatch.setattr(sl, "sparse_pays", lambda *a, sparse=sparse: sparse)
        layer = msbp.SparseLinear(5, 7, config=cfg, dtype=torch.float64)
        gen = torch.Generator().manual_seed(0)
        memory = None
        for _ in range(2):
            x = torch.randn(4, 5, dtype=torch.float64, generator=gen)
            g = torch.randn(4, 7, dtype=torch.float64, generator=gen)
            if not sparse:  # something remembered: the dense path must flush it
                with torch.no_grad():
                    layer.memory.copy_(torch.randn(layer.memory.shape, dtype=torch.float64,
                                                   generator=gen))
            before = layer.memory.clone()
            layer.zero_grad(set_to_none=True)
            layer(x).backward(g)
            dx_r, dW_r, _, memory = sparse_linear_backward_ref(
                x, layer.weight.detach(), g, before, k=2 if sparse else 7, alpha=0.8,
                layout=layout,
            )
            torch.testing.assert_close(layer.weight.grad, dW_r)
            if sparse:
                torch.testing.assert_close(layer.memory, memory)
            else:
                assert not layer.memory.any()


def test_backend_auto_decided_costs_a_forward_no_probe(backend, monkeypatch):
    """Once decided, a forward with backend="auto" looks the decision up: no random output
    gradient for the probe (at 1024 x 4096 that had cost 17 ms at every call, 1 thread, where
    the sparse backward takes ~2.5 ms), no measuring."""
    from msbp.ops import sparse_linear as sl

    monkeypatch.setattr(sl, "_AUTO_DECISIONS", {})
    layer = msbp.SparseLinear(20, 30, config=msbp.SparseBackpropConfig(
        k=3, memory=0.8, backend="auto"))
    layer(torch.randn(8, 20)).sum().backward()
    assert len(sl.auto_decisions()) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(sl, "sparse_pays", refuse)
    monkeypatch.setattr(torch, "randn", refuse)
    for rows in (8, 7):  # 7 rows: the same bucket
        layer(torch.ones(rows, 20)).sum().backward()
    assert len(sl.auto_decisions()) == 1


def test_backend_auto_measures_once_without_side_effects(backend):
    from msbp.ops import sparse_linear as sl

    g, x, w = torch.randn(8, 30), torch.randn(8, 20), torch.randn(30, 20)
    memory = torch.randn(30)
    kept = memory.clone()
    args = (g, x, w, memory, None, None, 3, 0, 0.8, False, True, True, True, True, False, 3.0)
    sl._AUTO_DECISIONS.clear()
    first = sl.sparse_pays(backend == "native", args, 8)
    assert torch.equal(memory, kept)
    assert len(sl.auto_decisions()) == 1
    assert sl.sparse_pays(backend == "native", args, 7) == first  # 7 rows: the same bucket
    assert len(sl.auto_decisions()) == 1


def test_backend_auto_measures_a_transposed_weight_as_its_own_case(backend, monkeypatch):
    """backend="auto" on GPT-2's Conv1D (a transposed weight view): decided apart from a
    SparseLinear of the same shape (its routes differ), and measured as its call runs, with dW
    handed to autograd dense in W^T's layout (not the compact rows a Parameter's call adds
    into .grad, which had made the sparse path look cheaper than it is there)."""
    from msbp.nn.hf_conv1d import SparseHFConv1D
    from msbp.ops import sparse_linear as sl

    monkeypatch.setattr(sl, "_AUTO_DECISIONS", {})
    compact = []
    run = sl.run_backward

    def record(native_ok, *args, **kwargs):
        compact.append(args[13])
        return run(native_ok, *args, **kwargs)

    monkeypatch.setattr(sl, "run_backward", record)
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.8, backend="auto")
    for layer in (msbp.SparseLinear(20, 30, config=cfg), SparseHFConv1D(30, 20, config=cfg)):
        compact.clear()
        layer(torch.randn(8, 20)).sum().backward()
        assert compact[:2] == [isinstance(layer, msbp.SparseLinear)] * 2  # the measured calls
    assert len(sl.auto_decisions()) == 2


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_native_per_example_rows_fused_equal_two_passes(dtype, alpha):
    """On one thread per-example top-k ranks each row as pass 1 makes it (U never written
    whole); on two, at this size, pass 1 writes U by column chunks and the top-k reads it back.
    Both must give the same bits, padding rows and the unit memory's residual sums included,
    and the same non-finite handling (raise; skip with the memory left alone)."""
    gen = torch.Generator().manual_seed(3)
    n, d_in, out, k = 320, 24, 2000, 5  # active rows x out: 2 chunks of pass 1 on 2 threads
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, d_in, generator=gen, dtype=wide).to(dtype)
    w = torch.randn(out, d_in, generator=gen, dtype=wide).to(dtype)
    g = torch.randn(n, out, generator=gen, dtype=wide).to(dtype)
    g[::7] = 0  # padding rows: run on the active rows through the row map
    memory = torch.randn(out, generator=gen, dtype=wide)
    code = SELECTION_CODES["per_example"]

    def run(threads, grad, skip):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            mem = memory.clone()
            res = _native(grad, x, w, mem, None, None, k, code, alpha, False, True, True,
                          True, False, skip, 3.0)
            return [*res, mem]
        finally:
            torch.set_num_threads(before)

    for one, two in zip(run(1, g, False), run(2, g, False), strict=True):
        assert torch.equal(one, two)
    bad = g.clone()
    bad[150, 1234] = float("nan")  # a row after which the fused pass only sums db
    one, two = run(1, bad, True), run(2, bad, True)
    for a, b in zip(one[:2], two[:2], strict=True):  # dense GEMMs: MKL's bits vary by threads
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-3)
    for a, b in zip(one[2:], two[2:], strict=True):  # db, rows, skipped, memory (unchanged)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert int(one[4]) == 1 and torch.equal(one[5], memory)
    for threads in (1, 2):
        mem = memory.clone()
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with pytest.raises(RuntimeError, match="non-finite"):
                _native(bad, x, w, mem, None, None, k, code, alpha, False, True, True, True,
                        False, False, 3.0)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(mem, memory)


@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_flop_counter_counts_the_k_wide_products(backend, kind):
    """Under ``FlopCounterMode`` (which Lightning's ``measure_flops`` builds on) a sparse layer's
    backward counts as its k-wide products: 2 n k in for dx and as many for dW's rows, the same
    under both backends. The C++ path computed below the dispatcher, where a mode sees nothing:
    the sparse layers' backward counted 0 (and the native op had no formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    n, k = 6, 3
    if kind == "linear":
        model = msbp.sparsify(
            torch.nn.Sequential(torch.nn.Linear(7, 10), torch.nn.Tanh(), torch.nn.Linear(10, 9),
                                torch.nn.Tanh(), torch.nn.Linear(9, 4)),
            msbp.SparseBackpropConfig(k=k), exclude="4",
        )
        x = torch.randn(n, 7)
        forward = 2 * n * (7 * 10 + 10 * 9 + 9 * 4)
        # the head: dx and dW; hidden 2: dx and k rows of dW; hidden 1: k rows of dW only
        want = forward + 2 * 2 * n * 9 * 4 + 2 * 2 * n * k * 10 + 2 * n * k * 7
    else:
        steps, hidden = 4, 5
        model = msbp.sparsify(torch.nn.LSTM(3, hidden), msbp.SparseBackpropConfig(k=k))
        x = torch.randn(steps, n, 3)
        # the input transform (4H units) and each step's recurrent one: k-wide dx and dW rows
        # (torch's own LSTM kernels, the forward recurrence's among them, have no formula)
        want = 2 * steps * n * 3 * 4 * hidden + 2 * steps * n * k * 3 + (
            2 * 2 * steps * n * k * hidden
        )
    for _ in range(2):  # the first call builds what the second reuses
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            (out[0] if kind == "lstm" else out).sum().backward()
    assert counter.get_total_flops() == want, counter.get_flop_counts()["Global"]


def test_flop_counter_on_the_meta_device_counts_as_on_the_cpu():
    """Lightning's ``measure_flops`` builds the model on the meta device: there the backward has
    no values to select by and used to fail at its first host read; it runs the k-wide products
    of shapes alone and counts what the CPU run counts (the memory stays as it was)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            torch.manual_seed(0)
            model = msbp.sparsify(
                torch.nn.Sequential(torch.nn.Linear(7, 10), torch.nn.Tanh(),
                                    torch.nn.Linear(10, 9), torch.nn.Tanh(),
                                    torch.nn.Linear(9, 4)),
                msbp.SparseBackpropConfig(k=3, memory=0.5), exclude="4",
            )
            x = torch.randn(6, 7)
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        counts[device] = counter.get_total_flops()
        assert model[0].weight.grad.shape == (10, 7) and model[2].weight.grad.device.type == device
    assert counts["meta"] == counts["cpu"] > 0


@native_only
@pytest.mark.parametrize("selection", sorted(SELECTION_CODES))
def test_native_op_takes_zero_input_features(selection):
    """A 6 x 0 input (a layer with no input features): the column blocks of the native
    products were min(..., d_in) = 0 wide and the block count divided by it (SIGFPE: the
    process died). Found by the malformed-input fuzz."""
    torch.manual_seed(0)
    g, x, w = torch.randn(6, 10), torch.randn(6, 0), torch.randn(10, 0)
    cols = torch.randperm(10)[:3]
    args = (3, SELECTION_CODES[selection], 0.5, False, True, True, True, False, False, 3.0)
    mem_n, mem_t = torch.zeros(10), torch.zeros(10)
    got = _native(g, x, w, mem_n, cols, None, *args)
    want = sparse_linear_backward_torch(g, x, w, mem_t, cols, None, *args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(mem_n, mem_t)


@native_only
@pytest.mark.parametrize("slot", [False, True])
@pytest.mark.parametrize("cols", [[1, 2, 10], [1, 2, -1], [1, 2, 1 << 40], [[1, 2, 3]]])
def test_native_op_rejects_random_cols_out_of_range(slot, cols):
    """``random_cols`` outside [0, out) (or not 1-D): the kernels read U and wrote the memory at
    those columns unchecked (heap corruption: "free(): invalid pointer", a segfault), and a
    (1, k) tensor silently kept one column. Now a clear error, the memory untouched. Found by
    the malformed-input fuzz."""
    g, x, w = torch.randn(6, 10), torch.randn(6, 7), torch.randn(10, 7)
    memory = torch.randn(6, 10) if slot else torch.randn(10)
    before = memory.clone()
    with pytest.raises(RuntimeError, match="random_cols"):
        _native(g, x, w, memory, torch.tensor(cols), None, 3, SELECTION_CODES["random"], 0.5,
                slot, True, True, True, False, False, 3.0)
    torch.testing.assert_close(memory, before)
