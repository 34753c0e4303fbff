"""The prepared-dataset format: sharded Parquet folders described by a manifest.

A prepared dataset ``<out_dir>/<name>/`` holds ``<split>/part-NNNNN.parquet`` shards with
columns ``image`` (binary), ``label`` (int64) and ``index`` (int64: the row's position in its split,
a stable name for it that random augmentation and the validation hold-out are keyed on), plus
``manifest.json``, which is written
last: a folder without it is never a dataset. ``image`` is either raw uint8 HWC RGB bytes
(``"raw"`` encoding: CIFAR-10, Tiny-ImageNet, digits, generated data) or the original
JPEG/PNG file bytes (``"encoded"``: ImageNet-1K). Rows are stored in a seeded random order
(:func:`stored_order`), never class by class, so any shard, block or first N rows mixes the classes.
Every dataset is built in a hidden sibling
folder and renamed into place, so a failed run never looks complete. This module is the format
alone (writer, manifest, verification, reader); ``mimir.data.sources`` turns each source into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimir.console import Progress
from mimir.errors import DatasetError

FORMAT_VERSION = 2  # 2: the ``index`` column
MANIFEST_NAME = "manifest.json"
HASH_CHECK_BYTES = 2 << 30  # a run hashes every shard of a dataset up to this size before it starts (~1.5 s)
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])

_ROW_GROUP_ROWS = 1024  # bounds writer memory: an ImageNet shard would otherwise sit in RAM whole
_MANIFEST_KEYS = ("name", "format_version", "encoding", "image_shape", "num_classes", "classes",
                  "splits", "source")

Row = tuple[bytes, int]
T = TypeVar("T")
ROW_ORDER_SEED = 0  # stored row i of a split of n rows is source row stored_order(n)[i]
# a line every 5 % of a split, for conversions that take long enough to wonder (ImageNet: hours)
PROGRESS_PERCENT, PROGRESS_AFTER_SECONDS = 5, 30.0


@dataclass(frozen=True)


class DatasetSpec:
    """What a converter hands to the writer: metadata plus lazily produced rows per split."""

    encoding: str  # "raw" or "encoded"
    image_shape: tuple[int, int, int] | None  # (H, W, C) for raw images, None for encoded
    classes: list[str]  # index = label
    splits: dict[str, Iterable[Row]]
    sizes: dict[str, int]  # rows per split, known before the rows are read (for progress lines)

    @classmethod
    def from_arrays(cls, classes: Sequence[str],
                    splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> DatasetSpec:
        """Raw-encoded spec from uint8 (N, H, W, C) image arrays and integer label arrays, rows in
        stored order."""
        first_images = next(iter(splits.values()))[0]
        shape = tuple(int(d) for d in first_images.shape[1:])
        rows = {}
        for split, (images, labels) in splits.items():
            order = stored_order(len(labels))
            rows[split] = array_rows(images[order], np.asarray(labels)[order])
        return cls("raw", shape, list(classes), rows, {split: len(labels) for split, (_, labels) in splits.items()})


def stored_order(num_rows: int, seed: int = ROW_ORDER_SEED) -> np.ndarray:
    """The permutation a split of ``num_rows`` source rows is stored in (the same on every run)."""
    return np.random.default_rng(seed).permutation(num_rows)


def in_stored_order(items: Sequence[T]) -> list[T]:
    """``items`` (a source's rows, or the files they come from) permuted by :func:`stored_order`."""
    return [items[i] for i in stored_order(len(items))]


def default_data_dir() -> Path:
    """Folder for prepared datasets: ``$MIMIR_DATA_DIR`` or ``~/.cache/mimir/datasets``."""
    env = os.environ.get("MIMIR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimir" / "datasets"


def write_dataset(spec: DatasetSpec, dataset_dir: str | Path, *, source: str,
                  overwrite: bool = False, rows_per_shard: int = 10_000) -> Path:
    """Write ``spec`` as a prepared dataset at ``dataset_dir`` (atomically); return the folder."""
    dataset_dir = Path(dataset_dir)
    check_target(dataset_dir, overwrite)
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = dataset_dir.with_name(f".{dataset_dir.name}.partial-{secrets.token_hex(6)}")
    partial.mkdir()
    try:
        splits = {split: _write_split(partial, split, _checked_rows(spec, split, rows, source), rows_per_shard,
                                      Progress(f"[prepare] {dataset_dir.name} {split}", spec.sizes[split], "images",
                                               percent=PROGRESS_PERCENT, after_seconds=PROGRESS_AFTER_SECONDS))
                  for split, rows in spec.splits.items()}
        empty = [split for split, info in splits.items() if info["num_rows"] == 0]
        if empty:
            raise DatasetError(f"{source}: no images for split(s) {', '.join(empty)}")
        manifest = {
            "name": dataset_dir.name,
            "format_version": FORMAT_VERSION,
            "encoding": spec.encoding,
            "image_shape": list(spec.image_shape) if spec.image_shape is not None else None,
            "num_classes": len(spec.classes),
            "classes": list(spec.classes),
            "splits": splits,
            "source": source,
            "row_order": {"shuffled": True, "seed": ROW_ORDER_SEED},
        }
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _install(partial, dataset_dir, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dataset_dir


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a prepared dataset."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"{dataset_dir}: not a prepared dataset (no manifest.json)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc})") from exc
    problem = _manifest_problem(manifest)
    if problem:
        raise DatasetError(f"{path}: invalid manifest: {problem}")
    return manifest


def verify_dataset(dataset_dir: str | Path, hashes: bool | None = None) -> None:
    """Check every shard the manifest lists, naming the first damaged one in a DatasetError: that it
    exists, has the size recorded at write time (where the manifest records sizes) and a
    readable Parquet footer with its rows; with ``hashes``, also its SHA-256 (about 1.4 GB/s on one
    core: a few milliseconds for digits, ~100 s for an ImageNet-1k folder of ~140 GB). ``hashes=None``
    hashes datasets up to HASH_CHECK_BYTES, the cheap checks only above (``mimir data verify`` then
    hashes every shard)."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    if hashes is None:
        shards = [dataset_dir / rel for info in manifest["splits"].values() for rel in info["files"]]
        hashes = sum(path.stat().st_size for path in shards if path.is_file()) <= HASH_CHECK_BYTES
    for split, info in manifest["splits"].items():
        rows = 0
        for rel in info["files"]:
            path = dataset_dir / rel
            if not path.is_file():
                raise DatasetError(f"{path}: missing shard (the manifest lists it)")
            size, recorded = path.stat().st_size, info.get("bytes", {}).get(rel)
            if recorded is not None and size != recorded:
                what = "truncated" if size < recorded else "longer than written"
                raise DatasetError(f"{path}: damaged shard, {what}: {size} bytes where {recorded} were written; "
                                   "prepare the dataset again (`mimir data prepare ... --overwrite`)")
            if hashes and _sha256(path) != info["sha256"][rel]:
                raise DatasetError(f"{path}: damaged shard, altered since it was written (SHA-256 differs from "
                                   "the manifest's); prepare the dataset again")
            try:
                rows += pq.read_metadata(path).num_rows
            except (OSError, pa.ArrowException) as err:
                raise DatasetError(f"{path}: damaged shard, not readable as Parquet ({err})") from err
        if rows != info["num_rows"]:
            raise DatasetError(f"{dataset_dir}: split {split!r} has {rows} rows, "
                               f"manifest says {info['num_rows']}")

def read_split_arrays(dataset_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, C) uint8 and labels (N,) int64 of a raw-encoded split, in stored order."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    if manifest["encoding"] != "raw":
        raise DatasetError(f"{dataset_dir}: images are stored encoded; "
                           "only raw datasets can be read as arrays")
    if split not in manifest["splits"]:
        raise DatasetError(f"{dataset_dir}: no split {split!r} (has {', '.join(manifest['splits'])})")
    shape = tuple(manifest["image_shape"])
    paths = [dataset_dir / rel for rel in manifest["splits"][split]["files"]]
    table = pa.concat_tables([pq.read_table(path, columns=["image", "label"]) for path in paths])
    blobs = table.column("image").to_pylist()
    size = int(np.prod(shape))
    bad = next((i for i, blob in enumerate(blobs) if len(blob) != size), None)
    if bad is not None:
        raise DatasetError(f"{dataset_dir}: split {split!r} row {bad} has {len(blobs[bad])} image bytes, "
                           f"expected {size} for shape {list(shape)}")
    # bytearray so callers get a writable array
    images = np.frombuffer(bytearray(b"".join(blobs)), dtype=np.uint8).reshape(len(blobs), *shape)
    labels = table.column("label").to_numpy().astype(np.int64, copy=False)
    return images, labels


# --------------------------------------------------------------------------- writing


def check_folder_name(folder: str) -> None:
    if not folder or folder.startswith(".") or "/" in folder or os.sep in folder:
        raise DatasetError(f"{folder!r}: invalid dataset name (must be a plain, non-hidden folder name)")


def is_prepared(dataset_dir: Path) -> bool:
    try:
        load_manifest(dataset_dir)
    except DatasetError:
        return False
    return True


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace a prepared dataset, or a folder holding anything else, unless asked to."""
    if target.exists() and not target.is_dir():
        raise DatasetError(f"{target}: exists and is not a folder")
    if overwrite or not target.exists():
        return
    if is_prepared(target):
        raise DatasetError(f"{target}: dataset already prepared; pass overwrite=True to replace it")
    if any(target.iterdir()):
        raise DatasetError(f"{target}: folder exists but is not a prepared dataset (no valid manifest.json); "
                           "remove it or pass overwrite=True")


def _install(partial: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished folder onto ``target``; rename is atomic, so readers never see half a dataset."""
    old = None
    if overwrite and target.exists():
        # os.replace cannot rename onto a non-empty folder, so move the old one aside first.
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(6)}")
        os.replace(target, old)
    try:
        os.replace(partial, target)
    except OSError as exc:
        if old is not None and not target.exists():
            os.replace(old, target)
            old = None
        if is_prepared(target):  # another process finished the same conversion first
            raise DatasetError(f"{target}: dataset already prepared (by a concurrent run); "
                               "pass overwrite=True to replace it") from exc
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _checked_rows(spec: DatasetSpec, split: str, rows: Iterable[Row], source: str) -> Iterator[Row]:
    """Pass rows through, rejecting labels outside the class list and raw images of the wrong size."""
    num_classes = len(spec.classes)
    size = int(np.prod(spec.image_shape)) if spec.image_shape is not None else None
    for index, (image, label) in enumerate(rows):
        if not 0 <= label < num_classes:
            raise DatasetError(f"{source}: {split} row {index} has label {label}, outside [0, {num_classes})")
        if size is not None and len(image) != size:
            raise DatasetError(f"{source}: {split} row {index} has {len(image)} image bytes, expected {size}")
        yield image, label


def _write_split(root: Path, split: str, rows: Iterable[Row], rows_per_shard: int,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Write rows as ``<split>/part-NNNNN.parquet`` shards; return the split's manifest entry."""
    (root / split).mkdir()
    rows = iter(rows)
    files: list[str] = []
    digests: dict[str, str] = {}
    sizes: dict[str, int] = {}
    total = 0
    while batch := list(islice(rows, min(rows_per_shard, _ROW_GROUP_ROWS))):
        rel = f"{split}/part-{len(files):05d}.parquet"
        in_shard = 0
        # Min/max statistics of image bytes are useless and large, so keep them for labels only.
        with pq.ParquetWriter(root / rel, SCHEMA, write_statistics=["label"]) as writer:
            while batch:
                writer.write_table(_to_table(batch, first_index=total + in_shard))
                in_shard += len(batch)
                if progress is not None and progress.due(total + in_shard):
                    progress.report(total + in_shard)
                batch = list(islice(rows, min(rows_per_shard - in_shard, _ROW_GROUP_ROWS)))
        total += in_shard
        files.append(rel)
        digests[rel] = _sha256(root / rel)
        sizes[rel] = (root / rel).stat().st_size
    if progress is not None:
        progress.close()
    return {"num_rows": total, "files": files, "sha256": digests, "bytes": sizes}


def _to_table(batch: list[Row], first_index: int) -> pa.Table:
    images, labels = zip(*batch)
    index = pa.array(np.arange(first_index, first_index + len(batch), dtype=np.int64))
    return pa.Table.from_arrays([pa.array(images, pa.binary()), pa.array(labels, pa.int64()), index],
                                schema=SCHEMA)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_problem(manifest: Any) -> str | None:
    """Describe what is wrong with a parsed manifest, or return None if it is usable."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        return f"missing keys {missing}"
    if manifest["format_version"] != FORMAT_VERSION:
        older = isinstance(manifest["format_version"], int) and manifest["format_version"] < FORMAT_VERSION
        return (f"format_version {manifest['format_version']!r}, this mimir reads {FORMAT_VERSION}"
                + ("; it was prepared by an earlier mimir: prepare it again with `mimir data prepare ... "
                   "--overwrite`" if older else ""))
    shape = manifest["image_shape"]
    if manifest["encoding"] == "raw":
        if not (isinstance(shape, list) and len(shape) == 3
                and all(isinstance(d, int) and d > 0 for d in shape)):
            return f"image_shape must be [H, W, C] for raw images, got {shape!r}"
    elif manifest["encoding"] == "encoded":
        if shape is not None:
            return "image_shape must be null for encoded images"
    else:
        return f"unknown encoding {manifest['encoding']!r}"
    classes = manifest["classes"]
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
            and len(classes) == manifest["num_classes"]):
        return "classes must be a list of num_classes names"
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not splits:
        return "splits must be a non-empty object"
    for split, info in splits.items():
        if not (isinstance(info, dict) and isinstance(info.get("num_rows"), int)
                and isinstance(info.get("files"), list) and isinstance(info.get("sha256"), dict)):
            return f"split {split!r} needs num_rows, files and sha256"
        for rel in info["files"]:
            if not (isinstance(rel, str) and _is_inside(rel) and rel in info["sha256"]):
                return f"split {split!r} has a bad file entry {rel!r}"
    return None


def _is_inside(rel: str) -> bool:
    """True for a relative path that cannot point outside the dataset folder."""
    path = PurePosixPath(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts


def array_rows(images: np.ndarray, labels: np.ndarray) -> Iterator[Row]:
    for image, label in zip(images, labels):
        yield image.tobytes(), int(label)
