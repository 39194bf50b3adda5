"""The training loop through the CLI: JSON schema, shared initial state, info loss, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conllx_fixtures import DEV, TEST, TRAIN, punct_counts, write_treebank
from mnist_fixtures import synthetic_mnist, write_mnist_dir

from msbp import cli
from msbp import train as training
from msbp.environment import flushing_denormals
from msbp.info import InfoLossMeter
from msbp.nn import SparseLinear
from msbp.tasks.base import content_digest
from msbp.train import format_table

HIDDEN = 16
RUN_KEYS = {"method", "backprop_seconds", "total_seconds", "dev_accuracy", "test_accuracy",
            "best_epoch", "epochs", "info_loss"}
TIMING_KEYS = {"backprop_seconds", "total_seconds"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_mnist_dir(tmp_path_factory.mktemp("mnist"), synthetic_mnist(250, 60), gz=True)


def base_args(data_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--dev-size", "50", "--hidden", str(HIDDEN),
            "--epochs", "2", "--threads", "1", "--quiet", *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def without_timings(run: dict) -> dict:
    """A run record with its wall-clock fields removed (they never repeat exactly)."""
    run = {k: v for k, v in run.items() if k not in TIMING_KEYS}
    run["epochs"] = [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in run["epochs"]]
    return run


def test_train_writes_results_json(data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc, stdout, _ = run_cli(["train", "--method", "msbp", *base_args(data_dir, "--k", "4"),
                             "--out", str(out)], capsys)
    assert rc == 0 and "+ MSBP" in stdout
    results = json.loads(out.read_text())
    assert set(results) == {"task", "config", "runs", "environment"}
    assert results["task"] == "mnist"
    assert results["config"]["k"] == 4 and results["config"]["selection"] == "per_example"
    assert results["config"]["sparse_config"]["msbp"]["memory"] == 0.8
    (run,) = results["runs"]
    assert set(run) == RUN_KEYS and run["method"] == "msbp" and run["info_loss"] is None
    assert len(run["epochs"]) == 2 and run["best_epoch"] in (1, 2)
    best = run["epochs"][run["best_epoch"] - 1]
    assert run["test_accuracy"] == best["test_accuracy"]
    assert run["dev_accuracy"] == max(e["dev_accuracy"] for e in run["epochs"])
    assert 0.0 <= run["test_accuracy"] <= 100.0
    assert 0.0 < run["backprop_seconds"] < run["total_seconds"]
    assert {"torch", "threads", "cpu", "device"} <= set(results["environment"])
    assert results["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_compare_k_out_is_dense(data_dir, tmp_path, capsys):
    """k = out: sbp and msbp must reproduce dense exactly (same init, same data order)."""
    out, plots = tmp_path / "c.json", tmp_path / "plots"
    rc, stdout, _ = run_cli(["compare", *base_args(data_dir, "--k", str(HIDDEN)),
                             "--measure-info-loss", "--info-every", "10", "--info-window", "5",
                             "--out", str(out), "--plots", str(plots)], capsys)
    assert rc == 0
    assert "(1.00x)" in stdout and "(+0.00)" in stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["dense", "sbp", "msbp"]
    dense = without_timings(runs[0])
    for run in runs[1:]:
        same = without_timings(run)
        assert same["epochs"] == dense["epochs"] and same["test_accuracy"] == dense["test_accuracy"]
        info = run["info_loss"]
        assert set(info["layers"]) == {"hidden.0", "hidden.1"}  # the output layer stays dense
        for rows in info["layers"].values():
            assert len(rows) == 4  # 2 epochs of 20 steps: windows at steps 0, 10, 20, 30
            for r in rows:
                for key in ("cosine", "local_cosine", "upstream_cosine"):
                    assert r[key] == pytest.approx(1.0, abs=1e-6)
                assert r["local_cumulative_error"] == 0.0 and r["local_step_error"] == 0.0
                # against a separate dense pass: equal up to float32 rounding
                assert r["cumulative_error"] < 1e-5 and r["step_error"] < 1e-5
                assert r["local_mass_fraction"] == pytest.approx(1.0)
    assert runs[0]["info_loss"] is None
    if (plots / "accuracy.png").exists() or pytest.importorskip("matplotlib"):
        assert (plots / "accuracy.png").stat().st_size > 0
        assert (plots / "info_loss.png").stat().st_size > 0


def test_sparse_info_loss_in_range(data_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    rc, _, _ = run_cli(["compare", "--methods", "sbp", "msbp", *base_args(data_dir, "--k", "2"),
                        "--selection", "unified", "--measure-info-loss", "--info-every", "10",
                        "--info-window", "4", "--out", str(out)], capsys)
    assert rc == 0
    sbp, msbp = json.loads(out.read_text())["runs"]
    assert sbp["epochs"] != msbp["epochs"]  # the memory changed the training
    for run in (sbp, msbp):
        for name, rows in run["info_loss"]["layers"].items():
            assert rows, name
            for r in rows:
                assert -1.0 <= r["cosine_min"] <= r["cosine"] <= 1.0
                assert -1.0 <= r["upstream_cosine"] <= 1.0
                assert r["cumulative_error"] >= 0.0 and r["step_error"] > 0.0
                assert r["local_cumulative_error"] >= 0.0 and r["local_step_error"] > 0.0
                assert r["local_mass_fraction"] > 0.0
            if run is sbp:  # without memory, at most the arrived gradient's mass goes through
                assert all(r["local_mass_fraction"] <= 1.0 + 1e-9 for r in rows)
                # unified top-k: <dW_sparse, dW_arrived> >= 0 at every step, so the mean too
                assert all(r["local_cosine"] >= -1e-9 for r in rows)
        # the output layer is dense: what reaches hidden.1 is its true gradient
        assert all(r["upstream_cosine"] == pytest.approx(1.0, abs=1e-6)
                   for r in run["info_loss"]["layers"]["hidden.1"])
        assert set(run["info_loss"]["summary"]) == set(run["info_loss"]["layers"])


def test_measuring_info_loss_leaves_training_bit_identical(data_dir, tmp_path, capsys):
    """The measured steps' dense passes change no weight, memory, optimizer or RNG state."""
    args = ["train", "--method", "msbp", *base_args(data_dir, "--k", "3"), "--memory-layout",
            "slot", "--selection", "random", "--optimizer", "lazy_adam"]
    plain, measured = tmp_path / "plain.pt", tmp_path / "measured.pt"
    assert cli.main([*args, "--checkpoint", str(plain)]) == 0
    assert cli.main([*args, "--checkpoint", str(measured), "--measure-info-loss",
                     "--info-every", "6", "--info-window", "3"]) == 0
    capsys.readouterr()
    a, b = torch.load(plain, weights_only=False), torch.load(measured, weights_only=False)
    assert b["run"]["info_loss"]["summary"]["hidden.0"]["cosine"] is not None
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert str(a["optimizer"]) == str(b["optimizer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for sa, sb in zip(a["rng"]["selection"], b["rng"]["selection"], strict=True):
        assert torch.equal(sa, sb)


def test_resume_equals_uninterrupted(data_dir, tmp_path, capsys):
    args = ["train", "--method", "msbp", *base_args(data_dir, "--k", "3"), "--memory-layout",
            "slot", "--selection", "random"]
    a, b = _whole_and_resumed(args, tmp_path, capsys)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert a["model"]["hidden.0.memory"].abs().sum() > 0  # the memory was saved and restored
    # a checkpoint made with other options is refused
    part = tmp_path / "part.pt"
    rc, _, err = run_cli([*args, "--k", "5", "--checkpoint", str(part), "--resume"], capsys)
    assert rc == 2 and "differs in ['k']" in err


def test_train_and_compare_resume_each_others_checkpoints(data_dir, tmp_path, capsys):
    """Found by a fuzz of the command line: a checkpoint of ``msbp train --method sbp`` was
    refused by ``msbp compare --resume`` (and the other way round) as "made with other options
    (sbp; differs in ['method'])", naming a method that was the same: only ``train`` has the
    option. The method is compared on its own; both train a method alike."""
    args = [*base_args(data_dir, "--k", "3"), "--epochs", "1"]
    assert cli.main(["train", "--method", "sbp", *args, "--checkpoint",
                     str(tmp_path / "c.sbp.pt")]) == 0
    assert cli.main(["compare", "--methods", "sbp", *args, "--epochs", "2", "--checkpoint",
                     str(tmp_path / "c.pt"), "--resume", "--out", str(tmp_path / "a.json")]) == 0
    assert cli.main(["train", "--method", "sbp", *args, "--epochs", "3", "--checkpoint",
                     str(tmp_path / "c.sbp.pt"), "--resume", "--out", str(tmp_path / "b.json")
                     ]) == 0
    assert len(json.loads((tmp_path / "b.json").read_text())["runs"][0]["epochs"]) == 3
    rc, _, err = run_cli(["train", "--method", "msbp", *args, "--epochs", "3", "--checkpoint",
                          str(tmp_path / "c.sbp.pt"), "--resume"], capsys)
    assert rc == 2 and "made with other options (sbp; differs in method)" in err


@pytest.mark.parametrize("selection", ["unified", "random"])
def test_checkpoint_after_a_dense_warmup_with_a_slot_memory(data_dir, tmp_path, capsys,
                                                            selection):
    """The checkpoint's digest read the model's state dict through ``Tensor.numpy()``, which
    makes a storage unable to grow: the slot memories, empty through the dense warm-up epoch,
    could then not take their first batch ("Trying to resize storage that is not resizable").
    Found by a resume fuzz of the command line. The run also resumes exactly."""
    args = ["train", "--method", "msbp", *base_args(data_dir, "--k", "3"), "--memory-layout",
            "slot", "--selection", selection, "--dense-warmup", "1", "--batch-size", "10"]
    a, _ = _whole_and_resumed(args, tmp_path, capsys)
    assert a["model"]["hidden.0.memory"].shape[0] > 0


def _whole_and_resumed(args: list[str], tmp_path, capsys) -> tuple[dict, dict]:
    """``msbp train *args`` for its epochs, and for one epoch then ``--resume``d: both final
    checkpoints, after checking that their models and results (timings aside) are equal."""
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    assert cli.main([*args, "--checkpoint", str(whole), "--out", str(tmp_path / "w.json")]) == 0
    assert cli.main([*args, "--epochs", "1", "--checkpoint", str(part)]) == 0
    assert cli.main([*args, "--checkpoint", str(part), "--resume",
                     "--out", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    a, b = torch.load(whole, weights_only=False), torch.load(part, weights_only=False)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    run_a = json.loads((tmp_path / "w.json").read_text())["runs"][0]
    run_b = json.loads((tmp_path / "p.json").read_text())["runs"][0]
    assert without_timings(run_a) == without_timings(run_b)
    return a, b


def _flush_supported() -> bool:
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)
    return supported


@pytest.mark.skipif(not _flush_supported(), reason="this CPU cannot flush denormals")
def test_denormals_flushed_for_the_run_only(data_dir, tmp_path, capsys, monkeypatch):
    """Every method trains with denormals flushed (dense Adam slows on them, not LazyRowAdam's
    skipped rows), ``--denormals keep`` trains without; the caller's setting comes back."""
    seen = []
    real = training.train_run

    def spy(task, method, args):
        seen.append(flushing_denormals())
        return real(task, method, args)

    monkeypatch.setattr(training, "train_run", spy)
    argv = ["compare", *base_args(data_dir, "--k", "4", "--epochs", "1")]
    out = tmp_path / "r.json"
    assert not flushing_denormals()
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert seen == [True, True, True] and not flushing_denormals()
    results = json.loads(out.read_text())
    assert results["config"]["denormals"] == "flush" and results["environment"]["flush_denormal"]
    torch.set_flush_denormal(True)
    try:
        assert cli.main(["train", *base_args(data_dir, "--epochs", "1"), "--denormals", "keep",
                         "--out", str(out)]) == 0
        assert seen[3:] == [False] and flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    assert not json.loads(out.read_text())["environment"]["flush_denormal"]
    capsys.readouterr()


@pytest.mark.skipif(not _flush_supported(), reason="this CPU cannot flush denormals")
def test_denormals_reach_every_intra_op_thread():
    """torch.set_flush_denormal sets the calling thread only: intra-op threads started before
    kept slow denormals (a fused Adam step over them: 20 ms flushed on the caller, 1.3 ms on
    both), and threads started inside kept the flush after it."""
    from msbp import native
    from msbp.environment import denormals

    if not native.use_native():
        pytest.skip("the native kernels are unavailable")
    report = native.eager_ops().flush_denormal_threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ones(1 << 20).cumsum(0)  # the pool's threads exist before
        report(False)
        assert report() == [False, False]
        with denormals("flush"):
            assert report() == [True, True] and flushing_denormals()
        assert report() == [False, False] and not flushing_denormals()
        torch.set_flush_denormal(True)
        report(True)
        with denormals("keep"):
            assert report() == [False, False] and not flushing_denormals()
        assert report() == [True, True] and flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
        report(False)
        torch.set_num_threads(threads)


def test_checkpoint_resumes_only_with_its_denormals(data_dir, tmp_path, capsys):
    """A checkpoint resumes under the setting it was made with; one from before the option
    kept denormals."""
    path = tmp_path / "keep.pt"
    args = ["train", "--method", "msbp", *base_args(data_dir, "--k", "3")]
    assert cli.main([*args, "--epochs", "1", "--denormals", "keep", "--checkpoint", str(path)]) == 0
    rc, _, err = run_cli([*args, "--checkpoint", str(path), "--resume"], capsys)
    assert rc == 2 and "differs in ['denormals']" in err
    ckpt = torch.load(path, weights_only=False)
    state = {k: v for k, v in ckpt.items() if k not in ("format", "version", "sha256")}
    del state["args"]["denormals"]  # as written before the option existed
    old = tmp_path / "old.pt"
    torch.save({**ckpt, "args": state["args"], "sha256": content_digest(state)}, old)
    assert cli.main([*args, "--denormals", "keep", "--checkpoint", str(old), "--resume"]) == 0
    rc, _, err = run_cli([*args, "--checkpoint", str(old), "--resume"], capsys)
    assert rc == 2 and "differs in ['denormals']" in err


def test_eval_test_best_matches_every(data_dir, tmp_path, capsys):
    outs = {}
    for mode in ("every", "best"):
        outs[mode] = tmp_path / f"{mode}.json"
        assert cli.main(["train", "--method", "sbp", *base_args(data_dir, "--k", "4"),
                         "--eval-test", mode, "--out", str(outs[mode])]) == 0
    every, best = (json.loads(outs[m].read_text())["runs"][0] for m in ("every", "best"))
    assert best["test_accuracy"] == every["test_accuracy"]
    assert "test_accuracy" not in best["epochs"][0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--ratio", "2"], "ratio must be in (0, 1]"),
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "--resume"], "--resume needs --checkpoint"),
        (["train", "--device", "cuda"], "CUDA is not available"),
    ],
    ids=["ratio", "epochs", "resume", "cuda"],
)
def test_bad_arguments_one_line(data_dir, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    rc, _, err = run_cli([*argv, "--data-dir", str(data_dir), "--dev-size", "50"], capsys)
    assert rc == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_data_one_line(tmp_path, capsys):
    rc, _, err = run_cli(["train", "--data-dir", str(tmp_path), "--quiet"], capsys)
    assert rc == 2 and err.startswith("msbp: error: ") and err.count("\n") == 1
    assert "train-images-idx3-ubyte" in err and "pip install" in err


def test_argparse_errors_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--method", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'nope'" in err


def test_info(capsys):
    rc, out, _ = run_cli(["info"], capsys)
    assert rc == 0 and "torch" in out and "fast_paths" in out and "mnist" in out
    rc, out, _ = run_cli(["info", "--json"], capsys)
    found = json.loads(out)
    assert rc == 0 and found["fast_paths"]["cuda"] == torch.cuda.is_available()
    assert found["threads_auto"] in (1, 2)


def test_python_m_msbp():
    proc = subprocess.run([sys.executable, "-m", "msbp", "info"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "threads" in proc.stdout


def test_format_table():
    def run(method, bp, total, acc):
        return {"method": method, "backprop_seconds": bp, "total_seconds": total,
                "test_accuracy": acc, "best_epoch": 3}

    results = {"task": "mnist", "config": {"metric": "accuracy"},
               "runs": [run("dense", 67.2, 116.6, 97.86), run("sbp", 6.6, 54.5, 97.84),
                        run("msbp", 6.9, 55.4, 98.23)]}
    table = format_table(results)
    assert "| dense | 67.2 (1.00x) | 116.6 (1.00x) | 97.86 | 3 |" in table
    assert "6.6 (10.18x)" in table and "98.23 (+0.37)" in table and "97.84 (-0.02)" in table


def test_meter_windows():
    """Windows of 2 steps every 5 steps: steps 0-1, 5-6, 10-11 are measured, nothing else."""
    torch.manual_seed(0)
    from msbp import SparseBackpropConfig

    layer = SparseLinear(6, 8, config=SparseBackpropConfig(k=2, memory=0.5))
    model = torch.nn.Sequential(layer)
    meter = InfoLossMeter(model, every=5, window=2)
    calls = []
    for step in range(13):
        meter.start_step(step)
        calls.append(layer.probe is not None)
        model(torch.randn(4, 6)).square().sum().backward()
        meter.end_step(step)
    meter.close()
    assert [i for i, c in enumerate(calls) if c] == [0, 1, 5, 6, 10, 11]
    rows = meter.result()["layers"]["0"]
    assert [r["step"] for r in rows] == [0, 5, 10] and layer.probe is None


def test_dense_impl_msbp_is_dense(data_dir, tmp_path, capsys):
    """--dense-impl msbp runs dense through msbp's layers (k = out): the same training."""
    outs = {}
    for impl in ("torch", "msbp"):
        outs[impl] = tmp_path / f"{impl}.json"
        rc, _, _ = run_cli(["train", "--method", "dense", *base_args(data_dir),
                            "--dense-impl", impl, "--out", str(outs[impl])], capsys)
        assert rc == 0
    torch_run, msbp_run = (json.loads(outs[i].read_text()) for i in ("torch", "msbp"))
    assert torch_run["config"]["sparse_config"]["dense"] is None
    assert msbp_run["config"]["sparse_config"]["dense"]["k"] == 0
    a, b = without_timings(torch_run["runs"][0]), without_timings(msbp_run["runs"][0])
    for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
        assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-5)
        assert eb["dev_accuracy"] == pytest.approx(ea["dev_accuracy"], abs=2.0)


# ----------------------------------------------------------------------------- CoNLL-X treebank


def _treebank_dir(tmp_path: Path) -> dict[str, Path]:
    # training file as a Windows editor leaves it: BOM and CRLF
    return {
        "train": write_treebank(tmp_path / "xx_train.conll", TRAIN * 3, bom=True, crlf=True),
        "dev": write_treebank(tmp_path / "xx_dev.conll", DEV),
        "test": write_treebank(tmp_path / "xx_test.conll", TEST),
    }


def _parse_argv(paths: dict[str, Path], *extra: str) -> list[str]:
    return ["compare", "--task", "parse", "--train", str(paths["train"]), "--dev",
            str(paths["dev"]), "--test", str(paths["test"]), "--epochs", "2", "--batch-size",
            "16", "--hidden-size", "16", "--embedding-dim", "8", "--threads", "1", "--quiet",
            "--lr", "0.02", *extra]  # at 1e-3, 14 steps leave the parser where it started


def _is_count(score: float, tokens: int) -> bool:
    """True if ``score`` (percent) is a whole number of ``tokens``."""
    correct = score * tokens / 100.0
    return abs(correct - round(correct)) < 1e-6


def test_parse_compare_on_conllx_treebank(tmp_path, capsys):
    out = tmp_path / "parse.json"
    rc, _, err = run_cli([*_parse_argv(_treebank_dir(tmp_path)), "--out", str(out)], capsys)
    assert rc == 0, err
    results = json.loads(out.read_text())
    assert results["task"] == "parse"
    runs = results["runs"]
    assert [r["method"] for r in runs] == ["dense", "sbp", "msbp"]
    n_all, n_words = punct_counts(DEV)
    assert math.gcd(n_all, n_words) == 1  # so that equal scores could only be 0 or 100
    strictly_between = 0
    for run in runs:
        assert 0.0 <= run["test_accuracy"] <= 100.0 and len(run["epochs"]) == 2
        for row in run["epochs"]:
            for kind in ("uas", "las"):
                words, every = row[f"dev_{kind}"], row[f"dev_{kind}_all"]
                assert 0.0 <= words <= 100.0 and 0.0 <= every <= 100.0
                # the scores without punctuation count the n_words non-"Punc" tokens only
                assert _is_count(words, n_words) and _is_count(every, n_all)
                if 0.0 < words < 100.0:
                    strictly_between += 1
                    assert words != every
    assert strictly_between > 0


@pytest.mark.parametrize(
    ("split", "damage", "message"),
    [
        ("train", lambda b: b.replace(b"\tmalou\t", b"\tmalou "), "expected 10 tab-separated"),
        ("train", lambda b: b.replace("kočku".encode(), "kočku".encode("cp1250")),
         "not valid UTF-8"),
        ("dev", lambda b: b.replace(b"\t2\tATR\t", b"\tx\tATR\t", 1), "HEAD 'x' is not an integer"),
    ],
    ids=["columns", "encoding", "head"],
)
def test_malformed_conllx_one_line(tmp_path, capsys, split, damage, message):
    paths = _treebank_dir(tmp_path)
    good = paths[split].read_bytes()
    bad = damage(good)
    assert bad != good
    # the first line that differs is the one the error must name
    line = next(i for i, (a, b) in enumerate(
        zip(good.splitlines(), bad.splitlines(), strict=True), start=1) if a != b)
    paths[split].write_bytes(bad)
    rc, _, err = run_cli(_parse_argv(paths), capsys)
    assert rc == 2 and err.startswith("msbp: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{paths[split].name}:{line}: " in err and message in err


def test_task_specific_defaults():
    """Parsing defaults to unified top-k and 10,000 transitions; MNIST to per-example, batch 10."""
    from msbp.cli import parse_args

    parse = parse_args(["compare", "--task", "parse"])
    mnist = parse_args(["compare", "--task", "mnist"])
    assert (parse.selection, parse.batch_size) == ("unified", 10_000)
    assert (mnist.selection, mnist.batch_size) == ("per_example", 10)
    assert parse_args(["train", "--task", "parse", "--selection", "per_example"]).selection == (
        "per_example")


def test_the_task_argparse_reads_gets_its_options(capsys):
    """Found by a fuzz of the command line: the options were those of the task named by the first
    exact ``--task``, while argparse trains the one it reads, an abbreviation (``--tas parse``) or
    the last of two ``--task``; ``msbp train --tas parse`` trained the parser with MNIST's options
    (its own flags refused, ``--dev-size`` taken and ignored), exit 0."""
    from msbp.cli import parse_args

    args = parse_args(["train", "--tas", "parse", "--hidden-size", "8"])
    assert (args.task, args.hidden_size) == ("parse", 8) and not hasattr(args, "dev_size")
    args = parse_args(["train", "--task", "parse", "--task", "mnist", "--hidden", "4"])
    assert (args.task, args.hidden) == ("mnist", 4) and not hasattr(args, "hidden_size")
    with pytest.raises(SystemExit) as exc:  # --ta: --task or parse's --tag-column
        parse_args(["train", "--ta", "parse"])
    assert exc.value.code == 2 and "ambiguous option: --ta" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parse_args(["compare", "--tas", "pos", "--help"])
    assert exc.value.code == 0 and "--word-dim" in capsys.readouterr().out


def test_ctrl_c_before_training_is_one_line(monkeypatch, capsys):
    """Found by a fuzz of the command line: Ctrl-C while the options were read (which imports
    the training loop) gave a traceback; now "msbp: interrupted" and status 130."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    rc, out, err = run_cli(["train", "--quiet"], capsys)
    assert rc == 130 and err == "msbp: interrupted\n" and out == ""


@pytest.mark.parametrize(
    ("free", "processes", "want"),
    [(2.0, 1, 2), (1.4, 1, 1), (0.2, 1, 1), (None, 1, 2), (2.0, 2, 1), (7.6, 1, 2)],
)
def test_auto_threads_leaves_busy_cores_alone(monkeypatch, free, processes, want):
    """``--threads auto``: 2, fewer where other jobs keep cores busy (OpenMP threads waiting
    for a held core slowed a dense step ~40x), each process's share under torchrun."""
    from msbp import environment

    monkeypatch.setattr(environment.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(environment, "free_cores", lambda window=0.3: free)
    monkeypatch.setattr(environment, "cpu_quota", lambda: None)
    assert environment.auto_threads(2, processes) == want


@pytest.mark.parametrize(
    ("files", "quota", "threads"),
    [
        ({"cpu.max": "max 100000\n"}, None, 2),
        ({"cpu.max": "150000 100000\n"}, 1.5, 1),
        ({"cpu.max": "400000 100000\n"}, 4.0, 2),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 2),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0, 1),
        ({}, None, 2),
    ],
)
def test_auto_threads_keeps_within_a_container_cpu_limit(monkeypatch, tmp_path, files, quota,
                                                        threads):
    """A container's CPU limit (cgroup v2 or v1) caps ``--threads auto`` like a busy core."""
    from msbp import environment

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert environment.cpu_quota(str(tmp_path)) == quota
    real = environment.cpu_quota
    monkeypatch.setattr(environment, "cpu_quota", lambda: real(str(tmp_path)))
    monkeypatch.setattr(environment.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3},
                        raising=False)
    monkeypatch.setattr(environment, "free_cores", lambda window=0.3: 4.0)
    assert environment.auto_threads(2) == threads


def test_free_cores_reads_this_machine():
    """On Linux, /proc/stat gives a count within [0, the cores this process may use]."""
    from msbp.environment import free_cores

    if not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"):
        pytest.skip("no /proc/stat here")
    free = free_cores(0.05)
    assert free is not None and 0 <= free <= len(os.sched_getaffinity(0)) + 1e-9


def test_threads_auto_is_recorded_as_a_number(data_dir, tmp_path):
    """The results JSON records the thread count ``auto`` chose, not the word."""
    out = tmp_path / "r.json"
    rc = cli.main(["train", "--data-dir", str(data_dir), "--dev-size", "50", "--hidden", "16",
                   "--epochs", "1", "--limit-train", "60", "--quiet", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["config"]["threads"] in (1, 2)
    assert results["environment"]["threads"] == results["config"]["threads"]
