"""The POS tagger's training step (``msbp compare --task pos``'s loop: zero_grad, forward,
backward, optimizer step) on real CoNLL-2000 sentences: dense (``nn.LSTM``) against MSBP with
unified and per-example top-k, the models taking turns batch by batch, the order rotated at
every batch; prints the median ms per batch of each phase and MSBP's speed-ups over dense, one
JSON line with ``--json``.

    python benchmarks/bench_tagger_step.py --threads 1
    for i in 1 2 3; do for tree in old new; do   # two builds, alternated as processes
        PYTHONPATH=$tree/src python benchmarks/bench_tagger_step.py --json; done; done
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _task_runs import task_runs

PHASES = ("forward", "backward", "step", "total")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-train", type=int, default=2500)
    parser.add_argument("--batches", type=int, default=60, help="timed batches (after 5 warm)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args_in = parser.parse_args(argv)
    task, _, runs = task_runs("pos", [
        "--pos-data", "conll2000", "--limit-train", str(args_in.limit_train), "--threads",
        str(args_in.threads), "--k", str(args_in.k)])
    names = list(runs)
    batches = task.train_batches(0, torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m in names}
    for i in range(args_in.batches + 5):
        batch = next(batches)
        for m in names[i % len(names):] + names[:i % len(names)]:
            model, opt = runs[m]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            t1 = time.perf_counter()
            loss.item()  # as the loop's divergence check
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if i >= 5:
                for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0),
                                          strict=True):
                    times[m][phase].append(seconds * 1e3)
    med = {m: {p: statistics.median(v) for p, v in d.items()} for m, d in times.items()}
    dense = med["dense"]
    out = {"threads": args_in.threads, "batches": args_in.batches, "ms": med}
    for m in names[1:]:
        out[m + "_x"] = {p: round(dense[p] / med[m][p], 3) for p in ("backward", "total")}
    if args_in.json:
        print(json.dumps(out))
        return
    print(f"POS tagger, batch 32, k = {args_in.k}, {args_in.threads} threads, median ms per "
          f"batch over {args_in.batches} batches, models in turn")
    print("| variant | " + " | ".join(PHASES) + " | backward x | total x |")
    print("|---|" + "---|" * (len(PHASES) + 2))
    for m in names:
        x = out.get(m + "_x", {"backward": 1.0, "total": 1.0})
        print(f"| {m} | " + " | ".join(f"{med[m][p]:.2f}" for p in PHASES)
              + f" | {x['backward']:.2f} | {x['total']:.2f} |")


if __name__ == "__main__":
    main()
