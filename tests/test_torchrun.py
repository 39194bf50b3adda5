"""``torchrun --nproc-per-node N -m msbp train|compare``: real launches with gloo on localhost.

A launch costs seconds (torch is imported by the launcher and by every process), so the default
run makes one (MNIST, 2 processes) and checks everything it can from it; resumption, the parse
task and a resume with another number of processes are behind ``-m slow``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conllx_fixtures import DEV, TEST, TRAIN, write_treebank
from mnist_fixtures import synthetic_mnist, write_mnist_dir

import msbp
from msbp import cli
from msbp.tasks.base import shard_bounds, split_batch
from msbp.tasks.mnist import MnistTask
from msbp.tasks.parse import ParseTask

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2
LOCAL_BATCH = 5
TRAIN_ROWS = 103  # after the dev split: 10 global batches of 10 and a last one of 3 (1 + 2)
STEPS = -(-TRAIN_ROWS // (WORLD * LOCAL_BATCH))
TIMING_KEYS = {"backprop_seconds", "total_seconds"}


def torchrun(world: int, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node world -m msbp argv`` in ``cwd``."""
    src = str(Path(msbp.__file__).resolve().parents[1])  # this tree's msbp in every process
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
         "-m", "msbp", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def failure(done: subprocess.CompletedProcess) -> str:
    """What a failed launch said: the workers' own errors come first, torchrun's summary last."""
    err = done.stderr
    return err if len(err) <= 6000 else f"{err[:3000]}\n...\n{err[-3000:]}"


def without_timings(run: dict) -> dict:
    run = {k: v for k, v in run.items() if k not in TIMING_KEYS}
    run["epochs"] = [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in run["epochs"]]
    return run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    arrays = synthetic_mnist(TRAIN_ROWS + 30, 40)
    return write_mnist_dir(tmp_path_factory.mktemp("mnist"), arrays, gz=True)


def mnist_argv(data_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--dev-size", "30", "--hidden", "16", "--k", "4",
            "--threads", "1", *extra]


@pytest.fixture(scope="module")
def launch(data_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-process ``compare`` of dense and msbp, one epoch, with checkpoints and plots."""
    argv = ["compare", "--methods", "dense", "msbp",
            *mnist_argv(data_dir, "--epochs", "1", "--batch-size", str(LOCAL_BATCH)),
            "--checkpoint", "ck.pt", "--out", "a.json", "--plots", "plots"]
    for _ in range(2):
        work = tmp_path_factory.mktemp("launch")
        done = torchrun(WORLD, argv, work)
        # on a loaded machine a gloo process now and then dies of SIGABRT ("terminate called
        # without an active exception"; tests/test_optim_distributed.py's workers too, without
        # msbp's loop): one retry in a fresh folder, any other failure fails at once
        if done.returncode == 0 or "exitcode: -6" not in done.stderr:
            break
    assert done.returncode == 0, failure(done)
    return work, done


# -- one launch ----------------------------------------------------------------------------------


def test_launch_trains_and_rank0_alone_reports(launch):
    work, done = launch
    results = json.loads((work / "a.json").read_text())
    assert results["environment"]["world_size"] == WORLD
    assert "rank 0" in results["environment"]["timing"]
    assert results["config"]["batch_size"] == LOCAL_BATCH  # per process, as given
    assert [r["method"] for r in results["runs"]] == ["dense", "msbp"]
    for run in results["runs"]:
        (epoch,) = run["epochs"]
        assert epoch["steps"] == STEPS  # global batches, the last one shared 1 + 2
        assert run["test_accuracy"] is not None and run["backprop_seconds"] > 0
    # rank 0 alone prints: one table, one line per epoch, one "results:" line
    assert done.stdout.count("| mnist |") == 1
    assert done.stderr.count("dense epoch 1/1:") == done.stderr.count("msbp epoch 1/1:") == 1
    assert done.stderr.count("results: a.json") == 1
    assert sorted(p.name for p in work.iterdir()) == ["a.json", "ck.dense.pt", "ck.msbp.pt",
                                                     "plots"]
    assert any((work / "plots").iterdir())


def test_checkpoint_holds_every_rank_memory(launch):
    work, _ = launch
    ckpt = torch.load(work / "ck.msbp.pt", weights_only=True)
    assert ckpt["world_size"] == WORLD
    memories = ckpt["memories"]
    assert len(memories) == WORLD and len(ckpt["rank_rng"]) == WORLD
    assert set(memories[0]) == {"hidden.0.memory", "hidden.1.memory"}
    for key in memories[0]:  # each process remembered what its own part of the batch left out
        assert memories[0][key].abs().sum() > 0 and memories[1][key].abs().sum() > 0
        assert not torch.equal(memories[0][key], memories[1][key]), key
    assert torch.equal(ckpt["model"]["hidden.0.memory"], memories[0]["hidden.0.memory"])
    dense = torch.load(work / "ck.dense.pt", weights_only=True)
    assert dense["world_size"] == WORLD and dense["memories"] == [{}, {}]


def test_two_processes_equal_one_process_on_the_double_batch(launch, data_dir, tmp_path, capsys):
    """Dense on 2 x 5 rows per step is the 1-process run on 10 rows, up to float32 rounding
    (DDP averages two gradients where one process sums ten rows); the uneven last batch too."""
    work, _ = launch
    one = tmp_path / "one.pt"
    argv = ["train", "--method", "dense",
            *mnist_argv(data_dir, "--epochs", "1", "--batch-size", str(WORLD * LOCAL_BATCH)),
            "--checkpoint", str(one), "--quiet"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    a = torch.load(one, weights_only=True)
    b = torch.load(work / "ck.dense.pt", weights_only=True)
    assert a["world_size"] == 1 and a["step"] == b["step"] == STEPS
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    row_a, row_b = a["run"]["epochs"][0], b["run"]["epochs"][0]
    assert row_b["train_loss"] == pytest.approx(row_a["train_loss"], rel=1e-6)
    assert row_b["dev_loss"] == pytest.approx(row_a["dev_loss"], rel=1e-5)


def test_resume_with_another_number_of_processes_one_line(launch, data_dir, tmp_path, capsys):
    work, _ = launch
    for name in ("ck.dense.pt", "ck.msbp.pt"):
        shutil.copy(work / name, tmp_path / name)
    argv = ["compare", "--methods", "dense", "msbp",
            *mnist_argv(data_dir, "--epochs", "2", "--batch-size", str(LOCAL_BATCH)),
            "--checkpoint", str(tmp_path / "ck.pt"), "--resume"]
    rc = cli.main(argv)
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and "written by 2 process(es), this run has 1" in err
    assert "torchrun --nproc-per-node 2" in err


# -- sharding, in one process --------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_batch_disjoint_covering_weighted(rows, world):
    x, y = torch.arange(rows * 2).reshape(rows, 2), torch.arange(rows)
    parts = [split_batch({"x": x, "pair": (y, [y]), "scale": torch.tensor(2.0)}, r, world)
             for r in range(world)]
    if rows < world:
        assert parts == [None] * world  # some process would get no row: all skip the batch
        return
    got = torch.cat([p["x"] for p, _ in parts])
    assert torch.equal(got, x)  # contiguous parts, in rank order, disjoint and covering
    for part, _ in parts:
        assert torch.equal(part["pair"][0], part["pair"][1][0])
        assert torch.equal(part["x"][:, 0] // 2, part["pair"][0])
        assert part["scale"].item() == 2.0
    sizes = [p["x"].shape[0] for p, _ in parts]
    assert max(sizes) - min(sizes) <= 1
    weights = [w for _, w in parts]
    if rows % world == 0:
        assert weights == [1.0] * world
    # sum_r weight_r * mean_r / world = the whole batch's mean, for any row values
    values = torch.rand(rows, dtype=torch.float64)
    mean = sum(w * values[slice(*shard_bounds(rows, r, world))].mean()
               for r, w in enumerate(weights)) / world
    assert mean.item() == pytest.approx(values.mean().item(), rel=1e-12)


def test_split_batch_errors():
    with pytest.raises(ValueError, match=r"\[2, 3\] rows"):
        split_batch((torch.zeros(3, 1), torch.zeros(2)), 0, 2)
    with pytest.raises(TypeError, match="override Task.shard_batch"):
        split_batch((torch.zeros(3), "words"), 0, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_bounds(4, 2, 2)


def _epoch_rows(task, world: int, epoch: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """The example ids each rank trains on in one epoch (the labels were made ids)."""
    order = torch.Generator().manual_seed(seed)
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for batch in task.train_batches(epoch, order):
        for rank in range(world):
            part = task.shard_batch(batch, rank, world)
            per_rank[rank].append(part[0][1] if part is not None else None)
    return per_rank


def _check_shards(task, n: int, world: int) -> None:
    per_rank = _epoch_rows(task, world, 0)
    assert len({len(steps) for steps in per_rank}) == 1  # the same number of steps
    skipped = [i for i, part in enumerate(per_rank[0]) if part is None]
    assert all(per_rank[r][i] is None for r in range(world) for i in skipped)
    ids = torch.cat([p for steps in per_rank for p in steps if p is not None])
    assert ids.numel() == ids.unique().numel()  # disjoint
    assert ids.numel() >= n - (world - 1) and set(ids.tolist()) <= set(range(n))
    if n % task.batch_size >= world or n % task.batch_size == 0:
        assert sorted(ids.tolist()) == list(range(n))  # covering
    again = _epoch_rows(task, world, 0)  # deterministic: the same parts from the same seed
    for steps, steps_again in zip(per_rank, again, strict=True):
        for part, part_again in zip(steps, steps_again, strict=True):
            assert part is part_again is None or torch.equal(part, part_again)


@pytest.mark.parametrize("world", [2, 3])
def test_mnist_shards(data_dir, world):
    args = argparse.Namespace(data_dir=str(data_dir), dev_size=30, limit_train=None, hidden=4,
                              layers=1, batch_size=LOCAL_BATCH * world)
    task = MnistTask(args)
    task.data.train_labels = torch.arange(TRAIN_ROWS)  # a batch's labels name its examples
    _check_shards(task, TRAIN_ROWS, world)


@pytest.mark.parametrize("world", [2, 3])
def test_parse_shards(tmp_path, world):
    paths = {split: write_treebank(tmp_path / f"{split}.conll", sents)
             for split, sents in (("train", TRAIN * 3), ("dev", DEV), ("test", TEST))}
    args = argparse.Namespace(**{f"{s}_path": str(p) for s, p in paths.items()},
                              hidden_size=8, embedding_dim=4, batch_size=7 * world, quiet=True)
    task = ParseTask(args)
    n = len(task.targets)
    task.targets = torch.arange(n)
    _check_shards(task, n, world)


# -- more launches (slow) ------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_under_torchrun_equals_uninterrupted(launch, data_dir, tmp_path):
    work, _ = launch
    for name in ("ck.dense.pt", "ck.msbp.pt"):
        shutil.copy(work / name, tmp_path / name)
    base = ["compare", "--methods", "dense", "msbp",
            *mnist_argv(data_dir, "--epochs", "2", "--batch-size", str(LOCAL_BATCH)), "--quiet"]
    resumed = torchrun(WORLD, [*base, "--checkpoint", "ck.pt", "--resume", "--out", "r.json"],
                       tmp_path)
    assert resumed.returncode == 0, failure(resumed)
    whole = torchrun(WORLD, [*base, "--checkpoint", "w.pt", "--out", "w.json"], tmp_path)
    assert whole.returncode == 0, failure(whole)
    runs_r = json.loads((tmp_path / "r.json").read_text())["runs"]
    runs_w = json.loads((tmp_path / "w.json").read_text())["runs"]
    assert [without_timings(r) for r in runs_r] == [without_timings(r) for r in runs_w]
    for method in ("dense", "msbp"):
        a = torch.load(tmp_path / f"ck.{method}.pt", weights_only=True)
        b = torch.load(tmp_path / f"w.{method}.pt", weights_only=True)
        assert a["epoch"] == b["epoch"] == 2
        for key, value in b["model"].items():
            assert torch.equal(a["model"][key], value), (method, key)
        for rank in range(WORLD):
            for key, value in b["memories"][rank].items():
                assert torch.equal(a["memories"][rank][key], value), (method, rank, key)
        assert str(a["optimizer"]) == str(b["optimizer"])


@pytest.mark.slow
def test_resume_under_torchrun_with_three_processes_refused(launch, data_dir, tmp_path):
    work, _ = launch
    shutil.copy(work / "ck.msbp.pt", tmp_path / "ck.msbp.pt")
    argv = ["compare", "--methods", "msbp",
            *mnist_argv(data_dir, "--epochs", "2", "--batch-size", str(LOCAL_BATCH)),
            "--checkpoint", "ck.pt", "--resume"]
    done = torchrun(3, argv, tmp_path)
    assert done.returncode != 0  # torchrun reports its workers' failure with status 1
    assert done.stderr.count("msbp: error: checkpoint") == 1  # rank 0 alone says why
    assert "written by 2 process(es), this run has 3" in done.stderr


@pytest.mark.slow
def test_parse_under_torchrun(tmp_path):
    paths = {split: write_treebank(tmp_path / f"{split}.conll", sents)
             for split, sents in (("train", TRAIN * 3), ("dev", DEV), ("test", TEST))}
    argv = ["--task", "parse", "--train", str(paths["train"]), "--dev", str(paths["dev"]),
            "--test", str(paths["test"]), "--hidden-size", "16", "--embedding-dim", "8",
            "--k", "4", "--epochs", "2", "--threads", "1"]
    done = torchrun(WORLD, ["train", "--method", "msbp", *argv, "--batch-size", "8",
                            "--checkpoint", "p.pt", "--out", "p.json"], tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stderr.count("parse: ") == 1  # the data summary, from rank 0 only
    results = json.loads((tmp_path / "p.json").read_text())
    assert results["environment"]["world_size"] == WORLD
    (run,) = results["runs"]
    assert len(run["epochs"]) == 2 and run["test_accuracy"] is not None
    # dense on 2 x 8 transitions per step equals one process on 16
    dense = torchrun(WORLD, ["train", "--method", "dense", *argv, "--batch-size", "8",
                             "--checkpoint", "d2.pt", "--quiet"], tmp_path)
    assert dense.returncode == 0, failure(dense)
    assert cli.main(["train", "--method", "dense", *argv, "--batch-size", "16",
                     "--checkpoint", str(tmp_path / "d1.pt"), "--quiet"]) == 0
    a = torch.load(tmp_path / "d1.pt", weights_only=True)
    b = torch.load(tmp_path / "d2.pt", weights_only=True)
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_consensus_under_torchrun_equals_one_process(data_dir, tmp_path, capsys):
    """``--consensus`` (unified top-k, shared unit memory, row-sparse exchange): MSBP on 2 x 5
    rows per step is the 1-process MSBP run on 10 rows, up to float32 rounding. The split here
    is even in every batch (100 rows), where the shared memory's add-back is exact."""
    even = write_mnist_dir(tmp_path / "even", synthetic_mnist(130, 40), gz=True)
    common = ["--method", "msbp", "--selection", "unified", "--optimizer", "adam",
              *mnist_argv(even, "--epochs", "1")]
    done = torchrun(WORLD, ["train", *common, "--consensus", "--batch-size", str(LOCAL_BATCH),
                            "--checkpoint", "two.pt", "--quiet"], tmp_path)
    assert done.returncode == 0, failure(done)
    assert cli.main(["train", *common, "--consensus", "--batch-size", str(WORLD * LOCAL_BATCH),
                     "--checkpoint", str(tmp_path / "one.pt"), "--quiet"]) == 0
    capsys.readouterr()
    a = torch.load(tmp_path / "one.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-5, msg=key)
    for memory in b["memories"]:  # shared: every process holds the one-process memory
        torch.testing.assert_close(memory["hidden.0.memory"], a["model"]["hidden.0.memory"],
                                   rtol=1e-5, atol=1e-6)
