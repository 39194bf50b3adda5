"""Bookkeeping msbp keeps on a Parameter (in its ``__dict__``) that is not part of the model.

Gradient buffers the sparse layers put back, and the optimizer that wants touched rows logged,
live on the Parameter so that they follow it wherever the layer goes. ``torch.save(model)``
pickles a Parameter's ``__dict__``; these entries must not go with it: a weak reference cannot
be pickled at all (the save failed), and a kept buffer is as large as the weight. They pickle
as nothing (the entry reads as absent after loading) or as a listener that listens to nobody.
"""

from __future__ import annotations

import sys
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


def _item_refs(entry: tuple) -> int:
    return sys.getrefcount(entry[0])


def _refs_when_alone() -> int:
    """What ``_item_refs`` counts for an item that only its tuple holds: measured, not assumed,
    as what ``sys.getrefcount`` counts differs between Python versions (3.14 borrows references
    to local variables, so a count taken through one came out one lower)."""
    import torch  # a Tensor, as the entries hold: its Python object may count otherwise

    return _item_refs(TransientTuple((torch.empty(0),)))


_ALONE: int | None = None


def first_item_held_elsewhere(entry: tuple) -> bool:
    """Whether any Python reference besides ``entry``'s own holds ``entry[0]`` (a gradient
    buffer the caller kept, ``old = p.grad``): such a buffer must not be cleared and reused."""
    global _ALONE
    if _ALONE is None:
        _ALONE = _refs_when_alone()
    return _item_refs(entry) > _ALONE
