"""Table of the POS memory-variant runs: ``python experiments/memory_variants/render.py``."""

from __future__ import annotations

import glob
import json
import os
import statistics
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    rows: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(HERE, "pos-*.seed*.json"))):
        variant = os.path.basename(path).split(".seed")[0].removeprefix("pos-")
        run = json.load(open(path))["runs"][0]
        rows[variant].append(run)
    print("| variant | seeds | test accuracy (%) | dev accuracy (%) | best epoch | backprop (s) |")
    print("|---|---|---|---|---|---|")
    order = ["dense", "sbp", "msbp-all", "msbp", "msbp-a05", "msbp-a02", "msbp-slot"]
    for variant in sorted(rows, key=lambda v: order.index(v) if v in order else len(order)):
        runs = rows[variant]
        test = [r["test_accuracy"] for r in runs]
        dev = [r["dev_accuracy"] for r in runs]
        spread = f" ± {statistics.stdev(test):.2f}" if len(test) > 1 else ""
        print(f"| {variant} | {len(runs)} | {statistics.mean(test):.2f}{spread} "
              f"({', '.join(f'{t:.2f}' for t in test)}) | {statistics.mean(dev):.2f} | "
              f"{'/'.join(str(r['best_epoch']) for r in runs)} | "
              f"{statistics.median(r['backprop_seconds'] for r in runs):.1f} |")


if __name__ == "__main__":
    main()
