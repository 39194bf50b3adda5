"""One optimizer step: LazyRowAdam (native C++ / PyTorch path) vs dense fused Adam.

Two cases: the paper's MNIST MLP 784-500-500-10 with k = 20 rows touched in each of the two
sparse hidden weights (biases and the output layer dense), and one 4096 x 4096 weight with 164
rows touched (k/out = 0.04). Only ``optimizer.step()`` is timed: before each step the gradients
are in place and the sparse weights' touched rows are recorded as a sparse backward records them
(fresh random rows every step): marked in the row mask, as the C++ backward of ``SparseLinear``
does, for the native variant; logged as a list of rows, as the PyTorch backward does, for the
PyTorch path. Variants run interleaved, round by round, in one process; the
table gives the median per step over all steps, the 10-90% spread, and the ratio to dense Adam.

    python benchmarks/bench_optim.py --threads 1
    python benchmarks/bench_optim.py --threads 1 --json bench_optim.json --markdown bench_optim.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import msbp
from msbp import native
from msbp.environment import cpu_name, environment
from msbp.ops.touched_rows import log_touched_rows, rows_mask
from msbp.optim import LazyRowAdam

VARIANTS = ("lazy native", "lazy python", "adam fused (dense)")


def _mnist_model() -> tuple[nn.Module, list[nn.Parameter], int]:
    model = nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )
    msbp.sparsify(model, msbp.SparseBackpropConfig(k=20, memory=0.8), exclude="4")
    return model, [model[0].weight, model[2].weight], 20


def _big_weight() -> tuple[nn.Module, list[nn.Parameter], int]:
    model = nn.Module()
    model.weight = nn.Parameter(torch.randn(4096, 4096) * 0.01)
    return model, [model.weight], 164


CASES: dict[str, Callable[[], tuple[nn.Module, list[nn.Parameter], int]]] = {
    "mnist 784-500-500-10, k=20": _mnist_model,
    "4096x4096 weight, k=164": _big_weight,
}


def _setup(case: Callable, variant: str, seed: int):
    """A model with full gradients and its optimizer, one step taken (state allocated)."""
    torch.manual_seed(seed)
    model, sparse, k = case()
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    if variant == "adam fused (dense)":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    else:
        opt = LazyRowAdam(model.parameters(), lr=1e-3)
    return model, sparse, k, opt


def _use(variant: str) -> None:
    native.set_backend("python" if variant == "lazy python" else "native")


def _round(opt, sparse: list[nn.Parameter], rows: list[list[torch.Tensor]], variant: str):
    times = []
    for step_rows in rows:
        for w, r in zip(sparse, step_rows, strict=True):  # what the sparse layers' backward does
            if variant == "lazy native":
                rows_mask(w).index_fill_(0, r, 1)
            elif variant == "lazy python":
                log_touched_rows(w, r)
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def bench_case(name: str, case: Callable, steps: int, rounds: int) -> list[dict]:
    setups = {v: _setup(case, v, seed=0) for v in VARIANTS}
    _, sparse0, k, _ = setups[VARIANTS[0]]
    gen = torch.Generator().manual_seed(1)
    rows = [
        [torch.randperm(w.shape[0], generator=gen)[:k].sort().values for w in sparse0]
        for _ in range(steps)
    ]
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    round_medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant, (_, sparse, _, opt) in setups.items():  # warm-up: build, first allocations
        _use(variant)
        _round(opt, sparse, rows[:5], variant)
    for _ in range(rounds):
        for variant, (_, sparse, _, opt) in setups.items():
            _use(variant)
            ts = _round(opt, sparse, rows, variant)
            samples[variant] += ts
            round_medians[variant].append(statistics.median(ts))
    native.set_backend("auto")
    dense = statistics.median(samples["adam fused (dense)"])
    results = []
    for variant, ts in samples.items():
        q = statistics.quantiles(ts, n=10)
        med = statistics.median(ts)
        results.append(dict(
            case=name, variant=variant, k=k, steps=len(ts), median_us=med * 1e6,
            p10_us=q[0] * 1e6, p90_us=q[-1] * 1e6,
            round_median_min_us=min(round_medians[variant]) * 1e6,
            round_median_max_us=max(round_medians[variant]) * 1e6,
            vs_dense=dense / med,
        ))
    return results


def markdown(results: list[dict], threads: int) -> str:
    lines = [
        f"optimizer.step() only, {threads} thread(s), torch {torch.__version__}, {cpu_name()}",
        "",
        "| case | variant | median (us) | p10-p90 (us) | round medians (us) | vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['median_us']:.1f} | "
            f"{r['p10_us']:.1f}-{r['p90_us']:.1f} | "
            f"{r['round_median_min_us']:.1f}-{r['round_median_max_us']:.1f} | "
            f"{r['vs_dense']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table as markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `msbp train` does: see msbp.environment.denormals
    if not native.use_native():
        raise SystemExit(f"the native kernels are unavailable: {native.status()['error']}")
    results = []
    for name, case in CASES.items():
        results += bench_case(name, case, args.steps, args.rounds)
    table = markdown(results, args.threads)
    print(table, end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, environment=environment(), results=results),
                      f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
