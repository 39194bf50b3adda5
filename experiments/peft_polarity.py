"""LoRA (peft) fine-tuning of all-MiniLM-L6-v2 on sentence polarity: dense LoRA against LoRA over
sparse frozen base layers, trained in lockstep and timed side by side.

The polarity task's model (``msbp.tasks.polarity``: encoder, mean pooling, a dense linear head
trained in full); LoRA r = 8, alpha 16, on all 6 linear layers of each of the 6 blocks
(query, key, value and the three ``dense``), AdamW lr 5e-4 on the adapters and the head. Sparse
variants call ``msbp.sparsify`` on the encoder before ``get_peft_model`` (unified top-k, no
memory), so the frozen ``base_layer``s are sparse and the adapters dense. Every variant takes the
same batches in an order that rotates from step to step; ratios are medians of the per-step
ratios of the dense variant's time to the variant's (25th-75th percentile beside). Needs peft.

    flock /work/wt/cpu.lock timeout 900 python experiments/peft_polarity.py --threads 1 \\
        --seed 1 --out experiments/results/peft_polarity_s1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
from tqdm import tqdm

import msbp
from msbp.cli import parse_args
from msbp.tasks.polarity import PolarityTask

#: name -> sparsify include pattern (None: dense LoRA)
VARIANTS = {
    "dense LoRA": None,
    "blocks 0-4 sparse, SBP 0.1": "encoder.layer.[0-4].*",
    "all blocks sparse, SBP 0.1": "encoder.layer.*",
}


def build(task: PolarityTask, include: str | None, seed: int, lr: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = task.build_model()
        if include is not None:
            config = msbp.SparseBackpropConfig(ratio=0.1, memory=0.0, selection="unified")
            msbp.sparsify(model.encoder, config, include=include)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["query", "key", "value", "dense"])
        model.encoder = get_peft_model(model.encoder, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=lr, fused=True)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=None, help="default: one epoch (267)")
    p.add_argument("--out", required=True)
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    task = PolarityTask(parse_args(["train", "--task", "polarity", "--quiet",
                                    "--threads", str(opts.threads)]))
    runs = {name: build(task, include, opts.seed, opts.lr) for name, include in VARIANTS.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    batches = list(task.train_batches(0, torch.Generator().manual_seed(opts.seed)))
    batches = batches[: opts.steps] if opts.steps else batches
    names = list(runs)
    for step, batch in enumerate(tqdm(batches, desc="steps", file=sys.stderr)):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            model, opt = runs[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            times[name].append((t2 - t1, time.perf_counter() - t0))
            losses[name].append(loss.item())
    dense = times["dense LoRA"]
    rows = []
    for name, (model, _) in runs.items():
        bwd = [d[0] / t[0] for d, t in zip(dense, times[name], strict=True)]
        stp = [d[1] / t[1] for d, t in zip(dense, times[name], strict=True)]
        row = {"variant": name, "include": VARIANTS[name], "steps": len(batches),
               "seed": opts.seed, "lr": opts.lr,
               "train_loss_last50": statistics.fmean(losses[name][-50:]),
               "backward_median_s": statistics.median(t[0] for t in times[name]),
               "step_median_s": statistics.median(t[1] for t in times[name]),
               "backward_ratio": statistics.median(bwd),
               "backward_ratio_iqr": [pct(bwd, 0.25), pct(bwd, 0.75)],
               "step_ratio": statistics.median(stp),
               "step_ratio_iqr": [pct(stp, 0.25), pct(stp, 0.75)]}
        for split in ("dev", "test"):
            row[f"{split}_accuracy"] = task.evaluate(model, split)["accuracy"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(opts.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "threads": opts.threads, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
