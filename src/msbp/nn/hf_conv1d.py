"""``SparseHFConv1D``: transformers' ``Conv1D`` (GPT-2's linear layer) with an MSBP backward.

``transformers.pytorch_utils.Conv1D`` is a linear layer, ``y = x W + b``, whose weight is stored
transposed, (in, out), and which is no ``nn.Linear``: GPT-2, OpenAI GPT, CTRL and ImageGPT build
their attention and MLP projections from it. transformers stays an optional dependency: this
module never imports it; ``sparsify`` recognises ``Conv1D`` by its class and module name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from msbp.config import SparseBackpropConfig
from msbp.functional import sparse_linear
from msbp.nn.memory import MemoryMixin
from msbp.ops.touched_rows import note_dense_call


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly transformers' ``Conv1D`` (not a subclass)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


class SparseHFConv1D(MemoryMixin, nn.Module):
    """Drop-in for transformers' ``Conv1D`` (same parameters ``weight`` (nx, nf) and ``bias``
    (nf,), same state-dict keys plus ``memory``): ``y = x W + b`` with an MSBP backward over the
    nf output units, exactly as a ``SparseLinear`` with weight ``W^T``.

    The forward is exact. The weight gradient reaches autograd through the transposed view, so
    it is handed over dense (nx x nf) rather than written as k rows in place. Build it with
    ``from_dense`` (``sparsify`` does). Input (*, nx); output (*, nf).
    """

    memory: Tensor
    #: set by ``msbp.dense_backward``: run as the plain ``Conv1D``
    dense_mode: bool = False

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        config: SparseBackpropConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)  # Conv1D's own initialisation
        self.config = config if config is not None else SparseBackpropConfig()
        self.name = ""  # set by sparsify(); names the layer in error messages
        self.generator: torch.Generator | None = None  # for selection="random"
        self.probe = None
        self._dense_cls: type[nn.Module] | None = None  # the Conv1D class, for to_dense
        self._init_memory()

    def _memory_names(self) -> list[tuple[str, str]]:
        return [("memory", "weight")]

    def _memory_units(self) -> int:
        return self.nf

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.t()  # (nf, nx): the nn.Linear orientation
        if self.dense_mode:
            note_dense_call(self.weight)
            return nn.functional.linear(x, weight, self.bias)
        memory = self._call_memory("memory")
        return sparse_linear(
            x, weight, self.bias, memory, config=self.config,
            generator=self.generator, name=self.name, probe=self.probe,
        )

    @classmethod
    def from_dense(
        cls, conv: nn.Module, config: SparseBackpropConfig | None = None
    ) -> SparseHFConv1D:
        """A ``SparseHFConv1D`` sharing ``conv``'s Parameter objects (not copies)."""
        if not is_hf_conv1d(conv):
            raise ValueError(
                f"from_dense needs a transformers Conv1D, got {type(conv).__name__}"
            )
        layer = cls(conv.nf, conv.weight.shape[0], config=config, device="meta",
                    dtype=conv.weight.dtype)
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._dense_cls = type(conv)
        layer._init_memory()  # now on the weight's device
        layer.train(conv.training)
        return layer

    def to_dense(self) -> nn.Module:
        """A plain transformers ``Conv1D`` sharing this layer's Parameter objects; the memory
        is dropped."""
        cls = self._dense_cls
        if cls is None:
            from transformers.pytorch_utils import Conv1D as cls
        with torch.device("meta"):
            dense = cls(self.nf, self.nx)
        dense.weight = self.weight
        dense.bias = self.bias
        dense.train(self.training)
        return dense

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._config_repr()}"
