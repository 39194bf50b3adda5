"""The memory state every sparse layer keeps: one float32 tensor per sparsified transform.

The memory is per-process layer state, not a registered buffer: ``DistributedDataParallel``
broadcasts rank 0's buffers into every rank at every forward (``broadcast_buffers=True``) and at
construction, whichever module ``sparsify`` was called on, and each rank must keep what its own
backward did not propagate. Everything else a buffer gives is kept by hand: the memory is saved
in ``state_dict()`` under its name (``memory``, ``memory_hh_l0``, ...), moves with ``.to()``,
and survives ``copy.deepcopy`` (an ordinary tensor attribute). To checkpoint every rank's
memory use ``gather_memory_state`` / ``load_memory_state``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from msbp import native
from msbp.config import SparseBackpropConfig
from msbp.functional import check_memory, memory_dtype


class MemoryMixin:
    """Memory tensors for an ``nn.Module`` with sparsified linear transforms.

    A subclass lists its transforms in ``_memory_names()`` as ``(memory name, weight name)`` and
    says in ``_memory_units()`` how many output units each has. Each memory is (units,) for the
    ``unit`` layout and (rows, units) for ``slot``; float32 (float64 for float64 weights) whatever
    ``.to()`` does to the weights; saved in ``state_dict()``; never a buffer (see the module
    docstring), so ``named_buffers()`` does not list it: use ``named_memories()``.
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

    def named_memories(self) -> Iterator[tuple[str, Tensor]]:
        """(name, memory) of every transform of this module: ``("memory", (out,))`` for a
        ``SparseLinear``, ``("memory_ih_l0", (4 H,))``, ... for a ``SparseLSTM``."""
        for mem, _ in self._memory_names():
            yield mem, getattr(self, mem)

    def _weight(self, name: str) -> Tensor:
        """The weight a memory belongs to, for its dtype, device and shape, without computing a
        parametrized one: spectral_norm's parametrization advances its power iteration at
        every computation (``.to()`` on a sparse layer moved it where the dense layer's did
        not)."""
        parametrizations = self.__dict__["_modules"].get("parametrizations")
        if parametrizations is not None and name in parametrizations:
            plist = parametrizations[name]
            return plist.original if hasattr(plist, "original") else plist.original0
        return getattr(self, name)

    def _empty_memory(self, weight: Tensor) -> Tensor:
        units = self._memory_units()
        shape = (units,) if self.config.memory_layout == "unit" else (0, units)
        return torch.zeros(shape, dtype=memory_dtype(weight.dtype), device=weight.device)

    def _init_memory(self) -> None:
        native.prepare()  # build or load the kernels now, never inside a compiled region
        for mem, weight in self._memory_names():
            # a plain attribute (nn.Module.__setattr__ keeps unregistered tensors in __dict__)
            setattr(self, mem, self._empty_memory(self._weight(weight)))

    def _call_memory(self, mem: str) -> Tensor | None:
        """Memory ``mem`` as a call of the layer hands it to its backward: None with
        ``memory=0``. A slot memory grows in place with the batch, so its storage must be able
        to: one that cannot (``Tensor.numpy()`` of a state dict, which shares it, as
        ``np.savez`` or a digest does; ``torch.from_numpy``) made the next larger batch raise
        "Trying to resize storage that is not resizable" and left the memory claiming rows it
        has no storage for (a later call read past it: a segmentation fault). Such a memory is
        replaced by a copy that can grow (``_resizable``)."""
        if self.config.memory == 0:
            return None
        memory = getattr(self, mem)
        if self.config.memory_layout == "slot" and not torch.compiler.is_compiling():
            grown = _resizable(memory)
            if grown is not memory:
                setattr(self, mem, grown)
            return grown
        return memory

    def reset_memory(self) -> None:
        """Forget everything remembered (zeros; for ``slot``, no rows), in place."""
        for mem, _ in self._memory_names():
            self._reset_memory_tensor(mem)

    @torch.no_grad()
    def _reset_memory_tensor(self, mem: str) -> None:
        buf = getattr(self, mem)
        if self.config.memory_layout == "slot":
            buf.resize_(0, self._memory_units())
        buf.zero_()

    def check_memory(self) -> None:
        """Raise ``ValueError`` if a memory tensor does not fit its transform."""
        for mem, weight in self._memory_names():
            check_memory(
                getattr(self, mem), self._memory_units(), self.config.memory_layout,
                self._weight(weight),
            )

    def _config_repr(self) -> str:
        c = self.config
        return (
            f"k={self.k}, selection={c.selection}, memory={c.memory}, "
            f"memory_layout={c.memory_layout}"
        )

    # -- what a buffer would have done ----------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # fn moves / casts / shares tensors (.to(), .cuda(), .half(), share_memory()); the memory
        # follows it but keeps its own dtype rule: float32, float64 for float64 weights.
        super()._apply(fn, recurse)
        for mem, weight in self._memory_names():
            old = getattr(self, mem)
            new = fn(old)
            want = memory_dtype(self._weight(weight).dtype)
            if old.is_meta and not new.is_meta:
                # to_empty() of a model built on the meta device: a meta memory holds nothing, so
                # it starts empty, not as whatever the new storage held (weights get initialised
                # or loaded by the user; nobody initialises the memory, which is msbp's)
                new = torch.zeros(new.shape, dtype=want, device=new.device)
            elif new.dtype != want:
                new = old.to(device=new.device, dtype=want)
            setattr(self, mem, new)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for mem, memory in self.named_memories():
            destination[prefix + mem] = memory if keep_vars else memory.detach()
        # mark which keys are memories, so that msbp.dense_state_dict can strip exactly those
        # from a saved state dict (the metadata survives torch.save / torch.load)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            local = metadata.setdefault(prefix[:-1], {})
            local[MEMORY_METADATA_KEY] = [mem for mem, _ in self._memory_names()]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        keys = {prefix + mem: (mem, prefix + weight) for mem, weight in self._memory_names()}
        # the rest without the memory keys, which nn.Module would report as unexpected
        rest = {key: value for key, value in state_dict.items() if key not in keys}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # load_state_dict(assign=True), e.g. into a model built on the meta device
        assign = local_metadata.get("assign_to_params_buffers", False)
        for key, (mem, weight) in keys.items():
            if key in state_dict:
                error = self._load_memory(mem, state_dict[key], assign=assign)
                if error:
                    error_msgs.append(f"size mismatch for {key}: {error}")
            elif weight in state_dict:
                # a checkpoint of the dense model: start with an empty memory rather than fail
                self._reset_memory_tensor(mem)
            # else the transform is not in this state dict at all (a partial load with
            # strict=False: peft's adapter weights, one shard of a checkpoint): its memory stays,
            # as its parameters do

    @torch.no_grad()
    def _load_memory(self, mem: str, saved: Tensor, assign: bool = False) -> str | None:
        """Copy ``saved`` into memory ``mem`` in place (its dtype and device stay), or with
        ``assign`` (or a memory on the meta device) make it the memory, on the weight's device
        and in the memory dtype; returns what is wrong instead if it does not fit."""
        saved = self._memory_for_layout(saved)
        units = self._memory_units()
        fits = saved.shape == (units,) if self.config.memory_layout == "unit" else (
            saved.dim() == 2 and saved.shape[1] == units
        )
        if not fits or not saved.is_floating_point():
            return (
                f"saved memory of shape {tuple(saved.shape)} and dtype {saved.dtype} does not "
                f"fit memory_layout={self.config.memory_layout!r} with {units} output units"
            )
        buf = getattr(self, mem)
        weight = self._weight(dict(self._memory_names())[mem])
        if self.config.memory == 0:
            # a layer with memory=0 never reads its memory, but saves it: a loaded one would be
            # carried along into later checkpoints and come back stale in a model that turns the
            # memory on (reconfigure clears it for memory=0 for the same reason)
            if assign or buf.is_meta:
                setattr(self, mem, self._empty_memory(weight))
            else:
                self._reset_memory_tensor(mem)
            return None
        if assign or buf.is_meta:
            device = saved.device if weight.is_meta else weight.device
            setattr(self, mem, _resizable(saved.detach().to(device, memory_dtype(weight.dtype))))
            return None
        if buf.shape != saved.shape and not buf.untyped_storage().resizable():
            buf = _resizable(buf)  # see _call_memory
            setattr(self, mem, buf)
        buf.resize_(saved.shape)  # a slot memory has the rows of the batch it was saved at
        buf.copy_(saved)
        return None

    def _memory_for_layout(self, saved: Tensor) -> Tensor:
        """Convert a saved memory to this layer's layout, keeping its column sums."""
        if self.config.memory_layout == "unit" and saved.dim() == 2:
            return saved.sum(0)
        if self.config.memory_layout == "slot" and saved.dim() == 1:
            return saved.unsqueeze(0)
        return saved

    def reconfigure(self, config: SparseBackpropConfig) -> str:
        """Give this layer ``config`` in place (``sparsify`` on a sparse layer calls it).

        The memory is kept when it still means the same: another k, selection or alpha keeps
        it; ``memory=0`` clears it (it would never be used, and would come back stale if the
        memory were turned on again); another ``memory_layout`` converts it as loading does
        (``slot`` -> ``unit``: its column sums; ``unit`` -> ``slot``: one row). Raises
        ``ValueError`` if the layer cannot run ``config`` (per-example convolutions). Returns
        what happened to the memory, for ``sparsify``'s report.
        """
        if not isinstance(config, SparseBackpropConfig):
            raise ValueError(f"reconfigure needs a SparseBackpropConfig, got {config!r}")
        check = getattr(self, "_check_config", None)
        if check is not None:
            check(config)
        old = self.config
        self.config = config
        if config.memory == 0 or old.memory == 0:
            for mem, weight in self._memory_names():  # new tensors: the layout may change
                setattr(self, mem, self._empty_memory(self._weight(weight)))
            if config.memory == 0:
                return "memory cleared (memory=0)" if old.memory > 0 else "no memory (memory=0)"
            return "memory starts empty (it was off)"
        if old.memory_layout != config.memory_layout:
            with torch.no_grad():
                for mem, _ in self._memory_names():
                    buf = getattr(self, mem)
                    setattr(self, mem, self._memory_for_layout(buf).clone())
            return (
                f"memory converted from {old.memory_layout!r} to {config.memory_layout!r} "
                "(column sums kept)"
            )
        return "memory kept"

    def __setstate__(self, state):
        super().__setstate__(state)
        for mem, _ in self._memory_names():
            # modules pickled whole by msbp <= 0.1 kept the memory as a buffer
            if mem in self._buffers:
                setattr(self, mem, self._buffers.pop(mem))
            memory = self.__dict__.get(mem)
            if memory is not None:
                setattr(self, mem, _resizable(memory))


def _resizable(memory: Tensor) -> Tensor:
    """``memory``, or a copy where its storage cannot grow (a tensor ``torch.load`` made, which a
    slot memory would be resized in place from at the next batch size)."""
    if not isinstance(memory, Tensor):  # None (no memory) or a wrong type, which the call
        return memory  # refuses by name (msbp.functional.check_memory)
    return memory if memory.untyped_storage().resizable() else memory.clone()


# -- every rank's memory in one checkpoint -------------------------------------------------------


def memory_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This process's memory of every sparse layer in ``model``, keyed as in
    ``model.state_dict()`` (``"0.memory"``, ``"lstm.memory_hh_l0"``); detached CPU copies.

    Example:
        >>> model = msbp.sparsify(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
        >>> sorted(msbp.memory_state_dict(model))
        ['0.memory', '1.memory']
    """
    return {
        f"{prefix}.{mem}" if prefix else mem: memory.detach().to("cpu", copy=True)
        for prefix, module in model.named_modules()
        if isinstance(module, MemoryMixin)
        for mem, memory in module.named_memories()
    }


def _memory_keys(model: nn.Module) -> set[str]:
    """The ``state_dict()`` keys of ``model``'s memories, a shared layer's under every name."""
    return {
        f"{prefix}.{mem}" if prefix else mem
        for prefix, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, MemoryMixin)
        for mem, _ in module._memory_names()
    }


#: the name under which a sparse layer's state-dict metadata lists its memory keys
MEMORY_METADATA_KEY = "msbp_memories"
_MEMORY_KEY = re.compile(r"(.*\.)?memory(_[qkv]|_(ih|hh)_l\d+(_reverse)?)?")


def dense_state_dict(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of the dense model: ``source``'s without the sparse layers' memories.

    ``source`` is a sparsified model, or a state dict saved from one. It then loads with
    ``load_state_dict(..., strict=True)`` into the model as it was before ``sparsify`` (or
    after ``msbp.densify``), which a sparse model's own ``state_dict()`` does not: its memory
    keys (``"0.memory"``, ``"lstm.memory_hh_l0"``) are unexpected there. A state dict from
    ``state_dict()`` lists its memory keys in its metadata (kept by ``torch.save``); one without
    that metadata (from safetensors, or rebuilt as a plain dict) loses every key named like a
    memory (``memory``, ``memory_q``, ``memory_ih_l0``...): should the dense model own such a
    key itself, its strict load reports it missing. Returns a new dict (same tensors).

    Example:
        >>> model = msbp.sparsify(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
        >>> dense = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> dense.load_state_dict(msbp.dense_state_dict(model))
        <All keys matched successfully>
    """
    if isinstance(source, nn.Module):
        state = source.state_dict()
        drop = _memory_keys(source)
    elif isinstance(source, Mapping):
        state = source
        metadata = getattr(source, "_metadata", None) or {}
        listed = {
            f"{prefix}.{mem}" if prefix else mem
            for prefix, local in metadata.items()
            for mem in local.get(MEMORY_METADATA_KEY, ())
        }
        drop = listed if listed else {key for key in state if _MEMORY_KEY.fullmatch(key)}
    else:
        raise ValueError(
            f"dense_state_dict takes a model or a state dict, got {type(source).__name__}"
        )
    out = OrderedDict((key, value) for key, value in state.items() if key not in drop)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = {  # type: ignore[attr-defined]
            prefix: {k: v for k, v in local.items() if k != MEMORY_METADATA_KEY}
            for prefix, local in metadata.items()
        }
    return out


def gather_memory_state(model: nn.Module, group=None) -> list[dict[str, Tensor]]:
    """Every rank's ``memory_state_dict(model)``, as a list indexed by rank, on every rank.

    Under ``DistributedDataParallel`` each process keeps its own memory, and ``state_dict()``
    saved on rank 0 holds only rank 0's; put this list in the checkpoint too and give it to
    ``load_memory_state`` on resume. A collective: every rank of ``group`` must call it, with
    the same module (the model, or the DDP wrapper on all ranks). Without an initialised process
    group, ``[memory_state_dict(model)]``.

    Example (every rank; rank 0 writes)::

        memories = msbp.gather_memory_state(model)
        if dist.get_rank() == 0:
            torch.save({"model": model.state_dict(), "memories": memories}, path)
    """
    import torch.distributed as dist

    mine = memory_state_dict(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, mine, group=group)
    return states


def load_memory_state(
    model: nn.Module, states: list[dict[str, Tensor]], rank: int | None = None, group=None
) -> None:
    """Load ``states[rank]`` (from ``gather_memory_state``) into the sparse layers of ``model``.

    ``rank`` defaults to this process's rank in ``group`` (0 without a process group). Call it
    after ``model.load_state_dict(...)``, which loads rank 0's memory into every rank. Memories
    are copied in place (their dtype and device stay; a saved ``slot`` memory loads into a
    ``unit`` layer as its column sums and back). Raises ``ValueError`` if ``states`` has no entry
    for ``rank`` or its keys are not exactly the model's memories.
    """
    import torch.distributed as dist

    if rank is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank(group) if initialised else 0
    if not 0 <= rank < len(states):
        raise ValueError(
            f"the memory state holds {len(states)} ranks' memories, no entry for rank {rank}"
        )
    state = states[rank]
    owners = {
        f"{prefix}.{mem}" if prefix else mem: (module, mem)
        for prefix, module in model.named_modules()
        if isinstance(module, MemoryMixin)
        for mem, _ in module._memory_names()
    }
    if set(state) != set(owners):
        raise ValueError(
            f"memory state of rank {rank} does not fit the model: missing "
            f"{sorted(set(owners) - set(state))}, unexpected {sorted(set(state) - set(owners))}"
        )
    for key, (module, mem) in owners.items():
        error = module._load_memory(mem, state[key])
        if error:
            raise ValueError(f"{key}: {error}")
