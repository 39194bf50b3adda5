"""Which rows of a weight's gradient a sparse backward wrote: the log a row-sparse optimizer reads.

Lives in ``ops`` (the layer that writes it) so that ``ops`` never imports ``optim``.

The log is a list on the Parameter (``weight.__dict__[ROWS_LOG]``): one entry per backward, the
row indices it wrote (a 1-D int64 tensor of distinct rows) or None when it wrote every row; the
C++ fast path of the sparse layers marks a uint8 row mask instead (``ROWS_MASK``). The optimizer
that asked for it (``TRACK_ROWS``) takes both at every step: as a list (``take_touched_rows``),
or as the mask with the list folded in (``touched_mask``), which its native step consumes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from msbp import native
from msbp.ops.transient import TransientTuple

#: attribute on a Parameter: a weak reference to the optimizer that wants the touched rows
#: recorded (any callable returning a live object works; the log stops when it returns None)
TRACK_ROWS = "_msbp_track_rows"
#: attribute on a Parameter: row indices (or None = all rows) touched since the last step
ROWS_LOG = "_msbp_rows"
#: attribute on a Parameter: the backward pass (graph task id) that last appended to its log
ROWS_TASK = "_msbp_rows_task"

#: attribute on a Parameter: a uint8 (out,) mask of the rows touched since the last take, which
#: the C++ fast path of SparseLinear marks (it cannot append to a Python list)
ROWS_MASK = "_msbp_row_mask"

#: attribute on a Parameter: True once a sparse layer's forward ran on it for a tracking
#: optimizer, on the paths that make no row mask (the PyTorch autograd glue, the LSTM's recurrent
#: weight, convolutions), so that it is known as a sparse layer's weight before any row is
#: logged, as the mask makes it known on the C++ path (see ``note_sparse_weight``)
SPARSE_WEIGHT = "_msbp_sparse_weight"

#: attribute on a Parameter: another module that logs no rows also writes its gradient (weight
#: tying; set by ``SparseLinear`` with ``weight_tied``): a row-sparse optimizer steps it whole
WEIGHT_TIED = "_msbp_weight_tied"

# Entries kept before the log is folded into one: bounds its size if nobody takes it for a
# while (e.g. many backward passes between two steps).
_FOLD_AT = 64


def tracked(weight: Tensor) -> bool:
    """Whether a live optimizer wants ``weight``'s touched rows."""
    owner = weight.__dict__.get(TRACK_ROWS)
    return owner is not None and owner() is not None


def row_block_of(weight: Tensor) -> tuple[Tensor, int] | None:
    """``(param, offset)`` where ``weight`` (out, in) is the contiguous block of rows
    ``[offset, offset + out)`` of a leaf ``param`` that requires grad (attention's
    ``in_proj_weight[i * E:(i + 1) * E]``), so that its rows are ``param``'s to log and to add
    into ``param.grad``; None for any other tensor (a Parameter itself, a transposed view)."""
    base = weight._base
    if base is None or not (base.is_leaf and base.requires_grad) or base.dim() != 2:
        return None
    if not (base.is_contiguous() and weight.is_contiguous()) or base.shape[1] != weight.shape[1]:
        return None
    delta = weight.storage_offset() - base.storage_offset()
    stride = max(base.stride(0), 1)
    if delta < 0 or delta % stride or delta // stride + weight.shape[0] > base.shape[0]:
        return None
    return base, delta // stride


def rows_mask(weight: Tensor) -> Tensor | None:
    """The mask the fast path marks, made on first use, or None if nobody tracks ``weight``."""
    if not tracked(weight):
        return None
    mask = weight.__dict__.get(ROWS_MASK)
    if mask is None or mask.device != weight.device or mask.numel() != weight.shape[0]:
        mask = weight.__dict__[ROWS_MASK] = torch.zeros(
            weight.shape[0], dtype=torch.uint8, device=weight.device
        )
    return mask


def note_sparse_weight(weight: Tensor) -> None:
    """For the forwards of the sparse layers that make no row mask (the PyTorch glue, the LSTM's
    recurrent weight, convolutions), where an optimizer tracks the rows of ``weight`` (or of the
    Parameter it is a block of rows of): mark it as a sparse layer's weight, whose rows take a
    step only where logged, so that a gradient nobody logged (a penalty only, left from an
    earlier step) is judged as such on every path alike (the C++ path's row mask says the same);
    and, where its ``.grad`` is None, forget the rows of a discarded gradient
    (``forget_touched_rows``), as the C++ path's forward does. Nothing under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return
    param = _tracked_owner(weight)
    if param is None:
        return
    state = param.__dict__
    if SPARSE_WEIGHT not in state:
        state[SPARSE_WEIGHT] = True
    if param.grad is None:
        forget_touched_rows(param)


def _tracked_owner(weight: Tensor) -> Tensor | None:
    """The Parameter whose rows ``weight``'s backward logs (itself, or the one it is a block of
    rows of), where a row-sparse optimizer tracks it; else None."""
    block = row_block_of(weight)
    param = weight if block is None else block[0]
    return param if tracked(param) else None


def note_dense_call(*weights: Tensor | None) -> None:
    """For the forward of a sparse layer that computes densely (inside ``msbp.dense_backward``),
    whose backward logs no rows: forget the rows logged into a discarded gradient of each
    weight, where its ``.grad`` is None or all zero (``zero_grad`` of the model, either way),
    as the layer's sparse forward and backward do. A stale log (the rows of a backward whose
    gradient ``model.zero_grad()`` threw away; no rows at all after an empty batch) otherwise
    stood for the dense gradient at the next ``LazyRowAdam`` step, which then stepped those
    rows only, or none."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    for weight in weights:
        if weight is None or not weight.requires_grad:
            continue
        param = _tracked_owner(weight)
        if param is None:
            continue
        state = param.__dict__
        if ROWS_LOG not in state and ROWS_MASK not in state:
            continue
        grad = param.grad
        if grad is None or (grad.layout == torch.strided and not bool(grad.any())):
            forget_touched_rows(param)


def log_touched_rows(weight: Tensor, rows: Tensor | None) -> None:
    """Record that a backward pass wrote ``rows`` (r,) of ``weight.grad`` (None: every row).

    Called by the sparse layers' backward; a no-op unless a live optimizer asked for it.
    """
    owner = weight.__dict__.get(TRACK_ROWS)
    if owner is None or owner() is None or not _accumulates(weight):
        return
    log = weight.__dict__.setdefault(ROWS_LOG, [])
    log.append(rows)
    # transient: a saved or copied model must not carry a pass id another process may reuse
    weight.__dict__[ROWS_TASK] = TransientTuple((graph_task_id(),))
    if len(log) >= _FOLD_AT:
        log[:] = [fold_rows(log)]


def log_weight_rows(weight: Tensor, rows: Tensor | None) -> None:
    """``log_touched_rows`` for a layer's weight: into the Parameter it is a block of rows of
    (``row_block_of``), shifted to that block, if it is one (rows None: the whole block)."""
    block = row_block_of(weight)
    param, offset = (weight, 0) if block is None else block
    if param.__dict__.get(TRACK_ROWS) is not None and param.is_leaf and param.grad is None and (
        _accumulates(param)
    ):
        # this backward starts a new gradient (autograd writes .grad after the layer's calls;
        # prepare_grad_buffer did this where it put a buffer back): the rows logged into the
        # discarded one go
        forget_touched_rows(param)
    if block is None:
        log_touched_rows(weight, rows)
        return
    if rows is None:
        rows = torch.arange(weight.shape[0], device=param.device)
    log_touched_rows(param, rows + offset if offset else rows)


def _accumulates(weight: Tensor) -> bool:
    # whether this backward pass runs the weight's AccumulateGrad node, i.e. writes .grad: not
    # torch.autograd.grad(..., inputs=[x]), whose rows would otherwise be stepped on a gradient
    # never written
    if not (weight.is_leaf and weight.requires_grad) or graph_task_id() < 0:
        return True  # no node of its own, or not in a backward pass (a caller's own log)
    try:
        node = torch.autograd.graph.get_gradient_edge(weight).node
    except AttributeError:  # a torch without it: log, as before
        return True
    return engine_runs(node)


def engine_runs(node) -> bool:
    """Whether the running backward pass executes autograd ``node`` (a weight's AccumulateGrad:
    whether it adds into ``.grad``); False under ``torch.autograd.grad``, which captures."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # torch.autograd.grad(): the gradient is captured, not accumulated
        return False


#: the id of the backward pass running in this thread, -1 outside one (private in torch 2.x;
#: absent: 0, taken as inside a backward pass, the only place the layers log)
graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: 0)
_TASK_IDS = hasattr(torch._C, "_current_graph_task_id")


def _logged_in_this_pass(state: dict) -> bool:
    task = graph_task_id()
    mark = state.get(ROWS_TASK)
    return _TASK_IDS and task >= 0 and mark is not None and mark[0] == task and bool(
        state.get(ROWS_LOG)
    )


def fold_rows(log: list[Tensor | None]) -> Tensor | None:
    """The distinct rows (sorted, int64) of a non-empty log, or None if an entry says all rows."""
    if any(r is None for r in log):
        return None
    if len(log) == 1:
        return log[0]
    return torch.unique(torch.cat(log))


def pending_rows(weight: Tensor) -> list[Tensor | None]:
    """What ``take_touched_rows`` would return now, without taking it."""
    log = list(weight.__dict__.get(ROWS_LOG) or [])
    mask = weight.__dict__.get(ROWS_MASK)
    if mask is not None and bool(mask.any()):
        log.append(mask.nonzero().flatten())
    return log


def forget_touched_rows(weight: Tensor) -> None:
    """Forget the rows logged or marked into a gradient of ``weight`` since discarded: a
    backward or a forward of a sparse layer found its ``.grad`` None (set so by ``zero_grad`` of
    the model or the optimizer, or by hand, with no optimizer step in between), so those rows
    take no step, also where no backward of the layer comes later (a forward whose loss is a
    penalty on the weight alone). What the running backward pass logged (the list) or marked
    (the C++ path's mask) stays, each judged by itself: another call of the weight (or of
    another block of its rows) ran first in this pass, and autograd writes ``.grad`` only after
    all of them (the C++ call handed its dW to autograd: a hook on the weight); or a forward
    runs inside the pass (activation checkpointing)."""
    state = weight.__dict__
    if ROWS_LOG in state and not _logged_in_this_pass(state):
        del state[ROWS_LOG]
    mask = state.get(ROWS_MASK)
    if mask is not None and not _marked_in_this_pass(mask):
        mask.zero_()


def _marked_in_this_pass(mask: Tensor) -> bool:
    """Whether the C++ path marked ``mask`` in the backward pass running now (it keeps that
    record itself)."""
    module = native.eager_module() if native.use_native() else None
    return module is not None and bool(module.mask_marked_in_this_pass(mask))


def take_touched_rows(weight: Tensor) -> list[Tensor | None]:
    """Remove and return ``weight``'s log (empty if nothing was logged since the last take),
    the rows marked in its mask included."""
    log = weight.__dict__.pop(ROWS_LOG, None) or []
    mask = weight.__dict__.get(ROWS_MASK)
    if mask is not None and bool(mask.any()):
        log.append(mask.nonzero().flatten())
        mask.zero_()
    return log


def touched_mask(weight: Tensor) -> Tensor | None:
    """``weight``'s uint8 (out,) row mask with its row log folded in (the log is emptied), or
    None if neither exists. The caller consumes it: the rows are the set entries, and whoever
    takes them clears it (the native optimizer step does so in the same pass)."""
    state = weight.__dict__
    log = state.pop(ROWS_LOG, None)
    mask = state.get(ROWS_MASK)
    if mask is not None and (mask.device != weight.device or mask.numel() != weight.shape[0]):
        # the weight moved (its marks move with it) or was resized (they mean nothing now)
        if mask.numel() == weight.shape[0]:
            mask = mask.to(weight.device)
        else:
            mask = torch.zeros(weight.shape[0], dtype=torch.uint8, device=weight.device)
        state[ROWS_MASK] = mask
    if not log:
        return mask
    if mask is None:
        mask = state[ROWS_MASK] = torch.zeros(
            weight.shape[0], dtype=torch.uint8, device=weight.device
        )
    rows = fold_rows(log)
    if rows is None:
        mask.fill_(1)
    else:
        mask.index_fill_(0, rows.to(mask.device), 1)
    return mask
