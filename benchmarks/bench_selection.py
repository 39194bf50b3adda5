"""The PyTorch fallback's top-k with ties broken by index, against a bare ``torch.topk``.

``msbp.ops.selection.topk_by_index`` takes equal scores lowest index first, as the native
kernels and the reference do; this measures what that costs over ``torch.topk(scores, k,
sorted=False)`` (whose order among ties is unspecified) on per-example and unified scores of the
paper's MNIST layer and of a large layer: random normal gradients (ties are rare), bfloat16
values (many ties) and ReLU-like ones (mostly zeros: top-k fills up with zero scores). Variants run
interleaved, round by round, in one process; medians over rounds, min-max in brackets.

    python benchmarks/bench_selection.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from msbp.environment import cpu_name
from msbp.ops.selection import topk_by_index


def _scores(n: int, out: int, kind: str, dtype: torch.dtype, unified: bool,
            gen: torch.Generator) -> torch.Tensor:
    u = torch.randn(n, out, generator=gen)
    if kind == "bf16":
        u = u.bfloat16().float()
    elif kind == "relu":  # 97% zeros; for unified scores 99.8%: fewer than k non-zero columns
        u[torch.rand(n, out, generator=gen) < (0.998 if unified else 0.97)] = 0
    u = u.abs().to(dtype)
    return u.sum(0) if unified else u  # unified: the column sums


# name: (rows, out, k, kind, dtype, unified)
CASES = {
    "10x500 k20 normal": (10, 500, 20, "normal", torch.float32, False),
    "10x500 k20 relu": (10, 500, 20, "relu", torch.float32, False),
    "10x500 k20 relu float64": (10, 500, 20, "relu", torch.float64, False),
    "unified 10x500 k20 normal": (10, 500, 20, "normal", torch.float32, True),
    "unified 10x500 k20 relu": (10, 500, 20, "relu", torch.float32, True),
    "1024x4096 k164 normal": (1024, 4096, 164, "normal", torch.float32, False),
    "1024x4096 k164 bf16": (1024, 4096, 164, "bf16", torch.float32, False),
    "1024x4096 k164 relu": (1024, 4096, 164, "relu", torch.float32, False),
}


def bench_case(name: str, rounds: int) -> dict:
    n, out, k, kind, dtype, unified = CASES[name]
    s = _scores(n, out, kind, dtype, unified, torch.Generator().manual_seed(0))
    reps = max(1, 3_000_000 // s.numel())
    k1 = torch.topk(s, k + 1, sorted=True).values
    straddle = float((k1[..., k - 1] == k1[..., k]).float().mean())
    variants = {
        "torch.topk": lambda: torch.topk(s, k, sorted=False),
        "topk_by_index": lambda: topk_by_index(s, k),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for f in variants.values():  # warm-up
        f()
    for _ in range(rounds):
        for v, f in variants.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            times[v].append((time.perf_counter() - t0) / reps * 1e6)
    ratios = [b / a for a, b in zip(times["torch.topk"], times["topk_by_index"], strict=True)]
    return dict(
        case=name, rows_straddling=straddle,
        topk_us=statistics.median(times["torch.topk"]),
        by_index_us=statistics.median(times["topk_by_index"]),
        ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    print(f"{cpu_name()}, {args.threads} thread(s), medians of {args.rounds} interleaved rounds")
    print("| scores | rows with a tie at the k-th place | torch.topk | topk_by_index | ratio |")
    print("|---|---|---|---|---|")
    results = []
    for name in names:
        r = bench_case(name, args.rounds)
        results.append(r)
        print(f"| {name} | {r['rows_straddling']:.0%} | {r['topk_us']:.1f} us | "
              f"{r['by_index_us']:.1f} us | {r['ratio']:.2f}x ({r['ratio_min']:.2f}-"
              f"{r['ratio_max']:.2f}) |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(threads=args.threads, rounds=args.rounds, results=results), f, indent=1)


if __name__ == "__main__":
    main()
