"""Mixed precision (GradScaler, autocast dtypes) and where dW goes (hooks, the kept buffer)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import msbp
from msbp.ops.reference import sparse_linear_backward_ref


def _mlp(selection="unified", memory=0.8, layout="unit"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    cfg = msbp.SparseBackpropConfig(k=3, memory=memory, selection=selection, memory_layout=layout)
    return msbp.sparsify(model, cfg, exclude="4")


def _memories(model):
    return [m.memory.clone() for m in model.modules() if isinstance(m, msbp.SparseLinear)]


@pytest.mark.parametrize("layout", ["unit", "slot"])
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_memory_is_unscaled_under_grad_scaler(backend, selection, layout):
    """Scaled backward with msbp.amp.GradScaler == unscaled backward, scale changing each step."""
    plain, scaled = _mlp(selection, layout=layout), _mlp(selection, layout=layout)
    scaler = msbp.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        for model in (plain, scaled):
            model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain(x), y).backward()
        scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
        s = scaler.get_scale()
        for a, b in zip(_memories(plain), _memories(scaled), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        for pa, pb in zip(plain.parameters(), scaled.parameters(), strict=True):
            torch.testing.assert_close(pb.grad / s, pa.grad, rtol=1e-5, atol=1e-6)
        scaler.update(new_scale=s / 2 if step % 2 else s * 4)  # a changing scale


@pytest.mark.parametrize("how", ["deepcopy", "torch_save"])
def test_scaler_copied_with_its_model_keeps_the_memory_unscaled(backend, how):
    """A copy of ``msbp.amp.GradScaler`` (``copy.deepcopy`` or ``torch.save`` of the training
    objects, the original then dropped) was not registered as a scaler: the layers took the
    path that cannot scale and stored the scaled gradient in the memory. Found by a save/resume
    fuzz (model, optimizer and scaler pickled whole)."""
    import gc
    import io

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = msbp.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
               for _ in range(4)]

    def step(m, o, s, x, y):
        o.zero_grad()
        s.scale(nn.functional.cross_entropy(m(x), y)).backward()
        s.step(o)
        s.update()

    step(model, opt, scaler, *batches[0])
    twin = copy.deepcopy((model, opt))  # never saved: its scaler is a fresh one of that scale
    scale = scaler.get_scale()
    if how == "deepcopy":
        copied = copy.deepcopy((model, opt, scaler))
    else:
        buf = io.BytesIO()
        torch.save((model, opt, scaler), buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    del model, opt, scaler
    gc.collect()  # the copy is the only scaler left
    got = []
    for x, y in batches[1:]:
        step(*copied, x, y)
        got.append(_memories(copied[0]))
    del copied
    gc.collect()
    twin_scaler = msbp.amp.GradScaler("cpu", init_scale=scale)
    for (x, y), memories in zip(batches[1:], got, strict=True):
        step(*twin, twin_scaler, x, y)
        for a, b in zip(memories, _memories(twin[0]), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_skipped_step_leaves_every_memory_unchanged(backend):
    """When some layer overflows, the scaler skips the step and no memory advances."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = msbp.amp.GradScaler("cpu", init_scale=4.0)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    before = _memories(model)
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    # only the dense head's weight gradient overflows (1e38 x scale 4); the rest is finite
    loss = nn.functional.cross_entropy(model(x), y) + (model[4].weight * 1e38).sum()
    scaler.scale(loss).backward()
    assert not torch.isfinite(model[4].weight.grad).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, _memories(model), strict=True))
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0  # skipped: backed off
    for a, b in zip(before, _memories(model), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(weights, model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_skipped_step_restores_a_slot_memory_of_another_batch_size(backend, kind):
    """A slot memory (one row per example) spread over a new batch size in a step the scaler
    then skips comes back as it was, rows and all, not as the spread."""
    cfg = msbp.SparseBackpropConfig(ratio=None, k=1, memory=0.5, memory_layout="slot")
    torch.manual_seed(0)
    if kind == "linear":
        layer = msbp.SparseLinear(3, 4, config=cfg)
        x3, x2 = torch.randn(3, 3), torch.randn(2, 3)
    else:
        layer = msbp.SparseConv2d(1, 4, 1, config=cfg)
        x3, x2 = torch.randn(3, 1, 1, 1), torch.randn(2, 1, 1, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = msbp.amp.GradScaler("cpu", init_scale=16.0)
    scaler.scale(layer(x3).square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = layer.memory.clone()
    assert before.shape == (3, 4) and before.any()
    opt.zero_grad()
    # the layer's own gradient is finite: only the bias' overflows, after the layer spread
    loss = layer(x2).square().sum() + (layer.bias * 1e38).sum()
    scaler.scale(loss).backward()
    assert layer.memory.shape == (2, 4)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 8.0  # skipped
    assert torch.equal(layer.memory, before)


def test_unscaled_backward_between_scale_and_update_stays_unscaled(backend):
    """Another model's unscaled backward between ``scale()`` and ``update()`` keeps its memory
    in its own units: the scale applies to the backward of the scaled outputs only."""
    scaled, other = _mlp(), _mlp()
    other_ref = copy.deepcopy(other)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    scaler = msbp.amp.GradScaler("cpu", init_scale=1024.0)
    nn.functional.cross_entropy(other_ref(x), y).backward()
    loss = scaler.scale(nn.functional.cross_entropy(scaled(x), y))
    nn.functional.cross_entropy(other(x), y).backward()  # after scale(), before its backward
    loss.backward()
    nn.functional.cross_entropy(other(x), y).backward()  # and after it, before update()
    nn.functional.cross_entropy(other_ref(x), y).backward()
    scaler.step(torch.optim.SGD(scaled.parameters(), lr=0.0))
    scaler.update()
    for a, b in zip(_memories(other), _memories(other_ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _RaiseInBackward(torch.autograd.Function):
    """Identity whose backward raises (an OOM, a hook's error, a checkpoint misuse)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("planted failure in the backward pass")


def test_scaled_backward_that_raises_leaves_no_scale_behind(backend):
    """A scaled backward that raises part-way (after the scale was published, before the pass
    ended) must not leave its scale active: a later unscaled backward of another model keeps
    its memory in its own units (the fuzzer found one divided by the scale, 1024)."""
    scaled, other = _mlp(), _mlp()
    other_ref = copy.deepcopy(other)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    scaler = msbp.amp.GradScaler("cpu", init_scale=1024.0)
    nn.functional.cross_entropy(other_ref(x), y).backward()  # the reference, before
    h = _RaiseInBackward.apply(scaled[:2](x))  # the sparse layers below it never run
    loss = nn.functional.cross_entropy(scaled[2:](h), y)
    with pytest.raises(RuntimeError, match="planted failure"):
        scaler.scale(loss).backward()
    nn.functional.cross_entropy(other(x), y).backward()
    for a, b in zip(_memories(other), _memories(other_ref), strict=True):
        assert b.any()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for pa, pb in zip(other.parameters(), other_ref.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7)
    # and the scaler still works: its next scaled backward is as an unscaled one
    plain = copy.deepcopy(scaled)
    for model in (plain, scaled):
        model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(plain(x), y).backward()
    scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
    for a, b in zip(_memories(plain), _memories(scaled), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_scaled_backward_through_checkpointed_segments(backend, reentrant):
    """A checkpointed segment's recomputed backward (a nested backward pass when reentrant)
    still counts as part of the scaled backward: memory and gradients as unscaled."""
    from torch.utils.checkpoint import checkpoint

    plain, scaled = _mlp(), _mlp()
    scaler = msbp.amp.GradScaler("cpu", init_scale=256.0)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def run(model, x):
        h = checkpoint(model[:2], x.requires_grad_(), use_reentrant=reentrant)
        return nn.functional.cross_entropy(model[2:](h), y)

    run(plain, x.clone()).backward()
    scaler.scale(run(scaled, x.clone())).backward()
    for a, b in zip(_memories(plain), _memories(scaled), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(pb.grad / 256.0, pa.grad, rtol=1e-5, atol=1e-6)


def test_autocast_leaves_float64_alone(backend):
    """Under autocast a float64 layer runs in float64, as nn.Linear does."""
    layer = msbp.SparseLinear(5, 7, config=msbp.SparseBackpropConfig(k=2), dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.dtype == torch.float64


def test_accumulate_grad_hooks_see_the_gradient(backend):
    """Hooks on the weight's AccumulateGrad node (DeepSpeed / apex) get dW as their input."""
    layer = msbp.SparseLinear(6, 8, config=msbp.SparseBackpropConfig(k=2, memory=0.0))
    twin = copy.deepcopy(layer)
    layer.weight.grad = torch.zeros_like(layer.weight)
    acc = layer.weight.view_as(layer.weight).grad_fn.next_functions[0][0]
    seen = []
    acc.register_prehook(lambda grads: seen.append(grads[0]))
    x, g = torch.randn(4, 6), torch.randn(4, 8)
    layer(x).backward(g)
    dx, dW, db, _ = sparse_linear_backward_ref(x, twin.weight.detach(), g, None, k=2)
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(seen[0].to_dense(), dW)
    torch.testing.assert_close(layer.weight.grad, dW)


def test_kept_buffer_is_cleared_correctly(backend):
    """With zero_grad(set_to_none=True) the layer reuses its buffer: each step's .grad equals a
    fresh one, also after the buffer was modified in place (gradient noise, clipping)."""
    layer = msbp.SparseLinear(6, 10, config=msbp.SparseBackpropConfig(k=3, memory=0.0))
    gen = torch.Generator().manual_seed(0)
    buffers = set()
    for step in range(6):
        layer.zero_grad(set_to_none=True)
        x, g = torch.randn(4, 6, generator=gen), torch.randn(4, 10, generator=gen)
        layer(x).backward(g)
        _, dW, _, _ = sparse_linear_backward_ref(x, layer.weight.detach(), g, None, k=3)
        torch.testing.assert_close(layer.weight.grad, dW)
        buffers.add(layer.weight.grad.data_ptr())
        if step == 2:
            layer.weight.grad.add_(1.0)  # in place, everywhere: must be cleared in full
    assert len(buffers) == 1  # the same buffer, no fresh allocation each step
    held = layer.weight.grad  # someone keeps the old gradient: it must not be overwritten
    kept = held.clone()
    layer.zero_grad(set_to_none=True)
    layer(torch.randn(4, 6)).backward(torch.randn(4, 10))
    assert torch.equal(held, kept) and layer.weight.grad is not held


def test_held_gradient_is_not_reused_whatever_refcounts_count(backend, monkeypatch):
    """A gradient the caller kept (``old = p.grad``) is never cleared and reused as the next
    ``.grad``, also where ``sys.getrefcount`` counts one reference fewer (Python 3.14 borrows
    references to local variables): the count an unheld buffer gives is measured, not assumed."""
    import sys

    from msbp.ops import transient

    real = sys.getrefcount
    # one fewer than the unpatched count (this lambda's argument holds one more)
    monkeypatch.setattr(sys, "getrefcount", lambda obj: real(obj) - 2)
    monkeypatch.setattr(transient, "_ALONE", None, raising=False)  # measured again, patched
    layer = msbp.SparseLinear(6, 10, config=msbp.SparseBackpropConfig(k=3, memory=0.0))
    gen = torch.Generator().manual_seed(0)
    ptrs = []
    for _ in range(3):  # unheld: the buffer is reused
        layer.zero_grad(set_to_none=True)
        layer(torch.randn(4, 6, generator=gen)).backward(torch.randn(4, 10, generator=gen))
        ptrs.append(layer.weight.grad.data_ptr())
    assert len(set(ptrs)) == 1
    held = layer.weight.grad
    before = held.clone()
    layer.zero_grad(set_to_none=True)
    x, g = torch.randn(4, 6, generator=gen), torch.randn(4, 10, generator=gen)
    layer(x).backward(g)
    assert torch.equal(held, before) and layer.weight.grad is not held
    _, dW, _, _ = sparse_linear_backward_ref(x, layer.weight.detach(), g, None, k=3)
    torch.testing.assert_close(layer.weight.grad, dW)


def test_two_calls_in_one_step_accumulate_then_clear(backend):
    layer = msbp.SparseLinear(6, 10, config=msbp.SparseBackpropConfig(k=2, memory=0.0))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        x1, x2 = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
        g1, g2 = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
        layer(x1).backward(g1)
        layer(x2).backward(g2)
        w = layer.weight.detach()
        want = (sparse_linear_backward_ref(x1, w, g1, None, k=2)[1]
                + sparse_linear_backward_ref(x2, w, g2, None, k=2)[1])
        torch.testing.assert_close(layer.weight.grad, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_called_twice_in_16_bit_on_the_cpu(backend, dtype):
    """A float16 layer called twice in one graph failed in backward with PyTorch's
    '"cadd_sparse" not implemented for 'Half'': autograd adds the two calls' row-sparse dW
    before the weight's AccumulateGrad, and the CPU has no float16 sparse add. Found by the
    API-combination fuzz (a shared layer after model.half()). Its gradient must be the float64
    layer's, to 16-bit rounding, step after step (the kept buffer reused)."""
    torch.manual_seed(0)
    wide = msbp.SparseLinear(6, 6, config=msbp.SparseBackpropConfig(k=6)).double()
    layer = copy.deepcopy(wide).to(dtype)
    layer.config = msbp.SparseBackpropConfig(k=2, selection="per_example")
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        layer(layer(x.to(dtype))).float().square().sum().backward()
        assert layer.weight.grad.dtype == dtype and layer.weight.grad.layout == torch.strided
        assert torch.isfinite(layer.weight.grad).all()
    # k = out: the dense gradient of the two calls
    layer.config = msbp.SparseBackpropConfig(k=6)
    wide.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    layer.zero_grad(set_to_none=True)
    layer(layer(x.to(dtype))).float().square().sum().backward()
    wide(wide(x.to(dtype).double())).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad.double(), wide.weight.grad, rtol=0.05, atol=0.05)


def test_compile_fullgraph_inductor():
    """torch.compile(fullgraph=True, inductor) of a sparsified MLP: no graph break, eager's
    gradients and memory."""
    if not msbp.native.use_native():
        pytest.skip("fullgraph needs the native op")
    model = _mlp()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(5, 6, generator=gen)
        for m in (model, eager):
            m.zero_grad(set_to_none=True)
        compiled(x).square().sum().backward()
        eager(x).square().sum().backward()
        for a, b in zip(model.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        for a, b in zip(_memories(model), _memories(eager), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_lstm_memory_is_unscaled_under_grad_scaler(backend, layout):
    """SparseLSTM: a scaled backward with msbp.amp.GradScaler == the unscaled one, the scale
    changing every step (the recurrent memory in unscaled units)."""
    cfg = msbp.SparseBackpropConfig(k=3, memory=0.8, memory_layout=layout)
    torch.manual_seed(0)
    plain = msbp.SparseLSTM(4, 5, config=cfg)
    scaled = copy.deepcopy(plain)
    scaler = msbp.amp.GradScaler("cpu", init_scale=2.0**8)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(6, 2, 4, generator=gen)
        for m in (plain, scaled):
            m.zero_grad(set_to_none=True)
        plain(x)[0].square().sum().backward()
        scaler.scale(scaled(x)[0].square().sum()).backward()
        s = scaler.get_scale()
        for (name, a), (_, b) in zip(plain.named_memories(), scaled.named_memories(),
                                     strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
        for pa, pb in zip(plain.parameters(), scaled.parameters(), strict=True):
            torch.testing.assert_close(pb.grad / s, pa.grad, rtol=1e-4, atol=1e-6)
        scaler.update(new_scale=s / 2 if step % 2 else s * 4)
