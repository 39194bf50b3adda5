"""CPU micro-benchmark: one convolution of the CIFAR-10 network, dense vs SBP vs MSBP backward.

Variants, all from the same weights, interleaved round by round in this one process:
``nn.Conv2d`` (PyTorch's dense backward, the baseline the ratios are taken against);
``SparseConv2d`` with every channel kept (the same code as the sparse variants with dense
convolutions); SBP (memory 0) and MSBP (memory 0.8, unit layout) with unified top-k at several
k / C_out. The input requires grad (dx and dW are both computed, as inside the network). Median
backward time per batch with the spread (min-max over the rounds); the forward is not timed.

    python benchmarks/bench_conv.py --threads 1 --out benchmarks/results/bench_conv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import msbp
from msbp.environment import cpu_name, environment

# name -> (C_in, C_out, H = W): the sparsified convolutions of msbp.tasks.cifar10.CifarNet
# at width 32 (block2 is the one the target is stated for)
LAYERS = {"block1": (32, 64, 32), "block2": (64, 128, 16), "block3": (128, 128, 8)}
RATIOS = (0.05, 0.1, 0.25, 0.5)
SAME_CODE = "SparseConv2d, every channel kept"


def _backward_seconds(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    conv.zero_grad(set_to_none=True)
    x.grad = None
    out = conv(x)
    start = time.perf_counter()
    out.backward(g)
    return time.perf_counter() - start


def bench_layer(name: str, batch: int, rounds: int, ratios: list[float],
                channels_last: bool) -> list[dict]:
    c_in, c_out, hw = LAYERS[name]
    torch.manual_seed(0)
    dense = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense = dense.to(memory_format=fmt)
    variants: dict[str, nn.Module] = {"nn.Conv2d": dense}
    variants[SAME_CODE] = msbp.SparseConv2d.from_dense(dense, msbp.SparseBackpropConfig(k=0))
    for ratio in ratios:
        for method, memory in (("sbp", 0.0), ("msbp", 0.8)):
            cfg = msbp.SparseBackpropConfig(ratio=ratio, memory=memory, selection="unified")
            variants[f"{method} {ratio:g}"] = msbp.SparseConv2d.from_dense(dense, cfg)
    x = torch.randn(batch, c_in, hw, hw).to(memory_format=fmt).requires_grad_()
    g = torch.randn(batch, c_out, hw, hw).to(memory_format=fmt)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for conv in variants.values():  # warm-up (allocator, oneDNN primitives); memory filled
        for _ in range(2):
            _backward_seconds(conv, x, g)
    for _ in range(rounds):
        for v, conv in variants.items():
            times[v].append(_backward_seconds(conv, x, g))
    base = statistics.median(times["nn.Conv2d"])
    rows = []
    for v, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(
            layer=name, shape=f"{batch}x{c_in}x{hw}x{hw} -> {c_out}", variant=v,
            k=getattr(variants[v], "k", c_out), k_ratio=getattr(variants[v], "k", c_out) / c_out,
            backward_ms=med * 1e3, min_ms=min(ts) * 1e3, max_ms=max(ts) * 1e3,
            speedup=base / med, channels_last=channels_last,
        ))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", default="block2",
                        help=f"comma-separated, of {sorted(LAYERS)} (default block2)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--channels-last", action="store_true",
                        help="input, gradient and weight in channels-last memory format")
    parser.add_argument("--out", default=None, help="write the results as JSON here (and .md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    for layer in layers:
        if layer not in LAYERS:
            parser.error(f"--layers: {layer!r} is not one of {sorted(LAYERS)}")
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    rows = []
    for layer in layers:
        rows += bench_layer(layer, args.batch, args.rounds, ratios, args.channels_last)
    lines = [
        f"one convolution (3x3, padding 1, no bias) of the CIFAR-10 network, backward only "
        f"(dx and dW), batch {args.batch}, {args.threads} thread(s), {args.rounds} interleaved "
        f"rounds, {'channels-last' if args.channels_last else 'contiguous'} tensors, torch "
        f"{torch.__version__}, {cpu_name()} (a shared machine); median and min-max; speedup = "
        "nn.Conv2d's median / the variant's",
        "",
        "| layer | shape | variant | k | backward (ms) | min-max (ms) | speedup vs nn.Conv2d |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['variant']} | {r['k']} | {r['backward_ms']:.2f} "
            f"| {r['min_ms']:.2f}-{r['max_ms']:.2f} | {r['speedup']:.2f}x |"
        )
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(environment=environment(), args=vars(args),
                                       results=rows), indent=2) + "\n")
        command = " ".join(sys.argv[1:] if argv is None else argv)
        out.with_suffix(".md").write_text(
            f"    python benchmarks/bench_conv.py {command}\n\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main()
