"""Sparse fine-tuning settings for all-MiniLM-L6-v2 on sentence polarity, timed side by side.

Every variant is a set of ``msbp train --task polarity`` options (through the CLI's parser, the
task's ``sparse_config_fn`` and ``msbp.train.make_optimizer``, as ``msbp compare`` builds them).
The variants train in lockstep in one process: at every step each variant takes the same batch,
in an order that rotates from step to step, and the wall time of its ``loss.backward()`` and of
its whole step (zero_grad + forward + backward + Adam) is recorded. Ratios are medians over the
steps of the dense variant's time to the variant's time, so that every ratio is measured in the
same process, on the same batches, interleaved (the machine is shared: the spread is reported as
the 25th-75th percentile of the per-step ratios).

A dense variant that is only timed (``"time_only": true``) runs forward + backward (no optimizer
step) every ``--time-every`` steps: the dense time without paying for a whole dense training run
in every job (its accuracy comes from the job that trains it, with the same seed and batches).

    flock /work/wt/cpu.lock timeout 900 python experiments/polarity_sweep.py \\
        --variants dense sbp-u04 --steps 300 --seed 1 --out experiments/polarity/NAME.json

A variant may also set ``"warmup": N``: its first N steps run dense backprop
(``msbp.dense_backward``), then sparse; and ``"steps_factor": f``: it trains ``f * --steps``
steps (the others stop at ``--steps``; ``backward_run_ratio`` compares whole runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from msbp import dense_backward, sparsify
from msbp.cli import parse_args
from msbp.tasks.polarity import PolarityTask
from msbp.train import make_optimizer, sparse_config, write_json

#: name -> (method, extra CLI options, sweep options)
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"method": "dense", "argv": []},
    "dense-timer": {"method": "dense", "argv": [], "time_only": True},
    # the setting: unified top-k 4% of every layer
    "sbp-u04": {"method": "sbp", "argv": ["--ratio", "0.04"]},
    "msbp-u04": {"method": "msbp", "argv": ["--ratio", "0.04"]},
    "sbp-u10": {"method": "sbp", "argv": ["--ratio", "0.1"]},
    "sbp-u20": {"method": "sbp", "argv": ["--ratio", "0.2"]},
    "sbp-u30": {"method": "sbp", "argv": ["--ratio", "0.3"]},
    "msbp-u10": {"method": "msbp", "argv": ["--ratio", "0.1"]},
    "msbp-u20": {"method": "msbp", "argv": ["--ratio", "0.2"]},
    "msbp-u10-a05": {"method": "msbp", "argv": ["--ratio", "0.1", "--memory", "0.5"]},
    "msbp-u10-a02": {"method": "msbp", "argv": ["--ratio", "0.1", "--memory", "0.2"]},
    "msbp-u20-a05": {"method": "msbp", "argv": ["--ratio", "0.2", "--memory", "0.5"]},
    "msbp-u20-a02": {"method": "msbp", "argv": ["--ratio", "0.2", "--memory", "0.2"]},
    # the memory before it was padding-safe: M / rows added back to every row, padding included
    "msbp-u10-rowsall": {"method": "msbp", "argv": ["--ratio", "0.1", "--memory-rows", "all"]},
    "msbp-u10-a02-rowsall": {"method": "msbp",
                             "argv": ["--ratio", "0.1", "--memory", "0.2", "--memory-rows", "all"]},
    # attention projections dense, feed-forward sparse (2/3 of the linear FLOPs)
    "sbp-ffn10": {"method": "sbp", "argv": ["--ratio", "0.1", "--sparse-parts", "ffn"]},
    "sbp-ffn04": {"method": "sbp", "argv": ["--ratio", "0.04", "--sparse-parts", "ffn"]},
    "msbp-ffn10-a02": {"method": "msbp", "argv": ["--ratio", "0.1", "--sparse-parts", "ffn",
                                                  "--memory", "0.2"]},
    "msbp-ffn10": {"method": "msbp", "argv": ["--ratio", "0.1", "--sparse-parts", "ffn"]},
    # per kind: attention k larger than feed-forward k
    "sbp-a20-f10": {"method": "sbp",
                    "argv": ["--attention-ratio", "0.2", "--ffn-ratio", "0.1"]},
    "sbp-a10-f20": {"method": "sbp",
                    "argv": ["--attention-ratio", "0.1", "--ffn-ratio", "0.2"]},
    "sbp-a30-f05": {"method": "sbp",
                    "argv": ["--attention-ratio", "0.3", "--ffn-ratio", "0.05"]},
    # the last block dense
    "sbp-u10-last-dense": {"method": "sbp", "argv": ["--ratio", "0.1", "--dense-layers", "5"]},
    "sbp-u20-last-dense": {"method": "sbp", "argv": ["--ratio", "0.2", "--dense-layers", "5"]},
    "msbp-u10-a02-last-dense": {"method": "msbp", "argv": ["--ratio", "0.1", "--memory", "0.2",
                                                           "--dense-layers", "5"]},
    # per-example selection
    "sbp-p04": {"method": "sbp", "argv": ["--ratio", "0.04", "--selection", "per_example"]},
    # a dense warm-up
    "sbp-u10-warm30": {"method": "sbp", "argv": ["--ratio", "0.1"], "warmup": 30},
    "sbp-u10-warm50": {"method": "sbp", "argv": ["--ratio", "0.1"], "warmup": 50},
    # sparse steps update fewer rows: a larger step size to make up for it
    "sbp-u10-lr2e4": {"method": "sbp", "argv": ["--ratio", "0.1", "--lr", "2e-4"]},
    # the same wall time as dense: 1.5x the steps (the sparse step is 1.7x faster)
    "sbp-u10-x15": {"method": "sbp", "argv": ["--ratio", "0.1"], "steps_factor": 1.5},
    "sbp-u20-x15": {"method": "sbp", "argv": ["--ratio", "0.2"], "steps_factor": 1.5},
    "sbp-u04-warm30": {"method": "sbp", "argv": ["--ratio", "0.04"], "warmup": 30},
}


def build(task: PolarityTask, name: str, base_argv: list[str], seed: int) -> dict[str, Any]:
    spec = VARIANTS[name]
    args = parse_args(["train", "--task", "polarity", *base_argv, *spec["argv"],
                       "--method", spec["method"], "--seed", str(seed)])
    task.args = args  # the task reads its per-kind ratios from args in sparse_config_fn
    config = sparse_config(spec["method"], args)
    torch.manual_seed(seed)
    model = task.build_model()
    if config is not None:
        model = sparsify(model, config_fn=task.sparse_config_fn(config),
                         exclude=task.sparse_exclude())
    model.train()
    return {"name": name, "spec": spec, "args": args, "model": model,
            "optimizer": make_optimizer(model, spec["method"], args),
            "backward": [], "step": [], "losses": [], "steps": []}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", required=True, choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-every", type=int, default=4)
    p.add_argument("--limit-eval", type=int, default=None)
    p.add_argument("--out", required=True)
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    base_argv = ["--threads", str(opts.threads), "--quiet"]
    if opts.limit_eval:
        base_argv += ["--limit-eval", str(opts.limit_eval)]
    task = PolarityTask(parse_args(["train", "--task", "polarity", *base_argv]))
    runs = [build(task, name, base_argv, opts.seed) for name in opts.variants]
    data_order = torch.Generator().manual_seed(opts.seed)  # train_run's data order
    batches = task.train_batches(0, data_order)
    epoch = 0
    t0 = time.perf_counter()
    last = max(round(opts.steps * r["spec"].get("steps_factor", 1.0)) for r in runs)
    for step in range(last):
        try:
            batch = next(batches)
        except StopIteration:
            epoch += 1
            batches = task.train_batches(epoch, data_order)
            batch = next(batches)
        shift = step % len(runs)
        for run in runs[shift:] + runs[:shift]:
            time_only = run["spec"].get("time_only", False)
            if step >= round(opts.steps * run["spec"].get("steps_factor", 1.0)):
                continue
            if time_only and step % opts.time_every:
                continue
            model, optimizer = run["model"], run["optimizer"]
            dense = step < run["spec"].get("warmup", 0)
            t_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if dense:
                with dense_backward(model):
                    loss = task.loss(model, batch)
            else:
                loss = task.loss(model, batch)
            t_bwd = time.perf_counter()
            loss.backward()
            t_end = time.perf_counter()
            if not time_only:
                optimizer.step()
            run["backward"].append(t_end - t_bwd)
            run["step"].append(time.perf_counter() - t_start)
            run["steps"].append(step)
            run["losses"].append(loss.item())
        if step % 25 == 0:
            print(f"step {step} {time.perf_counter() - t0:.0f}s "
                  + " ".join(f"{r['name']}={r['losses'][-1]:.3f}" for r in runs if r["losses"]),
                  file=sys.stderr, flush=True)
    timer = next(r for r in runs if r["spec"]["method"] == "dense")
    dense_at = dict(zip(timer["steps"], zip(timer["backward"], timer["step"], strict=True),
                        strict=True))
    results = []
    for run in runs:
        row: dict[str, Any] = {"variant": run["name"], "method": run["spec"]["method"],
                               "options": run["spec"]["argv"], "steps": len(run["steps"]),
                               "warmup": run["spec"].get("warmup", 0),
                               "sparse_config": (c.to_dict() if (c := sparse_config(
                                   run["spec"]["method"], run["args"])) else None)}
        if not run["spec"].get("time_only", False):
            for split in ("dev", "test"):
                row[f"{split}_accuracy"] = task.evaluate(run["model"], split)["accuracy"]
            row["train_loss_last50"] = statistics.fmean(run["losses"][-50:])
        # ratios on the steps where the dense timer also ran (after any warm-up)
        every = [(s, dense_at[s], b, t) for s, b, t in zip(run["steps"], run["backward"],
                                                           run["step"], strict=True)
                 if s in dense_at]
        pairs = [(d, b, t) for s, d, b, t in every if s >= run["spec"].get("warmup", 0)]
        bwd = [d[0] / b for d, b, _ in pairs]
        stp = [d[1] / t for d, _, t in pairs]
        row.update({
            "backward_median_s": statistics.median(run["backward"]),
            "step_median_s": statistics.median(run["step"]),
            "backward_ratio": statistics.median(bwd),
            "backward_ratio_iqr": [pct(bwd, 0.25), pct(bwd, 0.75)],
            "step_ratio": statistics.median(stp),
            "step_ratio_iqr": [pct(stp, 0.25), pct(stp, 0.75)],
            "backward_total_ratio": (sum(d[0] for d, _, _ in pairs)
                                     / max(sum(b for _, b, _ in pairs), 1e-12)),
            "timed_pairs": len(pairs),
            # the variant's whole backward time against the dense run's (opts.steps steps, its
            # median step time where the dense variant was only a timer)
            "backward_run_ratio": (statistics.median(timer["backward"]) * opts.steps
                                   / max(sum(run["backward"]), 1e-12)),
            "step_run_ratio": (statistics.median(timer["step"]) * opts.steps
                               / max(sum(run["step"]), 1e-12)),
            # the whole run, warm-up steps included: what a user's run saves
            "backward_total_ratio_all_steps": (sum(d[0] for _, d, _, _ in every)
                                               / max(sum(b for _, _, b, _ in every), 1e-12)),
            "step_total_ratio_all_steps": (sum(d[1] for _, d, _, _ in every)
                                           / max(sum(t for _, _, _, t in every), 1e-12)),
        })
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sparse_config"}),
              file=sys.stderr, flush=True)
    write_json(opts.out, {"seed": opts.seed, "steps": opts.steps, "threads": opts.threads,
                          "batch_size": 32, "lr": 1e-4, "limit_eval": opts.limit_eval,
                          "command": " ".join(sys.argv), "results": results})


if __name__ == "__main__":
    main()
