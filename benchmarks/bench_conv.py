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


def time_layers(variants: dict[str, nn.Module], x: torch.Tensor, g: torch.Tensor, rounds: int,
                baseline: str, out: int, **fields) -> list[dict]:
    """Backward times of ``variants`` (2 warm-up calls each, then ``rounds`` interleaved), one
    row each: median and min-max in ms, k (``out``, the output units, where a layer has none),
    the speed-up over ``baseline``'s median, and ``fields``."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for layer in variants.values():  # warm-up (allocator, kernels, primitives); memory filled
        for _ in range(2):
            _backward_seconds(layer, x, g)
    for _ in range(rounds):
        for v, layer in variants.items():
            times[v].append(_backward_seconds(layer, x, g))
    base = statistics.median(times[baseline])
    rows = []
    for v, ts in times.items():
        med = statistics.median(ts)
        k = getattr(variants[v], "k", out)
        rows.append(dict(**fields, variant=v, k=k, k_ratio=k / out, backward_ms=med * 1e3,
                         min_ms=min(ts) * 1e3, max_ms=max(ts) * 1e3, speedup=base / med))
    return rows


def layer_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A layer benchmark's command line parsed, with ``--threads`` (default 1) and ``--out``
    added, and the thread count and the denormal flush set."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here (and .md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    return args


def layer_names(parser: argparse.ArgumentParser, spec: str, known: dict) -> list[str]:
    """The comma-separated ``--layers`` of ``spec``, each one of ``known`` (else a usage error)."""
    layers = [s.strip() for s in spec.split(",") if s.strip()]
    for layer in layers:
        if layer not in known:
            parser.error(f"--layers: {layer!r} is not one of {sorted(known)}")
    return layers


def write_table(rows: list[dict], caption: str, baseline: str, args: argparse.Namespace,
                argv: list[str] | None, script: str) -> None:
    """Print the rows as a markdown table under ``caption``; with ``--out``, write them as JSON
    (with the environment) and the table as .md beside it, headed by the command."""
    lines = [
        caption,
        "",
        f"| layer | shape | variant | k | backward (ms) | min-max (ms) | speedup vs {baseline} |",
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
            f"    python benchmarks/{script} {command}\n\n" + "\n".join(lines) + "\n"
        )


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
    return time_layers(variants, x, g, rounds, "nn.Conv2d", c_out, layer=name,
                       shape=f"{batch}x{c_in}x{hw}x{hw} -> {c_out}", channels_last=channels_last)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", default="block2",
                        help=f"comma-separated, of {sorted(LAYERS)} (default block2)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--channels-last", action="store_true",
                        help="input, gradient and weight in channels-last memory format")
    args = layer_args(parser, argv)
    layers = layer_names(parser, args.layers, LAYERS)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    rows = []
    for layer in layers:
        rows += bench_layer(layer, args.batch, args.rounds, ratios, args.channels_last)
    caption = (
        f"one convolution (3x3, padding 1, no bias) of the CIFAR-10 network, backward only "
        f"(dx and dW), batch {args.batch}, {args.threads} thread(s), {args.rounds} interleaved "
        f"rounds, {'channels-last' if args.channels_last else 'contiguous'} tensors, torch "
        f"{torch.__version__}, {cpu_name()} (a shared machine); median and min-max; speedup = "
        "nn.Conv2d's median / the variant's"
    )
    write_table(rows, caption, "nn.Conv2d", args, argv, "bench_conv.py")

if __name__ == "__main__":
    main()
