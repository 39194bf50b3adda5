"""GPU benchmark of the sparse linear backward: dense vs SBP vs MSBP in one process.

One linear layer (backward alone; forward + backward) over the shapes of
``docs/performance.md`` plus the paper's 50 x 784 x 500, in bf16 and fp32, k/out in
{0.01, 0.04, 0.1}; and a whole training step of an MLP with four 8192-wide layers. Variants:
dense ``nn.Linear`` (the fastest ordinary loop: ``zero_grad(set_to_none=True)``, fused Adam),
SBP (msbp, memory 0) and MSBP (memory 0.8, unit layout), each through the Triton kernels and,
for comparison, through the plain PyTorch path (``MSBP_BACKEND=python``). Sparse layers use
``on_nonfinite="skip"`` so that the backward has no host read (``"raise"`` costs one per layer).

Times: CUDA events around each call, warm-up first, then interleaved rounds (every variant once
per round, in turn), medians and the spread (min-max of the round medians) per variant; ratios
are dense time / variant time. Writes JSON (GPU name, torch / Triton / CUDA versions) and a
markdown table.

    python benchmarks/bench_gpu.py                      # on a GPU: everything (~5-8 minutes)
    python benchmarks/bench_gpu.py --quick              # the acceptance shapes only
    python benchmarks/bench_gpu.py --dry-run            # tiny shapes on the CPU, table printed only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import msbp
from msbp.optim import LazyRowAdam

# tokens x in x out
LAYER_SHAPES = [(50, 784, 500), (128, 500, 500), (4096, 4096, 4096), (16384, 4096, 4096),
                (8192, 8192, 8192)]
QUICK_SHAPES = [(50, 784, 500), (16384, 4096, 4096), (8192, 8192, 8192)]
DRY_SHAPES = [(8, 24, 32), (16, 32, 64)]
FRACS = (0.01, 0.04, 0.1)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MLP = dict(tokens=8192, width=8192, layers=4)
DRY_MLP = dict(tokens=16, width=64, layers=4)
RESULTS = "benchmarks/results/bench_gpu.json"  # where a GPU run writes (--out)

# name: (memory alpha or None for dense, kernel backend)
LAYER_VARIANTS = {
    "dense": (None, None),
    "SBP": (0.0, "auto"),
    "MSBP": (0.8, "auto"),
    "SBP (PyTorch path)": (0.0, "python"),
    "MSBP (PyTorch path)": (0.8, "python"),
}


class Timer:
    """Milliseconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None], reps: int) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps


def set_backend(name: str | None) -> None:
    if name is not None:
        msbp.native.set_backend(name)


def layer_cases(n: int, d_in: int, out: int, dtype: torch.dtype, frac: float,
                device: torch.device) -> dict[str, tuple[Callable, Callable, str | None]]:
    """Per variant: (backward alone, forward + backward, backend) closures of one layer."""
    k = max(1, round(frac * out))
    x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(n, out, device=device, dtype=dtype)
    cases = {}
    for name, (alpha, backend) in LAYER_VARIANTS.items():
        torch.manual_seed(0)
        if alpha is None:
            layer = nn.Linear(d_in, out, device=device, dtype=dtype)
        else:
            cfg = msbp.SparseBackpropConfig(k=k, memory=alpha, on_nonfinite="skip")
            layer = msbp.SparseLinear(d_in, out, config=cfg, device=device, dtype=dtype)
        params = list(layer.parameters())

        def zero(params=params) -> None:
            for p in params:
                p.grad = None
            x.grad = None

        def backward(layer=layer, zero=zero) -> None:
            # the forward runs outside the timed region: see run_layer
            zero()
            layer._bench_y.backward(g)

        def forward_backward(layer=layer, zero=zero) -> None:
            zero()
            layer(x).backward(g)

        def prepare(layer=layer) -> None:
            layer._bench_y = layer(x)

        cases[name] = (prepare, backward, forward_backward, backend)
    return cases


def run_layer(shape, dtype_name, frac, device, rounds, reps, warmup, timer) -> dict:
    n, d_in, out = shape
    cases = layer_cases(n, d_in, out, DTYPES[dtype_name], frac, device)
    times: dict[str, dict[str, list[float]]] = {v: {"bwd": [], "fwd+bwd": []} for v in cases}

    def timed_backward(prepare, backward) -> float:
        total = 0.0
        for _ in range(reps):  # one forward per backward, untimed
            prepare()
            total += timer(backward, 1)
        return total / reps

    for rnd in range(rounds + 1):  # round 0 warms up (builds, autotuning, caches)
        for name, (prepare, backward, fwd_bwd, backend) in cases.items():
            set_backend(backend)
            try:
                reps_now = warmup if rnd == 0 else reps
                for _ in range(reps_now if rnd == 0 else 0):
                    prepare()
                    backward()
                    fwd_bwd()
                if rnd:
                    times[name]["bwd"].append(timed_backward(prepare, backward))
                    times[name]["fwd+bwd"].append(timer(fwd_bwd, reps))
            finally:
                set_backend("auto")
    return summarize(times, {"tokens": n, "in": d_in, "out": out, "dtype": dtype_name,
                             "k_frac": frac, "k": max(1, round(frac * out))})


def summarize(times: dict[str, dict[str, list[float]]], key: dict) -> dict:
    rows = {}
    for name, phases in times.items():
        rows[name] = {}
        for phase, values in phases.items():
            med = statistics.median(values)
            dense = statistics.median(times["dense"][phase])
            rows[name][phase] = {"ms": med, "min_ms": min(values), "max_ms": max(values),
                                 "x_dense": dense / med if med > 0 else None}
    return {**key, "variants": rows}


def mlp_step_cases(tokens: int, width: int, layers: int, dtype: torch.dtype, frac: float,
                   device: torch.device) -> dict:
    """Whole training steps (zero_grad, forward, MSE loss, backward, optimizer) of an MLP with
    ``layers`` Linear(width, width) + ReLU."""
    x = torch.randn(tokens, width, device=device, dtype=dtype)
    y = torch.randn(tokens, width, device=device, dtype=dtype)
    cases = {}
    variants = {
        "dense, Adam(fused)": (None, "adam", None),
        "SBP, LazyRowAdam": (0.0, "lazy", "auto"),
        "MSBP, LazyRowAdam": (0.8, "lazy", "auto"),
        "MSBP, Adam(fused)": (0.8, "adam", "auto"),
        "MSBP, LazyRowAdam (PyTorch path)": (0.8, "lazy", "python"),
    }
    for name, (alpha, opt_name, backend) in variants.items():
        torch.manual_seed(0)
        mods = []
        for _ in range(layers):
            mods += [nn.Linear(width, width, device=device, dtype=dtype), nn.ReLU()]
        model = nn.Sequential(*mods[:-1])
        if alpha is not None:
            cfg = msbp.SparseBackpropConfig(k=max(1, round(frac * width)), memory=alpha,
                                            on_nonfinite="skip")
            msbp.sparsify(model, cfg)
        if opt_name == "lazy":
            opt = LazyRowAdam(model.parameters(), lr=1e-4)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda"
                                   or None)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()

        cases[name] = (step, backend)
    return cases


def run_mlp(mlp: dict, dtype_name: str, frac: float, device, rounds, reps, warmup,
            timer) -> dict:
    cases = mlp_step_cases(mlp["tokens"], mlp["width"], mlp["layers"], DTYPES[dtype_name],
                           frac, device)
    times = {name: {"step": []} for name in cases}
    for rnd in range(rounds + 1):
        for name, (step, backend) in cases.items():
            set_backend(backend)
            try:
                if rnd == 0:
                    for _ in range(warmup):
                        step()
                else:
                    times[name]["step"].append(timer(step, reps))
            finally:
                set_backend("auto")
    times["dense"] = times.pop("dense, Adam(fused)")  # summarize's baseline key
    out = summarize(times, {"mlp": mlp, "dtype": dtype_name, "k_frac": frac})
    out["variants"]["dense, Adam(fused)"] = out["variants"].pop("dense")
    return out


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "msbp_kernels": msbp.native.status()["active"],
        "cuda_path": msbp.native.use_native(device, "sparse_linear_backward"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return env


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"GPU benchmark on {env['device_name']} (torch {env['torch']}, CUDA {env['cuda']}, "
        f"Triton {env['triton']}); medians of {result['rounds']} interleaved rounds, "
        "ratio = dense time / variant time.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| tokens x in x out | dtype | k/out | variant | bwd ms | bwd x dense | fwd+bwd ms "
        "| fwd+bwd x dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["layers"]:
        shape = f"{row['tokens']} x {row['in']} x {row['out']}"
        for name, v in row["variants"].items():
            b, fb = v["bwd"], v["fwd+bwd"]
            lines.append(f"| {shape} | {row['dtype']} | {row['k_frac']} | {name} | "
                         f"{b['ms']:.3f} | {b['x_dense']:.2f}x | {fb['ms']:.3f} | "
                         f"{fb['x_dense']:.2f}x |")
    if result["mlp"]:
        lines += ["", "| MLP step (tokens x width x layers) | dtype | k/out | variant | ms "
                  "| x dense |", "|---|---|---|---|---|---|"]
        for row in result["mlp"]:
            m = row["mlp"]
            shape = f"{m['tokens']} x {m['width']} x {m['layers']}"
            for name, v in row["variants"].items():
                s = v["step"]
                lines.append(f"| {shape} | {row['dtype']} | {row['k_frac']} | {name} | "
                             f"{s['ms']:.3f} | {s['x_dense']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes, two rounds: checks the script (CPU is fine)")
    ap.add_argument("--quick", action="store_true", help="the acceptance shapes only")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--fracs", default=",".join(map(str, FRACS)))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-mlp", action="store_true")
    ap.add_argument("--out", default=None,
                    help=f"JSON results (default: {RESULTS}; with --dry-run, none: CPU timings "
                    "of tiny shapes must not stand where GPU results are looked for)")
    ap.add_argument("--md", default=None, help="markdown table (default: --out with .md)")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.dry_run and args.device == "cuda"
                          and not torch.cuda.is_available() else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); "
              "run on a GPU, or check the script with --dry-run", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.dry_run:
        print("bench_gpu: --device cpu only with --dry-run (CPU timings: benchmarks/"
              "bench_cpu.py)", file=sys.stderr)
        return 2
    shapes = DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else LAYER_SHAPES
    mlp = DRY_MLP if args.dry_run else MLP
    rounds, reps, warmup = (2, 2, 1) if args.dry_run else (args.rounds, args.reps, args.warmup)
    dtypes = args.dtypes.split(",")
    fracs = [float(f) for f in args.fracs.split(",")]
    if args.quick:
        fracs = [0.04]
    timer = Timer(device)
    torch.manual_seed(0)

    result = {"environment": environment(device), "rounds": rounds, "reps": reps,
              "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv),
              "layers": [], "mlp": []}
    cases = [(s, d, f) for s in shapes for d in dtypes for f in fracs]
    for i, (shape, dtype_name, frac) in enumerate(cases, 1):
        row = run_layer(shape, dtype_name, frac, device, rounds, reps, warmup, timer)
        result["layers"].append(row)
        v = row["variants"]
        print(f"[{i}/{len(cases)}] {shape} {dtype_name} k/out={frac}: bwd SBP "
              f"{v['SBP']['bwd']['x_dense']:.2f}x MSBP {v['MSBP']['bwd']['x_dense']:.2f}x "
              f"(PyTorch path {v['MSBP (PyTorch path)']['bwd']['x_dense']:.2f}x)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_mlp:
        for dtype_name in dtypes:
            row = run_mlp(mlp, dtype_name, 0.04, device, rounds, max(1, reps // 2), warmup,
                          timer)
            result["mlp"].append(row)
            print(f"MLP step {dtype_name}: " + ", ".join(
                f"{k} {v['step']['x_dense']:.2f}x" for k, v in row["variants"].items()),
                flush=True)
    if args.out is None and args.dry_run:
        print(markdown(result))
        return 0
    out = Path(args.out or RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = Path(args.md) if args.md else out.with_suffix(".md")
    md.write_text(markdown(result))
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
