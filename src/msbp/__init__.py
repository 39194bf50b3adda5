"""msbp: sparse backpropagation with memory (MSBP) and meProp for PyTorch."""

from msbp import amp, distributed, functional, native, ops, optim
from msbp.config import SparseBackpropConfig
from msbp.convert import dense_backward, densify, sparsify
from msbp.nn import (
    SparseConv1d,
    SparseConv2d,
    SparseLinear,
    SparseLSTM,
    SparseMultiheadAttention,
)
from msbp.nn.memory import gather_memory_state, load_memory_state, memory_state_dict

__version__ = "0.1.0"

__all__ = [
    "SparseBackpropConfig",
    "SparseConv1d",
    "SparseConv2d",
    "SparseLSTM",
    "SparseLinear",
    "SparseMultiheadAttention",
    "amp",
    "dense_backward",
    "densify",
    "distributed",
    "functional",
    "gather_memory_state",
    "load_memory_state",
    "memory_state_dict",
    "native",
    "ops",
    "optim",
    "sparsify",
    "__version__",
]
