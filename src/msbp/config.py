"""The one configuration object of msbp: how a layer sparsifies its backward pass."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

SELECTIONS = ("unified", "per_example", "random")
MEMORY_LAYOUTS = ("unit", "slot")
MEMORY_ROWS = ("active", "all")
ON_NONFINITE = ("raise", "skip")
BACKENDS = ("sparse", "auto")


@dataclass(frozen=True)
class SparseBackpropConfig:
    """How a sparse layer selects and remembers its output gradient.

    Attributes:
        ratio: k = round(ratio * out_features); in (0, 1]. Ignored when ``k`` is set.
        k: absolute number of kept output units; wins over ``ratio``. ``0`` (meProp's convention)
            means no sparsification. ``k >= out_features`` is dense backprop.
        selection: ``"unified"`` (one set of k columns for the whole batch, ranked by the column
            sum of ``|U|``), ``"per_example"`` (k largest ``|U|`` of every row) or ``"random"``
            (k random columns, meProp's ablation).
        memory: the memory ratio alpha in [0, 1]. ``0.0`` is plain sparse backprop (meProp);
            ``1.0`` is error feedback (nothing lost, only delayed).
        memory_layout: ``"unit"`` keeps one number per output unit (the batch-summed residual,
            added back as ``M / rows``); ``"slot"`` keeps the residual with the shape of the
            gradient (rows x out). See docs in README ("Memory layout") for why ``"unit"`` is the
            default.
        memory_rows: which rows of the output gradient G (rows x out) take part in the memory.
            ``"active"`` (default): only rows with a non-zero (or non-finite) entry; an all-zero
            row (padding, a masked token, an ignored label) gets no memory back, selects nothing
            and leaves the memory as it is, so padding a batch never changes a gradient or the
            memory. ``unit`` adds ``M / n_active`` to the n_active active rows; a step with no
            active row leaves the memory unchanged; ``slot`` keeps a zero row's memory slot as it
            was. ``"all"``: every row, as before (``M / rows`` onto padding too).
        align: k is rounded up to a multiple of ``align`` (fast GEMMs need multiples of 8 for
            16-bit types on GPUs), then clamped to ``out_features``.
        on_nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` when a non-finite
            gradient reaches a sparse layer; ``"skip"`` leaves the memory unchanged and propagates
            the incoming gradient densely, so the non-finite values reach the parameter gradients
            exactly as in dense training (``GradScaler`` then skips the step).
        grad_inplace: write the k rows of ``dW`` straight into an existing ``weight.grad`` instead
            of handing autograd a dense ``out x in`` gradient. Falls back to the dense hand-over
            whenever autograd needs it (``torch.autograd.grad``, hooks on the weight). Set it to
            ``False`` under ``DistributedDataParallel``, whose reducer needs autograd's
            accumulation hook.
        backend: ``"sparse"`` (default) always runs the sparse backward; ``"auto"`` measures,
            once per layer shape, batch size (rounded up to a power of two), dtype, device and
            setting, the sparse backward against the dense one (k = out: everything propagated,
            the memory flushed into it, so no gradient is lost) and runs the faster. Not the
            default because it changes which gradient a small layer gets: dense instead of the
            sparse one asked for.
        consensus: under ``torch.distributed`` (an initialised process group of more than one
            process), every rank propagates the same k units per layer and step, so the weight
            gradients of all ranks have the same k non-zero rows and ``msbp.distributed``'s
            row-sparse exchange can all-reduce just those rows. ``"unified"``: the column scores
            (``out`` numbers per layer) are all-reduced before the top-k; ``"random"``: rank 0's
            draw is used everywhere. The ``unit`` memory is then shared (its column sums are
            all-reduced), so that W ranks equal one process on the concatenated batch. Costs one
            all-reduce of ``out`` (``2 out`` with a unit memory) numbers per layer and backward.
            A no-op without a process group (one process), so the same config runs anywhere.
            ``"per_example"`` selection cannot agree (each row keeps its own units) and is
            rejected, as is ``backend="auto"`` (each rank would time, and decide, on its own).
    """

    ratio: float | None = 0.04
    k: int | None = None
    selection: str = "unified"
    memory: float = 0.8
    memory_layout: str = "unit"
    memory_rows: str = "active"
    align: int = 1
    on_nonfinite: str = "raise"
    grad_inplace: bool = True
    backend: str = "sparse"
    consensus: bool = False

    def __post_init__(self) -> None:
        # numpy's numbers (a sweep over np.arange, a value read from an array) as Python's: the
        # config is hashed, compared and written to JSON, which a np.int64 k is not
        for name, kind, cast in (("k", numbers.Integral, int), ("align", numbers.Integral, int),
                                 ("ratio", numbers.Real, float), ("memory", numbers.Real, float)):
            value = getattr(self, name)
            if isinstance(value, kind) and type(value) not in (bool, int, float):
                object.__setattr__(self, name, cast(value))
        if self.k is not None:
            if isinstance(self.k, bool) or not isinstance(self.k, int):
                raise ValueError(f"k must be an int or None, got {self.k!r}")
            if self.k < 0:
                raise ValueError(f"k must be >= 0, got k={self.k}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
                raise ValueError(f"ratio must be a float in (0, 1] or None, got {self.ratio!r}")
            if not (0.0 < float(self.ratio) <= 1.0) or math.isnan(self.ratio):
                raise ValueError(f"ratio must be in (0, 1], got ratio={self.ratio}")
        if self.k is None and self.ratio is None:
            raise ValueError("one of ratio or k must be set, got ratio=None and k=None")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int | float):
            raise ValueError(f"memory must be a float in [0, 1], got {self.memory!r}")
        if not (0.0 <= float(self.memory) <= 1.0):
            raise ValueError(f"memory must be in [0, 1], got memory={self.memory}")
        if self.memory_layout not in MEMORY_LAYOUTS:
            raise ValueError(
                f"memory_layout must be one of {MEMORY_LAYOUTS}, got {self.memory_layout!r}"
            )
        if self.memory_rows not in MEMORY_ROWS:
            raise ValueError(
                f"memory_rows must be one of {MEMORY_ROWS}, got {self.memory_rows!r}"
            )
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"align must be an int >= 1, got align={self.align!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}"
            )
        if not isinstance(self.grad_inplace, bool):
            raise ValueError(f"grad_inplace must be a bool, got {self.grad_inplace!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.consensus, bool):
            raise ValueError(f"consensus must be a bool, got {self.consensus!r}")
        if self.consensus and self.selection == "per_example":
            raise ValueError(
                "consensus=True needs a selection that keeps the same units for the whole batch "
                "('unified' or 'random'), got selection='per_example': each example keeps its "
                "own k units, so the ranks cannot agree on one set of weight-gradient rows"
            )
        if self.consensus and self.backend == "auto":
            raise ValueError(
                "consensus=True does not go with backend='auto': each rank would time the "
                "backward and choose sparse or dense on its own, and the ranks must agree"
            )

    def k_for(self, out_features: int) -> int:
        """Number of kept output units for a layer with ``out_features`` outputs.

        Returns ``out_features`` when the layer is not sparsified (k = 0 or k >= out).
        """
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {out_features}")
        if self.k is not None:
            k = self.k
            if k == 0:
                return out_features
        else:
            k = max(1, round(float(self.ratio) * out_features))
        k = -(-k // self.align) * self.align
        return min(k, out_features)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict(to_dict())`` gives an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseBackpropConfig:
        """Build a config from ``to_dict()`` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SparseBackpropConfig fields: {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> SparseBackpropConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
