"""Functional form of the sparse linear layer."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from msbp import native
from msbp.config import SparseBackpropConfig
from msbp.ops import scaling
from msbp.ops.sparse_linear import (
    _WIDE,
    NATIVE_SPARSE_RATIO,
    SELECTION_CODES,
    BackwardPlan,
    SparseLinearFunction,
    auto_keeps_sparse,
    buffer_listed_rows,
    record_buffer_clean,
)
from msbp.ops.touched_rows import (
    forget_touched_rows,
    note_sparse_weight,
    row_block_of,
    rows_mask,
)
from msbp.ops.transient import TransientTuple, first_item_held_elsewhere


def memory_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The memory's dtype for parameters of ``param_dtype``: float32, or float64 for float64."""
    return torch.promote_types(param_dtype, torch.float32)


def check_memory(memory: Tensor, out_features: int, layout: str, weight: Tensor) -> None:
    """Raise ``ValueError`` unless ``memory`` fits a layer with ``weight`` and ``layout``
    (``TypeError`` unless it is a tensor)."""
    if not isinstance(memory, Tensor):
        raise TypeError(f"memory must be a Tensor or None, got {type(memory).__name__}")
    if layout == "unit":
        ok_shape = tuple(memory.shape) == (out_features,)
        want = f"({out_features},)"
    else:
        ok_shape = memory.dim() == 2 and memory.shape[1] == out_features
        want = f"(rows, {out_features})"
    if not ok_shape:
        raise ValueError(
            f"memory of shape {tuple(memory.shape)} does not fit memory_layout={layout!r} "
            f"with out_features={out_features}: expected {want}"
        )
    if memory.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"memory must be float32 or float64, got {memory.dtype}")
    if memory.device != weight.device:
        raise ValueError(f"memory is on {memory.device} but weight is on {weight.device}")
    if memory.requires_grad:
        raise ValueError("memory must not require grad")
    if not (memory.is_contiguous() or torch.compiler.is_compiling()) and _self_overlapping(
        memory
    ):
        # an expand()ed memory failed only in backward, at the in-place update ("more than one
        # element of the written-to tensor refers to a single memory location"), and one
        # as_strided over itself (strides (1, 1)) was written over itself without an error
        raise ValueError(
            f"memory of shape {tuple(memory.shape)} and strides {memory.stride()} has elements "
            "that share storage (an expand() or as_strided view), but the backward updates it "
            "in place: pass a tensor of its own (memory.clone())"
        )


def _self_overlapping(t: Tensor) -> bool:
    """Whether elements of ``t`` may share storage, from its sizes and strides: dimensions by
    ascending stride, each stride must pass the largest offset the smaller ones reach (so a
    transposed or sliced view is not; an expand()ed one, stride 0, is)."""
    if t.numel() == 0:
        return False
    extent = 0
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    for stride, size in dims:
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def check_bias(bias: Tensor | None, weight: Tensor) -> None:
    """Raise ``ValueError`` unless ``bias`` is None or of shape (out,) for ``weight`` (out, in)."""
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not match weight of shape "
            f"{tuple(weight.shape)}: expected ({weight.shape[0]},)"
        )


def backward_recorded() -> bool:
    """Whether autograd records what runs now, so that a sparse backward may follow: grad mode
    on, and not under ``torch.jit.trace`` or ``torch.export``, whose graphs cannot hold msbp's
    backward and its memory (a trace recorded the C++ path differently from one call to the
    next and failed its check; an exported LSTM held the PyTorch recurrence instead of
    ``aten.lstm``, and failed when called with grad); the forward is exact either way."""
    return torch.is_grad_enabled() and not (torch.jit.is_tracing() or _exporting())


_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _label(unnamed: str, name: str, kind: str) -> str:
    """A layer as an error message names it: ``f"{kind} {name!r}"``, or ``unnamed``."""
    return f"{kind} {name!r}" if name else unnamed


def check_no_functorch(unnamed: str, name: str = "", kind: str = "sparse layer") -> None:
    """Raise ``RuntimeError`` inside a ``torch.func`` transform (grad, vmap, jacrev,
    functional_call under grad, ...): the memory is state updated in place by the backward
    pass, which a functional transform can neither see nor replay. The message names the layer
    ``f"{kind} {name!r}"``, or ``unnamed`` without a name: made only when it raises, since a
    name read by traced code is a guard (torch.compile recompiled a layer's forward for each
    layer name, and past 8 ran the rest eagerly)."""
    if torch.compiler.is_compiling():  # dynamo traces through; functorch is not in play there
        return
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"msbp: {_label(unnamed, name, kind)} does not support torch.func transforms (grad, "
            "vmap, jacrev, functional_call under grad, ...): its backward updates the layer "
            "memory in place. Use ordinary autograd (loss.backward() or torch.autograd.grad), "
            "or msbp.densify() the model first for torch.func"
        )


def check_not_distributed_tensor(
    tensors: tuple[Tensor | None, ...], unnamed: str, name: str = "", kind: str = "sparse layer"
) -> None:
    """Raise ``ValueError`` for a ``DTensor`` among ``tensors`` (tensor parallelism:
    ``parallelize_module``), which the sparse backward ops have no sharding rule for: it failed
    inside the backward with "Operator msbp.sparse_linear_backward.default does not have a
    sharding strategy registered". (FSDP's forward sees plain, unsharded tensors.)"""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return
    for t in tensors:
        if isinstance(t, module.DTensor):
            raise ValueError(
                f"msbp: {_label(unnamed, name, kind)} got a DTensor of shape {tuple(t.shape)} "
                f"placed {tuple(t.placements)}: tensor parallelism (parallelize_module) is not "
                "supported by sparse layers (top-k over a sharded output dimension). Leave "
                "such layers out of sparsify (exclude=...) or msbp.densify them; FSDP "
                "(fully_shard) and DDP work"
            )


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    memory: Tensor | None = None,
    *,
    config: SparseBackpropConfig,
    generator: torch.Generator | None = None,
    name: str = "",
    probe: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """``y = x W^T + b`` whose backward is sparse backprop with memory (MSBP).

    x: (*, in); weight: (out, in); bias: (out,) or None; memory: (out,) float32 for
    ``memory_layout="unit"``, (rows, out) for ``"slot"``, updated in place by each backward pass;
    ``None`` means no memory (plain sparse backprop, whatever ``config.memory`` says).
    Returns y: (*, out). The forward pass is exact; only the backward is sparsified. Under a
    ``torch.func`` transform it raises ``RuntimeError`` when a gradient is wanted (use
    ``loss.backward()`` or ``torch.autograd.grad``).
    ``probe(g, x, propagated)``, if given, is called in the backward with the raw output gradient
    g (n, out), the input x (n, in) and the propagated part (n, out), to measure information loss.

    Example:
        >>> cfg = SparseBackpropConfig(k=2, memory=0.8)
        >>> w = torch.randn(8, 4, requires_grad=True)
        >>> mem = torch.zeros(8)
        >>> sparse_linear(torch.randn(3, 4), w, memory=mem, config=cfg).sum().backward()
        >>> int((w.grad.abs().sum(1) > 0).sum())
        2
    """
    return sparse_linear_checked(x, weight, bias, memory, config, generator, name, probe)[0]


def sparse_linear_checked(
    x: Tensor, weight: Tensor, bias: Tensor | None, memory: Tensor | None,
    config: SparseBackpropConfig, generator: torch.Generator | None, name: str,
    probe: Callable[[Tensor, Tensor, Tensor], None] | None,
) -> tuple[Tensor, tuple | None]:
    """``sparse_linear``'s result (same arguments, all given), and the settings with which a
    later call with the same weight, bias, memory, config and name may take the short path
    (``sparse_linear_fast_call``; the caller keeps them, and drops them when any of those
    objects changes), or None where later calls need every check again (the PyTorch path,
    ``backend="auto"``, a probe, a slot memory, whose rows follow the batch)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not match weight of shape "
            f"{tuple(weight.shape)}: the last input dimension must be {in_features}"
        )
    check_bias(bias, weight)
    if memory is not None:
        check_memory(memory, out_features, config.memory_layout, weight)
    if not (backward_recorded() and _wants_grad(x, weight, bias)):
        return F.linear(x, weight, bias), None
    check_no_functorch("sparse_linear", name)
    check_not_distributed_tensor((x, weight), "sparse_linear", name)
    run = config
    if config.backend == "auto" and probe is None and not torch.compiler.is_compiling():
        if not auto_keeps_sparse(x, weight, memory, config):
            # dense is faster here: k = out, which flushes what the memory holds; with nothing
            # remembered that is exactly the plain layer
            if memory is None or not bool(memory.any()):
                return F.linear(x, weight, bias), None
            run = _dense_twin(config)
    if probe is None and _fast_path_ok(x, weight, memory, run):
        settings = _call_settings(run, out_features, name)
        y = native.eager_ops().sparse_linear_fast(x, *_fast_args(weight, bias, memory, settings))
        repeatable = config.backend == "sparse" and not (
            memory is not None and config.memory_layout == "slot"
        )
        return y, settings if repeatable else None
    plan = make_plan(run, out_features, generator=generator, name=name, probe=probe)
    note_sparse_weight(weight)  # the C++ path's row mask does this there
    return SparseLinearFunction.apply(x, weight, bias, memory, plan), None


def _wants_grad(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)


@functools.lru_cache(maxsize=64)
def _dense_twin(config: SparseBackpropConfig) -> SparseBackpropConfig:
    return config.replace(k=0, ratio=None, backend="sparse")  # k = 0: every unit kept


_FAST_BUFFER = "_msbp_kept_grad_buffer"


def kept_grad_buffer(weight: Tensor) -> tuple[Tensor, Tensor, np.ndarray]:
    """``(buffer, state, state.numpy())`` for ``msbp::sparse_linear_fast`` and
    ``msbp::place_grad_rows_``: the gradient buffer the C++ path puts back as ``.grad`` when that
    is None (an empty tensor: none), and its int64 state (out + 2,) [rows written (-1: unknown),
    the buffer's version after that, the rows...], with a NumPy view of it for cheap reads.
    Callers must not hold the buffer past their backward."""

    def state() -> tuple[Tensor, np.ndarray]:
        st = torch.full((weight.shape[0] + 2,), -1, dtype=torch.long)
        return st, st.numpy()

    if not (weight.is_leaf and weight.requires_grad):
        # no .grad of its own (a view such as GPT-2's W^T.t(); a block of a Parameter's rows
        # comes here as that Parameter, see _fast_args): autograd gets dW
        return TransientTuple((weight.new_empty(0), *state()))
    kept = weight.__dict__.get(_FAST_BUFFER)
    if kept is not None and kept[0].numel() and (
        kept[0].dtype != weight.dtype or kept[0].device != weight.device
    ):
        # kept from before a .to() that converted .grad, a tensor other than this buffer at
        # the time (a gradient autograd made: a functional_call, a hook on the weight): the
        # C++ path put it back as .grad of the converted weight, which failed in backward
        # ("expected scalar type Float but found Double") or left a float64 .grad
        kept = weight.__dict__[_FAST_BUFFER] = TransientTuple((weight.new_empty(0), *kept[1:]))
    if weight.grad is None:
        forget_touched_rows(weight)
        # put back last step's buffer if nobody else holds it, else a new one
        if kept is None or first_item_held_elsewhere(kept) or kept[0].shape != weight.shape or (
            kept[0].dtype != weight.dtype
        ):
            # one state per weight, shared with the buffers before: a graph not yet run
            # backward may still add rows through an earlier one (see remember_rows)
            if kept is not None and kept[1].shape[0] == weight.shape[0] + 2:
                kept[1].fill_(-1)
                st = kept[1:]
            else:
                st = state()
            kept = weight.__dict__[_FAST_BUFFER] = TransientTuple((torch.zeros_like(weight), *st))
    elif kept is None:  # .grad exists: the C++ path adds into it, no buffer needed
        kept = weight.__dict__[_FAST_BUFFER] = TransientTuple((weight.new_empty(0), *state()))
    return kept


def kept_if_listed(weight: Tensor, grad: Tensor) -> tuple | None:
    """The C++ path's record of ``weight`` (``kept_grad_buffer``'s tuple), where ``grad`` is its
    buffer and its state lists every row written into it since it was clean; else None."""
    kept = weight.__dict__.get(_FAST_BUFFER)
    if kept is not None and kept[0] is grad:
        view = kept[2]
        if view[0] >= 0 and view[1] == grad._version:
            return kept
    return None


def grad_rows_listed(weight: Tensor, grad: Tensor) -> bool:
    """Whether all that went into ``grad`` (``weight``'s gradient) since it was last recorded
    clean were rows the sparse layers listed, by their records (either backend's): False where
    anything else may have written into it (a gradient autograd summed with the rows, an
    in-place change, a write the layers never saw) or nobody kept a record."""
    return kept_if_listed(weight, grad) is not None or (
        buffer_listed_rows(weight, grad) is not None
    )


def listed_grad_rows(weight: Tensor, grad: Tensor) -> Tensor | None:
    """The rows (int64 (r,), possibly repeated) that the records of ``grad_rows_listed`` list
    as written into ``grad`` since it was recorded clean; None where it says False."""
    kept = kept_if_listed(weight, grad)
    if kept is not None:
        return kept[1][2 : 2 + int(kept[2][0])]
    return buffer_listed_rows(weight, grad)


def record_grad_clean(weight: Tensor, grad: Tensor) -> None:
    """Record ``grad``, just zeroed and kept as ``weight``'s ``.grad`` (``LazyRowAdam``), as
    holding no rows at its version, for both backends: the rows the layers add next are listed
    from here, and it is the buffer they put back."""
    kept = weight.__dict__.get(_FAST_BUFFER)
    if kept is not None and len(kept[2]) == weight.shape[0] + 2:
        if kept[0] is not grad:
            kept = weight.__dict__[_FAST_BUFFER] = TransientTuple((grad, kept[1], kept[2]))
        view = kept[2]
        view[0] = 0
        view[1] = grad._version
    record_buffer_clean(weight, grad, if_recorded=True)


_DIST = dist.is_available()


def _fast_path_ok(x: Tensor, weight: Tensor, memory: Tensor | None, config) -> bool:
    """Whether the C++ autograd function (``msbp::sparse_linear_fast``) is exactly
    ``SparseLinearFunction`` here: eager CPU, no autocast, no scaler, no torch.distributed.
    (Asked at every call: each check in its cheapest form, ``x.is_cpu`` not ``x.device``.)"""
    if not _cpu_wide(x, weight):
        return False
    if config.selection == "random" or not config.grad_inplace:
        return False
    if memory is not None and not memory.is_contiguous():
        return False  # a strided view (functional API): the PyTorch glue copies it for the op
    if memory is not None and config.memory_layout == "slot" and (
        memory.shape[0] != x.numel() // max(x.shape[-1], 1)
    ):
        return False  # a new batch shape: the PyTorch glue spreads the memory first
    return _fast_now()


def _cpu_wide(x: Tensor, weight: Tensor) -> bool:
    # the weight's dtype and device too: .to() / .bfloat16() convert a Parameter in place
    return x.is_cpu and weight.is_cpu and x.dtype is weight.dtype and x.dtype in _WIDE


def _fast_now() -> bool:
    """The conditions of the C++ path that are no tensor's: eager, no autocast, no gradient
    scaler, no torch.distributed, no TorchDispatchMode, the kernels loaded."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_tracing():
        # a mode (FlopCounterMode, a memory tracker, FakeTensorMode) must see the products: the
        # C++ autograd function computes below the dispatcher, the PyTorch glue through it;
        # torch.jit.trace records the plain forward (backward_recorded)
        return False
    if scaling.any_scaler() or (_DIST and dist.is_initialized()):
        return False
    return native.use_native()


def sparse_linear_fast_call(
    x: Tensor, weight: Tensor, bias: Tensor | None, memory: Tensor | None, settings: tuple
) -> Tensor | None:
    """``sparse_linear(x, weight, bias, memory, config=...)`` through the C++ path, for arguments
    that passed every check once with ``settings`` (``sparse_linear_checked``), checking only
    what may differ between calls: x, the weight's dtype and device, the grad mode and the
    global state. None where the full ``sparse_linear`` must run (it may raise, or take another
    path); the same result otherwise. (An 8 x 8 layer's call, all overhead: 16 us against 22
    checked, nn.Linear's 8; 10-20 us a layer less in an MNIST training step on the Xeon.)"""
    if torch._C._are_functorch_transforms_active() or not _fast_now():
        return None
    # the common case in C++: the buffer and mask read, not made (the lookups below cost the
    # MNIST loop's two sparse layers 28-31 us a step more: benchmarks/bench_train_loop.py)
    y = native.eager_module().sparse_linear_try(x, weight, bias, memory, settings)
    if y is not None:
        return y
    if not _cpu_wide(x, weight) or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return None
    if not (backward_recorded() and _wants_grad(x, weight, bias)):
        return None
    return native.eager_ops().sparse_linear_fast(x, *_fast_args(weight, bias, memory, settings))


@functools.lru_cache(maxsize=256)
def _fast_settings(config: SparseBackpropConfig, out_features: int) -> tuple:
    """The arguments of ``msbp::sparse_linear_fast`` that ``config`` fixes: k, selection, alpha,
    slot, skip_nonfinite, csr_ratio (then name, all_rows: see ``_call_settings``)."""
    return (
        config.k_for(out_features), SELECTION_CODES[config.selection], float(config.memory),
        config.memory_layout == "slot", config.on_nonfinite == "skip", NATIVE_SPARSE_RATIO,
    )


def _call_settings(config: SparseBackpropConfig, out_features: int, name: str) -> tuple:
    """The arguments of ``msbp::sparse_linear_fast`` after its tensors."""
    return _fast_settings(config, out_features) + (name, config.memory_rows == "all")


def _fast_args(weight, bias, memory, settings: tuple) -> tuple:
    """The arguments of ``msbp::sparse_linear_fast`` after its input, from ``_call_settings``:
    the buffer, state and row mask are those of the Parameter whose ``.grad`` gets the rows,
    the weight's own or, for a block of a Parameter's rows, the Parameter's (the owner)."""
    block = row_block_of(weight)
    owner = weight if block is None else block[0]
    kept = kept_grad_buffer(owner)
    return (weight, bias, memory, kept[0], kept[1], rows_mask(owner), *settings,
            None if block is None else owner)


def sparse_embedding_linear(
    ids: Tensor,
    table: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    memory: Tensor | None = None,
    *,
    config: SparseBackpropConfig,
    generator: torch.Generator | None = None,
    name: str = "",
    probe: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """``sparse_linear`` of ``F`` embedding rows side by side: ``y = flatten(table[ids]) W^T + b``.

    ids: (*, F) integer; table: (V, d); weight: (out, F d); bias, memory, config and the rest as
    in ``sparse_linear``. Returns y: (*, out). Equal to
    ``sparse_linear(F.embedding(ids, table).flatten(-2), weight, bias, memory, config=config)``,
    which it runs wherever the fused path does not apply. The fused path (native CPU kernels,
    ``backend="sparse"``) gives the table its gradient from the k-wide factors of dx (unified
    top-k: ``dx = U_S W_S``) without forming dx, (*, F d), and without a separate embedding
    backward: Chen & Manning's parser's input layer (48 features) spends most of its sparse
    backward there otherwise.
    """
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (rows, dim), got shape {tuple(table.shape)}")
    if ids.dim() < 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"ids must be int64 or int32 of shape (*, features), got {ids.dtype} of shape "
            f"{tuple(ids.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != ids.shape[-1] * table.shape[1]:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not fit ids of shape "
            f"{tuple(ids.shape)} and table of shape {tuple(table.shape)}: expected "
            f"(out, {ids.shape[-1] * table.shape[1]}), features x dim"
        )
    if _fused_embedding_ok(ids, table, weight, bias, memory, config, probe):
        check_bias(bias, weight)
        if memory is not None:
            check_memory(memory, weight.shape[0], config.memory_layout, weight)
        check_no_functorch("sparse_embedding_linear", name)
        check_not_distributed_tensor((table, weight), "sparse_embedding_linear", name)
        return native.eager_ops().sparse_embedding_linear_fast(
            ids.long(), table,
            *_fast_args(weight, bias, memory, _call_settings(config, weight.shape[0], name)),
        )
    x = F.embedding(ids, table).flatten(-2)
    return sparse_linear(
        x, weight, bias, memory, config=config, generator=generator, name=name, probe=probe
    )


def _fused_embedding_ok(ids, table, weight, bias, memory, config, probe) -> bool:
    if probe is not None or config.backend != "sparse" or not backward_recorded():
        return False
    if not (table.requires_grad or weight.requires_grad or (
        bias is not None and bias.requires_grad
    )):
        return False
    if ids.device != table.device or table.device != weight.device:
        return False
    if memory is not None and (not memory.is_contiguous() or (
        config.memory_layout == "slot"
        and (memory.dim() != 2 or memory.shape[0] != ids.numel() // max(ids.shape[-1], 1))
    )):
        return False
    return _fast_path_ok(table, weight, None, config)


def make_plan(
    config: SparseBackpropConfig,
    out_features: int,
    *,
    generator: torch.Generator | None = None,
    name: str = "",
    probe: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> BackwardPlan:
    """What the backward of a transform with ``out_features`` outputs does under ``config``."""
    if torch.compiler.is_compiling():  # traced once per graph; dynamo warns on lru_cache
        # without the name (it only labels errors): a name in the plan is a guard, and dynamo
        # compiled a layer's forward again for each layer, running those past 8 eagerly
        return _plan.__wrapped__(config, out_features, generator, "", probe)
    if generator is not None and not isinstance(generator, torch.Generator):
        # (read only by selection="random", in backward: randperm's TypeError came there)
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return _plan(config, out_features, generator, name, probe)


@functools.lru_cache(maxsize=256)
def _plan(config, out_features, generator, name, probe) -> BackwardPlan:
    # a layer asks for the same plan at every forward: built once (plans are immutable)
    return BackwardPlan(
        k=config.k_for(out_features),
        selection=config.selection,
        alpha=float(config.memory),
        layout=config.memory_layout,
        on_nonfinite=config.on_nonfinite,
        grad_inplace=config.grad_inplace,
        backend=config.backend,
        consensus=config.consensus,
        all_rows=config.memory_rows == "all",
        generator=generator,
        name=name,
        probe=probe,
    )
