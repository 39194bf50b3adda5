"""What the CLI does with bad input: option values, unwritable paths, damaged or foreign
checkpoints, data that changed under a checkpoint, an empty test set, a diverging run.

Every failure is one line on stderr and a non-zero exit status (2, or 3 for divergence), found
before training wherever it can be; ``no_training`` makes the test fail if training starts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conllx_fixtures import DEV, TEST, TRAIN, write_treebank
from mnist_fixtures import synthetic_mnist, write_mnist_dir

from msbp import cli
from msbp.tasks.mnist import MnistTask

HIDDEN = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_mnist_dir(tmp_path_factory.mktemp("mnist"), synthetic_mnist(250, 60))


@pytest.fixture(scope="module")
def treebank(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("treebank")
    return {
        "train": write_treebank(folder / "xx_train.conll", TRAIN * 3),
        "dev": write_treebank(folder / "xx_dev.conll", DEV),
        "test": write_treebank(folder / "xx_test.conll", TEST),
    }


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run starts: the error must come before any training."""

    def train_run(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("msbp.train.train_run", train_run)


def mnist_argv(data_dir: Path, *extra: str, command: str = "train") -> list[str]:
    return [command, "--data-dir", str(data_dir), "--dev-size", "50", "--hidden", str(HIDDEN),
            "--epochs", "1", "--threads", "1", "--quiet", *extra]


def tb_argv(task: str, paths: dict[str, Path], *extra: str, command: str = "train") -> list[str]:
    return [command, "--task", task, "--train", str(paths["train"]), "--dev", str(paths["dev"]),
            "--test", str(paths["test"]), "--epochs", "1", "--batch-size", "16",
            "--hidden-size", "16", "--threads", "1", "--quiet", *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc: int, err: str, status: int = 2) -> None:
    assert rc == status, err
    assert err.startswith("msbp: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        ("mnist", ["--hidden", "0"], "--hidden must be >= 1, got 0"),
        ("mnist", ["--layers", "0"], "--layers must be >= 1, got 0"),
        ("mnist", ["--dev-size", "0"], "--dev-size must be >= 1, got 0"),
        ("mnist", ["--lr", "nan"], "--lr must be finite and > 0, got nan"),
        ("mnist", ["--lr", "inf"], "--lr must be finite and > 0, got inf"),
        ("mnist", ["--seed", str(10**20)], f"--seed must be in [0, {2**63 - 1}], got {10**20}"),
        ("mnist", ["--seed", "-1"], "--seed must be in [0,"),
        ("mnist", ["--optimizer", "sgd", "--momentum", "-0.5"], "--momentum must be >= 0, got -0."),
        ("mnist", ["--momentum", "nan"], "--momentum must be finite and >= 0, got nan"),
        ("mnist", ["--limit-train", "-5"], "got -5; leave out --limit-train to use all"),
        ("mnist", ["--limit-train", "0"], "got 0; leave out --limit-train to use all"),
        ("mnist", ["--threads", "0"], "--threads must be in [1, 1024], got 0"),
        # found by a fuzz of the command line: torch.set_num_threads overflowed (a traceback)
        ("mnist", ["--threads", "99999999999"], "--threads must be in [1, 1024], got 99999999999"),
        ("parse", ["--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
        ("parse", ["--embedding-dim", "0"], "--embedding-dim must be >= 1, got 0"),
        ("parse", ["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
        ("parse", ["--limit-train", "-5"], "--limit-train must be >= 1, got -5; leave out"),
        ("parse", ["--limit-train", "0"], "--limit-train must be >= 1, got 0; leave out"),
        ("parse", ["--limit-eval", "-99"], "--limit-eval must be >= 1, got -99; leave out"),
        ("pos", ["--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
        ("pos", ["--word-dim", "0"], "--word-dim must be >= 1, got 0"),
        ("pos", ["--suffix-dim", "-1"], "--suffix-dim must be >= 1, got -1"),
        ("pos", ["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
        ("pos", ["--bucket", "0"], "--bucket must be >= 1, got 0"),
        ("pos", ["--limit-train", "0"], "--limit-train must be >= 1, got 0; leave out"),
        ("pos", ["--limit-eval", "-99"], "--limit-eval must be >= 1, got -99; leave out"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else (v if v in ("mnist", "parse", "pos")
                                                            else ""),
)
def test_bad_option_value_one_line(
    data_dir, treebank, no_training, capsys, task, extra, message
):
    if task == "mnist":
        argv = mnist_argv(data_dir, *extra)
    else:
        argv = tb_argv(task, treebank, *extra)
    rc, _, err = run_cli(argv, capsys)
    assert_one_line(rc, err)
    assert message in err


# ----------------------------------------------------------------------------- output paths


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def test_threads_other_than_a_number_or_auto(data_dir, no_training, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(mnist_argv(data_dir, "--threads", "two"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "--threads: expected a whole number or 'auto', got 'two'" in err


@pytest.mark.parametrize(
    ("command", "option", "where", "message"),
    [
        ("train", "--out", "under_file", "a_file is not a directory"),
        ("train", "--out", "directory", "is a directory; give a file path"),
        ("train", "--checkpoint", "under_file", "a_file is not a directory"),
        ("train", "--checkpoint", "directory", "is a directory; give a file path"),
        ("compare", "--checkpoint", "under_file", "a_file is not a directory"),
        ("compare", "--plots", "under_file", "a_file is not a directory"),
        ("compare", "--plots", "file", "is not a directory"),
    ],
)
def test_unwritable_path_before_training(
    data_dir, tmp_path, a_file, no_training, capsys, command, option, where, message
):
    path = {"under_file": a_file / "sub" / "x.json", "file": a_file, "directory": tmp_path}[where]
    rc, _, err = run_cli(mnist_argv(data_dir, option, str(path), command=command), capsys)
    assert_one_line(rc, err)
    assert f"{option} {path}: " in err and message in err


def test_compare_checkpoint_of_one_method_is_a_directory(data_dir, tmp_path, no_training, capsys):
    """compare writes ``ck.sbp.pt`` for ``--checkpoint ck.pt``: that name is checked too."""
    (tmp_path / "ck.sbp.pt").mkdir()
    rc, _, err = run_cli(
        mnist_argv(data_dir, "--checkpoint", str(tmp_path / "ck.pt"), command="compare"), capsys
    )
    assert_one_line(rc, err)
    assert "ck.sbp.pt is a directory" in err


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("train", ["--out", "{d}/same", "--checkpoint", "{d}/same"],
         "--checkpoint {d}/same: {d}/same is also written by --out"),
        # the checkpoint is written through PATH.tmp, then renamed over PATH
        ("train", ["--out", "{d}/ck.pt.tmp", "--checkpoint", "{d}/ck.pt"],
         "{d}/ck.pt.tmp is also written by --out"),
        ("compare", ["--out", "{d}/ck.sbp.pt", "--checkpoint", "{d}/ck.pt"],
         "{d}/ck.sbp.pt is also written by --out"),
        ("compare", ["--out", "{d}/r.json", "--plots", "{d}/r.json"],
         "--plots {d}/r.json: is also a file written by --out"),
        ("compare", ["--checkpoint", "{d}/ck.pt", "--plots", "{d}/ck.msbp.pt"],
         "--plots {d}/ck.msbp.pt: is also a file written by --checkpoint"),
    ],
)
def test_one_path_for_two_outputs(data_dir, tmp_path, no_training, capsys, command, extra,
                                  message):
    """Found by a fuzz of the command line: ``--out`` equal to ``--checkpoint`` replaced the
    checkpoint with the results JSON at the end (exit 0; the next ``--resume`` failed), and
    ``--plots`` naming a file written by ``--out`` or ``--checkpoint`` ended in a traceback after
    training. Both are refused before any training."""
    argv = [a.format(d=tmp_path) for a in extra]
    rc, _, err = run_cli(mnist_argv(data_dir, *argv, command=command), capsys)
    assert_one_line(rc, err)
    assert message.format(d=tmp_path) in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_directory(data_dir, tmp_path, no_training, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        rc, _, err = run_cli(mnist_argv(data_dir, "--out", str(folder / "r.json")), capsys)
    finally:
        folder.chmod(0o700)
    assert_one_line(rc, err)
    assert "--out" in err and "cannot be written" in err


def test_read_only_file_system(data_dir, tmp_path, no_training, monkeypatch, capsys):
    """Permission bits can say yes where creating a file fails (a read-only mount; any path for
    root): the check creates a file."""

    def mkstemp(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    rc, _, err = run_cli(mnist_argv(data_dir, "--out", str(tmp_path / "new" / "r.json")), capsys)
    assert_one_line(rc, err)
    assert f"cannot be written in {tmp_path} ({os.strerror(errno.EROFS)})" in err


def test_writable_new_folders_are_made(data_dir, tmp_path, capsys):
    out, ckpt = tmp_path / "a" / "b" / "r.json", tmp_path / "c" / "ck.pt"
    rc, _, err = run_cli(mnist_argv(data_dir, "--out", str(out), "--checkpoint", str(ckpt)),
                         capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["runs"] and ckpt.is_file()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ck.pt", "r.json"]


@pytest.mark.parametrize("command", [["info"], None])
def test_backend_name_not_known(data_dir, no_training, monkeypatch, capsys, command):
    """Found by a fuzz of the command line: ``MSBP_BACKEND=bogus`` ended ``msbp info`` and every
    run in a traceback; now one line naming the variable, status 2."""
    from msbp import native

    monkeypatch.setenv("MSBP_BACKEND", "bogus")
    monkeypatch.setitem(native._state, "backend", None)  # read from the environment again
    rc, _, err = run_cli(command or mnist_argv(data_dir), capsys)
    assert_one_line(rc, err)
    assert "MSBP_BACKEND='bogus': expected one of ('auto', 'native', 'python')" in err


def test_native_backend_without_a_compiler(data_dir, tmp_path):
    """Found by a fuzz of the command line: ``MSBP_BACKEND=native`` where the kernels cannot be
    built ended in a traceback with the compiler's output; now one line, status 2."""
    env = {**os.environ, "MSBP_CACHE_DIR": str(tmp_path / "cache"), "CXX": "/nonexistent/c++",
           "MSBP_BACKEND": "native"}
    out = subprocess.run([sys.executable, "-m", "msbp", *mnist_argv(data_dir)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1] == (
        "msbp: error: MSBP_BACKEND=native, but the native kernels could not be built (`msbp "
        "info` says why); set MSBP_BACKEND=auto or python for the PyTorch path")


def test_out_of_memory_is_one_line(data_dir, monkeypatch, capsys):
    """Found by a fuzz of the command line: ``--hidden 1000000000`` ended in the CPU allocator's
    RuntimeError traceback; an allocation that fails is one line, status 4 (simulated here: a
    real one may not fail at once where memory is overcommitted). Other errors still raise."""
    def alloc_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 3136000000000 bytes.")

    monkeypatch.setattr("msbp.train.train_run", alloc_fails)
    rc, _, err = run_cli(mnist_argv(data_dir), capsys)
    assert_one_line(rc, err, status=4)
    assert "out of memory ([enforce fail" in err and "try smaller sizes" in err
    monkeypatch.setattr("msbp.train.train_run", lambda *a, **k: torch.empty(-1))
    with pytest.raises(RuntimeError, match="negative dimension"):
        cli.main(mnist_argv(data_dir))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(data_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    assert cli.main(mnist_argv(data_dir, "--checkpoint", str(path))) == 0
    return path


def flip_weight_byte(raw: bytes, weight: torch.Tensor) -> bytes:
    """``raw`` with one byte flipped in the middle of ``weight``'s stored bytes."""
    data = weight.contiguous().numpy().tobytes()
    start = raw.find(data)
    assert start > 0 and raw.find(data, start + 1) == -1
    pos = start + len(data) // 2
    return raw[:pos] + bytes([raw[pos] ^ 0x10]) + raw[pos + 1 :]


def damage(kind: str, good: Path, path: Path) -> None:
    raw = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "foreign":
        torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)
    elif kind == "flipped":
        weight = torch.load(good, weights_only=True)["model"]["hidden.0.weight"]
        path.write_bytes(flip_weight_byte(raw, weight))
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "foreign", "flipped"])
def test_damaged_checkpoint_one_line(data_dir, good_checkpoint, tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    damage(kind, good_checkpoint, path)
    rc, _, err = run_cli(mnist_argv(data_dir, "--epochs", "2", "--checkpoint", str(path),
                                    "--resume"), capsys)
    assert_one_line(rc, err)
    assert f"{path}: " in err and "start afresh without --resume" in err
    if kind == "flipped":
        assert "damaged checkpoint (its SHA-256 does not match" in err


def test_flipped_byte_loads_but_is_caught(good_checkpoint, tmp_path):
    """The flip lands in the weights: torch.load alone would not notice."""
    path = tmp_path / "flipped.pt"
    damage("flipped", good_checkpoint, path)
    a = torch.load(good_checkpoint, weights_only=True)
    b = torch.load(path, weights_only=True)
    assert not torch.equal(a["model"]["hidden.0.weight"], b["model"]["hidden.0.weight"])
    assert a["sha256"] == b["sha256"]


def test_resume_without_checkpoint(data_dir, tmp_path, no_training, capsys):
    path = tmp_path / "nothing.pt"
    rc, _, err = run_cli(mnist_argv(data_dir, "--checkpoint", str(path), "--resume"), capsys)
    assert_one_line(rc, err)
    assert f"--resume: no checkpoint at {path}" in err
    rc, _, err = run_cli(mnist_argv(data_dir, "--checkpoint", str(path), "--resume",
                                    command="compare"), capsys)
    assert_one_line(rc, err)
    assert "nothing.dense.pt or " in err and "nothing.msbp.pt" in err


def test_resume_with_fewer_epochs_than_done(data_dir, tmp_path, capsys, monkeypatch):
    """Found by a fuzz of the command line: ``--resume`` with ``--epochs`` below the epochs the
    checkpoint had trained exited 0 with results of more epochs than asked (and the JSON's
    ``config`` saying the fewer). Refused, with the checkpoint left as it was (compare: before
    any method trains)."""
    ckpt = tmp_path / "ck.pt"
    assert cli.main(mnist_argv(data_dir, "--epochs", "2", "--checkpoint", str(ckpt))) == 0
    assert cli.main(mnist_argv(data_dir, "--methods", "msbp", "--epochs", "2", "--checkpoint",
                               str(tmp_path / "c.pt"), command="compare")) == 0
    capsys.readouterr()
    saved = ckpt.read_bytes()
    rc, _, err = run_cli(mnist_argv(data_dir, "--checkpoint", str(ckpt), "--resume",
                                    "--out", str(tmp_path / "r.json")), capsys)
    assert_one_line(rc, err)
    assert f"checkpoint {ckpt} has trained 2 epochs, more than --epochs 1" in err
    assert ckpt.read_bytes() == saved and not (tmp_path / "r.json").exists()
    monkeypatch.setattr("msbp.train.train_run", lambda *a, **k: pytest.fail("training started"))
    rc, _, err = run_cli(mnist_argv(data_dir, "--checkpoint", str(tmp_path / "c.pt"), "--resume",
                                    command="compare"), capsys)
    assert_one_line(rc, err)
    assert "c.msbp.pt has trained 2 epochs, more than --epochs 1" in err


def test_compare_checks_every_checkpoint_before_training(
    data_dir, good_checkpoint, tmp_path, capsys, monkeypatch
):
    """A damaged checkpoint of the last method is reported before the first method trains."""
    ckpt = tmp_path / "ck.pt"
    assert cli.main(mnist_argv(data_dir, "--checkpoint", str(ckpt), command="compare")) == 0
    damage("flipped", tmp_path / "ck.msbp.pt", tmp_path / "ck.msbp.pt")
    capsys.readouterr()

    def train_run(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("msbp.train.train_run", train_run)
    rc, _, err = run_cli(mnist_argv(data_dir, "--epochs", "2", "--checkpoint", str(ckpt),
                                    "--resume", command="compare"), capsys)
    assert_one_line(rc, err)
    assert "ck.msbp.pt: damaged checkpoint" in err


def test_checkpoint_of_other_mnist_data_is_refused(good_checkpoint, tmp_path, capsys):
    """Same --data-dir, other images: the data fingerprint differs."""
    other = write_mnist_dir(tmp_path / "mnist", synthetic_mnist(250, 60, seed=1))
    path = tmp_path / "ck.pt"
    assert cli.main(mnist_argv(other, "--checkpoint", str(path))) == 0
    shutil.rmtree(other)
    write_mnist_dir(other, synthetic_mnist(250, 60, seed=2))
    capsys.readouterr()
    rc, _, err = run_cli(mnist_argv(other, "--epochs", "2", "--checkpoint", str(path),
                                    "--resume"), capsys)
    assert_one_line(rc, err)
    assert f"checkpoint {path} was made on other data (its dev, test, train differ" in err


def test_checkpoint_of_other_parser_vocabulary_is_refused(tmp_path, capsys):
    """The training treebank changed at the same path: one word renamed, so the vocabulary has
    as many words as before and the saved embeddings would load with shifted ids."""
    paths = {
        "train": write_treebank(tmp_path / "xx_train.conll", TRAIN * 3),
        "dev": write_treebank(tmp_path / "xx_dev.conll", DEV),
        "test": write_treebank(tmp_path / "xx_test.conll", TEST),
    }
    path = tmp_path / "parse.pt"
    argv = tb_argv("parse", paths, "--embedding-dim", "8", "--checkpoint", str(path))
    assert cli.main(argv) == 0
    renamed = [s.replace("Myš/", "Zzz/").replace("myš/", "zzz/") for s in TRAIN]
    assert renamed != TRAIN
    write_treebank(paths["train"], renamed * 3)
    capsys.readouterr()
    rc, _, err = run_cli([*argv, "--epochs", "2", "--resume"], capsys)
    assert_one_line(rc, err)
    assert "was made on other data (its train, vocabulary differ" in err


def test_checkpoint_records_checksum_and_data(good_checkpoint):
    from msbp.tasks.base import content_digest

    ckpt = torch.load(good_checkpoint, weights_only=True)
    assert ckpt["format"] == "msbp-checkpoint" and ckpt["version"] == 2
    state = {k: v for k, v in ckpt.items() if k not in ("format", "version", "sha256")}
    assert ckpt["sha256"] == content_digest(state)
    assert set(ckpt["data"]) == {"train", "dev", "test"}


def test_content_digest():
    from msbp.tasks.base import content_digest

    a = {"w": torch.arange(6.0).reshape(2, 3), "n": [1, 2.5, None, "x", (True,)]}
    same = {"w": torch.arange(6.0).reshape(2, 3), "n": [1, 2.5, None, "x", (True,)]}
    assert content_digest(a) == content_digest(same)
    for change in (
        {"w": torch.arange(6.0).reshape(3, 2)},  # shape
        {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3)},  # dtype
        {"w": torch.arange(6.0).reshape(2, 3).add(1e-7)},  # value
        {"n": [1, 2.5, None, "x", [True]]},  # container kind
        {"n": [1.0, 2.5, None, "x", (True,)]},  # 1 vs 1.0
    ):
        assert content_digest({**a, **change}) != content_digest(a), change
    # non-contiguous and 0-d tensors hash by their values
    t = torch.arange(6.0).reshape(2, 3)
    assert content_digest(t.t()) == content_digest(t.t().contiguous())
    assert content_digest(torch.tensor(1.5)) != content_digest(torch.tensor(2.5))


# ----------------------------------------------------------------------------- data


def test_idx_test_set_without_images(tmp_path, no_training, capsys):
    arrays = synthetic_mnist(250, 0)
    folder = write_mnist_dir(tmp_path / "mnist", arrays)
    rc, _, err = run_cli(mnist_argv(folder), capsys)
    assert_one_line(rc, err)
    assert "t10k-images-idx3-ubyte: 0 images" in err and "test split" in err


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("method", ["dense", "sbp", "msbp"])
def test_diverging_run_exits_3(data_dir, tmp_path, capsys, method):
    out = tmp_path / "r.json"
    rc, stdout, err = run_cli(mnist_argv(data_dir, "--method", method, "--lr", "1e30",
                                         "--out", str(out)), capsys)
    assert_one_line(rc, err, status=3)
    assert f"{method} diverged at epoch 1, step " in err
    assert "the loss is nan" in err and "try a lower --lr (now 1e+30)" in err
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize(("every", "window"), [(3, "1-3"), (1000, "1-20")])
def test_divergence_found_between_checks(data_dir, monkeypatch, capsys, every, window):
    """On a GPU the loss sum is read every CHECK_EVERY steps and at the epoch's end (here after
    20 steps): the report names the window."""
    monkeypatch.setattr("msbp.train._reads_loss_each_step", lambda device: False)
    monkeypatch.setattr("msbp.train.CHECK_EVERY", every)
    rc, _, err = run_cli(mnist_argv(data_dir, "--method", "dense", "--lr", "1e30"), capsys)
    assert_one_line(rc, err, status=3)
    assert f"dense diverged at epoch 1, steps {window}: the loss became non-finite" in err


class _InfiniteGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss, an overflowing backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_nonfinite_gradient_in_sparse_layer_exits_3(data_dir, monkeypatch, capsys):
    """The loss is finite, the backward is not: the sparse layer's FloatingPointError becomes the
    same one-line divergence report."""

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(_InfiniteGrad.apply(model(x)), y)

    monkeypatch.setattr(MnistTask, "loss", loss)
    rc, _, err = run_cli(mnist_argv(data_dir, "--method", "sbp"), capsys)
    assert_one_line(rc, err, status=3)
    assert "sbp diverged at epoch 1, step 1: non-finite output gradient in layer 'hidden.1'" in err


def test_diverged_compare_keeps_finished_runs(data_dir, tmp_path, monkeypatch, capsys):
    """compare stops at the diverging method; the results of the methods before it stay."""
    real_loss = MnistTask.loss

    def loss(self, model, batch):
        value = real_loss(self, model, batch)
        sparse = any(type(m).__name__ == "SparseLinear" for m in model.modules())
        return value * float("nan") if sparse else value

    monkeypatch.setattr(MnistTask, "loss", loss)
    out = tmp_path / "c.json"
    rc, _, err = run_cli(mnist_argv(data_dir, "--out", str(out), command="compare"), capsys)
    assert_one_line(rc, err, status=3)
    assert "sbp diverged at epoch 1, step 1: the loss is nan" in err
    assert [r["method"] for r in json.loads(out.read_text())["runs"]] == ["dense"]


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"]])
def test_closed_stdout_ends_quietly(argv):
    """`msbp info | head -3`: the reader goes away before msbp writes; before, a
    BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "msbp", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err
