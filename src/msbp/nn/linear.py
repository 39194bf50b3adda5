"""``SparseLinear``: an ``nn.Linear`` whose backward pass is sparse backprop with memory."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from msbp.config import SparseBackpropConfig
from msbp.functional import check_memory, memory_dtype, sparse_linear


class SparseLinear(nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters and state-dict keys) with an MSBP backward.

    The forward pass is exactly ``nn.Linear``'s. In the backward pass only k output units of the
    gradient reach ``dW`` and ``dx``; what is not propagated is kept, times ``config.memory``, in
    the buffer ``memory`` (float32, or float64 for float64 weights), which is saved in
    ``state_dict()`` and moves with ``.to()``. Input: (*, in_features); output: (*, out_features).

    Example:
        >>> layer = SparseLinear(784, 500, config=SparseBackpropConfig(ratio=0.04))
        >>> layer(torch.randn(50, 784)).square().sum().backward()
        >>> int((layer.weight.grad.abs().sum(1) > 0).sum())  # k = 0.04 * 500 rows
        20
    """

    memory: Tensor

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
        self.register_buffer("memory", self._empty_memory(), persistent=True)

    def _empty_memory(self) -> Tensor:
        out = self.out_features
        shape = (out,) if self.config.memory_layout == "unit" else (0, out)
        return torch.zeros(shape, dtype=memory_dtype(self.weight.dtype), device=self.weight.device)

    @property
    def k(self) -> int:
        """Number of output units propagated per backward pass."""
        return self.config.k_for(self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        memory = self.memory if self.config.memory > 0 else None
        return sparse_linear(
            x, self.weight, self.bias, memory, config=self.config,
            generator=self.generator, name=self.name, probe=self.probe,
        )

    def reset_memory(self) -> None:
        """Forget everything remembered (zeros; for ``slot``, no rows), in place."""
        with torch.no_grad():
            if self.config.memory_layout == "slot":
                self.memory.resize_(0, self.out_features)
            self.memory.zero_()

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
        layer.memory = layer._empty_memory()  # now on the weight's device
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
        c = self.config
        return (
            f"{super().extra_repr()}, k={self.k}, selection={c.selection}, memory={c.memory}, "
            f"memory_layout={c.memory_layout}"
        )

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() would cast the memory too; it must stay float32 (float64
        # for float64 weights), so keep the old values and only move them.
        old = self.memory
        super()._apply(fn, recurse)
        want = memory_dtype(self.weight.dtype)
        if self.memory.dtype != want:
            self.memory = old.to(device=self.memory.device, dtype=want)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "memory"
        if key in state_dict:
            state_dict[key] = self._memory_for_layout(state_dict[key])
            with torch.no_grad():  # a slot memory has the rows of the batch it was saved at
                self.memory.resize_(state_dict[key].shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key not in state_dict and key in missing_keys:
            # a checkpoint of a dense model: start with an empty memory rather than fail
            missing_keys.remove(key)
            self.reset_memory()

    def _memory_for_layout(self, saved: Tensor) -> Tensor:
        """Convert a saved memory to this layer's layout, keeping its column sums."""
        if self.config.memory_layout == "unit" and saved.dim() == 2:
            return saved.sum(0)
        if self.config.memory_layout == "slot" and saved.dim() == 1:
            return saved.unsqueeze(0)
        return saved

    def check_memory(self) -> None:
        """Raise ``ValueError`` if the memory buffer does not fit this layer."""
        check_memory(self.memory, self.out_features, self.config.memory_layout, self.weight)
