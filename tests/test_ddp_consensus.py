"""Data-parallel MSBP with consensus selection: W gloo processes with local batches of n equal
one process on the concatenated batch of W n (float64, 1e-10), for dense, SBP and MSBP, and the
row-sparse exchange sends only the kept rows of the sparse layers' weight gradients."""

from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import all_done, init_group
from torch import nn

import msbp
from msbp.distributed import RowSparseState, register_row_sparse_hook, wrap_ddp
from msbp.nn.hf_conv1d import SparseHFConv1D
from msbp.ops import consensus
from msbp.optim import LazyRowAdam

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

STEPS = 4
ROWS = 3  # local batch per rank
K = 4
OUT = (16, 12)  # the sparse layers' widths; the head (3 classes) stays dense

SBP = msbp.SparseBackpropConfig(k=K, memory=0.0, consensus=True)
MSBP = msbp.SparseBackpropConfig(k=K, memory=0.8, consensus=True)
# name -> (config or None for the dense model, optimizer, hook: wrap_ddp (True, "view": with
# gradient_as_bucket_view) or plain DDP (False))
VARIANTS = {
    "dense": (None, "sgd", True),
    "sbp": (SBP, "sgd", True),
    "msbp": (MSBP, "sgd", True),
    "msbp_plain_ddp": (MSBP, "sgd", False),  # consensus, DDP's own all-reduce
    # a DDP built by someone else (PyTorch Lightning), the hook registered afterwards
    "msbp_registered": (MSBP, "sgd", "registered"),
    "msbp_k_out": (MSBP.replace(k=0), "sgd", True),  # k = out: nothing sparse, all dense
    "msbp_random": (MSBP.replace(selection="random"), "sgd", True),
    "msbp_lazy_adam": (MSBP, "lazy_adam", True),
    "msbp_bucket_view": (MSBP, "sgd", "view"),  # .grad a view of DDP's bucket
    # two backward passes per step, the first under no_sync: the hook sends the union of rows
    "msbp_accumulate": (MSBP, "sgd", True),
}
SLOW_VARIANTS = {
    "msbp_slot": (MSBP.replace(memory_layout="slot"), "sgd", True),
    "msbp_alpha1": (MSBP.replace(memory=1.0, k=2), "sgd", True),
}


def _model(cfg: msbp.SparseBackpropConfig | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, OUT[0]), nn.Tanh(), nn.Linear(OUT[0], OUT[1]), nn.Tanh(), nn.Linear(OUT[1], 3)
    ).double()
    if cfg is not None:
        msbp.sparsify(model, cfg, exclude="4")
    torch.manual_seed(1)  # the stream random selection draws from, the same in every process
    return model


def _optimizer(kind: str, params, group=None) -> torch.optim.Optimizer:
    if kind == "lazy_adam":  # unites touched rows over the processes of DDP's group
        return LazyRowAdam(params, lr=1e-2, process_group=group)
    return torch.optim.SGD(params, lr=0.3)


def _batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of step ``step``: rank r takes rows r n ... (r + 1) n."""
    gen = torch.Generator().manual_seed(10 + step)
    x = torch.randn(world * ROWS, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (world * ROWS,), generator=gen)


def _memories(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in msbp.memory_state_dict(model).items()}


def _run(variant: str, world: int, rank: int | None, group=None) -> dict:
    """Train ``variant`` for STEPS steps: under DDP as ``rank`` of ``world`` (over ``group``,
    None: the default group), or (rank None) in one process on the concatenated batches."""
    cfg, opt_kind, hook = {**VARIANTS, **SLOW_VARIANTS}[variant]
    model = _model(cfg)
    net = model
    if hook == "registered" and rank is not None:
        net = nn.parallel.DistributedDataParallel(model, process_group=group)
        register_row_sparse_hook(net)
    elif hook and rank is not None:
        net = wrap_ddp(model, process_group=group, gradient_as_bucket_view=hook == "view")
    elif rank is not None:
        consensus.set_group(group)  # what wrap_ddp does besides the hook
        net = nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = _optimizer(opt_kind, net.parameters(), group)
    params, grads, memories = [], [], []
    micro = 2 if variant.endswith("accumulate") else 1  # backward passes per step
    for step in range(STEPS):
        opt.zero_grad()
        for m in range(micro):
            x, y = _batch(micro * step + m, world)
            if rank is not None:
                x, y = x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS]
            last = m == micro - 1
            with net.no_sync() if rank is not None and not last else contextlib.nullcontext():
                nn.functional.cross_entropy(net(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        memories.append(_memories(model))
    state = getattr(net, "msbp_comm_state", None)
    return {"params": params, "grads": grads, "memories": memories,
            "state": None if state is None else {
                "bytes": state.bytes, "dense_bytes": state.dense_bytes,
                "sparse_bytes": state.sparse_bytes,
                "sparse_dense_bytes": state.sparse_dense_bytes}}


def _refusals() -> dict[str, str]:
    """What consensus says where it cannot agree (under a process group)."""
    got = {}
    cfg = msbp.SparseBackpropConfig(k=2, consensus=True)
    conv = msbp.SparseConv1d(2, 4, 3, config=cfg).double()
    lstm = msbp.SparseLSTM(3, 4, config=cfg).double()
    for name, module, x in (("conv", conv, torch.randn(2, 2, 5, dtype=torch.float64)),
                            ("lstm", lstm, torch.randn(2, 5, 3, dtype=torch.float64))):
        try:
            module(x)
            got[name] = ""
        except ValueError as exc:
            got[name] = str(exc)
    return got


def _nonfinite(rank: int, group) -> dict[str, str]:
    """A non-finite gradient on rank 1 alone: both ranks raise, or both go dense (``skip``)."""
    got = {}
    for mode in ("raise", "skip", "raise_k_out", "skip_slot_resized"):
        # k_out: k = out (nothing to select) still agrees on finiteness: a hang before
        cfg = MSBP.replace(on_nonfinite=mode.split("_")[0])
        if mode == "raise_k_out":
            cfg = cfg.replace(k=0)
        elif mode == "skip_slot_resized":
            cfg = cfg.replace(memory_layout="slot")
        model = _model(cfg)
        net = wrap_ddp(model, process_group=group)
        x, y = _batch(0, 2)
        x, y = x[rank * ROWS : (rank + 1) * ROWS], y[rank * ROWS : (rank + 1) * ROWS]
        if mode == "skip_slot_resized":  # a finite step first; the skipped one has 1 row fewer
            nn.functional.cross_entropy(net(x), y).backward()
            x, y = x[1:], y[1:]
        before = msbp.memory_state_dict(model)
        scale = float("inf") if rank == 1 else 1.0  # rank 1's output gradients: inf and nan
        try:
            (scale * nn.functional.cross_entropy(net(x), y)).backward()
            after = msbp.memory_state_dict(model)
            # (the slot memory's spread to the new batch size stayed before)
            same = all(torch.equal(before[key], after[key]) for key in before)
            got[mode] = f"dense, memory untouched: {same}"
        except FloatingPointError as exc:
            got[mode] = str(exc)
    return got


def _worker(rank: int, world: int, out_dir: str, variants: list[str], variants_2: list[str]):
    """``variants`` over all ``world`` ranks, then ``variants_2`` over ranks 0 and 1 alone (a
    sub-group: one spawn tests both sizes and the process_group plumbing)."""
    init_group(rank, world, out_dir)
    try:
        results = {(world, v): _run(v, world, rank) for v in variants}
        # every rank must take part in creating it; a hang fails (raises) within 2 minutes
        pair = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=120))
        if rank < 2:
            results.update({(2, v): _run(v, 2, rank, pair) for v in variants_2})
        if rank < 2:
            results["nonfinite"] = _nonfinite(rank, pair)
        if rank == 0:
            results["refusals"] = _refusals()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world: int, variants: list[str], variants_2: list[str]) -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp_path), variants, variants_2), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=what)


def _check_equals_one_process(results: list[dict], world: int, variants: list[str]) -> None:
    for variant in variants:
        single = _run(variant, world, None)
        slot = variant == "msbp_slot"
        for rank, got in enumerate(results[:world]):
            mine = got[world, variant]
            for step in range(STEPS):
                for name, p in single["params"][step].items():
                    what = f"{variant} rank {rank}/{world} step {step} {name}"
                    _close(mine["params"][step][name], p, what)
                for name, m in single["memories"][step].items():
                    if slot:  # each rank keeps its own rows, in its units (W times one process's)
                        m = world * m[rank * ROWS : (rank + 1) * ROWS]
                    what = f"{variant} rank {rank}/{world} step {step} memory {name}"
                    _close(mine["memories"][step][name], m, what)
        if variant.startswith("msbp") and variant != "msbp_k_out":
            last = single["memories"][-1]
            assert all(m.any() for m in last.values()), variant  # the memory did something


def test_two_and_three_ranks_equal_one_process_and_send_k_rows(tmp_path):
    variants_3 = ["dense", "sbp", "msbp"]
    variants_2 = list(VARIANTS)
    results = _spawn(tmp_path, 3, variants_3, variants_2)
    _check_equals_one_process(results, 3, variants_3)
    _check_equals_one_process(results, 2, variants_2)
    r0, r1 = (results[r] for r in (0, 1))

    # the hook's exchange equals DDP's own all-reduce (the non-kept rows are zero everywhere)
    for step in range(STEPS):
        for name, g in r0[2, "msbp_plain_ddp"]["grads"][step].items():
            torch.testing.assert_close(
                r0[2, "msbp"]["grads"][step][name], g, rtol=0, atol=1e-15, msg=name
            )
    for name, g in r0[2, "msbp"]["grads"][0].items():  # k rows only, the same on each rank
        if name.endswith(("0.weight", "2.weight")):
            assert int((g.abs().sum(1) > 0).sum()) == K, name
            assert torch.equal(g, r1[2, "msbp"]["grads"][0][name]), name

    # bytes: the sparse weights send k of out rows, the rest (biases, head) whole
    per_step_sparse = sum(K * d_in for d_in in (6, OUT[0])) * 8
    per_step_sparse_dense = (OUT[0] * 6 + OUT[1] * OUT[0]) * 8
    n_params = sum(p.numel() for p in _model(None).parameters())
    for got in (r0[2, "msbp"], r1[2, "msbp"], results[2][3, "msbp"]):
        state = got["state"]
        assert state["sparse_bytes"] == STEPS * per_step_sparse
        assert state["sparse_dense_bytes"] == STEPS * per_step_sparse_dense
        assert state["sparse_bytes"] <= 1.2 * K / min(OUT) * state["sparse_dense_bytes"]
        assert state["dense_bytes"] == STEPS * n_params * 8
        assert state["bytes"] == state["dense_bytes"] - STEPS * (
            per_step_sparse_dense - per_step_sparse
        )
    for got in (r0, r1):  # registered on a DDP built elsewhere: wrap_ddp's exchange
        assert got[2, "msbp_registered"]["state"] == got[2, "msbp"]["state"]
    acc = r0[2, "msbp_accumulate"]["state"]  # up to 2 k rows of each sparse weight
    assert STEPS * per_step_sparse < acc["sparse_bytes"] <= 2 * STEPS * per_step_sparse
    k_out = r0[2, "msbp_k_out"]["state"]  # k = out: the hook is the dense exchange
    assert k_out["bytes"] == k_out["dense_bytes"] and k_out["sparse_bytes"] == 0
    assert r0[2, "dense"]["state"] is None  # no consensus layer: no hook

    for got in (r0, r1):  # both ranks take the same way, whichever rank saw the inf
        assert "non-finite output gradient" in got["nonfinite"]["raise"]
        assert "non-finite output gradient" in got["nonfinite"]["raise_k_out"]
        assert got["nonfinite"]["skip"] == "dense, memory untouched: True"
        assert got["nonfinite"]["skip_slot_resized"] == "dense, memory untouched: True"

    refusals = r0["refusals"]
    assert "not by SparseConv1d" in refusals["conv"]
    assert "recurrent transform" in refusals["lstm"]


@pytest.mark.slow
def test_slot_memory_and_error_feedback_equal_one_process(tmp_path):
    variants = list(SLOW_VARIANTS)
    results = _spawn(tmp_path, 3, variants, variants)
    _check_equals_one_process(results, 3, variants)
    _check_equals_one_process(results, 2, variants)


# -- without a process group ---------------------------------------------------------------------


def test_consensus_is_a_no_op_in_one_process():
    results = [_run("msbp", 1, None)]
    cfg = MSBP.replace(consensus=False)
    VARIANTS["_plain"] = (cfg, "sgd", True)
    try:
        plain = _run("_plain", 1, None)
    finally:
        del VARIANTS["_plain"]
    for step in range(STEPS):
        for name, p in plain["params"][step].items():
            assert torch.equal(results[0]["params"][step][name], p), name


def test_consensus_config_errors_and_round_trip():
    with pytest.raises(ValueError, match="selection='per_example'"):
        msbp.SparseBackpropConfig(selection="per_example", consensus=True)
    with pytest.raises(ValueError, match="backend='auto'"):
        msbp.SparseBackpropConfig(backend="auto", consensus=True)
    with pytest.raises(ValueError, match="consensus must be a bool"):
        msbp.SparseBackpropConfig(consensus=1)
    cfg = msbp.SparseBackpropConfig(selection="random", consensus=True)
    assert msbp.SparseBackpropConfig.from_dict(cfg.to_dict()) == cfg
    assert msbp.SparseBackpropConfig().consensus is False


def test_hook_state_counters_reset():
    state = RowSparseState(bytes=5, dense_bytes=6, sparse_bytes=1, sparse_dense_bytes=2, calls=3)
    state.reset()
    assert (state.bytes, state.dense_bytes, state.sparse_bytes, state.calls) == (0, 0, 0, 0)


# -- a tied embedding and attention's in_proj_weight blocks under the row-sparse hook ------------

E = 8  # embed dim of the attention model, vocabulary of the tied one, Conv1D's outputs
SHARED_KINDS = ("tied", "attention", "conv1d")


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(E, 4), nn.Linear(4, E, bias=False)
        self.head.weight = self.emb.weight  # GPT-2's tie: sparsify marks head weight_tied

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(E, 2, batch_first=True), nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0])


class _Conv1DNet(nn.Module):
    """transformers' Conv1D (GPT-2's layer, weight (in, out)) as msbp converts it."""

    def __init__(self, cfg: msbp.SparseBackpropConfig) -> None:
        super().__init__()
        self.proj, self.head = SparseHFConv1D(E, 4, config=cfg), nn.Linear(E, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def _shared_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = msbp.SparseBackpropConfig(k=2, memory=0.8, consensus=True)
    if kind == "conv1d":
        return _Conv1DNet(cfg).double()
    model = (_TiedLM() if kind == "tied" else _Attention()).double()
    msbp.sparsify(model, cfg, exclude="head" if kind == "attention" else None)
    return model


def _shared_batch(kind: str, step: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch of 2 x 2 examples: rank r's half, or (rank None) all of it."""
    gen = torch.Generator().manual_seed(step)
    if kind == "tied":
        x = torch.randint(0, E, (4, 3), generator=gen)
        y = torch.randint(0, E, (4, 3), generator=gen)
    elif kind == "conv1d":
        x = torch.randn(4, 3, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (4, 3), generator=gen)
    else:
        x = torch.randn(4, 3, E, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (4, 3), generator=gen)
    return (x, y) if rank is None else (x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2])


def _run_shared(kind: str, rank: int | None) -> dict:
    model = _shared_model(kind)
    net = model if rank is None else wrap_ddp(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    params = []
    for step in range(3):
        opt.zero_grad()
        x, y = _shared_batch(kind, step, rank)
        out = net(x)
        nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    state = getattr(net, "msbp_comm_state", None)
    return {"params": params, "sparse_bytes": state and state.sparse_bytes,
            "sparse_dense_bytes": state and state.sparse_dense_bytes}


def _shared_worker(rank: int, world: int, out_dir: str) -> None:
    init_group(rank, world, out_dir)
    try:
        results = {kind: _run_shared(kind, rank) for kind in SHARED_KINDS}
        torch.save(results, os.path.join(out_dir, f"shared{rank}.pt"))
        all_done()
    finally:
        dist.destroy_process_group()


def test_tied_weight_and_attention_blocks_under_the_row_sparse_hook(tmp_path):
    """A sparse layer tied to an embedding has gradient rows outside the k it kept, different
    on every rank: the hook sends that weight whole (the replicas stayed apart when it sent k
    rows). Attention's q, k and v are row blocks of ``in_proj_weight``: the hook sends their
    3 k rows (it sent the whole Parameter, finding no rows recorded on it). transformers'
    Conv1D keeps its weight transposed: the hook sends the k columns (it sent it whole)."""
    mp.spawn(_shared_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"shared{r}.pt") for r in range(2)]
    for kind in SHARED_KINDS:
        single = _run_shared(kind, None)
        for rank, got in enumerate(results):
            for step, want in enumerate(single["params"]):
                for name, p in want.items():
                    _close(got[kind]["params"][step][name], p, f"{kind} rank {rank} {name}")
    tied = results[0]["tied"]
    assert tied["sparse_bytes"] == tied["sparse_dense_bytes"] == 0  # sent whole, as dense
    for got in results:  # q, k, v: 3 k of 3 E rows; out_proj: k of E rows; 3 steps
        assert got["attention"]["sparse_bytes"] == 3 * (3 * 2 + 2) * E * 8
        assert got["attention"]["sparse_dense_bytes"] == 3 * (3 * E + E) * E * 8
        # 2 of E columns of the (4, E) weight, 3 steps
        assert got["conv1d"]["sparse_bytes"] == 3 * 4 * 2 * 8
        assert got["conv1d"]["sparse_dense_bytes"] == 3 * 4 * E * 8
