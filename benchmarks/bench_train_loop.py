"""The MNIST training loop of ``msbp train`` (batch, zero_grad, forward, loss read, backward,
step), dense against MSBP (unified and per-example top-k, the task's default ``LazyRowAdam``),
the three models taking turns step by step; prints one JSON line of medians: each MSBP's whole
step and backward as speed-ups over dense, and its forward's excess over dense in us.

Unlike ``bench_step.py`` (synthetic batches, phase by phase) this runs the task's own loop on
real MNIST (``--limit-train`` images, two epochs). The variant that follows dense in the turn
order runs a few percent slower than it would elsewhere (dense's step leaves the caches cold),
so compare builds, not variants: run two checkouts alternately as separate processes, e.g.

    for i in 1 2 3 4; do for tree in old new; do
        PYTHONPATH=$tree/src python benchmarks/bench_train_loop.py; done; done
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _task_runs import task_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--limit-train", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args_in = parser.parse_args(argv)
    task, _, runs = task_runs("mnist", [
        "--limit-train", str(args_in.limit_train), "--threads", str(args_in.threads),
        "--batch-size", str(args_in.batch_size)])
    times = {m: {"forward": [], "backward": [], "step": []} for m in runs}
    for epoch in range(args_in.epochs):
        batches = {m: iter(task.train_batches(epoch, torch.Generator().manual_seed(epoch)))
                   for m in runs}
        for i in range(task.num_train_batches()):
            for m, (model, opt) in runs.items():
                t0 = time.perf_counter()
                batch = next(batches[m])
                opt.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                loss = task.loss(model, batch)
                t2 = time.perf_counter()
                loss.item()  # as the loop's divergence check
                loss.backward()
                t3 = time.perf_counter()
                opt.step()
                t4 = time.perf_counter()
                if i >= 20:  # the first steps warm up
                    times[m]["forward"].append(t2 - t1)
                    times[m]["backward"].append(t3 - t2)
                    times[m]["step"].append(t4 - t0)
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in times.items()}
    dense = med["dense"]
    out = {"batch_size": args_in.batch_size, "dense_step_us": round(dense["step"] * 1e6)}
    for m in ("unified", "per_example"):
        out[m] = {
            "step_x": round(dense["step"] / med[m]["step"], 3),
            "backward_x": round(dense["backward"] / med[m]["backward"], 3),
            "forward_extra_us": round((med[m]["forward"] - dense["forward"]) * 1e6),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
