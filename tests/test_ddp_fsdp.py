"""FSDP (``fully_shard``) over a sparsified model: the same steps as DDP, the memory per rank,
and every rank's memory through a distributed checkpoint (``memory_dcp_state``)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import all_done, init_group
from torch import nn

import msbp
from msbp.distributed import load_memory_dcp_state, memory_dcp_state

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2
CONFIGS = {
    "per_rank": msbp.SparseBackpropConfig(k=4, memory=0.8),
    "consensus": msbp.SparseBackpropConfig(k=4, memory=0.8, consensus=True),
}


def _model(cfg, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    ).double()
    return msbp.sparsify(model, cfg, exclude="4")


def _sharded(cfg, seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(cfg, seed)
    for sub in (model[0], model[2], model):
        fully_shard(sub)
    return model


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(3, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (3,),
                                                                                generator=gen)


def _fit(net: nn.Module, opt, rank: int, steps: range) -> None:
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp

    init_group(rank, WORLD, out_dir)
    try:
        results = {}
        for name, cfg in CONFIGS.items():
            plain = _model(cfg)
            ddp = nn.parallel.DistributedDataParallel(plain)
            _fit(ddp, torch.optim.SGD(ddp.parameters(), lr=0.3), rank, range(6))

            straight = _sharded(cfg)
            _fit(straight, torch.optim.SGD(straight.parameters(), lr=0.3), rank, range(6))

            first = _sharded(cfg)
            _fit(first, torch.optim.SGD(first.parameters(), lr=0.3), rank, range(3))
            path = os.path.join(out_dir, f"ckpt_{name}")
            dcp.save({"model": first.state_dict(), "memory": memory_dcp_state(first)},
                     checkpoint_id=path)
            at_save = msbp.memory_state_dict(first)

            resumed = _sharded(cfg, seed=7)  # other weights, empty memories
            state = {"model": resumed.state_dict(), "memory": memory_dcp_state(resumed)}
            dcp.load(state, checkpoint_id=path)
            resumed.load_state_dict(state["model"])
            plain_loaded = msbp.memory_state_dict(resumed)  # model.state_dict() alone: rank 0's
            load_memory_dcp_state(resumed, state["memory"])
            loaded = msbp.memory_state_dict(resumed)
            _fit(resumed, torch.optim.SGD(resumed.parameters(), lr=0.3), rank, range(3, 6))
            results[name] = {
                "ddp": _full(plain), "ddp_memory": msbp.memory_state_dict(plain),
                "fsdp": _full(straight), "fsdp_memory": msbp.memory_state_dict(straight),
                "resumed": _full(resumed), "resumed_memory": msbp.memory_state_dict(resumed),
                "at_save": at_save, "loaded": loaded, "plain_loaded": plain_loaded,
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def test_fsdp_matches_ddp_and_checkpoints_every_rank_memory(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name in CONFIGS:
        for rank, got in enumerate(results):
            got = got[name]
            for key, p in got["ddp"].items():
                torch.testing.assert_close(got["fsdp"][key], p, rtol=1e-12, atol=1e-12)
                assert torch.equal(got["resumed"][key], got["fsdp"][key]), (name, rank, key)
            for key, m in got["ddp_memory"].items():
                torch.testing.assert_close(got["fsdp_memory"][key], m, rtol=1e-12, atol=1e-12)
                assert torch.equal(got["loaded"][key], got["at_save"][key]), (name, rank, key)
                assert torch.equal(got["resumed_memory"][key], got["fsdp_memory"][key])
        for key in results[0][name]["at_save"]:
            # model.state_dict() alone brings back one rank's memory on every rank: DCP takes
            # a plain tensor for a replicated one and saves one copy
            plain = [r[name]["plain_loaded"][key] for r in results]
            assert all(torch.equal(p, plain[0]) for p in plain), (name, key)
            assert any(torch.equal(plain[0], r[name]["at_save"][key]) for r in results)
    per_rank = [r["per_rank"]["at_save"]["0.memory"] for r in results]
    assert not torch.equal(*per_rank)  # without consensus the ranks' memories differ
    shared = [r["consensus"]["at_save"]["0.memory"] for r in results]
    assert torch.equal(*shared)  # with consensus the unit memory is shared


def _legacy_worker(rank: int, out_dir: str) -> None:
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel

    init_group(rank, WORLD, out_dir)
    try:
        cfg = CONFIGS["per_rank"]
        plain = _model(cfg)
        ddp = nn.parallel.DistributedDataParallel(plain)
        _fit(ddp, torch.optim.SGD(ddp.parameters(), lr=0.3), rank, range(4))
        results = {"ddp": _full(plain), "ddp_memory": msbp.memory_state_dict(plain)}
        for orig in (False, True):
            model = _model(cfg)
            wrapped = FullyShardedDataParallel(
                model, device_id=torch.device("cpu"), use_orig_params=orig
            )
            _fit(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.3), rank, range(4))
            with FullyShardedDataParallel.summon_full_params(wrapped):
                results[f"orig={orig}"] = _full(model)
            results[f"orig={orig}_memory"] = msbp.memory_state_dict(model)
        for name in ("adam", "lazy"):
            model = _sharded(cfg)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = (torch.optim.Adam if name == "adam" else msbp.optim.LazyRowAdam)(
                    model.parameters(), lr=0.01
                )
            results[f"{name}_warned"] = any("sharded by FSDP" in str(w.message) for w in caught)
            _fit(model, opt, rank, range(4))
            results[name] = _full(model)
        torch.save(results, os.path.join(out_dir, f"legacy{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def test_legacy_fsdp_wrapper_matches_ddp_and_lazy_row_adam_under_fully_shard(tmp_path):
    """torch's FullyShardedDataParallel wrapper, flat or with use_orig_params=True (which sets
    each weight to a 1-D view of the shard between iterations: SparseLinear took that for a
    resize and refitted its memory to the shard, and the next forward raised), runs the DDP
    steps; LazyRowAdam over fully_shard's DTensors warns and steps as torch.optim.Adam."""
    mp.spawn(_legacy_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"legacy{rank}.pt", weights_only=False)
        for orig in (False, True):
            for key, p in got["ddp"].items():
                torch.testing.assert_close(got[f"orig={orig}"][key], p, rtol=1e-12, atol=1e-12)
            for key, m in got["ddp_memory"].items():
                torch.testing.assert_close(got[f"orig={orig}_memory"][key], m, rtol=1e-12,
                                           atol=1e-12)
        assert got["lazy_warned"] and not got["adam_warned"]
        for key, p in got["adam"].items():
            torch.testing.assert_close(got["lazy"][key], p, rtol=1e-12, atol=1e-14)


def _dsd_worker(rank: int, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    init_group(rank, WORLD, out_dir)
    try:
        results = {}
        for kind in ("ddp", "fully_shard"):
            def build(seed: int = 0, kind: str = kind):
                if kind == "fully_shard":
                    model = _sharded(CONFIGS["per_rank"], seed)
                    return model, model
                model = _model(CONFIGS["per_rank"], seed)
                return nn.parallel.DistributedDataParallel(model), model

            net, model = build()
            opt = msbp.optim.LazyRowAdam(net.parameters(), lr=0.01)
            _fit(net, opt, rank, range(3))
            weights, optim = get_state_dict(model, opt)  # the model inside DDP: see the README
            path = os.path.join(out_dir, f"dsd_{kind}")
            dcp.save({"model": weights, "optim": optim, "memory": memory_dcp_state(model)},
                     checkpoint_id=path)
            _fit(net, opt, rank, range(3, 6))

            net2, model2 = build(seed=7)
            opt2 = msbp.optim.LazyRowAdam(net2.parameters(), lr=0.01)
            weights2, optim2 = get_state_dict(model2, opt2)
            state = {"model": weights2, "optim": optim2, "memory": memory_dcp_state(model2)}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model2, opt2, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            load_memory_dcp_state(model2, state["memory"])
            _fit(net2, opt2, rank, range(3, 6))
            results[kind] = (_full(model), _full(model2), msbp.memory_state_dict(model),
                             msbp.memory_state_dict(model2))
        torch.save(results, os.path.join(out_dir, f"dsd{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def test_distributed_state_dict_resumes_lazy_row_adam_bit_for_bit(tmp_path):
    """torch.distributed.checkpoint.state_dict's get_state_dict / set_state_dict with
    LazyRowAdam, the memories through memory_dcp_state, under DDP and fully_shard: the resumed
    run ends where the straight one does."""
    mp.spawn(_dsd_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"dsd{rank}.pt", weights_only=False)
        for kind, (straight, resumed, memory, memory2) in got.items():
            for key, p in straight.items():
                assert torch.equal(resumed[key], p), (kind, rank, key)
            for key, m in memory.items():
                assert torch.equal(memory2[key], m), (kind, rank, key)


def _tensor_parallel_worker(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    init_group(rank, WORLD, out_dir)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        errors = []
        for cfg in CONFIGS.values():
            for sparse in (True, False):
                torch.manual_seed(0)
                model = nn.Sequential(
                    nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
                ).double()
                if sparse:
                    msbp.sparsify(model, cfg, exclude="4")
                parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
                try:
                    model(x).sum().backward()
                    errors.append(None)
                except ValueError as err:
                    errors.append(str(err))
        from torch.distributed.tensor import Replicate, distribute_tensor

        cfg = msbp.SparseBackpropConfig(k=2)
        for layer, inp in ((msbp.SparseConv1d(2, 4, 3, config=cfg), torch.randn(1, 2, 5)),
                           (msbp.SparseLSTM(3, 4, config=cfg), torch.randn(5, 1, 3))):
            layer.name = "net.layer"
            weight = layer.weight if isinstance(layer, nn.Conv1d) else layer.weight_hh_l0
            placed = nn.Parameter(distribute_tensor(weight.detach(), mesh, [Replicate()]))
            setattr(layer, "weight" if isinstance(layer, nn.Conv1d) else "weight_hh_l0", placed)
            try:
                layer(distribute_tensor(inp, mesh, [Replicate()]))
                errors.append(None)
            except ValueError as err:
                errors.append(str(err))
        torch.save(errors, os.path.join(out_dir, f"tp{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_sparse_layer_is_refused_at_its_forward(tmp_path):
    """parallelize_module over sparse layers raised inside the backward ("does not have a
    sharding strategy registered"); now the layer's forward says what to do. Tensor-parallel
    layers left dense train."""
    mp.spawn(_tensor_parallel_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        errors = torch.load(tmp_path / f"tp{rank}.pt")
        assert errors[1:4:2] == [None, None]
        for message in errors[0:4:2]:
            assert message is not None and "tensor parallelism" in message
            assert "sparse layer '0'" in message
        conv, lstm = errors[4:]
        assert "sparse layer 'net.layer' got a DTensor of shape (1, 2, 5)" in conv
        assert "SparseLSTM 'net.layer' got a DTensor" in lstm
