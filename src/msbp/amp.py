"""Mixed precision: a ``torch.amp.GradScaler`` that sparse layers' memories can live with.

Use ``msbp.amp.GradScaler`` exactly like ``torch.amp.GradScaler`` (the standard loop
``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` is all it takes)::

    scaler = msbp.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()

What it adds: (1) while a scaled loss is backpropagated, the sparse layers add their memory back
times the current scale and store what they did not propagate divided by it, so the memory stays
in unscaled units and comes back at the right size when the scale changes; (2) a sparse layer that
meets a non-finite gradient propagates it densely (``on_nonfinite="skip"``) so the scaler can see
it; (3) when the scaler skips a step (some gradient overflowed), ``update()`` restores every
memory that changed since ``scale()`` to its value before, so no memory advances on a skipped
step. With plain ``torch.amp.GradScaler`` the memory would hold scaled gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from msbp.ops import scaling


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that keeps sparse layers' memory unscaled and rolls it back on
    skipped steps; same constructor, same methods."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._msbp_snapshots: dict[int, tuple[Tensor, Tensor]] = {}
        scaling.register(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (copy.deepcopy, torch.save of the training objects) is a scaler too: without
        # registering it, once the original was gone the layers took the path that cannot
        # scale and kept the scaled gradient in the memory (1/scale-fold too large)
        super().__setstate__(state)
        self._msbp_snapshots = {}
        scaling.register(self)

    def scale(self, outputs):  # type: ignore[override]
        scaled = super().scale(outputs)
        if not self._enabled:
            return scaled
        # the scale applies to the backward passes of these outputs only: an unscaled backward
        # run meanwhile (another model, an auxiliary loss) keeps its memory in its own units
        if isinstance(scaled, Tensor):
            return _ScaledRoot.apply(scaled, self)
        if isinstance(scaled, list | tuple) and all(isinstance(t, Tensor) for t in scaled):
            return type(scaled)(_ScaledRoot.apply(t, self) for t in scaled)
        scaling.activate(self)  # other iterables: until update(), as before
        return scaled

    def get_scale_tensor(self) -> Tensor:
        """The current scale as a one-element float32 tensor on the scaler's device."""
        if self._scale is None:
            self._lazy_init_scale_growth_tracker(torch.device(self._device))
        return self._scale

    def snapshot(self, memory: Tensor) -> None:
        """Keep ``memory``'s value from before its first change in this iteration."""
        key = id(memory)
        if key not in self._msbp_snapshots:
            self._msbp_snapshots[key] = (memory, memory.detach().clone())

    def _step_skipped(self) -> bool:
        found = [
            f for state in self._per_optimizer_states.values()
            for f in state["found_inf_per_device"].values()
        ]
        return any(float(f.sum()) > 0 for f in found)  # update() synchronises anyway

    def update(self, new_scale: float | Tensor | None = None) -> None:
        if self._enabled and self._msbp_snapshots and self._step_skipped():
            with torch.no_grad():
                for memory, old in self._msbp_snapshots.values():
                    memory.resize_(old.shape).copy_(old)
        self._msbp_snapshots.clear()
        scaling.deactivate(self)
        super().update(new_scale)


class _ScaledRoot(torch.autograd.Function):
    """Identity on a scaled output whose backward, the first node of a backward pass from it,
    makes its scaler the active one until that pass ends (reentrant passes it runs, such as
    checkpointed segments, included)."""

    @staticmethod
    def forward(ctx, scaled: Tensor, scaler: GradScaler) -> Tensor:
        ctx.scaler = scaler
        return scaled.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        scaler = ctx.scaler
        # active while this pass runs: the callback deactivates it when the pass ends; if the
        # pass raises instead, the engine drops the callback and with it `token` (scaling.py)
        token = _PassToken()
        scaling.activate(scaler, token)
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: scaling.deactivate(scaler, token)
        )
        return grad, None


class _PassToken:
    """Lives as long as one scaled backward pass's end-of-pass callback (see ``activate``)."""
