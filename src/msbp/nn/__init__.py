"""Layers whose backward pass is sparse backprop with memory."""

from msbp.nn.attention import SparseMultiheadAttention
from msbp.nn.conv import SparseConv1d, SparseConv2d
from msbp.nn.hf_conv1d import SparseHFConv1D
from msbp.nn.linear import SparseLinear
from msbp.nn.lstm import SparseLSTM

__all__ = [
    "SparseConv1d", "SparseConv2d", "SparseHFConv1D", "SparseLSTM", "SparseLinear",
    "SparseMultiheadAttention",
]
