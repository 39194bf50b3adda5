"""Optimizers that exploit row-sparse weight gradients.

With sparse backprop only k rows of a layer's ``dW`` are non-zero, but ``torch.optim.Adam`` still
reads and writes every weight, moment and gradient entry: on small models that is most of a
training step. ``LazyRowAdam`` updates only the rows a sparse layer touched (meProp's sparse
update; the "lazy" Adam of ``torch.optim.SparseAdam``): untouched rows keep their parameters and
moments, instead of drifting on stale momentum.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as adam_functional

from msbp.ops.touched_rows import ROWS_LOG, TRACK_ROWS


def _fused_ok(params: list[Tensor]) -> bool:
    # PyTorch's fused Adam needs floating tensors on one CPU or CUDA device
    device = params[0].device
    return device.type in ("cpu", "cuda") and all(
        p.device == device and p.is_floating_point() for p in params
    )


def _touched_rows(p: Tensor) -> Tensor | None:
    """Distinct rows touched since the last step, or None when the update must be dense."""
    log = p.__dict__.get(ROWS_LOG)
    if not log or any(r is None for r in log):
        return None
    return log[0] if len(log) == 1 else torch.unique(torch.cat(log))


class LazyRowAdam(Optimizer):
    """Adam that updates only the rows of a weight that sparse backprop touched.

    Weights of ``SparseLinear`` layers get a row-sparse ("lazy") Adam update on the k rows their
    backward wrote, at the cost of those rows only; every other parameter (biases, dense layers,
    steps where a layer ran dense) gets the ordinary Adam update. ``zero_grad`` zeroes only the
    touched rows and keeps the gradient buffers, so the next backward adds its k rows in place.

    Assumes a tracked weight receives gradient only from sparse layers (no weight tying with a
    dense layer): rows written by anything else would be ignored.

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
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got lr={lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got betas={betas}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got eps={eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                setattr(p, TRACK_ROWS, True)

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Dense parameters and the gathered rows of sparse ones go through one call of
            # PyTorch's (fused where it can) Adam; the rows are then written back.
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            scattered: list[tuple[Tensor, Tensor, dict, Tensor, Tensor, Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LazyRowAdam does not take torch.sparse gradients")
                state = self._state(p)
                rows = _touched_rows(p)
                if rows is None:
                    params.append(p)
                    grads.append(p.grad)
                    exp_avgs.append(state["exp_avg"])
                    exp_avg_sqs.append(state["exp_avg_sq"])
                else:
                    p_r = p.index_select(0, rows)  # (r, in)
                    m_r = state["exp_avg"].index_select(0, rows)
                    v_r = state["exp_avg_sq"].index_select(0, rows)
                    params.append(p_r)
                    grads.append(p.grad.index_select(0, rows))
                    exp_avgs.append(m_r)
                    exp_avg_sqs.append(v_r)
                    scattered.append((p, rows, state, p_r, m_r, v_r))
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam_functional(
                params, grads, exp_avgs, exp_avg_sqs, [], steps,
                fused=_fused_ok(params), amsgrad=False, beta1=beta1, beta2=beta2,
                lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=False,
            )
            for p, rows, state, p_r, m_r, v_r in scattered:
                p.index_copy_(0, rows, p_r)
                state["exp_avg"].index_copy_(0, rows, m_r)
                state["exp_avg_sq"].index_copy_(0, rows, v_r)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the touched rows of sparse layers' weights (keeping their buffers, so the next
        backward adds into them in place); other gradients as ``Optimizer.zero_grad``."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if ROWS_LOG not in p.__dict__:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()
                    continue
                rows = _touched_rows(p)
                del p.__dict__[ROWS_LOG]
                if rows is None:
                    p.grad.zero_()
                else:
                    p.grad.index_fill_(0, rows, 0)
