"""Render experiments/results/*.json as markdown tables (mean ± std over seeds) beside the paper.

    python experiments/render.py                   # all groups, to stdout
    python experiments/render.py --group table k   # some groups
    python experiments/render.py --task mnist --out experiments/mnist_results.md   # one task's
    python experiments/render.py --plots experiments/plots   # also PNG plots of chosen rows

One table per config group, one row per config (``same_as`` rows show the results of the config
they name). Columns: the test metric at the best-dev epoch, the dev metric, the best epoch, the
number of seeds, the epochs and training examples actually run, and the paper's number where the
config carries one. The ``info`` group adds a table of the information-loss summary, one line
per (row, layer); its measures are defined in ``msbp.info``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GROUP_ORDER = ["table", "full", "lazy", "long", "baseline", "k", "memory", "layout", "selection",
               "hidden", "optimizer", "info"]
GROUP_TITLES = {
    "table": "The paper's MNIST table (784-500-500-10, k = 20 of 500, memory 0.8)",
    "full": "The paper's full setting (20 epochs)",
    "lazy": "The paper's full setting with the task's default optimizer (LazyRowAdam, 20 epochs)",
    "long": "The per-example rows of the paper's table trained longer (6 epochs, 1 seed)",
    "baseline": "Dense baseline of the sweeps",
    "k": "k sweep (kept units per hidden layer of 500)",
    "memory": "Memory ratio sweep (msbp, per-example top-k, k = 20)",
    "layout": "Memory layout (msbp, k = 20)",
    "selection": "Selection: top-k (per example, unified) vs random-k (k = 20)",
    "hidden": "Sparse backprop with k vs a dense network of hidden size k",
    "optimizer": "Optimizer: Adam on all weights vs lazy row-sparse Adam (k = 20)",
    "info": "Information loss (per hidden layer; means over sampled windows)",
}
#: the run each group's rows are compared with (test metric difference, paired by seed)
GROUP_BASELINE = {"table": "table-dense", "full": "full-dense", "lazy": "lazy20-dense",
                  "long": "long-dense",
                  "k": "sweep-dense", "memory": "sweep-dense",
                  "layout": "sweep-dense", "selection": "sweep-dense", "hidden": "sweep-dense",
                  "optimizer": "sweep-dense", "info": "sweep-dense"}
#: (key of msbp.info's summary, column title) of the information-loss table (one row per layer)
INFO_KEYS = (("cosine", "cos vs dense"), ("step_error", "step err"),
             ("cumulative_error", "window err"), ("upstream_cosine", "arrived cos"),
             ("local_cosine", "local cos"), ("local_cumulative_error", "local window err"),
             ("local_mass_fraction", "local mass"))

INFO_LEGEND = (
    "cos vs dense, step err, window err (|sum of sparse dW - sum of dense dW| / |sum of dense "
    "dW| over a window of consecutive steps): the layer's sparse weight gradient against the "
    "true one of the whole dense model (one extra dense pass per measured step). arrived cos: "
    "the gradient that reached the layer through the sparse layers above against the dense one. "
    "local cos, local window err, local mass: the sparse dW against the arrived one, i.e. the "
    "layer's own selection only. Definitions: `src/msbp/info.py`."
)


def load(configs_dir: Path, results_dir: Path) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    configs = {}
    for f in sorted(configs_dir.glob("*.json")):
        c = json.loads(f.read_text())
        configs[c["name"]] = c
    results: dict[str, list[dict]] = {}
    for f in sorted(results_dir.glob("*.json")):
        r = json.loads(f.read_text())
        name = r.get("experiment", {}).get("name")
        if name:
            results.setdefault(name, []).append(r)
    return configs, results


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.{digits}f}"
    )


def run_facts(runs: list[dict]) -> dict[str, Any]:
    """Summary of one config's results (one per seed)."""
    rows = [r["runs"][0] for r in runs]
    cfg = runs[0]["config"]
    return {
        "test": mean_std([r["test_accuracy"] for r in rows]),
        "dev": mean_std([r["dev_accuracy"] for r in rows]),
        "best_epoch": "/".join(str(r["best_epoch"]) for r in rows),
        "seeds": ",".join(str(r["experiment"]["seed"]) for r in runs),
        "epochs": cfg["epochs"],
        "train": "all" if cfg.get("limit_train") is None else str(cfg["limit_train"]),
        "metric": cfg.get("metric", "accuracy"),
    }


def paper_value(config: dict) -> str:
    paper = config.get("paper") or {}
    for key, value in paper.items():
        if key.startswith("test_"):
            return f"{value:.2f}"
    return ""


def render_group(group: str, configs: dict[str, dict], results: dict[str, list[dict]]) -> str:
    rows = sorted((c for c in configs.values() if c.get("group") == group),
                  key=lambda c: (c.get("order", math.inf), c["name"]))
    info = group == "info"
    base = {r["experiment"]["seed"]: r["runs"][0]["test_accuracy"]
            for r in results.get(GROUP_BASELINE.get(group, ""), [])}
    head = ["row", "test (%)", "vs dense", "dev (%)", "best epoch", "seeds", "epochs", "train ex."]
    if any(c.get("paper") for c in rows):
        head.append("paper test (%)")
    lines = [f"### {GROUP_TITLES.get(group, group)}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for c in rows:
        runs = results.get(c.get("same_as") or c["name"], [])
        if not runs:
            cells = [c["label"], "not run"] + [""] * (len(head) - 2)  # not (yet) run
            lines.append("| " + " | ".join(cells) + " |")
            continue
        f = run_facts(runs)
        diffs = [r["runs"][0]["test_accuracy"] - base[r["experiment"]["seed"]]
                 for r in runs if r["experiment"]["seed"] in base]
        diff = f"{statistics.fmean(diffs):+.2f}" if diffs else ""
        cells = [c["label"], f["test"], diff, f["dev"], f["best_epoch"], f["seeds"],
                 str(f["epochs"]), f["train"]]
        if "paper test (%)" in head:
            cells.append(paper_value(c))
        lines.append("| " + " | ".join(cells) + " |")
    if info:
        lines += ["", *render_info(rows, results)]
    return "\n".join(lines)


def render_info(rows: list[dict], results: dict[str, list[dict]]) -> list[str]:
    """One line per (config, layer): the information-loss summary, mean over seeds."""
    head = ["row", "layer", "seeds", *(short for _, short in INFO_KEYS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in rows:
        runs = results.get(c.get("same_as") or c["name"], [])
        summaries = [r["runs"][0]["info_loss"]["summary"] for r in runs]
        layers = list(dict.fromkeys(name for s in summaries for name in s))
        seeds = ",".join(str(r["experiment"]["seed"]) for r in runs)
        for layer in layers:
            cells = [c["label"], layer, seeds]
            for key, _ in INFO_KEYS:
                vals = [s[layer].get(key) for s in summaries if layer in s]
                vals = [v for v in vals if v is not None]
                cells.append(_fmt(statistics.fmean(vals)) if vals else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", INFO_LEGEND]
    return lines


def combined(names: list[str], results: dict[str, list[dict]], seed: int) -> dict | None:
    """One results document holding the runs of ``names`` for ``seed`` (for msbp.plots)."""
    runs, doc = [], None
    for name in names:
        for r in results.get(name, []):
            if r["experiment"]["seed"] == seed:
                doc = doc or {k: v for k, v in r.items() if k != "runs"}
                runs.append({**r["runs"][0], "method": f"{r['runs'][0]['method']} ({name})"})
    if doc is None:
        return None
    return {**doc, "runs": runs}


PLOTS = {
    "table-per_example": ["table-dense", "table-sbp-per_example", "table-msbp-per_example"],
    "table-unified": ["table-dense", "table-sbp-unified", "table-msbp-unified"],
    "long-per_example": ["long-dense", "long-sbp", "long-msbp"],
    "full-per_example": ["full-dense", "full-sbp", "full-msbp"],
    "info-per_example": ["info-per_example-sbp", "info-per_example-msbp"],
    "info-unified": ["info-unified-sbp", "info-unified-msbp"],
    "info-memory": ["info-per_example-sbp", "info-per_example-msbp",
                    "info-per_example-msbp-1.0", "info-per_example-msbp-slot"],
}


def write_plots(results: dict[str, list[dict]], out: Path, seed: int = 1) -> list[Path]:
    sys.path.insert(0, str(HERE.parent / "src"))
    from msbp.plots import write_plots as plot

    paths = []
    for name, members in PLOTS.items():
        doc = combined(members, results, seed)
        if doc is not None:
            paths += plot(doc, out / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", nargs="+", default=None)
    parser.add_argument("--task", default=None,
                        help="only the groups of this task's configs (mnist, pos, parse)")
    parser.add_argument("--configs", default=str(HERE / "configs"))
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    opts = parser.parse_args(argv)
    configs, results = load(Path(opts.configs), Path(opts.results))
    if opts.task:
        configs = {n: c for n, c in configs.items() if c.get("task") == opts.task}
        if not configs:
            parser.error(f"--task {opts.task}: no config in {opts.configs} is of that task")
    groups = opts.group or (
        [g for g in GROUP_ORDER if any(c.get("group") == g for c in configs.values())]
        + sorted({c.get("group") for c in configs.values()} - set(GROUP_ORDER) - {None})
    )
    text = "\n\n".join(render_group(g, configs, results) for g in groups) + "\n"
    print(text)
    if opts.out:
        Path(opts.out).write_text(text)
    if opts.plots:
        for path in write_plots(results, Path(opts.plots)):
            print(f"plot: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
