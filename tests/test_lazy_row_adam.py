"""The C++ row-sparse Adam step (``torch.ops.msbp.lazy_row_adam_``) against PyTorch's Adam, and
LazyRowAdam's native path against its PyTorch path."""

import copy
import os
import warnings

import pytest
import torch
from _helpers import logged_rows, track_rows, written_rows
from hypothesis import given
from hypothesis import strategies as st
from torch.optim.adam import adam
from torch.optim.adamw import adamw

import msbp
from msbp import native
from msbp.optim import LazyRowAdam


@pytest.fixture(autouse=True)
def native_backend():
    if os.environ.get("MSBP_BACKEND") == "python" or not native.use_native():
        pytest.skip("native kernels unavailable or disabled")
    old = native._requested()
    native.set_backend("native")
    yield
    native.set_backend(old)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# one unit in the last place of each dtype, relative: PyTorch's fused kernel computes the tail of
# a tensor with scalar code, which may round differently from its (and our) vector code
ULP = {torch.float32: 2**-23, torch.float64: 2**-52, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _tensors(out, width, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(out, width, generator=gen).to(dtype)
    return p, torch.zeros_like(p), torch.zeros_like(p)


def _op(p, m, v, g, rows, step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
        decoupled=False):
    torch.ops.msbp.lazy_row_adam_([p], [m], [v], [g], [rows], [step], lr, *betas, eps,
                                  weight_decay, decoupled)


def _torch_adam(p, m, v, g, step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                decoupled=False):
    (adamw if decoupled else adam)(
        [p], [g], [m], [v], [], [step], fused=True, amsgrad=False, beta1=betas[0],
        beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
    )


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=2 * ULP[dtype], atol=2 * ULP[dtype] * 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [13, 500])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_all_rows_equal_torch_fused_adam(dtype, width, weight_decay, decoupled):
    p, m, v = _tensors(37, width, dtype, seed=0)
    q, mq, vq = p.clone(), m.clone(), v.clone()
    s, sq = torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    rows = torch.arange(37)
    for _ in range(4):
        g = torch.randn(37, width, generator=gen).to(dtype)
        _op(p, m, v, g, rows, s, weight_decay=weight_decay, decoupled=decoupled)
        _torch_adam(q, mq, vq, g, sq, weight_decay=weight_decay, decoupled=decoupled)
    assert s.item() == sq.item() == 4.0
    for a, b in ((p, q), (m, mq), (v, vq)):
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_some_rows_equal_adam_on_those_rows(dtype):
    p, m, v = _tensors(20, 11, dtype, seed=2)
    p0 = p.clone()
    rows = torch.tensor([17, 0, 5, 6])  # any order, distinct
    q, mq, vq = p[rows].clone(), m[rows].clone(), v[rows].clone()
    s, sq = torch.zeros(()), torch.zeros(())
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        g = torch.randn(20, 11, generator=gen).to(dtype)
        _op(p, m, v, g, rows, s, betas=(0.8, 0.99), weight_decay=0.01)
        _torch_adam(q, mq, vq, g[rows].contiguous(), sq, betas=(0.8, 0.99), weight_decay=0.01)
    others = torch.ones(20, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(p[others], p0[others])
    assert not m[others].any() and not v[others].any()
    for a, b in ((p[rows], q), (m[rows], mq), (v[rows], vq)):
        _close(a, b, dtype)


def test_large_lerp_weight_and_float64_step():
    # beta1 < 0.5 takes the other form of torch's lerp; a float64 step count is accepted too
    p, m, v = _tensors(6, 9, torch.float64, seed=4)
    q, mq, vq = p.clone(), m.clone(), v.clone()
    s, sq = torch.zeros((), dtype=torch.float64), torch.zeros(())
    g = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        _op(p, m, v, g, torch.arange(6), s, betas=(0.3, 0.9))
        _torch_adam(q, mq, vq, g, sq, betas=(0.3, 0.9))
    assert s.item() == 2.0
    # unit-scale data: a few ulps of 1 absolute (a moment near 0 after cancellation)
    for a, b in ((p, q), (m, mq)):
        torch.testing.assert_close(a, b, rtol=2 * ULP[torch.float64], atol=4 * ULP[torch.float64])


def test_threads_give_the_same_result():
    p, m, v = _tensors(256, 1024, torch.float32, seed=5)
    g = torch.randn(256, 1024)
    rows = torch.randperm(256)[:200]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            t = [x.clone() for x in (p, m, v)]
            _op(*t, g, rows, torch.zeros(()))
            results.append(t)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_leave_everything_unchanged():
    p, m, v = _tensors(5, 3, torch.float32, seed=6)
    g = torch.ones(5, 3)
    q, s = p.clone(), torch.zeros(())
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.msbp.lazy_row_adam_(
            [p, p.clone()], [m, m.clone()], [v, v.clone()], [g, g], [torch.tensor([1]),
            torch.tensor([5])], [s, torch.zeros(())], 1e-2, 0.9, 0.999, 1e-8, 0.0)
    assert torch.equal(p, q) and s.item() == 0.0 and not m.any()
    with pytest.raises(RuntimeError, match="match the parameter"):
        _op(p, m, v, g.double(), torch.tensor([1]), s)
    with pytest.raises(RuntimeError, match="int64"):
        _op(p, m, v, g, torch.tensor([1], dtype=torch.int32), s)
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        torch.ops.msbp.lazy_row_adam_([p], [m], [v], [g], [], [s], 1e-2, 0.9, 0.999, 1e-8, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_native_path_equals_pytorch_path(dtype, selection, decoupled):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
        torch.nn.Linear(40, 5),
    ).to(dtype)
    cfg = msbp.SparseBackpropConfig(k=4, memory=0.5, selection=selection)
    models = {b: msbp.sparsify(copy.deepcopy(net), cfg, exclude="4") for b in ("native", "python")}
    opts = {
        b: LazyRowAdam(m.parameters(), lr=1e-2, weight_decay=0.01,
                       decoupled_weight_decay=decoupled)
        for b, m in models.items()
    }
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(8, 12, generator=gen).to(dtype)
        for b in ("native", "python"):
            native.set_backend("python")  # the same backward for both: only the step differs
            opts[b].zero_grad()
            models[b](x).float().square().sum().backward()
            native.set_backend(b)
            opts[b].step()
    for p, q in zip(models["native"].parameters(), models["python"].parameters(), strict=True):
        # the same math on the same rows (bitwise equal with GCC 12): allow an ulp, far below
        # one Adam step of lr = 1e-2 that a wrong or missed row would make
        low = dtype == torch.bfloat16
        rtol, atol = (ULP[dtype], 1e-4) if low else (1e-6, 1e-7)
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    for p, q in zip(models["native"].parameters(), models["python"].parameters(), strict=True):
        assert opts["native"].state[p]["step"].item() == opts["python"].state[q]["step"].item()


# -- the mask form: lazy_row_adam_step_ and zero_masked_rows_ ------------------------------------


def _step_op(params, avgs, sqs, grads, masks, dirty, steps, dense=((), (), (), (), ()), lr=1e-2,
             betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    return torch.ops.msbp.lazy_row_adam_step_(
        params, avgs, sqs, grads, masks, dirty, steps, *[list(d) for d in dense], lr, *betas, eps,
        weight_decay, decoupled,
    )


def _mask(out, rows):
    mask = torch.zeros(out, dtype=torch.uint8)
    mask[rows] = 1
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_step_op_equals_row_op_and_consumes_the_mask(dtype, decoupled):
    # two parameters: one with rows marked, one with none (no step, step count unchanged)
    p, m, v = _tensors(30, 19, dtype, seed=7)
    q, mq, vq = p.clone(), m.clone(), v.clone()
    idle, idle_m, idle_v = _tensors(8, 5, dtype, seed=8)
    idle0 = idle.clone()
    s, sq, s_idle = torch.zeros(()), torch.zeros(()), torch.zeros(())
    dirty, dirty_idle = torch.zeros(30, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(9)
    marked = torch.zeros(30, dtype=torch.bool)
    for rows in ([3, 0, 29], [4, 3], list(range(30))):
        g = torch.randn(30, 19, generator=gen).to(dtype)
        mask, mask_idle = _mask(30, rows), torch.zeros(8, dtype=torch.uint8)
        counts = _step_op([p, idle], [m, idle_m], [v, idle_v], [g, torch.ones_like(idle)],
                          [mask, mask_idle], [dirty, dirty_idle], [s, s_idle], weight_decay=0.02,
                          decoupled=decoupled)
        _op(q, mq, vq, g, torch.tensor(sorted(rows)), sq, weight_decay=0.02, decoupled=decoupled)
        assert counts == [len(rows), 0]
        assert not mask.any()  # consumed
        marked[rows] = True
        assert torch.equal(dirty.bool(), marked)  # the rows zero_grad must clear
        for a, b in ((p, q), (m, mq), (v, vq)):
            assert torch.equal(a, b)  # the same row update, bitwise
    assert s.item() == sq.item() == 3.0
    assert s_idle.item() == 0.0 and torch.equal(idle, idle0) and not dirty_idle.any()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_step_op_dense_params_take_torch_fused_adam(weight_decay, decoupled):
    gen = torch.Generator().manual_seed(10)
    shapes = [(7,), (3, 5), ()]
    dense = [[torch.randn(sh, generator=gen) for sh in shapes]]
    dense += [[torch.randn(sh, generator=gen) for sh in shapes]]  # grads
    dense += [[torch.zeros(sh) for sh in shapes] for _ in range(2)]
    dense += [[torch.zeros(()) for _ in shapes]]
    ref = [[t.clone() for t in ts] for ts in dense]
    p, m, v = _tensors(6, 4, torch.float32, seed=11)
    for _ in range(3):
        counts = _step_op([p], [m], [v], [torch.ones_like(p)], [_mask(6, [1])],
                          [torch.zeros(6, dtype=torch.uint8)], [torch.zeros(())], dense=dense,
                          weight_decay=weight_decay, decoupled=decoupled)
        assert counts == [1]
        (adamw if decoupled else adam)(
            ref[0], ref[1], ref[2], ref[3], [], ref[4], fused=True, amsgrad=False, beta1=0.9,
            beta2=0.999, lr=1e-2, weight_decay=weight_decay, eps=1e-8, maximize=False,
        )
    for ours, theirs in zip(dense, ref, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)  # PyTorch's own kernel
    assert all(st.item() == 3.0 for st in dense[4])


def test_step_op_leaves_what_it_cannot_take_alone():
    p, m, v = _tensors(6, 4, torch.float32, seed=12)
    wide = torch.randn(4, 6).t()  # not contiguous
    wide_m, wide_v = torch.zeros(6, 4), torch.zeros(6, 4)
    before = p.clone(), wide.clone()
    masks = [_mask(6, [2]), _mask(6, [2])]
    dirty = [torch.zeros(6, dtype=torch.uint8), torch.zeros(6, dtype=torch.uint8)]
    steps = [torch.zeros(()), torch.zeros(())]
    counts = _step_op([p, wide], [m, wide_m], [v, wide_v], [torch.ones(6, 4)] * 2, masks, dirty,
                      steps)
    assert counts == [1, -1]
    assert not torch.equal(p, before[0])
    assert torch.equal(wide, before[1]) and masks[1][2] == 1 and not dirty[1].any()
    assert steps[1].item() == 0.0
    # a mask of another length or dtype: also left to the caller
    counts = _step_op([p, p.clone()], [m, m.clone()], [v, v.clone()], [torch.ones(6, 4)] * 2,
                      [_mask(5, [1]), _mask(6, [1]).bool()], dirty, steps)
    assert counts == [-1, -1]
    with pytest.raises(RuntimeError, match="dense parameters"):
        _step_op([p], [m], [v], [p], [_mask(6, [1])], dirty[:1], steps[:1],
                 dense=([torch.zeros(2, dtype=torch.long)],) * 4 + ([torch.zeros(())],))


def test_step_op_moves_version_counters():
    p, m, v = _tensors(6, 4, torch.float32, seed=13)
    s = torch.zeros(())
    tensors = (p, m, v, s)
    versions = [t._version for t in tensors]
    _step_op([p], [m], [v], [torch.ones_like(p)], [_mask(6, [0])],
             [torch.zeros(6, dtype=torch.uint8)], [s])
    # autograd must see the write (e.g. a weight saved by a forward that has not run backward)
    assert all(t._version > before for t, before in zip(tensors, versions, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_zero_masked_rows(dtype):
    gen = torch.Generator().manual_seed(14)
    grads = [torch.randn(9, 4, generator=gen).to(dtype), torch.randn(5, generator=gen).to(dtype)]
    before = [g.clone() for g in grads]
    dirty = [_mask(9, [0, 4]), torch.empty(0, dtype=torch.uint8)]
    pending = [_mask(9, [4, 8]), _mask(5, [1, 2, 3])]
    versions = [g._version for g in grads]
    counts = torch.ops.msbp.zero_masked_rows_(grads, dirty, pending)
    assert counts == [2, 3]  # rows pending, i.e. written since the last step
    for g, g0, rows in zip(grads, before, ([0, 4, 8], [1, 2, 3]), strict=True):
        expect = g0.clone()
        expect[rows] = 0
        assert torch.equal(g, expect)
    assert not dirty[0].any() and not pending[0].any() and not pending[1].any()
    assert all(g._version > ver for g, ver in zip(grads, versions, strict=True))
    # not contiguous: left alone
    odd = torch.randn(4, 9).t()
    odd0 = odd.clone()
    assert torch.ops.msbp.zero_masked_rows_([odd], [_mask(9, [1])], [_mask(9, [2])]) == [-1]
    assert torch.equal(odd, odd0)


def test_dense_step_takes_a_gradient_laid_out_unlike_its_parameter(backend):
    """A dense parameter whose .grad is transposed (strides unlike the parameter's): the step is
    torch.optim.Adam's (the fused kernel alone reads such a gradient in the parameter's
    layout: a wrong update)."""
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(10, 12, dtype=torch.float64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    opt1 = LazyRowAdam([p1], lr=0.1, weight_decay=0.01)
    opt2 = torch.optim.Adam([p2], lr=0.1, weight_decay=0.01, foreach=False)
    for step in range(3):
        g = torch.randn(12, 10, dtype=torch.float64).t()
        p1.grad, p2.grad = g.clone(), g.clone()
        assert p1.grad.stride() != p1.stride()
        opt1.step()
        opt2.step()
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12, msg=f"step {step}")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-k=out", "dense-layer"])
def test_parameter_laid_out_anew_after_its_moments_were_made(backend, sparse):
    """A weight given column-major strides after the first step (``p.data =
    p.data.t().contiguous().t()``) keeps row-major moments: the fused kernel read all four
    tensors in the parameter's layout and mixed the moments of other elements into each
    update (the PyTorch path at k = out, and any dense parameter on both backends). Found by
    the API-combination fuzz (LazyRowAdam at k = out against torch.optim.Adam)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model = model.double()
    twin = copy.deepcopy(model)
    if sparse:
        msbp.sparsify(model, msbp.SparseBackpropConfig(k=0))
    opt = LazyRowAdam(model.parameters(), lr=0.01)
    ref = torch.optim.Adam(twin.parameters(), lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                for p in (*model.parameters(), *twin.parameters()):
                    if p.dim() == 2:
                        p.data = p.data.t().contiguous().t()
        x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=f"{name}, step {step}")


@pytest.mark.parametrize("wrt", ["x", "weight"])
@pytest.mark.parametrize("layer_kind", ["linear", "linear_no_inplace", "lstm"])
def test_input_gradient_only_moves_no_rows(backend, layer_kind, wrt):
    """torch.autograd.grad(..., [x]) or (..., [weight]) writes no .grad: the sparse layers log
    no rows, and the next step() moves nothing (saliency maps, adversarial examples, gradient
    probes between training steps)."""
    torch.manual_seed(0)
    if layer_kind == "lstm":
        layer = msbp.SparseLSTM(6, 5, config=msbp.SparseBackpropConfig(k=4, memory=0.0))
        run = lambda x: layer(x.unsqueeze(0))[0]  # noqa: E731
    else:
        cfg = msbp.SparseBackpropConfig(k=2, memory=0.0, grad_inplace=layer_kind == "linear")
        layer = msbp.SparseLinear(6, 10, config=cfg)
        run = layer
    opt = LazyRowAdam(layer.parameters(), lr=0.1, weight_decay=0.01)
    run(torch.randn(4, 6)).sum().backward()
    opt.step()
    opt.zero_grad()
    x = torch.randn(4, 6, requires_grad=True)
    torch.autograd.grad(run(x).pow(2).sum(), [x if wrt == "x" else next(layer.parameters())])
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    for p, b in zip(layer.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize(
    ("layer_kind", "rows"),
    [("linear", 4), ("linear_no_inplace", 4), ("lstm", 4), ("linear", 0),
     ("linear_no_inplace", 0)],
)
def test_discarded_first_backward_moves_nothing(backend, layer_kind, rows):
    """backward, zero_grad(), step() before any step: the log zero_grad took says these are
    sparse layers' weights, which took no part in the step (not moved by weight decay, step
    count and moments untouched), as after any later discarded backward. Also where that log
    names no row (an empty batch): the PyTorch path's zero_grad once took it for no log, and
    the step a dense one (step count 1), where the C++ path's row mask said row-sparse."""
    torch.manual_seed(0)
    if layer_kind == "lstm":
        layer = msbp.SparseLSTM(6, 5, bias=False, config=msbp.SparseBackpropConfig(k=4, memory=0.0))
        run = lambda x: layer(x.unsqueeze(0))[0]  # noqa: E731
    else:
        cfg = msbp.SparseBackpropConfig(k=2, memory=0.0, grad_inplace=layer_kind == "linear")
        layer = msbp.SparseLinear(6, 10, bias=False, config=cfg)
        run = layer
    opt = LazyRowAdam(layer.parameters(), lr=0.1, weight_decay=0.01)
    sparse = layer.weight_hh_l0 if layer_kind == "lstm" else layer.weight
    run(torch.randn(rows, 6)).sum().backward()
    opt.zero_grad(set_to_none=False)  # a discarded batch: the zeroed buffer stays
    before = sparse.detach().clone()
    opt.step()
    assert torch.equal(sparse, before)
    assert float(opt.state[sparse].get("step", 0)) == 0


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(4, 2)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class _Lstm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 3)

    def forward(self, x):
        return self.lstm(x)[0]


_DENSE_PASS_MODELS = {
    "linear": (lambda: torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                           torch.nn.Linear(6, 3)), (5, 4)),
    "conv": (lambda: torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3)), (2, 4, 5)),
    "lstm": (_Lstm, (3, 2, 4)),
    "attention": (_Attn, (3, 2, 4)),
}


@pytest.mark.parametrize("discarded_rows", [0, 2])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("kind", list(_DENSE_PASS_MODELS))
def test_dense_backward_step_after_a_discarded_sparse_backward(backend, kind, set_to_none,
                                                               discarded_rows):
    """A sparse backward whose gradient model.zero_grad() discards, then a training step inside
    msbp.dense_backward (which logs no rows): the stale log of the discarded backward stood for
    the dense gradient, and LazyRowAdam stepped only its rows (none after an empty batch).
    Found by the API-combination fuzz (LazyRowAdam at k = out against torch.optim.Adam: an
    empty batch, model.zero_grad(), a dense_backward step). The step must be the one of a twin
    that never ran the discarded backward."""
    build, shape = _DENSE_PASS_MODELS[kind]
    torch.manual_seed(0)
    base = build().double()
    twins = [msbp.sparsify(copy.deepcopy(base), msbp.SparseBackpropConfig(k=2, memory=0.0))
             for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    cut = [slice(None)] * len(shape)
    cut[1 if kind in ("lstm", "attention") else 0] = slice(0, discarded_rows)
    for i, model in enumerate(twins):
        opt = LazyRowAdam(model.parameters(), lr=0.01)
        model(x).square().sum().backward()
        opt.step()
        if i == 0:
            model.zero_grad(set_to_none=set_to_none)
            model(x[tuple(cut)]).square().sum().backward()
        model.zero_grad(set_to_none=set_to_none)
        with msbp.dense_backward(model), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "written without a log"
            model(x).square().sum().backward()
            opt.step()
    for (name, p), q in zip(twins[0].named_parameters(), twins[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("layer_kind", ["linear", "lstm"])
def test_first_step_with_no_row_selected_moves_nothing(backend, layer_kind):
    """A first backward that selects no row (per-example top-k of an all-zero output gradient):
    the weight takes no step, weight decay included, as the PyTorch path's empty log says (the
    native path's mask, made by the layer and left empty, once took a dense step)."""
    torch.manual_seed(0)
    cfg = msbp.SparseBackpropConfig(k=2, selection="per_example", memory=0.0)
    if layer_kind == "lstm":
        layer = msbp.SparseLSTM(3, 4, bias=False, config=cfg, dtype=torch.float64)
        run = lambda x: layer(x.unsqueeze(1))[0].squeeze(1)  # noqa: E731
        sparse = layer.weight_hh_l0
    else:
        layer = msbp.SparseLinear(3, 4, bias=False, config=cfg, dtype=torch.float64)
        run = layer
        sparse = layer.weight
    opt = LazyRowAdam(layer.parameters(), lr=0.01, weight_decay=0.1)
    before = sparse.detach().clone()
    (run(torch.randn(5, 3, dtype=torch.float64)) * 0).sum().backward()
    opt.step()
    assert torch.equal(sparse, before)
    assert float(opt.state[sparse].get("step", 0)) == 0


@pytest.mark.parametrize("form", ["mask", "rows"])
def test_rows_of_zero_gradient_take_no_step_unless_all_rows_are_given(form):
    """Marked rows whose gradient row is all zero (-0 included) are left alone: no move, no
    moment decay, not marked dirty; no step at all (count unchanged) if every marked row is
    such. Where every row is given (a dense backward), every row steps, as torch's Adam."""
    p, m, v = _tensors(6, 4, torch.float64, seed=12)
    m += 0.5  # momentum: a step of a zero-gradient row would move it
    v += 0.25
    g = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    g[1] = 0
    g[3] = -0.0
    g[4, :3] = 0  # one non-zero element is enough
    s = torch.zeros(())
    dirty = torch.zeros(6, dtype=torch.uint8)

    def step(rows):
        if form == "mask":
            return _step_op([p], [m], [v], [g], [_mask(6, rows)], [dirty], [s])
        _op(p, m, v, g, torch.tensor(rows), s)
        return None

    for rows, stepped in (([1, 3], []), ([0, 1, 3, 4], [0, 4]), (list(range(6)), list(range(6)))):
        before = [t.clone() for t in (p, m, v)]
        count_before = s.item()
        counts = step(rows)
        moved = [r for r in range(6) if not torch.equal(p[r], before[0][r])]
        assert moved == stepped
        for t, t0 in zip((m, v), before[1:], strict=True):
            assert [r for r in range(6) if not torch.equal(t[r], t0[r])] == stepped
        assert s.item() == count_before + (1 if stepped else 0)
        if form == "mask":
            assert counts == [len(rows)]  # the rows taken from the mask
            assert dirty.nonzero().flatten().tolist() == stepped  # what zero_grad clears
            dirty.zero_()


def _assert_backends_train_alike(net, cfg, steps, *, seed, zero="none", weight_decay=0.0,
                                 rtol=1e-9, atol=1e-12):
    """Train copies of ``net`` (float64, last module dense), sparsified with ``cfg``, on the native
    kernels and on the PyTorch path, backward and ``LazyRowAdam`` step each; ``steps`` holds
    each step's batch sizes (one backward each); the weights must agree after every step
    (rounding apart: a row stepped on one backend only is a whole Adam step)."""
    last = str(len(net) - 1)
    d0, d2 = net[0].in_features, net[-1].out_features
    models = {b: msbp.sparsify(copy.deepcopy(net), cfg, exclude=last) for b in ("native", "python")}
    opts = {b: LazyRowAdam(m.parameters(), lr=1e-2, weight_decay=weight_decay)
            for b, m in models.items()}
    gen = torch.Generator().manual_seed(seed)
    for batches in steps:
        data = [(torch.randn(n, d0, generator=gen, dtype=torch.float64),
                 torch.randint(0, d2, (n,), generator=gen)) for n in batches]
        for b in ("native", "python"):
            native.set_backend(b)
            if zero == "model":
                models[b].zero_grad()
            else:
                opts[b].zero_grad(set_to_none=zero == "none")
            for x, y in data:
                torch.nn.functional.cross_entropy(models[b](x), y).backward()
            opts[b].step()
        for p, q in zip(models["native"].parameters(), models["python"].parameters(),
                        strict=True):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def test_both_backends_train_alike_where_top_k_fills_up_with_zeros():
    # small ReLU layers whose gradient rows have fewer than k non-zero entries: per-example
    # top-k takes zero units too, and where these complete the set of rows a step logs,
    # LazyRowAdam steps every row (a dense step: rows of zero gradient move by their moments);
    # the two backends must take the same zero units for the steps to agree (they differed by
    # whole steps). Unified top-k logs k rows whichever it takes: no such case.
    torch.manual_seed(67)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 5), torch.nn.ReLU(), torch.nn.Linear(5, 5), torch.nn.Tanh(),
        torch.nn.Linear(5, 7),
    ).to(torch.float64)
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.0, selection="per_example", memory_layout="slot")
    _assert_backends_train_alike(net, cfg, [[2]] * 30, seed=1, zero="zero", rtol=1e-12)


@st.composite
def _small_training(draw):
    d1 = draw(st.integers(1, 8))  # small: top-k often fills up with zero-gradient units
    return {
        "sizes": (draw(st.integers(1, 20)), d1, draw(st.integers(2, 4))),
        "k": draw(st.integers(1, d1)),
        "selection": draw(st.sampled_from(["unified", "per_example"])),
        "layout": draw(st.sampled_from(["unit", "slot"])),
        "memory": draw(st.sampled_from([0.0, 0.8])),
        "weight_decay": draw(st.sampled_from([0.0, 0.01])),
        "zero": draw(st.sampled_from(["none", "zero", "model"])),
        "steps": draw(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=2), min_size=1,
                               max_size=8)),  # per step, the batch sizes of its backwards
        "seed": draw(st.integers(0, 2**16)),
    }


@given(_small_training())
def test_both_backends_train_small_relu_networks_alike(c):
    d0, d1, d2 = c["sizes"]
    torch.manual_seed(c["seed"])
    net = torch.nn.Sequential(
        torch.nn.Linear(d0, d1), torch.nn.ReLU(), torch.nn.Linear(d1, d1), torch.nn.ReLU(),
        torch.nn.Linear(d1, d2),
    ).to(torch.float64)
    cfg = msbp.SparseBackpropConfig(k=c["k"], memory=c["memory"], selection=c["selection"],
                                    memory_layout=c["layout"])
    _assert_backends_train_alike(net, cfg, c["steps"], seed=c["seed"], zero=c["zero"],
                                 weight_decay=c["weight_decay"])


@pytest.mark.parametrize("zero", ["none", "zero"])
def test_attention_in_proj_steps_only_its_kept_rows_on_both_backends(zero):
    """SparseMultiheadAttention's q, k and v projections are row blocks of in_proj_weight: their
    kept rows are that Parameter's log, so LazyRowAdam steps k rows of each block and leaves the
    others where they are (the slices had logged nowhere: it stepped all of in_proj_weight),
    alike on both backends (the native one adds the rows into .grad in place)."""
    torch.manual_seed(0)
    e, k = 16, 2
    # no input biases: the key bias's gradient is zero but for rounding (softmax does not see
    # it), and Adam steps on that noise, which differs between the backends
    mha = torch.nn.MultiheadAttention(e, 2, bias=False, dtype=torch.float64)
    cfg = msbp.SparseBackpropConfig(k=k, memory=0.8)
    models = {b: msbp.SparseMultiheadAttention.from_dense(copy.deepcopy(mha), cfg)
              for b in ("native", "python")}
    opts = {b: LazyRowAdam(m.parameters(), lr=1e-2, weight_decay=0.01)
            for b, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(5, 3, e, generator=gen, dtype=torch.float64)
        g = torch.randn(5, 3, e, generator=gen, dtype=torch.float64)
        for b, m in models.items():
            native.set_backend(b)
            opts[b].zero_grad(set_to_none=zero == "none")
            m(x, x, x, need_weights=False)[0].backward(g)
            w = m.in_proj_weight
            written = written_rows(w)
            assert len(written) == 3 * k
            before = w.detach().clone()
            opts[b].step()
            assert (w != before).any(1).nonzero().flatten().tolist() == written
    for p, q in zip(models["native"].parameters(), models["python"].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_rows_the_pytorch_path_logged_into_a_discarded_gradient_take_no_native_step():
    """A weight whose backward ran on the PyTorch path (which logs a list: here forced, as a
    slot memory's first batch or a random selection would) and whose gradient was then
    discarded (.grad = None, no step): the next backward on the native path logs only its own
    rows; the list had stayed, and LazyRowAdam would have stepped its rows too."""
    if not native.use_native():
        pytest.skip("native kernels unavailable")
    before = native._requested()
    torch.manual_seed(0)
    layer = msbp.SparseLinear(3, 12, config=msbp.SparseBackpropConfig(k=2, memory=0.8),
                              dtype=torch.float64)
    track_rows(layer.weight)
    try:
        for b in ("python", "native"):
            native.set_backend(b)
            layer.weight.grad = None
            layer(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
    finally:
        native.set_backend(before)
    assert logged_rows(layer.weight) == written_rows(layer.weight)
    assert len(logged_rows(layer.weight)) == 2
