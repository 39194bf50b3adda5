"""Data-parallel MSBP: DDP whose sparse layers exchange only the k rows they propagated.

With ``SparseBackpropConfig(consensus=True)`` every rank keeps the same k units per layer and
step (see ``msbp.ops.consensus``), so every rank's weight gradient of a sparse layer has the same
k non-zero rows, and an all-reduce of those rows alone is exactly the dense all-reduce.
``wrap_ddp`` wraps a model in ``DistributedDataParallel`` and registers
``row_sparse_allreduce_hook``, which gathers those rows of each bucket (and the dense parameters
whole) into one compact tensor, all-reduces it, and scatters it back: the bytes sent for the
sparse layers' weights fall by k/out, and no row indices are sent (every rank knows them).

Example (every rank)::

    dist.init_process_group("gloo")
    cfg = msbp.SparseBackpropConfig(ratio=0.05, consensus=True)
    model = msbp.sparsify(make_model(), cfg, exclude="head")
    ddp = msbp.distributed.wrap_ddp(model)
    ...  # train as with any DDP model
    ddp.msbp_comm_state.bytes  # what the hook all-reduced so far
"""


from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from msbp.nn.memory import MemoryMixin, gather_memory_state, load_memory_state
from msbp.ops import consensus

__all__ = [
    "RankMemories",
    "RowSparseState",
    "consensus_weights",
    "load_memory_dcp_state",
    "memory_dcp_state",
    "register_row_sparse_hook",
    "row_sparse_allreduce_hook",
    "wrap_ddp",
]


@dataclass
class RowSparseState:
    """State of ``row_sparse_allreduce_hook``: the process group and byte counters.

    Counters (bytes of the tensors all-reduced, summed over buckets and steps, this rank; what
    a ring all-reduce puts on each link is about 2 (W - 1) / W times this):
        bytes: everything the hook all-reduced.
        dense_bytes: what DDP's default hook would have all-reduced for the same buckets.
        sparse_bytes: the part of ``bytes`` that carried consensus layers' weight rows.
        sparse_dense_bytes: those weights' full gradients (the dense hook's bytes for them).
        calls: buckets exchanged.
    """

    process_group: Any = None
    bytes: int = 0
    dense_bytes: int = 0
    sparse_bytes: int = 0
    sparse_dense_bytes: int = 0
    calls: int = 0
    _layout: dict = field(default_factory=dict, repr=False)

    def reset(self) -> None:
        """Zero the counters."""
        self.bytes = self.dense_bytes = self.sparse_bytes = self.sparse_dense_bytes = 0
        self.calls = 0


def row_sparse_allreduce_hook(
    state: RowSparseState, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    """DDP communication hook: all-reduce (mean over ranks) only the rows each consensus layer
    kept in this step, everything else whole; exactly DDP's default all-reduce when those rows
    are the only non-zero ones that differ between ranks (what consensus guarantees).

    The rows come from the layers (``msbp.ops.consensus.record_rows``; for a weight stored
    transposed, transformers' ``Conv1D``, its columns); a parameter with none
    recorded, or tied to a module that is not a sparse layer (``weight_tied``), is sent whole.
    One all-reduce per bucket on a compact tensor; no host synchronisation (works with NCCL as
    with gloo). Rows outside the kept ones are left as they
    are: zero in this step's gradient on every rank, or, when gradients accumulate over steps
    without ``zero_grad``, what earlier exchanges made equal on every rank.
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buffer = bucket.buffer()  # flat, the bucket's gradients back to back
    pieces: list[Tensor] = []
    places: list[tuple[Tensor, Tensor | None]] = []
    offset = 0
    sparse_bytes = sparse_dense = 0
    for param in bucket.parameters():
        flat = buffer[offset : offset + param.numel()]
        offset += param.numel()
        rows = consensus.take_rows(param)
        if rows is None:
            pieces.append(flat)
            places.append((flat, None, 0))
        else:
            # (out, in), or (in, out) with the units as columns: transformers' Conv1D
            dim = 1 if param.__dict__.get(consensus.COLUMNS) else 0
            grad2 = flat.view(param.shape[0], -1)
            kept = grad2.index_select(dim, rows)
            pieces.append(kept.reshape(-1))
            places.append((grad2, rows, dim))
            sparse_bytes += kept.numel() * kept.element_size()
            sparse_dense += flat.numel() * flat.element_size()
    state.calls += 1
    state.dense_bytes += buffer.numel() * buffer.element_size()
    if not sparse_dense:  # nothing row-sparse in this bucket: DDP's own all-reduce, in place
        state.bytes += buffer.numel() * buffer.element_size()
        work = dist.all_reduce(buffer.div_(world), group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    compact = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    compact.div_(world)
    state.bytes += compact.numel() * compact.element_size()
    state.sparse_bytes += sparse_bytes
    state.sparse_dense_bytes += sparse_dense

    def scatter(fut: torch.futures.Future) -> Tensor:
        reduced = fut.value()[0]
        at = 0
        for target, rows, dim in places:
            if rows is None:
                size = target.numel()
                target.copy_(reduced[at : at + size])
            else:
                other = target.shape[1 - dim]
                size = rows.numel() * other
                part = reduced[at : at + size]
                target.index_copy_(dim, rows, part.view(-1, other) if dim == 0 else
                                   part.view(other, -1))
            at += size
        return buffer

    work = dist.all_reduce(compact, group=group, async_op=True)
    return work.get_future().then(scatter)


def consensus_weights(model: nn.Module) -> list[Tensor]:
    """The weights of ``model``'s sparse layers whose config has ``consensus=True``."""
    weights = []
    for module in model.modules():
        if isinstance(module, MemoryMixin) and module.config.consensus:
            for _, weight_name in module._memory_names():
                weight = getattr(module, weight_name)
                if isinstance(weight, Tensor):
                    weights.append(weight)
    return weights


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)``, with ``row_sparse_allreduce_hook``
    registered when some sparse layer of ``model`` has ``consensus=True``.

    The hook's ``RowSparseState`` (byte counters) is ``ddp.msbp_comm_state`` (None without a
    consensus layer). Consensus runs over ``ddp_kwargs["process_group"]`` (default: the world).
    Raises ``ValueError`` if a consensus layer's ``grad_inplace`` matters (it does not under
    DDP: the in-place path steps aside) or ``comm_hook`` is passed.
    """
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    register_row_sparse_hook(ddp, ddp_kwargs.get("process_group"))
    return ddp


def register_row_sparse_hook(
    ddp: DistributedDataParallel, process_group: Any = None
) -> RowSparseState | None:
    """What ``wrap_ddp`` does to a ``DistributedDataParallel`` someone else built
    (``accelerate.Accelerator.prepare``, PyTorch Lightning's ``trainer.strategy.model`` in
    ``on_fit_start``): register ``row_sparse_allreduce_hook`` when some sparse layer of
    ``ddp.module`` has ``consensus=True``, and ask those layers to keep their rows for it
    (without that the hook sends every gradient whole).

    Call it on every rank before the first backward. Consensus runs over ``process_group``
    (default: DDP's own). Returns the hook's ``RowSparseState``, also ``ddp.msbp_comm_state``
    (None without a consensus layer, nothing registered); a model that is not a
    ``DistributedDataParallel`` (what ``prepare`` returns in one process) is left alone: None.
    """
    if not isinstance(ddp, DistributedDataParallel):
        return None
    group = process_group
    if group is None and ddp.process_group is not dist.group.WORLD:
        group = ddp.process_group  # None stands for the world (a group made later, too)
    weights = consensus_weights(ddp.module)
    state = None
    if weights:
        consensus.set_group(group)
        for weight in weights:
            weight.__dict__[consensus.WANTED] = True
        state = RowSparseState(process_group=group)
        ddp.register_comm_hook(state, row_sparse_allreduce_hook)
    ddp.msbp_comm_state = state
    return state


# -- every rank's memory in a distributed checkpoint (FSDP) ---------------------------------------


def _memory_owners(model: nn.Module) -> dict[str, tuple[MemoryMixin, str]]:
    return {
        f"{prefix}.{mem}" if prefix else mem: (module, mem)
        for prefix, module in model.named_modules()
        if isinstance(module, MemoryMixin)
        for mem, _ in module._memory_names()
    }


def memory_dcp_state(model: nn.Module, group: Any = None) -> dict[str, Tensor]:
    """Every sparse layer's memory as a DTensor of shape (W, *memory.shape) sharded over the W
    ranks of ``group`` (row r: rank r's memory), keyed as in ``model.state_dict()``: a state
    ``torch.distributed.checkpoint`` saves and loads per rank.

    ``model.state_dict()`` holds the memory as a plain tensor, which DCP takes for a replicated
    one: it saves rank 0's and loads it into every rank. Put this dict in the checkpoint beside
    the model's state and, on resume, pass a fresh one as the load target and then to
    ``load_memory_dcp_state``. No collective; every rank's memories must have the same
    shape (a ``slot`` memory: the same local batch). Without a process group, copies
    of the plain memories.

    Example (every rank)::

        state = {"model": model.state_dict(), "memory": memory_dcp_state(model)}
        dcp.save(state, checkpoint_id=path)
        ...
        state = {"model": model.state_dict(), "memory": memory_dcp_state(model)}
        dcp.load(state, checkpoint_id=path)
        load_memory_dcp_state(model, state["memory"])
    """
    owners = _memory_owners(model)
    if not (dist.is_available() and dist.is_initialized()):
        return {key: getattr(module, mem).detach().clone() for key, (module, mem) in owners.items()}
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    state = {}
    mesh = None
    for key, (module, mem) in owners.items():
        # a copy: the plain memory in model.state_dict() is a load target of its own
        local = getattr(module, mem).detach().clone().unsqueeze(0)  # (1, *shape)
        if mesh is None:  # no collective: a mesh over an existing group
            mesh = DeviceMesh.from_group(
                group if group is not None else dist.group.WORLD, local.device.type
            )
        state[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return state


def load_memory_dcp_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy each rank's row of ``state`` (``memory_dcp_state``'s, filled by ``dcp.load``) into
    the memories of ``model``; raises ``ValueError`` if the keys are not the model's memories."""
    owners = _memory_owners(model)
    if set(state) != set(owners):
        raise ValueError(
            f"memory state does not fit the model: missing {sorted(set(owners) - set(state))}, "
            f"unexpected {sorted(set(state) - set(owners))}"
        )
    for key, (module, mem) in owners.items():
        saved = state[key]
        local = saved.to_local() if hasattr(saved, "to_local") else saved
        if local.dim() == getattr(module, mem).dim() + 1:
            local = local[0]
        error = module._load_memory(mem, local)
        if error:
            raise ValueError(f"{key}: {error}")


# -- every rank's memory as a checkpointable object (accelerate) -----------------------------------


class RankMemories:
    """Every rank's sparse-layer memories as one object with ``state_dict()`` /
    ``load_state_dict()``, for checkpointing code that saves objects from the main process only,
    such as ``accelerate.Accelerator.register_for_checkpointing``.

    ``Accelerator.save_state`` writes the model's state dict from rank 0 alone, so its memories
    are rank 0's, and ``load_state`` gives them to every rank. Registered after ``prepare``,
    this object puts every rank's memories in the checkpoint (``state_dict`` is
    ``gather_memory_state``, a collective that ``save_state`` runs on every rank) and gives each
    rank its own back after the model is loaded (``load_memory_state``). Without a process group
    it holds this process's memories, which the model's state dict already has.

    Example (every rank)::

        model, opt, loader = accelerator.prepare(model, opt, loader)
        accelerator.register_for_checkpointing(msbp.distributed.RankMemories(model))
    """

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        self.model = model
        self.group = group

    def state_dict(self) -> dict[str, Any]:
        """``{"memories": [rank 0's memory state dict, rank 1's, ...]}`` (CPU tensors)."""
        return {"memories": gather_memory_state(self.model, self.group)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's entry of ``state_dict["memories"]`` into the model's memories."""
        if "memories" not in state_dict:
            raise ValueError(
                f"not a RankMemories state: keys {sorted(state_dict)}, expected ['memories']"
            )
        load_memory_state(self.model, state_dict["memories"], group=self.group)
