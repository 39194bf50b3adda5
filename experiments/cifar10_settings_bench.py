"""Whole-network backward of the CIFAR-10 net (``CifarNet``, width 32, batch 64, channels-last,
one thread) for the settings of ``experiments/cifar10.md``: dense against SBP or MSBP (unified,
memory 0.8 unit) at a ratio with ``--layer-ratios`` overrides, interleaved rounds, medians and
min-max. The training runs' own backprop seconds compare a dense and a sparse run that ran one
after the other on a shared machine; this measures the settings side by side.

    PYTHONPATH=src python experiments/cifar10_settings_bench.py --rounds 15 \\
        0.1 0.25 0.5 0.1:block3=dense 0.1:block1=0.5 [--out FILE.json]

A setting is ``RATIO`` or ``RATIO:LAYER=VALUE,...`` (``--layer-ratios`` syntax); ``sbp@`` in
front for memory 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import msbp
from msbp.tasks.cifar10 import CifarNet, parse_layer_ratios


def build(base: torch.nn.Module, setting: str) -> torch.nn.Module:
    memory = 0.8
    if setting.startswith("sbp@"):
        memory, setting = 0.0, setting[4:]
    ratio_text, _, layers = setting.partition(":")
    ratios = parse_layer_ratios(layers)
    config = msbp.SparseBackpropConfig(ratio=float(ratio_text), memory=memory,
                                       selection="unified")

    def config_fn(name: str, module: torch.nn.Module) -> msbp.SparseBackpropConfig | None:
        layer = name.split(".")[0]
        if layer not in ratios:
            return config
        r = ratios[layer]
        return None if r is None else config.replace(ratio=r)

    return msbp.sparsify(copy.deepcopy(base), config_fn=config_fn, exclude=["stem.0", "head"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = CifarNet(32).to(memory_format=torch.channels_last)
    models = {"dense": copy.deepcopy(base)}
    for s in args.settings:
        models[s] = build(base, s)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))

    def step(model: torch.nn.Module) -> float:
        loss = F.cross_entropy(model(x), y)
        start = time.perf_counter()
        loss.backward()
        seconds = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        return seconds

    for model in models.values():  # warm-up: native build, oneDNN primitives
        for _ in range(3):
            step(model)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, model in models.items():
            times[k].append(step(model))
    dense = statistics.median(times["dense"])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"setting": k, "backward_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                     "max_ms": max(ts) * 1e3, "speedup": dense / med})
        print(f"{k:32s} {med * 1e3:7.1f} ms ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})  "
              f"{dense / med:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": 64, "threads": 1, "channels_last": True, "rounds": args.rounds,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
