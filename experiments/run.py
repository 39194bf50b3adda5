"""Run experiment configs: one result JSON per (config, seed) in experiments/results/.

Each config (experiments/configs/*.json) is one table row: ``{"name", "group", "label",
"command": "train", "task", "args": {option: value}, "seeds": [...], "paper": {...}}``. A config
with ``"same_as": NAME`` is not run; the renderer shows NAME's results in its row.
The options go through the CLI's parser and the same library function as ``msbp train``.

    python experiments/run.py experiments/configs/table-*.json --epochs 3 --threads 1
    python experiments/run.py --group k --seeds 1

Existing result files are skipped (``--force`` reruns them), so an interrupted run resumes;
a ``NAME.seedS.json.running`` marker lets several runners share one results folder (delete
stale markers after a crash).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"


def load_configs(paths: list[str], groups: list[str] | None) -> list[tuple[Path, dict[str, Any]]]:
    """The configs named by ``paths`` (default: all), filtered by group, in file-name order."""
    files = [Path(p) for p in paths] if paths else sorted(CONFIGS.glob("*.json"))
    configs = [(f, json.loads(f.read_text())) for f in files]
    if groups:
        configs = [(f, c) for f, c in configs if c.get("group") in groups]
    return configs


def to_argv(options: dict[str, Any]) -> list[str]:
    """``{"batch_size": 10, "measure_info_loss": True}`` -> ``["--batch-size", "10", ...]``."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv


def result_path(config: dict[str, Any], seed: int, results_dir: Path) -> Path:
    return results_dir / f"{config['name']}.seed{seed}.json"


def run_one(
    config: dict[str, Any], seed: int, overrides: dict[str, Any], out: Path, threads: int
) -> dict[str, Any]:
    """Train one (config, seed) through the CLI's parser and ``msbp.train.train``."""
    from msbp.cli import parse_args
    from msbp.tasks import TASKS
    from msbp.train import train, write_json

    options = {**config["args"], **overrides}
    argv = [config.get("command", "train"), "--task", config["task"], *to_argv(options),
            "--seed", str(seed), "--threads", str(threads), "--quiet"]
    args = parse_args(argv)
    results = train(TASKS[args.task], args)
    results["experiment"] = {
        "name": config["name"], "group": config["group"], "seed": seed,
        "overrides": overrides, "argv": ["msbp", *argv],
    }
    write_json(out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", help="config files (default: all)")
    parser.add_argument("--group", nargs="+", default=None, help="only these groups")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="override the seeds")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--limit-train", type=int, default=None, help="override --limit-train")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--results", default=str(RESULTS), help="results folder")
    parser.add_argument("--force", action="store_true", help="rerun existing results")
    parser.add_argument("--dry-run", action="store_true", help="list what would run")
    opts = parser.parse_args(argv)

    overrides: dict[str, Any] = {}
    if opts.epochs is not None:
        overrides["epochs"] = opts.epochs
    if opts.limit_train is not None:
        overrides["limit_train"] = opts.limit_train
    results_dir = Path(opts.results)
    for _path, config in load_configs(opts.configs, opts.group):
        if config.get("same_as"):
            continue
        for seed in opts.seeds or config["seeds"]:
            out = result_path(config, seed, results_dir)
            if out.exists() and not opts.force:
                print(f"skip {out.name} (exists)", flush=True)
                continue
            if opts.dry_run:
                print(f"would run {config['name']} seed {seed} {overrides}", flush=True)
                continue
            lock = out.with_name(out.name + ".running")
            try:  # another runner on the same results folder may have taken this one
                lock.parent.mkdir(parents=True, exist_ok=True)
                lock.touch(exist_ok=False)
            except FileExistsError:
                print(f"skip {out.name} (running elsewhere: {lock.name})", flush=True)
                continue
            start = time.time()
            try:
                res = run_one(config, seed, overrides, out, opts.threads)
            finally:
                lock.unlink(missing_ok=True)
            run = res["runs"][0]
            print(
                f"{config['name']} seed {seed}: test {run['test_accuracy']:.2f} dev "
                f"{run['dev_accuracy']:.2f} epoch {run['best_epoch']} "
                f"({time.time() - start:.0f} s) -> {out}", flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
