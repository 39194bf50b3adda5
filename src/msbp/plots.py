"""PNG plots of a results document; matplotlib is imported only here, with the Agg backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

INFO_MEASURES = (  # see msbp.info for the definitions
    ("cosine", "cosine(sparse dW, dense dW)"),
    ("cumulative_error", "window-summed error vs dense dW"),
    ("upstream_cosine", "cosine(arrived dW, dense dW)"),
    ("local_mass_fraction", "fraction of arrived |G| propagated"),
)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: dict[str, Any], path: str | os.PathLike[str], plt=None) -> Path:
    """Dev (solid) and test (dashed) metric per epoch, one colour per run."""
    plt = plt or _pyplot()
    metric = results["config"].get("metric", "accuracy")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(results["runs"]):
        epochs = [row["epoch"] for row in run["epochs"]]
        color = f"C{i}"
        ax.plot(epochs, [row[f"dev_{metric}"] for row in run["epochs"]], color=color,
                marker="o", label=f"{run['method']} dev")
        if all(f"test_{metric}" in row for row in run["epochs"]):
            ax.plot(epochs, [row[f"test_{metric}"] for row in run["epochs"]], color=color,
                    linestyle="--", label=f"{run['method']} test")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{results['task']}: {metric} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_info_loss(results: dict[str, Any], path: str | os.PathLike[str], plt=None) -> Path | None:
    """Information-loss measures (rows) per sparse layer (columns) over training steps."""
    runs = [r for r in results["runs"] if r.get("info_loss")]
    if not runs:
        return None
    plt = plt or _pyplot()
    layers = sorted({name for r in runs for name in r["info_loss"]["layers"]})
    fig, axes = plt.subplots(
        len(INFO_MEASURES), len(layers), figsize=(4.5 * len(layers), 3 * len(INFO_MEASURES)),
        squeeze=False,
    )
    for col, layer in enumerate(layers):
        for row, (key, label) in enumerate(INFO_MEASURES):
            ax = axes[row][col]
            for i, run in enumerate(results["runs"]):
                records = (run.get("info_loss") or {}).get("layers", {}).get(layer, [])
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, color=f"C{i}", label=run["method"])
            if key.endswith("cosine"):  # a common scale; a constant 1 would show its rounding
                ax.set_ylim(min([0.0, *ax.get_ylim()[:1]]) - 0.02, 1.02)
            ax.set_title(f"{layer}: {label}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``accuracy.png`` and (if measured) ``info_loss.png`` into ``out_dir``.

    Returns the paths; [] (and one line on stderr) without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        print("msbp: matplotlib is not installed; skipping plots (pip install \"msbp[plots]\")",
              file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_accuracy(results, out_dir / "accuracy.png", plt)]
    info = plot_info_loss(results, out_dir / "info_loss.png", plt)
    if info is not None:
        paths.append(info)
    return paths
