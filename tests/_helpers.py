"""Helpers shared by the tests: building layers, one training step, the reference oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from torch import Tensor

import msbp
from msbp import SparseBackpropConfig, SparseLinear
from msbp.ops.reference import sparse_linear_backward_ref

SELECTIONS = ("unified", "per_example", "random")
LAYOUTS = ("unit", "slot")
DTYPES = (torch.float32, torch.float64)


def tol(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances for comparing the fast path with the reference."""
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 1e-4, "atol": 1e-5}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_layer(
    d_in: int,
    d_out: int,
    config: SparseBackpropConfig,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    bias: bool = True,
) -> SparseLinear:
    """A SparseLinear with weights drawn from a seeded generator (no global RNG)."""
    layer = SparseLinear(d_in, d_out, bias=bias, config=config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=dtype))
        if bias:
            layer.bias.copy_(torch.randn(d_out, generator=gen, dtype=dtype))
    return layer


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype)


def fast_step(layer: SparseLinear, x: Tensor, grad_out: Tensor, *, fresh: bool = True):
    """Forward + backward of ``layer`` on a leaf copy of ``x``: returns (dx, dW, db)."""
    if fresh:
        layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    layer(x).backward(grad_out)
    db = layer.bias.grad.clone() if layer.bias is not None else None
    return x.grad, layer.weight.grad.clone(), db


def ref_step(
    config: SparseBackpropConfig,
    x: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    memory: Tensor | None,
    generator: torch.Generator | None = None,
):
    """The oracle for ``config``: returns (dx, dW, db, new_memory)."""
    out = weight.shape[0]
    return sparse_linear_backward_ref(
        x.detach(),
        weight.detach(),
        grad_out,
        memory,
        k=config.k_for(out),
        selection=config.selection,
        alpha=float(config.memory),
        layout=config.memory_layout,
        generator=generator,
        rows=config.memory_rows,
    )


def empty_memory_like(layer: SparseLinear) -> Tensor:
    """A fresh zero memory of the layer's layout and dtype (what the layer starts with)."""
    return (
        torch.zeros_like(layer.memory)
        if layer.config.memory_layout == "unit"
        else (torch.zeros(0, layer.out_features, dtype=layer.memory.dtype))
    )


def memory_colsum(memory: Tensor) -> Tensor:
    """The memory's column sums (out,): what either layout carries over to the next batch."""
    return memory if memory.dim() == 1 else memory.sum(0)


def assert_memory_matches(
    fast: Tensor, ref: Tensor, config: SparseBackpropConfig, out: int, **tolerance: float
) -> None:
    """The layer's memory equals the reference's (slot with k >= out: both all zero)."""
    assert fast.dtype == ref.dtype
    if config.memory_layout == "slot" and config.k_for(out) >= out:
        assert not fast.any() and not ref.any()
        return
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, **tolerance)


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_cfg(selection="unified", layout="unit", memory=0.8, k=2, **kw) -> SparseBackpropConfig:
    """A config with an absolute k (no ratio), the shape most tests want."""
    return SparseBackpropConfig(
        ratio=None, k=k, selection=selection, memory=memory, memory_layout=layout, **kw
    )


T = TypeVar("T")


def track_rows(weight: Tensor) -> None:
    """Have ``weight``'s touched rows logged, as a ``LazyRowAdam`` over it asks (for good)."""
    from msbp.ops.touched_rows import TRACK_ROWS

    weight.__dict__[TRACK_ROWS] = lambda: True  # the log is kept while this returns an object


def logged_rows(weight: Tensor) -> list[int]:
    """The distinct rows logged for ``weight`` since the last take (every row for an entry
    None), ascending."""
    from msbp.ops.touched_rows import pending_rows

    rows = pending_rows(weight)
    if any(r is None for r in rows):
        return list(range(weight.shape[0]))
    return sorted(set(torch.cat(rows).tolist())) if rows else []


def written_rows(weight: Tensor) -> list[int]:
    """The rows of ``weight.grad`` that are not all zero, ascending."""
    return (weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()


def on_both_backends(run: Callable[[], T]) -> list[T]:
    """[run() on the native kernels, run() on the PyTorch path]; skips without native kernels."""
    if not msbp.native.use_native():
        pytest.skip("native kernels unavailable")
    before = msbp.native._requested()
    out = []
    try:
        for backend in ("native", "python"):
            msbp.native.set_backend(backend)
            out.append(run())
    finally:
        msbp.native.set_backend(before)
    return out


def assert_steps_alike(native: list[dict[str, Tensor]], python: list[dict[str, Tensor]]) -> None:
    """Two runs' per-step records (gradients, memories, ...) equal to rounding, with some memory
    not empty at every step (else the comparison would not reach the memory)."""
    for step, (a, b) in enumerate(zip(native, python, strict=True)):
        assert a.keys() == b.keys()
        assert any(m.any() for k, m in a.items() if k.endswith("memory"))
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=1e-9, atol=1e-12,
                                       msg=f"step {step}: {key}")


def train_records(
    model: torch.nn.Module, loss_at: Callable[[int], Tensor], steps: int, optimizer
) -> list[dict[str, Tensor]]:
    """``steps`` steps of ``optimizer`` (a class, lr 1e-2, on the parameters that require grad)
    on ``loss_at(step)``; after each backward, every gradient and memory by name, and "loss"."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_at(step)
        loss.backward()
        state = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        state.update({n: m.clone() for n, m in msbp.memory_state_dict(model).items()})
        state["loss"] = loss.detach().clone()
        seen.append(state)
        opt.step()
    return seen


def assert_trains_as_dense(
    dense: torch.nn.Module, sparse: torch.nn.Module,
    want: list[dict[str, Tensor]], got: list[dict[str, Tensor]],
) -> None:
    """At k = out: ``sparse``'s per-step records (``train_records``) are ``dense``'s to 1e-12,
    its memories stay empty, and its parameters end where ``dense``'s do."""
    for w, g in zip(want, got, strict=True):
        assert set(w) <= set(g)
        for key, value in w.items():
            torch.testing.assert_close(g[key], value, rtol=1e-12, atol=1e-12, msg=key)
        assert all(not m.any() for k, m in g.items() if k.endswith("memory"))
    for (key, p), q in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12, msg=key)
