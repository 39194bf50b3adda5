"""sparsify / densify keep what users attached to a layer: module hooks move to the new module
(their handles still remove them); a layer whose weight is computed, or whose forward was
replaced on the instance, is left dense; a conversion that fails leaves the model as it was."""

from __future__ import annotations

import functools
import gc
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import msbp
from msbp import SparseBackpropConfig, SparseLinear, densify, sparsify
from msbp.convert import FORWARD_REPLACED

CFG = SparseBackpropConfig(k=3, memory=0.5)
DT = torch.float64


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).to(DT)


def attach(model: nn.Sequential, log: list) -> dict:
    """Hooks of every kind on model[2]; returns what they saw."""
    seen: dict = {}
    layer = model[2]

    def pre(mod, args):
        log.append("pre")
        args[0].retain_grad()
        seen["input"] = args[0]

    def pre_kw(mod, args, kwargs):
        log.append("pre_kw")

    def fwd(mod, args, out):
        log.append("fwd")
        seen["output"] = out.detach().clone()

    def fwd_kw(mod, args, kwargs, out):
        log.append("fwd_kw")

    def bwd_pre(mod, grad_output):
        log.append("bwd_pre")

    def bwd(mod, grad_input, grad_output):
        log.append("bwd")
        seen["grad_input"] = grad_input[0].clone()
        seen["grad_output"] = grad_output[0].clone()

    def sd(mod, state, prefix, local_metadata):
        log.append("state_dict")

    seen["handles"] = [
        layer.register_forward_pre_hook(pre),
        layer.register_forward_pre_hook(pre_kw, with_kwargs=True),
        layer.register_forward_hook(fwd),
        layer.register_forward_hook(fwd_kw, with_kwargs=True, always_call=True),
        layer.register_full_backward_pre_hook(bwd_pre),
        layer.register_full_backward_hook(bwd),
        layer.register_state_dict_post_hook(sd) if hasattr(layer, "register_state_dict_post_hook")
        else layer._register_state_dict_hook(sd),
    ]
    return seen


def run(model: nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=DT)
    model(x).pow(2).sum().backward()
    model.state_dict()


def test_module_hooks_move_to_the_sparse_layer(backend):
    dense, log_dense = mlp(), []
    seen_dense = attach(dense, log_dense)
    model, log = mlp(), []
    seen = attach(model, log)
    sparsify(model, CFG)
    assert isinstance(model[2], SparseLinear)
    run(dense)
    run(model)
    assert log == log_dense == [
        "pre", "pre_kw", "fwd", "fwd_kw", "bwd_pre", "bwd", "state_dict"
    ]
    torch.testing.assert_close(seen["output"], seen_dense["output"], rtol=0, atol=0)
    # the layer's own output gradient is exact; what it passes down is its sparse dx, which is
    # what autograd delivered to its input
    torch.testing.assert_close(seen["grad_output"], seen_dense["grad_output"], rtol=0, atol=0)
    torch.testing.assert_close(seen["grad_input"], seen["input"].grad, rtol=0, atol=0)
    assert not torch.equal(seen["grad_input"], seen_dense["grad_input"])  # k = 3 of 5


def test_hook_handles_still_remove_them_and_densify_keeps_them(backend):
    model, log = mlp(), []
    seen = attach(model, log)
    sparsify(model, CFG)
    for handle in seen["handles"][1:]:
        handle.remove()
    run(model)
    assert log == ["pre"]
    densify(model)
    assert type(model[2]) is nn.Linear
    run(model)
    assert log == ["pre", "pre"]
    seen["handles"][0].remove()
    run(model)
    assert log == ["pre", "pre"]


@pytest.mark.parametrize("family", ["conv1d", "conv2d", "lstm", "attention", "hf_conv1d"])
def test_forward_hooks_move_for_every_family(family):
    if family == "hf_conv1d":
        pytest.importorskip("transformers")
        from transformers.pytorch_utils import Conv1D
    layer, x = {
        "conv1d": (nn.Conv1d(3, 6, 3), torch.randn(2, 3, 7)),
        "conv2d": (nn.Conv2d(3, 6, 3), torch.randn(2, 3, 7, 7)),
        "lstm": (nn.LSTM(4, 8), torch.randn(5, 2, 4)),
        "attention": (nn.MultiheadAttention(8, 2), torch.randn(5, 2, 8)),
        "hf_conv1d": (Conv1D(6, 4), torch.randn(2, 4)) if family == "hf_conv1d" else (None, None),
    }[family]
    model = nn.Sequential(layer)
    calls = []
    layer.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    sparsify(model, SparseBackpropConfig(k=2))
    if family == "attention":
        model[0](x, x, x)
    else:
        model(x)
    assert calls == [type(model[0]).__name__] and calls[0].startswith("Sparse")


def test_load_state_dict_pre_hook_is_called_with_the_new_module():
    model = mlp()
    got = []
    model[0].register_load_state_dict_pre_hook(lambda mod, *args: got.append(mod))
    sparsify(model, CFG)
    gc.collect()  # the replaced nn.Linear is gone
    model.load_state_dict(model.state_dict())
    assert got == [model[0]]


@pytest.mark.parametrize("how", ["weight_norm", "prune"])
def test_layer_with_a_computed_weight_is_left_dense(how):
    """The deprecated ``nn.utils.weight_norm`` and ``nn.utils.prune`` make ``weight`` a tensor
    computed by a forward pre-hook; sparsify raised TypeError half way through converting."""
    model = mlp()
    if how == "prune":
        prune.l1_unstructured(model[0], "weight", amount=0.5)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model[0] = nn.utils.weight_norm(model[0])
    with pytest.warns(UserWarning, match=r"sparsify left 1 layer.*0 \(weight not a Parameter"):
        sparsify(model, CFG)
    assert type(model[0]) is nn.Linear and isinstance(model[2], SparseLinear)
    assert "weight not a Parameter of its own" in model.sparsify_report.dense["0"]
    run(model)
    original = model[0].weight_v if how == "weight_norm" else model[0].weight_orig
    assert original.grad is not None and model[2].weight.grad is not None


def test_layer_whose_forward_was_replaced_is_left_dense():
    """As ``accelerate``'s hooks do: ``module.forward`` wraps the old module's bound forward,
    which a new module would silently drop."""
    model = mlp()
    calls = []
    old_forward = model[0].forward

    def wrapped(module, *args):
        calls.append(1)
        return old_forward(*args)

    model[0].forward = functools.partial(wrapped, model[0])
    with pytest.warns(UserWarning, match="forward is replaced on the instance"):
        sparsify(model, CFG)
    assert model.sparsify_report.dense == {"0": FORWARD_REPLACED}
    assert type(model[0]) is nn.Linear and isinstance(model[2], SparseLinear)
    run(model)
    assert calls == [1]


def test_a_failed_conversion_leaves_the_model_as_it_was(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))
    sparsify(model, SparseBackpropConfig(k=2), include="4")
    before = [type(m) for m in model]
    original = SparseLinear.from_dense.__func__
    calls = []

    def failing(cls, linear, config=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("conversion failed")
        return original(cls, linear, config)

    monkeypatch.setattr(SparseLinear, "from_dense", classmethod(failing))
    with pytest.raises(RuntimeError, match="conversion failed"):
        sparsify(model, SparseBackpropConfig(k=4))
    assert [type(m) for m in model] == before
    assert model[4].k == 2  # not reconfigured either
    monkeypatch.undo()
    msbp.sparsify(model, SparseBackpropConfig(k=4))
    assert [m.k for m in model if isinstance(m, SparseLinear)] == [4, 4, 4]


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_spectral_norm_added_after_sparsify_steps_as_the_dense_layers(kind, backend):
    """spectral_norm's parametrization advances its power iteration each time the weight is
    computed. A SparseConv read its weight three times per call (three steps where nn.Conv2d
    takes one) and every sparse layer's ``.to()`` computed it once more to find its dtype: at
    k = out the outputs and gradients parted from the dense model's (1e-6 in float64 after one
    call). Found by the API-combination fuzz (spectral_norm, then model.to(torch.float64))."""
    def build():
        torch.manual_seed(0)
        return {
            "linear": lambda: nn.Linear(5, 4),
            "conv2d": lambda: nn.Conv2d(2, 4, 3),
            "conv1d": lambda: nn.Conv1d(2, 4, 3),
        }[kind]().to(DT)

    x = {"linear": (3, 5), "conv2d": (2, 2, 5, 5), "conv1d": (2, 2, 6)}[kind]
    dense = build()
    layer = sparsify(nn.Sequential(build()), SparseBackpropConfig(k=0, memory=0.8))[0]
    for module in (dense, layer):
        torch.manual_seed(1)
        nn.utils.parametrizations.spectral_norm(module)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        if step == 1:
            dense.to(DT)
            layer.to(DT)
        inp = torch.randn(x, generator=gen, dtype=DT)
        outs = [m(inp) for m in (dense, layer)]
        for m, y in zip((dense, layer), outs, strict=True):
            m.zero_grad()
            y.square().sum().backward()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
        grads = [m.parametrizations.weight.original.grad for m in (dense, layer)]
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
        us = [m.parametrizations.weight[0]._u for m in (dense, layer)]
        torch.testing.assert_close(us[1], us[0], rtol=1e-12, atol=1e-12)
    assert not layer.memory.any()
