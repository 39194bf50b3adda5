"""CPU micro-benchmark: one linear layer's backward, dense vs sparse backprop (SBP) vs MSBP.

Every variant runs in this one process, interleaved round by round, on the same inputs; the
table reports median times and ratios against dense (higher = faster than dense).

    python benchmarks/bench_cpu.py                       # 2 threads, the two default shapes
    python benchmarks/bench_cpu.py --threads 1 --out bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import msbp
from msbp.environment import cpu_name, environment

SHAPES = [(1024, 4096, 4096), (50, 784, 500)]  # tokens x in x out


def _time_backward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    y = layer(x)
    start = time.perf_counter()
    y.backward(g)
    elapsed = time.perf_counter() - start
    layer.weight.grad = None
    layer.bias.grad = None
    x.grad = None
    return elapsed


def bench_shape(n: int, d_in: int, d_out: int, ratio: float, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out)
    variants: dict[str, nn.Module] = {"dense": dense}
    for selection in ("unified", "per_example"):
        for name, memory in (("sbp", 0.0), ("msbp", 0.8)):
            cfg = msbp.SparseBackpropConfig(ratio=ratio, memory=memory, selection=selection)
            variants[f"{name} {selection}"] = msbp.SparseLinear.from_dense(dense, cfg)
    x = torch.randn(n, d_in, requires_grad=True)
    g = torch.randn(n, d_out)
    reps = max(1, int(0.05 / _estimate(dense, x, g)))  # about 50 ms of dense work per round
    times: dict[str, list[float]] = {name: [] for name in variants}
    for layer in variants.values():  # warm-up, memory filled once
        for _ in range(3):
            _time_backward(layer, x, g)
    for _ in range(rounds):
        for name, layer in variants.items():
            times[name].append(sum(_time_backward(layer, x, g) for _ in range(reps)) / reps)
    base = statistics.median(times["dense"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            dict(shape=f"{n}x{d_in}x{d_out}", variant=name, k=getattr(variants[name], "k", d_out),
                 median_ms=med * 1e3, speedup=base / med)
        )
    return rows


def _estimate(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    _time_backward(layer, x, g)
    return max(_time_backward(layer, x, g), 1e-6)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.04)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for n, d_in, d_out in SHAPES:
        rows += bench_shape(n, d_in, d_out, args.ratio, args.rounds)
    print(f"backward of one linear layer, k/out = {args.ratio}, {args.threads} threads, "
          f"torch {torch.__version__}, {cpu_name()}")
    print("| tokens x in x out | variant | k | median backward (ms) | vs dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['k']} | {r['median_ms']:.3f} | "
              f"{r['speedup']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(ratio=args.ratio, environment=environment(), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
