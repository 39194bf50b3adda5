"""Which rows of a weight's gradient a sparse backward wrote: the log a row-sparse optimizer reads.

Lives in ``ops`` (the layer that writes it) so that ``ops`` never imports ``optim``.
"""

from __future__ import annotations

from torch import Tensor

#: attribute on a Parameter: True when an optimizer wants the touched rows recorded
TRACK_ROWS = "_msbp_track_rows"
#: attribute on a Parameter: row indices (or None = all rows) touched since the last step
ROWS_LOG = "_msbp_rows"


def log_touched_rows(weight: Tensor, rows: Tensor | None) -> None:
    """Record that a backward pass wrote ``rows`` (r,) of ``weight.grad`` (None: every row).

    Called by the sparse layers' backward; a no-op unless an optimizer asked for it.
    """
    if getattr(weight, TRACK_ROWS, False):
        log = weight.__dict__.setdefault(ROWS_LOG, [])
        log.append(rows)
