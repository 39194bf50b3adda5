"""A sparsified model trains under PyTorch Lightning as in a plain loop: automatic optimization
(Lightning's own order of zero_grad, backward and step), gradient accumulation and clipping give
bit-identical weights and memories, a run resumed from a ``ModelCheckpoint`` continues bit for bit,
validation leaves the memory alone, and float16 mixed precision keeps the memory unscaled when
Lightning is handed ``msbp.amp.GradScaler``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import msbp
from msbp import SparseBackpropConfig
from msbp.optim import LazyRowAdam

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

CFG = SparseBackpropConfig(ratio=0.25, memory=0.5)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g))


def _loader() -> DataLoader:
    return DataLoader(_data(), batch_size=4, shuffle=False)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def _opt(kind: str, params) -> torch.optim.Optimizer:
    return LazyRowAdam(params, lr=1e-2) if kind == "lazy" else torch.optim.AdamW(params, lr=1e-2)


class _Module(L.LightningModule):
    def __init__(self, net: nn.Module, opt: str = "lazy", where: str = "init",
                 cfg: SparseBackpropConfig = CFG) -> None:
        super().__init__()
        self.net, self.opt, self.where, self.cfg = net, opt, where, cfg
        if where == "init":
            msbp.sparsify(self.net, cfg)

    def configure_model(self) -> None:
        if self.where == "configure_model" and not isinstance(self.net[0], msbp.SparseLinear):
            msbp.sparsify(self.net, self.cfg)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return _opt(self.opt, self.parameters())


def _fit(module: L.LightningModule, epochs: int = 2, ckpt_path=None, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, GPUs, loggers
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer


def _plain(net: nn.Module, opt_kind: str, epochs: int = 2, accumulate: int = 1,
           clip: float | None = None) -> None:
    """The loop Lightning's automatic optimization stands for (it divides the loss by the
    number of accumulated batches, and zeroes gradients before the first one's backward)."""
    opt = _opt(opt_kind, net.parameters())
    for _ in range(epochs):
        for b, (x, y) in enumerate(_loader()):
            if b % accumulate == 0:
                opt.zero_grad()
            (F.cross_entropy(net(x), y) / accumulate).backward()
            if (b + 1) % accumulate == 0:
                if clip is not None:
                    nn.utils.clip_grad_norm_(net.parameters(), clip)
                opt.step()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert any(k.endswith("memory") for k in sa)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "opt,where,accumulate,clip",
    [("lazy", "init", 1, None), ("lazy", "configure_model", 4, 0.5), ("adamw", "init", 4, None)],
)
def test_matches_plain_loop(backend, opt, where, accumulate, clip):
    """Lightning calls training_step, zero_grad, backward and step in its own order; the
    weights and memories after 2 epochs are bit-identical to a plain loop's."""
    net = _net()
    ref = msbp.sparsify(copy.deepcopy(net), CFG)
    _plain(ref, opt, accumulate=accumulate, clip=clip)
    module = _Module(net, opt, where)
    extra = {} if clip is None else {"gradient_clip_val": clip}
    _fit(module, accumulate_grad_batches=accumulate, **extra)
    assert isinstance(module.net[0], msbp.SparseLinear)
    assert module.net[2].memory.abs().sum() > 0
    _assert_same(module.net, ref)


def test_k_out_memory_0_is_the_dense_model(backend):
    """k = out with memory 0 under Lightning: the dense model's run bit for bit (AdamW)."""
    sparse = _Module(_net(), "adamw", cfg=SparseBackpropConfig(ratio=1.0, memory=0.0))
    _fit(sparse)
    dense = _Module(_net(), "adamw", where="nowhere")
    _fit(dense)
    assert isinstance(sparse.net[0], msbp.SparseLinear)
    assert not isinstance(dense.net[0], msbp.SparseLinear)
    want = dense.net.state_dict()
    got = msbp.dense_state_dict(sparse.net)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_matches_plain_loop(backend, precision):
    """bf16-mixed is the loop under torch.autocast; bf16-true the loop on the model cast to
    bfloat16 (memories stay float32): bit-identical either way."""
    ref = msbp.sparsify(_net(), CFG)
    if precision == "bf16-true":
        ref.to(torch.bfloat16)
    opt = LazyRowAdam(ref.parameters(), lr=1e-2)
    for x, y in _loader():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            # Lightning runs the whole training_step, loss included, under autocast
            loss = F.cross_entropy(ref(x.to(torch.bfloat16) if precision == "bf16-true" else x), y)
        loss.backward()
        opt.step()
    module = _Module(_net())
    _fit(module, epochs=1, precision=precision)
    assert module.net[2].memory.dtype == torch.float32
    _assert_same(module.net, ref)


@pytest.mark.parametrize("layout", ["unit", "slot"])
def test_resume_from_checkpoint_is_exact(backend, tmp_path, layout):
    """The memories are in the LightningModule's state_dict and LazyRowAdam's row state in the
    optimizer's: fit(ckpt_path=...) from an epoch-end checkpoint continues bit for bit."""
    cfg = CFG.replace(memory_layout=layout)
    full = _Module(_net(), cfg=cfg)
    _fit(full, epochs=3)
    first = _Module(_net(), cfg=cfg)
    _fit(first, epochs=1, enable_checkpointing=True,
         callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)])
    (path,) = tmp_path.glob("*.ckpt")
    assert "net.2.memory" in torch.load(path, weights_only=False)["state_dict"]
    resumed = _Module(_net(seed=1), cfg=cfg)  # other weights: all comes from the checkpoint
    _fit(resumed, epochs=3, ckpt_path=path)
    _assert_same(resumed.net, full.net)


def test_validation_is_dense_and_leaves_memory(backend):
    """Validation runs under no_grad: the dense model's forward, no memory update, and a fit
    with a validation loop trains exactly as one without."""
    with_val = _Module(_net())
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(with_val, _loader(), val_dataloaders=_loader())
        before = copy.deepcopy(with_val.net.state_dict())
        (result,) = trainer.validate(with_val, _loader(), verbose=False)
    _assert_same(with_val.net, _load(before))
    plain_fit = _Module(_net())
    _fit(plain_fit)
    _assert_same(with_val.net, plain_fit.net)
    dense = msbp.densify(copy.deepcopy(with_val.net))
    x, y = _data().tensors
    with torch.no_grad():
        losses = [F.cross_entropy(dense(x[i:i + 4]), y[i:i + 4]) for i in range(0, 32, 4)]
    assert result["val_loss"] == pytest.approx(float(torch.stack(losses).mean()), abs=1e-6)


def _load(state: dict) -> nn.Module:
    net = msbp.sparsify(_net(), CFG)
    net.load_state_dict(state)
    return net


def test_fp16_mixed_with_msbp_grad_scaler(backend):
    """precision="16-mixed" gives Lightning a torch.amp.GradScaler, whose scaled gradients the
    memory would keep; handed msbp.amp.GradScaler through the MixedPrecision plugin it trains
    as the plain loop with that scaler, while the scale changes every step (float16 autocast on
    the CPU stands in for CUDA)."""
    def scaler():
        return msbp.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)

    ref = msbp.sparsify(_net(), CFG)
    opt, ref_scaler = LazyRowAdam(ref.parameters(), lr=1e-2), scaler()
    for x, y in _loader():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ref(x), y)
        ref_scaler.scale(loss).backward()
        ref_scaler.step(opt)
        ref_scaler.update()
    module = _Module(_net())
    _fit(module, epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler())])
    _assert_same(module.net, ref)
    assert ref_scaler.get_scale() > 4.0  # the scale changed


def _ddp_run(tmp_path, recipe: int) -> tuple[list[dict], list[dict]]:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_lightning_ddp.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(msbp.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / f"recipe{recipe}"
    out.mkdir()
    for phase in ("full", "part1", "part2"):
        subprocess.run([sys.executable, str(script), phase, str(recipe), str(out)], check=True,
                       env=env, timeout=300, capture_output=True)
    load = [[torch.load(out / f"{phase}-{rank}.pt") for rank in range(2)]
            for phase in ("full", "part2")]
    return load[0], load[1]


@pytest.mark.slow
def test_ddp_replicas_and_exact_resume_with_every_rank_memory(tmp_path):
    """strategy="ddp", 2 gloo processes: LazyRowAdam keeps the replicas identical while each
    rank keeps its own memory. Lightning's checkpoint holds rank 0's memory only, so a resume
    gives rank 0's to every rank and departs from the uninterrupted run; with every rank's
    memory saved in on_save_checkpoint and put back in on_load_checkpoint it continues bit for
    bit (about 75 s: six launches)."""
    full, resumed = _ddp_run(tmp_path, recipe=1)
    for key in full[0]:
        if key.endswith("memory"):
            assert not torch.equal(full[0][key], full[1][key]), key
        else:
            assert torch.equal(full[0][key], full[1][key]), key
    for rank in range(2):
        for key in full[rank]:
            assert torch.equal(resumed[rank][key], full[rank][key]), (rank, key)
    full, resumed = _ddp_run(tmp_path, recipe=0)  # the control: Lightning's checkpoint alone
    assert not torch.equal(resumed[1]["0.memory"], full[1]["0.memory"])
    assert not torch.equal(resumed[0]["0.weight"], full[0]["0.weight"])
