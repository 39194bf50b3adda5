"""Layers whose backward pass is sparse backprop with memory."""

from msbp.nn.linear import SparseLinear
from msbp.nn.lstm import SparseLSTM

__all__ = ["SparseLSTM", "SparseLinear"]
