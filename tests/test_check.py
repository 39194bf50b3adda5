"""check_sparsified: which sparse layers a forward runs, and which it bypasses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import msbp
from msbp import SparseBackpropConfig, check_sparsified, sparsify

CFG = SparseBackpropConfig(k=2, memory=0.5)


class FunctionalParent(nn.Module):
    """Holds a Linear and uses its weight in a functional call (as timm's attention did before
    its switch): sparsify converts the Linear, whose sparse forward then never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 12)
        self.proj = nn.Linear(12, 6)

    def forward(self, x):
        return self.proj(F.linear(x, self.qkv.weight, self.qkv.bias).relu())


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.aux = nn.Linear(8, 3)  # only in training
        self.head = nn.Linear(8, 3)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        h = self.norm(self.body(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_functional_use_of_a_sparse_weight_is_reported_bypassed(backend):
    model = sparsify(nn.Sequential(FunctionalParent(), nn.ReLU()), CFG)
    assert "0.qkv" in model.sparsify_report.converted  # sparsify cannot see the parent's code
    report = check_sparsified(model, torch.randn(4, 6))
    assert not report.ok
    assert report.bypassed == {"0.qkv": ["torch.nn.functional.linear"]}
    assert report.ran == ["0.proj"] and not report.unused and not report.shared
    assert "bypassed  0.qkv" in str(report)
    # what the report says: the weight's gradient is dense (more than k rows), the memory never
    # filled
    model(torch.randn(4, 6)).sum().backward()
    qkv = model[0].qkv
    assert int((qkv.weight.grad != 0).any(1).sum()) > CFG.k and not bool(qkv.memory.any())


def test_a_plain_model_runs_every_sparse_layer(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    sparsify(model, CFG)
    report = check_sparsified(model, torch.randn(4, 6))
    assert report.ok and report.ran == ["0", "2", "4"]
    attn = sparsify(nn.MultiheadAttention(8, 2, batch_first=True), SparseBackpropConfig(k=3))
    x = torch.randn(2, 5, 8)
    report = check_sparsified(attn, x, x, x)
    assert report.ok and report.ran == ["", "out_proj"] and not report.shared, report
    lstm = sparsify(nn.LSTM(6, 5, batch_first=True), SparseBackpropConfig(k=3))
    report = check_sparsified(lstm, torch.randn(2, 4, 6))
    assert report.ok and report.ran == [""], report


def test_a_tied_weight_is_reported_shared():
    torch.manual_seed(0)
    embed = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = embed.weight
    model = sparsify(nn.ModuleDict({"embed": embed, "head": head}), CFG)

    class Run(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner["head"](self.inner["embed"](ids))

    report = check_sparsified(Run(model), torch.tensor([[1, 2, 3]]))
    assert report.ok and report.ran == ["inner.head"]
    assert report.shared == {"inner.head": ["torch.nn.functional.embedding"]}


def test_nothing_changes_and_unused_layers_are_named():
    torch.manual_seed(0)
    model = sparsify(Branchy(), CFG)
    model.train()
    model.body.eval()  # a mixed state, restored as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_sparsified(model, torch.randn(5, 6))
    assert report.ok and report.ran == ["body", "head"] and report.unused == ["aux"]
    assert model.training and not model.body.training and model.head.training
    for key, value in model.state_dict().items():  # memories, BatchNorm statistics
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert msbp.SparsifyCheck is type(report)


def test_transformers_models_run_every_sparse_layer():
    """No false alarm on the families people sparsify: every layer ran; GPT-2's and Llama's tied
    lm_head is reported shared with the embedding."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    for model, layers in ((llama, 15), (gpt2, 9)):
        sparsify(model, SparseBackpropConfig(ratio=0.25))
        report = check_sparsified(model, input_ids=ids)
        assert report.ok and len(report.ran) == layers and not report.unused, report
        assert report.shared == {"lm_head": ["torch.nn.functional.embedding"]}
