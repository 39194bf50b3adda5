"""Bookkeeping msbp keeps on a Parameter (in its ``__dict__``) that is not part of the model.

Gradient buffers the sparse layers put back, and the optimizer that wants touched rows logged,
live on the Parameter so that they follow it wherever the layer goes. ``torch.save(model)``
pickles a Parameter's ``__dict__``; these entries must not go with it: a weak reference cannot
be pickled at all (the save failed), and a kept buffer is as large as the weight. They pickle
as nothing (the entry reads as absent after loading) or as a listener that listens to nobody.
"""

from __future__ import annotations

import weakref
from typing import Any


def _dropped() -> None:
    """What a transient entry becomes when a pickled model is loaded: nothing."""
    return None


class TransientTuple(tuple):
    """A tuple of bookkeeping (a gradient buffer and its state) that pickles as None."""

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return (_dropped, ())


class TransientList(list):
    """A list of bookkeeping (a hook's handle and what it checks) that pickles as None."""

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return (_dropped, ())


class Listener:
    """A weak reference to ``owner`` (called like ``weakref.ref``: the owner, or None once it
    is gone) that pickles as one to nobody."""

    __slots__ = ("_ref",)

    def __init__(self, owner: Any = None) -> None:
        self._ref = weakref.ref(owner) if owner is not None else None

    def __call__(self) -> Any:
        return self._ref() if self._ref is not None else None

    def __reduce__(self) -> tuple:
        return (Listener, ())
