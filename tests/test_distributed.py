"""Under DistributedDataParallel each process keeps its own memory while parameters stay in sync."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import msbp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        msbp.sparsify(model, msbp.SparseBackpropConfig(k=3, memory=0.8), exclude="2")
        ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True by default
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        kept = True
        for _ in range(4):
            opt.zero_grad(set_to_none=False)  # .grad kept: the in-place path must stand aside
            before = model[0].memory.clone()
            y = ddp(torch.randn(5, 6, generator=gen))
            kept &= torch.equal(model[0].memory, before)  # forward must not overwrite it
            y.square().sum().backward()
            opt.step()
        torch.save(
            {"params": [p.detach() for p in model.parameters()], "memory": model[0].memory,
             "kept": kept},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_keeps_memory_local_and_params_synced(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for p0, p1 in zip(r0["params"], r1["params"], strict=True):
        torch.testing.assert_close(p0, p1)  # gradients were all-reduced
    assert r0["kept"] and r1["kept"]  # DDP did not broadcast rank 0's memory
    assert r0["memory"].any() and r1["memory"].any()
    assert not torch.equal(r0["memory"], r1["memory"])  # not overwritten by rank 0's


def test_sparsify_marks_memory_buffers_for_ddp():
    model = msbp.sparsify(
        nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 5)), msbp.SparseBackpropConfig(k=2)
    )
    assert set(model._ddp_params_and_buffers_to_ignore) == {
        "0.memory", "1.memory_ih_l0", "1.memory_hh_l0"
    }
