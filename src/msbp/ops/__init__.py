"""Operators: selection, the autograd function, and the plain-PyTorch reference."""

from msbp.ops import reference, selection
from msbp.ops.autograd import BackwardPlan, SparseLinearFunction

__all__ = ["BackwardPlan", "SparseLinearFunction", "reference", "selection"]
