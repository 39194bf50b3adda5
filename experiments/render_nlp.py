"""Render the parsing and POS results (groups ``parse`` and ``pos``) as markdown tables.

    python experiments/render_nlp.py [--out experiments/results/nlp_tables.md]

Columns: backprop and total training seconds (mean over the config's ``timing_seeds`` if it
names them, else over all seeds; speed-up vs dense), the test metric at the best-dev epoch (mean ±
std over seeds; for parsing UAS and LAS without punctuation, as Chen & Manning, and UAS with it),
the dev metric, best epochs and seeds. A config names ``timing_seeds`` when only those runs had
the machine to themselves; timings of the other groups come from a shared, loaded 2-core machine
and are indicative only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
UD_NOTE = (
    "Data: UD English EWT (commit 15d613d8) with PTB tags (XPOS); the Penn Treebank is not "
    "available to the project, so the numbers are not comparable with the paper's PTB/WSJ ones."
)
WSJ_NOTE = (
    "Data: the NLTK CoNLL-2000 WSJ sample (train: first 7,936 sentences of WSJ 15-18, dev: the "
    "last 1,000, test: WSJ 20), not the full Penn Treebank split of the paper."
)
TIME_NOTE = (
    "Timings come from a shared 2-core CPU machine (1 thread per run, other jobs running): "
    "indicative only. Dense POS runs use PyTorch's fused nn.LSTM, sparse ones SparseLSTM, so "
    "their timings compare different implementations (see the README for same-code timings)."
)
QUIET_NOTE = (
    "Timings: seed(s) {seeds} only, each run alone on a quiet 2-core AMD EPYC with 2 threads."
)


def _ms(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def _best_row(run: dict[str, Any]) -> dict[str, Any]:
    return run["epochs"][run["best_epoch"] - 1] if run.get("best_epoch") else {}


def render(group: str, configs: list[dict], results: dict[str, list[dict]]) -> str:
    parse = group.startswith("parse")
    head = ["row", "backprop (s)", "total (s)"]
    head += (["test UAS (%)", "test LAS (%)", "test UAS w/ punct (%)", "dev UAS (%)"] if parse
             else ["test accuracy (%)", "dev accuracy (%)"])
    head += ["best epoch", "seeds", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense_cfg = next((c for c in configs if c["args"]["method"] == "dense"), None)
    dense_name = (dense_cfg.get("same_as") or dense_cfg["name"]) if dense_cfg else ""
    timing_seeds = (dense_cfg or {}).get("timing_seeds")

    def timed(docs: list[dict]) -> list[dict]:
        return [d["runs"][0] for d in docs
                if not timing_seeds or d["experiment"]["seed"] in timing_seeds]

    dense = timed(results.get(dense_name, []))
    dense_bp = statistics.fmean(r["backprop_seconds"] for r in dense) if dense else None
    dense_tot = statistics.fmean(r["total_seconds"] for r in dense) if dense else None
    for c in configs:
        docs = results.get(c.get("same_as") or c["name"], [])
        if not docs:
            lines.append(f"| {c['label']} | not run |" + " |" * (len(head) - 2))
            continue
        runs = [d["runs"][0] for d in docs]
        clock = timed(docs) or runs
        bp = statistics.fmean(r["backprop_seconds"] for r in clock)
        tot = statistics.fmean(r["total_seconds"] for r in clock)
        bp_s = f"{bp:.1f}" + (f" ({dense_bp / bp:.2f}x)" if dense_bp else "")
        tot_s = f"{tot:.1f}" + (f" ({dense_tot / tot:.2f}x)" if dense_tot else "")
        cells = [c["label"], bp_s, tot_s]
        if parse:
            best = [_best_row(r) for r in runs]
            cells += [_ms([r["test_accuracy"] for r in runs]),
                      _ms([b.get("test_las") for b in best]),
                      _ms([b.get("test_uas_all") for b in best]),
                      _ms([r["dev_accuracy"] for r in runs])]
        else:
            cells += [_ms([r["test_accuracy"] for r in runs]),
                      _ms([r["dev_accuracy"] for r in runs])]
        paper = c.get("paper") or {}
        nums = {k: v for k, v in paper.items() if isinstance(v, int | float)}
        paper_s = " ".join(f"{v:.2f}" for k, v in nums.items() if k.startswith("test_"))
        times = [f"{k.split('_')[0]} {v} s" for k, v in nums.items() if k.endswith("seconds")]
        if times:
            paper_s += f" ({', '.join(times)})"
        cells += ["/".join(str(r["best_epoch"]) for r in runs),
                  ",".join(str(d["experiment"]["seed"]) for d in docs), paper_s]
        lines.append("| " + " | ".join(cells) + " |")
    args = configs[-1]["args"]  # a sparse row: its selection is the one used
    skip = {"method", "memory", "k", "ratio"}
    settings = ", ".join(f"{k}={v}" for k, v in sorted(args.items()) if k not in skip)
    note = WSJ_NOTE if args.get("pos_data") == "conll2000" else UD_NOTE
    time_note = QUIET_NOTE.format(seeds=timing_seeds) if timing_seeds else TIME_NOTE
    return "\n".join([f"### {group}", "", f"Settings: {settings}.", "", *lines, "", note,
                      time_note])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=str(HERE / "configs"))
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    configs = [json.loads(f.read_text()) for f in sorted(Path(opts.configs).glob("*.json"))]
    results: dict[str, list[dict]] = {}
    for f in sorted(Path(opts.results).glob("*.json")):
        doc = json.loads(f.read_text())
        name = doc.get("experiment", {}).get("name", "")
        if name.startswith(("parse", "pos")):
            results.setdefault(name, []).append(doc)
    order = {"dense": 0, "sbp": 1, "msbp": 2}
    text = []
    groups = sorted(
        {c["group"] for c in configs if c.get("group", "").startswith(("parse", "pos"))}
    )
    for group in groups:
        rows = sorted((c for c in configs if c.get("group") == group),
                      key=lambda c: (c["name"].count("r04"), order[c["args"]["method"]]))
        if rows:
            text.append(render(group, rows, results))
    out = "\n\n".join(text) + "\n"
    print(out)
    if opts.out:
        Path(opts.out).write_text(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
