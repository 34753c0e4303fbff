"""Reading image-folder sources (Tiny-ImageNet, ImageNet): class folders, decoding, checks."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mimir.data.format import Row, in_stored_order
from mimir.errors import DatasetError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable text file ({exc})") from exc


def require_dir(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: not found")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder")


def folder_images(folder: Path) -> list[Path]:
    """Image files of one class folder, sorted by name so the stored order is reproducible."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing class folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{folder}: no images (.JPEG, .jpg, .jpeg or .png)")
    return images


def labelled_files(folders: Iterable[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """(file, label) for every image in the given class folders, in stored order (classes mixed).

    Only the paths are listed up front (ImageNet's 1.28 M of them take a few hundred MB); the
    images are read lazily as the rows are written."""
    return in_stored_order([(path, label) for folder, label in folders for path in folder_images(folder)])


def decoded_rows(files: Iterable[tuple[Path, int]], shape: tuple[int, int, int]) -> Iterator[Row]:
    for path, label in files:
        yield decode_rgb(path, shape).tobytes(), label


def decode_rgb(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode an image file to uint8 HWC RGB (grayscale and CMYK files are converted)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from exc
    if array.shape != shape:
        raise DatasetError(f"{path}: image is {array.shape[1]}x{array.shape[0]}, "
                           f"expected {shape[1]}x{shape[0]}")
    return array


def encoded_rows(files: Iterable[tuple[Path, int]]) -> Iterator[Row]:
    """Original file bytes, after checking that PIL can open them so bad files fail here, not in training."""
    for path, label in files:
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{path}: unreadable image ({exc})") from exc
        yield data, label
