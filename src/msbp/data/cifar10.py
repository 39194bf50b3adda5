"""CIFAR-10 from a tar.gz of JPEGs (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).

The archive is read in place (never extracted to disk) and every image is decoded once with
Pillow; the decoded uint8 arrays are cached as one ``.npz`` under ``$MSBP_CACHE_DIR`` (default
``~/.cache/msbp``), keyed by the archive's path, size and modification time, so later runs load
in about a second. Labels follow the sorted class folder names, which for CIFAR-10 is the
canonical label order (airplane = 0, ..., truck = 9).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from msbp.data.errors import DataError

ARCHIVE_NAME = "cifar10-jpg.tar.gz"
SIZE = 32  # CIFAR-10 images are 32 x 32 RGB
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_ENV = "MSBP_CACHE_DIR"
CACHE_VERSION = 1  # bump when the cached arrays change meaning


@dataclass
class Cifar10Arrays:
    """The decoded archive: images (n, 3, 32, 32) uint8, labels (n,) int64, per split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    source: str


def cache_dir() -> Path:
    """``$MSBP_CACHE_DIR`` or ``~/.cache/msbp`` (``$XDG_CACHE_HOME`` honoured)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msbp"
    )
    return Path(root)


def cache_path(archive: Path) -> Path:
    """The cache file of ``archive``: its resolved path, size and mtime name the decoded copy,
    so a replaced or touched archive is decoded afresh."""
    st = archive.stat()
    key = f"v{CACHE_VERSION}:{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "cifar10" / f"{archive.stem.split('.')[0]}-{digest}.npz"


def _progress(total: int | None, desc: str, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
                mininterval=0.5)


def _split_of(name: str) -> tuple[str, str, str] | None:
    """(split, class, file) of a member ``[prefix/]split/class/file.jpg``, else None."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) < 3 or parts[-3] not in SPLITS:
        return None
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    return parts[-3], parts[-2], parts[-1]


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (SIZE, SIZE):
                raise DataError(f"{where}: a {img.size[0]}x{img.size[1]} image, CIFAR-10 "
                                f"images are {SIZE}x{SIZE}")
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (32, 32, 3)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{where}: not a readable image ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return arr


def decode_archive(archive: str | os.PathLike[str], quiet: bool = False) -> Cifar10Arrays:
    """Decode every image of ``archive`` (no cache). Raises ``DataError`` (one line) when the
    archive is missing, not a tar.gz, truncated, holds an unreadable image, or lacks a split."""
    path = Path(archive)
    if not path.is_file():
        raise DataError(f"no CIFAR-10 archive at {path}; pass --data-dir DIR holding "
                        f"{ARCHIVE_NAME} (train/<class>/*.jpg and test/<class>/*.jpg)")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError('decoding the CIFAR-10 JPEGs needs Pillow: pip install "msbp[cifar10]"'
                        ) from None
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in SPLITS}
    bar = _progress(None, f"decoding {path.name} (once; cached)", quiet)
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streamed: one pass over the gzip
            for member in tar:
                if not member.isfile():
                    continue
                where = _split_of(member.name)
                if where is None:
                    continue
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                arr = _decode(data, f"{path}: {member.name}")
                found[where[0]].append((where[1], where[2], arr))
                if bar is not None:
                    bar.update(1)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable tar.gz of CIFAR-10 JPEGs ({reason}); "
                        "replace it with an intact copy") from None
    finally:
        if bar is not None:
            bar.close()
    classes = sorted({c for c, _, _ in found["train"]})
    for split in SPLITS:
        if not found[split]:
            raise DataError(f"{path}: no images under {split}/<class>/ in the archive; "
                            "expected train/<class>/*.jpg and test/<class>/*.jpg")
    test_classes = sorted({c for c, _, _ in found["test"]})
    if not set(test_classes) <= set(classes):
        extra = sorted(set(test_classes) - set(classes))
        raise DataError(f"{path}: test classes {extra} have no training images")
    label = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in SPLITS:
        items = sorted(found[split], key=lambda t: (label[t[0]], t[1]))
        images = np.stack([a for _, _, a in items]).transpose(0, 3, 1, 2)  # (n, 3, 32, 32)
        out[f"{split}_images"] = torch.from_numpy(np.ascontiguousarray(images))
        out[f"{split}_labels"] = torch.tensor([label[c] for c, _, _ in items], dtype=torch.int64)
    return Cifar10Arrays(**out, classes=classes, source=str(path))


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None, *, archive: str | None = None,
    quiet: bool = False, use_cache: bool = True,
) -> Cifar10Arrays:
    """The decoded CIFAR-10 archive ``data_dir/cifar10-jpg.tar.gz`` (or the file ``archive``),
    from the cache when the archive is unchanged, else decoded once and cached.

    ``data_dir`` may also name the archive file itself. A cache that cannot be written is
    skipped (the data are decoded every run); a damaged cache file is decoded afresh.
    """
    if archive is None:
        if data_dir is None:
            raise DataError(f"no CIFAR-10 folder given; pass --data-dir DIR holding {ARCHIVE_NAME}")
        d = Path(data_dir)
        archive_path = d if d.is_file() else d / ARCHIVE_NAME
    else:
        archive_path = Path(archive)
    if not archive_path.is_file():
        raise DataError(f"no CIFAR-10 archive at {archive_path}; pass --data-dir DIR holding "
                        f"{ARCHIVE_NAME} (train/<class>/*.jpg and test/<class>/*.jpg)")
    cached = cache_path(archive_path) if use_cache else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return Cifar10Arrays(
                    train_images=torch.from_numpy(z["train_images"]),
                    train_labels=torch.from_numpy(z["train_labels"]),
                    test_images=torch.from_numpy(z["test_images"]),
                    test_labels=torch.from_numpy(z["test_labels"]),
                    classes=[str(c) for c in z["classes"]],
                    source=str(archive_path),
                )
        except (OSError, KeyError, ValueError, zlib.error, EOFError):
            pass  # a damaged cache: decode again and overwrite it
    data = decode_archive(archive_path, quiet=quiet)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp.npz")
            np.savez(
                tmp, train_images=data.train_images.numpy(),
                train_labels=data.train_labels.numpy(), test_images=data.test_images.numpy(),
                test_labels=data.test_labels.numpy(), classes=np.array(data.classes),
            )
            os.replace(tmp, cached)  # readers never see half a file
        except OSError:
            pass  # no writable cache: still usable, decoded each run
    return data
