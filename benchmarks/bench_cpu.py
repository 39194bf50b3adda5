"""CPU micro-benchmark: one linear layer's backward, dense vs sparse backprop (SBP) vs MSBP.

Every variant runs in this one process, interleaved round by round, on the same inputs; the
table reports median times and ratios against dense (higher = faster than dense).

    python benchmarks/bench_cpu.py                       # 2 threads, the default shapes
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

SHAPES = [(1024, 4096, 4096), (50, 784, 500), (10, 784, 500), (10, 500, 500)]  # n x in x out


def _time_backward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    y = layer(x)
    start = time.perf_counter()
    y.backward(g)
    elapsed = time.perf_counter() - start
    layer.weight.grad = None  # zero_grad(set_to_none=True): the fastest ordinary loop
    layer.bias.grad = None
    x.grad = None
    return elapsed


def _variants(ratio: float, kernels: list[str]) -> list[tuple[str, dict | None, str]]:
    """(name, SparseBackpropConfig fields or None for dense, kernel backend)."""
    out: list[tuple[str, dict | None, str]] = [("dense", None, "python")]
    for kernel in kernels:
        tag = "" if kernel == "native" else " (PyTorch path)"
        for selection in ("unified", "per_example"):
            for name, memory in (("sbp", 0.0), ("msbp", 0.8)):
                cfg = dict(ratio=ratio, memory=memory, selection=selection)
                out.append((f"{name} {selection}{tag}", cfg, kernel))
        if kernel == "native":
            for selection in ("unified", "per_example"):
                cfg = dict(ratio=ratio, memory=0.8, selection=selection, backend="auto")
                out.append((f"msbp {selection}, backend=auto", cfg, kernel))
    return out


def bench_shape(n: int, d_in: int, d_out: int, ratio: float, rounds: int,
                kernels: list[str]) -> list[dict]:
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out)
    variants: dict[str, tuple[nn.Module, str]] = {}
    for name, cfg, kernel in _variants(ratio, kernels):
        layer = dense if cfg is None else msbp.SparseLinear.from_dense(
            dense, msbp.SparseBackpropConfig(**cfg))
        variants[name] = (layer, kernel)
    x = torch.randn(n, d_in, requires_grad=True)
    g = torch.randn(n, d_out)
    reps = max(1, int(0.05 / _estimate(dense, x, g)))  # about 50 ms of dense work per round
    times: dict[str, list[float]] = {name: [] for name in variants}
    for layer, kernel in variants.values():  # warm-up, memory filled once, auto decided
        msbp.native.set_backend(kernel)
        for _ in range(3):
            _time_backward(layer, x, g)
    for _ in range(rounds):
        for name, (layer, kernel) in variants.items():
            msbp.native.set_backend(kernel)
            times[name].append(sum(_time_backward(layer, x, g) for _ in range(reps)) / reps)
    msbp.native.set_backend("auto")
    rows = []
    for name, ts in times.items():
        ratios = [d / t for d, t in zip(times["dense"], ts, strict=True)]
        rows.append(
            dict(shape=f"{n}x{d_in}x{d_out}", variant=name,
                 k=getattr(variants[name][0], "k", d_out),
                 median_ms=statistics.median(ts) * 1e3, speedup=statistics.median(ratios),
                 speedup_min=min(ratios), speedup_max=max(ratios))
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
    parser.add_argument("--shapes", default=None,
                        help="n x in x out list, e.g. 50x784x500,1024x4096x4096")
    parser.add_argument("--no-pytorch-path", action="store_true",
                        help="skip the pure-PyTorch variants")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    shapes = SHAPES if not args.shapes else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    kernels = (["native"] if msbp.native.use_native() else []) + (
        [] if args.no_pytorch_path else ["python"])
    rows = []
    for n, d_in, d_out in shapes:
        rows += bench_shape(n, d_in, d_out, args.ratio, args.rounds, kernels)
    print(f"backward of one linear layer, k/out = {args.ratio}, {args.threads} threads, "
          f"torch {torch.__version__}, {cpu_name()}")
    print(f"medians over {args.rounds} interleaved rounds; vs dense: median ratio (min-max)")
    print("| n x in x out | variant | k | median backward (ms) | vs dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['k']} | {r['median_ms']:.3f} | "
              f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(ratio=args.ratio, environment=environment(), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
