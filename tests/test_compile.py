"""torch.compile of a sparsified model gives the eager gradients and memory."""

import copy

import pytest
import torch
from torch import nn

import msbp


@pytest.mark.filterwarnings("ignore")
def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=4, memory=0.8), exclude="2")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 8, generator=gen)
        compiled(x).square().sum().backward()
        eager(x).square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad)
    torch.testing.assert_close(model[0].memory, eager[0].memory)
    assert model[0].memory.any()


@pytest.mark.filterwarnings("ignore")
def test_compiled_output_of_a_batched_input_can_be_modified_in_place(backend):
    """`Linear -> ReLU(inplace=True)` on a 3-d input: the layer's output was a view made inside
    its autograd function, which eager mode and dynamo refuse to modify in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=2, memory=0.8), exclude="2")
    eager = copy.deepcopy(model)
    x = torch.randn(4, 5, 3)
    torch.compile(model, backend="aot_eager")(x).square().sum().backward()
    eager(x).square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad)
    torch.testing.assert_close(model[0].memory, eager[0].memory)
    assert model[0].memory.any()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("selection", "k"), [("unified", 1), ("unified", 6), ("unified", 12),
                                              ("per_example", 9)])
def test_inductor_hf_conv1d_matches_eager(selection: str, k: int, backend) -> None:
    """torch.compile(inductor) of a SparseHFConv1D, whose weight reaches the op transposed (W^T's
    storage): inductor checks the op's dW against the fake's strides, and the two said other
    layouts (the fake a contiguous dW, the op W's own, or a contiguous one for the loops that
    keep most rows): every step raised an AssertionError naming the fake kernel. Fuzz of
    torch.compile against eager."""
    transformers_utils = pytest.importorskip("transformers.pytorch_utils")
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = nn.Sequential(transformers_utils.Conv1D(12, 3), nn.Tanh(),
                          transformers_utils.Conv1D(2, 12))
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=k, memory=0.8, selection=selection),
                  exclude="2")
    eager = copy.deepcopy(model)
    # the stride check is compiled into the graph: a cached graph of another fake would hide it
    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(model, backend="inductor", fullgraph=backend == "native")
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            x = torch.randn(2, 5, 3, generator=gen)
            compiled(x).square().sum().backward()
            eager(x).square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(model[0].memory, eager[0].memory, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_many_layers_with_graph_breaks_compile_once_for_all(backend, kind):
    """A slot memory (its rows follow the batch: spread in Python) or a convolution (its backward
    is PyTorch code) breaks the graph inside the layer, so dynamo compiles the layer's forward as
    a frame of its own. The layer's name, read by traced code, made one entry per layer: past
    the recompile limit (8) the remaining layers ran eagerly with a warning. Now the entries do
    not grow with the number of layers (here: raised if they reach the limit)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(6, 6) if kind == "linear" else nn.Conv1d(6, 6, 1), nn.Tanh()]
    model = nn.Sequential(*layers)
    layout = "slot" if kind == "linear" else "unit"
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=2, memory=0.5, memory_layout=layout))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        for _ in range(2):
            x = torch.randn(3, 6, 4, generator=gen) if kind == "conv" else torch.randn(
                3, 6, generator=gen)
            compiled(x).square().sum().backward()
            eager(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(model[0].memory, eager[0].memory)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 6)

    def forward(self, x):
        return self.lstm(x)[0]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["linear", "conv", "attention", "lstm"])
def test_jit_trace_and_export_record_the_exact_forward(backend, kind):
    """``torch.jit.trace`` (parameters requiring grad, grad mode on) records the layer's plain
    forward, the one ``no_grad`` runs, since a traced graph cannot hold msbp's autograd
    functions (it recorded the C++ path differently on its two check calls and failed), and so
    does ``torch.export`` (an exported LSTM held the PyTorch recurrence and failed when called
    with grad)."""
    torch.manual_seed(0)
    model, x = {
        "linear": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                   torch.randn(3, 8)),
        "conv": (lambda: nn.Sequential(nn.Conv1d(8, 16, 3), nn.ReLU(), nn.Conv1d(16, 4, 1)),
                 torch.randn(2, 8, 5)),
        "attention": (_Attention, torch.randn(2, 3, 8)),
        "lstm": (_LSTM, torch.randn(4, 2, 8)),
    }[kind]
    model = msbp.sparsify(model(), msbp.SparseBackpropConfig(k=2, memory=0.5))
    model(x).sum().backward()  # a first step, so that the C++ path's short call is armed
    with torch.no_grad():
        want = model(x)
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), want)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), want)  # parameters requiring grad, grad mode on
