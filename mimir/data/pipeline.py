"""Ray Data pipelines: Parquet shards -> decoded, augmented uint8 CHW tensors for the workers.

Decoding, RandomResizedCrop, flips, RandAugment and MixUp / CutMix run as Ray Data ``map_batches``
stages (on any CPU in the cluster); a worker receives ``image`` (N, C, H, W) uint8, ``label`` (N,)
int64 and, with MixUp / CutMix, ``target`` (N, num_classes) float32 soft labels. A split small
enough for the driver to read (:func:`small_split`) skips Ray Data where it can: a lone worker
augments it itself (:class:`LocalTrainSplit`), and its validation and test rows are decoded once
and handed over in memory (:class:`InMemoryRows`), batch for batch what Ray Data would give.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from ray.data.dataset import MaterializedDataset
from ray.data.extensions import ArrowTensorArray

from mimir import ray_private
from mimir.config import DataConfig
from mimir.data.format import default_data_dir, load_manifest
from mimir.errors import DatasetError
from mimir.data.sources.digits import ensure_digits
from mimir.seeding import stream_seed

Batch = dict[str, np.ndarray]


def resolve_dataset(data: DataConfig) -> Path:
    """The prepared dataset folder a config names (the bundled digits are prepared on first use)."""
    root = Path(data.root).expanduser() if data.root else default_data_dir()
    if data.dataset == "digits":
        return ensure_digits(root)
    candidates = [Path(data.dataset).expanduser(), root / data.dataset]
    for path in candidates:
        if (path / "manifest.json").is_file():
            return path.resolve()
    raise DatasetError(
        f"dataset {data.dataset!r} not found (looked in {', '.join(str(p) for p in candidates)}); "
        f"convert it once with `mimir data prepare NAME --source PATH --out {root}`")


def split_files(dataset_dir: Path, split: str) -> list[str]:
    manifest = load_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise DatasetError(f"{dataset_dir}: no {split!r} split (has {sorted(manifest['splits'])})")
    return [str(dataset_dir / f) for f in manifest["splits"][split]["files"]]


def decode(images: np.ndarray, manifest: dict[str, Any]) -> list[np.ndarray]:
    """Parquet ``image`` cells -> HWC uint8 arrays (raw bytes reshaped, or JPEG/PNG decoded)."""
    if manifest["encoding"] == "raw":
        shape = tuple(manifest["image_shape"])
        return [np.frombuffer(b, dtype=np.uint8).reshape(shape) for b in images]
    return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy of the buffer


def data_epoch() -> int:
    """The epoch the calling Ray Data task works for: its dataset's execution counter, which Ray
    Data's own seeded file and block shuffles are keyed on too, and which :func:`train_dataset`
    starts at the epoch a run (re)starts from (:mod:`mimir.ray_private`)."""
    return ray_private.data_epoch()


def random_crop(data: DataConfig, crop: str) -> T.Transform:
    """A training crop to ``data.img_size``: "resized" (RandomResizedCrop over ``data.crop_scale`` of
    the area) or "padded" (RandomCrop of the image zero-padded by ``data.crop_padding`` pixels)."""
    if crop == "resized":
        return T.RandomResizedCrop(data.img_size, scale=data.crop_scale, antialias=True)
    if crop == "padded":
        return T.Compose([T.Resize(data.img_size, antialias=True), T.RandomCrop(data.img_size, padding=data.crop_padding)])
    raise ValueError(f"unknown crop {crop!r}")


def train_transform(batch: Batch, manifest: dict[str, Any], data: DataConfig, randaugment: bool, seed: int,
                    holdout: np.ndarray | None = None, crop: str = "resized", epoch: int | None = None) -> Batch:
    """Drop held-out validation rows, then decode + the ``crop`` (:func:`random_crop`) + horizontal
    flip (+ RandAugment) per image, each image's draws seeded by its stored index
    (:func:`mimir.seeding.stream_seed`), whichever block, task or node processes it, and by the
    ``epoch`` (default: the Ray Data execution's, :func:`data_epoch`)."""
    if holdout is not None and len(holdout):
        keep = ~np.isin(batch["index"], holdout)
        batch = {key: value[keep] for key, value in batch.items()}
    ops = [random_crop(data, crop)]
    if data.hflip:
        ops.append(T.RandomHorizontalFlip())
    if randaugment:
        ops.append(T.RandAugment(num_ops=2, magnitude=9))
    transform = T.Compose(ops)
    epoch, images = data_epoch() if epoch is None else epoch, []
    # torchvision draws from torch's global CPU generator; seeding it alone costs ~1 us, torch.manual_seed
    # (which also queues every accelerator's seed) ~75 us, a third of a digit's transform
    with torch.random.fork_rng(devices=[]):
        for image, index in zip(decode(batch["image"], manifest), batch["index"]):
            torch.default_generator.manual_seed(stream_seed(seed, "augment", epoch=epoch, row=int(index)))
            images.append(transform(_chw(image)))
    stacked = (torch.stack(images).numpy() if images
               else np.zeros((0, 3, data.img_size, data.img_size), dtype=np.uint8))
    return {"image": stacked, "label": batch["label"].astype(np.int64), "index": batch["index"]}


def eval_transform(batch: Batch, manifest: dict[str, Any], img_size: int, crop_pct: float = 1.0) -> Batch:
    """Decode, resize the shorter side to ``img_size / crop_pct`` (bicubic, as the authors' loader)
    and centre-crop to the model's size; deterministic. At ``crop_pct`` 1 an image already at the
    model's size is left as it is."""
    resized = int(img_size / crop_pct)
    out = []
    for img in decode(batch["image"], manifest):
        x = _chw(img)
        if x.shape[-2:] != (img_size, img_size) or resized != img_size:
            x = TF.resize(x, resized, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
            x = TF.center_crop(x, img_size)
        out.append(x)
    stacked = torch.stack(out).numpy() if out else np.zeros((0, 3, img_size, img_size), dtype=np.uint8)
    return {"image": stacked, "label": batch["label"].astype(np.int64)}


def mix_batch(batch: Batch, num_classes: int, mixup_alpha: float, cutmix_alpha: float, seed: int,
              epoch: int | None = None) -> Batch:
    """MixUp or CutMix (chosen 50/50 per batch) with the batch reversed as partner; adds ``target``.
    The draws are seeded by the epoch (default: the Ray Data execution's) and the batch's first row,
    so they repeat with the run."""
    if len(batch["label"]) == 0:
        return {**batch, "target": np.zeros((0, num_classes), dtype=np.float32)}
    epoch = data_epoch() if epoch is None else epoch
    rng = np.random.default_rng(stream_seed(seed, "mix", epoch=epoch, row=int(batch["index"][0])))
    images = batch["image"].astype(np.float32)
    onehot = np.eye(num_classes, dtype=np.float32)[batch["label"]]
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    partner = images[::-1]
    if use_cutmix:
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = rng.integers(h), rng.integers(w)
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
        images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually swapped
    else:
        images = lam * images + (1 - lam) * partner
    return {"image": np.rint(images).clip(0, 255).astype(np.uint8), "label": batch["label"],
            # float32 either way (CutMix's area ratio is a float64): Ray Data cannot concatenate mixed types
            "index": batch["index"], "target": (lam * onehot + (1 - lam) * onehot[::-1]).astype(np.float32)}


CACHE_FRACTION = 0.25  # of the cluster's object store, for ``cache_in_memory: null``
# a split this small is read by the driver itself (pyarrow, then into the object store): a Ray Data
# read starts task processes, seconds on 2 cores, for what takes the driver milliseconds
DRIVER_READ_BYTES = 32 << 20


def small_split(dataset_dir: Path, split: str) -> pa.Table | None:
    """The whole split as one Arrow table in stored order, when its files add up to at most
    ``DRIVER_READ_BYTES``; else None (a Ray Data read, on any node of the cluster)."""
    files = split_files(dataset_dir, split)
    if sum(Path(f).stat().st_size for f in files) > DRIVER_READ_BYTES:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files])


def read_split(dataset_dir: Path, split: str, cache_in_memory: bool | None = None,
               seed: int | None = None) -> ray.data.Dataset:
    """The split's raw rows, read once into the object store when cached (each epoch re-executes a
    dataset: uncached, every epoch lists and reads the files again, a fixed cost of about two seconds
    even for a small split). The random transforms stay after this point, so they differ per epoch.
    With a ``seed`` the files are read in a new seeded order at every execution (epoch). A cached
    :func:`small_split` is read by the driver: one block, as Ray Data's read of one small file gives."""
    files = split_files(dataset_dir, split)
    if cache_in_memory is None:
        capacity = ray.cluster_resources().get("object_store_memory", 0.0)
        cache_in_memory = sum(Path(f).stat().st_size for f in files) <= CACHE_FRACTION * capacity
    if cache_in_memory and (table := small_split(dataset_dir, split)) is not None:
        return ray.data.from_arrow(table)
    shuffle = None if seed is None else ray.data.FileShuffleConfig(seed=stream_seed(seed, "file_order"),
                                                                     reseed_after_execution=True)
    ds = ray.data.read_parquet(files, shuffle=shuffle)
    return ds.materialize() if cache_in_memory else ds


def _per_epoch(seed: int, stream: str) -> ray.data.RandomSeedConfig:
    """A stream's seed that Ray Data combines with the execution index: a new, reproducible draw every epoch."""
    return ray.data.RandomSeedConfig(seed=stream_seed(seed, stream), reseed_after_execution=True)


TRANSFORM_ROWS = 256  # rows per call of the training transform


def _augment_kwargs(manifest: dict[str, Any], data: DataConfig, finetune: bool, seed: int,
                    holdout: np.ndarray | None) -> dict[str, Any]:
    return dict(manifest=manifest, data=data, randaugment=finetune and data.augment == "randaug", seed=seed,
                holdout=holdout, crop=data.finetune_crop if finetune else "resized")


def _mixes(data: DataConfig, finetune: bool) -> bool:
    """Whether the training split gets MixUp / CutMix (:func:`mix_batch`)."""
    return finetune and data.augment in ("mix", "randaug")


def _mix_kwargs(manifest: dict[str, Any], data: DataConfig, seed: int) -> dict[str, Any]:
    return dict(num_classes=manifest["num_classes"], mixup_alpha=data.mixup_alpha, cutmix_alpha=data.cutmix_alpha,
                seed=seed)


def train_dataset(dataset_dir: Path, data: DataConfig, *, finetune: bool, seed: int = 0, start_epoch: int = 0,
                  holdout: np.ndarray | None = None, batch_size: int | None = None,
                  generated_dir: Path | None = None) -> ray.data.Dataset:
    """The augmented training split (less the ``holdout`` rows, the validation split); for
    fine-tuning optionally mixed with generated data and MixUp / CutMix / RandAugment as
    ``data.augment`` says.

    Every epoch is a function of (seed, epoch): the files (uncached) or blocks (cached) come in a
    seeded order, rows keep that order (``preserve_order``, so not the order tasks finish in), and
    each row's augmentation is seeded by its stored index; the workers' seeded local shuffle buffer
    (:func:`epoch_batches`) then mixes rows across blocks. The first execution is epoch
    ``start_epoch``, so a resumed run reads what the uninterrupted run would have read."""
    manifest = load_manifest(dataset_dir)
    ds = read_split(dataset_dir, "train", data.cache_in_memory, seed=seed)
    if isinstance(ds, MaterializedDataset):
        ds = ds.randomize_block_order(seed=_per_epoch(seed, "block_order"))
    if generated_dir is not None and finetune:
        ds = _with_generated(ds, manifest, generated_dir, data.generated_fraction, data.cache_in_memory, seed)
    # plain tasks (not an actor pool): an uncached read fuses with the transform, and no CPU is held idle
    ds = ds.map_batches(train_transform, batch_size=TRANSFORM_ROWS,
                        fn_kwargs=_augment_kwargs(manifest, data, finetune, seed, holdout))
    if _mixes(data, finetune):
        ds = ds.map_batches(mix_batch, batch_size=batch_size, fn_kwargs=_mix_kwargs(manifest, data, seed))
    ray_private.start_executions_at(ds, start_epoch)  # see data_epoch
    ds.context.execution_options.preserve_order = True
    return ds


GENERATED_INDEX_OFFSET = 1 << 40  # generated rows' indices, apart from the real rows' own


def _generated_index(batch: Batch) -> Batch:
    return {**batch, "index": batch["index"] + GENERATED_INDEX_OFFSET}


def _with_generated(real: ray.data.Dataset, manifest: dict[str, Any], generated_dir: Path,
                    fraction: float, cache_in_memory: bool | None, seed: int) -> ray.data.Dataset:
    """Add generated rows so they make up ``fraction`` of each epoch (the authors' unsup fraction)."""
    gen_manifest = load_manifest(generated_dir)
    if gen_manifest["image_shape"] != manifest["image_shape"] or gen_manifest["encoding"] != manifest["encoding"]:
        raise DatasetError(f"{generated_dir}: generated images {gen_manifest['image_shape']} do not match "
                           f"the dataset's {manifest['image_shape']}")
    n_real = sum(s["num_rows"] for name, s in manifest["splits"].items() if name == "train")
    n_gen_available = gen_manifest["splits"]["train"]["num_rows"]
    wanted = int(round(n_real * fraction / (1 - fraction)))
    generated = read_split(generated_dir, "train", cache_in_memory, seed=seed).map_batches(_generated_index)
    if wanted < n_gen_available:
        generated = generated.random_sample(wanted / n_gen_available, seed=_per_epoch(seed, "generated"))
    return real.union(generated).random_shuffle(seed=_per_epoch(seed, "mixed_order"))


class InMemoryRows:
    """Decoded rows a worker holds (a small split's), iterated as Ray Data iterates a dataset of
    one block: the same batches from ``iter_torch_batches``, through Ray's own local shuffle buffer
    when one is asked for, with no Ray Data execution behind them."""

    def __init__(self, rows: Batch) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows["label"])

    def iter_torch_batches(self, *, batch_size: int, device: torch.device | str, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        if local_shuffle_buffer_size:
            batches = ray_private.local_shuffle(self.rows, batch_size, local_shuffle_buffer_size, local_shuffle_seed,
                                                drop_last)
        else:
            end = len(self) - len(self) % batch_size if drop_last else len(self)
            batches = (_rows_between(self.rows, start, start + batch_size) for start in range(0, end, batch_size))
        for batch in batches:
            # copies: the held rows stay as they are whatever a step does to its batch in place
            yield {key: torch.from_numpy(np.array(value)).to(device) for key, value in batch.items()}


@dataclass(frozen=True)
class LocalTrainSplit:
    """A small training split that its lone worker augments itself: each epoch holds what
    :func:`train_dataset` gives for that epoch (the same transform and seeds over the same rows in
    the same order, then MixUp / CutMix as there), computed where the batches are used, so no Ray
    Data execution (and no task process) runs for it. :func:`local_train_split` builds it."""

    rows: Batch
    manifest: dict[str, Any]
    data: DataConfig
    finetune: bool
    seed: int
    holdout: np.ndarray | None
    batch_size: int | None

    def epoch(self, epoch: int) -> InMemoryRows:
        augment = _augment_kwargs(self.manifest, self.data, self.finetune, self.seed, self.holdout)
        rows = _concatenated([train_transform(_rows_between(self.rows, start, start + TRANSFORM_ROWS), **augment,
                                              epoch=epoch)
                              for start in range(0, len(self.rows["label"]), TRANSFORM_ROWS)])
        if _mixes(self.data, self.finetune):
            mix, size = _mix_kwargs(self.manifest, self.data, self.seed), self.batch_size
            rows = _concatenated([mix_batch(_rows_between(rows, start, start + size), **mix, epoch=epoch)
                                  for start in range(0, len(rows["label"]), size)])
        return InMemoryRows(rows)


def local_train_split(dataset_dir: Path, data: DataConfig, *, finetune: bool, seed: int = 0,
                      holdout: np.ndarray | None = None, batch_size: int | None = None,
                      generated_dir: Path | None = None) -> LocalTrainSplit | None:
    """The training split as a :class:`LocalTrainSplit` for a stage of one worker, when it is a
    :func:`small_split`, cached (not ``cache_in_memory: false``) and not mixed with generated data;
    else None (:func:`train_dataset`)."""
    if data.cache_in_memory is False or (finetune and generated_dir is not None):
        return None
    table = small_split(dataset_dir, "train")
    if table is None:
        return None
    return LocalTrainSplit(_columns(table), load_manifest(dataset_dir), data, finetune, seed, holdout, batch_size)


def _rows_between(rows: Batch, start: int, stop: int) -> Batch:
    return {key: value[start:stop] for key, value in rows.items()}


def _concatenated(parts: list[Batch]) -> Batch:
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def holdout_indices(dataset_dir: Path, images: int, seed: int) -> np.ndarray:
    """The validation split: ``images`` training rows (sorted stored indices), stratified (each
    class in proportion to its share of the split, largest remainders first) and seeded. Reads only
    the label and index columns."""
    if images == 0:
        return np.zeros(0, dtype=np.int64)
    files = split_files(dataset_dir, "train")
    table = pa.concat_tables([pq.read_table(f, columns=["label", "index"]) for f in files])
    labels, indices = table.column("label").to_numpy(), table.column("index").to_numpy()
    if images >= len(labels):
        raise DatasetError(f"{dataset_dir}: finetune.validation.images {images} leaves no training rows "
                           f"(the train split has {len(labels)})")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * images / len(labels)
    per_class = np.floor(quota).astype(int)
    extra = np.argsort(-(quota - per_class), kind="stable")[:images - per_class.sum()]
    per_class[extra] += 1
    rng = np.random.default_rng(stream_seed(seed, "split"))
    chosen = [rng.choice(indices[labels == c], size=n, replace=False) for c, n in zip(classes, per_class)]
    return np.sort(np.concatenate(chosen))


def validation_parts(dataset_dir: Path, data: DataConfig, holdout: np.ndarray,
                     workers: int) -> list[ray.data.Dataset] | list[InMemoryRows]:
    """The held-out training rows, decoded and resized as the test split is (no augmentation), read
    and decoded once (the rows lie all over the shards: a scan per validation, or per worker, would
    read the whole training split each time), as one part per worker: worker k's holds the rows
    whose stored index is k modulo ``workers``, as in :func:`eval_dataset`. A :func:`small_split`'s
    parts are decoded here and handed to the workers as :class:`InMemoryRows`; else Ray datasets."""
    manifest = load_manifest(dataset_dir)
    fn_kwargs = dict(manifest=manifest, img_size=data.img_size, crop_pct=data.eval_crop_pct, holdout=holdout)
    table = small_split(dataset_dir, "train")
    if table is not None:
        rows = _held_out(_columns(table), **fn_kwargs)
        return [InMemoryRows(_rows_of_part(rows, (k, workers))) for k in range(workers)]
    held = ray.data.read_parquet(split_files(dataset_dir, "train")).map_batches(
        _held_out, batch_size=256, fn_kwargs=fn_kwargs).materialize()
    if workers == 1:
        return [held]
    return [held.map_batches(_rows_of_part, batch_size=256, fn_kwargs=dict(part=(k, workers))) for k in range(workers)]


def _held_out(batch: Batch, manifest: dict[str, Any], img_size: int, crop_pct: float, holdout: np.ndarray) -> Batch:
    keep = np.isin(batch["index"], holdout)
    decoded = eval_transform({key: value[keep] for key, value in batch.items()}, manifest, img_size, crop_pct)
    return {**decoded, "index": batch["index"][keep]}


def _columns(table: pa.Table) -> Batch:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _in_object_store(batch: Batch) -> ray.data.Dataset:
    """Decoded images and labels (:func:`eval_transform`'s batch) as a one-block dataset."""
    return ray.data.from_arrow(pa.table({"image": ArrowTensorArray.from_numpy(batch["image"]),
                                         "label": batch["label"]}))


def epoch_batches(shard: Any, *, batch_size: int, data: DataConfig, seed: int, epoch: int, rank: int,
                  device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of a worker's training batches: its shard (or its :class:`LocalTrainSplit`'s
    ``epoch``) through a local shuffle buffer of ``data.shuffle_buffer`` rows, seeded by (seed,
    epoch, rank) so each epoch draws anew. The buffer holds at least two batches: from a smaller one
    Ray's batcher yields short batches. Nothing runs until the first batch is asked for, so the
    epoch's preparation counts as waiting for data (``data_seconds``)."""
    if isinstance(shard, LocalTrainSplit):
        shard = shard.epoch(epoch)
    buffer = max(data.shuffle_buffer, 2 * batch_size) if data.shuffle_buffer else None
    yield from shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                        local_shuffle_buffer_size=buffer,
                                        local_shuffle_seed=stream_seed(seed, "shuffle", epoch=epoch, rank=rank)
                                        if buffer else None)


def part_name(split: str, rank: int) -> str:
    """The dataset name of worker ``rank``'s fixed share of a split: ``val_0``, ``test_1``, ..."""
    return f"{split}_{rank}"


def small_test_rows(dataset_dir: Path, data: DataConfig, num_images: int | None = None,
                    part: tuple[int, int] | None = None) -> InMemoryRows | None:
    """What :func:`eval_dataset` holds, decoded here at once, when the test split is a
    :func:`small_split`; else None."""
    table = small_split(dataset_dir, "test")
    if table is None:
        return None
    rows = _columns(table.slice(0, num_images))
    if part is not None and part[1] > 1:
        rows = _rows_of_part(rows, part)
    return InMemoryRows(eval_transform(rows, load_manifest(dataset_dir), data.img_size, data.eval_crop_pct))


def eval_dataset(dataset_dir: Path, data: DataConfig, num_images: int | None = None,
                 part: tuple[int, int] | None = None) -> ray.data.Dataset:
    """The test split, decoded and resized, in stored order (the first ``num_images`` when given).
    ``part=(k, n)``: only the rows whose stored index is k modulo n, worker k's fixed share of an
    evaluation spread over n (the same rows whichever worker asks first, unlike a streaming split;
    the dataset ``part_name("test", k)`` of a fine-tuning run that evaluates). A
    :func:`small_split` is decoded by the caller, at once (:func:`small_test_rows`)."""
    if (small := small_test_rows(dataset_dir, data, num_images, part)) is not None:
        return _in_object_store(small.rows)
    manifest = load_manifest(dataset_dir)
    part = part if part is not None and part[1] > 1 else None
    ds = ray.data.read_parquet(split_files(dataset_dir, "test"))
    # in stored order, so "the first N" is the same N every run: set on this dataset's own context
    # (its derived datasets share it), never the process's, which later datasets would inherit
    ds.context.execution_options.preserve_order = True
    if num_images is not None:
        ds = ds.limit(num_images)
    if part is not None:
        ds = ds.map_batches(_rows_of_part, batch_size=256, fn_kwargs=dict(part=part))
    return ds.map_batches(eval_transform, batch_size=256, fn_kwargs=dict(manifest=manifest, img_size=data.img_size,
                                                                         crop_pct=data.eval_crop_pct))


def _rows_of_part(batch: Batch, part: tuple[int, int]) -> Batch:
    keep = batch["index"] % part[1] == part[0]
    return {key: value[keep] for key, value in batch.items()}


def num_test_images(dataset_dir: Path, num_images: int | None) -> int:
    """How many test images an evaluation reads: the split's, or the first ``num_images`` of them."""
    rows = load_manifest(dataset_dir)["splits"]["test"]["num_rows"]
    return min(rows, num_images or rows)


def num_train_rows(dataset_dir: Path, data: DataConfig, finetune: bool) -> int:
    """Rows per epoch, as the learning-rate schedule needs to know the steps per epoch up front."""
    manifest = load_manifest(dataset_dir)
    rows = manifest["splits"]["train"]["num_rows"]
    if finetune and data.generated:
        rows += int(round(rows * data.generated_fraction / (1 - data.generated_fraction)))
    return rows
