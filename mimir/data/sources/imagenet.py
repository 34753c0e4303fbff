"""ImageNet-1K from ``train/<wnid>/`` and ``val/<wnid>/`` folders, stored as the original JPEG bytes."""

from __future__ import annotations

from pathlib import Path

from mimir.data.format import DatasetSpec
from mimir.errors import DatasetError
from mimir.data.sources.folders import encoded_rows, labelled_files, require_dir


def imagenet_spec(root: Path) -> DatasetSpec:
    """ImageNet-1K from train/<wnid>/ and val/<wnid>/ folders; file bytes are stored unchanged."""
    require_dir(root)
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
    train = labelled_files((train_dir / w, label[w]) for w in wnids)
    test = labelled_files((val_dir / w, label[w]) for w in val_wnids)
    return DatasetSpec("encoded", None, wnids, {"train": encoded_rows(train), "test": encoded_rows(test)},
                       {"train": len(train), "test": len(test)})
