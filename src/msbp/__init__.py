"""msbp: sparse backpropagation with memory (MSBP) and meProp for PyTorch."""

from msbp import amp, distributed, functional, native, ops, optim
from msbp.check import SparsifyCheck, check_sparsified
from msbp.config import SparseBackpropConfig
from msbp.convert import LayerReport, SparsifyReport, dense_backward, densify, sparsify
from msbp.hub import from_pretrained, save_pretrained
from msbp.nn import (
    SparseConv1d,
    SparseConv2d,
    SparseHFConv1D,
    SparseLinear,
    SparseLSTM,
    SparseMultiheadAttention,
)
from msbp.nn.memory import (
    dense_state_dict,
    gather_memory_state,
    load_memory_state,
    memory_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "LayerReport",
    "SparseBackpropConfig",
    "SparseConv1d",
    "SparseConv2d",
    "SparseHFConv1D",
    "SparseLSTM",
    "SparseLinear",
    "SparseMultiheadAttention",
    "SparsifyCheck",
    "SparsifyReport",
    "amp",
    "check_sparsified",
    "dense_backward",
    "dense_state_dict",
    "densify",
    "distributed",
    "from_pretrained",
    "functional",
    "gather_memory_state",
    "load_memory_state",
    "memory_state_dict",
    "native",
    "ops",
    "optim",
    "save_pretrained",
    "sparsify",
    "__version__",
]
