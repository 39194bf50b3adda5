"""CPU micro-benchmark: one self-attention layer of a transformer encoder, dense vs SBP vs MSBP
backward.

Variants, all from the same weights, interleaved round by round in this one process:
``nn.MultiheadAttention`` (``need_weights=False``, PyTorch's fused attention: the baseline the
ratios are taken against) and ``SparseMultiheadAttention`` with SBP (memory 0) and MSBP
(memory 0.8, unit layout), unified top-k at k / E for each of the q, k, v and output
projections. Self-attention (query = key = value = x, batch first); the input requires grad;
gradients set to None before each forward (``zero_grad(set_to_none=True)``). Median backward time
with the spread (min-max over the rounds); the forward is not timed.

    python benchmarks/bench_attention.py --threads 1 \
        --out benchmarks/results/xeon/bench_attention.json
"""

from __future__ import annotations

import argparse

import torch
from bench_conv import layer_args, time_layers, write_table
from torch import nn

import msbp
from msbp.environment import cpu_name


class _SelfAttention(nn.Module):
    """``mha(x, x, x, need_weights=False)[0]``: one input, as the timing loop calls layers."""

    def __init__(self, mha: nn.MultiheadAttention, k: int) -> None:
        super().__init__()
        self.mha = mha
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def bench(embed: int, heads: int, batch: int, seq: int, rounds: int, ratio: float) -> list[dict]:
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(embed, heads, batch_first=True)
    variants: dict[str, nn.Module] = {"MultiheadAttention (dense)": _SelfAttention(dense, embed)}
    for method, memory in (("sbp", 0.0), ("msbp", 0.8)):
        cfg = msbp.SparseBackpropConfig(ratio=ratio, memory=memory)
        twin = nn.MultiheadAttention(embed, heads, batch_first=True)
        twin.load_state_dict(dense.state_dict())
        sparse = msbp.SparseMultiheadAttention.from_dense(twin, cfg)
        variants[f"{method} unified"] = _SelfAttention(sparse, cfg.k_for(embed))
    x = torch.randn(batch, seq, embed).requires_grad_()
    g = torch.randn(batch, seq, embed)
    return time_layers(variants, x, g, rounds, "MultiheadAttention (dense)", embed,
                       layer="self-attention", shape=f"{batch}x{seq}x{embed}, {heads} heads")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--embed", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.04)
    args = layer_args(parser, argv)
    if args.embed % args.heads:
        parser.error(f"--embed {args.embed} is not a multiple of --heads {args.heads}")
    rows = bench(args.embed, args.heads, args.batch, args.seq, args.rounds, args.ratio)
    caption = (
        f"one self-attention layer, backward only (dx and every projection's dW, db), "
        f"{args.batch} x {args.seq} tokens, E = {args.embed}, {args.heads} heads, "
        f"k / E = {args.ratio:g}, {args.threads} thread(s), {args.rounds} interleaved rounds, "
        f"torch {torch.__version__}, {cpu_name()} (a shared machine); median and min-max; "
        "speedup = nn.MultiheadAttention's median / the variant's"
    )
    write_table(rows, caption, "MultiheadAttention", args, argv, "bench_attention.py")


if __name__ == "__main__":
    main()
