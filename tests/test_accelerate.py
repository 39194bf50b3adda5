"""msbp under Hugging Face ``accelerate``: an ``Accelerator`` loop trains a sparsified model step
for step as the plain PyTorch loop does (AdamW and ``LazyRowAdam``, gradient accumulation,
``clip_grad_norm_``, bf16 autocast), k = out with memory 0 trains as the dense model, and
``save_state`` / ``load_state`` resume exactly (memories and ``LazyRowAdam`` state restored).

fp16 is simulated on the CPU as accelerate runs it on a GPU (autocast and a scaler set before
``prepare``): accelerate makes a plain ``torch.amp.GradScaler``, under which the memory holds
scaled gradients; ``msbp.amp.GradScaler`` put in its place keeps them unscaled. Two processes
(``torchrun``, gloo) are behind ``-m slow``: with ``msbp.distributed.RankMemories`` registered
for checkpointing every rank resumes with its own memory, bit for bit; consensus with
``msbp.distributed.register_row_sparse_hook`` on accelerate's DDP is one process's run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import msbp
from msbp.optim import LazyRowAdam

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState  # noqa: E402

CFG = msbp.SparseBackpropConfig(k=4, memory=0.8)
ROWS, BATCH = 32, 4


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerator's state is a process-wide singleton fixed by the first ``Accelerator``: each
    test builds its own, and leaves none behind for other test files."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _model(config: msbp.SparseBackpropConfig | None = CFG, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 3)).to(dtype)
    return net if config is None else msbp.sparsify(net, config, exclude="4")


def _batches(dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (ROWS,), generator=g)
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, ROWS, BATCH)]


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return LazyRowAdam(model.parameters(), lr=1e-2)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _plain(kind: str, accumulate: int, clip: float | None, batches, model=None) -> nn.Module:
    model = _model() if model is None else model
    opt = _optimizer(kind, model)
    for i, (x, y) in enumerate(batches):
        (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return model


def _accelerated(accelerator, model, opt, batches, clip: float | None = None) -> None:
    for x, y in batches:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            if clip is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("kind", ["adamw", "lazy"])
@pytest.mark.parametrize("accumulate, clip", [(1, None), (4, 0.5)])
def test_accelerator_loop_is_the_plain_loop(backend, kind, accumulate, clip):
    """Weights and memories equal bit for bit after 8 micro-batches, with a DataLoader prepared
    by the Accelerator; accumulation divides the loss as the plain loop does."""
    batches = _batches()
    want = _state(_plain(kind, accumulate, clip, batches))
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = _model()
    opt = _optimizer(kind, model)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*map(torch.cat, zip(*batches, strict=True))),
        batch_size=BATCH)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    _accelerated(accelerator, model, opt, loader, clip)
    got = _state(accelerator.unwrap_model(model))
    assert got["0.memory"].abs().sum() > 0
    _assert_equal(got, want)


def test_bf16_autocast_is_the_plain_autocast_loop():
    batches = _batches()
    model = _model()
    opt = _optimizer("lazy", model)
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    want = _state(model)
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = _model()
    model, opt = accelerator.prepare(model, _optimizer("lazy", model))
    _accelerated(accelerator, model, opt, batches)
    _assert_equal(_state(accelerator.unwrap_model(model)), want)


def test_k_equal_to_out_without_memory_is_the_dense_model():
    batches = _batches(torch.float64)
    states = []
    for config in (msbp.SparseBackpropConfig(ratio=1.0, memory=0.0), None):
        AcceleratorState._reset_state(True)
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = _model(config, torch.float64)
        model, opt = accelerator.prepare(model, _optimizer("adamw", model))
        _accelerated(accelerator, model, opt, batches, clip=0.5)
        states.append(msbp.dense_state_dict(accelerator.unwrap_model(model)))
    _assert_equal(*states)


@pytest.mark.parametrize("kind", ["adamw", "lazy"])
def test_save_state_and_load_state_resume_exactly(backend, kind, tmp_path):
    """save_state after 3 of 4 accumulated steps, load_state into a fresh model and optimizer,
    continue: equal bit for bit to the run never interrupted (memories in model.safetensors,
    LazyRowAdam's moments and step counts in optimizer.bin)."""
    batches = _batches()

    def fresh():
        AcceleratorState._reset_state(True)
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = _model()
        model, opt = accelerator.prepare(model, _optimizer(kind, model))
        return accelerator, model, opt

    accelerator, model, opt = fresh()
    _accelerated(accelerator, model, opt, batches)
    want = _state(accelerator.unwrap_model(model))
    accelerator, model, opt = fresh()
    _accelerated(accelerator, model, opt, batches[:6])
    accelerator.save_state(str(tmp_path))
    accelerator, model, opt = fresh()
    accelerator.load_state(str(tmp_path))
    assert accelerator.unwrap_model(model)[0].memory.abs().sum() > 0
    _accelerated(accelerator, model, opt, batches[6:])
    _assert_equal(_state(accelerator.unwrap_model(model)), want)


def _fp16_as_on_a_gpu(scaler) -> tuple[torch.Tensor, dict]:
    """accelerate on a GPU with mixed_precision="fp16": autocast around the model's forward and
    the scaler in backward / step / clip_grad_norm_ (on the CPU accelerate does neither)."""
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True
    accelerator.scaler = scaler
    model = _model()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _accelerated(accelerator, model, opt, _batches(), clip=1.0)
    return accelerator.unwrap_model(model)[0].memory.clone(), _state(model)


def test_fp16_needs_msbp_grad_scaler_in_place_of_accelerates():
    """accelerate's own scaler (a plain torch.amp.GradScaler) leaves the memory in scaled units,
    scale times too large; msbp.amp.GradScaler set as ``accelerator.scaler`` before ``prepare``
    trains as the plain loop with it."""
    plain_memory, _ = _fp16_as_on_a_gpu(torch.amp.GradScaler("cpu", init_scale=1024.0))
    AcceleratorState._reset_state(True)
    memory, got = _fp16_as_on_a_gpu(msbp.amp.GradScaler("cpu", init_scale=1024.0))
    torch.testing.assert_close(plain_memory, 1024.0 * memory, rtol=1e-3, atol=0)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = msbp.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in _batches():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss.float()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    _assert_equal(got, _state(model))


def test_rank_memories_without_a_process_group():
    model = _model()
    model(torch.randn(4, 8)).sum().backward()
    saved = msbp.distributed.RankMemories(model).state_dict()
    assert list(saved) == ["memories"] and len(saved["memories"]) == 1
    fresh = _model()
    msbp.distributed.RankMemories(fresh).load_state_dict(saved)
    torch.testing.assert_close(fresh[0].memory, model[0].memory, rtol=0, atol=0)
    with pytest.raises(ValueError, match="RankMemories"):
        msbp.distributed.RankMemories(fresh).load_state_dict({"model": {}})


def _torchrun(tmp_path: Path, worker: str, *args: str) -> None:
    script = tmp_path / "worker.py"
    script.write_text(worker)
    src = str(Path(msbp.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    # --standalone: a free port of its own, not the default 29500 another launch may hold
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-6000:]


WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    import accelerate
    import msbp
    from msbp.optim import LazyRowAdam

    torch.set_num_threads(1)
    out, register = sys.argv[1], sys.argv[2] == "register"

    def setup():
        accelerator = accelerate.Accelerator(cpu=True)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                            nn.Linear(32, 3))
        model = msbp.sparsify(net, msbp.SparseBackpropConfig(k=4, memory=0.8), exclude="4")
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g),
                                              torch.randint(0, 3, (64,), generator=g))
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        opt = LazyRowAdam(model.parameters(), lr=1e-2)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        if register:
            accelerator.register_for_checkpointing(msbp.distributed.RankMemories(model))
        return accelerator, model, opt, list(loader)

    def train(accelerator, model, opt, batches):
        for x, y in batches:
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()

    def gathered(t):
        ts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(ts, t.contiguous())
        return ts

    def state(accelerator, model):
        inner = accelerator.unwrap_model(model)
        return torch.cat([p.detach().flatten() for p in inner.parameters()]), inner[0].memory

    accelerator, model, opt, batches = setup()
    train(accelerator, model, opt, batches[:4])
    accelerator.save_state(out)
    params, memory = state(accelerator, model)
    replicas_equal = all(torch.equal(p, params) for p in gathered(params))
    memories_differ = not torch.equal(*gathered(memory))
    train(accelerator, model, opt, batches[4:])
    want_params, want_memory = (t.clone() for t in state(accelerator, model))

    accelerator, model, opt, batches = setup()
    accelerator.load_state(out)
    train(accelerator, model, opt, batches[4:])
    params, memory = state(accelerator, model)
    # a file per rank: two processes printing to one pipe may interleave their lines
    with open(f"{out}.{accelerator.process_index}", "w") as f:
        f.write(f"{replicas_equal} {memories_differ} "
                f"{torch.equal(params, want_params)} {torch.equal(memory, want_memory)}")
    dist.barrier()
""")


@pytest.mark.slow
@pytest.mark.parametrize("register", ["register", "plain"])
def test_two_processes_resume_every_rank_with_its_own_memory(tmp_path, register):
    """torchrun, 2 gloo processes, LazyRowAdam: replicas stay equal while each rank keeps its own
    memory. save_state alone saves rank 0's memory, so rank 1 resumes with rank 0's and both
    diverge (DDP averages the gradients); with RankMemories registered both resume exactly."""
    _torchrun(tmp_path, WORKER, str(tmp_path / "ckpt"), register)
    results = [(tmp_path / f"ckpt.{rank}").read_text().split() for rank in range(2)]
    exact = register == "register"
    for replicas_equal, memories_differ, params_equal, memory_equal in results:
        assert (replicas_equal, memories_differ) == ("True", "True")
        assert (params_equal, memory_equal) == (str(exact), str(exact))


CONSENSUS_WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    import accelerate
    import msbp

    torch.set_num_threads(1)

    def model(consensus):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                            nn.Linear(32, 3)).double()
        config = msbp.SparseBackpropConfig(k=4, memory=0.8, consensus=consensus)
        return msbp.sparsify(net, config, exclude="4")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    accelerator = accelerate.Accelerator(cpu=True)
    net = model(True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    net, opt, loader = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1), loader)
    state = msbp.distributed.register_row_sparse_hook(net)
    for xb, yb in loader:  # rank r takes batches r, r + 2, ...: one step sees 8 rows
        accelerator.backward(nn.functional.cross_entropy(net(xb), yb))
        opt.step()
        opt.zero_grad()
    got = accelerator.unwrap_model(net).state_dict()
    one = model(False)  # one process on the 8 rows of each step (no collective)
    opt = torch.optim.SGD(one.parameters(), lr=0.1)
    for i in range(0, 64, 8):
        nn.functional.cross_entropy(one(x[i:i + 8]), y[i:i + 8]).backward()
        opt.step()
        opt.zero_grad()
    diff = max((got[k] - v).abs().max().item() for k, v in one.state_dict().items())
    with open(f"{sys.argv[1]}.{accelerator.process_index}", "w") as f:
        f.write(f"{diff} {state.sparse_bytes} {state.sparse_dense_bytes}")
    dist.barrier()
""")


@pytest.mark.slow
def test_two_processes_consensus_with_the_row_sparse_hook(tmp_path):
    """consensus=True on accelerate's own DDP, with register_row_sparse_hook: 2 processes with 4
    rows each train as one process on 8 (float64, to rounding) and the sparse layers' weights
    exchange k/out = 1/8 of their bytes."""
    _torchrun(tmp_path, CONSENSUS_WORKER, str(tmp_path / "result"))
    for rank in range(2):
        diff, sparse, dense = (tmp_path / f"result.{rank}").read_text().split()
        assert float(diff) < 1e-12
        assert int(sparse) * 8 == int(dense) > 0


def test_tied_llama_in_bf16_resumes_exactly(tmp_path):
    """A transformers model whose output layer shares the embedding's weight (safetensors keeps
    one copy, accelerate reloads it), bf16 autocast, accumulation, LazyRowAdam: save_state after
    2 of 4 steps, load_state, continue; equal to the run never interrupted."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(3, 24, (8, 4, 8), generator=torch.Generator().manual_seed(3))

    def fresh():
        AcceleratorState._reset_state(True)
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2,
                                             mixed_precision="bf16")
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=24, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
        model = msbp.sparsify(transformers.LlamaForCausalLM(config),
                              msbp.SparseBackpropConfig(ratio=0.25, memory=0.8))
        assert model.lm_head.weight_tied
        model, opt = accelerator.prepare(model, LazyRowAdam(model.parameters(), lr=1e-2))
        return accelerator, model, opt

    def train(accelerator, model, opt, steps):
        for i in steps:
            with accelerator.accumulate(model):
                accelerator.backward(model(input_ids=ids[i], labels=ids[i]).loss)
                opt.step()
                opt.zero_grad()

    accelerator, model, opt = fresh()
    train(accelerator, model, opt, range(8))
    want = _state(accelerator.unwrap_model(model))
    accelerator, model, opt = fresh()
    train(accelerator, model, opt, range(4))
    accelerator.save_state(str(tmp_path))
    accelerator, model, opt = fresh()
    accelerator.load_state(str(tmp_path))
    train(accelerator, model, opt, range(4, 8))
    _assert_equal(_state(accelerator.unwrap_model(model)), want)


@pytest.mark.slow
def test_dynamo_backend_inductor_trains_as_eager():
    """Accelerator(dynamo_backend="inductor") compiles the model in prepare: with AdamW the run
    is the eager run bit for bit (LazyRowAdam is not: under torch.compile it gets no row log)."""
    batches = _batches()
    states = []
    for dynamo in ("no", "inductor"):
        AcceleratorState._reset_state(True)
        accelerator = accelerate.Accelerator(cpu=True, dynamo_backend=dynamo)
        model = _model()
        model, opt = accelerator.prepare(model, _optimizer("adamw", model))
        _accelerated(accelerator, model, opt, batches)
        states.append(_state(accelerator.unwrap_model(model, keep_torch_compile=False)))
    _assert_equal(*states)


def test_register_row_sparse_hook_in_one_process_leaves_the_model_alone():
    """In one process prepare returns the model itself, not a DDP wrapper: nothing to hook."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = accelerator.prepare(_model(msbp.SparseBackpropConfig(k=4, consensus=True)))
    assert msbp.distributed.register_row_sparse_hook(model) is None
