"""Render the CIFAR-10 comparisons (``experiments/cifar10_results/*.json``, written by
``msbp compare --task cifar10 --out ...``) as one markdown table.

    python experiments/cifar10_render.py [--out experiments/cifar10_table.md]

One row per run: the setting (file name), method, k ratio (with ``--layer-ratios`` and
``--dense-warmup`` if given), memory, test and dev
accuracy at the best-dev epoch (difference to the dense run of the same file), backprop and
total training seconds (speed-up against the dense run of the same file, i.e. the same process
and data order; files without a dense run are compared with the dense run of a file with the
same data, epochs and seed, ``--baseline``'s first, marked ``*``: the accuracy is exactly
comparable (the dense run reproduces bit for bit), the times are another process's), and the
whole-network backward speed-up of the setting measured side by side with dense
(``cifar10_settings_bench.py``: interleaved, so less exposed to the shared machine's load).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "cifar10_results"


def _dense(doc: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in doc["runs"] if r["method"] == "dense"), None)


#: what makes two runs' accuracies comparable: on one thread the same options give the same
#: dense run in any process (51.05% in both ratio0.1 and ratio0.5-same), so a file without a
#: dense run borrows the dense run of a file with the same data, epochs and seed
SAME = ("limit_train", "limit_eval", "epochs", "seed", "batch_size", "width", "channels_last")


def _baseline(docs: dict[str, Any], doc: dict[str, Any], preferred: str | None):
    key = tuple(doc["config"].get(k) for k in SAME)
    names = ([preferred] if preferred in docs else []) + list(docs)
    for name in names:
        other = docs[name]
        if tuple(other["config"].get(k) for k in SAME) == key and _dense(other) is not None:
            return _dense(other)
    return None


def _bench_key(cfg: dict[str, Any], sc: dict[str, Any]) -> str:
    """The setting's name in ``cifar10_settings_bench.py``: ``[sbp@]RATIO[:LAYER=R,...]``."""
    key = ("" if sc.get("memory", 0) > 0 else "sbp@") + f"{sc.get('ratio', cfg['ratio']):g}"
    return key + (f":{cfg['layer_ratios']}" if cfg.get("layer_ratios") else "")


def render(folder: Path, baseline: str | None, bench: Path | None = None) -> str:
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    side = {}  # setting -> backward speed-up measured side by side with dense
    if bench is not None and bench.exists():
        side = {r["setting"]: r["speedup"] for r in json.loads(bench.read_text())["rows"]}
    lines = [
        "| setting | method | ratio | memory | test acc (%) | dev acc (%) | backprop s (speed-up) "
        "| total s (speed-up) | backward speed-up side by side | epochs | train images |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, doc in docs.items():
        cfg = doc["config"]
        dense = _dense(doc)
        if dense is not None:
            ref, mark = dense, ""
        else:
            ref, mark = _baseline(docs, doc, baseline), "*"
        for run in doc["runs"]:
            sc = (cfg.get("sparse_config") or {}).get(run["method"])
            ratio = "-" if sc is None else f"{sc.get('ratio', cfg['ratio']):g}"
            if sc is not None and cfg.get("layer_ratios"):  # --layer-ratios: per block
                ratio += f" ({cfg['layer_ratios'].replace(',', ', ')})"
            if sc is not None and cfg.get("dense_warmup"):
                ratio += f", {cfg['dense_warmup']} dense epoch(s) first"
            memory = "-" if sc is None else f"{sc.get('memory', 0):g}"
            if sc is not None and sc.get("memory", 0) > 0:
                memory += f" {sc.get('memory_layout', 'unit')}"
            bench_text = "-"
            if sc is not None and sc.get("memory_layout", "unit") == "unit":
                found = side.get(_bench_key(cfg, sc))
                if found is not None and sc.get("memory", 0) in (0, 0.8):
                    bench_text = f"{found:.2f}x"
            acc = run["test_accuracy"]
            acc_text = f"{acc:.2f}"
            if ref is not None and run is not ref:
                acc_text += f" ({acc - ref['test_accuracy']:+.2f}{mark})"

            def speed(key: str, run=run, ref=ref, mark=mark) -> str:
                text = f"{run[key]:.1f}"
                if ref is not None and run is not ref and run[key] > 0:
                    text += f" ({ref[key] / run[key]:.2f}x{mark})"
                return text

            lines.append(
                f"| {name} | {run['method']} | {ratio} | {memory} | {acc_text} | "
                f"{run['dev_accuracy']:.2f} | {speed('backprop_seconds')} | "
                f"{speed('total_seconds')} | {bench_text} | {len(run['epochs'])} | "
                f"{cfg.get('limit_train') or 45000} |"
            )
    return "\n".join(lines)


def render_epochs(folder: Path, stems: list[str]) -> str:
    """Test accuracy after every epoch of the runs of the files ``stems`` (one dense column, the
    first file's or, as in ``render``, borrowed from a file with the same conditions), with each
    sparse run's gap to dense after the same epoch (does the gap shrink with training?)."""
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    first = docs[stems[0]]
    dense = _dense(first) or _baseline(docs, first, None)
    columns = [("dense", dense)] if dense is not None else []
    for stem in stems:
        columns += [(f"{stem} {r['method']}", r) for r in docs[stem]["runs"]
                    if r["method"] != "dense"]
    lines = ["| epoch | " + " | ".join(name for name, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for i in range(max(len(r["epochs"]) for _, r in columns)):
        cells = []
        for _, run in columns:
            if i >= len(run["epochs"]):
                cells.append("")
                continue
            acc = run["epochs"][i]["test_accuracy"]
            text = f"{acc:.2f}"
            if dense is not None and run is not dense and i < len(dense["epochs"]):
                text += f" ({acc - dense['epochs'][i]['test_accuracy']:+.2f})"
            cells.append(text)
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--baseline", default="ratio0.1",
                        help="file (stem) whose dense run serves files without one, if it matches")
    parser.add_argument("--out", default=None)
    parser.add_argument("--bench", default=str(HERE / "cifar10_settings_bench.json"),
                        help="cifar10_settings_bench.py's JSON: the side-by-side speed-ups")
    parser.add_argument("--epochs-of", nargs="+", default=None, metavar="STEM",
                        help="instead: the per-epoch test accuracy of these files' runs")
    args = parser.parse_args(argv)
    if args.epochs_of:
        print(render_epochs(Path(args.results), args.epochs_of))
        return
    table = render(Path(args.results), args.baseline, Path(args.bench))
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
