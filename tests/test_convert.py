"""sparsify / densify: which layers are converted, parameter identity, sharing, round trips."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from _helpers import randn, ref_step, tol
from torch import nn

from msbp import SparseBackpropConfig, SparseLinear, densify, sparsify

CFG = SparseBackpropConfig(ratio=None, k=2, memory=0.8)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(d, 2))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


LINEAR_NAMES = {
    "inp",
    "blocks.0.fc1",
    "blocks.0.fc2",
    "blocks.1.fc1",
    "blocks.1.fc2",
    "head.1",
}


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Net().to(dtype)


def _sparse_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def _dense_names(model):
    return {name for name, m in model.named_modules() if type(m) is nn.Linear}


def test_sparsify_all_nested():
    model = _net()
    params = dict(model.named_parameters())
    out = sparsify(model, CFG)
    assert out is model
    assert _sparse_names(model) == LINEAR_NAMES
    assert _dense_names(model) == set()
    for name, p in model.named_parameters():
        assert p is params[name]  # the same Parameter objects, not copies
    for name in LINEAR_NAMES:
        layer = model.get_submodule(name)
        assert layer.config == CFG
        assert layer.name == name


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        pytest.param({"include": "blocks.*.fc1"}, {"blocks.0.fc1", "blocks.1.fc1"}, id="glob"),
        pytest.param(
            {"include": re.compile(r"blocks\.\d\.fc[12]")},
            {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"},
            id="regex",
        ),
        pytest.param({"include": ["inp", "head.*"]}, {"inp", "head.1"}, id="glob-list"),
        pytest.param(
            {"include": ["inp", re.compile(r"blocks\.0\.fc\d")]},
            {"inp", "blocks.0.fc1", "blocks.0.fc2"},
            id="glob-and-regex-list",
        ),
        pytest.param({"exclude": "head.1"}, LINEAR_NAMES - {"head.1"}, id="exclude-name"),
        pytest.param(
            {"exclude": re.compile(r"blocks\.1\..*")},
            LINEAR_NAMES - {"blocks.1.fc1", "blocks.1.fc2"},
            id="exclude-regex",
        ),
        pytest.param(
            {"include": "blocks.*", "exclude": "*.fc2"},
            {"blocks.0.fc1", "blocks.1.fc1"},
            id="include-and-exclude",
        ),
        pytest.param(
            {"include": lambda name, m: m.out_features == 8},
            {"blocks.0.fc1", "blocks.1.fc1"},
            id="callable-include",
        ),
        pytest.param(
            {"exclude": lambda name, m: name.startswith("blocks")},
            {"inp", "head.1"},
            id="callable-exclude",
        ),
    ],
)
def test_sparsify_include_exclude(kwargs, want):
    model = _net()
    sparsify(model, CFG, **kwargs)
    assert _sparse_names(model) == want
    assert _dense_names(model) == LINEAR_NAMES - want


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"include": "nothing*"}, id="include-glob"),
        pytest.param({"include": re.compile(r"fc\d{3}")}, id="include-regex"),
        pytest.param({"include": r"blocks\.\d\.fc1"}, id="str-is-not-regex"),
        pytest.param({"exclude": "*"}, id="exclude-all"),
        pytest.param({"include": lambda n, m: False}, id="callable"),
    ],
)
def test_sparsify_no_match_raises(kwargs):
    model = _net()
    with pytest.raises(ValueError, match="matched no"):
        sparsify(model, CFG, **kwargs)
    assert _sparse_names(model) == set()


def test_sparsify_model_without_linear_raises():
    # (Conv1d / Conv2d are converted now; Conv3d is not)
    with pytest.raises(ValueError, match="matched no"):
        sparsify(nn.Sequential(nn.ReLU(), nn.Conv3d(1, 1, 1)), CFG)


def test_sparsify_bad_pattern_type_raises():
    with pytest.raises(ValueError, match="glob strings or compiled re.Pattern"):
        sparsify(_net(), CFG, include=["inp", 3])


def test_sparsify_root_linear():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    out = sparsify(lin, CFG)
    assert isinstance(out, SparseLinear)
    assert out.weight is lin.weight and out.bias is lin.bias
    x = torch.randn(3, 4)
    assert torch.equal(out(x), lin(x))
    back = densify(out)
    assert type(back) is nn.Linear
    assert back.weight is lin.weight and back.bias is lin.bias


def test_sparsify_shared_layer_stays_shared():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(model, CFG)
    assert isinstance(model[0], SparseLinear)
    assert model[0] is model[2]
    assert model[0].weight is shared.weight
    assert len(list(model.parameters())) == 2


def test_sparsify_tied_weights_stay_tied():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    sparsify(model, CFG)
    assert model[0] is not model[2]
    assert model[0].weight is model[2].weight is a.weight
    assert model[2].bias is b.bias


def test_sparsify_skips_linear_subclasses_and_sparse_layers():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 3), SparseLinear(3, 3, config=CFG), nn.Linear(3, 3))
    already = model[1]
    with pytest.warns(UserWarning, match=r"0 \(subclass .*MyLinear of nn.Linear"):
        sparsify(model, CFG)
    assert type(model[0]) is MyLinear
    assert model[1] is already
    assert isinstance(model[2], SparseLinear)
    assert model.sparsify_report.converted == ["2"]
    assert model.sparsify_report.reconfigured == ["1"]
    # again: the sparse layers are reconfigured in place, not converted twice
    converted = model[2]
    with pytest.warns(UserWarning, match="MyLinear"):
        sparsify(model, CFG.replace(k=1))
    assert model[1] is already and model[2] is converted
    assert model[1].config.k == model[2].config.k == 1


def test_optimizer_built_before_sparsify_still_trains():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, CFG, exclude="head.1")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = randn(5, 3, gen=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * grads[name])
    # the sparsified layers got sparse weight gradients (k rows), the excluded one a dense one
    assert int((grads["inp.weight"].abs().sum(1) > 0).sum()) == 2
    assert int((grads["head.1.weight"].abs().sum(1) > 0).sum()) == 2  # out = 2: dense anyway
    assert int((grads["blocks.0.fc1.weight"].abs().sum(1) > 0).sum()) == 2


def test_sparsified_layer_matches_reference_in_model():
    """The first layer of a sparsified model gets exactly the oracle's gradient for its dy."""
    model = sparsify(_net(), CFG.replace(memory=0.0))
    x = randn(5, 3, gen=torch.Generator().manual_seed(2))
    captured = {}
    model.inp.register_forward_hook(lambda m, i, o: captured.update(y=o))
    model(x).square().sum().backward()
    # dy of the first layer, dense, from a dense copy of the rest of the graph
    # (memory 0: running the sparse blocks again gives the same dy as in the real pass)
    y = captured["y"].detach().requires_grad_(True)
    h = y
    for block in model.blocks:
        h = h + block(h)
    model.head(h).square().sum().backward(inputs=[y])
    _, rdW, _, _ = ref_step(CFG, x, model.inp.weight, y.grad, None)
    torch.testing.assert_close(model.inp.weight.grad, rdW, **tol(torch.float64))


def test_densify_round_trip():
    model = _net()
    reference = _net()  # same seed: identical dense copy
    params = dict(model.named_parameters())
    dense_keys = set(model.state_dict())
    sparsify(model, CFG)
    assert {k for k in model.state_dict() if k.endswith("memory")}
    out = densify(model)
    assert out is model
    assert _sparse_names(model) == set()
    assert _dense_names(model) == LINEAR_NAMES
    assert set(model.state_dict()) == dense_keys
    for name, p in model.named_parameters():
        assert p is params[name]
    x = randn(4, 3, gen=torch.Generator().manual_seed(3))
    model(x).sum().backward()
    reference(x).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_densify_keeps_sharing():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = sparsify(nn.Sequential(shared, nn.ReLU(), shared), CFG)
    densify(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2]
    assert model[0].weight is shared.weight


def test_sparsify_then_train_mode_preserved():
    model = _net().eval()
    sparsify(model, CFG)
    assert not any(m.training for m in model.modules())


def test_patterns_must_match_whole_name():
    """ "fc1" is neither a glob nor a regex full match of any qualified name."""
    with pytest.raises(ValueError, match="matched no"):
        sparsify(_net(), CFG, include="fc1")
    with pytest.raises(ValueError, match="matched no"):  # a regex prefix of "blocks.0.fc1"
        sparsify(_net(), CFG, include=re.compile(r"blocks\.0"))
    model = _net()
    sparsify(model, CFG, include="*fc1")
    assert _sparse_names(model) == {"blocks.0.fc1", "blocks.1.fc1"}


class Heads(nn.Module):
    """Names where a glob and a regex read of one string disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(3, 3))
        self.headless = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)
        self.oXut = nn.Linear(3, 3)


@pytest.mark.parametrize(
    ("kwargs", "dense"),
    [
        # as a regex, "head.*" would match "headless" too: a str is a glob only
        pytest.param({"exclude": "head.*"}, {"head.0"}, id="glob-not-regex"),
        pytest.param({"exclude": "out"}, {"out"}, id="plain-name"),
        pytest.param({"exclude": re.compile("o.ut")}, {"oXut"}, id="regex-fullmatch"),
        pytest.param({"exclude": "o.ut"}, set(), id="str-dot-is-literal"),
        pytest.param({"exclude": re.compile("head")}, set(), id="regex-must-match-whole-name"),
        pytest.param({"exclude": ["out", re.compile("head.*")]}, {"out", "head.0", "headless"},
                     id="mixed-list"),
    ],
)
def test_pattern_kind_is_explicit(kwargs, dense):
    model = Heads()
    if dense:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sparsify(model, CFG, **kwargs)
    else:  # the pattern matched no layer: said, not silent
        with pytest.warns(UserWarning, match="exclude pattern .* matched no layer"):
            sparsify(model, CFG, **kwargs)
    linears = {"head.0", "headless", "out", "oXut"}
    assert _dense_names(model) == dense
    assert _sparse_names(model) == linears - dense


def test_a_pattern_that_matches_no_layer_is_named_in_a_warning():
    """A typo, or a container's name (patterns match a layer's whole name), would leave the
    layers the caller meant converted or dense with no sign; each such pattern is named, the
    container with the glob that reaches inside it."""
    model = Heads()
    with pytest.warns(UserWarning) as record:
        sparsify(model, CFG, exclude=(p for p in ["head", "ouput", re.compile("out"), "oXut"]))
    texts = [str(w.message) for w in record]
    assert len(texts) == 2, texts
    assert "exclude pattern 'head' matched no layer (it names 'head'" in texts[0]
    assert "'head.*' matches those" in texts[0] and "'headless'" in texts[0]
    assert "exclude pattern 'ouput' matched no layer;" in texts[1]
    # the generator was read once for matching and once for the check
    assert _dense_names(model) == {"out", "oXut"}
    assert _sparse_names(model) == {"head.0", "headless"}
    model = _net()
    with pytest.warns(UserWarning, match=r"include pattern 'nothing\.\*' matched no layer"):
        sparsify(model, CFG, include=["*fc1", "nothing.*"])
    assert _sparse_names(model) == {"blocks.0.fc1", "blocks.1.fc1"}
