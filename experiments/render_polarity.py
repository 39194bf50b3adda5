"""Render experiments/polarity/*.json (from polarity_sweep.py) as the markdown table of
experiments/polarity.md: one row per variant, accuracies per seed and their mean, the difference
to the dense run of the same seed, and the time ratios (dense / variant, medians over steps,
measured in the same job; 25th-75th percentile in brackets).

    python experiments/render_polarity.py > /tmp/table.md
    python experiments/render_polarity.py --write     # replaces the tables in polarity.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent / "polarity"
DOC = HERE.parent / "polarity.md"
#: the tables in polarity.md lie between these two headings
START, END = "## Runs (one row per job and variant)\n", "## What the runs say\n"


def whole(row: dict) -> float:
    """Dense backward time of the whole run / the variant's (warm-up and extra steps included).
    Where the job trained dense in full (``row["_dense_trained"]``) that is the ratio of the summed
    times over the same steps; with a dense timer, the timer's median times the steps; the first
    jobs recorded neither and have the per-step median ratio."""
    if row.get("_dense_trained") and "backward_total_ratio_all_steps" in row:
        return row["backward_total_ratio_all_steps"]
    return row.get("backward_run_ratio", row["backward_ratio"])


#: suffix of the variants whose memory predates ``memory_rows`` (its residual was added back to
#: every row, padding included); their JSON has no ``memory_rows`` in ``sparse_config``
OLD_MEMORY = " (before padding-safe memory)"


def label(row: dict) -> str:
    config = row.get("sparse_config") or {}
    if config.get("memory", 0) > 0 and "memory_rows" not in config:
        return row["variant"] + OLD_MEMORY
    return row["variant"]


def spread(values: list[float]) -> str:
    """Sample standard deviation over seeds ("-" for one seed)."""
    return f"{statistics.stdev(values):.2f}" if len(values) > 1 else "-"


def render() -> None:
    files = sorted(HERE.glob("*.json"))
    dense: dict[int, dict[str, float]] = {}
    rows: dict[str, list[tuple[str, int, dict]]] = defaultdict(list)
    for f in files:
        doc = json.loads(f.read_text())
        trained = any(r["variant"] == "dense" for r in doc["results"])
        for r in doc["results"]:
            r["_dense_trained"] = trained
            if r["variant"] == "dense":
                dense[doc["seed"]] = r
            rows[label(r)].append((f.stem, doc["seed"], r))
    print("| variant | options | job | seed | dev % | test % | test - dense | dev+test - dense | "
          "backward x [IQR] | whole-run backward x | step x [IQR] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, entries in rows.items():
        if variant == "dense-timer":
            continue
        for job, seed, r in entries:
            base = dense.get(seed)
            diff = both = ""
            if base is not None and "test_accuracy" in r:
                diff = f"{r['test_accuracy'] - base['test_accuracy']:+.2f}"
                gain = (r["test_accuracy"] + r["dev_accuracy"] - base["test_accuracy"]
                        - base["dev_accuracy"]) / 2
                both = f"{gain:+.2f}"
            bi, si = r["backward_ratio_iqr"], r["step_ratio_iqr"]
            print(f"| {variant} | {' '.join(r['options']) or '-'}"
                  + (f" warm-up {r['warmup']}" if r.get("warmup") else "")
                  + f" | {job} | {seed} | {r.get('dev_accuracy', float('nan')):.2f} | "
                  f"{r.get('test_accuracy', float('nan')):.2f} | {diff} | {both} | "
                  f"{r['backward_ratio']:.2f} [{bi[0]:.2f}-{bi[1]:.2f}] | "
                  f"{whole(r):.2f} | "
                  f"{r['step_ratio']:.2f} [{si[0]:.2f}-{si[1]:.2f}] |")
    print()
    print("## Means over seeds")
    print()
    print("| variant | seeds | mean test % | mean test - dense | mean dev - dense | "
          "mean dev+test - dense | sd over seeds | dev+test - dense per seed | "
          "train loss (last 50 steps) | backward x per step (median of jobs) | "
          "whole-run backward x (median of jobs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, entries in rows.items():
        if variant == "dense-timer":
            continue
        tests = [r["test_accuracy"] for _, _, r in entries if "test_accuracy" in r]
        diffs = [r["test_accuracy"] - dense[s]["test_accuracy"]
                 for _, s, r in entries if s in dense and "test_accuracy" in r]
        ddiffs = [r["dev_accuracy"] - dense[s]["dev_accuracy"]
                  for _, s, r in entries if s in dense and "dev_accuracy" in r]
        seeds = sorted({s for _, s, _ in entries})
        both = [(t + d) / 2 for t, d in zip(diffs, ddiffs, strict=True)]  # equal sizes (1,066)
        per_seed = [f"{b:+.2f} (s{s})" for s, b in sorted(zip(
            [s for _, s, r in entries if s in dense and "test_accuracy" in r], both, strict=True))]
        losses = [r["train_loss_last50"] for _, _, r in entries if "train_loss_last50" in r]
        print(f"| {variant} | {','.join(map(str, seeds))} | {statistics.fmean(tests):.2f} | "
              f"{statistics.fmean(diffs):+.2f} | {statistics.fmean(ddiffs):+.2f} | "
              f"{statistics.fmean(both):+.2f} | {spread(both)} | {', '.join(per_seed)} | "
              f"{statistics.fmean(losses):.3f} | "
              f"{statistics.median(r['backward_ratio'] for _, _, r in entries):.2f} | "
              f"{statistics.median(whole(r) for _, _, r in entries):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"replace the tables in {DOC.name}")
    if not p.parse_args().write:
        render()
        return
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        render()
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{out.getvalue()}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
