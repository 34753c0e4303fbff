"""Dataset sources, one module each, registered in one table, and ``prepare_dataset``, which converts
a source into the prepared format of ``mimir.data.format`` once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mimir.data.format import DatasetSpec, check_folder_name, check_target, write_dataset
from mimir.errors import DatasetError
from mimir.data.sources.cifar10 import cifar10_spec, download_cifar10
from mimir.data.sources.generated import generated_spec
from mimir.data.sources.imagenet import imagenet_spec
from mimir.data.sources.tiny_imagenet import tiny_imagenet_spec


@dataclass(frozen=True)
class Source:
    """How to read one kind of dataset: ``convert(path)`` -> DatasetSpec, or for a dataset that ships
    with a package (``needs_path=False``) ``convert()`` -> (DatasetSpec, what to name as its source);
    and whether it can be downloaded."""

    convert: Callable[[Path], DatasetSpec] | Callable[[], tuple[DatasetSpec, str]]
    needs_path: bool = True
    downloadable: bool = False


def _digits() -> tuple[DatasetSpec, str]:
    from mimir.data.sources.digits import DIGITS_SOURCE, digits_spec  # scikit-learn is slow to import
    return digits_spec(), DIGITS_SOURCE


SOURCES: dict[str, Source] = {
    "cifar10": Source(cifar10_spec, downloadable=True),
    "tiny-imagenet": Source(tiny_imagenet_spec),
    "imagenet": Source(imagenet_spec),
    "generated": Source(generated_spec),
    "digits": Source(_digits, needs_path=False),
}
DATASETS = tuple(SOURCES)


def prepare_dataset(name: str, source: str | Path | None, out_dir: str | Path, *,
                    download: bool = False, overwrite: bool = False,
                    rows_per_shard: int = 10_000, name_as: str | None = None) -> Path:
    """Convert dataset ``name`` from ``source`` into ``<out_dir>/<name_as or name>``; return that folder."""
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    kind = SOURCES[name]
    if download and not kind.downloadable:
        raise DatasetError(f"{name}: only CIFAR-10 can be downloaded; "
                           "pass the path of a local copy as source")
    if rows_per_shard < 1:
        raise DatasetError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    folder = name_as or name
    check_folder_name(folder)
    out_dir = Path(out_dir)
    target = out_dir / folder
    check_target(target, overwrite)  # before any slow download or decoding

    if not kind.needs_path:
        if source is not None:
            raise DatasetError(f"{source}: {name} ships with its package; pass source=None")
        spec, source_text = kind.convert()
    else:
        if download:
            source = download_cifar10(Path(source) if source is not None else out_dir)
        elif source is None:
            raise DatasetError(f"{name}: a source path is required")
        spec, source_text = kind.convert(Path(source)), str(source)
    return write_dataset(spec, target, source=source_text, overwrite=overwrite,
                         rows_per_shard=rows_per_shard)
