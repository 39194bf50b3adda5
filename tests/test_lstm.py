"""SparseLSTM: identity with nn.LSTM at k = 4 x hidden, shapes, conversion, memory behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from msbp import SparseBackpropConfig, SparseLSTM, densify, sparsify

F64 = {"rtol": 1e-10, "atol": 1e-12}



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
    for name, buf in sparse.named_buffers():
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
