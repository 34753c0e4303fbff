"""``mimir bench --data``: can the data path keep a GPU fed at ImageNet shapes?

It times the pre-training transform of the ImageNet presets (JPEG decode, RandomResizedCrop to 224,
horizontal flip) two ways over the same Parquet rows, alternating epoch by epoch:

- mimir's own pipeline (:func:`mimir.data.pipeline.train_dataset`) through Ray Data on a local Ray
  of ``cpus`` CPUs, consumed in batches as a training worker consumes it. The consumer stands in
  for the training worker, which has CPUs of its own (``scaling.cpus_per_worker``), so by default
  Ray Data gets every core but one: on a 2-core machine, 2 data CPUs plus the consumer on the same
  2 cores measure the contention, not the pipeline (0.49x of the bare loop per CPU, against 1.03x);
- a bare loop in this process on one CPU: PIL decode and torchvision's RandomResizedCrop and
  RandomHorizontalFlip, batches stacked as tensors, nothing else.

Ray Data's images/s per CPU over the bare loop's is the data path's efficiency; the paper's MIMIR
throughput (Table 10: an ImageNet-1K epoch in 275.5 s on 4 GPUs) divided by Ray Data's images/s per
CPU is how many CPUs each GPU needs for data alone. The images are synthetic JPEGs of ImageNet's
typical size and compressed size (smooth colour fields with fine texture), written once into a
prepared dataset in mimir's own format; ``--data-dir`` times a prepared dataset of your own instead.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from mimir.config import DataConfig
from mimir.data.format import DatasetSpec, load_manifest, write_dataset
from mimir.data.pipeline import split_files, train_dataset

IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_EPOCH_SECONDS, PAPER_GPUS = 275.5, 4  # Table 10, MIMIR on ImageNet-1K
PAPER_IMAGES_PER_GPU = IMAGENET_TRAIN_IMAGES / PAPER_EPOCH_SECONDS / PAPER_GPUS  # about 1,163
BATCH = 256
TARGET = 0.9  # Ray Data's images/s per CPU over the bare loop's
ROWS_PER_SHARD = 128  # several shards, so Ray Data has blocks to spread over its CPUs


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """One JPEG the size of a typical ImageNet training image (about 500x375, quality 90)."""
    width, height = int(rng.integers(400, 501)), int(rng.integers(300, 376))
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    texture = rng.normal(0, 12, (height, width, 1))
    pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_synthetic_imagenet(folder: Path, images: int, seed: int = 0) -> Path:
    """A prepared dataset of ``images`` synthetic ImageNet-sized JPEGs (train and a small test split)."""
    rng = np.random.default_rng(seed)
    classes = [f"n{i:08d}" for i in range(10)]

    def rows(count: int) -> Iterator[tuple[bytes, int]]:
        for i in range(count):
            yield synthetic_jpeg(rng), i % len(classes)

    spec = DatasetSpec("encoded", None, classes, {"train": rows(images), "test": rows(BATCH)},
                       {"train": images, "test": BATCH})
    return write_dataset(spec, folder, source="synthetic ImageNet-sized JPEGs", rows_per_shard=ROWS_PER_SHARD)


def bare_epoch(dataset_dir: Path, data: DataConfig, generator: torch.Generator) -> int:
    """One pass of the bare loop over the train split; returns the images it produced."""
    ops = [T.RandomResizedCrop(data.img_size, scale=data.crop_scale, antialias=True)]
    if data.hflip:
        ops.append(T.RandomHorizontalFlip())
    transform = T.Compose(ops)
    produced, batch = 0, []
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        for path in split_files(dataset_dir, "train"):
            for cell in pq.read_table(path, columns=["image"]).column("image").to_pylist():
                image = np.array(Image.open(io.BytesIO(cell)).convert("RGB"))
                batch.append(transform(torch.from_numpy(image).permute(2, 0, 1)))
                if len(batch) == BATCH:
                    produced += len(torch.stack(batch))
                    batch = []
    return produced + (len(torch.stack(batch)) if batch else 0)


def ray_epoch(dataset: Any) -> int:
    """One epoch of mimir's Ray Data pipeline, consumed in batches; returns the images it produced."""
    return sum(len(batch["label"]) for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy"))


def run_data_bench(images: int, epochs: int, cpus: int, data_dir: str | None = None,
                   img_size: int = 224, crop_scale: tuple[float, float] = (0.2, 1.0)) -> dict[str, Any]:
    """Alternate ``epochs`` epochs of each side (after one untimed epoch each); the JSON report."""
    from mimir.ray_env import init_ray

    if os.environ.get("RAY_ADDRESS"):
        raise RuntimeError("mimir bench --data measures this machine's CPUs: unset RAY_ADDRESS")
    data = DataConfig(dataset="bench", img_size=img_size, crop_scale=crop_scale, hflip=True)
    with tempfile.TemporaryDirectory(prefix="mimir-bench-data-") as scratch:
        if data_dir is None:
            started = time.perf_counter()
            dataset_dir = write_synthetic_imagenet(Path(scratch) / "imagenet-synthetic", images)
            print(f"[bench] wrote {images} synthetic JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            dataset_dir = Path(data_dir).expanduser().resolve()
        manifest = load_manifest(dataset_dir)
        if manifest["encoding"] != "encoded":
            raise ValueError(f"{dataset_dir}: --data times JPEG decoding; this dataset stores raw pixels")
        files = split_files(dataset_dir, "train")
        rows = manifest["splits"]["train"]["num_rows"]
        mean_kb = sum(Path(f).stat().st_size for f in files) / rows / 1024

        init_ray(num_cpus=cpus)
        cpus = int(ray.cluster_resources().get("CPU", cpus))  # a Ray this process had already started
        dataset = train_dataset(dataset_dir, data, finetune=False, seed=0)
        generator = torch.Generator().manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the bare loop is one CPU's worth
        try:
            ray_epoch(dataset), bare_epoch(dataset_dir, data, generator)  # start-up and caches, untimed
            seconds: dict[str, list[float]] = {"ray": [], "bare": []}
            for epoch in range(epochs):
                for side in (("ray", "bare") if epoch % 2 == 0 else ("bare", "ray")):
                    started = time.perf_counter()
                    produced = ray_epoch(dataset) if side == "ray" else bare_epoch(dataset_dir, data, generator)
                    seconds[side].append(time.perf_counter() - started)
                    if produced != rows:
                        raise RuntimeError(f"{side} epoch produced {produced} images of {rows}")
                print(f"[bench] epoch {epoch + 1}/{epochs}: Ray Data {rows / seconds['ray'][-1]:.0f} img/s on {cpus} "
                      f"CPUs, bare loop {rows / seconds['bare'][-1]:.0f} img/s on 1 CPU", flush=True)
        finally:
            torch.set_num_threads(threads)
    ray_rate = rows / float(np.median(seconds["ray"]))
    bare_rate = rows / float(np.median(seconds["bare"]))
    per_cpu = ray_rate / cpus
    return {"images": rows, "mean_jpeg_kb": mean_kb, "img_size": img_size, "crop_scale": list(crop_scale),
            "cpus": cpus, "epochs": epochs, "dataset": str(data_dir or "synthetic"),
            "epoch_seconds": seconds, "ray_images_per_second": ray_rate, "ray_images_per_second_per_cpu": per_cpu,
            "bare_images_per_second_per_cpu": bare_rate, "ratio_per_cpu": per_cpu / bare_rate,
            "target": TARGET, "met": per_cpu / bare_rate >= TARGET,
            "paper_images_per_second_per_gpu": PAPER_IMAGES_PER_GPU,
            "data_cpus_per_gpu": math.ceil(PAPER_IMAGES_PER_GPU / per_cpu)}


def format_data_table(report: dict[str, Any]) -> str:
    r = report
    verdict = "met" if r["met"] else "MISSED"
    return "\n".join([
        f"mimir bench --data: {r['images']} JPEGs (mean {r['mean_jpeg_kb']:.0f} KB) -> RandomResizedCrop "
        f"{r['img_size']} scale {tuple(r['crop_scale'])} + flip, median of {r['epochs']} alternating epochs",
        f"Ray Data (mimir's pipeline): {r['ray_images_per_second']:.0f} img/s on {r['cpus']} CPUs = "
        f"{r['ray_images_per_second_per_cpu']:.0f} img/s per CPU",
        f"bare PIL + torchvision loop: {r['bare_images_per_second_per_cpu']:.0f} img/s on 1 CPU",
        f"target Ray Data per CPU >= {r['target']}x the bare loop: {r['ratio_per_cpu']:.3f} {verdict}",
        f"the paper's MIMIR throughput ({r['paper_images_per_second_per_gpu']:.0f} img/s per GPU, Table 10) needs "
        f"{r['data_cpus_per_gpu']} such CPUs per GPU for data, besides the training worker's own",
    ])
