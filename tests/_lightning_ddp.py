"""One phase of tests/test_lightning.py's DDP check, run as a script: Lightning's strategy="ddp"
starts the other process by running this file again.

usage: python _lightning_ddp.py {full,part1,part2} {0,1: every rank's memory in the checkpoint} DIR
"""

from __future__ import annotations

import os
import sys
import warnings

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import msbp
from msbp.optim import LazyRowAdam


class Net(L.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = msbp.sparsify(
            nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)),
            msbp.SparseBackpropConfig(ratio=0.25, memory=0.5),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return LazyRowAdam(self.parameters(), lr=1e-2)


class EveryRankMemory(Net):
    """The README's recipe: each rank keeps its own memory; rank 0 writes the checkpoint."""

    def on_save_checkpoint(self, checkpoint):
        checkpoint["msbp_memories"] = msbp.gather_memory_state(self)  # a collective

    def on_load_checkpoint(self, checkpoint):
        # called before the state dict is loaded: put this rank's memory in it
        checkpoint["state_dict"].update(checkpoint["msbp_memories"][self.trainer.global_rank])


def main() -> None:
    phase, recipe, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = DataLoader(data, batch_size=4, shuffle=False)
    cls = EveryRankMemory if recipe else Net
    kwargs = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                  enable_progress_bar=False, enable_model_summary=False)
    model = cls(seed=1 if phase == "part2" else 0)
    if phase == "part1":
        callback = ModelCheckpoint(dirpath=out, filename="first", save_top_k=-1)
        L.Trainer(max_epochs=1, callbacks=[callback], **kwargs).fit(model, loader)
        return
    L.Trainer(max_epochs=2, enable_checkpointing=False, **kwargs).fit(
        model, loader, ckpt_path=os.path.join(out, "first.ckpt") if phase == "part2" else None
    )
    torch.save(model.net.state_dict(), os.path.join(out, f"{phase}-{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main()
