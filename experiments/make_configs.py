"""Write the MNIST configs experiments/configs/*.json, one file per table row.

Rerun after editing the list; files of other tasks in the folder are left alone.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"

# the paper's MNIST setting (method.md, section 5; meProp's hyper-parameters)
# denormals kept: the recorded results were made so, before --denormals flushed by default
# (sparse backprop's results depend on it: README, "Performance")
PAPER = {"epochs": 20, "batch_size": 10, "hidden": 500, "layers": 2, "optimizer": "adam",
         "lr": 0.001, "ratio": 0.04, "memory": 0.8, "denormals": "keep"}
# the sweeps: same model and optimizer, shorter (3 epochs on the first 10,000 training images)
SWEEP = {**PAPER, "epochs": 3, "limit_train": 10000, "selection": "per_example", "k": 20}
PAPER_ACC = {"dense": 97.86, "sbp": 97.84, "msbp": 98.23}


def config(name, group, label, args, seeds=(1,), paper=None, same_as=None):
    out = {"name": name, "group": group, "label": label, "command": "train", "task": "mnist",
           "args": args, "seeds": list(seeds)}
    if paper:
        out["paper"] = paper
    if same_as:
        out["same_as"] = same_as
    return out


def all_configs():
    rows = [config("table-dense", "table", "MLP (dense)", {**PAPER, "method": "dense"},
                   (1, 2, 3), {"test_accuracy": PAPER_ACC["dense"]})]
    for sel in ("per_example", "unified"):
        for method, label in (("sbp", "+ sparse backprop"), ("msbp", "+ MSBP")):
            rows.append(config(f"table-{method}-{sel}", "table", f"{label} ({sel})",
                               {**PAPER, "method": method, "selection": sel}, (1, 2, 3),
                               {"test_accuracy": PAPER_ACC[method]}))
    # longer training of the per-example rows (one seed): does sbp catch up with more epochs?
    for method, label in (("dense", "MLP (dense)"), ("sbp", "+ sparse backprop"),
                          ("msbp", "+ MSBP")):
        sel = "" if method == "dense" else " (per_example)"
        rows.append(config(f"long-{method}", "long", f"{label}{sel}, 6 epochs",
                           {**PAPER, "epochs": 6, "method": method,
                            "selection": "per_example"}, (1,),
                           {"test_accuracy": PAPER_ACC[method]}))
    # the paper's full setting (20 epochs), one seed
    for method, label in (("dense", "MLP (dense)"), ("sbp", "+ sparse backprop"),
                          ("msbp", "+ MSBP")):
        sel = "" if method == "dense" else " (per_example)"
        rows.append(config(f"full-{method}", "full", f"{label}{sel}, 20 epochs",
                           {**PAPER, "method": method, "selection": "per_example"}, (1,),
                           {"test_accuracy": PAPER_ACC[method]}))
    for method, label in (("sbp", "+ sparse backprop"), ("msbp", "+ MSBP")):
        rows.append(config(f"full-{method}-unified", "full", f"{label} (unified), 20 epochs",
                           {**PAPER, "method": method, "selection": "unified"}, (1,),
                           {"test_accuracy": PAPER_ACC[method]}))
    # the paper's full setting with the MNIST task's default optimizer (LazyRowAdam; dense runs
    # take exactly the fused Adam step), 3 seeds: which selection to make the default
    lazy = {**PAPER, "optimizer": "lazy_adam"}
    rows.append(config("lazy20-dense", "lazy", "MLP (dense), fused Adam, 20 epochs",
                       {**lazy, "method": "dense"}, (1, 2, 3),
                       {"test_accuracy": PAPER_ACC["dense"]}))
    for sel in ("per_example", "unified"):
        for method, label in (("sbp", "+ sparse backprop"), ("msbp", "+ MSBP")):
            rows.append(config(f"lazy20-{method}-{sel}", "lazy",
                               f"{label} ({sel}), LazyRowAdam, 20 epochs",
                               {**lazy, "method": method, "selection": sel}, (1, 2, 3),
                               {"test_accuracy": PAPER_ACC[method]}))
    rows.append(config("sweep-dense", "baseline", "dense 784-500-500-10",
                       {**SWEEP, "method": "dense", "k": None}))
    for k in (5, 10, 20, 40, 80):
        for method in ("sbp", "msbp"):
            rows.append(config(f"k-{k:02d}-{method}", "k", f"{method} k={k}",
                               {**SWEEP, "method": method, "k": k}))
    for mem in (0.0, 0.2, 0.5, 0.8, 0.9, 1.0):
        same = {0.0: "k-20-sbp", 0.8: "k-20-msbp"}.get(mem)
        method = "sbp" if mem == 0.0 else "msbp"
        rows.append(config(f"memory-{mem:.1f}", "memory", f"memory {mem}",
                           {**SWEEP, "method": method, "memory": mem}, same_as=same))
    for sel in ("per_example", "unified"):
        for layout in ("unit", "slot"):
            same = "k-20-msbp" if (sel, layout) == ("per_example", "unit") else None
            rows.append(config(f"layout-{sel}-{layout}", "layout", f"msbp {sel}, {layout}",
                               {**SWEEP, "method": "msbp", "selection": sel,
                                "memory_layout": layout}, same_as=same))
    for sel in ("per_example", "unified", "random"):
        for method in ("sbp", "msbp"):
            same = {("per_example", "sbp"): "k-20-sbp", ("per_example", "msbp"): "k-20-msbp",
                    ("unified", "msbp"): "layout-unified-unit"}.get((sel, method))
            rows.append(config(f"selection-{sel}-{method}", "selection", f"{method} {sel}",
                               {**SWEEP, "method": method, "selection": sel}, same_as=same))
    for k in (5, 20, 80):
        rows.append(config(f"hidden-dense-{k:02d}", "hidden", f"dense, hidden {k}",
                           {**SWEEP, "method": "dense", "k": None, "hidden": k}))
        rows.append(config(f"hidden-msbp-{k:02d}", "hidden", f"msbp k={k} of 500",
                           {**SWEEP, "method": "msbp", "k": k}, same_as=f"k-{k:02d}-msbp"))
        rows.append(config(f"hidden-sbp-{k:02d}", "hidden", f"sbp k={k} of 500",
                           {**SWEEP, "method": "sbp", "k": k}, same_as=f"k-{k:02d}-sbp"))
    # Adam on every weight (stale momentum moves unselected rows) vs Adam on the touched rows only
    for opt in ("adam", "lazy_adam"):
        for method in ("sbp", "msbp"):
            rows.append(config(f"optimizer-{opt}-{method}", "optimizer", f"{method}, {opt}",
                               {**SWEEP, "method": method, "optimizer": opt}, (1, 2)))
    info = {**SWEEP, "measure_info_loss": True, "info_every": 500, "info_window": 100}
    for sel in ("per_example", "unified"):
        for method in ("sbp", "msbp"):
            rows.append(config(f"info-{sel}-{method}", "info", f"{method} {sel}",
                               {**info, "method": method, "selection": sel}))
    rows.append(config("info-per_example-msbp-slot", "info", "msbp per_example slot",
                       {**info, "method": "msbp", "memory_layout": "slot"}))
    rows.append(config("info-per_example-msbp-1.0", "info", "msbp per_example memory 1.0",
                       {**info, "method": "msbp", "memory": 1.0}))
    return rows


def main() -> None:
    CONFIGS.mkdir(exist_ok=True)
    for order, row in enumerate(all_configs()):
        row["order"] = order  # the renderer's row order
        (CONFIGS / f"{row['name']}.json").write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
