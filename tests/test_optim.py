"""LazyRowAdam: equals Adam when nothing is sparse, equals a row-wise lazy Adam otherwise.

Every test that steps runs on both backends (the C++ row step and the PyTorch path)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import msbp
from msbp.ops.touched_rows import log_touched_rows, pending_rows
from msbp.optim import LazyRowAdam, LazyRowAdamW


@pytest.fixture(autouse=True)
def _both_backends(backend):
    """Run every test with the C++ row step and with the PyTorch path (conftest's fixture)."""
    return backend


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).double()


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("adamw", [False, True], ids=["adam", "adamw"])
def test_k_equal_out_matches_torch_adam(adamw):
    a = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=10), exclude="2")
    b = _mlp()
    if adamw:
        oa = LazyRowAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
        ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        oa, ob = LazyRowAdam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 6, dtype=torch.float64, generator=gen)
        _step(a, oa, x)
        _step(b, ob, x)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def _lazy_adam_reference(model, x, state, lr, t):
    """Adam on the rows with a non-zero gradient only; every other entry keeps its moments."""
    for p in model.parameters():
        p.grad = None
    model(x).square().sum().backward()
    with torch.no_grad():
        for name, p in model.named_parameters():
            m, v = state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
            g = p.grad
            rows = g.abs().sum(1) > 0 if name == "0.weight" else torch.ones_like(g, dtype=bool)
            if p.dim() == 2 and name != "0.weight":
                rows = torch.ones(p.shape[0], dtype=torch.bool)
            m[rows] = 0.9 * m[rows] + 0.1 * g[rows]
            v[rows] = 0.999 * v[rows] + 0.001 * g[rows] ** 2
            denom = (v[rows] / (1 - 0.999**t)).sqrt() + 1e-8
            p[rows] -= lr * (m[rows] / (1 - 0.9**t)) / denom


@pytest.mark.parametrize("selection", ["unified", "per_example"])
@pytest.mark.parametrize("memory", [0.0, 0.5])
def test_sparse_rows_match_lazy_reference(selection, memory):
    cfg = msbp.SparseBackpropConfig(k=3, memory=memory, selection=selection)
    model = msbp.sparsify(_mlp(), cfg, exclude="2")
    ref = copy.deepcopy(model)
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    state: dict = {}
    gen = torch.Generator().manual_seed(2)
    before = model[0].weight.detach().clone()
    for t in range(1, 7):
        x = torch.randn(4, 6, dtype=torch.float64, generator=gen)
        _step(model, opt, x)
        _lazy_adam_reference(ref, x, state, 1e-2, t)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # rows never selected stay exactly as initialised (no stale-momentum drift)
    changed = (model[0].weight != before).any(1)
    assert changed.sum() < model[0].weight.shape[0] or selection == "per_example"


def _stepped(k: int, seed: int, steps: int):
    """The test MLP sparsified with k, its LazyRowAdam and input generator, after `steps`
    ordinary steps."""
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=k), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
        opt.step()
    return model, opt, gen


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_keeps_buffer_for_in_place_rows(set_to_none):
    """The sparse layer's gradient buffer survives zero_grad either way: as .grad, zeroed, or
    (set_to_none) held by the layer, which puts it back, cleared, at the next backward."""
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6, dtype=torch.float64)
    _step(model, opt, x)
    ptr = model[0].weight.grad.data_ptr()
    opt.zero_grad(set_to_none=set_to_none)
    grad = model[0].weight.grad
    if set_to_none:
        assert grad is None  # as torch's optimizers leave it
        kept = model[0].weight.__dict__.get("_msbp_kept_grad_buffer")
        if msbp.native.use_native():  # cleared here, not in the next (timed) backward
            assert kept[0].data_ptr() == ptr and not kept[0].any()
    else:
        assert grad is not None and not grad.any()  # kept, zeroed
    assert model[2].weight.grad is None or not set_to_none  # dense layer: as usual
    model(x).square().sum().backward()
    assert model[0].weight.grad.data_ptr() == ptr
    assert int((model[0].weight.grad.abs().sum(1) > 0).sum()) == 3


def test_discarded_rows_do_not_step_a_later_gradient_written_by_something_else(backend):
    """backward, zero_grad() (discarded), then a gradient of the weight that the layer did not
    write (a penalty in a step where the layer did not run): the discarded rows must not pick
    which rows step; with no rows logged the weight takes a whole step (and a warning)."""
    model, opt, gen = _stepped(k=2, seed=4, steps=2)
    w = model[0].weight
    model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
    opt.zero_grad()  # discarded
    w.square().sum().backward()  # every row of w gets a gradient, no layer ran
    before = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="without a log of its rows"):
        opt.step()
    assert bool((w != before).all(1).all())


@pytest.mark.parametrize("kind", ["linear", "linear_autocast", "lstm", "conv"])
def test_a_weight_never_logged_is_known_as_a_sparse_layers_weight(backend, kind):
    """A sparse layer ran (its output unused), its weight's gradient came from a penalty alone,
    and the optimizer stepped twice without zero_grad: the first step is dense (with the warning
    of a gradient written without a log of its rows), the second takes none (the gradient is
    the one already stepped: the layer took no part). On the C++ path the forward's row mask made
    the weight known as a sparse layer's; every other path (the PyTorch backend, autocast, the
    LSTM's recurrent weight, convolutions) knew it only from a first log, and stepped the stale
    gradient again."""
    config = msbp.SparseBackpropConfig(k=2, memory=0.0)
    torch.manual_seed(0)
    if kind.startswith("linear"):
        layer = msbp.SparseLinear(3, 4, config=config, bias=False)
        weight, x = layer.weight, torch.randn(2, 3)
    elif kind == "lstm":
        layer = msbp.SparseLSTM(3, 4, config=config, bias=False)
        weight, x = layer.weight_hh_l0, torch.randn(5, 2, 3)
    else:
        layer = msbp.SparseConv2d(2, 4, 3, config=config, bias=False)
        weight, x = layer.weight, torch.randn(1, 2, 5, 5)
    opt = LazyRowAdam(layer.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "linear_autocast"):
        layer(x)  # a forward whose output is not used
    (0.5 * weight.square().sum()).backward()  # the gradient: a penalty only
    before = weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="without a log of its rows"):
        opt.step()  # dense
    assert bool((weight != before).all())
    before = weight.detach().clone()
    opt.step()  # nothing new written: no step
    assert torch.equal(weight, before)
    assert float(opt.state[weight]["step"]) == 1


@pytest.mark.parametrize("how", ["model.zero_grad", "grad_none", "opt.zero_grad"])
@pytest.mark.parametrize("kind", ["linear", "linear_autocast", "conv", "tied"])
def test_rows_of_a_gradient_discarded_outside_the_optimizer_take_no_step(backend, how, kind):
    """A backward, its gradient discarded by ``model.zero_grad()`` or ``.grad = None`` (not by
    the optimizer), a forward of the layer whose output goes unused, and a loss that is a
    penalty on the weight alone: its gradient takes a dense step (with the warning of a gradient
    written without a log of its rows), as after ``optimizer.zero_grad()``. No backward of the
    layer came to forget the discarded gradient's rows, so the penalty's gradient stepped those
    rows only (both backends; s20 optimizer fuzzer, seed 98967)."""
    torch.manual_seed(0)
    cfg = msbp.SparseBackpropConfig(k=2, memory=0.0)
    if kind == "conv":
        model = msbp.SparseConv2d(2, 6, 3, config=cfg)
        weight, x = model.weight, torch.randn(1, 2, 5, 5)
    elif kind == "tied":
        model = nn.Sequential(
            msbp.SparseLinear(6, 6, config=cfg.replace(selection="per_example")),
            msbp.SparseLinear(6, 6, config=cfg.replace(k=3)),
        )
        model[1].weight = model[0].weight
        weight, x = model[0].weight, torch.randn(2, 6)
    else:
        model = msbp.SparseLinear(6, 6, config=cfg)
        weight, x = model.weight, torch.randn(2, 6)
    opt = LazyRowAdam(model.parameters(), lr=0.01)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "linear_autocast")
    with autocast:
        model(x).float().square().sum().backward()
    assert bool((weight.grad.abs().sum(tuple(range(1, weight.dim()))) == 0).any())
    if how == "model.zero_grad":
        model.zero_grad()
    elif how == "grad_none":
        for p in model.parameters():
            p.grad = None
    else:
        opt.zero_grad()
    with autocast:
        model(x)  # the layer runs, its output unused
    before = weight.detach().clone()
    (0.01 * weight.square().sum()).backward()
    with pytest.warns(RuntimeWarning, match="without a log of its rows"):
        opt.step()
    assert bool((weight != before).all())


@pytest.mark.parametrize("hook", ["post_accumulate", "tensor"])
def test_rows_of_a_shared_weight_from_both_paths_all_step_with_a_hook(backend, hook):
    """One weight, two sparse layers in one graph, one on the C++ path (unified) and one on the
    PyTorch glue (random selection), and a hook on the weight, so that the C++ path hands its dW
    to autograd and .grad stays None until the pass ends: every row with a gradient steps. The
    PyTorch call, finding .grad None, took the C++ call's marks of the same pass for a discarded
    gradient's and cleared them (its rows stayed unstepped; s20 optimizer fuzzer, seed 93194)."""
    torch.manual_seed(0)
    a = msbp.SparseLinear(4, 4, config=msbp.SparseBackpropConfig(k=1, selection="random",
                                                                 memory=0.0))
    b = msbp.SparseLinear(4, 4, config=msbp.SparseBackpropConfig(k=2, memory=1.0))
    b.weight = a.weight
    w = a.weight
    opt = LazyRowAdam([*a.parameters(), b.bias], lr=1e-2)
    if hook == "post_accumulate":
        w.register_post_accumulate_grad_hook(lambda t: None)
    else:
        w.register_hook(lambda g: g)
    b(torch.tanh(a(torch.randn(6, 4)))).square().sum().backward()
    with_grad = w.grad.abs().sum(1) != 0
    assert int(with_grad.sum()) >= 2  # rows of both calls
    before = w.detach().clone()
    opt.step()
    moved = (w.detach() - before).abs().sum(1) != 0
    assert torch.equal(moved, with_grad)


@pytest.mark.parametrize("how", ["load_state_dict", "fresh_optimizer"])
def test_zero_grad_clears_rows_stepped_before_a_state_was_loaded(backend, how):
    """step(), then the optimizer's state loaded (a checkpoint restored mid-run, or a new
    optimizer taking over), then zero_grad(set_to_none=False): the rows the layers wrote are
    cleared although this optimizer did not see them stepped, and the next gradient is that
    backward's alone."""
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=2), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(8)
    model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
    opt.step()
    if how == "fresh_optimizer":
        state, opt = opt.state_dict(), LazyRowAdam(model.parameters(), lr=1e-2)
        opt.load_state_dict(state)
    else:
        opt.load_state_dict(opt.state_dict())
    opt.zero_grad(set_to_none=False)
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    assert torch.equal(model[0].weight.grad, twin[0].weight.grad)


def test_empty_batch_leaves_a_sparse_weight_alone(backend):
    """A first backward on an empty batch writes no row: the sparse layer's weight takes no step
    (no step count, no move), on both paths alike, and the next step is as if it never ran."""
    layer = msbp.SparseLinear(4, 3, config=msbp.SparseBackpropConfig(k=2, memory=0.0),
                              dtype=torch.float64)
    twin = copy.deepcopy(layer)
    opt = LazyRowAdam(layer.parameters(), lr=1e-2, weight_decay=0.01)
    opt_twin = LazyRowAdam(twin.parameters(), lr=1e-2, weight_decay=0.01)
    before = layer.weight.detach().clone()
    layer(torch.zeros(0, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert torch.equal(layer.weight, before)
    assert float(opt.state.get(layer.weight, {}).get("step", 0)) == 0
    opt.zero_grad()
    x = torch.ones(2, 4, dtype=torch.float64)
    for model, optimizer in ((layer, opt), (twin, opt_twin)):
        model(x).sum().backward()
        optimizer.step()
    assert torch.equal(layer.weight, twin.weight)


def _step_writing_no_row(config: msbp.SparseBackpropConfig, written: str):
    """A SparseLinear's second step, whose backward writes no row of the weight (an empty batch;
    per-example top-k of an all-zero output gradient), its gradient otherwise as ``written``
    says: a penalty on the weight in the loss, the first step's gradient left in ``.grad``
    (no zero_grad), or a dense backward's discarded by ``.grad = None``. Returns the weight and
    its step count before and after."""
    torch.manual_seed(0)
    layer = msbp.SparseLinear(4, 3, config=config, dtype=torch.float64)
    opt = LazyRowAdam(layer.parameters(), lr=1e-2)
    x = torch.ones(2, 4, dtype=torch.float64)
    layer(x).sum().backward()
    opt.step()
    if written != "left_from_last_step":
        opt.zero_grad()
    if written == "discarded":
        layer(x).sum().backward()
        layer.weight.grad = None
    before = layer.weight.detach().clone(), float(opt.state[layer.weight]["step"])
    if config.selection == "per_example":
        loss = (layer(x) * 0).sum()
    else:
        loss = layer(x[:0]).sum()
    if written == "penalty":
        loss = loss + 0.01 * layer.weight.square().sum()
    loss.backward()
    opt.step()
    return before, (layer.weight.detach().clone(), float(opt.state[layer.weight]["step"]))


@pytest.mark.parametrize("written", ["penalty", "left_from_last_step"])
def test_a_log_of_no_row_takes_no_step_whatever_else_wrote_the_gradient(backend, written):
    """An empty batch through the PyTorch path (grad_inplace=False there on both backends) logs
    an empty row set: the weight takes no step, even where its gradient changed since the last
    step. The C++ step folds the log into the row mask, where an empty set leaves no trace: it
    took the changed gradient for one no sparse layer wrote and stepped it whole."""
    config = msbp.SparseBackpropConfig(k=2, memory=0.0, grad_inplace=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before, after = _step_writing_no_row(config, written)
    assert torch.equal(after[0], before[0])
    assert after[1] == before[1]
    assert not caught  # nor the warning of a gradient written without a log of its rows


@pytest.mark.parametrize(
    ("selection", "written"),
    [("unified", "penalty"), ("unified", "left_from_last_step"), ("unified", "discarded"),
     ("per_example", "penalty")],
)
def test_a_backward_that_writes_no_row_takes_no_step(backend, selection, written):
    """A backward of the C++ path that writes no row (an empty batch, per-example top-k of an
    all-zero output gradient) marks no row, which once left nothing to tell its gradient from
    one no sparse layer wrote: a penalty or a gradient left from the last step took a dense
    step, where the PyTorch path, which logs an empty row set, takes none. And an empty batch
    after ``.grad = None`` left the discarded gradient's marks, so their rows stepped."""
    config = msbp.SparseBackpropConfig(
        k=3 if written == "discarded" else 2, selection=selection, memory=0.0
    )  # discarded: a dense backward (k = out) marks every row, stepped even with no gradient
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before, after = _step_writing_no_row(config, written)
    assert torch.equal(after[0], before[0])
    assert after[1] == before[1]
    assert not caught


@pytest.mark.parametrize("hook", ["live", "removed"])
def test_discarded_rows_do_not_step_after_a_backward_with_a_hook_on_the_weight(backend, hook):
    """Rows written into a gradient that ``.grad = None`` discarded take no step when the next
    backward hands dW to autograd whole (a tensor hook on the weight, or one since removed:
    the C++ path then marks rows without a buffer of its own, the PyTorch path logs them)."""
    layer = msbp.SparseLinear(4, 2, config=msbp.SparseBackpropConfig(k=1, memory=0.0),
                              bias=False, dtype=torch.float64)
    opt = LazyRowAdam(layer.parameters(), lr=0.1)
    x = torch.tensor([[1.0, 2, 3, 4]], dtype=torch.float64)
    unit0, unit1 = (torch.tensor(v, dtype=torch.float64) for v in ([5.0, 0.0], [0.0, 5.0]))
    layer(x).mul(unit0).sum().backward()
    opt.step()
    opt.zero_grad()
    handle = layer.weight.register_hook(lambda g: g)
    if hook == "removed":
        handle.remove()
    layer(x).mul(unit0).sum().backward()  # row 0 ...
    layer.zero_grad()  # ... discarded
    layer(x).mul(unit1).sum().backward()  # row 1
    before = layer.weight.detach().clone()
    opt.step()
    moved = (layer.weight != before).any(1)
    assert moved.tolist() == [False, True]


@pytest.mark.parametrize("how", ["same", "detach"])
def test_zero_grad_leaves_a_gradient_the_caller_holds_as_it_was(backend, how):
    """``g = p.grad; opt.zero_grad()``: as with torch's optimizers, g keeps its values (the
    gradient buffer handed back is cleared only where nobody else holds it)."""
    model, opt, gen = _stepped(k=2, seed=5, steps=2)
    held = model[0].weight.grad if how == "same" else model[0].weight.grad.detach()
    before = held.clone()
    opt.zero_grad()
    model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
    assert torch.equal(held, before)


def test_gradient_accumulation_unions_rows():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=2), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    opt.zero_grad()
    for _ in range(3):
        model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
    touched = model[0].weight.grad.abs().sum(1) > 0
    before = model[0].weight.detach().clone()
    opt.step()
    moved = (model[0].weight != before).any(1)
    assert torch.equal(moved, touched)


@pytest.mark.parametrize(
    "kwargs", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1e-8), dict(weight_decay=-1.0)]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        LazyRowAdam(_mlp().parameters(), **kwargs)


@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay"])
@pytest.mark.parametrize("cls", [LazyRowAdam, LazyRowAdamW])
def test_nan_arguments_are_refused_as_adam_refuses_them(cls, name):
    """lr, eps or weight_decay NaN passed the ``x < 0`` checks (torch.optim.Adam raises) and
    the first step made every stepped row NaN. Found by the malformed-input fuzz."""
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got {name}=nan"):
        cls(_mlp().parameters(), **{name: float("nan")})


def test_state_dict_round_trip():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3, memory=0.8), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(6)]
    for x in xs[:3]:
        _step(model, opt, x)
    model2 = copy.deepcopy(model)
    opt2 = LazyRowAdam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x in xs[3:]:
        _step(model, opt, x)
        _step(model2, opt2, x)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "torch_save"])
def test_optimizer_copied_whole_with_its_model_resumes_exactly(how):
    """``copy.deepcopy`` / ``torch.save`` of the model and the optimizer objects together (not
    their state dicts): the copy's first step raised ``AttributeError`` (``_tracks``), since
    ``Optimizer`` pickles only its state and groups, and its parameters' row logs pointed at
    nobody. Found by a save/resume fuzz."""
    import io

    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3, memory=0.8), exclude="2")
    opt = LazyRowAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, sync_rows=False)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(6)]
    for x in xs[:3]:
        _step(model, opt, x)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.sync_rows is False
    group = object()  # load_state_dict (which calls __setstate__) keeps a live optimizer's group
    opt.process_group = group
    opt.load_state_dict(opt.state_dict())
    assert opt.process_group is group and opt.sync_rows is False
    opt.process_group = None
    params = opt2.param_groups[0]["params"]
    assert all(p is q for p, q in zip(model2.parameters(), params, strict=True))
    for x in xs[3:]:
        _step(model, opt, x)
        _step(model2, opt2, x)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_decoupled_weight_decay_is_saved_and_an_older_state_loads_as_l2():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _step(model, opt, torch.randn(4, 6, dtype=torch.float64))
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["decoupled_weight_decay"] is True
    fresh = LazyRowAdam(model.parameters(), lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(copy.deepcopy(saved))
    assert fresh.param_groups[0]["decoupled_weight_decay"] is True  # the saved setting wins
    del saved["param_groups"][0]["decoupled_weight_decay"]  # as saved before the option
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["decoupled_weight_decay"] is False
    _step(model, fresh, torch.randn(4, 6, dtype=torch.float64))


# -- the contract: the log, skipped layers, step counts ----------------------------------------


class _TwoBranch(nn.Module):
    """Two sparse layers, of which each step runs one: the other takes no part in the step."""

    def __init__(self, memory: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 3)
        self.double()
        msbp.sparsify(self, msbp.SparseBackpropConfig(k=3, memory=memory), exclude="head")

    def forward(self, x, branch):
        return self.head(torch.relu((self.a if branch == "a" else self.b)(x)))


_SPARSE = ("a.weight", "b.weight")


def _lazy_reference_step(model, state: dict, lr: float, weight_decay: float) -> None:
    """Lazy Adam by definition: a sparse weight updates the rows its gradient has (none: no
    update at all); any other parameter with a gradient is updated whole; one step count per
    parameter, counting its updates."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = p.grad
            if g is None:
                continue
            rows = g.abs().sum(1) > 0 if name in _SPARSE else torch.ones(len(p), dtype=bool)
            if not rows.any():
                continue
            st = state.setdefault(name, dict(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0))
            st["t"] += 1
            t = st["t"]
            g = g[rows] + weight_decay * p[rows]
            st["m"][rows] = 0.9 * st["m"][rows] + 0.1 * g
            st["v"][rows] = 0.999 * st["v"][rows] + 0.001 * g**2
            denom = (st["v"][rows] / (1 - 0.999**t)).sqrt() + 1e-8
            p[rows] -= lr * (st["m"][rows] / (1 - 0.9**t)) / denom


def _zero(mode: str, model, opt) -> None:
    if mode == "opt":
        opt.zero_grad()
    elif mode == "opt_keep":
        opt.zero_grad(set_to_none=False)
    elif mode == "model_none":
        model.zero_grad()
    elif mode == "model_zero":
        model.zero_grad(set_to_none=False)


def _zero_reference(mode: str, model) -> None:
    # the reference keeps torch's own semantics: LazyRowAdam's zero_grad keeps the sparse
    # buffers zeroed, which the reference sees as "no rows", the same as None
    model.zero_grad(set_to_none=mode in ("opt", "model_none"))


@pytest.mark.parametrize("mode", ["opt", "opt_keep", "model_none", "model_zero"])
@pytest.mark.parametrize("memory", [0.0, 0.5])
def test_layer_that_did_not_run_is_not_updated(mode, memory):
    model = _TwoBranch(memory)
    ref = copy.deepcopy(model)
    opt = LazyRowAdam(model.parameters(), lr=1e-2, weight_decay=0.01)
    state: dict = {}
    gen = torch.Generator().manual_seed(5)
    schedule = "aabababba"
    for branch in schedule:
        x = torch.randn(4, 6, dtype=torch.float64, generator=gen)
        b_before = (model.b.weight.clone(), opt.state[model.b.weight].get("exp_avg"))
        b_before = tuple(t.clone() if t is not None else None for t in b_before)
        _zero(mode, model, opt)
        model(x, branch).square().sum().backward()
        opt.step()
        _zero_reference(mode, ref)
        ref(x, branch).square().sum().backward()
        _lazy_reference_step(ref, state, 1e-2, 0.01)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
        if branch == "a":  # b took no part: value and moments exactly as they were
            assert torch.equal(model.b.weight, b_before[0])
            if b_before[1] is not None:
                assert torch.equal(opt.state[model.b.weight]["exp_avg"], b_before[1])
    for name in ("a", "b"):
        step = opt.state[getattr(model, name).weight]["step"]
        assert step.dtype == torch.float32 and step.shape == () and step.device.type == "cpu"
        assert int(step) == schedule.count(name) == state[f"{name}.weight"]["t"]


def test_gradient_left_from_an_earlier_step_is_not_reused():
    model = _TwoBranch()
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(6)
    model(torch.randn(4, 6, dtype=torch.float64, generator=gen), "b").square().sum().backward()
    opt.step()
    b = model.b.weight
    kept = b.detach().clone(), opt.state[b]["exp_avg"].clone(), opt.state[b]["exp_avg_sq"].clone()
    assert b.grad.any()  # never zeroed: what b's last backward wrote is still there
    for _ in range(3):
        model.a.weight.grad = None
        model(torch.randn(4, 6, dtype=torch.float64, generator=gen), "a").square().sum().backward()
        opt.step()
    assert torch.equal(b, kept[0])
    assert torch.equal(opt.state[b]["exp_avg"], kept[1])
    assert torch.equal(opt.state[b]["exp_avg_sq"], kept[2])
    assert int(opt.state[b]["step"]) == 1


@pytest.mark.parametrize("zero", ["model_none", "model_zero"])
def test_step_consumes_the_log_however_grads_are_zeroed(zero):
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        _zero(zero, model, opt)
        model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
        assert len(pending_rows(model[0].weight)) == 1
        before = model[0].weight.detach().clone()
        touched = model[0].weight.grad.abs().sum(1) > 0
        opt.step()
        assert not pending_rows(model[0].weight)
        assert torch.equal((model[0].weight != before).any(1), touched)


def test_log_stays_bounded_without_steps():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(8)
    for _ in range(100):
        model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
    log = pending_rows(model[0].weight)
    assert len(log) < 64
    touched = model[0].weight.grad.abs().sum(1) > 0
    before = model[0].weight.detach().clone()
    opt.step()
    assert torch.equal((model[0].weight != before).any(1), touched)


def test_no_log_without_a_live_optimizer():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    del opt
    model(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()
    assert not pending_rows(model[0].weight)


def test_zero_grad_after_step_and_after_a_later_backward():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(9)
    w = model[0].weight
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
        opt.step()
        # a backward after the step, before zero_grad: its rows are discarded with the rest
        model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
        ptr = w.grad.data_ptr()
        opt.zero_grad()
        if w.grad is None:  # handed back to the layer: a backward of zeros finds it cleared
            (model(torch.randn(4, 6, dtype=torch.float64, generator=gen)) * 0).sum().backward()
        assert w.grad.data_ptr() == ptr and not w.grad.any()
    # gradients zeroed by hand in between: zero_grad still leaves nothing behind
    opt.step()
    model(torch.randn(4, 6, dtype=torch.float64, generator=gen)).square().sum().backward()
    opt.step()
    model.zero_grad(set_to_none=False)
    w.grad[0] = 1.0  # written by something that logs no rows
    opt.zero_grad()
    assert not w.grad.any()


def test_unlogged_gradient_of_a_sparse_weight_takes_a_dense_step():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    _step(model, opt, torch.randn(4, 6, dtype=torch.float64))
    w = model[0].weight
    w.grad = torch.ones_like(w)  # e.g. the layer was densified: no rows are logged any more
    before = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="without a log of its rows"):
        opt.step()
    assert (w != before).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        w.grad = torch.ones_like(w)
        opt.step()


class _TiedLM(nn.Module):
    """Embedding -> tanh -> head whose weight is the embedding table (a language model's tie)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8).double()
        self.head = nn.Linear(8, 40).double()
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("zero", ["optimizer", "keep_buffers", "model", "after_forward"])
@pytest.mark.parametrize("copied", [False, True], ids=["sparsified", "deepcopy"])
def test_weight_tied_to_an_embedding_steps_as_adam(zero, copied):
    # the embedding adds rows (its tokens') that no sparse layer logs: they must take the step
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.5)
    a = msbp.sparsify(_TiedLM(), cfg)
    b = copy.deepcopy(a)  # same memory, same tie; stepped by torch's Adam
    if copied:  # the copy's Parameters lost msbp's marks: its forward puts them back
        a, b = b, a
    assert a.head.weight_tied and b.head.weight_tied and b.head.weight is b.emb.weight
    oa, ob = LazyRowAdam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, 40, (3, 5), generator=gen)
        weights = torch.randn(3, 5, 40, dtype=torch.float64, generator=gen)
        for model, opt in ((a, oa), (b, ob)):
            if zero == "model":
                model.zero_grad()
            elif zero != "after_forward":
                opt.zero_grad(set_to_none=zero == "optimizer")
            loss = (model(ids) * weights).sum()
            if zero == "after_forward":  # the forward's log must reach the step
                opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


def test_sparsify_marks_only_weights_tied_to_other_modules():
    model = msbp.sparsify(_TiedLM(), msbp.SparseBackpropConfig(k=3))
    assert "weight tied to emb (Embedding)" in model.sparsify_report.layers[0].detail
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())  # untied
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=4))  # reconfigured: looked at again
    assert not model.head.weight_tied and "tied" not in str(model.sparsify_report)
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    shared[2].weight = shared[0].weight  # two sparse layers: both log their rows
    msbp.sparsify(shared, msbp.SparseBackpropConfig(k=3))
    assert not shared[0].weight_tied and not shared[2].weight_tied
    msbp.sparsify(shared, msbp.SparseBackpropConfig(k=3), exclude="2")  # nothing changes
    shared[2] = msbp.densify(shared[2])  # a dense layer writes the shared weight's rows now
    msbp.sparsify(shared, msbp.SparseBackpropConfig(k=3), exclude="2")
    assert shared[0].weight_tied


@pytest.mark.parametrize("order", ["penalty_first", "penalty_last"])
@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_zero_grad_clears_other_gradients_of_a_sparse_weight(kind, order):
    """A penalty on the weights in the loss adds a dense gradient beside the layers' rows:
    ``zero_grad`` must clear it with them (it clears only the rows written where the layers'
    records show nothing else went in), so that each later gradient is that step's alone."""
    torch.manual_seed(0)
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.5)
    if kind == "linear":
        model = msbp.sparsify(_mlp(), cfg, exclude="2")
        batches = [torch.randn(4, 6, dtype=torch.float64) for _ in range(4)]
    else:
        model = msbp.sparsify(nn.LSTM(4, 5).double(), cfg)
        batches = [torch.randn(3, 2, 4, dtype=torch.float64) for _ in range(4)]

    def loss_of(m, x, penalty):
        out = m(x)[0] if kind == "lstm" else m(x)
        weights = [p for p in m.parameters() if p.dim() == 2]
        extra = sum(w.square().sum() for w in weights) if penalty else 0.0
        if order == "penalty_first":  # its backward runs last: added before or after the rows
            return extra + out.sin().sum()
        return out.sin().sum() + extra

    opt = LazyRowAdam(model.parameters(), lr=0.0)  # lr 0: only the gradients are compared
    for step, x in enumerate(batches):
        opt.zero_grad()
        fresh = copy.deepcopy(model)
        loss_of(model, x, step % 2 == 0).backward()
        loss_of(fresh, x, step % 2 == 0).backward()
        for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
        opt.step()


def test_zero_grad_between_backward_and_step_takes_an_all_rows_log():
    """k = out logs "all rows" (None): a backward whose gradient is discarded by ``zero_grad``
    before the step leaves nothing behind, and the next step is Adam's."""
    a = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=10), exclude="2")
    b = _mlp()
    oa, ob = LazyRowAdam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    x = torch.randn(4, 6, dtype=torch.float64)
    a(x * 3).square().sum().backward()
    oa.zero_grad()  # discarded
    assert not a[0].weight.grad.any()
    for model, opt in ((a, oa), (b, ob)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "discard", ["model_zero_grad", "grad_none", "optimizer_zero_grad", "zeroed_in_place"]
)
@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_rows_of_a_discarded_backward_take_no_step(kind, discard):
    """A backward whose gradient is thrown away (a dropped batch, a step GradScaler skipped)
    before the next one: its rows take no step, whichever way the gradient was discarded
    (``model.zero_grad()`` as transformers' Trainer does, ``.grad = None``, the optimizer's, or
    zeroed in place by ``model.zero_grad(set_to_none=False)``: the rows are still logged, but
    their gradient is zero)."""
    cfg = msbp.SparseBackpropConfig(k=2, memory=0.0)
    gen = torch.Generator().manual_seed(3)
    if kind == "linear":
        base = msbp.sparsify(_mlp(), cfg, exclude="2")
        batches = [torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(3)]
    else:
        torch.manual_seed(0)
        base = msbp.sparsify(nn.LSTM(4, 5).double(), cfg)
        batches = [torch.randn(3, 2, 4, dtype=torch.float64, generator=gen) for _ in range(3)]
    batches[1] = batches[0]  # the dropped backward writes rows that have momentum

    def loss_of(m, x):
        return (m(x)[0] if kind == "lstm" else m(x)).sin().sum()

    def zero(m, opt):
        if discard == "model_zero_grad":
            m.zero_grad()
        elif discard == "zeroed_in_place":
            m.zero_grad(set_to_none=False)
        elif discard == "grad_none":
            for p in m.parameters():
                p.grad = None
        else:
            opt.zero_grad()

    runs = []
    for with_dropped in (True, False):
        model = copy.deepcopy(base)
        opt = LazyRowAdam(model.parameters(), lr=1e-2)
        for i, x in enumerate(batches):
            if i == 1 and not with_dropped:
                continue  # the twin never saw batch 1
            zero(model, opt)
            loss_of(model, x).backward()
            if i != 1:
                opt.step()  # batch 1's gradient is dropped: no step, zeroed next time round
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_add_param_group_tracks_rows():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam([model[2].weight, model[2].bias], lr=1e-2)
    opt.add_param_group({"params": [model[0].weight, model[0].bias]})
    x = torch.randn(4, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    assert pending_rows(model[0].weight)
    before = model[0].weight.detach().clone()
    opt.step()
    assert int((model[0].weight != before).any(1).sum()) == 3


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("decoupled", [False, True], ids=["l2", "decoupled"])
def test_rows_logged_by_hand_match_reference_with_weight_decay(contiguous, decoupled):
    # not contiguous (e.g. a channels-last weight): the native step leaves it to the PyTorch path
    torch.manual_seed(3)
    data = torch.randn(5, 9, dtype=torch.float64).t()
    w = nn.Parameter(data.contiguous() if contiguous else data)
    assert w.is_contiguous() == contiguous
    ref = w.detach().clone()
    opt = LazyRowAdam([w], lr=1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled)
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    gen = torch.Generator().manual_seed(4)
    for t, rows in enumerate([[0, 3], [3, 8], [1, 2, 3, 4, 5, 6, 7, 8, 0], [8]], start=1):
        rows = torch.tensor(rows)
        w.grad = torch.zeros_like(w)
        w.grad[rows] = torch.randn(len(rows), 5, dtype=torch.float64, generator=gen)
        log_touched_rows(w, rows)
        opt.step()
        if decoupled:  # AdamW: only the rows stepped decay, by 1 - lr * weight_decay
            ref[rows] *= 1 - 1e-2 * 0.1
            g = w.grad[rows]
        else:
            g = w.grad[rows] + 0.1 * ref[rows]
        m[rows] = 0.9 * m[rows] + 0.1 * g
        v[rows] = 0.999 * v[rows] + 0.001 * g**2
        ref[rows] -= 1e-2 * (m[rows] / (1 - 0.9**t)) / ((v[rows] / (1 - 0.999**t)).sqrt() + 1e-8)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[w]["exp_avg"], m, rtol=1e-12, atol=1e-14)


def test_paths_can_alternate_between_calls(backend):
    """The native path keeps a sparse weight's stepped rows in a mask, the PyTorch path in a
    list: whichever path runs the backward, the step and zero_grad, every row is stepped once
    and cleared."""
    if backend == "python":
        pytest.skip("alternates both paths itself")
    model = _TwoBranch(memory=0.5)
    ref = copy.deepcopy(model)
    opt = LazyRowAdam(model.parameters(), lr=1e-2, weight_decay=0.01)
    state: dict = {}
    gen = torch.Generator().manual_seed(11)
    paths = ("native", "python")
    schedule = [(z, b, s) for z in paths for b in paths for s in paths]
    try:
        for i, (zero, backward, step) in enumerate(schedule + schedule[::-1]):
            branch = "ab"[i % 3 == 2]
            x = torch.randn(4, 6, dtype=torch.float64, generator=gen)
            msbp.native.set_backend(zero)
            opt.zero_grad()
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
            msbp.native.set_backend(backward)
            model(x, branch).square().sum().backward()
            ref.zero_grad()
            ref(x, branch).square().sum().backward()
            msbp.native.set_backend(step)
            opt.step()
            _lazy_reference_step(ref, state, 1e-2, 0.01)
            for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    finally:
        msbp.native.set_backend(backend)


def test_step_hooks_profiler_range_and_scheduler():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6, dtype=torch.float64)
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: seen.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: seen.append("post")),
    ]
    _step(model, opt, x)
    assert seen == ["global pre", "pre", "post"]
    for handle in handles:
        handle.remove()
    _step(model, opt, x)
    assert len(seen) == 3
    with torch.profiler.profile() as prof:
        _step(model, opt, x)
    assert "Optimizer.step#LazyRowAdam.step" in {e.name for e in prof.events()}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        _step(model, opt, x)
        sched.step()
    assert opt.param_groups[0]["lr"] == 5e-3


@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_rows_of_zero_gradient_take_no_step(backend, selection):
    """Fewer units with a gradient than k (dead units after the layer): top-k fills up with
    zero-gradient units, which ones by tie order (the backends differ). Their rows take no
    step: only the rows with a gradient move, the same on both backends, and the other rows'
    weights and moments stay as the step before left them."""
    torch.manual_seed(0)
    layer = msbp.SparseLinear.from_dense(
        nn.Linear(6, 10).double(), msbp.SparseBackpropConfig(k=6, memory=0.0, selection=selection)
    )
    head = nn.Linear(10, 3).double()
    opt = LazyRowAdam([*layer.parameters(), *head.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def step():
        opt.zero_grad()
        head(layer(torch.randn(4, 6, dtype=torch.float64, generator=gen))).sin().sum().backward()
        opt.step()

    for _ in range(3):
        step()  # every unit has a gradient: the rows top-k kept have momentum
    avg = opt.state[layer.weight]["exp_avg"].clone()
    dead = avg.abs().sum(1) > 0  # the units with momentum get no gradient from now on
    assert int(dead.sum()) >= 7  # so that fewer than k = 6 have one
    with torch.no_grad():
        head.weight[:, dead] = 0
    head.weight.requires_grad_(False)
    kept = layer.weight.detach().clone()
    count = float(opt.state[layer.weight]["step"])
    for _ in range(2):
        step()
    assert torch.equal(layer.weight[dead], kept[dead])
    assert torch.equal(opt.state[layer.weight]["exp_avg"][dead], avg[dead])
    assert (layer.weight[~dead] != kept[~dead]).all()
    assert float(opt.state[layer.weight]["step"]) == count + 2
