"""LazyRowAdam: equals Adam when nothing is sparse, equals a row-wise lazy Adam otherwise."""

import copy

import pytest
import torch
from torch import nn

import msbp
from msbp.optim import LazyRowAdam


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).double()


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()


def test_k_equal_out_matches_torch_adam():
    a = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=10), exclude="2")
    b = _mlp()
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


def test_zero_grad_keeps_buffer_for_in_place_rows():
    model = msbp.sparsify(_mlp(), msbp.SparseBackpropConfig(k=3), exclude="2")
    opt = LazyRowAdam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6, dtype=torch.float64)
    _step(model, opt, x)
    opt.zero_grad()
    grad = model[0].weight.grad
    assert grad is not None and not grad.any()  # kept, zeroed
    assert model[2].weight.grad is None  # dense layer: set to None as usual
    ptr = grad.data_ptr()
    model(x).square().sum().backward()
    assert model[0].weight.grad.data_ptr() == ptr
    assert int((model[0].weight.grad.abs().sum(1) > 0).sum()) == 3


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
