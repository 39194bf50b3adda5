"""sparsify's per-layer configs (config_fn) and its warning about nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import msbp
from msbp import SparseBackpropConfig, SparseConv2d, SparseLinear


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.Linear(8, 24)
        self.ff = nn.Linear(8, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.head(self.ff(h) + self.attn(h).sum(-1, keepdim=True))


def test_config_fn_gives_each_layer_its_config_or_leaves_it_dense():
    conv_cfg = SparseBackpropConfig(k=2, memory=0.0)
    ff_cfg = SparseBackpropConfig(ratio=0.25, memory=0.8, memory_layout="slot")
    seen = []

    def config_fn(name, module):
        seen.append(name)
        if isinstance(module, nn.Conv2d):
            return conv_cfg
        if name == "ff":
            return ff_cfg
        return None  # attention projections and the head stay dense

    model = msbp.sparsify(Block(), config_fn=config_fn)
    assert seen == ["conv", "attn", "ff", "head"]
    assert isinstance(model.conv, SparseConv2d) and model.conv.config is conv_cfg
    assert isinstance(model.ff, SparseLinear) and model.ff.config is ff_cfg
    assert model.ff.k == 8 and model.conv.k == 2
    assert type(model.attn) is nn.Linear and type(model.head) is nn.Linear
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert int((model.conv.weight.grad.flatten(1).abs().sum(1) > 0).sum()) == 2
    assert int((model.ff.weight.grad.abs().sum(1) > 0).sum()) == 8
    assert int((model.attn.weight.grad.abs().sum(1) > 0).sum()) == 24  # dense


def test_config_fn_with_filters_shared_modules_and_errors():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    calls = []

    def config_fn(name, module):
        calls.append(name)
        return SparseBackpropConfig(k=1)

    model = msbp.sparsify(model, config_fn=config_fn, exclude="3")
    assert calls == ["0"]  # a shared module is asked once, under its first name
    assert model[0] is model[2] and isinstance(model[0], SparseLinear)
    assert type(model[3]) is nn.Linear
    with pytest.raises(ValueError, match="config or config_fn, not both"):
        msbp.sparsify(nn.Linear(2, 2), SparseBackpropConfig(), config_fn=config_fn)
    with pytest.raises(ValueError, match="SparseBackpropConfig or None, got 0.5 for '0'"):
        msbp.sparsify(nn.Sequential(nn.Linear(2, 2)), config_fn=lambda n, m: 0.5)
    with pytest.raises(ValueError, match="every match left dense by config_fn"):
        msbp.sparsify(nn.Sequential(nn.Linear(2, 2)), config_fn=lambda n, m: None)


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ff = nn.Linear(8, 8)

    def forward(self, x):
        return self.ff(self.mha(x, x, x, need_weights=False)[0])


def test_config_fn_reaches_attention():
    attn_cfg = SparseBackpropConfig(k=3, memory=0.0)
    model = msbp.sparsify(
        WithAttention(),
        config_fn=lambda n, m: attn_cfg if n == "mha" else SparseBackpropConfig(k=2),
    )
    assert isinstance(model.mha, msbp.SparseMultiheadAttention) and model.mha.k == 3
    assert model.mha.out_proj.config is attn_cfg and model.ff.k == 2


def test_readme_convolution_attention_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "config_fn" in b
    )
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
