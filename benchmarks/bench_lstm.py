"""CPU micro-benchmark: one LSTM layer, dense vs sparse backprop (SBP) vs MSBP.

Variants, all from the same weights, interleaved round by round in this one process:
PyTorch's fused ``nn.LSTM``; ``SparseLSTM`` with every unit kept (k = 4 x hidden: the same code as
the sparse variants with dense products, the baseline the ratios are taken against); SBP and MSBP
(memory 0.8) with per-example and unified top-k. The SparseLSTM variants run on both backends of
``msbp.native``: the native recurrence backward (one C++ op per layer and direction) and the
PyTorch loop. Median forward and backward times per batch, and the forward under
``torch.no_grad()`` (evaluation).

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
from msbp import native
from msbp.environment import cpu_name, environment

# (batch, steps, input, hidden, k): the POS tagger's shape (32 sentences of ~25 words, 170
# input features, hidden 500, meProp's k = 5) and a larger one at k/out = 0.04
SHAPES = [(32, 25, 170, 500, 5), (128, 50, 512, 1024, 164)]
SAME_CODE = "SparseLSTM, every unit kept"
BACKENDS = ("native", "python")


def _time(lstm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[float, float, float]:
    lstm.zero_grad(set_to_none=False)
    start = time.perf_counter()
    out, _ = lstm(x)
    mid = time.perf_counter()
    out.backward(g)
    end = time.perf_counter()
    with torch.no_grad():
        lstm(x)
    return mid - start, end - mid, time.perf_counter() - end


def bench_shape(
    batch: int, steps: int, d_in: int, hidden: int, k: int, rounds: int, backends: list[str]
) -> list[dict]:
    torch.manual_seed(0)
    dense = nn.LSTM(d_in, hidden, batch_first=True)
    # name -> (module, backend of msbp.native it runs on)
    variants: dict[str, tuple[nn.Module, str]] = {"nn.LSTM": (dense, "python")}
    configs = {SAME_CODE: msbp.SparseBackpropConfig(k=0)}
    for selection in ("per_example", "unified"):
        for name, memory in (("sbp", 0.0), ("msbp", 0.8)):
            cfg = msbp.SparseBackpropConfig(k=k, memory=memory, selection=selection)
            configs[f"{name} {selection}"] = cfg
    for name, cfg in configs.items():
        for backend in backends:
            label = f"{name} ({backend})" if len(backends) > 1 else name
            variants[label] = (msbp.SparseLSTM.from_dense(dense, cfg), backend)
    x = torch.randn(batch, steps, d_in, requires_grad=True)
    g = torch.randn(batch, steps, hidden)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for lstm, backend in variants.values():  # warm-up; the memory is filled once
        native.set_backend(backend)
        for _ in range(2):
            _time(lstm, x, g)
    for _ in range(rounds):
        for name, (lstm, backend) in variants.items():
            native.set_backend(backend)
            times[name].append(_time(lstm, x, g))
    base_name = f"{SAME_CODE} ({backends[0]})" if len(backends) > 1 else SAME_CODE
    base = statistics.median(b for _, b, _ in times[base_name])
    torch_bwd = statistics.median(b for _, b, _ in times["nn.LSTM"])
    rows = []
    for name, ts in times.items():
        fwd = statistics.median(f for f, _, _ in ts)
        bwd = statistics.median(b for _, b, _ in ts)
        evaluate = statistics.median(e for _, _, e in ts)
        rows.append(dict(
            shape=f"{batch}x{steps}x{d_in}x{hidden}", variant=name,
            k=getattr(variants[name][0], "k", 4 * hidden),
            forward_ms=fwd * 1e3, backward_ms=bwd * 1e3, no_grad_forward_ms=evaluate * 1e3,
            speedup=base / bwd, speedup_vs_torch=torch_bwd / bwd,
        ))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--shapes", default="all", choices=("all", "tagger"),
                        help="tagger: only the POS tagger's shape (the first)")
    parser.add_argument("--backends", default="native,python",
                        help="backends of msbp.native to run the SparseLSTM variants on")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"--backends: {backend!r} is not one of {BACKENDS}")
    if "native" in backends:
        native.set_backend("native")  # build now, and fail loudly if it cannot be
    rows = []
    for shape in SHAPES if args.shapes == "all" else SHAPES[:1]:
        rows += bench_shape(*shape, args.rounds, backends)
    print(f"one LSTM layer (batch x steps x input x hidden), {args.threads} threads, "
          f"torch {torch.__version__}, {cpu_name()}; ratios "
          f"are backward times against SparseLSTM with every unit kept (same code, dense, "
          f"{backends[0]} backend) and against nn.LSTM")
    print("| shape | variant | k | forward (ms) | backward (ms) | no_grad forward (ms) "
          "| vs same code | vs nn.LSTM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['k']} | {r['forward_ms']:.2f} | "
              f"{r['backward_ms']:.2f} | {r['no_grad_forward_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['speedup_vs_torch']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
