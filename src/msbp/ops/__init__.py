"""Operators: selection, the sparse linear op, the recurrence, and the plain-PyTorch reference."""

# sparse_linear_cuda: the sparse linear op's CUDA registration, made at import
from msbp.ops import reference, selection, sparse_linear_cuda  # noqa: F401
from msbp.ops.sparse_linear import BackwardPlan, SparseLinearFunction

__all__ = ["BackwardPlan", "SparseLinearFunction", "reference", "selection"]
