"""What the sparse backward needs from a gradient scaler (``msbp.amp.GradScaler`` sets it).

Under loss scaling the output gradient arrives multiplied by the scale s; the memory must be kept
in unscaled units (else it comes back at the wrong size when s changes), and must not advance on
a step the scaler skips. The scaler publishes its scale here while a backward pass of its scaled
outputs runs (``msbp.amp``), and the layers hand it a copy of their memory before changing it,
so that it can restore them.
"""

from __future__ import annotations

import weakref

from torch import Tensor

_active: list = [None]  # the scaler whose scaled loss is being backpropagated, or None
_alive: weakref.WeakSet = weakref.WeakSet()  # every msbp scaler in this process


def register(scaler) -> None:
    """Note that ``scaler`` exists: while one does, layers take the path that can scale."""
    _alive.add(scaler)


def any_scaler() -> bool:
    """Whether some ``msbp.amp.GradScaler`` exists (its scale may apply to the next backward,
    which a layer cannot know at forward time)."""
    return len(_alive) > 0


def activate(scaler) -> None:
    """Make ``scaler`` (with ``get_scale_tensor()`` and ``snapshot(memory)``) the active one."""
    _active[0] = scaler


def deactivate(scaler) -> None:
    if _active[0] is scaler:
        _active[0] = None


def current_scale() -> Tensor | None:
    """The active scaler's scale (a one-element float32 tensor), or None."""
    scaler = _active[0]
    return None if scaler is None else scaler.get_scale_tensor()


def snapshot(memory: Tensor) -> None:
    """Let the active scaler keep ``memory``'s value before this backward changes it."""
    scaler = _active[0]
    if scaler is not None:
        scaler.snapshot(memory)
