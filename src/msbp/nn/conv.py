"""``SparseConv1d`` / ``SparseConv2d``: convolutions whose backward is MSBP over output channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp.config import SparseBackpropConfig
from msbp.functional import (
    backward_recorded,
    check_memory,
    check_no_functorch,
    check_not_distributed_tensor,
    make_plan,
)
from msbp.nn.memory import MemoryMixin
from msbp.ops import consensus
from msbp.ops.sparse_conv import PER_EXAMPLE_ERROR, ConvGeometry, group_k, sparse_conv
from msbp.ops.touched_rows import note_dense_call


class _SparseConvNd(MemoryMixin):
    """What ``SparseConv1d`` and ``SparseConv2d`` share; mixed into the ``nn.ConvNd`` class."""

    memory: Tensor
    #: set by ``msbp.dense_backward``: run as the plain convolution (see there)
    dense_mode: bool = False
    _dense: type[nn.Module]
    _spatial: int

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
        dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
        config: SparseBackpropConfig | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        self._dense.__init__(  # nn.Conv1d / nn.Conv2d: same arguments
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, device=device, dtype=dtype,
        )
        self._setup(config)

    def _setup(self, config: SparseBackpropConfig | None) -> None:
        self.config = config if config is not None else SparseBackpropConfig()
        self._check_config(self.config)
        self.name = ""  # set by sparsify(); names the layer in error messages
        self.generator: torch.Generator | None = None  # for selection="random"
        self._init_memory()

    @staticmethod
    def _check_config(config: SparseBackpropConfig) -> None:
        if config.selection == "per_example":
            raise ValueError(PER_EXAMPLE_ERROR)

    def _memory_names(self) -> list[tuple[str, str]]:
        return [("memory", "weight")]

    def _memory_units(self) -> int:
        return self.out_channels

    @property
    def k(self) -> int:
        """Output channels propagated per backward call (ceil(k / groups) in every group)."""
        kg = group_k(self.config.k_for(self.out_channels), self.out_channels, self.groups)
        return kg * self.groups

    def _geometry(self, x: Tensor) -> tuple[Tensor, ConvGeometry]:
        """The input padded as ``nn.ConvNd`` would, and the integer geometry to use on it."""
        d = self._spatial
        pads = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        if self.padding_mode != "zeros":
            x = F.pad(x, pads, mode=self.padding_mode)
            padding = (0,) * d
        elif isinstance(self.padding, str):  # "same" / "valid": left may differ from right
            if all(pads[2 * i] == pads[2 * i + 1] for i in range(d)):
                padding = tuple(pads[2 * i] for i in reversed(range(d)))
            else:
                x = F.pad(x, pads)
                padding = (0,) * d
        else:
            padding = tuple(self.padding)
        geo = ConvGeometry(tuple(self.stride), padding, tuple(self.dilation), self.groups)
        return x, geo

    def forward(self, x: Tensor) -> Tensor:
        if self.dense_mode or not backward_recorded():
            if self.dense_mode:
                note_dense_call(self._parameters.get("weight"))
            return self._dense.forward(self, x)
        # read once: a parametrized weight is computed at every read, and spectral_norm's
        # computation advances its power iteration (three reads made three steps of it per
        # call, where nn.Conv2d makes one)
        weight, bias = self.weight, self.bias
        if not (x.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad
        )):
            return self._conv_forward(x, weight, bias)
        if x.dim() not in (self._spatial + 1, self._spatial + 2):
            raise ValueError(
                f"{type(self).__name__} expects a {self._spatial + 1}-D or "
                f"{self._spatial + 2}-D input, got shape {tuple(x.shape)}"
            )
        if x.device != weight.device:
            # (torch.convolution takes a meta input with a CPU weight; the backward failed)
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} is on {x.device} but "
                f"the weight is on {weight.device}"
            )
        self._check_config(self.config)
        if self.config.consensus:  # (the name read only then: traced code guards on it)
            consensus.refuse(True, f"{type(self).__name__} {self.name!r}")
        check_no_functorch(type(self).__name__, self.name)
        check_not_distributed_tensor((x, weight), type(self).__name__, self.name)
        unbatched = x.dim() == self._spatial + 1
        if unbatched:
            x = x.unsqueeze(0)
        x, geo = self._geometry(x)
        memory = self._call_memory("memory")
        if memory is not None:
            check_memory(memory, self.out_channels, self.config.memory_layout, weight)
        plan = make_plan(self.config, self.out_channels, generator=self.generator, name=self.name)
        y = sparse_conv(x, weight, bias, memory, plan, geo)
        return y.squeeze(0) if unbatched else y

    @classmethod
    def from_dense(cls, conv: nn.Module, config: SparseBackpropConfig | None = None):
        """A sparse convolution sharing ``conv``'s Parameter objects (not copies)."""
        if type(conv) is not cls._dense and not isinstance(conv, cls._dense):
            raise ValueError(
                f"from_dense needs an {cls._dense.__name__}, got {type(conv).__name__}"
            )
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, config=config,
            device="meta", dtype=conv.weight.dtype,
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._init_memory()  # now on the weight's device
        layer.train(conv.training)
        return layer

    def to_dense(self) -> nn.Module:
        """The plain convolution sharing this layer's Parameter objects; the memory is dropped."""
        conv = self._dense(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device="meta", dtype=self.weight.dtype,
        )
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        return f"{self._dense.extra_repr(self)}, {self._config_repr()}"


class SparseConv2d(_SparseConvNd, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` (same parameters and state-dict keys) with an MSBP backward.

    The output gradient (N, C_out, H, W) is read as rows = N x H x W and units = output
    channels: ``unified`` (by the sum of |U| over the rows) or ``random`` selection keeps k
    channels for the batch, and dx and dW are dense convolutions of width k on those channels.
    With ``groups`` > 1 each group keeps ceil(k / groups) channels. ``memory`` is (C_out,) for
    the ``unit`` layout (the residual summed over the rows, added back as M / rows) or
    (N H W, C_out) for ``slot``. ``selection="per_example"`` raises ``ValueError`` (a row
    keeping its own channels is not a convolution). stride, padding (also ``"same"``),
    dilation, groups, bias and every ``padding_mode`` work as in ``nn.Conv2d``.
    Input: (N, C_in, H, W) or (C_in, H, W).

    Example:
        >>> conv = SparseConv2d(3, 16, 3, padding=1, config=SparseBackpropConfig(k=4))
        >>> conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
        >>> int((conv.weight.grad.flatten(1).abs().sum(1) > 0).sum())
        4
    """

    _dense = nn.Conv2d
    _spatial = 2



class SparseConv1d(_SparseConvNd, nn.Conv1d):
    """``SparseConv2d`` for ``nn.Conv1d``: rows = N x L, units = output channels.
    Input: (N, C_in, L) or (C_in, L)."""

    _dense = nn.Conv1d
    _spatial = 1

