"""Generated (EDM-style) training data from an ``.npz`` with ``image`` (N, H, W, 3) uint8 and ``label``."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from mimir.data.format import DatasetSpec
from mimir.errors import DatasetError


def generated_spec(path: Path) -> DatasetSpec:
    """Generated images from an .npz with ``image`` (N, H, W, 3) uint8 and ``label`` (N,) ints."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: expected an .npz archive with arrays 'image' and 'label'")
    with archive:
        missing = [key for key in ("image", "label") if key not in archive.files]
        if missing:
            raise DatasetError(f"{path}: missing array(s) {missing}; found {sorted(archive.files)} "
                               "(expected 'image' and 'label')")
        try:
            images, labels = archive["image"], archive["label"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt array data ({exc})") from exc
    if not (images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] > 0 and images.shape[3] == 3):
        raise DatasetError(f"{path}: 'image' must be a non-empty (N, H, W, 3) uint8 array, "
                           f"got {images.dtype} {images.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) and labels.shape == (len(images),)):
        raise DatasetError(f"{path}: 'label' must be {len(images)} integers, "
                           f"got {labels.dtype} {labels.shape}")
    if labels.min() < 0:
        raise DatasetError(f"{path}: 'label' has negative values")
    classes = [str(i) for i in range(int(labels.max()) + 1)]
    return DatasetSpec.from_arrays(classes, {"train": (images, labels.astype(np.int64))})

