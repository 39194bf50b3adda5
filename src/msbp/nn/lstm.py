"""``SparseLSTM``: an ``nn.LSTM`` whose linear transforms backpropagate sparsely (meProp / MSBP).

An LSTM layer has two linear transforms producing the 4 x hidden gate pre-activations: the input
transform ``x_t W_ih^T + b_ih`` and the recurrent transform ``h_{t-1} W_hh^T + b_hh``. As in
meProp's LSTM, both are sparsified: in the backward pass only k of the 4 x hidden gate gradients
reach ``dW`` and ``dx`` / ``dh``.

Memory (one float32 tensor per transform, ``memory_ih_l0``, ``memory_hh_l0``, ...; per-process
state saved in ``state_dict()``, not a buffer, see ``msbp.nn.memory``):

- the input transform runs once on all time steps at once, (T * B, in) rows, so its memory
  changes once per backward pass, exactly as a ``SparseLinear``'s;
- the recurrent transform runs once per time step, so its backward runs T times per backward
  pass, from the last step to the first, and the memory is updated at each of them: what step t
  did not propagate is added to step t-1's gradient (and, after step 1, to the next batch's last
  step). This keeps one residual per gate unit whatever the sequence length, and it is the
  reading under which "nothing is lost, only delayed" (memory 1.0) still holds across steps.

The recurrence of each layer and direction is one autograd node
(``msbp.ops.recurrent.SparseLSTMRecurrence``), not a graph of a dozen ops per time step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp import native
from msbp.config import SparseBackpropConfig
from msbp.functional import (
    backward_recorded,
    check_memory,
    check_no_functorch,
    check_not_distributed_tensor,
    kept_grad_buffer,
    make_plan,
    sparse_linear,
)
from msbp.nn.memory import MemoryMixin
from msbp.ops import consensus
from msbp.ops.recurrent import SparseLSTMRecurrence
from msbp.ops.sparse_linear import autocast_arg, autocast_dtype
from msbp.ops.touched_rows import note_dense_call, note_sparse_weight


class LSTMDtypeError(ValueError, RuntimeError):
    """Input, hx or weights of a ``SparseLSTM`` call whose dtypes do not fit together.

    A ``ValueError`` (the project's error for bad input, and what ``nn.LSTM`` raises for an
    input whose dtype is not the weights') that is also a ``RuntimeError``, which ``nn.LSTM``
    raises deep in its kernels for the other mismatches (hx, or any under autocast): code written
    to catch either from ``nn.LSTM`` catches this one.
    """


class SparseLSTM(MemoryMixin, nn.RNNBase):
    """Drop-in ``nn.LSTM`` (same parameters and state-dict keys, plus the memories) with an
    MSBP backward on its input and recurrent transforms.

    It is an ``nn.RNNBase`` in LSTM mode, not an ``nn.LSTM`` subclass: ``torch.compile`` refuses
    to trace any instance of ``nn.LSTM`` (unless ``torch._dynamo.config.allow_rnn``), and it
    traces this module whole (``fullgraph=True``).

    Supports ``num_layers``, ``bias``, ``batch_first``, ``dropout``, ``bidirectional`` and
    unbatched input; not ``proj_size`` nor ``PackedSequence`` (pad instead: the outputs at valid
    positions of a forward-direction LSTM do not depend on the padding after them).
    Input: (T, B, in), or (B, T, in) with ``batch_first``, or (T, in); output as ``nn.LSTM``:
    (output, (h_n, c_n)) with output (T, B, D * hidden) and h_n, c_n (D * layers, B, hidden).
    The forward pass is exact; when autograd records it, it runs as a Python loop over time steps
    (slower than ``nn.LSTM``'s fused kernel); under ``torch.no_grad()`` it is ``nn.LSTM``'s.
    Dtypes are checked as ``nn.LSTM`` checks them, in both grad modes alike: a mismatch raises
    ``LSTMDtypeError`` (a ``ValueError`` and a ``RuntimeError``), see ``_check_dtypes``.

    Example:
        >>> lstm = SparseLSTM(16, 32, batch_first=True, config=SparseBackpropConfig(k=5))
        >>> out, (h, c) = lstm(torch.randn(4, 7, 16))
        >>> out.shape, h.shape
        (torch.Size([4, 7, 32]), torch.Size([1, 4, 32]))
    """

    #: set by ``msbp.dense_backward``: every transform runs as plain PyTorch ops (see there)
    dense_mode: bool = False

    # nn.LSTM's checks of (h, c), which its forward (run here under no_grad) calls
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        config: SparseBackpropConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
            dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype,
        )
        self.config = config if config is not None else SparseBackpropConfig()
        self.name = ""  # set by sparsify(); names the layer in error messages
        self.generator: torch.Generator | None = None  # for selection="random"
        # transform tag ("ih_l0", "hh_l0", ...) -> probe(g, x, propagated), for measuring
        # information loss (see msbp.info); empty in normal training
        self.probes: dict[str, Callable[[Tensor, Tensor, Tensor], None]] = {}
        self._init_memory()

    def transform_tags(self) -> list[str]:
        """The tags of the sparsified transforms: "ih_l0", "hh_l0", ... ("_reverse" suffixed)."""
        return [mem.removeprefix("memory_") for mem, _ in self._memory_names()]

    # -- memory -------------------------------------------------------------------------------

    def _memory_names(self) -> list[tuple[str, str]]:
        """(memory name, weight name) for every transform."""
        names = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[: 1 + self.bidirectional]:
                for kind in ("ih", "hh"):
                    tag = f"{kind}_l{layer}{suffix}"
                    names.append((f"memory_{tag}", f"weight_{tag}"))
        return names

    def _memory_units(self) -> int:
        return 4 * self.hidden_size

    # -- forward ------------------------------------------------------------------------------

    def _parts(self, tag: str) -> tuple[Tensor, Tensor | None, Tensor | None, str]:
        """Weight, bias, memory (None without memory) and error-message name of a transform."""
        weight = getattr(self, f"weight_{tag}")
        bias = getattr(self, f"bias_{tag}") if self.bias else None
        memory = self._call_memory(f"memory_{tag}")
        return weight, bias, memory, f"{self.name}.{tag}" if self.name else tag

    def _direction(
        self, x: Tensor, h: Tensor, c: Tensor, tag: str, reverse: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One layer, one direction. x: (T, B, in); h, c: (B, H) -> out (T, B, H), h, c."""
        if self.dense_mode:
            return self._direction_dense(x, h, c, tag, reverse)
        steps, batch = x.shape[0], x.shape[1]
        weight, bias, memory, name = self._parts(f"ih_{tag}")
        gates_x = sparse_linear(
            x.reshape(steps * batch, x.shape[2]), weight, bias, memory, config=self.config,
            generator=self.generator, name=name, probe=self.probes.get(f"ih_{tag}"),
        ).reshape(steps, batch, weight.shape[0])  # (T, B, 4H)
        weight, bias, memory, name = self._parts(f"hh_{tag}")
        if self.config.consensus:  # (the name read only then: traced code guards on it)
            consensus.refuse(True, f"SparseLSTM's recurrent transform {name!r}")
        if memory is not None:
            check_memory(memory, 4 * self.hidden_size, self.config.memory_layout, weight)
        plan = make_plan(
            self.config, 4 * self.hidden_size, generator=self.generator, name=name,
            probe=self.probes.get(f"hh_{tag}"),
        )
        # W_hh's kept gradient buffer, for the native backward to add its rows into (only where
        # that backward runs: a second buffer beside the PyTorch path's would be dead weight)
        buffer = None
        if (
            self.config.grad_inplace and plan.probe is None
            and weight.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling()
            and autocast_dtype(weight.device.type) is None
            and native.use_native(weight.device)
        ):
            buffer = kept_grad_buffer(weight)
        note_sparse_weight(weight)
        return SparseLSTMRecurrence.apply(gates_x, h, c, weight, bias, memory, plan, reverse,
                                          buffer)

    def _direction_dense(
        self, x: Tensor, h: Tensor, c: Tensor, tag: str, reverse: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``_direction`` in plain autograd ops: the dense gradient; no memory, probe or log."""
        w_ih, b_ih = getattr(self, f"weight_ih_{tag}"), getattr(self, f"bias_ih_{tag}", None)
        w_hh, b_hh = getattr(self, f"weight_hh_{tag}"), getattr(self, f"bias_hh_{tag}", None)
        note_dense_call(w_ih, w_hh)
        gates_x = F.linear(x, w_ih, b_ih if self.bias else None)  # (T, B, 4H)
        steps = x.shape[0]
        outs: list[Tensor] = [x] * steps  # placeholders, each overwritten below
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            gates = gates_x[t] + F.linear(h, w_hh, b_hh if self.bias else None)  # (B, 4H)
            i, f, g, o = gates.chunk(4, dim=1)  # PyTorch's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs[t] = h
        return torch.stack(outs), h, c

    def _needs_backward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None) -> bool:
        """Whether autograd will record this call; if not, it runs as a plain ``nn.LSTM``."""
        if not backward_recorded():
            return False
        tensors = [input, *(hx or ()), *self._flat_weights]
        return any(t is not None and t.requires_grad for t in tensors)

    def _check_dtypes(self, input: Tensor, hx: tuple[Tensor, Tensor] | None) -> None:
        """Raise ``LSTMDtypeError`` where ``nn.LSTM`` raises on dtypes: outside autocast the
        input, h0 and c0 must have the weights' dtype; under autocast each runs in autocast's
        dtype, float64 excepted (``autocast_arg``), and those must agree. One exception, as
        nn.LSTM's: a float64 layer takes a c0 of any floating dtype (c0 meets only elementwise
        ops, which promote it; the recurrence casts it, the same values)."""
        weight = self.weight_ih_l0
        cast = autocast_dtype(input.device.type)

        def runs_as(t: Tensor) -> torch.dtype:
            return t.dtype if cast is None else autocast_arg(t, cast).dtype

        want = runs_as(weight)
        if runs_as(input) == want and (hx is None or (
            runs_as(hx[0]) == want
            and (runs_as(hx[1]) == want or (want == torch.float64 and hx[1].is_floating_point()))
        )):
            return
        under = f" under autocast ({cast})" if cast is not None else ""
        if runs_as(input) != want:
            raise LSTMDtypeError(
                f"input of shape {tuple(input.shape)} and dtype {input.dtype} does not fit "
                f"SparseLSTM's {weight.dtype} weights{under}: convert the input "
                f"(input.to({weight.dtype})) or the module (module.to({input.dtype}))"
            )
        assert hx is not None  # the input fits, so hx does not
        h0, c0 = hx
        expected = f"{want} each" if cast is None else f"each to run as {want}"
        raise LSTMDtypeError(
            f"hx of dtypes {h0.dtype}, {c0.dtype} and shapes {tuple(h0.shape)}, "
            f"{tuple(c0.shape)} does not fit input of dtype {input.dtype} and SparseLSTM's "
            f"{weight.dtype} weights{under}: expected {expected}"
        )

    def forward(  # type: ignore[override]
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if not isinstance(input, Tensor):
            raise ValueError(
                f"SparseLSTM takes a padded tensor, got {type(input).__name__}; "
                "PackedSequence is not supported"
            )
        if self.proj_size:
            raise ValueError(f"SparseLSTM does not support proj_size={self.proj_size}")
        check_no_functorch("SparseLSTM", self.name, "SparseLSTM")
        unbatched = input.dim() == 2
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input of shape {tuple(input.shape)} does not fit SparseLSTM(input_size="
                f"{self.input_size}): expected (T, B, {self.input_size}), (B, T, "
                f"{self.input_size}) with batch_first, or (T, {self.input_size})"
            )
        x = input.unsqueeze(1) if unbatched else input
        if self.batch_first and not unbatched:
            x = x.transpose(0, 1)  # (T, B, in)
        if x.shape[0] == 0:
            raise ValueError(f"input of shape {tuple(input.shape)} has sequence length 0")
        dirs = 2 if self.bidirectional else 1
        batch = x.shape[1]
        if hx is None:
            zeros = x.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            want = (self.num_layers * dirs, batch, self.hidden_size)
            if tuple(h0.shape) != want or tuple(c0.shape) != want:
                raise ValueError(
                    f"hx of shapes {tuple(h0.shape)}, {tuple(c0.shape)}: expected {want} each"
                )
        # before the two paths part: the autograd one cast hx silently where nn.LSTM's raised
        self._check_dtypes(input, hx)
        if not self._needs_backward(input, hx):
            # no backward, so nothing sparse to do: nn.LSTM's fused kernel, the same function
            return nn.LSTM.forward(self, input, hx)
        check_not_distributed_tensor((input, *self._flat_weights), "SparseLSTM", self.name,
                                     "SparseLSTM")
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                j = layer * dirs + d
                tag = f"l{layer}" + ("_reverse" if d else "")
                out, h, c = self._direction(x, h0[j], c0[j], tag, reverse=bool(d))
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if dirs == 1 else torch.cat(outs, dim=2)  # (T, B, D H)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        output = x
        hn, cn = torch.stack(h_n), torch.stack(c_n)  # (D layers, B, H)
        if unbatched:
            return output.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (hn, cn)

    # -- conversion ---------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, lstm: nn.LSTM, config: SparseBackpropConfig | None = None) -> SparseLSTM:
        """A ``SparseLSTM`` that shares ``lstm``'s Parameter objects (not copies)."""
        if not isinstance(lstm, nn.LSTM):
            raise ValueError(f"from_dense needs an nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise ValueError(f"SparseLSTM does not support proj_size={lstm.proj_size}")
        new = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias,
            batch_first=lstm.batch_first, dropout=lstm.dropout,
            bidirectional=lstm.bidirectional, config=config, device="meta",
            dtype=lstm.weight_ih_l0.dtype,
        )
        for name in lstm._flat_weights_names:
            setattr(new, name, getattr(lstm, name))
        new._init_memory()  # now on the weights' device
        new.train(lstm.training)
        return new

    def to_dense(self) -> nn.LSTM:
        """A plain ``nn.LSTM`` sharing this module's Parameter objects; the memory is dropped."""
        lstm = nn.LSTM(
            self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout,
            bidirectional=self.bidirectional, device="meta", dtype=self.weight_ih_l0.dtype,
        )
        for name in self._flat_weights_names:
            setattr(lstm, name, getattr(self, name))
        lstm.train(self.training)
        return lstm

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._config_repr()}"
