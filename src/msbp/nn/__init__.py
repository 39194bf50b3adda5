"""Layers whose backward pass is sparse backprop with memory."""

from msbp.nn.linear import SparseLinear

__all__ = ["SparseLinear"]
