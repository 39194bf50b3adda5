"""CPU micro-benchmark: one LSTM layer, dense vs sparse backprop (SBP) vs MSBP.

Variants, all from the same weights, interleaved round by round in this one process:
PyTorch's fused ``nn.LSTM``; ``SparseLSTM`` with every unit kept (k = 4 x hidden: the same code as
the sparse variants with dense products, the baseline the ratios are taken against); SBP and MSBP
(memory 0.8) with per-example and unified top-k. Median forward and backward times per batch.

    python benchmarks/bench_lstm.py --out benchmarks/results/bench_lstm.json
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

# (batch, steps, input, hidden, k): the POS tagger's shape (32 sentences of ~25 words, 170
# input features, hidden 500, meProp's k = 5) and a larger one at k/out = 0.04
SHAPES = [(32, 25, 170, 500, 5), (128, 50, 512, 1024, 164)]
SAME_CODE = "SparseLSTM, every unit kept"


def _time(lstm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    lstm.zero_grad(set_to_none=False)
    start = time.perf_counter()
    out, _ = lstm(x)
    mid = time.perf_counter()
    out.backward(g)
    end = time.perf_counter()
    return mid - start, end - mid


def bench_shape(
    batch: int, steps: int, d_in: int, hidden: int, k: int, rounds: int
) -> list[dict]:
    torch.manual_seed(0)
    dense = nn.LSTM(d_in, hidden, batch_first=True)
    variants: dict[str, nn.Module] = {
        "nn.LSTM": dense,
        SAME_CODE: msbp.SparseLSTM.from_dense(dense, msbp.SparseBackpropConfig(k=0)),
    }
    for selection in ("per_example", "unified"):
        for name, memory in (("sbp", 0.0), ("msbp", 0.8)):
            cfg = msbp.SparseBackpropConfig(k=k, memory=memory, selection=selection)
            variants[f"{name} {selection}"] = msbp.SparseLSTM.from_dense(dense, cfg)
    x = torch.randn(batch, steps, d_in, requires_grad=True)
    g = torch.randn(batch, steps, hidden)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for lstm in variants.values():  # warm-up; the memory is filled once
        for _ in range(2):
            _time(lstm, x, g)
    for _ in range(rounds):
        for name, lstm in variants.items():
            times[name].append(_time(lstm, x, g))
    base = statistics.median(b for _, b in times[SAME_CODE])
    torch_bwd = statistics.median(b for _, b in times["nn.LSTM"])
    rows = []
    for name, ts in times.items():
        fwd = statistics.median(f for f, _ in ts)
        bwd = statistics.median(b for _, b in ts)
        rows.append(dict(
            shape=f"{batch}x{steps}x{d_in}x{hidden}", variant=name,
            k=getattr(variants[name], "k", 4 * hidden),
            forward_ms=fwd * 1e3, backward_ms=bwd * 1e3, speedup=base / bwd,
            speedup_vs_torch=torch_bwd / bwd,
        ))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        rows += bench_shape(*shape, args.rounds)
    print(f"one LSTM layer (batch x steps x input x hidden), {args.threads} threads, "
          f"torch {torch.__version__}, {cpu_name()}; ratios "
          "are backward times against SparseLSTM with every unit kept (same code, dense)")
    print("| shape | variant | k | forward (ms) | backward (ms) | vs same code | vs nn.LSTM |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['k']} | {r['forward_ms']:.2f} | "
              f"{r['backward_ms']:.2f} | {r['speedup']:.2f}x | {r['speedup_vs_torch']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
