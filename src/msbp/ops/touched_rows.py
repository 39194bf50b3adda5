"""Which rows of a weight's gradient a sparse backward wrote: the log a row-sparse optimizer reads.

Lives in ``ops`` (the layer that writes it) so that ``ops`` never imports ``optim``.

The log is a list on the Parameter (``weight.__dict__[ROWS_LOG]``): one entry per backward, the
row indices it wrote (a 1-D int64 tensor of distinct rows) or None when it wrote every row. The
optimizer that asked for it (``TRACK_ROWS``) takes it at every step (``take_touched_rows``).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: attribute on a Parameter: a weak reference to the optimizer that wants the touched rows
#: recorded (any callable returning a live object works; the log stops when it returns None)
TRACK_ROWS = "_msbp_track_rows"
#: attribute on a Parameter: row indices (or None = all rows) touched since the last step
ROWS_LOG = "_msbp_rows"

# Entries kept before the log is folded into one: bounds its size if nobody takes it for a
# while (e.g. many backward passes between two steps).
_FOLD_AT = 64


def log_touched_rows(weight: Tensor, rows: Tensor | None) -> None:
    """Record that a backward pass wrote ``rows`` (r,) of ``weight.grad`` (None: every row).

    Called by the sparse layers' backward; a no-op unless a live optimizer asked for it.
    """
    owner = weight.__dict__.get(TRACK_ROWS)
    if owner is None or owner() is None:
        return
    log = weight.__dict__.setdefault(ROWS_LOG, [])
    log.append(rows)
    if len(log) >= _FOLD_AT:
        log[:] = [fold_rows(log)]


def fold_rows(log: list[Tensor | None]) -> Tensor | None:
    """The distinct rows (sorted, int64) of a non-empty log, or None if an entry says all rows."""
    if any(r is None for r in log):
        return None
    if len(log) == 1:
        return log[0]
    return torch.unique(torch.cat(log))


def take_touched_rows(weight: Tensor) -> list[Tensor | None]:
    """Remove and return ``weight``'s log (empty if nothing was logged since the last take)."""
    return weight.__dict__.pop(ROWS_LOG, None) or []
