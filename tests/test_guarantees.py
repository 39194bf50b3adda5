"""The README's guarantees on when the memory changes: once per call in backward (a layer called
c times in one step updates it c times), under torch.autograd.grad too; torch.func refused."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import LAYOUTS, make_cfg, make_layer, randn, ref_step, tol
from torch import nn

import msbp
from msbp import SparseBackpropConfig, SparseLinear, SparseLSTM, sparsify
from msbp.functional import sparse_linear
from msbp.ops.reference import sparse_linear_ref

D = 6
F64 = tol(torch.float64)


@pytest.mark.parametrize("calls", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_layer_called_c_times_updates_memory_c_times(selection, layout, calls):
    """y = L(tanh(L(... L(x)))): the backward of each call reads the memory the later call left
    and replaces it, so after one step it is the reference applied c times (what was remembered
    before the step has been decayed by alpha^c); the weight gradient is the sum of c sparse
    ones. Two steps, so the second starts from a non-empty memory."""
    cfg = make_cfg(selection, layout, 0.8, k=2)
    layer = make_layer(D, D, cfg)
    w_ref = layer.weight.detach().clone().requires_grad_()
    b_ref = layer.bias.detach().clone().requires_grad_()
    options = dict(k=2, selection=selection, alpha=0.8, layout=layout)
    box = [torch.zeros((D,) if layout == "unit" else (0, D), dtype=torch.float64)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, g = randn(4, D, gen=gen), randn(4, D, gen=gen)
        layer.zero_grad()
        w_ref.grad = b_ref.grad = None
        grads = []
        for fast in (True, False):
            h = xi = x.clone().requires_grad_()
            for i in range(calls):
                h = layer(h) if fast else sparse_linear_ref(h, w_ref, b_ref, box, **options)
                h = torch.tanh(h) if i < calls - 1 else h
            h.backward(g)
            grads.append(xi.grad)
        torch.testing.assert_close(grads[0], grads[1], **F64)
        torch.testing.assert_close(layer.weight.grad, w_ref.grad, **F64)
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, **F64)
        assert layer.memory.shape == box[0].shape
        torch.testing.assert_close(layer.memory, box[0], **F64)
    assert layer.memory.any()


def test_memory_decays_by_alpha_per_call():
    """Exact identity for c chained calls, k = 1, unit memory (0, ..., 0, 1) and an output
    gradient of 100 on column 0: W = e0 e0^T sends that 100 back to column 0 of the previous
    call, so column 0 wins every selection and the remembered column 5 is never propagated:
    each call multiplies it by alpha, alpha^c after the step."""
    alpha = 0.5
    layer = make_layer(D, D, SparseBackpropConfig(ratio=None, k=1, memory=alpha))
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = 1.0
    g = torch.zeros(1, D, dtype=torch.float64)
    g[0, 0] = 100.0
    for calls in (1, 2, 3):
        with torch.no_grad():
            layer.memory.zero_()
            layer.memory[5] = 1.0
        h = torch.zeros(1, D, dtype=torch.float64, requires_grad=True)
        for _ in range(calls):
            h = layer(h)
        h.backward(g)
        assert layer.memory[5].item() == alpha**calls
        assert not layer.memory[:5].any()


@pytest.mark.parametrize("inputs", ["params", "input"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_autograd_grad_updates_memory(layout, inputs):
    """torch.autograd.grad runs the same backward as loss.backward(): same memory update,
    whichever inputs the gradient is asked for, and no .grad written."""
    cfg = make_cfg("per_example", layout, 0.8, k=2)
    layer = make_layer(4, D, cfg)
    twin = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, g = randn(3, 4, gen=gen).requires_grad_(), randn(3, D, gen=gen)
        before = layer.memory.clone()
        wrt = [layer.weight, layer.bias] if inputs == "params" else [x]
        got = torch.autograd.grad((layer(x) * g).sum(), wrt)
        assert layer.weight.grad is None
        twin.zero_grad()
        xt = x.detach().clone().requires_grad_()
        (twin(xt) * g).sum().backward()
        want = [twin.weight.grad, twin.bias.grad] if inputs == "params" else [xt.grad]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **F64)
        torch.testing.assert_close(layer.memory, twin.memory, **F64)
        _, _, _, ref_memory = ref_step(cfg, x, layer.weight, g, before)
        torch.testing.assert_close(layer.memory, ref_memory, **F64)


# -- torch.func: refused with a clear error ------------------------------------------------------


def _sparse_model() -> nn.Module:
    torch.manual_seed(0)
    return sparsify(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
                    SparseBackpropConfig(k=2, memory=0.8))


def _transforms():
    def loss(model, x):
        return model(x).square().sum()

    def functional_call_grad(model, x):
        params = {n: p.detach() for n, p in model.named_parameters()}
        return torch.func.grad(
            lambda p: torch.func.functional_call(model, p, (x,)).square().sum()
        )(params)

    return {
        "grad": lambda model, x: torch.func.grad(lambda x: loss(model, x))(x),
        "vmap": lambda model, x: torch.func.vmap(model)(x.unsqueeze(0).expand(2, -1, -1)),
        "jacrev": lambda model, x: torch.func.jacrev(lambda x: loss(model, x))(x),
        "functional_call+grad": functional_call_grad,
    }


@pytest.mark.parametrize("transform", list(_transforms()))
def test_torch_func_raises_clearly_for_linear(transform):
    model = _sparse_model()
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"msbp: sparse layer '0' does not support torch\.func"):
        _transforms()[transform](model, x)
    assert not model[0].memory.any() and not model[2].memory.any()


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_raises_clearly_for_lstm(transform):
    torch.manual_seed(0)
    lstm = SparseLSTM(4, 5, config=SparseBackpropConfig(k=2))
    x = torch.randn(3, 2, 4)
    if transform == "grad":
        def run():
            return torch.func.grad(lambda x: lstm(x)[0].sum())(x)
    else:
        def run():
            with torch.no_grad():  # even a forward: the recurrence is one autograd node
                return torch.func.vmap(lambda x: lstm(x)[0])(x.unsqueeze(0).expand(2, -1, -1, -1))
    with pytest.raises(RuntimeError, match=r"msbp: SparseLSTM does not support torch\.func"):
        run()


def test_torch_func_functional_form_raises_and_no_grad_vmap_runs():
    cfg = SparseBackpropConfig(k=2, memory=0.8)
    w = torch.randn(D, 4, requires_grad=True)
    memory = torch.zeros(D)
    with pytest.raises(RuntimeError, match="msbp: sparse_linear does not support torch.func"):
        torch.func.grad(lambda x: sparse_linear(x, w, None, memory, config=cfg).sum())(
            torch.randn(3, 4)
        )
    assert not memory.any()
    layer = SparseLinear(4, D, config=cfg)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():  # no backward, no memory: the exact forward is fine under vmap
        y = torch.func.vmap(layer)(x)
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias))


# -- create_graph=True: refused with one clear error on every path -------------------------------


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class _Lstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4)

    def forward(self, x):
        return self.lstm(x)[0]


_CREATE_GRAPH_CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (5, 4)),
    "linear-autocast": (lambda: nn.Sequential(nn.Linear(4, 6)), (5, 4)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3)), (2, 2, 5, 5)),
    "lstm": (_Lstm, (3, 2, 3)),
    "attention": (_Attn, (3, 2, 4)),
}


@pytest.mark.parametrize("case", list(_CREATE_GRAPH_CASES))
def test_create_graph_raises_clearly_and_dense_backward_allows_it(case, backend):
    """create_graph=True met a sparse backward that cannot be differentiated: the C++ linear
    layer raised at once, but the PyTorch path (and on both backends convolutions, LSTMs and
    layers under autocast) ran it, updating the memory, and failed only at the second-order
    backward with PyTorch's "differentiate twice ... once_differentiable". Found by a
    differential fuzz of native against MSBP_BACKEND=python."""
    build, shape = _CREATE_GRAPH_CASES[case]
    torch.manual_seed(0)
    model = sparsify(build(), SparseBackpropConfig(k=2, memory=0.8))
    mems = [m.clone() for layer in model.modules() if hasattr(layer, "named_memories")
            for _, m in layer.named_memories()]
    x = torch.randn(shape)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=case == "linear-autocast")
    with autocast:
        loss = model(x).float().square().sum()
    with pytest.raises(RuntimeError, match=r"msbp: the sparse backward is not differentiable "
                                           r"\(create_graph=True\).*msbp\.dense_backward"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    after = [m for layer in model.modules() if hasattr(layer, "named_memories")
             for _, m in layer.named_memories()]
    for a, b in zip(mems, after, strict=True):
        assert torch.equal(a, b)
    # the way to higher-order gradients: the layers run dense
    with msbp.dense_backward(model), autocast:
        loss = model(x).float().square().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    assert all(p.grad is not None for p in model.parameters())
