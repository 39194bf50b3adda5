"""benchmarks/bench_gpu.py runs end to end (tiny shapes on the CPU) and writes its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_dry_run(tmp_path):
    bench = _bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--dry-run", "--device", "cpu", "--dtypes", "fp32", "--fracs", "0.1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["out"] for r in result["layers"]} == {s[2] for s in bench.DRY_SHAPES}
    for row in result["layers"]:
        assert set(row["variants"]) == set(bench.LAYER_VARIANTS)
        assert row["variants"]["dense"]["bwd"]["x_dense"] == 1.0
    assert len(result["mlp"]) == 1 and "MSBP, LazyRowAdam" in result["mlp"][0]["variants"]
    table = out.with_suffix(".md").read_text()
    assert "| 16 x 32 x 64 | fp32 | 0.1 | MSBP |" in table


def test_bench_gpu_dry_run_writes_no_results_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _bench().main(["--dry-run", "--device", "cpu", "--dtypes", "fp32", "--fracs", "0.1",
                          "--no-mlp"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "| 16 x 32 x 64 | fp32 | 0.1 | MSBP |" in capsys.readouterr().out


def test_bench_gpu_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert _bench().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
