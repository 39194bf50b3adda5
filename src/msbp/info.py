"""Information loss of sparse backprop, measured during training (method.md, section 4).

``InfoLossMeter`` sets a probe on every sparsified transform of a model (each ``SparseLinear``;
the input and recurrent transforms of each ``SparseLSTM``, named ``lstm.ih_l0``, ``lstm.hh_l0``,
...) during sampled windows of steps; the transform's backward then hands it the raw output
gradient ``G`` (n, out), the input ``x`` (n, in) and the propagated part ``P`` (n, out), from
which per transform it records:

- ``cosine``: cos(P^T x, G^T x), the sparse against the true weight gradient of one step;
- ``step_error``: |P^T x - G^T x| / |G^T x| for one step (Frobenius norms);
- ``cumulative_error``: |sum_t P_t^T x_t - sum_t G_t^T x_t| / |sum_t G_t^T x_t| over a window of
  consecutive steps, the view in which a memory should help (what is dropped now is sent later);
- ``mass_fraction``: sum |P| / sum |G|, the share of the gradient's mass that is propagated (above
  1 is possible with a memory, which adds remembered mass).

The true gradient is formed only inside sampled windows, so the cost outside them is nil.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from msbp.nn import SparseLinear, SparseLSTM

Probe = Callable[[Tensor, Tensor, Tensor], None]


class _LayerWindow:
    """Accumulators of one layer over the current step and the current window."""

    def __init__(self) -> None:
        self.reset_window()

    def reset_window(self) -> None:
        self.win_sparse: Tensor | None = None  # (out, in) float64
        self.win_true: Tensor | None = None
        self.cosines: list[float] = []
        self.step_errors: list[float] = []
        self.fractions: list[float] = []
        self.reset_step()

    def reset_step(self) -> None:
        self.step_sparse: Tensor | None = None  # (out, in) float64
        self.step_true: Tensor | None = None
        self.mass_propagated = 0.0
        self.mass_true = 0.0

    def probe(self, g: Tensor, x: Tensor, propagated: Tensor) -> None:
        x64 = x.detach().double()  # (n, in)
        sparse = propagated.detach().double().t() @ x64  # (out, in)
        true = g.detach().double().t() @ x64  # (out, in)
        # a layer called several times in one step (weights shared over time) sums its calls
        self.step_sparse = sparse if self.step_sparse is None else self.step_sparse + sparse
        self.step_true = true if self.step_true is None else self.step_true + true
        self.mass_propagated += float(propagated.detach().abs().sum(dtype=torch.float64))
        self.mass_true += float(g.detach().abs().sum(dtype=torch.float64))

    def end_step(self) -> None:
        if self.step_sparse is None or self.step_true is None:
            return  # the layer took no part in this step
        s, t = self.step_sparse, self.step_true
        norm_s, norm_t = float(s.norm()), float(t.norm())
        if norm_s > 0 and norm_t > 0:
            cos = float((s * t).sum()) / (norm_s * norm_t)
            self.cosines.append(max(-1.0, min(1.0, cos)))
        if norm_t > 0:
            self.step_errors.append(float((s - t).norm()) / norm_t)
        if self.mass_true > 0:
            self.fractions.append(self.mass_propagated / self.mass_true)
        self.win_sparse = s if self.win_sparse is None else self.win_sparse + s
        self.win_true = t if self.win_true is None else self.win_true + t
        self.reset_step()

    def window_record(self, step: int, steps: int) -> dict[str, Any] | None:
        if self.win_sparse is None or self.win_true is None:
            return None
        norm_t = float(self.win_true.norm())
        cumulative = float((self.win_sparse - self.win_true).norm()) / norm_t if norm_t else None
        return {
            "step": step,
            "steps": steps,
            "cosine": _mean(self.cosines),
            "cosine_min": min(self.cosines) if self.cosines else None,
            "step_error": _mean(self.step_errors),
            "cumulative_error": cumulative,
            "mass_fraction": _mean(self.fractions),
        }


def _set_lstm_probe(lstm: SparseLSTM, tag: str, probe: Probe | None) -> None:
    if probe is None:
        lstm.probes.pop(tag, None)
    else:
        lstm.probes[tag] = probe


def probe_setters(model: nn.Module) -> dict[str, Callable[[Probe | None], None]]:
    """Name -> setter of the probe, for every sparsified transform of ``model``."""
    setters: dict[str, Callable[[Probe | None], None]] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            setters[name] = partial(setattr, module, "probe")
        elif isinstance(module, SparseLSTM):
            for tag in module.transform_tags():
                setters[f"{name}.{tag}" if name else tag] = partial(_set_lstm_probe, module, tag)
    return setters


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


class InfoLossMeter:
    """Measures the information loss of every sparsified transform of ``model`` during training.

    Windows of ``window`` consecutive steps start every ``every`` steps (step 0, ``every``,
    ``2 * every``, ...); inside a window every step is measured, so the cumulative error sees
    every gradient the window produced. Call ``start_step(step)`` before the forward pass and
    ``end_step(step)`` after the backward pass of every training step, and ``close()`` at the end.

    Example:
        >>> meter = InfoLossMeter(model, every=1000, window=100)  # doctest: +SKIP
        >>> for step, batch in enumerate(batches):  # doctest: +SKIP
        ...     meter.start_step(step); loss(model, batch).backward(); meter.end_step(step)
        >>> meter.result()["summary"]["hidden.0"]["cosine"]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, every: int = 1000, window: int = 100) -> None:
        if window < 1 or every < window:
            raise ValueError(f"need 1 <= window <= every, got window={window}, every={every}")
        self.every = every
        self.window = window
        self._setters = probe_setters(model)
        self.records: dict[str, list[dict[str, Any]]] = {name: [] for name in self._setters}
        self._windows = {name: _LayerWindow() for name in self._setters}
        self._window_start: int | None = None

    def _in_window(self, step: int) -> bool:
        return step % self.every < self.window

    def start_step(self, step: int) -> None:
        """Turn the probes on for a step inside a sampled window, off otherwise."""
        measuring = self._in_window(step)
        if measuring and step % self.every == 0:
            self._window_start = step
            for acc in self._windows.values():
                acc.reset_window()
        measuring = measuring and self._window_start is not None
        for name, set_probe in self._setters.items():
            set_probe(self._windows[name].probe if measuring else None)

    def end_step(self, step: int) -> None:
        """Close the step's measures; close the window after its last step."""
        if self._window_start is None or not self._in_window(step):
            return
        for acc in self._windows.values():
            acc.end_step()
        if step % self.every == self.window - 1:
            for name, acc in self._windows.items():
                record = acc.window_record(self._window_start, self.window)
                if record is not None:
                    self.records[name].append(record)
            self._window_start = None

    def close(self) -> None:
        """Remove the probes (a window cut short by the end of training is dropped)."""
        for set_probe in self._setters.values():
            set_probe(None)
        self._window_start = None

    def load_records(self, records: dict[str, list[dict[str, Any]]]) -> None:
        """Continue from ``result()["layers"]`` of an earlier, checkpointed part of the run."""
        for name, rows in records.items():
            if name in self.records:
                self.records[name] = list(rows)

    def result(self) -> dict[str, Any]:
        """``{"every", "window", "layers": {name: [window records]}, "summary": {name: means}}``."""
        summary = {}
        for name, rows in self.records.items():
            summary[name] = {
                key: _mean([r[key] for r in rows if r[key] is not None])
                for key in ("cosine", "step_error", "cumulative_error", "mass_fraction")
            }
        return {
            "every": self.every,
            "window": self.window,
            "layers": self.records,
            "summary": summary,
        }
