"""What one sparse layer's forward costs inside a training step, against ``F.linear``.

In a tight forward-only loop ``SparseLinear`` costs about 12 us more than ``nn.Linear`` at
MNIST's 10 x 784 x 500; inside a training step (after a backward that streams megabytes through
the caches) each Python operation costs several times more. Here the first layer of the paper's
MNIST MLP (sparsified, unified top-k, k = 20, memory 0.8) runs its forward in one of several
ways, the rest of the step (the other layers, the loss, the backward) as usual, the variants
taking turns step by step; medians in us of that one call over all steps.

    python benchmarks/bench_forward_in_loop.py --threads 1 --steps 3000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import msbp
from msbp import native
from msbp.functional import _call_settings, _fast_args, kept_grad_buffer
from msbp.ops.touched_rows import rows_mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(),
                          nn.Linear(500, 10))
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=20, memory=0.8, selection="unified"),
                  exclude="4")
    layer = model[0]
    if not native.use_native():
        raise SystemExit("the native kernels are unavailable")
    ops = native.eager_ops()
    gen = torch.Generator().manual_seed(0)
    xs = torch.rand(300, args.batch_size, 784, generator=gen)
    ys = torch.randint(0, 10, (300, args.batch_size), generator=gen)

    def args_of():
        settings = _call_settings(layer.config, layer.out_features, "")
        return _fast_args(layer.weight, layer.bias, layer.memory, settings)

    variants = {
        "SparseLinear module": lambda x: layer(x),
        "msbp.functional.sparse_linear": lambda x: msbp.functional.sparse_linear(
            x, layer.weight, layer.bias, layer.memory, config=layer.config),
        "C++ forward, its arguments": lambda x: ops.sparse_linear_fast(x, *args_of()),
        "F.linear + kept_grad_buffer": lambda x: (kept_grad_buffer(layer.weight),
                                                  F.linear(x, layer.weight, layer.bias))[1],
        "F.linear + rows_mask": lambda x: (rows_mask(layer.weight),
                                           F.linear(x, layer.weight, layer.bias))[1],
        "F.linear": lambda x: F.linear(x, layer.weight, layer.bias),
    }
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.steps + 10 * len(names)):
        name = names[i % len(names)]
        for p in model.parameters():
            p.grad = None
        x = xs[i % 300]
        start = time.perf_counter()
        h = variants[name](x)
        elapsed = time.perf_counter() - start
        F.cross_entropy(model[4](model[3](model[2](model[1](h)))), ys[i % 300]).backward()
        if i >= 10 * len(names):  # the first turns warm up
            samples[name].append(elapsed)
    base = statistics.median(samples["F.linear"])
    print(f"{args.batch_size} x 784 x 500, {args.threads} thread(s), median us of the first "
          f"layer's forward over {args.steps // len(names)} steps each")
    print("| forward | us | more than F.linear |")
    print("|---|---|---|")
    for name, times in samples.items():
        med = statistics.median(times)
        print(f"| {name} | {med * 1e6:.1f} | {(med - base) * 1e6:+.1f} |")


if __name__ == "__main__":
    main()
