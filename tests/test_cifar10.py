"""The CIFAR-10 task: the JPEG archive reader and its cache, label order, the augmentation, one
training step through the CLI, and one-line errors for a missing or malformed archive."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from msbp import cli
from msbp.data import cifar10 as cifar_data
from msbp.data.errors import DataError

pytest.importorskip("PIL")

# unsorted on purpose: labels must follow the sorted folder names
CLASSES = {"zebra": (250, 20, 20), "apple": (20, 250, 20), "mango": (20, 20, 250)}
N_TRAIN, N_TEST = 6, 2


def _jpeg(color: tuple[int, int, int], size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archive(folder: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A tiny CIFAR-10-like tar.gz: solid-colour JPEGs per class, under a ``cifar/`` prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / cifar_data.ARCHIVE_NAME
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("test", N_TEST), ("train", N_TRAIN)):
            for cls, color in CLASSES.items():
                for i in range(n):
                    _add(tar, f"cifar/{split}/{cls}/{i:04d}.jpg", _jpeg(color))
        _add(tar, "cifar/README.txt", b"not an image, ignored")
        for name, data in (extra or {}).items():
            _add(tar, name, data)
    return path


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    # not $MSBP_CACHE_DIR: it also holds the native build, which would then be rebuilt
    monkeypatch.setattr(cifar_data, "cache_dir", lambda: tmp_path / "cache")


@pytest.fixture
def archive_dir(tmp_path) -> Path:
    write_archive(tmp_path / "data")
    return tmp_path / "data"


def test_decode_label_order_and_cache(archive_dir, monkeypatch):
    data = cifar_data.load_cifar10(archive_dir, quiet=True)
    assert data.classes == sorted(CLASSES)
    assert data.train_images.shape == (3 * N_TRAIN, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (3 * N_TEST, 3, 32, 32)
    for images, labels in ((data.train_images, data.train_labels),
                           (data.test_images, data.test_labels)):
        for image, label in zip(images, labels, strict=True):
            colour = torch.tensor(CLASSES[data.classes[int(label)]], dtype=torch.float32)
            assert (image.float().mean((1, 2)) - colour).abs().max() < 8  # JPEG is lossy
    cached = cifar_data.cache_path(archive_dir / cifar_data.ARCHIVE_NAME)
    assert cached.is_file()

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(cifar_data, "decode_archive", no_decode)
    again = cifar_data.load_cifar10(archive_dir, quiet=True)
    assert torch.equal(again.train_images, data.train_images)
    assert torch.equal(again.test_labels, data.test_labels)
    assert again.classes == data.classes


def test_damaged_cache_is_decoded_again(archive_dir):
    cached = cifar_data.cache_path(archive_dir / cifar_data.ARCHIVE_NAME)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"garbage")
    data = cifar_data.load_cifar10(archive_dir, quiet=True)
    assert data.train_images.shape[0] == 3 * N_TRAIN


@pytest.mark.parametrize("what", ["missing", "garbage", "truncated", "bad_jpeg", "no_test",
                                  "wrong_size"])
def test_bad_archive_is_one_line(tmp_path, what):
    folder = tmp_path / "bad"
    folder.mkdir()
    path = folder / cifar_data.ARCHIVE_NAME
    if what == "garbage":
        path.write_bytes(b"this is not a tar.gz" * 10)
    elif what == "truncated":
        whole = write_archive(tmp_path / "whole").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif what == "bad_jpeg":
        write_archive(folder, {"cifar/train/apple/9999.jpg": b"\xff\xd8 not really"})
    elif what == "wrong_size":
        write_archive(folder, {"cifar/train/apple/9999.jpg": _jpeg((0, 0, 0), size=40)})
    elif what == "no_test":
        with tarfile.open(path, "w:gz") as tar:
            _add(tar, "train/apple/0.jpg", _jpeg((1, 2, 3)))
    with pytest.raises(DataError) as err:
        cifar_data.load_cifar10(folder, quiet=True)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message


def test_augment_crops_and_flips_within_the_padded_image():
    from msbp.tasks.cifar10 import PAD, augment

    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int32).view(2, 3, 32, 32) % 251
    images = images.to(torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    for i in range(2):  # every output is one window of the padded image, maybe mirrored
        found = any(
            torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1))
            for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)
            for w in [padded[i, :, dy : dy + 32, dx : dx + 32]]
        )
        assert found


def _argv(data_dir: Path, *extra: str, command: str = "train") -> list[str]:
    return [command, "--task", "cifar10", "--data-dir", str(data_dir), "--dev-size", "3",
            "--width", "4", "--epochs", "1", "--threads", "1", "--quiet", *extra]


def test_cli_trains_one_step(archive_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(_argv(archive_dir, "--method", "msbp", "--ratio", "0.5", "--out", str(out)))
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    run = doc["runs"][0]
    assert doc["task"] == "cifar10" and run["method"] == "msbp"
    assert run["epochs"][0]["steps"] == 1  # 15 training images, batch 64
    assert 0 <= run["test_accuracy"] <= 100
    assert doc["config"]["selection"] == "unified"
    assert doc["config"]["sparse_config"]["msbp"]["memory"] == 0.8


def test_first_conv_and_head_stay_dense(archive_dir):
    import msbp
    from msbp.nn import SparseConv2d
    from msbp.tasks.cifar10 import Cifar10Task

    args = cli.build_parser("cifar10").parse_args(_argv(archive_dir))
    task = Cifar10Task(args)
    config = msbp.SparseBackpropConfig(ratio=0.1, selection="unified")
    model = msbp.sparsify(task.build_model(), config, exclude=task.sparse_exclude())
    sparse = sorted(n for n, m in model.named_modules() if isinstance(m, SparseConv2d))
    assert sparse == ["block1.0", "block2.0", "block3.0"]
    assert type(model.head) is torch.nn.Linear


@pytest.mark.parametrize("what", ["missing", "garbage"])
def test_cli_bad_archive_exits_2_with_one_line(tmp_path, capsys, what):
    folder = tmp_path / "d"
    folder.mkdir()
    if what == "garbage":
        (folder / cifar_data.ARCHIVE_NAME).write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    rc = cli.main(_argv(folder))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("msbp: error: ") and "cifar10" in err


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, {}),
        ("", {}),
        ("block1=0.5", {"block1": 0.5}),
        (" block1 = 0.5 , block3=dense,block2=1", {"block1": 0.5, "block3": None, "block2": 1.0}),
    ],
)
def test_parse_layer_ratios(text, expected):
    from msbp.tasks.cifar10 import parse_layer_ratios

    assert parse_layer_ratios(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("block1", "not LAYER=RATIO"),
        ("block1=", "not LAYER=RATIO"),
        ("block1=0.5,", "not LAYER=RATIO"),
        ("block4=0.5", "unknown layer 'block4'"),
        ("block1=0.5,block1=0.1", "block1 is given twice"),
        ("block1=0", "block1=0: the ratio must be"),
        ("block1=1.5", "block1=1.5: the ratio must be"),
        ("block1=nan", "block1=nan: the ratio must be"),
        ("block1=half", "block1=half: the ratio must be"),
    ],
)
def test_parse_layer_ratios_rejects(text, message):
    from msbp.tasks.base import UsageError
    from msbp.tasks.cifar10 import parse_layer_ratios

    with pytest.raises(UsageError, match="--layer-ratios: .*" + message.replace("(", r"\(")):
        parse_layer_ratios(text)


def test_layer_ratios_reach_the_layers(archive_dir):
    import msbp
    from msbp.nn import SparseConv2d
    from msbp.tasks.cifar10 import Cifar10Task

    # width 4: block1 has 8 output channels, block2 and block3 16
    args = cli.build_parser("cifar10").parse_args(
        _argv(archive_dir, "--layer-ratios", "block1=0.5,block3=dense"))
    task = Cifar10Task(args)
    config = msbp.SparseBackpropConfig(ratio=0.25, selection="unified", memory=0.8)
    model = msbp.sparsify(task.build_model(), config_fn=task.sparse_config_fn(config),
                          exclude=task.sparse_exclude())
    assert isinstance(model.block1[0], SparseConv2d) and model.block1[0].k == 4
    assert model.block1[0].config == config.replace(ratio=0.5)
    assert isinstance(model.block2[0], SparseConv2d) and model.block2[0].k == 4
    assert model.block2[0].config == config
    assert type(model.block3[0]) is torch.nn.Conv2d
    assert type(model.stem[0]) is torch.nn.Conv2d and type(model.head) is torch.nn.Linear
    # without the option: no config_fn, every block gets the one config
    plain = Cifar10Task(cli.build_parser("cifar10").parse_args(_argv(archive_dir)))
    assert plain.sparse_config_fn(config) is None


@pytest.mark.parametrize(
    "value, message",
    [
        ("block1=2", "--layer-ratios: block1=2: the ratio must be a number in (0, 1] or 'dense'"),
        ("stem=0.5", "--layer-ratios names stem, which stay dense unless --sparse-layers all"),
        # found by a fuzz of the command line: every sparse layer left dense ended, after the
        # dense run of compare, in sparsify's ValueError traceback ("matched no layer")
        ("block1=dense,block2=dense,block3=dense",
         "--layer-ratios block1=dense,block2=dense,block3=dense: every sparse layer is left dense "
         "(block1, block2, block3), so sbp and msbp would train no sparse layer; leave one "
         "sparse, or train --method dense"),
    ],
)
def test_cli_bad_layer_ratios_exit_2(archive_dir, capsys, value, message, monkeypatch):
    monkeypatch.setattr("msbp.train.train_run", lambda *a, **k: pytest.fail("training started"))
    rc = cli.main(_argv(archive_dir, "--layer-ratios", value, command="compare"))
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"msbp: error: {message}\n"


def test_measure_info_loss_without_a_sparse_linear_layer_exit_2(archive_dir, tmp_path, capsys,
                                                                 monkeypatch):
    """Found by a fuzz of the command line: ``--measure-info-loss`` was silently ignored where
    no sparse layer is a linear or LSTM one (cifar10's convolutions): exit 0, ``info_loss``
    null. Refused before training; the head, sparse with ``--sparse-layers all``, is measured."""
    rc = cli.main(_argv(archive_dir, "--measure-info-loss", command="compare"))
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        "msbp: error: --measure-info-loss measures sparse linear and LSTM layers; this model's "
        "sparse layers are convolutions (only the head, with --sparse-layers all, would be "
        "measured)\n")
    out = tmp_path / "r.json"
    assert cli.main(_argv(archive_dir, "--measure-info-loss", "--sparse-layers", "all",
                          "--info-every", "1", "--info-window", "1", "--out", str(out))) == 0
    assert list(json.loads(out.read_text())["runs"][0]["info_loss"]["layers"]) == ["head"]
    # a task that does not say so: the training loop refuses, naming the task and method
    from msbp.tasks.cifar10 import Cifar10Task

    monkeypatch.setattr(Cifar10Task, "check_args", staticmethod(lambda args: None))
    rc = cli.main(_argv(archive_dir, "--measure-info-loss", "--selection", "unified"))
    assert rc == 2 and capsys.readouterr().err.endswith(
        "--measure-info-loss measures sparse linear and LSTM layers; the cifar10 model has none "
        "under msbp\n")


def test_dense_warmup_trains_as_dense(archive_dir, tmp_path, capsys):
    """--dense-warmup 1: msbp's first epoch is dense backprop, step for step (the same losses
    as the dense run of the same process); without it the losses differ."""

    def losses(*extra: str) -> list[float]:
        out = tmp_path / "r.json"
        rc = cli.main(_argv(archive_dir, "--methods", "dense", "msbp", "--ratio", "0.25",
                            "--batch-size", "4", "--epochs", "2", "--out", str(out), *extra,
                            command="compare"))
        assert rc == 0, capsys.readouterr().err
        runs = json.loads(out.read_text())["runs"]
        return [[e["train_loss"] for e in r["epochs"]] for r in runs]

    (dense, warm) = losses("--dense-warmup", "1")
    assert warm[0] == dense[0]  # 4 steps of 4 images: the updates after step 1 matter
    assert warm[1] != dense[1]  # then sparse
    (dense, cold) = losses()
    assert cold[0] != dense[0]
    capsys.readouterr()
    assert cli.main(_argv(archive_dir, "--dense-warmup", "-1")) == 2
    assert capsys.readouterr().err == "msbp: error: --dense-warmup must be >= 0, got -1\n"


def test_random_selection_seeds_every_sparse_convolution(archive_dir, tmp_path, capsys):
    """--selection random: each sparse convolution draws from a generator of its own, saved in the
    checkpoint (not the global RNG), and a resumed run ends where the uninterrupted one does."""
    ckpt, out = tmp_path / "c.pt", tmp_path / "r.json"
    common = ("--method", "msbp", "--selection", "random", "--ratio", "0.5", "--batch-size", "4")
    assert cli.main(_argv(archive_dir, *common, "--epochs", "2", "--out", str(out))) == 0
    def scores() -> list[list]:  # what training computed, not how long it took
        epochs = json.loads(out.read_text())["runs"][0]["epochs"]
        return [[e[k] for k in sorted(e) if "second" not in k] for e in epochs]

    whole = scores()
    assert cli.main(_argv(archive_dir, *common, "--checkpoint", str(ckpt))) == 0
    states = torch.load(ckpt, weights_only=False)["rng"]["selection"]
    assert len(states) == 3 and all(s is not None for s in states)  # block1-3
    assert cli.main(_argv(archive_dir, *common, "--epochs", "2", "--checkpoint", str(ckpt),
                          "--resume", "--out", str(out))) == 0, capsys.readouterr().err
    assert scores() == whole
