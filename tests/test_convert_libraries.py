"""sparsify and the model libraries' own layers, recognised by class name (nothing imported, so
these run without timm or torchvision; tests/test_vision_families.py runs the real models):
timm's ``Linear`` is converted, timm's attention switch ``qkv_bias_separate`` is set so that a
sparse ``qkv`` runs, and torchvision Swin's ``qkv`` / ``proj``, whose weights go to a functional
call, are left dense with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msbp import SparseBackpropConfig, SparseLinear, densify, sparsify

DT = torch.float64


class TimmLinear(nn.Linear):
    """timm.layers.Linear: nn.Linear's forward outside TorchScript."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


TimmLinear.__module__, TimmLinear.__qualname__ = "timm.layers.linear", "Linear"


class TimmAttention(nn.Module):
    """As timm's BEiT / EVA / SwinV2 attention: q and v biases of their own, and qkv's weight
    passed to F.linear unless ``qkv_bias_separate`` is set."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)
        self.qkv_bias_separate = False

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += bias
        else:
            qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj(attn @ v)


class ShiftedWindowAttention(nn.Module):
    """As torchvision's: qkv's and proj's weights go to a functional call."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return F.linear(attn @ v, self.proj.weight, self.proj.bias)


ShiftedWindowAttention.__module__ = "torchvision.models.swin_transformer"


def _model(block: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(block(8), nn.Flatten(), TimmLinear(5 * 8, 3)).to(DT)


def _step(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model(torch.randn(2, 5, 8, dtype=DT)).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_timm_linear_is_converted_and_trains_as_dense_at_k_equal_to_out(backend):
    dense = _model(TimmAttention)
    model = sparsify(copy.deepcopy(dense), SparseBackpropConfig(ratio=1.0, memory=0.0))
    assert isinstance(model[2], SparseLinear) and "2" in model.sparsify_report.converted
    for (name, want), got in zip(_step(dense).items(), _step(model).values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    assert type(densify(model)[2]) is nn.Linear


def test_timm_attention_runs_its_sparse_qkv(backend):
    """Before: qkv reported converted, its sparse forward never ran (a dense gradient of all 24
    rows, an empty memory)."""
    model = sparsify(_model(TimmAttention), SparseBackpropConfig(k=4, memory=0.5))
    assert model[0].qkv_bias_separate is True
    assert "qkv_bias_separate set" in next(
        e.detail for e in model.sparsify_report.layers if e.name == "0.qkv"
    )
    _step(model)
    qkv = model[0].qkv
    assert int((qkv.weight.grad != 0).any(1).sum()) == 4 and bool(qkv.memory.any())
    assert model[0].q_bias.grad is not None


def test_densify_unsets_the_qkv_switch_it_set(backend):
    """Before: densify left qkv_bias_separate set, so the dense model no longer ran timm's fused
    F.linear (the bias added after the product: other rounding). A switch the user set stays."""
    dense = _model(TimmAttention)
    model = densify(sparsify(copy.deepcopy(dense), SparseBackpropConfig(k=4, memory=0.5)))
    assert model[0].qkv_bias_separate is False and type(model[0].qkv) is nn.Linear
    for (name, want), got in zip(_step(dense).items(), _step(model).values(), strict=True):
        assert torch.equal(got, want), name
    mine = _model(TimmAttention)
    mine[0].qkv_bias_separate = True
    assert densify(sparsify(mine, SparseBackpropConfig(k=4)))[0].qkv_bias_separate is True


def test_timm_attention_at_k_equal_to_out_trains_as_dense(backend):
    dense = _model(TimmAttention)
    model = sparsify(copy.deepcopy(dense), SparseBackpropConfig(ratio=1.0, memory=0.0))
    for (name, want), got in zip(_step(dense).items(), _step(model).values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_torchvision_swin_functional_weights_are_left_dense():
    model = _model(ShiftedWindowAttention)
    with pytest.warns(UserWarning, match=r"left 2 layer.*passes its weight to a functional call"):
        sparsify(model, SparseBackpropConfig(k=4))
    report = model.sparsify_report
    assert set(report.unsupported) == {"0.qkv", "0.proj"} and report.converted == ["2"]
    assert type(model[0].qkv) is nn.Linear and type(model[0].proj) is nn.Linear
    grads = _step(model)
    assert int((grads["0.qkv.weight"] != 0).any(1).sum()) == 24  # dense, as reported
