"""Tiny-ImageNet-200 from its extracted folder (``train/<wnid>/images``, ``val/val_annotations.txt``)."""

from __future__ import annotations

from pathlib import Path

from mimir.data.format import DatasetSpec, in_stored_order
from mimir.errors import DatasetError
from mimir.data.sources.folders import decoded_rows, labelled_files, read_lines, require_dir

_TINY_SHAPE = (64, 64, 3)


def tiny_imagenet_spec(root: Path) -> DatasetSpec:
    """Tiny-ImageNet-200: train/<wnid>/images/* as train, the annotated val/ as test."""
    require_dir(root)
    wnids_path = root / "wnids.txt"
    if not wnids_path.is_file():
        raise DatasetError(f"{root}: missing 'wnids.txt' (expected the tiny-imagenet-200 folder)")
    wnids = [line.strip() for line in read_lines(wnids_path) if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"{wnids_path}: expected one distinct wnid per line")
    label = {wnid: index for index, wnid in enumerate(wnids)}
    train = labelled_files((root / "train" / wnid / "images", label[wnid]) for wnid in wnids)
    test = _tiny_imagenet_val(root / "val", label)
    return DatasetSpec("raw", _TINY_SHAPE, _tiny_imagenet_names(root / "words.txt", wnids), {
        "train": decoded_rows(train, _TINY_SHAPE),
        "test": decoded_rows(test, _TINY_SHAPE),
    }, {"train": len(train), "test": len(test)})


def _tiny_imagenet_names(words_path: Path, wnids: list[str]) -> list[str]:
    """Human-readable class names from words.txt when present, else the wnids themselves."""
    if not words_path.is_file():
        return list(wnids)
    names = {}
    for line in read_lines(words_path):
        wnid, _, name = line.partition("\t")
        names[wnid.strip()] = name.strip()
    return [names.get(wnid) or wnid for wnid in wnids]


def _tiny_imagenet_val(val: Path, label: dict[str, int]) -> list[tuple[Path, int]]:
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(f"{annotations}: missing (expected the tiny-imagenet-200 val split)")
    files = []
    for lineno, line in enumerate(read_lines(annotations), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise DatasetError(f"{annotations}:{lineno}: expected 'filename<TAB>wnid' with a wnid "
                               f"from wnids.txt, got {line!r}")
        files.append((val / "images" / fields[0], label[fields[1]]))
    if not files:
        raise DatasetError(f"{annotations}: no annotated images")
    return in_stored_order(files)
