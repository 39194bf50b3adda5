"""Data-parallel training step: bytes all-reduced and wall time, dense DDP against sparse DDP.

An MLP 4096-4096-4096-10 (the two 4096 x 4096 layers sparsified, k/out = 0.04, memory 0.8;
the 10-class head dense), a local batch of 32 rows per rank, SGD, float32, gloo on localhost,
one thread per rank. Three variants, each a full training step (forward, backward with the
gradient exchange, optimizer step):

- dense DDP: plain ``nn.Linear`` layers;
- sparse DDP: ``msbp.sparsify`` without consensus: each rank keeps its own k rows, so the
  all-reduced weight gradient is dense and DDP exchanges every row;
- sparse DDP + consensus: ``consensus=True`` and ``msbp.distributed.wrap_ddp``'s row-sparse
  exchange (only the k agreed rows of each sparse weight are all-reduced).

Every variant runs with ``row_sparse_allreduce_hook`` registered, which counts the bytes it
all-reduces (for the dense variants it is DDP's own in-place all-reduce of each bucket), so the
byte counts and timings are taken the same way. Variants run interleaved, round by round; the
table gives the median step time over all measured steps of rank 0 and its 10-90% spread.

    python benchmarks/bench_ddp.py --world 2 4 --json benchmarks/results/bench_ddp.json \\
        --markdown benchmarks/results/bench_ddp.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import msbp
from msbp.distributed import RowSparseState, row_sparse_allreduce_hook, wrap_ddp
from msbp.environment import environment

VARIANTS = ("dense DDP", "sparse DDP", "sparse DDP + consensus")
CLASSES = 10
WIDTH = int(os.environ.get("BENCH_DDP_WIDTH", "4096"))  # smaller only for a smoke test


def _model(variant: str, ratio: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )
    if variant != "dense DDP":
        cfg = msbp.SparseBackpropConfig(
            ratio=ratio, memory=0.8, consensus=variant == "sparse DDP + consensus"
        )
        msbp.sparsify(model, cfg, exclude="4")
    return model


def _wrap(model: nn.Module) -> tuple[nn.Module, RowSparseState]:
    ddp = wrap_ddp(model, gradient_as_bucket_view=True)
    state = ddp.msbp_comm_state
    if state is None:  # no consensus layer: count DDP's dense all-reduce with the same hook
        state = RowSparseState()
        ddp.register_comm_hook(state, row_sparse_allreduce_hook)
    return ddp, state


def _worker(rank: int, world: int, store: str, args, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, WIDTH, generator=gen)
        y = torch.randint(0, CLASSES, (args.batch,), generator=gen)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        per_step: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                ddp, state = _wrap(_model(variant, args.ratio))
                opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
                for step in range(args.warmup + args.steps):
                    if step == args.warmup:
                        state.reset()
                    dist.barrier()
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(ddp(x), y).backward()
                    opt.step()
                    if step >= args.warmup:
                        times[variant].append(time.perf_counter() - t0)
                if state.sparse_dense_bytes:
                    sparse_weight = state.sparse_bytes / args.steps
                else:  # all dense: everything but the other parameters
                    sparse_weight = state.dense_bytes / args.steps - _other_bytes(ddp.module)
                per_step[variant] = {"bytes": state.bytes / args.steps,
                                     "sparse_weight_bytes": sparse_weight}
                del ddp, opt
        if rank == 0:
            torch.save({"times": times, "bytes": per_step}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _other_bytes(model: nn.Module) -> int:
    """Bytes of everything but the two sparse layers' weights, per step."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n not in ("0.weight", "2.weight"))


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.1), pick(0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=32, help="rows per rank")
    parser.add_argument("--ratio", type=float, default=0.04)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()

    rows = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.pt")
            mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), args, out), nprocs=world)
            got = torch.load(out)
        dense_time = _quantiles(got["times"]["dense DDP"])[0]
        dense_bytes = got["bytes"]["dense DDP"]
        for variant in VARIANTS:
            med, lo, hi = _quantiles(got["times"][variant])
            b = got["bytes"][variant]
            rows.append({
                "world": world, "variant": variant, "step_s": med, "step_p10_s": lo,
                "step_p90_s": hi, "speedup_vs_dense": dense_time / med,
                "bytes_per_step": b["bytes"], "sparse_weight_bytes_per_step":
                b["sparse_weight_bytes"],
                "bytes_vs_dense": b["bytes"] / dense_bytes["bytes"],
                "sparse_weight_bytes_vs_dense":
                b["sparse_weight_bytes"] / dense_bytes["sparse_weight_bytes"],
            })
            print(f"W={world} {variant:24s} step {med * 1e3:8.1f} ms [{lo * 1e3:.1f}, "
                  f"{hi * 1e3:.1f}]  {b['bytes'] / 2**20:7.2f} MiB/step "
                  f"({rows[-1]['bytes_vs_dense']:.3f} of dense)", flush=True)
    meta = {"command": "python benchmarks/bench_ddp.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None and k not in ("json", "markdown")),
        "environment": environment(), "threads_per_rank": 1, "rows": rows,
        "model": f"MLP {WIDTH}-{WIDTH}-{WIDTH}-{CLASSES}, layers 0 and 2 sparse, "
                 f"ratio {args.ratio}, memory 0.8, float32, SGD, batch {args.batch}/rank"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)
    if args.markdown:
        lines = [
            f"Model: {meta['model']}. gloo on localhost, 1 thread per rank.",
            "",
            "| ranks | variant | step (ms), median [p10, p90] | vs dense | MiB all-reduced "
            "/ step | sparse weights' bytes vs dense |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['world']} | {r['variant']} | {r['step_s'] * 1e3:.0f} "
                f"[{r['step_p10_s'] * 1e3:.0f}, {r['step_p90_s'] * 1e3:.0f}] | "
                f"{r['speedup_vs_dense']:.2f}x | {r['bytes_per_step'] / 2**20:.2f} | "
                f"{r['sparse_weight_bytes_vs_dense']:.3f} |"
            )
        lines += ["", f"Command: `{meta['command']}`"]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
