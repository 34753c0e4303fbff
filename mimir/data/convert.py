"""Convert image datasets into sharded Parquet folders described by a manifest.

A prepared dataset ``<out_dir>/<name>/`` holds ``<split>/part-NNNNN.parquet`` shards with
columns ``image`` (binary) and ``label`` (int64), plus ``manifest.json``, which is written
last: a folder without it is never a dataset. ``image`` is either raw uint8 HWC RGB bytes
(``"raw"`` encoding: CIFAR-10, Tiny-ImageNet, digits, generated data) or the original
JPEG/PNG file bytes (``"encoded"``: ImageNet-1K). Every conversion is built in a hidden
sibling folder and renamed into place, so a failed run never looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import secrets
import shutil
import tarfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

DATASETS = ("cifar10", "tiny-imagenet", "imagenet", "generated", "digits")
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64())])

_ROW_GROUP_ROWS = 1024  # bounds writer memory: an ImageNet shard would otherwise sit in RAM whole
_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")
_TINY_SHAPE = (64, 64, 3)
_MANIFEST_KEYS = ("name", "format_version", "encoding", "image_shape", "num_classes", "classes",
                  "splits", "source")

Row = tuple[bytes, int]


class DatasetError(ValueError):
    """A dataset source or prepared dataset that cannot be used; the message names the path."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a converter hands to the writer: metadata plus lazily produced rows per split."""

    encoding: str  # "raw" or "encoded"
    image_shape: tuple[int, int, int] | None  # (H, W, C) for raw images, None for encoded
    classes: list[str]  # index = label
    splits: dict[str, Iterable[Row]]

    @classmethod
    def from_arrays(cls, classes: Sequence[str],
                    splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> DatasetSpec:
        """Raw-encoded spec from uint8 (N, H, W, C) image arrays and integer label arrays."""
        first_images = next(iter(splits.values()))[0]
        shape = tuple(int(d) for d in first_images.shape[1:])
        rows = {split: _array_rows(images, labels) for split, (images, labels) in splits.items()}
        return cls("raw", shape, list(classes), rows)


def default_data_dir() -> Path:
    """Folder for prepared datasets: ``$MIMIR_DATA_DIR`` or ``~/.cache/mimir/datasets``."""
    env = os.environ.get("MIMIR_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimir" / "datasets"


# --------------------------------------------------------------------------- public API


def prepare_dataset(name: str, source: str | Path | None, out_dir: str | Path, *,
                    download: bool = False, overwrite: bool = False,
                    rows_per_shard: int = 10_000, name_as: str | None = None) -> Path:
    """Convert dataset ``name`` from ``source`` into ``<out_dir>/<name_as or name>``; return that folder."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if download and name != "cifar10":
        raise DatasetError(f"{name}: only CIFAR-10 can be downloaded; "
                           "pass the path of a local copy as source")
    if rows_per_shard < 1:
        raise DatasetError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    folder = name_as or name
    _check_folder_name(folder)
    out_dir = Path(out_dir)
    target = out_dir / folder
    _check_target(target, overwrite)  # before any slow download or decoding

    if name == "digits":
        if source is not None:
            raise DatasetError(f"{source}: digits ships with scikit-learn; pass source=None")
        # Imported here because digits.py builds on this module (and sklearn is slow to import).
        from mimir.data.digits import DIGITS_SOURCE, digits_spec
        spec, source_text = digits_spec(), DIGITS_SOURCE
    else:
        if download:
            source = _download_cifar10(Path(source) if source is not None else out_dir)
        elif source is None:
            raise DatasetError(f"{name}: a source path is required")
        spec, source_text = _CONVERTERS[name](Path(source)), str(source)
    return write_dataset(spec, target, source=source_text, overwrite=overwrite,
                         rows_per_shard=rows_per_shard)


def write_dataset(spec: DatasetSpec, dataset_dir: str | Path, *, source: str,
                  overwrite: bool = False, rows_per_shard: int = 10_000) -> Path:
    """Write ``spec`` as a prepared dataset at ``dataset_dir`` (atomically); return the folder."""
    dataset_dir = Path(dataset_dir)
    _check_target(dataset_dir, overwrite)
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = dataset_dir.with_name(f".{dataset_dir.name}.partial-{secrets.token_hex(6)}")
    partial.mkdir()
    try:
        splits = {split: _write_split(partial, split, _checked_rows(spec, split, rows, source),
                                      rows_per_shard)
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


def verify_dataset(dataset_dir: str | Path) -> None:
    """Check that every shard in the manifest exists, matches its checksum and row count."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    for split, info in manifest["splits"].items():
        rows = 0
        for rel in info["files"]:
            path = dataset_dir / rel
            if not path.is_file():
                raise DatasetError(f"{path}: missing shard")
            if _sha256(path) != info["sha256"][rel]:
                raise DatasetError(f"{path}: checksum mismatch (shard is corrupt or was modified)")
            rows += pq.read_metadata(path).num_rows
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


def _check_folder_name(folder: str) -> None:
    if not folder or folder.startswith(".") or "/" in folder or os.sep in folder:
        raise DatasetError(f"{folder!r}: invalid dataset name (must be a plain, non-hidden folder name)")


def _is_prepared(dataset_dir: Path) -> bool:
    try:
        load_manifest(dataset_dir)
    except DatasetError:
        return False
    return True


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace a prepared dataset, or a folder holding anything else, unless asked to."""
    if target.exists() and not target.is_dir():
        raise DatasetError(f"{target}: exists and is not a folder")
    if overwrite or not target.exists():
        return
    if _is_prepared(target):
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
        if _is_prepared(target):  # another process finished the same conversion first
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


def _write_split(root: Path, split: str, rows: Iterable[Row], rows_per_shard: int) -> dict[str, Any]:
    """Write rows as ``<split>/part-NNNNN.parquet`` shards; return the split's manifest entry."""
    (root / split).mkdir()
    rows = iter(rows)
    files: list[str] = []
    digests: dict[str, str] = {}
    total = 0
    while batch := list(islice(rows, min(rows_per_shard, _ROW_GROUP_ROWS))):
        rel = f"{split}/part-{len(files):05d}.parquet"
        in_shard = 0
        # Min/max statistics of image bytes are useless and large, so keep them for labels only.
        with pq.ParquetWriter(root / rel, SCHEMA, write_statistics=["label"]) as writer:
            while batch:
                writer.write_table(_to_table(batch))
                in_shard += len(batch)
                batch = list(islice(rows, min(rows_per_shard - in_shard, _ROW_GROUP_ROWS)))
        total += in_shard
        files.append(rel)
        digests[rel] = _sha256(root / rel)
    return {"num_rows": total, "files": files, "sha256": digests}


def _to_table(batch: list[Row]) -> pa.Table:
    images, labels = zip(*batch)
    return pa.Table.from_arrays([pa.array(images, pa.binary()), pa.array(labels, pa.int64())],
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
        return f"unsupported format_version {manifest['format_version']!r} (expected {FORMAT_VERSION})"
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


# --------------------------------------------------------------------------- shared readers


def _array_rows(images: np.ndarray, labels: np.ndarray) -> Iterator[Row]:
    for image, label in zip(images, labels):
        yield image.tobytes(), int(label)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable text file ({exc})") from exc


def _require_dir(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: not found")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder")


def _folder_images(folder: Path) -> list[Path]:
    """Image files of one class folder, sorted by name so the stored order is reproducible."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing class folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{folder}: no images (.JPEG, .jpg, .jpeg or .png)")
    return images


def _labelled_files(folders: Iterable[tuple[Path, int]]) -> Iterator[tuple[Path, int]]:
    """(file, label) for every image in the given class folders, listed lazily folder by folder."""
    for folder, label in folders:
        for path in _folder_images(folder):
            yield path, label


def _decoded_rows(files: Iterable[tuple[Path, int]], shape: tuple[int, int, int]) -> Iterator[Row]:
    for path, label in files:
        yield _decode_rgb(path, shape).tobytes(), label


def _decode_rgb(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
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


def _encoded_rows(files: Iterable[tuple[Path, int]]) -> Iterator[Row]:
    """Original file bytes, after checking that PIL can open them so bad files fail here, not in training."""
    for path, label in files:
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{path}: unreadable image ({exc})") from exc
        yield data, label


# --------------------------------------------------------------------------- CIFAR-10


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


def _cifar10_spec(source: Path) -> DatasetSpec:
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
    _require_dir(source)
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


def _download_cifar10(target: Path) -> Path:
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


# --------------------------------------------------------------------------- Tiny-ImageNet


def _tiny_imagenet_spec(root: Path) -> DatasetSpec:
    """Tiny-ImageNet-200: train/<wnid>/images/* as train, the annotated val/ as test."""
    _require_dir(root)
    wnids_path = root / "wnids.txt"
    if not wnids_path.is_file():
        raise DatasetError(f"{root}: missing 'wnids.txt' (expected the tiny-imagenet-200 folder)")
    wnids = [line.strip() for line in _read_lines(wnids_path) if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"{wnids_path}: expected one distinct wnid per line")
    label = {wnid: index for index, wnid in enumerate(wnids)}
    train = _labelled_files((root / "train" / wnid / "images", label[wnid]) for wnid in wnids)
    test = _tiny_imagenet_val(root / "val", label)
    return DatasetSpec("raw", _TINY_SHAPE, _tiny_imagenet_names(root / "words.txt", wnids), {
        "train": _decoded_rows(train, _TINY_SHAPE),
        "test": _decoded_rows(test, _TINY_SHAPE),
    })


def _tiny_imagenet_names(words_path: Path, wnids: list[str]) -> list[str]:
    """Human-readable class names from words.txt when present, else the wnids themselves."""
    if not words_path.is_file():
        return list(wnids)
    names = {}
    for line in _read_lines(words_path):
        wnid, _, name = line.partition("\t")
        names[wnid.strip()] = name.strip()
    return [names.get(wnid) or wnid for wnid in wnids]


def _tiny_imagenet_val(val: Path, label: dict[str, int]) -> list[tuple[Path, int]]:
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(f"{annotations}: missing (expected the tiny-imagenet-200 val split)")
    files = []
    for lineno, line in enumerate(_read_lines(annotations), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise DatasetError(f"{annotations}:{lineno}: expected 'filename<TAB>wnid' with a wnid "
                               f"from wnids.txt, got {line!r}")
        files.append((val / "images" / fields[0], label[fields[1]]))
    if not files:
        raise DatasetError(f"{annotations}: no annotated images")
    return files


# --------------------------------------------------------------------------- ImageNet-1K


def _imagenet_spec(root: Path) -> DatasetSpec:
    """ImageNet-1K from train/<wnid>/ and val/<wnid>/ folders; file bytes are stored unchanged."""
    _require_dir(root)
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise DatasetError(f"{root}: missing '{split_dir.name}' folder "
                               "(expected train/<wnid>/ and val/<wnid>/ image folders)")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not wnids:
        raise DatasetError(f"{train_dir}: no class folders")
    val_wnids = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
    if not val_wnids:
        raise DatasetError(f"{val_dir}: no class folders (sort flat validation images into "
                           "val/<wnid>/ folders first)")
    label = {wnid: index for index, wnid in enumerate(wnids)}
    unknown = [wnid for wnid in val_wnids if wnid not in label]
    if unknown:
        raise DatasetError(f"{val_dir / unknown[0]}: class not present in {train_dir} "
                           f"({len(unknown)} such val folder(s))")
    return DatasetSpec("encoded", None, wnids, {
        "train": _encoded_rows(_labelled_files((train_dir / w, label[w]) for w in wnids)),
        "test": _encoded_rows(_labelled_files((val_dir / w, label[w]) for w in val_wnids)),
    })


# --------------------------------------------------------------------------- generated (EDM-style)


def _generated_spec(path: Path) -> DatasetSpec:
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


_CONVERTERS = {
    "cifar10": _cifar10_spec,
    "tiny-imagenet": _tiny_imagenet_spec,
    "imagenet": _imagenet_spec,
    "generated": _generated_spec,
}
