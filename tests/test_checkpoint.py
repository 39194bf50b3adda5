"""Checkpoints across dense and sparse models, and reconfiguring a sparsified model in place."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _helpers import memory_colsum
from torch import nn

import msbp
from msbp import SparseBackpropConfig, dense_state_dict, densify, sparsify

CFG = SparseBackpropConfig(ratio=None, k=2, memory=0.8)


class Mixed(nn.Module):
    """One layer of every kind sparsify converts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 6, 1)
        self.lstm = nn.LSTM(6, 6, batch_first=True)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, T)
        h = self.conv(x).transpose(1, 2)  # (N, T, 6)
        h, _ = self.lstm(h)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h)


def _step(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """One backward on a fixed batch; returns the parameter gradients."""
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(seed))
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _trained_sparse() -> Mixed:
    model = sparsify(Mixed(), CFG)
    _step(model)
    assert model.head.memory.any() and model.attn.memory_q.any()
    return model


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- sparse -> dense -----------------------------------------------------------------------------


def test_sparse_state_dict_into_dense_model_through_dense_state_dict():
    model = _trained_sparse()
    dense = Mixed()
    # what a user tries first: torch names the memory keys it does not expect
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"head.memory"'):
        dense.load_state_dict(model.state_dict())
    sources = {
        "model": model,
        "saved state dict": _save_load(model.state_dict()),  # keeps its metadata
        "plain dict": dict(model.state_dict()),  # no metadata: memory keys by name
    }
    for what, source in sources.items():
        fresh = Mixed()
        result = fresh.load_state_dict(dense_state_dict(source))  # strict
        assert not result.missing_keys and not result.unexpected_keys, what
        for name, p in model.named_parameters():
            assert torch.equal(fresh.get_parameter(name), p), (what, name)
    assert set(dense_state_dict(model)) == set(Mixed().state_dict())
    assert set(dense_state_dict(model)) == set(densify(copy.deepcopy(model)).state_dict())


def test_dense_state_dict_keeps_a_dense_models_own_memory_buffer():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.register_buffer("memory", torch.ones(2))

    model = sparsify(Net(), CFG)
    state = dense_state_dict(_save_load(model.state_dict()))
    assert set(state) == {"fc.weight", "fc.bias", "memory"}
    Net().load_state_dict(state)


def test_dense_state_dict_rejects_other_things():
    with pytest.raises(ValueError, match="a model or a state dict, got list"):
        dense_state_dict([])


# -- dense -> sparse -----------------------------------------------------------------------------


def test_dense_checkpoint_into_sparse_model_starts_with_empty_memory():
    dense = Mixed()
    _step(dense)
    model = _trained_sparse()
    result = model.load_state_dict(_save_load(dense.state_dict()))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(m.any() for m in msbp.memory_state_dict(model).values())
    fresh = sparsify(copy.deepcopy(dense), CFG)
    want = _step(fresh)
    for name, g in _step(model).items():
        torch.testing.assert_close(g, want[name], rtol=0, atol=0, msg=name)


# -- reconfiguring a sparse model in place -------------------------------------------------------


def test_sparsify_again_changes_k_and_keeps_the_memory():
    model = _trained_sparse()
    memories = msbp.memory_state_dict(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, msbp.nn.memory.MemoryMixin)}
    new = CFG.replace(k=3, memory=0.5)
    sparsify(model, new)
    report = model.sparsify_report
    assert report.converted == [] and report.reconfigured == ["conv", "lstm", "attn", "head"]
    assert all("memory kept" in e.detail for e in report.layers)
    for name, layer in layers.items():
        assert model.get_submodule(name) is layer and layer.config == new, name
    assert model.attn.out_proj.config == new  # the attention's projections move together
    for key, memory in msbp.memory_state_dict(model).items():
        assert torch.equal(memory, memories[key]), key
    # it now trains exactly as a model sparsified with the new config and that memory
    twin = sparsify(Mixed(), new)
    twin.load_state_dict(model.state_dict())
    want = _step(twin, seed=1)
    for name, g in _step(model, seed=1).items():
        torch.testing.assert_close(g, want[name], rtol=0, atol=0, msg=name)
    assert int((model.head.weight.grad.abs().sum(1) > 0).sum()) == 3


def test_reconfigure_converts_or_clears_the_memory():
    model = _trained_sparse()
    sums = memory_colsum(model.head.memory).clone()
    sparsify(model, CFG.replace(memory_layout="slot"), include="head")
    assert model.head.memory.shape == (1, 4)
    torch.testing.assert_close(memory_colsum(model.head.memory), sums)
    assert "converted from 'unit' to 'slot'" in model.sparsify_report.layers[-1].detail
    assert model.sparsify_report.unchanged == {
        "conv": "not included", "lstm": "not included", "attn": "not included",
    }
    sparsify(model, CFG.replace(memory=0.0), include="head")
    assert not model.head.memory.any()
    assert "memory cleared" in model.sparsify_report.layers[-1].detail
    # back to a unit memory: empty and of the unit shape, and it trains
    sparsify(model, CFG, include="head")
    assert model.head.memory.shape == (4,) and not model.head.memory.any()
    assert "memory starts empty" in model.sparsify_report.layers[-1].detail
    _step(model)
    assert model.head.memory.any()


@pytest.mark.parametrize("how", ["load_state_dict", "assign", "load_memory_state"])
@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_memory_loaded_into_a_layer_without_memory_stays_empty(backend, how, layout):
    """A checkpoint with a memory loaded into a model with ``memory=0`` leaves the memory empty,
    as reconfiguring that model to ``memory=0`` in place does: it used to be copied in, unused,
    carried along into the next checkpoint and loaded from there, stale, into a model with the
    memory on. Found by a save/resume fuzz (load under another config against ``sparsify``
    in place)."""
    saved = _save_load(_trained_sparse().state_dict())
    off = CFG.replace(memory=0.0, memory_layout=layout)
    in_place = sparsify(Mixed(), CFG)
    in_place.load_state_dict(saved)
    sparsify(in_place, off)
    model = sparsify(Mixed(), off)
    if how == "load_memory_state":
        model.load_state_dict(dense_state_dict(saved))
        msbp.load_memory_state(model, [{k: saved[k] for k in msbp.memory_state_dict(model)}])
    else:
        model.load_state_dict(saved, assign=how == "assign")
    for key, memory in msbp.memory_state_dict(model).items():
        want = msbp.memory_state_dict(in_place)[key]
        assert memory.shape == want.shape and not memory.any(), key
    on = sparsify(Mixed(), CFG)  # its next checkpoint brings no memory to a model with one
    on.load_state_dict(_save_load(model.state_dict()))
    assert not any(m.any() for m in msbp.memory_state_dict(on).values())
    # a memory that does not fit is still a load error
    bad = dict(saved, **{"head.memory": torch.zeros(5)})
    with pytest.raises(RuntimeError, match="head.memory"):
        sparsify(Mixed(), off).load_state_dict(bad)
    want = _step(in_place, seed=1)
    for name, g in _step(model, seed=1).items():
        torch.testing.assert_close(g, want[name], rtol=0, atol=0, msg=name)


def test_partial_load_keeps_the_memory_of_layers_it_does_not_hold(backend):
    """``load_state_dict(part, strict=False)`` with the weights of some layers only (peft's
    adapter loading, one shard of a checkpoint) leaves the other layers' memories as they are,
    as it leaves their parameters; a layer whose weights it holds without a memory (a dense
    checkpoint of that layer) starts with an empty one. Every memory used to be cleared,
    silently: no key was reported missing."""
    model = _trained_sparse()
    before = msbp.memory_state_dict(model)
    part = {k: v.clone() for k, v in dense_state_dict(model).items() if k.startswith("head.")}
    result = model.load_state_dict(part, strict=False)
    assert "conv.weight" in result.missing_keys and not result.unexpected_keys
    for key, memory in msbp.memory_state_dict(model).items():
        if key == "head.memory":
            assert not memory.any()
        else:
            assert torch.equal(memory, before[key]), key
    # the attention's projections: in_proj_weight holds q, k and v; out_proj is its own layer
    part = {k: v for k, v in dense_state_dict(model).items() if k == "attn.out_proj.weight"}
    model.load_state_dict(part, strict=False)
    after = msbp.memory_state_dict(model)
    assert not after["attn.out_proj.memory"].any()
    assert all(torch.equal(after[f"attn.memory_{p}"], before[f"attn.memory_{p}"]) for p in "qkv")
    # and training goes on as in a model that was never partly loaded
    twin = _trained_sparse()
    for name in ("head", "attn.out_proj"):
        twin.get_submodule(name).reset_memory()
    want = _step(twin, seed=1)
    for name, g in _step(model, seed=1).items():
        torch.testing.assert_close(g, want[name], rtol=0, atol=0, msg=name)


def test_reconfigure_to_an_impossible_config_changes_nothing():
    model = _trained_sparse()
    before = model.conv.config
    with pytest.raises(ValueError, match="per_example"):
        sparsify(model, CFG.replace(selection="per_example"))
    assert model.conv.config is before and model.head.config is before


def _readme_blocks() -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Saving, loading and reconfiguring", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_saving_example_runs_and_prints_what_it_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _readme_blocks()[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    lines = code.splitlines()
    at = lines.index("print(model.sparsify_report)")
    said = [line.removeprefix("# ") for line in lines[at + 1:at + 4]]
    said.append(next(line for line in lines if "reconfigured)" in line).split("# ")[1])
    assert printed == said


def test_msbp_works_without_transformers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['safetensors'] = None\n"
        "import msbp, torch\n"
        "m = msbp.sparsify(torch.nn.Sequential(torch.nn.Linear(3, 3)))\n"
        "assert m.sparsify_report.converted == ['0']\n"
        "try:\n"
        "    msbp.save_pretrained(m, 'x')\n"
        "except ValueError as e:\n"
        "    assert 'needs a transformers PreTrainedModel' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
