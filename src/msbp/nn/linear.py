"""``SparseLinear``: an ``nn.Linear`` whose backward pass is sparse backprop with memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from msbp.config import SparseBackpropConfig
from msbp.functional import (
    memory_dtype,
    sparse_embedding_linear,
    sparse_linear_checked,
    sparse_linear_fast_call,
)
from msbp.nn.memory import MemoryMixin
from msbp.ops.touched_rows import WEIGHT_TIED, note_dense_call
from msbp.ops.transient import TransientTuple


class SparseLinear(MemoryMixin, nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters and state-dict keys) with an MSBP backward.

    The forward pass is exactly ``nn.Linear``'s. In the backward pass only k output units of the
    gradient reach ``dW`` and ``dx``; what is not propagated is kept, times ``config.memory``, in
    ``memory`` (float32, or float64 for float64 weights), which is saved in ``state_dict()`` and
    moves with ``.to()``. It is per-process state, not a buffer, so ``DistributedDataParallel``
    never overwrites it with rank 0's (see ``msbp.gather_memory_state`` for checkpoints).
    Input: (*, in_features); output: (*, out_features).

    Example:
        >>> layer = SparseLinear(784, 500, config=SparseBackpropConfig(ratio=0.04))
        >>> layer(torch.randn(50, 784)).square().sum().backward()
        >>> int((layer.weight.grad.abs().sum(1) > 0).sum())  # k = 0.04 * 500 rows
        20
    """

    memory: Tensor
    #: set by ``msbp.dense_backward``: run as a plain ``nn.Linear`` (see there)
    dense_mode: bool = False
    # (config, weight, bias, memory, name, settings) of the last call that may take the short
    # path (see msbp.functional.sparse_linear_fast_call), or None
    _fast: tuple | None = None
    #: set by ``msbp.sparsify`` where the weight is also a parameter of a module that is not a
    #: ``SparseLinear`` (weight tying, e.g. a language model's head and its input embedding):
    #: its gradient then has rows written by that module too, which no log names, so the layer
    #: marks its weight for ``LazyRowAdam`` to step and zero whole, as ``torch.optim.Adam`` and
    #: ``Optimizer.zero_grad`` do. Set it by hand for a tie made after ``sparsify``.
    weight_tied: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        config: SparseBackpropConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config if config is not None else SparseBackpropConfig()
        self.name = ""  # set by sparsify(); names the layer in error messages
        self.generator: torch.Generator | None = None  # for selection="random"
        # probe(g, x, propagated) for information-loss measurements; see functional.sparse_linear
        self.probe = None
        self._init_memory()

    def _memory_names(self) -> list[tuple[str, str]]:
        return [("memory", "weight")]

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """As ``nn.Module``'s; a new ``weight`` with another number of rows (transformers'
        ``resize_token_embeddings`` on a sparsified language model's head) refits the memory:
        the units it keeps by index keep what they remembered, new ones start empty. A weight
        that is not (out, in) is left alone: FSDP's (``use_orig_params=True``) 1-D view of this
        process's shard, set between iterations, is no resize."""
        super().register_parameter(name, param)
        memory = self.__dict__.get("memory")
        if name != "weight" or param is None or memory is None or param.is_meta or (
            param.dim() != 2 or memory.shape[-1] == param.shape[0]
        ):
            return
        units = param.shape[0]
        fitted = torch.zeros((*memory.shape[:-1], units), dtype=memory_dtype(param.dtype),
                             device=param.device)
        keep = min(units, memory.shape[-1])
        if not memory.is_meta:
            fitted[..., :keep] = memory[..., :keep]
        self.memory = fitted

    def _memory_units(self) -> int:
        return self.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.dense_mode:
            weight = self.weight
            note_dense_call(weight)
            return F.linear(x, weight, self.bias)
        if self.weight_tied:
            self._mark_tied()
        params = self._parameters
        config, name, probe = self.config, self.name, self.probe
        memory = self._call_memory("memory")
        # not for a parametrized weight (weight_norm: each forward makes it anew) nor traced
        repeatable = "weight" in params and "bias" in params and (
            not torch.compiler.is_compiling()
        )
        weight, bias = (params["weight"], params["bias"]) if repeatable else (
            self.weight, self.bias
        )
        # the objects of the last call that passed every check: only what may differ between
        # calls is checked again (see sparse_linear_fast_call)
        fast = self._fast if repeatable else None
        if fast is not None and fast[0] is config and fast[1] is weight and fast[2] is bias and (
            fast[3] is memory and fast[4] == name and probe is None
        ):
            y = sparse_linear_fast_call(x, weight, bias, memory, fast[5])
            if y is not None:
                return y
        y, settings = sparse_linear_checked(
            x, weight, bias, memory, config, self.generator, name, probe
        )
        if repeatable:
            # (in __dict__ directly: nn.Module.__setattr__ costs microseconds; transient: a copy
            # or a pickle of the layer finds its own objects again)
            self.__dict__["_fast"] = None if settings is None else TransientTuple(
                (config, weight, bias, memory, name, settings)
            )
        return y

    def forward_embedded(self, ids: Tensor, table: Tensor) -> Tensor:
        """``self(F.embedding(ids, table).flatten(-2))`` with the fused backward of
        ``msbp.functional.sparse_embedding_linear``: ids (*, F) integer, table (V, d) with
        ``F d == in_features``; returns (*, out_features). Forward hooks run as for ``self(x)``
        (then through that call)."""
        if self.dense_mode or self._has_hooks():
            return self(F.embedding(ids, table).flatten(-2))
        if self.weight_tied:
            self._mark_tied()
        memory = self._call_memory("memory")
        return sparse_embedding_linear(
            ids, table, self.weight, self.bias, memory, config=self.config,
            generator=self.generator, name=self.name, probe=self.probe,
        )

    def _mark_tied(self) -> None:
        # on the Parameter, where the optimizer looks (again at every call: a deepcopy of the
        # model copies this attribute, not the Parameter's __dict__)
        if not torch.compiler.is_compiling():
            self.weight.__dict__[WEIGHT_TIED] = True

    def _has_hooks(self) -> bool:
        return bool(
            self._forward_hooks or self._forward_pre_hooks
            or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
        )

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, config: SparseBackpropConfig | None = None
    ) -> SparseLinear:
        """A ``SparseLinear`` that shares ``linear``'s Parameter objects (not copies)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_dense needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            config=config, device="meta", dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_memory()  # now on the weight's device
        layer.train(linear.training)
        return layer

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's Parameter objects; the memory is dropped."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device="meta", dtype=self.weight.dtype,
        )
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._config_repr()}"
