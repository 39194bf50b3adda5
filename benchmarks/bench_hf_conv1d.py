"""CPU micro-benchmark: one layer of GPT-2 small (transformers' ``Conv1D``, weight stored as
W^T), dense vs SBP vs MSBP backward.

Variants, all from the same weights, interleaved round by round in this one process: the dense
``Conv1D`` (transformers' own class where it is installed, else its forward ``addmm(b, x, W)``:
the baseline), and ``SparseHFConv1D`` with SBP (memory 0) and MSBP (memory 0.8) at
k / out = 0.04, unified and per-example. The input requires grad; gradients set to None before
each forward (`zero_grad(set_to_none=True)`). Median backward time with the spread (min-max over
the rounds); the forward is not timed.

    python benchmarks/bench_hf_conv1d.py --threads 1 \
        --out benchmarks/results/xeon/bench_hf_conv1d.json
"""

from __future__ import annotations

import argparse

import torch
from bench_conv import layer_args, layer_names, time_layers, write_table
from torch import nn

import msbp
from msbp.environment import cpu_name
from msbp.nn.hf_conv1d import SparseHFConv1D

# name -> (nx, nf): the Conv1D layers of a GPT-2 small block
LAYERS = {"c_attn": (768, 2304), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}


class _AddmmConv1D(nn.Module):
    """transformers' Conv1D forward, for machines without transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


def _dense_conv1d(nf: int, nx: int) -> nn.Module:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return _AddmmConv1D(nf, nx)
    return Conv1D(nf, nx)


def bench_layer(name: str, tokens: int, rounds: int, ratio: float) -> list[dict]:
    nx, nf = LAYERS[name]
    torch.manual_seed(0)
    dense = _dense_conv1d(nf, nx)
    variants: dict[str, nn.Module] = {"Conv1D (dense)": dense}
    for selection in ("unified", "per_example"):
        for method, memory in (("sbp", 0.0), ("msbp", 0.8)):
            cfg = msbp.SparseBackpropConfig(ratio=ratio, memory=memory, selection=selection)
            layer = SparseHFConv1D(nf, nx, config=cfg)
            layer.weight, layer.bias = dense.weight, dense.bias  # the same Parameters
            variants[f"{method} {selection}"] = layer
    x = torch.randn(tokens, nx).requires_grad_()
    g = torch.randn(tokens, nf)
    return time_layers(variants, x, g, rounds, "Conv1D (dense)", nf, layer=name,
                       shape=f"{tokens}x{nx} -> {nf}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=512, help="rows of the input (batch x seq)")
    parser.add_argument("--ratio", type=float, default=0.04)
    parser.add_argument("--layers", default=",".join(LAYERS),
                        help=f"comma-separated, of {sorted(LAYERS)}")
    args = layer_args(parser, argv)
    rows = []
    for layer in layer_names(parser, args.layers, LAYERS):
        rows += bench_layer(layer, args.tokens, args.rounds, args.ratio)
    caption = (
        f"one Conv1D layer of GPT-2 small, backward only (dx, dW, db), {args.tokens} tokens, "
        f"k / out = {args.ratio:g}, {args.threads} thread(s), {args.rounds} interleaved rounds, "
        f"torch {torch.__version__}, {cpu_name()} (a shared machine); median and min-max; "
        "speedup = the dense Conv1D's median / the variant's"
    )
    write_table(rows, caption, "Conv1D", args, argv, "bench_hf_conv1d.py")

if __name__ == "__main__":
    main()
