"""The bundled ``digits`` dataset: scikit-learn's 8x8 handwritten digits as 16x16 RGB images.

It ships with scikit-learn, so it needs no download and prepares in about a second, which
makes it the default dataset for smoke tests and quick benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mimir.data.format import MANIFEST_NAME, DatasetSpec, default_data_dir, is_prepared, write_dataset
from mimir.errors import DatasetError

DIGITS_SHAPE = (16, 16, 3)
DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_SOURCE = "sklearn.datasets.load_digits"


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": ...}`` with uint8 (N, 16, 16, 3) images and int64 labels.

    The split is fixed (stratified, 25% test, ``random_state=0``), so every call returns the same data.
    """
    # imported here: scikit-learn (and the SciPy it loads) is seconds of import in every Ray worker
    # process that reads a dataset, and only preparing the digits needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = _to_rgb16(digits.images)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def digits_spec() -> DatasetSpec:
    """The digits dataset ready for ``write_dataset``."""
    return DatasetSpec.from_arrays(DIGITS_CLASSES, digits_arrays())


def ensure_digits(cache_dir: str | Path | None = None) -> Path:
    """Return the prepared digits folder, preparing it on first use.

    The folder is ``<cache_dir>/digits``, with ``cache_dir`` defaulting to ``$MIMIR_DATA_DIR``
    or ``~/.cache/mimir/datasets``. Safe to call from several processes at once.
    """
    root = Path(cache_dir) if cache_dir is not None else default_data_dir()
    target = root / "digits"
    if is_prepared(target):
        return target
    # a cache from an earlier format (or a half-removed one) is rebuilt: it takes a second
    stale = (target / MANIFEST_NAME).is_file()
    try:
        return write_dataset(digits_spec(), target, source=DIGITS_SOURCE, overwrite=stale)
    except DatasetError:
        # Losing a race to another process is fine: its copy is identical to ours.
        if is_prepared(target):
            return target
        raise


def _to_rgb16(images: np.ndarray) -> np.ndarray:
    """Scale 0..16 values to 0..255, upsample 8x8 -> 16x16 bilinearly and replicate to RGB."""
    scaled = np.rint(images * (255.0 / 16.0)).astype(np.uint8)
    size = (DIGITS_SHAPE[1], DIGITS_SHAPE[0])  # PIL sizes are (width, height)
    upsampled = np.stack([
        np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        for image in scaled
    ])
    return np.repeat(upsampled[..., None], DIGITS_SHAPE[2], axis=-1)

