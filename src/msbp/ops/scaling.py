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

# the scaler whose scaled loss is being backpropagated, or None; with it a weak reference to a
# token that the backward pass owns (see ``activate``), or None for "until update()"
_active: list = [None]
_alive: weakref.WeakSet = weakref.WeakSet()  # every msbp scaler in this process


def register(scaler) -> None:
    """Note that ``scaler`` exists: while one does, layers take the path that can scale."""
    _alive.add(scaler)


def any_scaler() -> bool:
    """Whether some ``msbp.amp.GradScaler`` exists (its scale may apply to the next backward,
    which a layer cannot know at forward time)."""
    return len(_alive) > 0


def activate(scaler, token: object | None = None) -> None:
    """Make ``scaler`` (with ``get_scale_tensor()`` and ``snapshot(memory)``) the active one.

    ``token``: an object only the backward pass that activates it keeps alive (its queued
    end-of-pass callback holds it): the scaler is active while the token lives. A pass that
    raises never runs its callbacks, so ``deactivate`` never comes; the autograd engine then
    drops the pass and its callbacks, the token dies, and the scale it published with it,
    instead of applying to every later backward (unscaled ones included)."""
    _active[0] = (scaler, None if token is None else weakref.ref(token))


def deactivate(scaler, token: object | None = None) -> None:
    """``scaler`` is no longer the active one (``token``: the one it was activated with, which
    the caller keeps alive until now)."""
    del token
    if _active[0] is not None and _active[0][0] is scaler:
        _active[0] = None


def _current():
    entry = _active[0]
    if entry is None:
        return None
    scaler, token = entry
    if token is not None and token() is None:  # its backward pass ended without deactivate
        _active[0] = None
        return None
    return scaler


def current_scale() -> Tensor | None:
    """The active scaler's scale (a one-element float32 tensor), or None."""
    scaler = _current()
    return None if scaler is None else scaler.get_scale_tensor()


def snapshot(memory: Tensor) -> None:
    """Let the active scaler keep ``memory``'s value before this backward changes it."""
    scaler = _current()
    if scaler is not None:
        scaler.snapshot(memory)
