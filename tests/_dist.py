"""Process groups for the multi-process tests: gloo on localhost, rendezvous through a file."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def init_group(rank: int, world: int, out_dir: str) -> None:
    """Join a gloo group of ``world`` processes. The rendezvous is a file in ``out_dir`` (a
    FileStore), not a TCP port picked in advance that another process may take meanwhile."""
    torch.set_num_threads(1)
    store = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def all_done() -> None:
    """Wait for every process before tearing the group down: a process that left while another
    still talked to it made gloo abort the other (SIGABRT, 'terminate called')."""
    dist.barrier()
    gc.collect()  # DDP's reference cycles hold the group: free them before it is destroyed
