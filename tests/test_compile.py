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
