"""LazyRowAdam under DistributedDataParallel: the rows updated are the union over processes, so
replicas stay identical and equal a single process stepping on the averaged gradients."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import all_done, init_group
from torch import nn

import msbp
from msbp.optim import LazyRowAdam

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

# which of the two sparse branches each process runs at each step: at steps 1, 4, 5 and 7 no
# process runs "b", which must then stay as it is everywhere
BRANCHES = ("aaabaaaa", "babaaaba")
STEPS = len(BRANCHES[0])


class _TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(16, 3)
        self.double()
        # no memory: each process keeps its own, which one process could not reproduce
        msbp.sparsify(self, msbp.SparseBackpropConfig(k=3, memory=0.0), exclude="head")

    def forward(self, x, branch):
        return self.head(torch.relu((self.a if branch == "a" else self.b)(x)))


def _batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(5, 6, dtype=torch.float64, generator=gen)


def _zero(step: int, model: nn.Module, opt: LazyRowAdam) -> None:
    if step % 2:
        opt.zero_grad()
    else:
        model.zero_grad(set_to_none=False)


def _worker(rank: int, world: int, out_dir: str) -> None:
    init_group(rank, world, out_dir)
    try:
        model = _TwoBranch()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = LazyRowAdam(ddp.parameters(), lr=1e-2, weight_decay=0.01)
        for step in range(STEPS):
            _zero(step, model, opt)
            ddp(_batch(rank, step), BRANCHES[rank][step]).square().sum().backward()
            opt.step()
        torch.save(
            {"params": [p.detach() for p in model.parameters()],
             "steps": [opt.state[p]["step"] for p in model.parameters()]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        all_done()
    finally:
        dist.destroy_process_group()


def _single_process() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same steps in one process: each step's two batches, each through its branch, with
    their gradients averaged (as DDP averages them)."""
    model = _TwoBranch()
    opt = LazyRowAdam(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(STEPS):
        _zero(step, model, opt)
        for rank in range(2):
            (0.5 * model(_batch(rank, step), BRANCHES[rank][step]).square().sum()).backward()
        opt.step()
    params = [p.detach() for p in model.parameters()]
    return params, [opt.state[p]["step"] for p in model.parameters()]


def test_ddp_replicas_identical_and_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for p0, p1 in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(p0, p1)  # replicas never drift apart
    params, steps = _single_process()
    for p0, p in zip(r0["params"], params, strict=True):
        torch.testing.assert_close(p0, p, rtol=1e-12, atol=1e-14)
    assert [int(s) for s in r0["steps"]] == [int(s) for s in steps]
    b_runs = sum("b" in (BRANCHES[0][s], BRANCHES[1][s]) for s in range(STEPS))
    names = [n for n, _ in _TwoBranch().named_parameters()]
    assert int(r0["steps"][names.index("b.weight")]) == b_runs == 4


class _SparseOrScale(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer, self.scale = layer, nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, use_layer):
        return (self.layer(x) * 0).sum() if use_layer else self.scale * x.sum()


def _empty_first_worker(rank: int, world: int, out_dir: str, both: bool) -> None:
    init_group(rank, world, out_dir)
    try:
        torch.manual_seed(0)
        cfg = msbp.SparseBackpropConfig(k=2, selection="per_example", memory=0.0)
        model = _SparseOrScale(msbp.SparseLinear(6, 8, config=cfg, dtype=torch.float64))
        layer = model.layer
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = LazyRowAdam(ddp.parameters(), lr=1e-2, weight_decay=0.1)
        before = layer.weight.detach().clone()
        # every output-gradient row zero: per-example top-k selects no row (in the second
        # form, only rank 0 runs the layer)
        ddp(_batch(rank, 0), both or rank == 0).backward()
        opt.step()
        torch.save({"moved": not torch.equal(layer.weight, before),
                    "step": float(opt.state[layer.weight].get("step", 0))},
                   os.path.join(out_dir, f"empty{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("both", [True, False], ids=["both_ranks", "one_rank"])
def test_ddp_first_step_with_no_row_selected_moves_nothing(tmp_path, both):
    """The union of no rows over the processes is no row, also at a layer's first step (its row
    mask, made by the native backward, marks none, or the log has an empty entry): no
    weight-decay step and step count 0 on every process, whichever ran the layer."""
    mp.spawn(_empty_first_worker, args=(2, str(tmp_path), both), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"empty{rank}.pt") == {"moved": False, "step": 0.0}


def _zero_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    init_group(rank, world, out_dir)
    try:
        model = _TwoBranch()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = ZeroRedundancyOptimizer(
            ddp.parameters(), optimizer_class=LazyRowAdam, lr=1e-2, weight_decay=0.01
        )
        for step in range(STEPS):
            _zero(step, model, opt)
            ddp(_batch(rank, step), BRANCHES[rank][step]).square().sum().backward()
            opt.step()
        opt.consolidate_state_dict(to=0)
        steps = None
        if rank == 0:
            state = opt.state_dict()["state"]
            steps = [int(state[i]["step"]) for i in range(len(list(model.parameters())))]
        torch.save({"params": [p.detach() for p in model.parameters()], "steps": steps},
                   os.path.join(out_dir, f"zero{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def test_zero_redundancy_optimizer_of_lazy_row_adam_equals_single_process(tmp_path):
    """torch's ZeroRedundancyOptimizer with LazyRowAdam as each process's optimizer of its
    shard: the processes step different parameters, so no union of rows over them can be taken
    (gloo aborted on the mismatched collective); each steps its weights' rows of non-zero
    averaged gradient, which is the union, and replicas equal one process."""
    mp.spawn(_zero_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"zero{r}.pt") for r in (0, 1))
    params, steps = _single_process()
    for p0, p1, p in zip(r0["params"], r1["params"], params, strict=True):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, p, rtol=1e-12, atol=1e-14)
    assert r0["steps"] == [int(s) for s in steps]


def _mismatch_worker(rank: int, world: int, out_dir: str) -> None:
    init_group(rank, world, out_dir)
    try:
        model = _TwoBranch()
        params = list(model.parameters())
        opt = LazyRowAdam(params if rank == 0 else params[:2], lr=1e-2)
        for p in params:
            p.grad = torch.ones_like(p)
        try:
            opt.step()
            message = None
        except RuntimeError as err:
            message = str(err)
        torch.save(message, os.path.join(out_dir, f"mismatch{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def test_processes_stepping_different_parameters_get_a_clear_error(tmp_path):
    """A LazyRowAdam over other parameters on each process (pipeline stages in one group)
    raises on every process, naming the fix, instead of gloo aborting (NCCL hanging) on a
    collective of another size."""
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = torch.load(tmp_path / f"mismatch{rank}.pt")
        assert message is not None and "step different parameters" in message
        assert "[6, 2]" in message and "sync_rows=False" in message
