"""sparsify's report: every linear-like layer is either converted or named with why it was left
dense; transformers' Conv1D (GPT-2) is converted exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import randn, ref_step, tol
from torch import nn

import msbp
from msbp import SparseBackpropConfig, SparseHFConv1D, densify, sparsify
from msbp.convert import (
    CONFIG_FN_NONE,
    EXCLUDED,
    LAZY,
    NO_COUNTERPART,
    NOT_INCLUDED,
    PROJ_SIZE,
)

CFG = SparseBackpropConfig(ratio=None, k=2, memory=0.5)


class MyLinear(nn.Linear):
    pass


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.custom = MyLinear(4, 4)
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.up = nn.ConvTranspose2d(2, 2, 2)
        self.attn = nn.MultiheadAttention(8, 2)  # its out_proj is reported with it
        self.lstm = nn.LSTM(4, 8)
        self.proj_lstm = nn.LSTM(4, 8, proj_size=2)
        self.gru = nn.GRU(4, 4)
        self.lazy = nn.LazyLinear(3)
        self.norm = nn.LayerNorm(4)  # not a layer sparsify knows: not reported
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(8, 2)
        self.aux = nn.Linear(8, 2)


SUBCLASS = (
    f"subclass {__name__}.MyLinear of nn.Linear: not converted, its forward or attributes may "
    "differ"
)


def test_report_names_every_layer_with_why():
    model = Zoo()
    with pytest.warns(UserWarning) as caught:
        sparsify(model, config_fn=lambda name, m: None if name == "aux" else CFG,
                 exclude="head")
    report = model.sparsify_report
    assert report.converted == ["fc", "conv", "attn", "lstm"]
    assert report.reconfigured == [] and report.unchanged == {}
    assert report.dense == {
        "custom": SUBCLASS,
        "conv3d": NO_COUNTERPART,
        "up": NO_COUNTERPART,
        "proj_lstm": PROJ_SIZE,
        "gru": NO_COUNTERPART,
        "lazy": LAZY,
        "head": EXCLUDED,
        "aux": CONFIG_FN_NONE,
    }
    # the warning names exactly the layers msbp could not convert, not the caller's choices
    (warning,) = [w for w in caught if "cannot convert" in str(w.message)]
    text = str(warning.message)
    for name in ("custom", "conv3d", "up", "proj_lstm", "gru", "lazy"):
        assert f"{name} (" in text
    assert "head" not in text and "aux" not in text
    assert set(report.unsupported) == {"custom", "conv3d", "up", "proj_lstm", "gru", "lazy"}
    # readable: one line per layer, with what it became
    lines = str(report).splitlines()
    assert lines[0] == "sparsify: 4 converted, 0 reconfigured, 8 left dense"
    assert len(lines) == 1 + 12
    assert any(line.split()[:2] == ["converted", "fc"] and "SparseLinear (k=2 of 8)" in line
               for line in lines)
    assert any(line.split()[:3] == ["left", "dense", "gru"] and NO_COUNTERPART in line
               for line in lines)


def test_include_reports_the_rest_as_not_included_and_no_match_lists_them():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    sparsify(model, CFG, include="1")
    assert model.sparsify_report.converted == ["1"]
    assert model.sparsify_report.dense == {"0": NOT_INCLUDED}
    with pytest.raises(ValueError, match=r"matched no layer(.|\n)*left dense +0 +Linear: excluded"):
        sparsify(nn.Sequential(nn.Linear(3, 3)), CFG, exclude="0")


def test_verbose_prints_the_report(capsys):
    sparsify(nn.Sequential(nn.Linear(3, 3)), CFG, verbose=True)
    assert capsys.readouterr().out.startswith("sparsify: 1 converted, 0 reconfigured")


def test_no_warning_when_everything_is_converted_or_chosen_dense():
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1), nn.Linear(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(model, CFG, exclude="2")
    assert model.sparsify_report.dense == {"2": EXCLUDED}


def test_shared_layer_is_reported_once_under_its_first_name():
    shared = nn.Linear(3, 3)
    model = sparsify(nn.Sequential(shared, nn.ReLU(), shared), CFG)
    assert model.sparsify_report.converted == ["0"]


def test_torch_transformer_is_fully_converted():
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=16, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(model, CFG)
    report = model.sparsify_report
    assert report.dense == {}
    assert report.converted == [
        "encoder.layers.0.self_attn", "encoder.layers.0.linear1", "encoder.layers.0.linear2",
        "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn",
        "decoder.layers.0.linear1", "decoder.layers.0.linear2",
    ]


# -- transformers' Conv1D -------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _conv1d(nx: int, nf: int):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf, nx).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_hf_conv1d_matches_the_reference():
    dense = _conv1d(5, 7)
    cfg = SparseBackpropConfig(ratio=None, k=3, memory=0.8)
    (model,) = [sparsify(nn.Sequential(dense), cfg)]
    layer = model[0]
    assert isinstance(layer, SparseHFConv1D) and layer.weight is dense.weight
    assert set(layer.state_dict()) == {"weight", "bias", "memory"}
    gen = torch.Generator().manual_seed(1)
    memory = torch.zeros(7, dtype=torch.float64)
    for _ in range(2):  # the second step uses the memory of the first
        x = randn(2, 3, 5, gen=gen).requires_grad_(True)
        g = randn(2, 3, 7, gen=gen)
        y = layer(x)
        torch.testing.assert_close(y, dense(x), rtol=0, atol=0)
        layer.zero_grad(set_to_none=True)
        y.backward(g)
        rdx, rdw, rdb, memory = ref_step(cfg, x.reshape(6, 5), dense.weight.t(),
                                         g.reshape(6, 7), memory)
        torch.testing.assert_close(x.grad.reshape(6, 5), rdx, **tol(torch.float64))
        torch.testing.assert_close(layer.weight.grad, rdw.t(), **tol(torch.float64))
        torch.testing.assert_close(layer.bias.grad, rdb, **tol(torch.float64))
        torch.testing.assert_close(layer.memory, memory, **tol(torch.float64))
    assert int((layer.weight.grad.abs().sum(0) > 0).sum()) == 3  # k output columns of W
    densify(model)
    assert type(model[0]) is type(dense) and model[0].weight is dense.weight
    assert model[0].nf == 7 and model[0].nx == 5


def test_gpt2_is_fully_converted():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2Model(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(model, CFG)
    assert model.sparsify_report.converted == [
        "h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj",
    ]
    assert model.sparsify_report.dense == {}
    ids = torch.randint(0, 20, (2, 5))
    model(input_ids=ids).last_hidden_state.sum().backward()
    assert int((model.h[0].mlp.c_fc.weight.grad.abs().sum(0) > 0).sum()) == 2
    assert msbp.dense_state_dict(model).keys() == densify(model).state_dict().keys()


def test_gpt2_lm_head_tied_to_the_embedding_is_stepped_whole():
    """GPT-2's head is its input embedding (tied): the embedding's rows, which no sparse layer
    logs, take LazyRowAdam's step too (the head counts as writing all rows)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = sparsify(GPT2LMHeadModel(config), CFG)
    head, table = model.lm_head, model.transformer.wte.weight
    assert head.weight is table and head.weight_tied
    assert "weight tied to transformer.wte (Embedding)" in str(model.sparsify_report)
    assert not model.transformer.h[0].mlp.c_fc.__dict__.get("weight_tied", False)
    opt = msbp.optim.LazyRowAdam(model.parameters(), lr=1e-2)
    ids = torch.tensor([[17, 18, 19]])
    before = table.detach().clone()
    model(input_ids=ids).logits.square().sum().backward()
    opt.step()
    moved = (table.detach() != before).any(1)
    assert moved[ids.view(-1)].all()  # the embedding's rows (the head logged 2 others)
    assert torch.equal(moved, table.grad.ne(0).any(1))  # as Adam's first step


def test_gpt2_resize_token_embeddings_after_sparsify_trains():
    """transformers' ``resize_token_embeddings`` on the sparsified LM re-ties a larger weight to
    the head: its memory is refitted (the old tokens' entries kept, the new ones empty)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = sparsify(GPT2LMHeadModel(config), CFG)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.square().sum().backward()
    before = model.lm_head.memory.clone()
    assert before.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.resize_token_embeddings(24, mean_resizing=False)
    head = model.lm_head
    assert isinstance(head, msbp.SparseLinear) and head.weight is model.transformer.wte.weight
    assert head.memory.shape == (24,) and torch.equal(head.memory[:20], before)
    assert not head.memory[20:].any()
    model.zero_grad(set_to_none=True)
    model(input_ids=torch.tensor([[21, 22, 23]])).logits.square().sum().backward()
    assert head.weight.grad.shape == (24, 16)


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_new_weight_with_other_rows_refits_the_memory(layout):
    layer = msbp.SparseLinear(3, 6, config=SparseBackpropConfig(ratio=None, k=2, memory=0.5,
                                                                memory_layout=layout))
    layer(torch.randn(4, 3)).square().sum().backward()
    before = layer.memory.clone()
    layer.weight = nn.Parameter(torch.randn(4, 3))  # fewer units: the first 4 kept
    assert torch.equal(layer.memory, before[..., :4])
    layer.weight = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))  # more, another dtype
    assert layer.memory.dtype == torch.float64 and layer.memory.shape[-1] == 8
    assert torch.equal(layer.memory[..., :4], before[..., :4].double())
    assert not layer.memory[..., 4:].any()
