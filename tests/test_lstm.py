"""SparseLSTM: identity with nn.LSTM at k = 4 x hidden, shapes, conversion, memory behaviour."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from _helpers import LAYOUTS, SELECTIONS, dtype_id, make_cfg, rel_err
from torch import nn

from msbp import SparseBackpropConfig, SparseLSTM, densify, native, sparsify
from msbp.functional import make_plan
from msbp.nn.lstm import LSTMDtypeError
from msbp.ops import recurrent
from msbp.ops.recurrent import SparseLSTMRecurrence
from msbp.ops.reference import lstm_recurrence_ref, sparse_linear_ref

F64 = {"rtol": 1e-10, "atol": 1e-12}
BACKENDS = ("native", "python")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test with the native recurrence backward, then with the Python loop, and checks
    that the path asked for is the one that ran."""
    before = native._requested()
    try:
        native.set_backend(request.param)
    except native.NativeUnavailableError:
        pytest.skip("the native kernels could not be built here")
    ran = {"native": 0, "python": 0}

    def counted(fn, path):
        def wrapper(*args, **kwargs):
            ran[path] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(recurrent, "_native_backward",
                        counted(recurrent._native_backward, "native"))
    monkeypatch.setattr(recurrent, "_backward_steps", counted(recurrent._backward_steps, "python"))
    yield request.param
    native.set_backend(before)
    other = "python" if request.param == "native" else "native"
    assert ran[request.param] and not ran[other], ran



def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("memory", [0.0, 0.8])
def test_full_k_equals_nn_lstm(batch_first: bool, layers: int, bidirectional: bool,
                               memory: float) -> None:
    torch.manual_seed(0)
    dense = nn.LSTM(5, 6, layers, batch_first=batch_first, bidirectional=bidirectional,
                    dtype=torch.float64)
    reference = copy.deepcopy(dense)
    sparse = SparseLSTM.from_dense(dense, SparseBackpropConfig(k=4 * 6, memory=memory))
    dirs = 2 if bidirectional else 1
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    h0 = torch.randn(layers * dirs, 3 if batch_first else 4, 6, dtype=torch.float64)
    c0 = torch.randn_like(h0)
    results = []
    for module in (reference, sparse):
        xi = x.clone().requires_grad_()
        out, (h, c) = module(xi, (h0, c0))
        (out.sin().sum() + h.square().sum() + c.sum()).backward()
        results.append((out, h, c, xi.grad, _grads(module)))
    (o1, h1, c1, dx1, g1), (o2, h2, c2, dx2, g2) = results
    for a, b in ((o1, o2), (h1, h2), (c1, c2), (dx1, dx2)):
        torch.testing.assert_close(a, b, **F64)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], **F64, msg=name)
    assert len(list(sparse.named_memories())) == 2 * layers * dirs
    for name, buf in sparse.named_memories():
        assert not buf.any(), name  # nothing left out, nothing remembered


def test_shapes_unbatched_and_default_state() -> None:
    lstm = SparseLSTM(4, 7, config=SparseBackpropConfig(k=3))
    out, (h, c) = lstm(torch.randn(5, 4))
    assert out.shape == (5, 7) and h.shape == (1, 7) and c.shape == (1, 7)
    out, (h, c) = lstm(torch.randn(5, 2, 4))
    assert out.shape == (5, 2, 7) and h.shape == (1, 2, 7)
    with pytest.raises(ValueError, match="does not fit SparseLSTM"):
        lstm(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="hx of shapes"):
        lstm(torch.randn(5, 2, 4), (torch.zeros(1, 3, 7), torch.zeros(1, 3, 7)))


def test_state_dict_keys_load_both_ways() -> None:
    dense = nn.LSTM(4, 7, 2)
    sparse = SparseLSTM(4, 7, 2, config=SparseBackpropConfig(k=3))
    sparse.load_state_dict(dense.state_dict())  # dense checkpoint: memories start at zero
    for name, p in dense.named_parameters():
        assert torch.equal(p, getattr(sparse, name))
    keys = set(sparse.state_dict())
    assert set(dense.state_dict()) < keys
    assert {"memory_ih_l0", "memory_hh_l1"} <= keys
    assert sparse.memory_hh_l0.dtype == torch.float32


def test_sparsify_converts_lstm_and_keeps_parameters() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.output = nn.Linear(8, 3)

    model = Tagger()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, SparseBackpropConfig(k=2), exclude="output")
    assert isinstance(model.lstm, SparseLSTM) and type(model.output) is nn.Linear
    assert model.lstm.batch_first and model.lstm.name == "lstm"
    for name, p in model.named_parameters():
        assert p is params[name]
    out, _ = model.lstm(model.emb(torch.randint(0, 10, (2, 5))))
    model.output(out).sum().backward()
    before = model.lstm.weight_hh_l0.detach().clone()
    opt.step()  # the optimizer built before conversion still trains the LSTM
    assert not torch.equal(before, model.lstm.weight_hh_l0)
    densify(model)
    assert type(model.lstm) is nn.LSTM and model.lstm.weight_hh_l0 is params["lstm.weight_hh_l0"]
    sparsify(model, SparseBackpropConfig(k=2), include="lstm")
    assert isinstance(model.lstm, SparseLSTM)
    with pytest.raises(ValueError, match="its LSTM layers are: \\['lstm'\\]"):
        sparsify(Tagger(), exclude=["lstm", "output"])


def test_memory_changes_only_in_backward() -> None:
    torch.manual_seed(0)
    lstm = SparseLSTM(4, 6, config=SparseBackpropConfig(k=2, memory=0.8))
    x = torch.randn(5, 3, 4)
    out, _ = lstm(x)
    assert not lstm.memory_ih_l0.any() and not lstm.memory_hh_l0.any()  # forward: untouched
    with torch.no_grad():
        lstm(x)
    assert not lstm.memory_hh_l0.any()
    out.square().sum().backward()
    assert lstm.memory_ih_l0.any() and lstm.memory_hh_l0.any()
    # only k = 2 of the 24 gate rows of each weight receive a gradient per backward call;
    # the recurrent transform is called once per step, so up to T * k rows overall
    assert int((lstm.weight_ih_l0.grad.abs().sum(1) > 0).sum()) == 2
    assert int((lstm.weight_hh_l0.grad.abs().sum(1) > 0).sum()) <= 5 * 2
    lstm.reset_memory()
    assert not lstm.memory_hh_l0.any()
    sbp = SparseLSTM(4, 6, config=SparseBackpropConfig(k=2, memory=0.0))
    sbp(x)[0].sum().backward()
    assert not sbp.memory_hh_l0.any()


def test_memory_stays_float32_under_dtype_casts() -> None:
    lstm = SparseLSTM(4, 6, config=SparseBackpropConfig(k=2)).to(torch.bfloat16)
    assert lstm.weight_ih_l0.dtype == torch.bfloat16
    assert lstm.memory_ih_l0.dtype == torch.float32
    lstm.check_memory()


# -- the fused recurrence against the stepwise oracle ------------------------------------------


def _recurrence_inputs(gen: torch.Generator, steps: int, batch: int, hidden: int,
                       dtype: torch.dtype = torch.float64):
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()

    return (r(steps, batch, 4 * hidden), r(batch, hidden), r(batch, hidden),
            r(4 * hidden, hidden), r(4 * hidden))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("memory", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_recurrence_matches_stepwise_reference(
    selection: str, layout: str, memory: float, reverse: bool, dtype: torch.dtype, backend: str
) -> None:
    """Gradients of every input and the memory after each of three batches (the last one
    smaller: a slot memory of another batch shape) equal the oracle's."""
    _check_recurrence(selection, layout, memory, reverse, steps=5, batches=(3, 3, 2), hidden=4,
                      k=3, dtype=dtype)


@pytest.mark.parametrize("k", [9, 20])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_recurrence_matches_reference_wider(
    selection: str, layout: str, dtype: torch.dtype, k: int, backend: str
) -> None:
    """Rows of 280 gate units: the native kernels' vector blocks, remainders and block-wise
    top-k all take part; from k = 16 on, their GEMM / column-wise products."""
    _check_recurrence(selection, layout, 0.8, False, steps=6, batches=(5, 5), hidden=70, k=k,
                      dtype=dtype)


@pytest.mark.parametrize(("selection", "layout"), [("unified", "unit"), ("per_example", "slot")])
def test_recurrence_matches_reference_many_rows(selection: str, layout: str, backend: str) -> None:
    """40 rows of 3360 gate units, on one thread and on two (where the native cell pass splits
    the rows into two chunks with their own column sums, and every loop is shared)."""
    _check_recurrence(selection, layout, 0.8, True, steps=3, batches=(40,), hidden=840, k=20)
    torch.set_num_threads(2)  # the autouse fixture restores the count
    _check_recurrence(selection, layout, 0.8, True, steps=3, batches=(40,), hidden=840, k=20)


@pytest.mark.parametrize("memory", [0.0, 0.8])
def test_recurrence_sparse_weight_gradient_route(memory: float, backend: str) -> None:
    """Per-example rows that keep many distinct columns (c >= 20 k): dW_hh as a CSR product."""
    _check_recurrence("per_example", "unit", memory, False, steps=10, batches=(4, 4), hidden=8,
                      k=1)


@pytest.mark.parametrize("padded", [(), (2,)], ids=["all_rows", "zero_row"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_full_k_flushes_memory_left_by_a_smaller_k(
    selection: str, layout: str, reverse: bool, padded: tuple[int, ...], backend: str
) -> None:
    """k = 4 H after two batches at k = 3 (a k schedule, a checkpoint saved at a smaller k): the
    memory they left is added to the first processed step's gate gradient and propagated into
    dh and dW_hh, then the memory is zero, as in the stepwise reference (not dropped).
    "zero_row": the third batch's first row has no gradient, so its slot keeps its memory
    (unit: M / 2 on the other rows); the fourth batch, of 2 rows, then flushes that 3-row slot
    memory spread over its rows, or (no memory left) takes the dense path."""
    _check_recurrence(selection, layout, 0.8, reverse, steps=4, batches=(3, 3, 3, 2), hidden=4,
                      k=(3, 3, 16, 16), padded=padded)


def _check_recurrence(
    selection: str, layout: str, memory: float, reverse: bool, *, steps: int,
    batches: tuple[int, ...], hidden: int, k: int | tuple[int, ...],
    dtype: torch.dtype = torch.float64, padded: tuple[int, ...] = (),
) -> None:
    """``k``: one for all batches, or one per batch (a k schedule); ``padded``: the batches
    whose first row gets no output gradient (a zero row of G at every step)."""
    ks = k if isinstance(k, tuple) else (k,) * len(batches)

    def assert_near(fast: torch.Tensor, ref: torch.Tensor) -> None:
        if dtype == torch.float64:
            torch.testing.assert_close(fast, ref, **F64)
        else:  # float32 rounding, amplified over the steps: a norm-wise bound
            assert fast.dtype == ref.dtype and fast.shape == ref.shape
            assert rel_err(fast, ref) < 1e-5, rel_err(fast, ref)

    gen = torch.Generator().manual_seed(0)
    weights = _recurrence_inputs(gen, steps, 1, hidden, dtype)[3:]
    w_fast, b_fast = (p.detach().clone().requires_grad_() for p in weights)
    w_ref, b_ref = (p.detach().clone().requires_grad_() for p in weights)
    mem_fast = torch.zeros((4 * hidden,) if layout == "unit" else (0, 4 * hidden), dtype=dtype)
    box = [mem_fast.clone()]
    sel_fast, sel_ref = (torch.Generator().manual_seed(7) for _ in range(2))
    for n, (batch, k_n) in enumerate(zip(batches, ks, strict=True)):
        options = dict(k=k_n, selection=selection, alpha=memory, layout=layout, generator=sel_ref)
        gx, h0, c0 = _recurrence_inputs(gen, steps, batch, hidden, dtype)[:3]
        d_out, d_h, d_c = (torch.randn(s, generator=gen, dtype=dtype)
                           for s in ((steps, batch, hidden), (batch, hidden), (batch, hidden)))
        if n in padded:
            for d in (d_out[:, 0], d_h[0], d_c[0]):
                d.zero_()
        plan = make_plan(make_cfg(selection, layout, memory, k=k_n), 4 * hidden,
                         generator=sel_fast)
        fast_memory = mem_fast if memory else None
        results = []
        for fused, w, b in ((True, w_fast, b_fast), (False, w_ref, b_ref)):
            inputs = [t.detach().clone().requires_grad_() for t in (gx, h0, c0)]
            if fused:
                out, h_n, c_n = SparseLSTMRecurrence.apply(*inputs, w, b, fast_memory, plan,
                                                           reverse)
            else:
                out, h_n, c_n = lstm_recurrence_ref(*inputs, w, b, box, reverse=reverse,
                                                    **options)
            ((out * d_out).sum() + (h_n * d_h).sum() + (c_n * d_c).sum()).backward()
            results.append((out.detach(), *(t.grad for t in inputs)))
        for fast, ref in zip(*results, strict=True):
            assert_near(fast, ref)
        assert_near(w_fast.grad, w_ref.grad)
        assert_near(b_fast.grad, b_ref.grad)
        if memory:
            assert_near(mem_fast, box[0])
        else:
            assert not mem_fast.any()


def test_full_k_recurrence_flushes_and_clears_memory(backend: str) -> None:
    """At k = 4 H a memory that is not zero is propagated with the last step's gradient, not
    dropped, and nothing is left in it (the reference, as SparseLinear at k = out)."""
    gen = torch.Generator().manual_seed(1)
    gx, h0, c0, w, b = _recurrence_inputs(gen, 4, 2, 3)
    memory = torch.ones(12, dtype=torch.float64)
    plan = make_plan(make_cfg(k=12), 12)
    out, h_n, c_n = SparseLSTMRecurrence.apply(gx, h0, c0, w, b, memory, plan, False)
    (out.sum() + h_n.sum()).backward()
    got = [t.grad.clone() for t in (gx, h0, c0, w, b)]
    for t in (gx, h0, c0, w, b):
        t.grad = None
    box = [torch.ones(12, dtype=torch.float64)]
    out, h_n, _ = lstm_recurrence_ref(gx, h0, c0, w, b, box, k=12, alpha=0.8)
    (out.sum() + h_n.sum()).backward()
    for a, t in zip(got, (gx, h0, c0, w, b), strict=True):
        torch.testing.assert_close(a, t.grad, **F64)
    assert not memory.any() and not box[0].any()


def _memories(lstm: SparseLSTM) -> dict[str, torch.Tensor]:
    return {tag: getattr(lstm, f"memory_{tag}").clone() for tag in lstm.transform_tags()}


@pytest.mark.parametrize("full_k", [False, True], ids=["same_k", "then_full_k"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_nonfinite_gradient_raise_or_skip(selection: str, poison: float, full_k: bool,
                                          backend: str) -> None:
    """With "then_full_k" the poisoned batches run at k = 4 H, where the memory is to be
    flushed: a non-finite gradient still leaves it as it was."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 4)
    lstm = SparseLSTM(4, 5, config=make_cfg(selection, k=2, memory=0.8))
    lstm(x)[0].square().sum().backward()  # a first batch fills the memory
    if full_k:
        lstm.config = lstm.config.replace(k=20)
    before = _memories(lstm)
    poisoned = torch.ones(6, 2, 5)
    poisoned[2, 1, 3] = poison
    with pytest.raises(FloatingPointError, match="hh_l0"):
        (lstm(x)[0] * poisoned).sum().backward()
    for tag, memory in _memories(lstm).items():
        assert torch.equal(memory, before[tag]), tag
    lstm.config = lstm.config.replace(on_nonfinite="skip")
    lstm.zero_grad()
    (lstm(x)[0] * poisoned).sum().backward()  # propagated densely: it reaches the weights
    assert not lstm.weight_hh_l0.grad.isfinite().all()
    assert not lstm.weight_ih_l0.grad.isfinite().all()
    for tag, memory in _memories(lstm).items():
        assert torch.equal(memory, before[tag]), tag


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_nonfinite_keeps_slot_memories_of_another_batch_shape(on_nonfinite: str,
                                                              backend: str) -> None:
    """Slot memories of 2 rows, then a non-finite batch of 3: rows and values unchanged."""
    torch.manual_seed(0)
    cfg = make_cfg("unified", "slot", 0.8, k=2).replace(on_nonfinite=on_nonfinite)
    lstm = SparseLSTM(4, 5, config=cfg)
    lstm(torch.randn(6, 2, 4))[0].square().sum().backward()
    before = _memories(lstm)
    poisoned = torch.ones(6, 3, 5)
    poisoned[2, 1, 3] = float("inf")
    loss = (lstm(torch.randn(6, 3, 4))[0] * poisoned).sum()
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            loss.backward()
    else:
        loss.backward()
    for tag, memory in _memories(lstm).items():
        assert torch.equal(memory, before[tag]), tag


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", BACKENDS)
def test_strided_memories_give_the_contiguous_ones_results(which: str, layout: str) -> None:
    """Memories that are strided views (loaded with assign=True, set by hand) give what
    contiguous ones give, and are updated in place. The native recurrence writes through the
    memory's data pointer and raised "memory must be contiguous" in the backward."""
    before = native._requested()
    try:
        native.set_backend(which)
    except native.NativeUnavailableError:
        pytest.skip("the native kernels could not be built here")
    try:
        torch.manual_seed(0)
        cfg = make_cfg("unified", layout, 0.8, k=3)
        lstm = SparseLSTM(3, 4, config=cfg, dtype=torch.float64)
        twin = copy.deepcopy(lstm)
        x = torch.randn(5, 2, 3, dtype=torch.float64)
        for module in (lstm, twin):
            module(x)[0].square().sum().backward()  # fills the memories
        for tag in lstm.transform_tags():
            memory = getattr(lstm, f"memory_{tag}")
            strided = torch.stack((memory, memory), -1)[..., 0]
            assert not strided.is_contiguous()
            setattr(lstm, f"memory_{tag}", strided)
        for module in (lstm, twin):
            module(x)[0].square().sum().backward()
        for tag, memory in _memories(twin).items():
            torch.testing.assert_close(getattr(lstm, f"memory_{tag}"), memory, **F64)
        for name, grad in _grads(twin).items():
            torch.testing.assert_close(dict(lstm.named_parameters())[name].grad, grad, **F64)
    finally:
        native.set_backend(before)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_nonfinite_at_full_k_keeps_empty_slot_memory_shape(on_nonfinite: str,
                                                           backend: str) -> None:
    """k = 4 H and an empty slot memory (no rows yet) run the dense loop: a non-finite batch
    leaves the memory with no rows. The Python loop had spread it to the batch's rows first
    and, keeping no copy for the dense loop, left it (3, 8) after the raise or the skip."""
    torch.manual_seed(0)
    cfg = make_cfg("unified", "slot", 0.8, k=0).replace(on_nonfinite=on_nonfinite)
    lstm = SparseLSTM(1, 2, config=cfg)
    poisoned = torch.ones(1, 3, 2)
    poisoned[0, 0, 0] = float("inf")
    loss = (lstm(torch.randn(1, 3, 1))[0] * poisoned).sum()
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            loss.backward()
    else:
        loss.backward()
    assert lstm.memory_hh_l0.shape == (0, 8)
    assert lstm.memory_ih_l0.shape == (0, 8)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_huge_finite_gradients_are_not_called_nonfinite(selection: str, backend: str) -> None:
    """float32 gate gradients up to about 5e37 are finite, and so is everything computed from
    them here. A finiteness check that sums the kept values (5 column sums of 4 rows, or 20 kept
    entries) overflows to inf on them and raised FloatingPointError (issue 10)."""
    gen = torch.Generator().manual_seed(3)
    steps, batch, hidden, k = 1, 4, 4, 5
    f32 = {"dtype": torch.float32}
    gx = (0.3 * torch.randn(steps, batch, 4 * hidden, generator=gen, **f32)).requires_grad_()
    h0 = (0.01 * torch.randn(batch, hidden, generator=gen, **f32)).requires_grad_()
    c0 = (2.0 + torch.rand(batch, hidden, generator=gen, **f32)).requires_grad_()
    w = (1e-3 * torch.randn(4 * hidden, hidden, generator=gen, **f32)).requires_grad_()
    b = torch.zeros(4 * hidden, **f32, requires_grad=True)
    d_out = 2e38 * (0.5 + torch.rand(steps, batch, hidden, generator=gen, **f32))
    memory = torch.zeros(4 * hidden, **f32)
    box = [memory.clone()]
    plan = make_plan(make_cfg(selection, "unit", 0.8, k=k), 4 * hidden,
                     generator=torch.Generator().manual_seed(5))
    options = dict(k=k, selection=selection, alpha=0.8, layout="unit",
                   generator=torch.Generator().manual_seed(5))
    grads = []
    for fused in (True, False):
        inputs = [t.detach().clone().requires_grad_() for t in (gx, h0, c0, w, b)]
        if fused:
            out, _, _ = SparseLSTMRecurrence.apply(*inputs, memory, plan, False)
        else:
            out, _, _ = lstm_recurrence_ref(*inputs, box, **options)
        out.backward(d_out)
        grads.append([t.grad for t in inputs])
    assert grads[0][0].abs().max() > 3e37  # large enough for the old check to overflow
    for fast, ref in zip(*grads, strict=True):
        assert fast.isfinite().all()
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=0)
    assert memory.isfinite().all() and memory.abs().max() > 1e37
    torch.testing.assert_close(memory, box[0], rtol=1e-4, atol=0)


def test_empty_batch_and_empty_sequence() -> None:
    lstm = SparseLSTM(4, 5, config=make_cfg("per_example", k=2, memory=0.8))
    lstm(torch.randn(3, 2, 4))[0].sum().backward()
    before = lstm.memory_hh_l0.clone()
    out, (h, _) = lstm(torch.randn(3, 0, 4, requires_grad=True))
    assert out.shape == (3, 0, 5) and h.shape == (1, 0, 5)
    (out.sum() + h.sum()).backward()
    assert torch.equal(lstm.memory_hh_l0, before)
    with pytest.raises(ValueError, match="sequence length 0"):
        lstm(torch.randn(0, 2, 4))


def test_autocast_bfloat16_runs_with_float32_memory() -> None:
    torch.manual_seed(0)
    lstm = SparseLSTM(4, 8, config=make_cfg("per_example", k=3, memory=0.8))
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = lstm(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert lstm.weight_hh_l0.grad.dtype == torch.float32 and lstm.weight_hh_l0.grad.isfinite().all()
    assert lstm.memory_hh_l0.dtype == torch.float32 and lstm.memory_hh_l0.any()


@pytest.mark.parametrize("layers", [1, 2])
def test_autocast_leaves_a_float64_lstm_alone(layers: int, backend: str) -> None:
    """Under autocast a float64 SparseLSTM runs in float64, as nn.LSTM does (k = 4 H: the same
    numbers). The recurrence cast its operands to bfloat16 regardless: the output came back
    bfloat16 and a second layer raised on its float64 W_ih."""
    torch.manual_seed(0)
    dense = nn.LSTM(3, 4, num_layers=layers, bidirectional=True, dtype=torch.float64)
    lstm = SparseLSTM.from_dense(copy.deepcopy(dense), make_cfg(k=16))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = lstm(x)
        ref, (h_ref, c_ref) = dense(x)
    assert out.dtype == h.dtype == c.dtype == torch.float64
    torch.testing.assert_close(out, ref, **F64)
    (out.square().sum() + h.sum() + c.sum()).backward()
    (ref.square().sum() + h_ref.sum() + c_ref.sum()).backward()
    for name, grad in _grads(dense).items():
        torch.testing.assert_close(dict(lstm.named_parameters())[name].grad, grad, **F64)


# module variants of the dtype test: (nn.LSTM / SparseLSTM kwargs, unbatched input)
_DTYPE_VARIANTS = {
    "one_layer": ({}, False),
    "bi2_batch_first": ({"num_layers": 2, "bidirectional": True, "batch_first": True}, False),
    "unbatched": ({}, True),
}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _call(module: nn.Module, x: torch.Tensor, hx, grad: bool, autocast: bool):
    """module(x, hx) in the grad mode asked for: the output dtypes, or the exception raised."""
    try:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out, (h, c) = module(x, hx)
    except Exception as err:  # nn.LSTM's exception is the oracle, whatever its type
        return err
    if grad:  # the sparse backward runs on what the forward accepted
        (out.float().sum() + h.float().sum() + c.float().sum()).backward()
    return out, h, c


@pytest.mark.parametrize("variant", list(_DTYPE_VARIANTS))
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("weights", [torch.float32, torch.float64], ids=dtype_id)
def test_dtypes_as_nn_lstm_in_both_grad_modes(variant: str, autocast: bool,
                                              weights: torch.dtype) -> None:
    """Every input / h0 / c0 dtype (float32, float64, bfloat16, hx or none): where nn.LSTM
    raises, SparseLSTM raises LSTMDtypeError (a ValueError naming the dtypes and shapes) with
    grad and under no_grad alike; where nn.LSTM runs, it runs with nn.LSTM's output dtypes and
    values. The autograd path cast a float64 hx silently (nn.LSTM's, run under no_grad, raised)
    and met a float64 input with F.linear's 'mat1 and mat2 must have the same dtype'."""
    kwargs, unbatched = _DTYPE_VARIANTS[variant]
    torch.manual_seed(0)
    dense = nn.LSTM(3, 4, dtype=weights, **kwargs)
    lstm = SparseLSTM.from_dense(copy.deepcopy(dense), make_cfg(k=2))
    states = 2 * dense.num_layers if dense.bidirectional else dense.num_layers
    batch = () if unbatched else (2,)
    cases = [(x, None, None) for x in _DTYPES]
    cases += [(x, h, c) for x in _DTYPES for h in _DTYPES for c in _DTYPES]
    for x_dtype, h_dtype, c_dtype in cases:
        x = torch.randn(5, *batch, 3, dtype=x_dtype)
        if dense.batch_first and not unbatched:
            x = x.transpose(0, 1)
        hx = None if h_dtype is None else (torch.randn(states, *batch, 4, dtype=h_dtype),
                                           torch.randn(states, *batch, 4, dtype=c_dtype))
        case = f"x {x_dtype}, hx {h_dtype}, {c_dtype}"
        expected = [_call(dense, x, hx, grad, autocast) for grad in (True, False)]
        for grad, ref in zip((True, False), expected, strict=True):
            got = _call(lstm, x, hx, grad, autocast)
            if isinstance(ref, Exception):
                assert isinstance(got, LSTMDtypeError), (case, grad, got)
                # a ValueError as the project's bad input, a RuntimeError as nn.LSTM's kernels'
                assert isinstance(got, ValueError) and isinstance(got, RuntimeError)
                # the message names the offending tensors' dtypes and shapes, as the caller
                # passed them
                named = [x] if str(got).startswith("input") else list(hx)
                for t in named:
                    assert str(t.dtype) in str(got) and str(tuple(t.shape)) in str(got), got
                continue
            assert not isinstance(got, Exception), (case, grad, got)
            for a, e in zip(got, ref, strict=True):
                assert a.dtype == e.dtype and a.shape == e.shape, (case, grad)
                if a.dtype != torch.bfloat16:
                    torch.testing.assert_close(a, e, **(F64 if a.dtype == torch.float64 else {}))
        # nn.LSTM raises in both grad modes or in neither for every case here
        assert isinstance(expected[0], Exception) == isinstance(expected[1], Exception), case


@pytest.mark.parametrize("k", [5, 16])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_probes_see_true_and_propagated_gradients(selection: str, k: int) -> None:
    """A probe's P^T x is the weight gradient applied; at k = 4 H its G^T x is nn.LSTM's (below
    that, G of earlier steps already carries the sparse propagation of later ones)."""
    torch.manual_seed(0)
    dense = nn.LSTM(3, 4, dtype=torch.float64)
    lstm = SparseLSTM.from_dense(copy.deepcopy(dense), make_cfg(selection, k=k, memory=0.8))
    lstm.generator = torch.Generator().manual_seed(3)
    seen = {}
    for tag in lstm.transform_tags():
        lstm.probes[tag] = lambda g, x, p, tag=tag: seen.setdefault(tag, (g, x, p))
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    lstm(x)[0].sin().sum().backward()
    dense(x)[0].sin().sum().backward()
    assert set(seen) == {"ih_l0", "hh_l0"}
    for tag in seen:
        g, inputs, propagated = seen[tag]
        torch.testing.assert_close(propagated.t() @ inputs, getattr(lstm, f"weight_{tag}").grad,
                                   **F64)
        assert int((propagated != 0).sum(1).max()) <= k
        if k == 16:
            torch.testing.assert_close(g.t() @ inputs, getattr(dense, f"weight_{tag}").grad,
                                       **F64)


def test_info_loss_meter_covers_lstm_transforms() -> None:
    from msbp.info import InfoLossMeter

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lstm", SparseLSTM(3, 4, config=make_cfg("per_example", k=16)))
    meter = InfoLossMeter(model, every=2, window=1)
    for step in range(2):
        x = torch.randn(5, 2, 3)
        meter.start_step(step, lambda x=x: model.lstm(x)[0].sum())
        model.lstm(x)[0].sum().backward()
        meter.end_step(step)
    meter.close()
    summary = meter.result()["summary"]
    assert set(summary) == {"lstm.ih_l0", "lstm.hh_l0"}
    for row in summary.values():  # k = 4 H: everything propagated
        assert row["cosine"] == pytest.approx(1.0) and row["local_cosine"] == pytest.approx(1.0)
        assert row["local_mass_fraction"] == pytest.approx(1.0)
    assert not model.lstm.probes


# -- bias=False against the oracle -------------------------------------------------------------


def test_recurrence_without_bias_matches_stepwise_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    gx, h0, c0, w, _ = _recurrence_inputs(gen, 5, 3, 4)
    memory = torch.zeros(16, dtype=torch.float64)
    box = [memory.clone()]
    cfg = make_cfg("per_example", "unit", 0.8, k=3)
    d_out = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    results = []
    for fused in (True, False):
        inputs = [t.detach().clone().requires_grad_() for t in (gx, h0, c0, w)]
        if fused:
            out, _, _ = SparseLSTMRecurrence.apply(*inputs[:4], None, memory,
                                                   make_plan(cfg, 16), False)
        else:
            out, _, _ = lstm_recurrence_ref(*inputs[:4], None, box, k=3,
                                            selection="per_example", alpha=0.8)
        (out * d_out).sum().backward()
        results.append((out.detach(), *(t.grad for t in inputs)))
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, **F64)
    torch.testing.assert_close(memory, box[0], **F64)
    assert memory.any()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_sparse_lstm_without_bias_matches_reference(selection: str, layout: str,
                                                    bidirectional: bool) -> None:
    """SparseLSTM(bias=False) against the oracle built from the reference transforms: the input
    transform with ``sparse_linear_ref``, the recurrence with ``lstm_recurrence_ref``; outputs,
    every gradient and every memory, over two batches."""
    cfg = make_cfg(selection, layout, 0.8, k=3)
    torch.manual_seed(0)
    lstm = SparseLSTM(4, 5, bias=False, bidirectional=bidirectional, config=cfg,
                      dtype=torch.float64)
    assert not lstm.bias and not any("bias" in n for n, _ in lstm.named_parameters())
    ref_w = {n: p.detach().clone().requires_grad_() for n, p in lstm.named_parameters()}
    boxes = {tag: [m.clone()] for tag, m in zip(lstm.transform_tags(), (
        m for _, m in lstm.named_memories()), strict=True)}
    options = dict(k=3, selection=selection, alpha=0.8, layout=layout)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)
        d_out = torch.randn(6, 2, 5 * (1 + bidirectional), generator=gen, dtype=torch.float64)
        lstm.zero_grad()
        for w in ref_w.values():
            w.grad = None
        xs = x.clone().requires_grad_()
        out, _ = lstm(xs)
        (out * d_out).sum().backward()
        xr = x.clone().requires_grad_()
        zeros = torch.zeros(2, 5, dtype=torch.float64)
        outs = []
        for suffix in ("", "_reverse")[: 1 + bidirectional]:
            gates_x = sparse_linear_ref(xr.reshape(12, 4), ref_w[f"weight_ih_l0{suffix}"], None,
                                        boxes[f"ih_l0{suffix}"], **options).reshape(6, 2, 20)
            o, _, _ = lstm_recurrence_ref(gates_x, zeros, zeros, ref_w[f"weight_hh_l0{suffix}"],
                                          None, boxes[f"hh_l0{suffix}"],
                                          reverse=bool(suffix), **options)
            outs.append(o)
        ref_out = torch.cat(outs, dim=2)
        (ref_out * d_out).sum().backward()
        torch.testing.assert_close(out, ref_out, **F64)
        torch.testing.assert_close(xs.grad, xr.grad, **F64)
        for name, p in lstm.named_parameters():
            torch.testing.assert_close(p.grad, ref_w[name].grad, **F64, msg=name)
        for tag in lstm.transform_tags():
            torch.testing.assert_close(getattr(lstm, f"memory_{tag}"), boxes[tag][0], **F64,
                                       msg=tag)
    assert all(m.any() for _, m in lstm.named_memories())


# -- no_grad: nn.LSTM's forward; the native op's registration ----------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_forward_without_backward_is_nn_lstm(mode: str, monkeypatch) -> None:
    """Without a backward to run, SparseLSTM runs nn.LSTM's fused forward: same outputs as its
    own recorded forward, the recurrence op untouched, the memory unchanged."""
    torch.manual_seed(0)
    lstm = SparseLSTM(4, 6, 2, batch_first=True, bidirectional=True, dtype=torch.float64,
                      config=make_cfg("unified", k=3, memory=0.8))
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    hx = (torch.randn(4, 3, 6, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64))
    want, (want_h, want_c) = lstm(x, hx)  # recorded: the sparse path
    assert want.grad_fn is not None

    class NotCalled:
        @staticmethod
        def apply(*args):
            raise AssertionError("the sparse recurrence ran without a backward to run")

    monkeypatch.setattr("msbp.nn.lstm.SparseLSTMRecurrence", NotCalled)
    before = _memories(lstm)
    if mode == "frozen":
        lstm.requires_grad_(False)
        got, (h, c) = lstm(x, hx)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            got, (h, c) = lstm(x, hx)
    for a, b in ((got, want), (h, want_h), (c, want_c)):
        torch.testing.assert_close(a, b.detach(), **F64)
    for tag, memory in _memories(lstm).items():
        assert torch.equal(memory, before[tag]), tag


def _native_or_skip() -> None:
    try:
        native.set_backend("native")
    except native.NativeUnavailableError:
        pytest.skip("the native kernels could not be built here")


@pytest.fixture
def native_backend():
    before = native._requested()
    _native_or_skip()
    yield
    native.set_backend(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_native_forward_recurrence_is_the_python_loop_bit_for_bit(dtype, native_backend,
                                                                 monkeypatch) -> None:
    """The forward recurrence in C++ (lstm_recurrence_forward) runs the Python loop's ATen ops:
    the same bits, both directions, with and without the bias, an empty batch included, with
    W_hh packed once where both ask for it (float32, 4 steps and 8 rows on) and without; and
    _lstm_steps takes it where the native backend is on."""
    module = native.eager_module()
    calls = []
    real = module.lstm_recurrence_forward

    class Counted:
        def __getattr__(self, name):
            return getattr(module, name)

        def lstm_recurrence_forward(self, *args):
            calls.append(args)
            return real(*args)

    counted = Counted()
    monkeypatch.setattr(native, "eager_module", lambda: counted)
    monkeypatch.setattr(native, "eager_ops", lambda: counted)
    gen = torch.Generator().manual_seed(3)
    packed = []
    shapes = ((4, 3, 5), (6, 0, 4), (3, 16, 40), (5, 9, 24))
    for steps, batch, hidden in shapes:
        inputs = _recurrence_inputs(gen, steps, batch, hidden)
        gx, h0, c0, w, b = (t.detach().to(dtype) for t in inputs)
        w = w * 0.3
        for bias in (b, None):
            for reverse in (False, True):
                before = len(calls)
                got = recurrent._lstm_steps(gx, h0, c0, w, bias, reverse)
                assert len(calls) == before + 1
                packed.append(calls[-1][-1])
                native.set_backend("python")
                want = recurrent._lstm_steps(gx, h0, c0, w, bias, reverse)
                native.set_backend("native")
                assert len(calls) == before + 1
                for name, a, e in zip(("act", "cells", "tanh_c", "out"), got, want, strict=True):
                    assert a.shape == e.shape and a.dtype == e.dtype, name
                    assert torch.equal(a, e), (name, steps, batch, hidden, bias is None, reverse)
    # the packed products where this torch has MKL's ops: float32 at 5 steps of 9 rows only
    assert packed == [recurrent._MKL_LINEAR is not None and dtype == torch.float32
                      and shape == (5, 9, 24) for shape in shapes for _ in range(4)]


@pytest.mark.parametrize(("selection", "layout", "rows"), [
    ("unified", "unit", 4), ("per_example", "slot", 3), ("random", "slot", 0), ("dense", "unit", 4),
])
def test_native_op_schema_and_fake(selection: str, layout: str, rows: int,
                                   native_backend) -> None:
    """torch.library.opcheck: the schema (memory mutated, declared Tensor(a!)), the fake
    implementation against the real op (data-dependent row count), and functionalisation."""
    recurrent._register_fake()
    gen = torch.Generator().manual_seed(0)
    steps, batch, hidden, k = 3, 3, 4, 3
    gx, h0, c0, w, b = (t.detach() for t in _recurrence_inputs(gen, steps, batch, hidden))
    act, cells, tanh_c, out = recurrent._lstm_steps(gx, h0, c0, w, b, False)
    d_out = torch.randn(steps, batch, hidden, generator=gen, dtype=torch.float64)
    memory = torch.ones((4 * hidden,) if layout == "unit" else (rows, 4 * hidden),
                        dtype=torch.float64)
    random_cols = torch.stack([torch.randperm(4 * hidden, generator=gen)[:k]
                               for _ in range(steps)])
    code = recurrent._SELECTION_CODES.get(selection, 0)
    k = 4 * hidden if selection == "dense" else k
    args = (act, cells, tanh_c, out, h0, c0, w, d_out, None, d_out[0], memory, random_cols, k,
            code, 0.8, layout == "slot", False, True, False)
    torch.library.opcheck(torch.ops.msbp.lstm_recurrence_backward.default, args)
    cols, rows = torch.ops.msbp.lstm_recurrence_backward(*args)[3:5]
    assert cols.shape[0] == rows.shape[0] > 0 and bool((cols.diff() > 0).all())  # ascending


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("selection", SELECTIONS)
def test_compiled_recurrence_matches_eager(selection: str, native_backend) -> None:
    """torch.compile(fullgraph=True) traces the whole recurrence, its native backward included,
    and gives the eager gradients and memory."""
    gen = torch.Generator().manual_seed(0)
    steps, batch, hidden = 4, 3, 5
    memory = torch.zeros(4 * hidden, dtype=torch.float64)
    plan = make_plan(make_cfg(selection, "unit", 0.8, k=3), 4 * hidden)

    def loss(*inputs: torch.Tensor) -> torch.Tensor:
        out, h_n, _ = SparseLSTMRecurrence.apply(*inputs, memory, plan, False)
        return out.square().sum() + h_n.sum()

    inputs = _recurrence_inputs(gen, steps, batch, hidden)
    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        memory.zero_()
        for t in inputs:
            t.grad = None
        torch.manual_seed(5)  # random selection draws from the global generator
        fn(*inputs).backward()
        results.append(([t.grad for t in inputs], memory.clone()))
    (eager, eager_memory), (compiled, compiled_memory) = results
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, **F64)
    torch.testing.assert_close(eager_memory, compiled_memory, **F64)
    assert compiled_memory.any()


class _Tagger(nn.Module):
    """Embedding -> LSTM -> linear, the POS tagger's shape in small."""

    def __init__(self, bidirectional: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(5 * (1 + bidirectional), 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(ids))[0])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_compiled_sparsified_tagger_matches_eager(bidirectional: bool) -> None:
    """torch.compile(model, fullgraph=True, inductor) of a model whose nn.LSTM was sparsified:
    traced whole (SparseLSTM is no nn.LSTM instance, which dynamo refuses to wrap), with eager's
    gradients and memories after 3 steps, and the no_grad forward compiled too."""
    if not native.use_native():
        pytest.skip("fullgraph needs the native ops")
    torch.manual_seed(0)
    model = sparsify(_Tagger(bidirectional), make_cfg("unified", "unit", 0.8, k=3), exclude="out")
    assert isinstance(model.lstm, SparseLSTM) and not isinstance(model.lstm, nn.LSTM)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 30, (4, 7), generator=gen)
        for m in (model, eager):
            m.zero_grad(set_to_none=True)
        compiled(ids).square().sum().backward()
        eager(ids).square().sum().backward()
        for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
        for (name, a), (_, b) in zip(model.lstm.named_memories(), eager.lstm.named_memories(),
                                     strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), eager(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("k", [2, 100], ids=["sparse", "k_out"])
def test_compiled_slot_memory_of_a_new_batch_shape_matches_eager(k: int, native_backend) -> None:
    """torch.compile (aot_eager, no fullgraph) of a SparseLSTM with a slot memory that changes
    shape inside the compiled call (its first step, then a new batch size): the layer breaks
    the graph there and trains as eager, bit for bit. The native op resized the memory in
    place, which the traced graph then copied back into its old shape: at k = 4H the compiled
    backward raised a size mismatch (fuzz of torch.compile against eager). (Not the ``backend``
    fixture: its counting wrapper of ``_native_backward`` is a graph break of its own, which
    hid the bug; the PyTorch loop spreads the memory in Python and breaks the graph there.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4))
    sparsify(model, SparseBackpropConfig(k=k, memory=0.8, memory_layout="slot"))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    for batch in (2, 2, 5):
        x = torch.randn(3, batch, 3, generator=gen)
        for m in (model, eager):
            m.zero_grad(set_to_none=True)
        eager(x)[0].square().sum().backward()
        compiled(x)[0].square().sum().backward()
        for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), name
        for (name, a), (_, b) in zip(model[0].named_memories(), eager[0].named_memories(),
                                     strict=True):
            assert a.shape == (3 * batch if name.startswith("memory_ih") else batch, 16), name
            assert torch.equal(a, b), name


def test_recurrent_weight_rows_go_into_grad_like_autograd(native_backend) -> None:
    """The native backward adds W_hh's rows straight into .grad (its kept buffer put back under
    set_to_none): over steps zeroed either way, with a second backward accumulating, W_hh.grad
    equals that of a twin whose hook on W_hh makes autograd hand it a dense dW; and a backward
    that does not ask for the weights (autograd.grad) leaves .grad alone."""
    torch.manual_seed(0)
    cfg = make_cfg("unified", "unit", 0.8, k=3)
    lstm = SparseLSTM(4, 5, config=cfg)
    twin = copy.deepcopy(lstm)
    twin.weight_hh_l0.register_hook(lambda g: g.clone())  # autograd's own dense path
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(6, 2, 4, generator=gen)
        for m in (lstm, twin):
            m.zero_grad(set_to_none=step % 2 == 0)
            m(x)[0].square().sum().backward()
            if step == 3:  # accumulate a second backward
                m(x)[0].sum().backward()
        torch.testing.assert_close(lstm.weight_hh_l0.grad, twin.weight_hh_l0.grad,
                                   rtol=1e-6, atol=1e-7)
        for (name, a), (_, b) in zip(lstm.named_memories(), twin.named_memories(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    before = lstm.weight_hh_l0.grad.clone()
    x = torch.randn(6, 2, 4, generator=gen, requires_grad=True)
    torch.autograd.grad(lstm(x)[0].sum(), [x])
    assert torch.equal(lstm.weight_hh_l0.grad, before)


def _spy_reusing(monkeypatch) -> list[bool]:
    """Calls of the native backward that writes G over the saved activations (its
    overwrite_act argument), recorded."""
    module = native.eager_ops()
    real = module.lstm_recurrence_backward_eager
    calls: list[bool] = []

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(module, "lstm_recurrence_backward_eager", spy)
    return calls


@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_gate_gradients_over_the_saved_activations_only_when_the_graph_goes(
        selection: str, native_backend, monkeypatch) -> None:
    """A backward that frees its graph writes the gate gradients over the saved activations; one
    with retain_graph=True must not (it reads them again): two retained backward passes give
    the gradients of two fresh ones, and equal those of the overwriting path and of the PyTorch
    path (SBP: no memory between the passes). on_nonfinite="skip" never overwrites."""
    calls = _spy_reusing(monkeypatch)
    torch.manual_seed(0)
    lstm = SparseLSTM(6, 7, config=make_cfg(selection, "unit", 0.0, k=5))
    x = torch.randn(5, 3, 6, requires_grad=True)

    def grads(retain: bool, backend: str = "native") -> list[torch.Tensor]:
        native.set_backend(backend)
        lstm.zero_grad(set_to_none=True)
        x.grad = None
        y = lstm(x)[0]
        for _ in range(2 if retain else 1):
            y.square().sum().backward(retain_graph=retain)
        out = [x.grad.clone(), *(p.grad.clone() for p in lstm.parameters())]
        native.set_backend("native")
        return out

    retained = grads(retain=True)
    assert calls == []
    fresh = grads(retain=False)
    assert calls == [True]
    python_path = grads(retain=False, backend="python")
    for a, b, c in zip(retained, fresh, python_path, strict=True):
        torch.testing.assert_close(a, 2 * b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
    skipping = SparseLSTM(6, 7, config=make_cfg(selection, "unit", 0.0, k=5, on_nonfinite="skip"))
    skipping(x)[0].sum().backward()
    assert calls == [True]


def test_a_failed_backward_over_the_activations_is_not_run_again(native_backend,
                                                                    monkeypatch) -> None:
    """After a backward that wrote over the saved activations fails (a non-finite gradient
    raises), running backward through the same graph again is refused, not computed from the
    gate gradients."""
    calls = _spy_reusing(monkeypatch)
    lstm = SparseLSTM(4, 5, config=make_cfg("unified", "unit", 0.8, k=3))
    y = lstm(torch.randn(3, 2, 4))[0]
    g = torch.ones_like(y)
    g[1, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        y.backward(g)
    assert calls == [True]
    with pytest.raises(RuntimeError, match="already ran once|backward through the graph"):
        y.backward(torch.ones_like(y))


def test_reused_gradient_buffers_cleared_after_accumulation(backend):
    """Three accumulated backward passes write more rows than the weights have (4 H = 20, 10
    kept per row and step): after ``zero_grad(set_to_none=True)`` the next gradient is that
    backward's alone (no memory: compared with a copy that ran only that backward)."""
    torch.manual_seed(0)
    cfg = SparseBackpropConfig(ratio=None, k=10, memory=0.0, selection="per_example")
    lstm = SparseLSTM(4, 5, config=cfg, dtype=torch.float64)
    fresh = copy.deepcopy(lstm)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 2, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    for x in batches[:3]:
        lstm(x)[0].sin().sum().backward()
    lstm.zero_grad(set_to_none=True)
    lstm(batches[3])[0].sin().sum().backward()
    fresh(batches[3])[0].sin().sum().backward()
    for (name, p), q in zip(lstm.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_same_as_plain(backend, reentrant):
    """``torch.utils.checkpoint`` around the LSTM: the same gradients and memory as without
    (the non-reentrant form allows one unpack of the saved tensors per backward)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cfg = SparseBackpropConfig(ratio=None, k=6, memory=0.5)
    plain = SparseLSTM(4, 5, config=cfg, dtype=torch.float64)
    ckpt = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
        xc = x.clone().requires_grad_(True)
        plain(x)[0].sin().sum().backward()
        checkpoint(ckpt, xc, use_reentrant=reentrant)[0].sin().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
    for (name, m), (_, n) in zip(plain.named_memories(), ckpt.named_memories(), strict=True):
        torch.testing.assert_close(m, n, rtol=1e-12, atol=1e-12, msg=name)


def test_penalty_on_the_weights_does_not_stay_in_the_put_back_buffers(backend):
    """An L2 penalty on the weights in the loss adds a dense gradient that autograd sums with
    the recurrence's rows: after ``zero_grad(set_to_none=True)`` each step's gradient is that
    step's alone (no memory and no optimizer: equal to a fresh copy's on the same batch)."""
    torch.manual_seed(0)
    cfg = SparseBackpropConfig(ratio=None, k=6, memory=0.0, selection="per_example")
    lstm = SparseLSTM(4, 5, config=cfg, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)

    def loss(model, x):
        return model(x)[0].sin().sum() + sum(0.3 * p.square().sum() for p in model.parameters())

    for _ in range(3):
        x = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
        fresh = copy.deepcopy(lstm)
        fresh.zero_grad(set_to_none=True)
        lstm.zero_grad(set_to_none=True)
        loss(lstm, x).backward()
        loss(fresh, x).backward()
        for (name, p), q in zip(lstm.named_parameters(), fresh.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_old_gradient_kept_after_the_forward_is_not_overwritten(backend):
    """``loss = lstm(x); old = W_hh.grad; zero_grad(set_to_none=True); loss.backward()``: the
    old .grad stays as it was and the new one is that backward's alone."""
    torch.manual_seed(0)
    cfg = SparseBackpropConfig(ratio=None, k=6, memory=0.0, selection="per_example")
    lstm = SparseLSTM(4, 5, config=cfg, dtype=torch.float64)
    fresh = copy.deepcopy(lstm)
    gen = torch.Generator().manual_seed(2)
    x1, x2 = (torch.randn(3, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    lstm(x1)[0].sin().sum().backward()
    loss = lstm(x2)[0].sin().sum()  # while .grad exists
    old = lstm.weight_hh_l0.grad
    before = old.clone()
    lstm.zero_grad(set_to_none=True)
    loss.backward()
    fresh(x2)[0].sin().sum().backward()
    assert torch.equal(old, before)
    assert lstm.weight_hh_l0.grad is not old
    for (name, p), q in zip(lstm.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_gradient_buffer_is_put_back_every_step(backend):
    """The standard loop (zero_grad(set_to_none=True), forward, backward) reuses W_hh's
    gradient buffer from the second step on."""
    torch.manual_seed(0)
    cfg = SparseBackpropConfig(ratio=None, k=6, memory=0.5)
    lstm = SparseLSTM(4, 5, config=cfg, dtype=torch.float64)
    grads = []
    for _ in range(4):
        lstm.zero_grad(set_to_none=True)
        lstm(torch.randn(3, 2, 4, dtype=torch.float64))[0].sin().sum().backward()
        grads.append(weakref.ref(lstm.weight_hh_l0.grad))  # no reference that would stop the reuse
    assert all(ref() is lstm.weight_hh_l0.grad for ref in grads[1:])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_non_contiguous_recurrent_weight_gets_the_contiguous_ones_gradient(backend, set_to_none):
    """A W_hh with column-major strides (``p.data = p.data.t().contiguous().t()``): the native
    backward put back a gradient buffer made with the weight's strides and wrote its rows into
    it as if it were row-major, a silently scrambled dW_hh (k < 4 H). Found by the
    API-combination fuzz (native against MSBP_BACKEND=python after such a .data swap)."""
    cfg = SparseBackpropConfig(ratio=None, k=3, memory=0.5)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    twins = []
    for strided in (False, True):
        torch.manual_seed(0)
        lstm = SparseLSTM(4, 3, config=cfg, dtype=torch.float64)
        if strided:
            with torch.no_grad():
                for p in (lstm.weight_hh_l0, lstm.weight_ih_l0):
                    p.data = p.data.t().contiguous().t()
        grads = []
        for x in xs:  # the buffer is made, then put back, then put back after rows were written
            lstm.zero_grad(set_to_none=set_to_none)
            lstm(x)[0].sin().sum().backward()
            grads.append({n: p.grad.clone() for n, p in lstm.named_parameters()})
        twins.append(grads)
    for plain, strided in zip(*twins, strict=True):
        for name in plain:
            torch.testing.assert_close(strided[name], plain[name], **F64, msg=name)


@pytest.mark.parametrize("selection, bidirectional", [("unified", False), ("per_example", True)])
def test_flop_counter_on_the_meta_device_counts_as_on_the_cpu(backend, selection, bidirectional):
    """Lightning's ``measure_flops`` builds the model on the meta device: the recurrence's
    backward failed there (autocast has no meta device; then a host read); it now runs each
    step's k-wide products from shapes alone and counts what a CPU run counts."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            torch.manual_seed(0)
            model = sparsify(
                nn.LSTM(5, 8, num_layers=2, batch_first=True, bidirectional=bidirectional),
                SparseBackpropConfig(k=3, memory=0.5, selection=selection),
            )
            x = torch.randn(2, 6, 5)
        with FlopCounterMode(display=False) as counter:
            model(x)[0].sum().backward()
        counts[device] = counter.get_total_flops()
        assert model.weight_hh_l1.grad.shape == (32, 8)
        assert model.weight_hh_l1.grad.device.type == device
    if selection == "per_example" and backend == "python":
        # the PyTorch loop multiplies dW_hh's rows for the union of the batch's kept columns
        # (more than k), which the native op's formula and the meta run count as k
        assert 0 < counts["meta"] < counts["cpu"]
    else:
        assert counts["meta"] == counts["cpu"] > 0


@pytest.mark.parametrize("bad", [4 * 4, -1, 1 << 40])
def test_native_op_rejects_random_cols_out_of_range(bad: int, native_backend) -> None:
    """``random_cols`` holding a column outside [0, 4H): the recurrence indexed G, W_hh and the
    memory by it unchecked (heap corruption, a segfault). Now a clear error, the memory
    untouched. Found by the malformed-input fuzz."""
    gen = torch.Generator().manual_seed(0)
    steps, batch, hidden, k = 3, 3, 4, 3
    gx, h0, c0, w, b = (t.detach() for t in _recurrence_inputs(gen, steps, batch, hidden))
    act, cells, tanh_c, out = recurrent._lstm_steps(gx, h0, c0, w, b, False)
    d_out = torch.randn(steps, batch, hidden, generator=gen, dtype=torch.float64)
    memory = torch.ones(4 * hidden, dtype=torch.float64)
    random_cols = torch.stack([torch.randperm(4 * hidden, generator=gen)[:k]
                               for _ in range(steps)])
    random_cols[1, 2] = bad
    with pytest.raises(RuntimeError, match="random_cols"):
        torch.ops.msbp.lstm_recurrence_backward(
            act, cells, tanh_c, out, h0, c0, w, d_out, None, None, memory, random_cols, k,
            recurrent._SELECTION_CODES["random"], 0.8, False, False, True, False)
    assert bool((memory == 1).all())


@pytest.mark.parametrize("kind", ["ih", "hh"])
def test_a_memory_sharing_its_own_storage_is_refused_at_the_call(kind: str) -> None:
    """An expand()ed memory of the input or recurrent transform failed only in backward ("more
    than one element of the written-to tensor refers to a single memory location"); now a
    ValueError at the call, before either backend runs. Found by the malformed-input fuzz."""
    lstm = SparseLSTM(4, 5, config=SparseBackpropConfig(k=3, memory=0.5))
    setattr(lstm, f"memory_{kind}_l0", torch.zeros(1).expand(20))
    with pytest.raises(ValueError, match="share storage"):
        lstm(torch.randn(3, 2, 4, requires_grad=True))
