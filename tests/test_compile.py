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
