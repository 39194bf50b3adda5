"""InfoLossMeter's reference gradient is the dense model's, and measuring leaves training alone;
``msbp.dense_backward`` runs sparse layers densely without touching their state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msbp
from msbp import SparseBackpropConfig, SparseLinear, SparseLSTM
from msbp.info import InfoLossMeter
from msbp.ops.touched_rows import pending_rows, take_touched_rows
from msbp.optim import LazyRowAdam

F64 = {"rtol": 1e-9, "atol": 1e-12}


def mlp3(config: SparseBackpropConfig, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """784-style MLP in small: three linear layers, all sparsified."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 6)).to(dtype)
    return msbp.sparsify(model, config)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("selection", ["unified", "per_example"])
def test_reference_is_the_densified_models_gradient(selection):
    """The meter's true gradient of the lowest layer is the whole dense model's gradient, not
    the gradient that reached the layer through two sparse layers above it."""
    model = mlp3(SparseBackpropConfig(k=3, selection=selection, memory=0.8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    meter = InfoLossMeter(model, every=4, window=4)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(8, 12, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 6, (8,), generator=gen)

        def loss_fn(x=x, y=y):
            return F.cross_entropy(model(x), y)

        meter.start_step(step, loss_fn)
        dense = msbp.densify(copy.deepcopy(model))  # same weights, before this step's update
        F.cross_entropy(dense(x), y).backward()
        optimizer.zero_grad()
        loss_fn().backward()
        sparse_dw = model[0].weight.grad.clone()
        optimizer.step()
        meter.end_step(step)

        true_dw = dense[0].weight.grad
        torch.testing.assert_close(meter.dense_grads["0"], true_dw, **F64)
        torch.testing.assert_close(meter.dense_grads["4"], dense[4].weight.grad, **F64)
        assert cos(sparse_dw, true_dw) < 0.99  # the check has teeth: the sparse one differs
    (record,) = meter.result()["layers"]["0"]
    # the last step's cosine is the window's minimum or above; all four match a recomputation
    assert record["cosine_min"] <= cos(sparse_dw, true_dw) + 1e-12
    assert record["upstream_cosine"] < 0.999  # the sparse layers above bent the arrived gradient
    top = meter.result()["layers"]["4"][0]
    assert top["upstream_cosine"] == pytest.approx(1.0, abs=1e-9)  # nothing sparse above it
    assert top["cosine"] == pytest.approx(top["local_cosine"], abs=1e-9)


def test_cosine_measures_the_step_against_the_dense_gradient():
    """Window of one step: cosine and step error are those of .grad against the dense model."""
    model = mlp3(SparseBackpropConfig(k=3, selection="per_example", memory=0.0))
    x = torch.randn(8, 12, dtype=torch.float64)
    y = torch.randint(0, 6, (8,))
    meter = InfoLossMeter(model, every=1, window=1)
    meter.start_step(0, lambda: F.cross_entropy(model(x), y))
    F.cross_entropy(model(x), y).backward()
    meter.end_step(0)
    dense = msbp.densify(copy.deepcopy(model))
    F.cross_entropy(dense(x), y).backward()
    record = meter.result()["layers"]["0"][0]
    sparse, true = model[0].weight.grad, dense[0].weight.grad
    assert record["cosine"] == pytest.approx(cos(sparse, true), abs=1e-9)
    assert record["step_error"] == pytest.approx(
        float((sparse - true).norm() / true.norm()), abs=1e-9
    )
    assert record["cumulative_error"] == pytest.approx(record["step_error"], abs=1e-12)


def test_without_loss_fn_only_local_measures():
    model = mlp3(SparseBackpropConfig(k=3))
    meter = InfoLossMeter(model, every=1, window=1)
    meter.start_step(0)
    model(torch.randn(4, 12, dtype=torch.float64)).square().sum().backward()
    meter.end_step(0)
    record = meter.result()["layers"]["0"][0]
    assert record["cosine"] is None and record["cumulative_error"] is None
    assert 0.0 < record["local_cosine"] <= 1.0 and record["local_mass_fraction"] > 0.0


class _Net(nn.Module):
    """Dropout, batch norm and a sparse layer with random selection: every kind of state."""

    def __init__(self, config: SparseBackpropConfig) -> None:
        super().__init__()
        self.fc1 = SparseLinear(10, 24, config=config)
        self.norm = nn.BatchNorm1d(24)
        self.drop = nn.Dropout(0.3)
        self.fc2 = SparseLinear(24, 24, config=config.replace(selection="per_example"))
        self.out = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))))


def _train(measure: bool, optimizer_cls) -> tuple[dict, dict, torch.Tensor, list]:
    torch.manual_seed(3)
    config = SparseBackpropConfig(k=4, selection="random", memory=0.8, memory_layout="slot")
    model = _Net(config)
    model.fc1.generator = torch.Generator().manual_seed(7)
    optimizer = optimizer_cls(model.parameters(), lr=1e-2)
    meter = InfoLossMeter(model, every=3, window=2) if measure else None
    data = torch.Generator().manual_seed(5)
    grads = []
    for step in range(7):
        x, y = torch.randn(6, 10, generator=data), torch.randint(0, 4, (6,), generator=data)
        if meter is not None:
            meter.start_step(step, lambda x=x, y=y: F.cross_entropy(model(x), y))
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
        if meter is not None:
            meter.end_step(step)
    if meter is not None:
        meter.close()
        assert meter.result()["summary"]["fc1"]["cosine"] is not None
    return (model.state_dict(), optimizer.state_dict(), torch.get_rng_state(),
            grads + [model.fc1.generator.get_state()])


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, LazyRowAdam],
                         ids=["adam", "lazy_adam"])
def test_measuring_leaves_training_bit_identical(optimizer_cls):
    """Memory, batch-norm statistics, dropout masks, random selection, .grad, touched rows."""
    plain = _train(False, optimizer_cls)
    measured = _train(True, optimizer_cls)
    for key, value in plain[0].items():
        assert torch.equal(value, measured[0][key]), key
    assert str(plain[1]) == str(measured[1])  # optimizer state, bit for bit
    assert torch.equal(plain[2], measured[2])  # the global RNG stream
    for a, b in zip(plain[3], measured[3], strict=True):
        if isinstance(a, list):
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_reference_of_lstm_transforms_is_dense_lstm(bidirectional):
    torch.manual_seed(0)
    lstm = SparseLSTM(3, 5, num_layers=2, bidirectional=bidirectional, dtype=torch.float64,
                      config=SparseBackpropConfig(k=2, selection="per_example", memory=0.8))
    model = nn.Sequential()
    model.add_module("lstm", lstm)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    meter = InfoLossMeter(model, every=2, window=2)
    for step in range(2):
        meter.start_step(step, lambda: lstm(x)[0].sin().sum())
        lstm(x)[0].sin().sum().backward()
        meter.end_step(step)
    dense = msbp.densify(copy.deepcopy(model))
    dense.lstm(x)[0].sin().sum().backward()
    assert set(meter.dense_grads) == {f"lstm.{tag}" for tag in lstm.transform_tags()}
    for tag in lstm.transform_tags():
        torch.testing.assert_close(meter.dense_grads[f"lstm.{tag}"],
                                   getattr(dense.lstm, f"weight_{tag}").grad, **F64)
    summary = meter.result()["summary"]
    assert summary["lstm.ih_l0"]["cosine"] < 0.999


# ------------------------------------------------------------------------------- dense_backward


def test_dense_backward_touches_no_state():
    model = mlp3(SparseBackpropConfig(k=2, selection="random", memory=0.8), torch.float32)
    model[0].generator = torch.Generator().manual_seed(0)
    optimizer = msbp.optim.LazyRowAdam(model.parameters())  # noqa: F841 (asks for the row log)
    seen = []
    model[0].probe = lambda *args: seen.append(args)
    x = torch.randn(5, 12)
    model(x).square().sum().backward()  # a sparse step fills the memory
    memories = [m.memory.clone() for m in (model[0], model[2], model[4])]
    grads = [p.grad.clone() for p in model.parameters()]
    gen_state = model[0].generator.get_state()
    assert take_touched_rows(model[0].weight)
    seen.clear()

    with msbp.dense_backward(model) as same:
        assert same is model and model[0].dense_mode
        with msbp.dense_backward(model):
            pass
        assert model[0].dense_mode  # nesting restores, not clears
        loss = model(x).square().sum()
    got = torch.autograd.grad(loss, [p for p in model.parameters()])  # backward after the block
    assert not model[0].dense_mode and "dense_mode" not in model[0].__dict__

    dense = msbp.densify(copy.deepcopy(model))
    want = torch.autograd.grad(dense(x).square().sum(), list(dense.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for layer, mem in zip((model[0], model[2], model[4]), memories, strict=True):
        assert torch.equal(layer.memory, mem)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(model[0].generator.get_state(), gen_state)
    assert not seen and not pending_rows(model[0].weight)


def test_dense_backward_lstm_with_dropout_matches_sparse_forward():
    """Same forward values and the same dropout masks as the sparse forward."""
    lstm = SparseLSTM(3, 4, num_layers=2, dropout=0.5, config=SparseBackpropConfig(k=1))
    x = torch.randn(5, 2, 3)
    torch.manual_seed(11)
    sparse_out, (h, c) = lstm(x)
    torch.manual_seed(11)
    with msbp.dense_backward(lstm):
        dense_out, (dh, dc) = lstm(x)
    for a, b in ((sparse_out, dense_out), (h, dh), (c, dc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
