"""``SparseMultiheadAttention``: ``nn.MultiheadAttention`` with sparsified projections.

``nn.MultiheadAttention.forward`` hands its raw weights to ``F.multi_head_attention_forward``,
bypassing the forward of its ``out_proj`` Linear, so converting that Linear alone would change
nothing. This module computes the same attention itself, with the q, k and v input projections
and the output projection as sparse linear transforms: each keeps its own k of the embed_dim
units (so a fused in_proj_weight never starves one of q, k, v) and its own memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msbp.config import SparseBackpropConfig
from msbp.functional import backward_recorded, sparse_linear
from msbp.nn.linear import SparseLinear
from msbp.nn.memory import MemoryMixin
from msbp.ops.touched_rows import note_dense_call

_PROJECTIONS = ("q", "k", "v")


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not allowed) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                  heads: int, batch_first: bool) -> None:
    """Raise ``ValueError`` where ``nn.MultiheadAttention`` refuses the shapes of query, key,
    value and attn_mask: the layer's own reshapes failed deep inside with messages that named
    neither argument ("shape '[4, 4, 4]' is invalid for input of size 96", "The size of tensor
    a (4) must match the size of tensor b (3)"), after the projections ran."""
    names = "query, key and value"
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"{names} must all be 3-D (batched) or all 2-D (unbatched), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key of shape {tuple(key.shape)} does not match value of shape "
            f"{tuple(value.shape)}: all but their last dimension must agree"
        )
    batched = query.dim() == 3
    b = 0 if batch_first else 1
    if batched and query.shape[b] != key.shape[b]:
        raise ValueError(
            f"query of shape {tuple(query.shape)} and key of shape {tuple(key.shape)} have "
            f"different batch sizes (dimension {b}{', batch_first' if batch_first else ''})"
        )
    if attn_mask is not None:
        t = 1 - b if batched else 0
        tgt, src = query.shape[t], key.shape[t]
        want = [(tgt, src), ((query.shape[b] if batched else 1) * heads, tgt, src)]
        if tuple(attn_mask.shape) not in want:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not fit query of shape "
                f"{tuple(query.shape)} and key of shape {tuple(key.shape)}: expected "
                f"{' or '.join(str(w) for w in want)}"
            )


def _copy_module_state(src: nn.Module, dst: nn.Module, skip: frozenset | set = frozenset()) -> None:
    """Initialise ``dst`` as a fresh ``nn.Module`` holding ``src``'s attributes, Parameter
    objects and submodules (shared, not copied), but not its hooks."""
    nn.Module.__init__(dst)
    fresh = set(vars(dst))
    for key, value in vars(src).items():
        if (key not in fresh or key == "training") and key not in skip:
            dst.__dict__[key] = value
    dst._parameters = dict(src._parameters)
    dst._buffers = dict(src._buffers)
    dst._modules = dict(src._modules)


class SparseMultiheadAttention(MemoryMixin, nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention`` (same parameters and state-dict keys) whose q, k, v
    and output projections backpropagate with MSBP.

    The memories of the input projections are ``memory_q``, ``memory_k``, ``memory_v`` ((E,)
    each for ``unit``); ``out_proj`` is a ``SparseLinear`` with its own ``memory``. The forward
    is ``nn.MultiheadAttention``'s math (masks, ``batch_first``, ``need_weights``,
    ``add_bias_kv``, ``add_zero_attn``, ``kdim`` / ``vdim``, dropout), computed with explicit
    attention weights rather than the fused kernel. Build it with ``from_dense`` (``sparsify``
    does). Inputs as ``nn.MultiheadAttention``: query (L, N, E) or (N, L, E) with
    ``batch_first``, or unbatched (L, E).

    Example:
        >>> mha = SparseMultiheadAttention.from_dense(
        ...     nn.MultiheadAttention(16, 4, batch_first=True), SparseBackpropConfig(k=4))
        >>> x = torch.randn(2, 5, 16)
        >>> mha(x, x, x)[0].sum().backward()
        >>> int((mha.in_proj_weight.grad[:16].abs().sum(1) > 0).sum())  # q: k units
        4
    """

    #: set by ``msbp.dense_backward``: run as a plain ``nn.MultiheadAttention``
    dense_mode: bool = False

    def _memory_names(self) -> list[tuple[str, str]]:
        if self._qkv_same_embed_dim:
            return [(f"memory_{p}", "in_proj_weight") for p in _PROJECTIONS]
        return [(f"memory_{p}", f"{p}_proj_weight") for p in _PROJECTIONS]

    def _memory_units(self) -> int:
        return self.embed_dim

    @property
    def name(self) -> str:
        return self.__dict__.get("_name", "")

    @name.setter
    def name(self, value: str) -> None:
        self.__dict__["_name"] = value
        if isinstance(self.__dict__["_modules"].get("out_proj"), SparseLinear):
            self.out_proj.name = f"{value}.out_proj" if value else "out_proj"

    def _projection(self, which: str) -> tuple[Tensor, Tensor | None]:
        e = self.embed_dim
        i = _PROJECTIONS.index(which)
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight[i * e:(i + 1) * e]
        else:
            weight = getattr(self, f"{which}_proj_weight")
        bias = None if self.in_proj_bias is None else self.in_proj_bias[i * e:(i + 1) * e]
        return weight, bias

    def _project(self, x: Tensor, which: str) -> Tensor:
        weight, bias = self._projection(which)
        memory = self._call_memory(f"memory_{which}")
        name = f"{self.name}.{which}_proj" if self.name else f"{which}_proj"
        return sparse_linear(x, weight, bias, memory, config=self.config,
                             generator=self.generator, name=name)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; returns (attn_output, attn_weights or None)."""
        params_need_grad = any(p.requires_grad for p in self.parameters())
        inputs_need_grad = query.requires_grad or key.requires_grad or value.requires_grad
        if self.dense_mode or not (backward_recorded() and (
            params_need_grad or inputs_need_grad
        )):
            if self.dense_mode:
                note_dense_call(*(self._parameters.get(w) for _, w in self._memory_names()),
                                self.out_proj._parameters.get("weight"))
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs the causal attn_mask too, as in "
                             "nn.MultiheadAttention")
        batched = query.dim() == 3
        _check_shapes(query, key, value, attn_mask, self.num_heads, self.batch_first)
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, e = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = self._project(query, "q")  # (L, N, E)
        k = self._project(key, "k")  # (S, N, E)
        v = self._project(value, "v")  # (S, N, E)
        attn_mask = _float_mask(attn_mask, q.dtype)
        key_padding_mask = _float_mask(key_padding_mask, q.dtype)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)  # (1, L, S)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = (
                None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
            )
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)  # (N H, L, hd)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)  # (N H, S, hd)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = k.new_zeros(bsz * heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = (
                None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
            )
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(
                    f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not fit "
                    f"batch {bsz} and source length {src_len}"
                )
            pad = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            pad = pad.reshape(bsz * heads, 1, src_len)
            attn_mask = pad if attn_mask is None else attn_mask + pad
        scores = torch.bmm(q * math.sqrt(1.0 / head_dim), k.transpose(1, 2))  # (N H, L, S)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, bsz, e)  # (L, N, E)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if batched else weights.squeeze(0)

    @classmethod
    def from_dense(
        cls, mha: nn.MultiheadAttention, config: SparseBackpropConfig | None = None
    ) -> SparseMultiheadAttention:
        """A ``SparseMultiheadAttention`` sharing ``mha``'s Parameter objects (not copies)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise ValueError(f"from_dense needs an nn.MultiheadAttention, got {type(mha).__name__}")
        layer = cls.__new__(cls)
        _copy_module_state(mha, layer)  # out_proj is then made sparse
        layer.config = config if config is not None else SparseBackpropConfig()
        layer.generator = None  # for selection="random"
        layer.out_proj = SparseLinear.from_dense(mha.out_proj, layer.config)
        layer.name = ""
        layer._init_memory()
        return layer

    def to_dense(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` sharing this module's Parameter objects; the
        memories are dropped."""
        mha = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
        _copy_module_state(self, mha, skip={"config", "generator", "_name"} | {
            mem for mem, _ in self._memory_names()
        })
        out = self.out_proj
        dense_out = nn.modules.linear.NonDynamicallyQuantizableLinear(
            out.in_features, out.out_features, bias=out.bias is not None,
            device="meta", dtype=out.weight.dtype,
        )
        dense_out.weight, dense_out.bias = out.weight, out.bias
        dense_out.train(out.training)
        mha.out_proj = dense_out
        return mha

    def extra_repr(self) -> str:
        return self._config_repr()
