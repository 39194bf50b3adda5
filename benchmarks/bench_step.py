"""Where a training step of the paper's MNIST MLP spends its time: dense vs MSBP, per phase.

784-500-500-10 ReLU, k = 20 of 500 on both hidden layers, memory 0.8, unified top-k; dense uses
PyTorch's fused Adam, MSBP ``LazyRowAdam``. Times are medians per step (microseconds) over
interleaved rounds in one process, on random data; each round runs the variants in another
order (rotated by one), so that none always follows the same one.

    python benchmarks/bench_step.py --batch-size 10 --threads 2
    python benchmarks/bench_step.py --threads 1 --floor   # + the dense model, hidden layers frozen
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


# name: (selection or None for dense, optimizer, kernel backend)
VARIANTS = {
    "dense": (None, "adam", "python"),
    "unified, Adam": ("unified", "adam", "native"),
    "unified, LazyRowAdam": ("unified", "lazy", "native"),
    "per-example, LazyRowAdam": ("per_example", "lazy", "native"),
    "unified, LazyRowAdam (PyTorch path)": ("unified", "lazy", "python"),
    "per-example, LazyRowAdam (PyTorch path)": ("per_example", "lazy", "python"),
}


# --floor: the dense model with its hidden layers frozen, the part of a step no sparse layer
# changes (engine, loss, activations, output layer): its ratios bound what free layers could reach
FLOOR = {"dense, hidden layers frozen (--floor)": ("frozen", "adam", "python")}


def make(selection: str | None, optimizer: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )
    if selection == "frozen":
        for p in (*model[0].parameters(), *model[2].parameters()):
            p.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.Adam(trainable, lr=1e-3, fused=True)
    if selection is not None:
        config = msbp.SparseBackpropConfig(k=20, memory=0.8, selection=selection)
        msbp.sparsify(model, config, exclude="4")
    if optimizer == "lazy":
        return model, LazyRowAdam(model.parameters(), lr=1e-3)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


def run_round(model, opt, xs, ys) -> list[float]:
    totals = [0.0] * len(PHASES)
    for x, y in zip(xs, ys, strict=True):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
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
    parser.add_argument("--floor", action="store_true",
                        help="also time the dense model with its hidden layers frozen")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    gen = torch.Generator().manual_seed(0)
    xs = torch.rand(args.steps, args.batch_size, 784, generator=gen)
    ys = torch.randint(0, 10, (args.steps, args.batch_size), generator=gen)
    chosen = {**VARIANTS, **(FLOOR if args.floor else {})}
    variants = {name: (*make(sel, opt), backend) for name, (sel, opt, backend) in chosen.items()}
    if not msbp.native.use_native():
        variants = {n: v for n, v in variants.items() if v[2] == "python"}
    samples: dict[str, list[list[float]]] = {m: [] for m in variants}
    names = list(variants)
    for r in range(args.rounds + 1):  # round 0 warms up
        # each round starts one variant later: the one after dense in the order would otherwise
        # always start on the caches dense left cold (up to 6% in bench_train_loop.py)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            model, opt, backend = variants[name]
            msbp.native.set_backend(backend)
            times = run_round(model, opt, xs, ys)
            if r:
                samples[name].append(times)
    msbp.native.set_backend("auto")
    dense = samples["dense"]
    print(f"batch {args.batch_size}, {args.threads} threads, median us per step over "
          f"{args.rounds} interleaved rounds of {args.steps} steps; speed-up vs dense "
          "(min-max over rounds) for backward and whole step")
    print("| variant | " + " | ".join(PHASES) + " | total | backward x | step x |")
    print("|---|" + "---|" * (len(PHASES) + 3))
    for name, rounds in samples.items():
        med = [statistics.median(r[i] for r in rounds) for i in range(len(PHASES))]
        bwd = [d[2] / s[2] for d, s in zip(dense, rounds, strict=True)]
        tot = [sum(d) / sum(s) for d, s in zip(dense, rounds, strict=True)]
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in med) + f" | {sum(med):.0f} | "
              f"{statistics.median(bwd):.2f} ({min(bwd):.2f}-{max(bwd):.2f}) | "
              f"{statistics.median(tot):.2f} ({min(tot):.2f}-{max(tot):.2f}) |")


if __name__ == "__main__":
    main()
