"""CIFAR-10 from ``cifar-10-python.tar.gz``, ``cifar-10-batches-py`` or a folder holding either."""

from __future__ import annotations

import io
import os
import pickle
import secrets
import shutil
import tarfile
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mimir.data.format import DatasetSpec
from mimir.errors import DatasetError
from mimir.data.sources.folders import require_dir

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")


class _NumpyUnpickler(pickle.Unpickler):
    """Resolves only the globals that pickled numpy arrays need, so a batch file cannot run code."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 protocol-2 pickles store bytes through it
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle(location: str, blob: bytes) -> dict:
    try:
        obj = _NumpyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # unpickling a damaged file can fail in many ways
        raise DatasetError(f"{location}: not a readable CIFAR-10 pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{location}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def cifar10_spec(source: Path) -> DatasetSpec:
    """CIFAR-10 from ``cifar-10-python.tar.gz``, ``cifar-10-batches-py`` or a folder holding either."""
    blobs = _cifar10_blobs(source)
    meta_location, meta_blob = blobs["batches.meta"]
    names = _unpickle(meta_location, meta_blob).get(b"label_names")
    if not (isinstance(names, list) and names and all(isinstance(n, bytes) for n in names)):
        raise DatasetError(f"{meta_location}: expected b'label_names' as a list of byte strings")
    classes = [n.decode("utf-8") for n in names]
    train = [_cifar10_batch(*blobs[name], len(classes)) for name in _CIFAR_TRAIN]
    test = _cifar10_batch(*blobs["test_batch"], len(classes))
    return DatasetSpec.from_arrays(classes, {
        "train": (np.concatenate([images for images, _ in train]),
                  np.concatenate([labels for _, labels in train])),
        "test": test,
    })


def _cifar10_blobs(source: Path) -> dict[str, tuple[str, bytes]]:
    """Map each CIFAR-10 batch file name to (location for messages, file bytes)."""
    if source.is_file():
        return _cifar10_archive_blobs(source)
    require_dir(source)
    for folder in (source, source / "cifar-10-batches-py"):
        if (folder / "batches.meta").is_file():
            return _cifar10_folder_blobs(folder)
    archive = source / "cifar-10-python.tar.gz"
    if archive.is_file():
        return _cifar10_archive_blobs(archive)
    raise DatasetError(f"{source}: no CIFAR-10 data (expected cifar-10-python.tar.gz or the "
                       "cifar-10-batches-py folder)")


def _cifar10_folder_blobs(folder: Path) -> dict[str, tuple[str, bytes]]:
    missing = [name for name in _CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"{folder}: missing {', '.join(missing)} "
                           "(expected the cifar-10-batches-py folder)")
    return {name: (str(folder / name), (folder / name).read_bytes()) for name in _CIFAR_FILES}


def _cifar10_archive_blobs(archive: Path) -> dict[str, tuple[str, bytes]]:
    """Read the batch files straight from the tar stream instead of extracting it to disk."""
    found: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in _CIFAR_FILES:
                    found[name] = (f"{archive}[{member.name}]", tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(f"{archive}: truncated or corrupt archive ({exc})") from exc
    missing = [name for name in _CIFAR_FILES if name not in found]
    if missing:
        raise DatasetError(f"{archive}: archive lacks {', '.join(missing)} (expected cifar-10-python.tar.gz)")
    return found


def _cifar10_batch(location: str, blob: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch as HWC uint8 images (N, 32, 32, 3) and int64 labels."""
    batch = _unpickle(location, blob)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[0] > 0 and data.shape[1] == 3 * 32 * 32):
        raise DatasetError(f"{location}: expected b'data' as an (N, 3072) uint8 array")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(v, int) and 0 <= v < num_classes for v in labels)):
        raise DatasetError(f"{location}: expected b'labels' as {len(data)} ints in [0, {num_classes})")
    # Each row holds the R, G and B planes one after another (CHW); the stored format is HWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.asarray(labels, dtype=np.int64)


def download_cifar10(target: Path) -> Path:
    """Fetch the CIFAR-10 archive to ``target`` (an archive path or a folder); reuse one already there."""
    archive = target if target.name.endswith(".tar.gz") else target / "cifar-10-python.tar.gz"
    if archive.is_file():  # downloads land under a temporary name, so an existing file is complete
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f"{archive.name}.part-{secrets.token_hex(6)}")
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(partial, archive)
    except OSError as exc:  # urllib.error.URLError is an OSError
        raise DatasetError(f"{archive}: downloading {CIFAR10_URL} failed ({exc})") from exc
    finally:
        partial.unlink(missing_ok=True)
    return archive
