"""Optimizers that exploit row-sparse weight gradients.

With sparse backprop only k rows of a layer's ``dW`` are non-zero, but ``torch.optim.Adam`` still
reads and writes every weight, moment and gradient entry: on small models that is most of a
training step. ``LazyRowAdam`` updates only the rows a sparse layer touched (meProp's sparse
update; the "lazy" Adam of ``torch.optim.SparseAdam``): untouched rows keep their parameters and
moments, instead of drifting on stale momentum. ``LazyRowAdamW`` is the same with decoupled weight
decay (``torch.optim.AdamW``'s).
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.optim.optimizer as torch_optimizer
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as adam_functional
from torch.optim.adamw import adamw as adamw_functional

from msbp import native
from msbp.functional import (
    grad_rows_listed,
    kept_if_listed,
    listed_grad_rows,
    record_grad_clean,
)
from msbp.ops.touched_rows import (
    ROWS_LOG,
    ROWS_MASK,
    SPARSE_WEIGHT,
    TRACK_ROWS,
    WEIGHT_TIED,
    fold_rows,
    take_touched_rows,
    touched_mask,
)
from msbp.ops.transient import Listener, first_item_held_elsewhere

# A plan for a parameter in one step: skip it (it took no part: its state and value stay), the
# ordinary dense Adam step, or a Tensor of the rows to update.
_SKIP = "skip"
_DENSE = "dense"

_DIST = dist.is_available()
# Steps without a zero_grad after which zero_grad clears a whole gradient rather than a list of
# row sets (bounds that list when gradients are zeroed by other means, e.g. model.zero_grad()).
_DIRTY_MAX = 8
# "no mask" for the C++ zero_grad (a list entry cannot be None)
_NO_ROWS = torch.empty(0, dtype=torch.uint8)
# a log entry of no row (only read)
_NO_LOGGED_ROWS = torch.empty(0, dtype=torch.long)


def _row_sparse(p: Tensor, state: dict) -> bool:
    """Whether ``p`` is a sparse layer's weight, whose rows take a step only where logged: known
    from an earlier log, from the row mask, which only a sparse layer's C++ path makes (and
    which may have no row marked yet: per-example top-k of all-zero gradient rows marks none;
    the PyTorch path logs an empty entry then), or from the mark the other paths' forwards set
    (``SPARSE_WEIGHT``)."""
    own = p.__dict__
    if not state.get("row_sparse") and (ROWS_MASK in own or SPARSE_WEIGHT in own):
        state["row_sparse"] = True
    return bool(state.get("row_sparse"))


def _sparse_grad_error(p: Tensor) -> ValueError:
    return ValueError(
        f"LazyRowAdam does not take torch.sparse gradients (parameter of shape {tuple(p.shape)})"
    )


def _fused_ok(params: list[Tensor]) -> bool:
    # PyTorch's fused Adam needs floating tensors on one CPU or CUDA device
    device = params[0].device
    return device.type in ("cpu", "cuda") and all(
        p.device == device and p.is_floating_point() for p in params
    )


def _new_step(p: Tensor) -> Tensor:
    """A step counter as ``torch.optim.Adam`` keeps it: a float32 scalar on the parameter's
    device where the fused kernel runs (CPU, CUDA), else a CPU scalar."""
    if p.device.type in ("cpu", "cuda") and p.is_floating_point():
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.tensor(0.0, dtype=torch.get_default_dtype())


_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _native_rows_ok(p: Tensor, grad: Tensor, state: dict) -> bool:
    """Whether the C++ row step can take this CPU parameter (else the PyTorch path does)."""
    return (
        p.dtype in _NATIVE_DTYPES
        and grad.dtype == p.dtype
        and p.dim() >= 1
        and p.is_contiguous()
        and grad.is_contiguous()
        and state["exp_avg"].is_contiguous()
        and state["exp_avg_sq"].is_contiguous()
        and state["step"].is_cpu
    )


def _adam(group: dict, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
    """PyTorch's Adam on lists of tensors: its fused kernel called directly when the tensors
    share one CPU/CUDA device and dtype (what ``torch.optim.adam.adam(fused=True)`` runs after
    ~10 us of checks), else the functional form, fused where it can be."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    decoupled = group["decoupled_weight_decay"]
    # the fused kernels read a gradient as if laid out like its parameter (torch's own
    # Adam(fused=True) updates wrongly from a transposed one): such a gradient is copied
    grads = [
        g if g.stride() == p.stride() else torch.empty_strided(
            p.shape, p.stride(), dtype=g.dtype, device=g.device
        ).copy_(g)
        for p, g in zip(params, grads, strict=True)
    ]
    # nor the moments, which keep the layout their parameter had when they were made: a
    # parameter given other strides since (``p.data = p.data.t().contiguous().t()``) took
    # steps mixed across its elements; the unfused Adam indexes each tensor by its own strides
    laid_alike = all(
        m.stride() == p.stride() and v.stride() == p.stride()
        for p, m, v in zip(params, exp_avgs, exp_avg_sqs, strict=True)
    )
    first = params[0]
    if (
        laid_alike
        and first.device.type in ("cpu", "cuda")
        and first.is_floating_point()
        and not isinstance(lr, Tensor)
        and all(
            p.device == first.device and p.dtype == first.dtype and g.dtype == first.dtype
            and s.device == first.device
            for p, g, s in zip(params, grads, steps, strict=True)
        )
    ):
        torch._foreach_add_(steps, 1)
        fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
        fused(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr,
            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False,
            grad_scale=None, found_inf=None,
        )
        return
    # (torch >= 2.6 has decoupled_weight_decay in adam; adamw is in every torch msbp supports)
    (adamw_functional if decoupled else adam_functional)(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        fused=laid_alike and _fused_ok(params), amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
        weight_decay=weight_decay, eps=eps, maximize=False,
        has_complex=any(torch.is_complex(p) for p in params),
    )


# torch's registries of global step hooks (dicts it fills in place); None: not found in this
# torch, whose Optimizer then wraps step() as usual
_GLOBAL_STEP_HOOKS = (
    getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
    getattr(torch_optimizer, "_global_optimizer_post_hooks", None),
)
_profiler_enabled = torch._C._autograd._profiler_enabled


def _listened(opt: Optimizer) -> bool:
    """Whether a profiler or a step hook wants to see ``opt.step()``."""
    pre, post = _GLOBAL_STEP_HOOKS
    return bool(
        _profiler_enabled()
        or opt._optimizer_step_pre_hooks
        or opt._optimizer_step_post_hooks
        or pre
        or post
    )


def _hooks_when_listened(step: Callable) -> Callable:
    """``step`` wrapped as ``Optimizer`` wraps every step (a profiler range named
    ``Optimizer.step#<class>.step``, the step pre/post hooks), but only while a profiler or a
    hook listens. The range costs two dispatcher calls, about 30 us a step at MNIST size: as
    much as LazyRowAdam's whole CPU update of two 500-row layers. (A torch without this
    wrapper's parts gets ``step`` as it is, for Optimizer to wrap as usual.)"""
    make_full = getattr(Optimizer, "profile_hook_step", None)
    if make_full is None or None in _GLOBAL_STEP_HOOKS:
        return step
    full = make_full(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if _listened(self):
            return full(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()  # the profiler's python-tracing entry point, as in full
        return out

    wrapper.hooked = True  # type: ignore[attr-defined]  # Optimizer.__init__: leave it as is
    return wrapper


class _Track:
    """What the optimizer remembers of a sparse layer's weight between calls (not saved)."""

    __slots__ = ("grad_ref", "version", "dirty", "marked", "rows", "warned")

    def __init__(self) -> None:
        self.grad_ref: weakref.ref | None = None
        self.version = -1
        # The rows stepped since the last zero_grad, which zero_grad must clear: the native step
        # marks them in a uint8 (out,) mask (`marked`: it may hold some), the other paths list
        # them (None: all rows).
        self.dirty: Tensor | None = None
        self.marked = False
        self.rows: list[Tensor | None] = []
        self.warned = False

    def look(self, grad: Tensor | None) -> None:
        """Remember the gradient as it is now, to tell later whether anything wrote it."""
        if grad is None:
            self.grad_ref = None
            return
        if self.grad_ref is None or self.grad_ref() is not grad:
            self.grad_ref = weakref.ref(grad)
        self.version = grad._version

    def unchanged(self, grad: Tensor) -> bool:
        return (
            self.grad_ref is not None and self.grad_ref() is grad
            and self.version == grad._version
        )

    def dirty_mask(self, p: Tensor) -> Tensor:
        """The mask the native step marks, made on first use; one of another shape or device
        than ``p`` (or its gradient) is replaced, the rows it held listed."""
        dirty = self.dirty
        if dirty is None or dirty.numel() != p.shape[0] or dirty.device != p.device:
            if dirty is not None and self.marked:
                self.stepped(self.taken().to(p.device) if dirty.numel() == p.shape[0] else None)
            dirty = self.dirty = torch.zeros(p.shape[0], dtype=torch.uint8, device=p.device)
            self.marked = False
        return dirty

    def taken(self) -> Tensor:
        """The rows the mask holds, which it no longer does."""
        rows = self.dirty.nonzero().view(-1)
        self.dirty.zero_()
        self.marked = False
        return rows

    def stepped(self, rows: Tensor | None) -> None:
        """List ``rows`` (None: all) for the next zero_grad to clear."""
        if self.rows and self.rows[0] is None:
            return  # the whole gradient is to be cleared already
        if rows is None or len(self.rows) >= _DIRTY_MAX:
            self.rows = [None]
        else:
            self.rows.append(rows)


def _built_by_zero() -> bool:
    """Whether torch's ``ZeroRedundancyOptimizer`` is making this optimizer (a few frames up:
    this ``__init__``, a subclass's, ZeRO's ``_init_local_optimizer``): its local optimizer
    of one process's shard of the parameters."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if module is None:
        return False
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), module.ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def _warn_if_sharded(params: Iterable[Tensor]) -> None:
    """Say that parameters FSDP sharded (``fully_shard``: DTensors) take dense steps."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not any(isinstance(p, module.DTensor) for p in params):
        return
    warnings.warn(
        "LazyRowAdam: parameters sharded by FSDP (DTensor) take dense Adam steps, as by "
        "torch.optim.Adam: the sparse layers write the rows of FSDP's unsharded copies, which "
        "the optimizer of the shards does not see; DistributedDataParallel or "
        "ZeroRedundancyOptimizer keep the row-sparse step",
        RuntimeWarning,
        stacklevel=3,
    )


def _taken_log(p: Tensor) -> list[Tensor | None]:
    """``p``'s log of touched rows, taken; all rows for a weight another module also writes."""
    log = take_touched_rows(p)
    return [None] if WEIGHT_TIED in p.__dict__ else log


def _live_rows(grad: Tensor) -> Tensor:
    """(r,) bool: which rows of ``grad`` (r, ...) hold a non-zero entry (NaN counts; rows of
    width 0 do not)."""
    if not grad.numel():
        return torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
    return grad.reshape(grad.shape[0], -1).abs().amax(1) != 0  # (~30x faster than any here)


def _rows_with_gradient(p: Tensor, grad: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``rows`` (r,) of ``p`` and their gradient ``grad[rows]``, less the rows whose gradient is
    all zero, as the native step leaves them out: on the CPU, unless ``rows`` is every row (a
    dense backward, stepped whole as by torch's Adam); elsewhere telling would cost a sync."""
    grad_rows = grad.index_select(0, rows)  # (r, ...)
    if not p.is_cpu or rows.numel() == p.shape[0]:
        return rows, grad_rows
    live = _live_rows(grad_rows)
    if bool(live.all()):
        return rows, grad_rows
    return rows[live], grad_rows[live]


def _zero_whole(p: Tensor, grad: Tensor, set_to_none: bool) -> None:
    """What ``Optimizer.zero_grad`` does to one gradient."""
    if set_to_none:
        p.grad = None
        return
    if grad.grad_fn is not None:
        grad.detach_()
    else:
        grad.requires_grad_(False)
    grad.zero_()


class LazyRowAdam(Optimizer):
    """Adam that updates only the rows of a weight that sparse backprop touched.

    Weights of ``SparseLinear`` / ``SparseLSTM`` layers get a row-sparse ("lazy") Adam update on
    the rows their backward wrote since the last step, at the cost of those rows only (a C++
    kernel on the CPU, ``msbp.native``, which takes a parameter group's whole step in one call;
    PyTorch ops elsewhere or with ``MSBP_BACKEND=python``).
    Every other parameter (biases, dense layers, a step in which a sparse layer ran dense) gets
    PyTorch's ordinary (fused where possible) Adam step. The math is ``torch.optim.Adam``'s:
    weight decay is L2 added to the gradient, or with ``decoupled_weight_decay=True``
    (``LazyRowAdamW``) ``torch.optim.AdamW``'s decay of the parameter, so with every row touched
    at every step the two agree to rounding.

    The contract:

    - ``step()`` takes the log of touched rows, however the gradients were zeroed
      (``optimizer.zero_grad``, ``model.zero_grad``, ``set_to_none`` or not). Rows logged by a
      backward whose gradient was then discarded (a batch dropped, a step ``GradScaler``
      skipped) take no step when ``optimizer.zero_grad()`` discarded it, or when it was set to
      None (``model.zero_grad()``, ``p.grad = None``) before the next backward; zeroed in place
      by other means (``model.zero_grad(set_to_none=False)``) they take no step on the CPU,
      where a logged row whose gradient row is all zero never does unless every row was
      logged, as by a dense backward (top-k also fills up with zero-gradient units where fewer
      than k have a gradient, lowest index first on either backend), and a step with a zero
      gradient on other devices (telling would cost a device sync). Weight decay, like the rest
      of the update, reaches only the rows updated.
    - A sparse layer's weight with no rows logged since the last step took no part in it: it is
      not updated (its moments do not decay, it does not move, its step count stays), whether
      its ``.grad`` is None, zero, or left from an earlier step. If such a gradient was written
      by something that logs no rows (e.g. the layer was turned back into ``nn.Linear``) and is
      non-zero, the weight takes a dense step, with a warning.
    - Bias corrections use one step count per parameter, counting the steps that updated it, as
      ``torch.optim.SparseAdam`` does (not one per row): a row first touched at step t gets the
      bias correction of step t. ``state["step"]`` is kept as ``torch.optim.Adam`` keeps it
      (float32 on the parameter's device for fused Adam).
    - Under ``DistributedDataParallel`` (``torch.distributed`` initialised, more than one
      process) the rows to update are the union over processes, taken with one all-reduce of a
      row mask per step, so that every replica makes the same update of the averaged gradient.
      Set ``sync_rows=False`` if gradients are not all-reduced (independent models per process).
      As the optimizer of one process's shard under ``ZeroRedundancyOptimizer`` (its
      ``optimizer_class``), whose other processes log rows of other parameters, a sparse
      layer's weight steps its rows of non-zero (averaged) gradient instead: the same union.
    - ``zero_grad`` zeroes only the rows written since the last ``zero_grad`` and keeps the
      gradient buffers of sparse layers, so the next backward adds its k rows in place; all of
      such a gradient where the layers' records show that something else went into it too (a
      penalty on the weight in the loss, an in-place change); other gradients are zeroed as by
      ``Optimizer.zero_grad``.

    A weight that also gets gradient from a module that logs no rows (weight tying: a language
    model's head and its input embedding) is stepped and zeroed whole, as by
    ``torch.optim.Adam``: ``msbp.sparsify`` marks such a ``SparseLinear`` ``weight_tied``. Other
    gradients of a sparse layer's weight that come with its rows (a penalty on the weight in the
    loss, a tie ``sparsify`` cannot see such as ``F.linear(h, layer.weight.t())``, a
    ``p.grad.add_(...)`` by hand) reach the step only in the rows logged: use ``weight_decay``
    for L2 on the rows stepped, or set ``layer.weight_tied = True`` for whole steps.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.Adam``.
        lr, betas, eps, weight_decay: as ``torch.optim.Adam``.
        decoupled_weight_decay: decay the parameter by ``1 - lr * weight_decay`` before the
            update instead of adding L2 to the gradient (AdamW; as ``torch.optim.Adam``'s
            argument of that name); only the rows stepped decay.
        sync_rows: take the union of touched rows over processes when ``torch.distributed`` is
            initialised with more than one process.
        process_group: the group gradients are averaged over (default: the world).

    Example:
        >>> model = msbp.sparsify(nn.Sequential(nn.Linear(784, 500), nn.ReLU(),
        ...                                     nn.Linear(500, 10)), exclude="2")
        >>> opt = LazyRowAdam(model.parameters(), lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        sync_rows: bool = True,
        process_group: Any = None,
    ) -> None:
        # `not x >= 0`, not `x < 0`: NaN is rejected too (as torch.optim.Adam rejects it; it
        # was taken, and the first step made every stepped row NaN)
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got lr={lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got betas={betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got eps={eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay}")
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=bool(decoupled_weight_decay),
        ))
        native.prepare()  # build or load the row step now, not inside the first step()
        self.sync_rows = sync_rows
        self.process_group = process_group
        self._shard_of_zero = _built_by_zero()
        _warn_if_sharded(p for group in self.param_groups for p in group["params"])
        self._synced_shapes: tuple | None = None  # the parameters checked alike on every process
        self._tracks: dict[int, _Track] = {}  # by id() of a sparse layer's weight
        self._tag(p for group in self.param_groups for p in group["params"])

    def _tag(self, params: Iterable[Tensor]) -> None:
        """Ask the sparse layers to log the rows they write into these parameters' gradients."""
        me = Listener(self)  # pickles as a listener to nobody: torch.save(model) works
        for p in params:
            setattr(p, TRACK_ROWS, me)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_tracks"):  # called after __init__: tag the new parameters too
            self._tag(self.param_groups[-1]["params"])
            _warn_if_sharded(self.param_groups[-1]["params"])

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = _new_step(p)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _track(self, p: Tensor) -> _Track:
        track = self._tracks.get(id(p))
        if track is None:
            track = self._tracks[id(p)] = _Track()
        return track

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer pickles its defaults, state and param_groups only; sync_rows is an option
        # too (a process group does not pickle: a copy takes the default one)
        return {**super().__getstate__(), "sync_rows": self.sync_rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a state saved before the option existed
            group.setdefault("decoupled_weight_decay", False)
        # a copy (copy.deepcopy, torch.save of the optimizer) had lost what __init__ sets beside
        # the state, and its parameters' tags pickle as listeners to nobody, so that the sparse
        # layers logged no rows for it: its first step raised AttributeError on _tracks.
        # (Optimizer.load_state_dict calls this too, on a live optimizer: what it has stays.)
        self.__dict__.setdefault("sync_rows", True)
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("_tracks", {})
        self.__dict__.setdefault("_shard_of_zero", False)
        self.__dict__.setdefault("_synced_shapes", None)
        self._tag(p for group in self.param_groups for p in group["params"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._tracks.clear()
        # Optimizer.load_state_dict leaves step counts on the CPU; fused Adam wants them where
        # _new_step puts them
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and isinstance(state.get("step"), Tensor):
                    like = _new_step(p)
                    state["step"] = state["step"].to(device=like.device, dtype=like.dtype)

    # -- which rows --------------------------------------------------------------------------

    def _untouched(self, p: Tensor, grad: Tensor, track: _Track, trust_seen: bool) -> bool:
        """Whether a sparse layer's weight with no rows logged took no part in this step."""
        if trust_seen and track.unchanged(grad):
            return True  # not written since this optimizer last looked: left from before
        if not bool(grad.any()):  # zeroed (e.g. model.zero_grad(set_to_none=False)), not run
            return True
        if not track.warned:
            track.warned = True
            warnings.warn(
                f"LazyRowAdam: the gradient of a sparse layer's weight (shape {tuple(p.shape)}) "
                "was written without a log of its rows (by something other than the layer: a "
                "penalty on the weight in the loss, a module tied to it, or the layer converted "
                "back to a dense one); it takes a dense Adam step",
                RuntimeWarning,
                stacklevel=4,
            )
        return False

    def _plan_local(self, p: Tensor, grad: Tensor, state: dict, log: list) -> str | Tensor:
        """What ``p`` does in this step, from this process's log alone."""
        if WEIGHT_TIED in p.__dict__:
            return _DENSE
        if log:
            state["row_sparse"] = True
            rows = fold_rows(log)
            if rows is None:
                return _DENSE
            return rows if rows.numel() else _SKIP
        if _row_sparse(p, state):
            return _SKIP if self._untouched(p, grad, self._track(p), trust_seen=True) else _DENSE
        return _DENSE

    def _sync_group(self) -> Any:
        """The process group to take the union of rows over, or None."""
        if not self.sync_rows or not (_DIST and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _plan_synced(self, params: list[Tensor], logs: list[list], group: Any) -> list:
        """What each parameter does in this step, with rows united over the processes of
        ``group``: one all-reduce (MAX) of a uint8 mask over the rows of every parameter."""
        device = torch.device("cpu")
        if "nccl" in str(dist.get_backend(group)).lower():
            device = torch.device("cuda", torch.cuda.current_device())
        self._check_same_parameters(params, group)
        sizes = [p.shape[0] if p.dim() >= 1 else 0 for p in params]
        # the rows of every parameter, then a flag each: whether some process knows it as a
        # sparse layer's weight (a log, even of no row, or its mask), so that every process
        # decides alike where no row was logged anywhere
        mask = torch.zeros(sum(sizes) + len(params), dtype=torch.uint8, device=device)
        parts = mask[: sum(sizes)].split(sizes)
        known = [
            bool(log) or _row_sparse(p, self.state.get(p, {}))
            for p, log in zip(params, logs, strict=True)
        ]
        mask[sum(sizes) :] = torch.tensor(known, dtype=torch.uint8)
        for log, part in zip(logs, parts, strict=True):
            if log and part.numel():
                rows = fold_rows(log)
                if rows is None:
                    part.fill_(1)
                else:
                    part.index_fill_(0, rows.to(device), 1)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
        counts = torch.stack([part.sum() for part in parts]).tolist() if parts else []
        sparse_anywhere = mask[sum(sizes) :].tolist()
        plans: list[str | Tensor] = []
        for p, part, count, flag in zip(params, parts, counts, sparse_anywhere, strict=True):
            grad = p.grad
            if grad is None:
                plans.append(_SKIP)
                continue
            state = self._state(p)
            if count:
                state["row_sparse"] = True
                plans.append(_DENSE if count == part.numel() else part.nonzero().view(-1))
            elif flag:
                state["row_sparse"] = True
                # the all-reduced gradient is the same everywhere, the local history may not be
                skip = self._untouched(p, grad, self._track(p), trust_seen=False)
                plans.append(_SKIP if skip else _DENSE)
            else:
                plans.append(_DENSE)
        return plans

    def _check_same_parameters(self, params: list[Tensor], group: Any) -> None:
        """Raise where the processes of ``group`` step different parameters (the union of rows
        pairs them by position: another collective than the other processes', which gloo
        aborts on and NCCL hangs on). Checked once per list of shapes."""
        shapes = tuple(p.shape for p in params)
        if shapes == self._synced_shapes:
            return
        every: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, shapes, group=group)
        if any(other != shapes for other in every):
            counts = [len(other) for other in every]
            raise RuntimeError(
                "LazyRowAdam: the processes step different parameters (per process "
                f"{counts} parameters, shapes differ), so the touched rows cannot be united "
                "over them; pass sync_rows=False where each process steps parameters of its "
                "own (FSDP's flattened shards, which then take dense steps), or "
                "process_group= the data-parallel group (torch's "
                "ZeroRedundancyOptimizer(optimizer_class=LazyRowAdam) is recognised as such)"
            )
        self._synced_shapes = shapes

    def _plan_shard(self, params: list[Tensor], logs: list[list]) -> list:
        """Each parameter's plan where this optimizer steps this process's shard of a
        ``ZeroRedundancyOptimizer``: it steps its parameters alone and broadcasts them, on
        gradients DDP averaged, and the rows the other processes' layers wrote are in no log
        here, so a sparse layer's weight steps its rows of non-zero gradient."""
        plans: list[str | Tensor] = []
        for p, log in zip(params, logs, strict=True):
            grad = p.grad
            if grad is None:
                plans.append(_SKIP)
                continue
            state = self._state(p)
            if WEIGHT_TIED in p.__dict__ or p.dim() == 0 or not (log or _row_sparse(p, state)):
                plans.append(_DENSE)
                continue
            state["row_sparse"] = True
            rows = _live_rows(grad).nonzero().view(-1)
            plans.append(
                _SKIP if not rows.numel() else _DENSE if rows.numel() == p.shape[0] else rows
            )
        return plans

    # -- the step ----------------------------------------------------------------------------

    @_hooks_when_listened
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adam step: row-sparse for the rows sparse layers logged, dense for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() without its objects: 5-7 us a step
        try:
            plans = None
            sync = self._sync_group() if _DIST and dist.is_initialized() else None
            if sync is not None:
                params = [p for group in self.param_groups for p in group["params"]]
                logs = [_taken_log(p) for p in params]
                if self._shard_of_zero:
                    plans = iter(self._plan_shard(params, logs))
                else:
                    plans = iter(self._plan_synced(params, logs, sync))
            native_cpu = native.use_native()
            for group in self.param_groups:
                if native_cpu and plans is None and not isinstance(group["lr"], Tensor):
                    self._step_group_native(group)
                else:
                    self._step_group(group, plans, native_cpu)
        finally:
            torch._C._set_grad_enabled(grad_was)
        return loss

    def _step_group(self, group: dict, plans: Iterator | None, native_cpu: bool) -> None:
        # planned from the log of row indices: dense (PyTorch's Adam), rows (the C++ row step)
        # or gathered (rows copied out, stepped with the dense ones by PyTorch's Adam and copied
        # back: the PyTorch path)
        lists = _StepLists()
        for p in group["params"]:
            log = take_touched_rows(p)  # consumed whatever happens next
            plan = next(plans) if plans is not None else None
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise _sparse_grad_error(p)
            state = self._state(p)
            if plan is None:
                plan = self._plan_local(p, grad, state, log)
            self._route(p, grad, state, plan, lists, native_cpu)
        lists.run(group)

    def _step_group_native(self, group: dict) -> None:
        """A group's step with the native kernels and no union over processes: one call of
        ``msbp::lazy_row_adam_step_`` takes the sparse layers' row masks whole (it steps the
        marked rows, clears the masks and marks the rows for zero_grad in one pass) and steps the
        dense parameters by PyTorch's fused Adam, so that no tensor op runs here per parameter
        (at MNIST size that bookkeeping cost more than the update). What it does not take (a
        parameter off the CPU, a layer that logged no rows) goes the way of ``_step_group``."""
        m_params, m_avgs, m_sqs, m_grads, m_masks, m_dirty, m_steps = [], [], [], [], [], [], []
        d_params, d_grads, d_avgs, d_sqs, d_steps = [], [], [], [], []
        m_seen = []
        rest = _StepLists()
        all_state, tracks = self.state, self._tracks
        for p in group["params"]:
            if not p.is_cpu:
                grad = p.grad
                log = take_touched_rows(p)
                if grad is not None:
                    if grad.is_sparse:
                        raise _sparse_grad_error(p)
                    state = self._state(p)
                    self._route(p, grad, state, self._plan_local(p, grad, state, log), rest, True)
                continue
            own = p.__dict__
            # the mask, with a log of row indices (the PyTorch backward's) folded in
            logged = ROWS_LOG in own
            mask = touched_mask(p) if logged else own.get(ROWS_MASK)
            grad = p.grad
            if grad is None:
                if mask is not None:
                    mask.zero_()  # consumed
                continue
            if grad.is_sparse:
                raise _sparse_grad_error(p)
            state = all_state.get(p)
            if state is None or "step" not in state:
                state = self._state(p)
            if WEIGHT_TIED in own:  # another module writes rows no log names: a whole step
                if mask is not None:
                    mask.zero_()
                self._route(p, grad, state, _DENSE, rest, True)
                continue
            if mask is None:
                if _row_sparse(p, state) or p.is_complex():
                    self._route(p, grad, state, self._plan_local(p, grad, state, []), rest, True)
                elif state["exp_avg"].stride() != p.stride() or (
                    state["exp_avg_sq"].stride() != p.stride()
                ):
                    # moments laid out unlike the parameter: not for the fused kernel (_adam)
                    self._route(p, grad, state, _DENSE, rest, True)
                else:
                    d_params.append(p)
                    d_grads.append(grad)
                    d_avgs.append(state["exp_avg"])
                    d_sqs.append(state["exp_avg_sq"])
                    d_steps.append(state["step"])
                continue
            track = tracks.get(id(p)) or self._track(p)
            m_params.append(p)
            m_avgs.append(state["exp_avg"])
            m_sqs.append(state["exp_avg_sq"])
            m_grads.append(grad)
            m_masks.append(mask)
            m_dirty.append(track.dirty if track.dirty is not None else track.dirty_mask(p))
            track.marked = True
            m_steps.append(state["step"])
            m_seen.append((p, grad, state, track, logged))
        if m_params or d_params:
            beta1, beta2 = group["betas"]
            counts = native.eager_ops().lazy_row_adam_step_(
                m_params, m_avgs, m_sqs, m_grads, m_masks, m_dirty, m_steps,
                d_params, d_grads, d_avgs, d_sqs, d_steps,
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                group["decoupled_weight_decay"],
            )
            for (p, grad, state, track, logged), count in zip(m_seen, counts, strict=True):
                if count > 0:
                    state["row_sparse"] = True
                    track.look(grad)
                    continue
                # no row set, but a log taken: it named no row (a backward of the layer that
                # wrote none: an empty batch, per-example top-k of an all-zero output gradient),
                # so no row steps, as on the PyTorch path, whatever else went into the gradient
                # (a penalty on the weight, an empty batch's dense zero added to the gradient of
                # the last step); read as no log, a changed gradient took a dense step
                log = [_NO_LOGGED_ROWS] if logged else []
                if count < 0:  # tensors the kernel does not take: the PyTorch path
                    track.dirty_mask(p)  # one of another shape: its rows listed
                    mask = touched_mask(p)
                    rows = mask.nonzero().view(-1)
                    mask.zero_()
                    if rows.numel():
                        log = [rows]
                self._route(p, grad, state, self._plan_local(p, grad, state, log), rest, True)
        rest.run(group)

    def _route(self, p: Tensor, grad: Tensor, state: dict, plan: str | Tensor,
               lists: _StepLists, native_cpu: bool) -> None:
        """Put ``p`` on the list its plan says (or nowhere: skipped)."""
        if plan is _DENSE:
            rows = None
            lists.dense(p, grad, state)
        elif plan is not _SKIP:
            rows = plan if plan.dtype == torch.long else plan.long()
            if not rows.is_contiguous():
                rows = rows.contiguous()
            if native_cpu and p.is_cpu and _native_rows_ok(p, grad, state):
                lists.rows(p, grad, state, rows)  # its rows of zero gradient left out there
            else:
                rows, grad_rows = _rows_with_gradient(p, grad, rows.to(p.device))
                if rows.numel():
                    lists.gather(p, grad_rows, state, rows)
                else:
                    plan = _SKIP
        if plan is _SKIP:
            if state.get("row_sparse"):
                self._track(p).look(grad)
            return
        if state.get("row_sparse"):
            track = self._track(p)
            track.stepped(rows)
            track.look(grad)

    # -- zero_grad ---------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the rows of sparse layers' weight gradients written since the last ``zero_grad``
        (their buffers are kept, so the next backward adds into them in place); other gradients
        as ``Optimizer.zero_grad``. Works whether or not ``step()`` ran in between.

        With ``set_to_none`` a sparse layer's ``.grad`` that holds only the rows its layers
        listed becomes None, as any gradient (``_hand_back``): those rows of the buffer are
        cleared, here or at the layer's next backward, which puts the same buffer back
        (``msbp.functional.kept_grad_buffer``)."""
        # as in step(): CPU row masks go to one C++ call, the rest is done here
        masked = native.use_native()
        z_grads, z_dirty, z_pending, z_seen = [], [], [], []
        handed: list[tuple] = []  # kept buffers of the C++ path handed back, to clear
        all_state = self.state
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none and self._hand_back(p, handed):
                    continue
                # what was written after the last step is discarded
                mask, pending = None, []
                if masked and p.is_cpu:
                    own = p.__dict__
                    mask = touched_mask(p) if ROWS_LOG in own else own.get(ROWS_MASK)
                else:
                    pending = take_touched_rows(p)
                grad = p.grad
                state = all_state.get(p)
                row_sparse = state is not None and state.get("row_sparse", False)
                if WEIGHT_TIED in p.__dict__:  # zeroed whole, as it was stepped whole
                    if mask is not None:
                        mask.zero_()
                    track = self._tracks.get(id(p))
                    if track is not None:
                        track.rows = []
                        if track.marked:
                            track.taken()
                    if grad is not None:
                        _zero_whole(p, grad, set_to_none)
                    continue
                if mask is None and not pending and not row_sparse:
                    if grad is not None:
                        _zero_whole(p, grad, set_to_none)
                    continue
                track = self._track(p)
                if grad is None:
                    track.look(None)
                    track.rows = []
                    if track.marked:
                        track.taken()
                    if mask is not None:
                        mask.zero_()
                    continue
                # asked before any clearing: whether only the rows the layers listed went in,
                # and which: all of them are cleared, also those this optimizer does not know it
                # stepped (a state loaded since its step, another optimizer's step)
                rows_in = listed_grad_rows(p, grad)
                listed = rows_in is not None
                if listed and rows_in.numel():
                    if mask is not None:
                        mask.index_fill_(0, rows_in, 1)
                    else:
                        pending = [*pending, rows_in]
                if mask is not None and not track.rows:
                    z_grads.append(grad)
                    z_dirty.append(track.dirty if track.marked else _NO_ROWS)
                    z_pending.append(mask)
                    z_seen.append((p, grad, track, listed, row_sparse, mask))
                    continue
                if mask is not None:  # rows listed by another path too: all go that way
                    pending = [mask.nonzero().view(-1)]
                    mask.zero_()
                if pending:  # a log, even of no row (an empty batch), is a sparse layer's
                    self._mark_row_sparse(p)
                self._zero_rows(p, grad, track, pending, listed)
        if handed and masked and native.eager_ops() is native.eager_module():
            # (no op of its own: under a TorchDispatchMode the next backward clears them)
            native.eager_module().clear_kept_rows_(
                [k[0] for k in handed], [k[1] for k in handed]
            )
        if not z_grads:
            return
        counts = native.eager_ops().zero_masked_rows_(z_grads, z_dirty, z_pending)
        for (p, grad, track, listed, row_sparse, mask), count in zip(
            z_seen, counts, strict=True
        ):
            if count < 0:  # tensors the kernel does not take: the PyTorch path
                rows = mask.nonzero().view(-1)
                mask.zero_()
                self._zero_rows(p, grad, track, [rows] if rows.numel() else [], listed)
                continue
            track.marked = False
            if count > 0:
                self._mark_row_sparse(p)
            if count == 0 and not row_sparse:
                _zero_whole(p, grad, set_to_none)  # a mask, but nothing sparse about it yet
            else:
                if not listed:
                    grad.zero_()  # something else wrote into it too: clear all of it
                record_grad_clean(p, grad)
                track.look(grad)

    def _hand_back(self, p: Tensor, handed: list[tuple]) -> bool:
        """For ``zero_grad(set_to_none=True)``: set ``p.grad`` None where the layers' records
        list every row written into it (``grad_rows_listed``); True if done. The C++ path's
        buffer goes on ``handed``, for zero_grad to clear its listed rows in one native call;
        the layer puts it back as it is at its next backward (the PyTorch path's buffer is
        cleared by rows there). The rows marked since the last step go, as the gradient they
        were written into (a later gradient written by anything but the layer must not find
        them); the rows the step marked for clearing are kept: they would only clear more rows
        of a gradient being cleared."""
        grad = p.grad
        if grad is None:
            return False
        own = p.__dict__
        if WEIGHT_TIED in own or own.get(ROWS_LOG):
            return False
        kept = kept_if_listed(p, grad)  # the C++ path's record, else the PyTorch path's
        if kept is None and not grad_rows_listed(p, grad):
            return False
        p.grad = None
        del grad
        if kept is not None and not first_item_held_elsewhere(kept):
            handed.append(kept)  # (one the caller still holds stays as it is: torch's contract)
        mask = own.get(ROWS_MASK)
        if mask is not None:
            mask.zero_()
        track = self._tracks.get(id(p))
        if track is not None:
            track.rows = []
            track.grad_ref = None
        return True

    def _mark_row_sparse(self, p: Tensor) -> None:
        """``p`` is a sparse layer's weight (rows were logged for it): from now on a step with
        none logged leaves it alone, also before its first row-sparse step (zero_grad took the
        log of a backward whose step did not come)."""
        self.state[p]["row_sparse"] = True

    def _zero_rows(self, p: Tensor, grad: Tensor, track: _Track, pending: list,
                   listed: bool) -> None:
        """zero_grad of a sparse layer's weight from its log ``pending`` (the PyTorch path);
        ``listed``: only rows the layers listed went into ``grad`` (``grad_rows_listed``)."""
        if track.marked:
            track.dirty_mask(grad)  # one of another shape or device: its rows listed
            if track.marked:
                track.stepped(track.taken())
        written, track.rows = track.rows + pending, []
        if not listed:
            grad.zero_()  # something else wrote into it too: clear all of it
        elif written:
            rows = fold_rows(written)
            if rows is None:
                grad.zero_()
            else:
                grad.index_fill_(0, rows.to(grad.device), 0)
        record_grad_clean(p, grad)
        track.look(grad)


class _StepLists:
    """The tensors of one parameter group's step outside the masked C++ path, by kind."""

    def __init__(self) -> None:
        self.d_params, self.d_grads, self.d_avgs, self.d_sqs, self.d_steps = [], [], [], [], []
        self.r_params, self.r_avgs, self.r_sqs, self.r_grads, self.r_rows, self.r_steps = (
            [], [], [], [], [], []
        )
        self.gathered: list[tuple] = []

    def dense(self, p: Tensor, grad: Tensor, state: dict) -> None:
        self.d_params.append(p)
        self.d_grads.append(grad)
        self.d_avgs.append(state["exp_avg"])
        self.d_sqs.append(state["exp_avg_sq"])
        self.d_steps.append(state["step"])

    def rows(self, p: Tensor, grad: Tensor, state: dict, rows: Tensor) -> None:
        self.r_params.append(p)
        self.r_avgs.append(state["exp_avg"])
        self.r_sqs.append(state["exp_avg_sq"])
        self.r_grads.append(grad)
        self.r_rows.append(rows)
        self.r_steps.append(state["step"])

    def gather(self, p: Tensor, grad_rows: Tensor, state: dict, rows: Tensor) -> None:
        """``p``'s ``rows`` (r,), whose gradient is ``grad_rows`` (r, ...), stepped by PyTorch's
        Adam on copies gathered from ``p`` and its moments and put back by ``run``."""
        p_r = p.index_select(0, rows)  # (r, ...)
        m_r = state["exp_avg"].index_select(0, rows)
        v_r = state["exp_avg_sq"].index_select(0, rows)
        self.d_params.append(p_r)
        self.d_grads.append(grad_rows)
        self.d_avgs.append(m_r)
        self.d_sqs.append(v_r)
        self.d_steps.append(state["step"])
        self.gathered.append((p, rows, state, p_r, m_r, v_r))

    def run(self, group: dict) -> None:
        if self.r_params:
            beta1, beta2 = group["betas"]
            torch.ops.msbp.lazy_row_adam_(
                self.r_params, self.r_avgs, self.r_sqs, self.r_grads, self.r_rows,
                self.r_steps, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                group["decoupled_weight_decay"],
            )
        if self.d_params:
            _adam(group, self.d_params, self.d_grads, self.d_avgs, self.d_sqs, self.d_steps)
        for p, rows, state, p_r, m_r, v_r in self.gathered:
            p.index_copy_(0, rows, p_r)
            state["exp_avg"].index_copy_(0, rows, m_r)
            state["exp_avg_sq"].index_copy_(0, rows, v_r)


class LazyRowAdamW(LazyRowAdam):
    """``LazyRowAdam`` with decoupled weight decay: ``torch.optim.AdamW``'s math (and its default
    ``weight_decay=1e-2``) on the rows sparse backprop touched, the ordinary fused AdamW step on
    every other parameter. Only the rows stepped decay.

    Example:
        >>> opt = LazyRowAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        sync_rows: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=True, sync_rows=sync_rows, process_group=process_group,
        )
