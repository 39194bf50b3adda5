"""The memory state every sparse layer keeps: one float32 buffer per sparsified transform."""

from __future__ import annotations

import torch
from torch import Tensor

from msbp.config import SparseBackpropConfig
from msbp.functional import check_memory, memory_dtype


class MemoryMixin:
    """Memory buffers for an ``nn.Module`` with sparsified linear transforms.

    A subclass lists its transforms in ``_memory_names()`` as ``(buffer name, weight name)`` and
    says in ``_memory_units()`` how many output units each has. Each buffer is (units,) for the
    ``unit`` layout and (rows, units) for ``slot``; float32 (float64 for float64 weights) whatever
    ``.to()`` does to the weights; saved in ``state_dict()``.
    """

    config: SparseBackpropConfig

    def _memory_names(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _memory_units(self) -> int:
        raise NotImplementedError

    @property
    def k(self) -> int:
        """Number of output units propagated per transform and backward call."""
        return self.config.k_for(self._memory_units())

    def _empty_memory(self, weight: Tensor) -> Tensor:
        units = self._memory_units()
        shape = (units,) if self.config.memory_layout == "unit" else (0, units)
        return torch.zeros(shape, dtype=memory_dtype(weight.dtype), device=weight.device)

    def _init_memory(self) -> None:
        for mem, weight in self._memory_names():
            self.register_buffer(mem, self._empty_memory(getattr(self, weight)), persistent=True)

    def reset_memory(self) -> None:
        """Forget everything remembered (zeros; for ``slot``, no rows), in place."""
        for mem, _ in self._memory_names():
            self._reset_buffer(mem)

    @torch.no_grad()
    def _reset_buffer(self, mem: str) -> None:
        buf = getattr(self, mem)
        if self.config.memory_layout == "slot":
            buf.resize_(0, self._memory_units())
        buf.zero_()

    def check_memory(self) -> None:
        """Raise ``ValueError`` if a memory buffer does not fit its transform."""
        for mem, weight in self._memory_names():
            check_memory(
                getattr(self, mem), self._memory_units(), self.config.memory_layout,
                getattr(self, weight),
            )

    def _config_repr(self) -> str:
        c = self.config
        return (
            f"k={self.k}, selection={c.selection}, memory={c.memory}, "
            f"memory_layout={c.memory_layout}"
        )

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() would cast the memory too; it must stay float32 (float64
        # for float64 weights), so keep the old values and only move them.
        old = {mem: getattr(self, mem) for mem, _ in self._memory_names()}
        super()._apply(fn, recurse)
        for mem, weight in self._memory_names():
            want = memory_dtype(getattr(self, weight).dtype)
            if getattr(self, mem).dtype != want:
                setattr(self, mem, old[mem].to(device=getattr(self, mem).device, dtype=want))
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for mem, _ in self._memory_names():
            key = prefix + mem
            if key in state_dict:
                saved = state_dict[key] = self._memory_for_layout(state_dict[key])
                with torch.no_grad():  # a slot memory has the rows of the batch it was saved at
                    getattr(self, mem).resize_(saved.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for mem, _ in self._memory_names():
            key = prefix + mem
            if key not in state_dict and key in missing_keys:
                # a checkpoint of the dense model: start with an empty memory rather than fail
                missing_keys.remove(key)
                self._reset_buffer(mem)

    def _memory_for_layout(self, saved: Tensor) -> Tensor:
        """Convert a saved memory to this layer's layout, keeping its column sums."""
        if self.config.memory_layout == "unit" and saved.dim() == 2:
            return saved.sum(0)
        if self.config.memory_layout == "slot" and saved.dim() == 1:
            return saved.unsqueeze(0)
        return saved
