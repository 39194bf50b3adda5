"""Tiny MNIST-format data sets written as IDX files, for the loader and CLI tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from msbp.data.mnist import IMAGES_MAGIC, LABELS_MAGIC


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding of a uint8 array: big-endian magic, dimensions, raw bytes."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, kind: str, gz: bool = False) -> Path:
    data = idx_bytes(array, IMAGES_MAGIC if kind == "images" else LABELS_MAGIC)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def synthetic_mnist(n_train: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable 28x28 digits: a fixed random pattern per class plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28)) < 0.3

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        noise = rng.integers(0, 80, (n, 28, 28))
        images = np.clip(templates[labels] * 175 + noise, 0, 255).astype(np.uint8)
        return images, labels

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return {"train_images": train_x, "train_labels": train_y,
            "test_images": test_x, "test_labels": test_y}


def write_mnist_dir(
    folder: Path, arrays: dict[str, np.ndarray], gz: bool = False, dotted: bool = False
) -> Path:
    """Write the four files under their standard names (or the dot spelling), maybe gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {
        "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
    }
    for key, stem in names.items():
        name = stem.replace("-idx", ".idx", 1) if dotted else stem
        kind = "images" if key.endswith("images") else "labels"
        write_idx(folder / (name + (".gz" if gz else "")), arrays[key], kind, gz)
    return folder
