"""The parser's training step (Chen & Manning's MLP, 48 features x 50 -> 500 -> 2L+1, cube) at
meProp's batch of 10,000 transitions: dense, and unified-top-k MSBP (k = 20, memory 0.8) with the
hidden layer run unfused (embedding lookup, then the sparse layer) and fused
(``SparseLinear.forward_embedded``: the table's gradient from dx's k-wide factors). Median ms
per phase over interleaved rounds in one process, on random feature ids; fused Adam for all.

    python benchmarks/bench_sparse_embedding_linear.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import msbp
from msbp.tasks.parse import ParserMLP

VARIANTS = ("dense", "MSBP, unfused", "MSBP, fused")


def make(variant: str, words: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ParserMLP(words, 50, 40)
    if variant != "dense":
        config = msbp.SparseBackpropConfig(k=20, memory=0.8, selection="unified")
        msbp.sparsify(model, config, exclude=["output"])
        if variant == "MSBP, unfused":
            hidden = model.hidden
            hidden.forward_embedded = lambda ids, table: hidden(F.embedding(ids, table).flatten(1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=10000)
    parser.add_argument("--words", type=int, default=20000, help="rows of the word table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant and round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    gen = torch.Generator().manual_seed(0)
    feats = torch.randint(0, 40, (args.batch_size, 48), generator=gen)
    gold = torch.randint(0, 81, (args.batch_size,), generator=gen)
    models = {v: make(v, args.words) for v in VARIANTS}
    times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds + 1):  # round 0 warms up
        for v, (model, opt) in models.items():
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(feats), gold)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                if r > 0:
                    times[v].append((t1 - t0, t2 - t1, t3 - t0))
    dense_bwd = statistics.median(t[1] for t in times["dense"])
    dense_step = statistics.median(t[2] for t in times["dense"])
    print(f"batch {args.batch_size}, {args.threads} threads, median ms over {args.rounds} "
          f"interleaved rounds of {args.steps} steps (range of the backward)")
    print("| variant | forward | backward | step | backward x | step x |")
    print("|---|---|---|---|---|---|")
    for v, ts in times.items():
        fwd, bwd, step = (statistics.median(t[i] for t in ts) for i in range(3))
        lo, hi = min(t[1] for t in ts), max(t[1] for t in ts)
        print(f"| {v} | {fwd * 1e3:.0f} | {bwd * 1e3:.0f} ({lo * 1e3:.0f}-{hi * 1e3:.0f}) | "
              f"{step * 1e3:.0f} | {dense_bwd / bwd:.2f} | {dense_step / step:.2f} |")


if __name__ == "__main__":
    main()
