"""Under DistributedDataParallel each process keeps its own memory, however the model was built
and wrapped, while parameters stay in sync; a checkpoint holds every rank's memory."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import all_done, init_group
from torch import nn

import msbp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2
CFG = msbp.SparseBackpropConfig(k=3, memory=0.8)


class Net(nn.Module):
    """An LSTM and an MLP block, each sparsified on its own, and a SparseLinear built by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.body = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 8))
        self.extra = msbp.SparseLinear(8, 8, config=CFG)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)  # (B, T, 5)
        return self.head(torch.tanh(self.extra(self.body(h))).mean(1))


def _model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net().double()
    model.rnn = msbp.sparsify(model.rnn, CFG)  # a sub-module, not the model DDP wraps
    msbp.sparsify(model.body, CFG)
    return model


def _data(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    return [
        (torch.randn(4, 3, 4, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (4,), generator=gen))
        for _ in range(steps)
    ]


def _memories(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{name}": getattr(m, name).clone()
        for prefix, m in model.named_modules()
        if isinstance(m, msbp.SparseLinear | msbp.SparseLSTM)
        for name, _ in m._memory_names()
    }


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _spawn(worker, tmp_path) -> list[dict]:
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# -- memories per rank, gradients averaged -------------------------------------------------------

STEPS = 3


def _train_worker(rank: int, out_dir: str) -> None:
    init_group(rank, WORLD, out_dir)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True by default
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        grads, kept = [], True
        for batch in _data(rank, STEPS):
            opt.zero_grad(set_to_none=False)  # .grad kept: the in-place path must stand aside
            before = _memories(model)
            out = ddp(batch[0])
            after = _memories(model)
            kept &= all(torch.equal(before[n], after[n]) for n in before)  # forward: untouched
            nn.functional.cross_entropy(out, batch[1]).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        torch.save(
            {"grads": grads, "memories": _memories(model), "kept": kept,
             "params": {n: p.detach() for n, p in model.named_parameters()}},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        all_done()
    finally:
        dist.destroy_process_group()


def _single_process_reference() -> tuple[list[dict], list[dict], dict]:
    """Both ranks simulated in one process: each its own memory, gradients averaged."""
    models = [_model() for _ in range(WORLD)]
    data = [_data(rank, STEPS) for rank in range(WORLD)]
    mean_grads = []
    for step in range(STEPS):
        per_rank = []
        for rank, model in enumerate(models):
            model.zero_grad()
            _loss(model, data[rank][step]).backward()
            per_rank.append({n: p.grad.clone() for n, p in model.named_parameters()})
        mean = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
        mean_grads.append(mean)
        for model in models:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p -= 0.5 * mean[n]
    return mean_grads, [_memories(m) for m in models], dict(models[0].named_parameters())


def test_ddp_memory_per_rank_and_gradients_averaged(tmp_path):
    results = _spawn(_train_worker, tmp_path)
    mean_grads, memories, params = _single_process_reference()
    for rank, got in enumerate(results):
        assert got["kept"], rank  # DDP did not broadcast rank 0's memory at forward
        assert set(got["memories"]) == {
            "rnn.memory_ih_l0", "rnn.memory_hh_l0", "body.0.memory", "body.2.memory",
            "extra.memory",
        }
        for name, memory in got["memories"].items():
            assert memory.any(), name
            torch.testing.assert_close(memory, memories[rank][name], msg=f"rank {rank} {name}")
        for step, grads in enumerate(got["grads"]):
            for name, grad in grads.items():
                torch.testing.assert_close(
                    grad, mean_grads[step][name], msg=f"rank {rank} step {step} {name}"
                )
        for name, p in got["params"].items():
            torch.testing.assert_close(p, params[name].detach(), msg=name)
    for name in results[0]["memories"]:  # the ranks really remember different things
        assert not torch.equal(results[0]["memories"][name], results[1]["memories"][name]), name


def test_memory_is_not_a_buffer_ddp_could_broadcast():
    model = _model()
    assert not [n for n, _ in model.named_buffers()]
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    keys = set(model.state_dict())
    assert {"rnn.memory_hh_l0", "body.0.memory", "extra.memory"} <= keys


# -- checkpoints: save every rank's memory, resume exactly ---------------------------------------


def _fit(ddp: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def _resume_worker(rank: int, out_dir: str) -> None:
    init_group(rank, WORLD, out_dir)
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        data = _data(rank, 6)
        straight = _model()
        ddp = nn.parallel.DistributedDataParallel(straight)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        _fit(ddp, opt, data)

        first = _model()
        ddp = nn.parallel.DistributedDataParallel(first)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        _fit(ddp, opt, data[:3])
        memories = msbp.gather_memory_state(first)  # collective: every rank
        if rank == 0:
            torch.save(
                {"model": first.state_dict(), "optimizer": opt.state_dict(),
                 "memories": memories},
                path,
            )
        dist.barrier()

        resumed = _model(seed=7)  # other weights; its memories start empty
        ddp = nn.parallel.DistributedDataParallel(resumed)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        ckpt = torch.load(path, weights_only=True)
        resumed.load_state_dict(ckpt["model"])  # rank 0's memory everywhere ...
        opt.load_state_dict(ckpt["optimizer"])
        msbp.load_memory_state(resumed, ckpt["memories"])  # ... then this rank's own
        loaded = _memories(resumed)
        _fit(ddp, opt, data[3:])
        torch.save(
            {"straight": straight.state_dict(), "resumed": resumed.state_dict(),
             "loaded": loaded, "at_save": _memories(first),
             "rank0_saved": {k: v for k, v in ckpt["model"].items() if "memory" in k}},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        all_done()
    finally:
        dist.destroy_process_group()


def test_ddp_checkpoint_resumes_every_rank_exactly(tmp_path):
    results = _spawn(_resume_worker, tmp_path)
    for rank, got in enumerate(results):
        for name, memory in got["at_save"].items():
            assert torch.equal(got["loaded"][name], memory), (rank, name)
        straight, resumed = got["straight"], got["resumed"]
        assert set(straight) == set(resumed)
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (rank, key)
    # rank 1 did need its own entry: state_dict() on rank 0 held only rank 0's memory
    assert any(
        not torch.equal(results[1]["at_save"][k], results[1]["rank0_saved"][k])
        for k in results[1]["at_save"]
    )


# -- the helpers without a process group ---------------------------------------------------------


def test_memory_state_round_trip_without_process_group():
    model = _model()
    _loss(model, _data(0, 1)[0]).backward()
    states = msbp.gather_memory_state(model)
    assert len(states) == 1
    assert states[0].keys() == _memories(model).keys()
    assert all(t.device.type == "cpu" for t in states[0].values())
    other = _model(seed=3)
    msbp.load_memory_state(other, copy.deepcopy(states))
    for name, memory in _memories(other).items():
        assert torch.equal(memory, _memories(model)[name]), name
        assert memory.dtype == torch.float64  # the layer's own dtype rule
    with pytest.raises(ValueError, match="no entry for rank 1"):
        msbp.load_memory_state(other, states, rank=1)
    bad = {k: v for k, v in states[0].items() if k != "extra.memory"}
    with pytest.raises(ValueError, match=r"missing \['extra.memory'\]"):
        msbp.load_memory_state(other, [bad])
    wrong = dict(states[0], **{"extra.memory": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"extra.memory: saved memory of shape \(5,\)"):
        msbp.load_memory_state(other, [wrong])
