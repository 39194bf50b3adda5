"""Where a training step of the paper's MNIST MLP spends its time: dense vs MSBP, per phase.

784-500-500-10 ReLU, k = 20 of 500 on both hidden layers, memory 0.8, unified top-k; dense uses
PyTorch's fused Adam, MSBP ``LazyRowAdam``. Times are medians per step (microseconds) over
interleaved rounds in one process, on random data.

    python benchmarks/bench_step.py --batch-size 10 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import msbp
from msbp.optim import LazyRowAdam

PHASES = ("zero_grad", "forward", "backward", "step")


def make(method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )
    if method == "dense":
        return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=20, memory=0.8), exclude="4")
    return model, LazyRowAdam(model.parameters(), lr=1e-3)


def run_round(model, opt, xs, ys) -> list[float]:
    totals = [0.0] * len(PHASES)
    for x, y in zip(xs, ys, strict=True):
        t0 = time.perf_counter()
        opt.zero_grad()
        t1 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[i] += dt
    return [t / len(xs) * 1e6 for t in totals]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    xs = torch.rand(args.steps, args.batch_size, 784, generator=gen)
    ys = torch.randint(0, 10, (args.steps, args.batch_size), generator=gen)
    variants = {m: make(m) for m in ("dense", "msbp")}
    for model, opt in variants.values():
        run_round(model, opt, xs[:20], ys[:20])  # warm-up
    samples: dict[str, list[list[float]]] = {m: [] for m in variants}
    for _ in range(args.rounds):
        for name, (model, opt) in variants.items():
            samples[name].append(run_round(model, opt, xs, ys))
    print(f"batch {args.batch_size}, {args.threads} threads, median us per step")
    print("| variant | " + " | ".join(PHASES) + " | total |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for name, rounds in samples.items():
        med = [statistics.median(r[i] for r in rounds) for i in range(len(PHASES))]
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in med) + f" | {sum(med):.0f} |")


if __name__ == "__main__":
    main()
