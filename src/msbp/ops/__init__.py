"""Operators: selection, the sparse linear op, the recurrence, and the plain-PyTorch reference."""

from msbp.ops import reference, selection
from msbp.ops.sparse_linear import BackwardPlan, SparseLinearFunction

__all__ = ["BackwardPlan", "SparseLinearFunction", "reference", "selection"]
