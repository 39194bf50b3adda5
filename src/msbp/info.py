"""Information loss of sparse backprop, measured during training (method.md, section 4).

``InfoLossMeter`` samples windows of training steps. On every measured step it compares, per
sparsified transform (each ``SparseLinear``; the input and recurrent transforms of each
``SparseLSTM``, named ``lstm.ih_l0``, ``lstm.hh_l0``, ...), three weight gradients:

- the sparse one the training step used, ``S = P^T x``: ``P`` (n, out) is the part of the output
  gradient the transform propagated, ``x`` (n, in) its input (a probe in the backward hands both
  over; a transform called several times in one step, as the recurrent one, sums its calls);
- the true dense one, ``D``: the gradient of the same loss on the same batch through the same
  weights with *every* sparse layer dense, from one extra forward and backward pass (under
  ``msbp.dense_backward``) before the training step. It leaves the training untouched: the
  memory, the buffers, the random streams and ``.grad`` are as without the meter;
- the arrived one, ``A = G^T x``: ``G`` is the output gradient that reached the transform in the
  training backward. It already carries the sparsification of every layer above, so it is *not*
  the true gradient of a lower layer; it measures the transform's own selection only.

Per window record (means over its steps unless said otherwise):

- ``cosine`` (and ``cosine_min``): cos(S, D), the sparse against the true dense weight gradient;
- ``step_error``: |S - D| / |D| (Frobenius norms);
- ``cumulative_error``: |sum_t S_t - sum_t D_t| / |sum_t D_t| over the window's consecutive
  steps, the view in which a memory should help (what is dropped now is sent later);
- ``upstream_cosine``: cos(A, D), how much the layers above already bent the gradient that
  reached this transform (1 for the topmost sparse layer under a dense one);
- ``local_cosine``, ``local_step_error``, ``local_cumulative_error``: the same three measures
  against ``A`` instead of ``D`` (no extra pass needed): the loss of this transform's own
  selection, given what reached it;
- ``local_mass_fraction``: sum |P| / sum |G|, the share of the arrived gradient's mass that is
  propagated (above 1 is possible with a memory, which adds remembered mass).

The measures against ``D`` need the step's loss (``start_step(step, loss_fn)``); without it they
are None. Outside the sampled windows the meter costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from msbp.convert import dense_backward
from msbp.nn import SparseLinear, SparseLSTM

Probe = Callable[[Tensor, Tensor, Tensor], None]
#: the keys of a window record that are averaged into the summary
MEASURES = (
    "cosine", "step_error", "cumulative_error", "upstream_cosine",
    "local_cosine", "local_step_error", "local_cumulative_error", "local_mass_fraction",
)


def _cosine(a: Tensor, b: Tensor) -> float | None:
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a == 0 or norm_b == 0:
        return None
    return max(-1.0, min(1.0, float((a * b).sum()) / (norm_a * norm_b)))


def _rel_error(a: Tensor, b: Tensor) -> float | None:
    norm_b = float(b.norm())
    return float((a - b).norm()) / norm_b if norm_b > 0 else None


def _add(total: Tensor | None, t: Tensor) -> Tensor:
    return t if total is None else total + t


class _LayerWindow:
    """Accumulators of one transform over the current step and the current window."""

    def __init__(self) -> None:
        self.reset_window()

    def reset_window(self) -> None:
        self.win_sparse: Tensor | None = None  # (out, in) float64, sum of S_t
        self.win_arrived: Tensor | None = None  # sum of A_t
        self.win_dense: Tensor | None = None  # sum of D_t
        self.win_sparse_ref: Tensor | None = None  # sum of S_t over the steps that have a D_t
        self.values: dict[str, list[float]] = {}
        self.reset_step()

    def reset_step(self) -> None:
        self.step_sparse: Tensor | None = None  # (out, in) float64
        self.step_arrived: Tensor | None = None
        self.step_dense: Tensor | None = None  # set before the training backward
        self.mass_propagated = 0.0
        self.mass_arrived = 0.0

    def probe(self, g: Tensor, x: Tensor, propagated: Tensor) -> None:
        x64 = x.detach().double()  # (n, in)
        self.step_sparse = _add(self.step_sparse, propagated.detach().double().t() @ x64)
        self.step_arrived = _add(self.step_arrived, g.detach().double().t() @ x64)
        self.mass_propagated += float(propagated.detach().abs().sum(dtype=torch.float64))
        self.mass_arrived += float(g.detach().abs().sum(dtype=torch.float64))

    def _note(self, key: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(key, []).append(value)

    def end_step(self) -> None:
        if self.step_sparse is None or self.step_arrived is None:
            self.reset_step()
            return  # the transform took no part in this step
        s, a, d = self.step_sparse, self.step_arrived, self.step_dense
        self._note("local_cosine", _cosine(s, a))
        self._note("local_step_error", _rel_error(s, a))
        if self.mass_arrived > 0:
            self._note("local_mass_fraction", self.mass_propagated / self.mass_arrived)
        self.win_sparse = _add(self.win_sparse, s)
        self.win_arrived = _add(self.win_arrived, a)
        if d is not None:
            self._note("cosine", _cosine(s, d))
            self._note("step_error", _rel_error(s, d))
            self._note("upstream_cosine", _cosine(a, d))
            self.win_dense = _add(self.win_dense, d)
            self.win_sparse_ref = _add(self.win_sparse_ref, s)
        self.reset_step()

    def window_record(self, step: int, steps: int) -> dict[str, Any] | None:
        if self.win_sparse is None or self.win_arrived is None:
            return None
        cosines = self.values.get("cosine", [])
        record: dict[str, Any] = {"step": step, "steps": steps}
        for key in MEASURES:
            record[key] = _mean(self.values.get(key, []))
        record["cosine_min"] = min(cosines) if cosines else None
        record["local_cumulative_error"] = _rel_error(self.win_sparse, self.win_arrived)
        record["cumulative_error"] = (
            _rel_error(self.win_sparse_ref, self.win_dense)
            if self.win_sparse_ref is not None and self.win_dense is not None else None
        )
        return record


def _set_lstm_probe(lstm: SparseLSTM, tag: str, probe: Probe | None) -> None:
    if probe is None:
        lstm.probes.pop(tag, None)
    else:
        lstm.probes[tag] = probe


def _transforms(model: nn.Module) -> dict[str, tuple[Callable[[Probe | None], None], Tensor]]:
    """Name -> (setter of the probe, weight), for every sparsified transform of ``model``."""
    found: dict[str, tuple[Callable[[Probe | None], None], Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            found[name] = (partial(setattr, module, "probe"), module.weight)
        elif isinstance(module, SparseLSTM):
            for tag in module.transform_tags():
                found[f"{name}.{tag}" if name else tag] = (
                    partial(_set_lstm_probe, module, tag), getattr(module, f"weight_{tag}"),
                )
    return found


def probe_setters(model: nn.Module) -> dict[str, Callable[[Probe | None], None]]:
    """Name -> setter of the probe, for every sparsified transform of ``model``."""
    return {name: setter for name, (setter, _) in _transforms(model).items()}


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def dense_weight_grads(
    model: nn.Module, loss_fn: Callable[[], Tensor], weights: list[Tensor]
) -> list[Tensor]:
    """The gradients (each shaped as its weight) of ``loss_fn()`` with every sparse layer of
    ``model`` dense, leaving the model, the random streams and ``.grad`` as they were.

    ``loss_fn`` is called once, under the random state it would meet if called now, so dropout
    draws the same masks as the training forward that follows; that state is restored after.
    Buffers the forward changes (batch-norm statistics) are restored too. A weight the loss does
    not reach gets zeros.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({w.device.index or 0 for w in weights if w.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), dense_backward(model), torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    with torch.no_grad():
        for buf, saved in buffers:
            if buf.shape != saved.shape or not torch.equal(buf, saved):
                buf.resize_(saved.shape).copy_(saved)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads, strict=True)]


class InfoLossMeter:
    """Measures the information loss of every sparsified transform of ``model`` during training.

    Windows of ``window`` consecutive steps start every ``every`` steps (step 0, ``every``,
    ``2 * every``, ...); inside a window every step is measured, so the cumulative error sees
    every gradient the window produced. Call ``start_step(step, loss_fn)`` before the training
    forward pass (``loss_fn()`` must compute that step's loss on that step's batch, as training
    does), ``end_step(step)`` after the backward pass of every training step, and ``close()`` at
    the end. The measures are described in the module's docstring; on a measured step the meter
    runs one extra dense forward and backward pass, which does not change the training.

    Example:
        >>> meter = InfoLossMeter(model, every=1000, window=100)  # doctest: +SKIP
        >>> for step, (x, y) in enumerate(batches):  # doctest: +SKIP
        ...     meter.start_step(step, lambda: loss(model(x), y))
        ...     loss(model(x), y).backward(); optimizer.step(); meter.end_step(step)
        >>> meter.result()["summary"]["hidden.0"]["cosine"]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, every: int = 1000, window: int = 100) -> None:
        if window < 1 or every < window:
            raise ValueError(f"need 1 <= window <= every, got window={window}, every={every}")
        self.every = every
        self.window = window
        self.model = model
        transforms = _transforms(model)
        self._setters = {name: setter for name, (setter, _) in transforms.items()}
        self._weights = {name: weight for name, (_, weight) in transforms.items()}
        self.records: dict[str, list[dict[str, Any]]] = {name: [] for name in transforms}
        self._windows = {name: _LayerWindow() for name in transforms}
        self._window_start: int | None = None
        #: the true dense weight gradient (out, in) float64 of the last measured step, per name
        self.dense_grads: dict[str, Tensor] = {}

    def _in_window(self, step: int) -> bool:
        return step % self.every < self.window

    def start_step(self, step: int, loss_fn: Callable[[], Tensor] | None = None) -> None:
        """Turn the probes on for a step inside a sampled window, off otherwise; on a measured
        step with ``loss_fn``, compute the true dense weight gradients first."""
        measuring = self._in_window(step)
        if measuring and step % self.every == 0:
            self._window_start = step
            for acc in self._windows.values():
                acc.reset_window()
        measuring = measuring and self._window_start is not None
        self.dense_grads = {}
        if measuring and loss_fn is not None:
            names = [n for n, w in self._weights.items() if w.requires_grad]
            grads = dense_weight_grads(self.model, loss_fn, [self._weights[n] for n in names])
            for name, grad in zip(names, grads, strict=True):
                self.dense_grads[name] = grad.detach().double()
                self._windows[name].step_dense = self.dense_grads[name]
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
                key: _mean([r[key] for r in rows if r.get(key) is not None]) for key in MEASURES
            }
        return {
            "every": self.every,
            "window": self.window,
            "layers": self.records,
            "summary": summary,
        }
