"""What a run costs: seconds per epoch of each training stage and seconds of its evaluation, from the
paper's Table 10, or measured on the user's own device for one model by a ``mimir bench --out`` report.

Table 10 gives seconds per epoch on 4 RTX A6000 GPUs for ViT-S, ViT-B and ConViT-S on CIFAR-10,
Tiny-ImageNet and ImageNet-1K, for MAE and MIMIR pre-training and PGD-10 and FastAT fine-tuning.
Everything else is extrapolated from it, by rules stated where they are applied:

- another architecture: its family's Table 10 model (ViT-S for ViT and XCiT, ConViT-S for ConViT)
  scaled by (parameters / that model's) ** k, with k the exponent that takes ViT-S to ViT-B in the
  same dataset and method column;
- another dataset, image size or patch size: the nearest column scaled by images per epoch and
  tokens per image;
- attack steps: one attack step costs (PGD-10 AT - FastAT) / 9 of an epoch, in fine-tuning and in
  evaluation (PGD-k: k steps, AutoAttack: ``AUTOATTACK_STEPS``); a pre-training attack step costs
  MIMIR - MAE (the 1-step attack with the MI penalty).

A bench report prices only the runs it measured: the same model, image size, precision and kind of
device (:data:`MEASURED_FIELDS`); its seconds per image of each method replace Table 10's, and the
rules above for attack steps stay. Costs are device-seconds: seconds of one device. A stage that runs
on g devices takes device-seconds / g of wall time, plus its fixed start-up (:func:`stage_overhead`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimir.config import RunConfig
from mimir.errors import ConfigError

PAPER_DEVICE = "NVIDIA RTX A6000"
PAPER_DEVICES = 4  # Table 10's seconds per epoch are on 4 GPUs
# Table 10: seconds per epoch on 4 RTX A6000, by (architecture, dataset) and method
TABLE10: dict[tuple[str, str], dict[str, float]] = {
    ("vit_small", "cifar10"): {"pgd10_at": 149.3, "fast_at": 43.3, "mae": 16.1, "mimir": 18.4},
    ("vit_small", "tiny-imagenet"): {"pgd10_at": 306.0, "fast_at": 67.7, "mae": 33.0, "mimir": 40.0},
    ("vit_small", "imagenet"): {"pgd10_at": 2251.7, "fast_at": 555.5, "mae": 269.6, "mimir": 275.5},
    ("vit_base", "cifar10"): {"pgd10_at": 361.2, "fast_at": 122.8, "mae": 53.0, "mimir": 59.0},
    ("vit_base", "tiny-imagenet"): {"pgd10_at": 1022.2, "fast_at": 180.2, "mae": 106.5, "mimir": 122.0},
    ("vit_base", "imagenet"): {"pgd10_at": 5416.7, "fast_at": 1361.3, "mae": 490.9, "mimir": 509.9},
    ("convit_small", "cifar10"): {"pgd10_at": 442.5, "fast_at": 106.5, "mae": 33.0, "mimir": 45.0},
    ("convit_small", "tiny-imagenet"): {"pgd10_at": 897.0, "fast_at": 183.2, "mae": 67.5, "mimir": 90.0},
    ("convit_small", "imagenet"): {"pgd10_at": 6626.5, "fast_at": 1431.2, "mae": 609.7, "mimir": 611.1},
}
METHODS = ("pgd10_at", "fast_at", "mae", "mimir")
PRETRAIN_VARIANTS = ("mimir_renyi", "adv_mae_1")  # what a bench report times besides: I_α, and no MI penalty


@dataclass(frozen=True)
class DatasetSize:
    train: int
    test: int
    img_size: int
    patch_size: int  # the paper's for this dataset (Table 10's token count)

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2


DATASETS = {"cifar10": DatasetSize(50_000, 10_000, 32, 2), "tiny-imagenet": DatasetSize(100_000, 10_000, 64, 4),
            "imagenet": DatasetSize(1_281_167, 50_000, 224, 16), "digits": DatasetSize(1_347, 450, 16, 4)}
TABLE10_DATASETS = ("cifar10", "tiny-imagenet", "imagenet")
# encoder parameters (millions; timm, no head), width and depth: what an architecture's cost scales with
ENCODERS = {"vit_tiny": (5.52, 192, 12), "vit_small": (21.67, 384, 12), "vit_base": (85.80, 768, 12),
            "convit_tiny": (5.52, 192, 12), "convit_small": (27.34, 432, 12), "convit_base": (85.77, 768, 16),
            "xcit_small": (25.87, 384, 12), "xcit_medium": (83.88, 512, 24)}
FAMILY_REFERENCE = {"vit": "vit_small", "convit": "convit_small", "xcit": "vit_small"}
# AutoAttack (standard) in attack steps per image: APGD-CE 100 on every image, APGD-T 9 x 100 and FAB-T
# 9 x 100 on the ~half still robust, Square's 5000 queries (forward only, ~1/3 step) on those
AUTOATTACK_STEPS = 100 + 450 + 450 + 5000 // 3 // 2
ATTACK_STEPS = {"natural": 1, "pgd10": 10, "pgd20": 20, "pgd100": 100, "autoattack": AUTOATTACK_STEPS}


def dataset_size(cfg: RunConfig) -> DatasetSize | None:
    """The dataset's split sizes: the paper's datasets and the digits by name, else its manifest."""
    name = Path(cfg.data.dataset).name
    if name in DATASETS:
        return DATASETS[name]
    from mimir.data.format import load_manifest
    from mimir.errors import DatasetError
    from mimir.data.pipeline import resolve_dataset

    try:
        splits = load_manifest(resolve_dataset(cfg.data))["splits"]
    except (DatasetError, FileNotFoundError, KeyError):
        return None
    return DatasetSize(splits["train"]["num_rows"], splits["test"]["num_rows"], cfg.data.img_size,
                       cfg.model.patch_size)


def _column(cfg: RunConfig) -> str:
    """The Table 10 dataset column that prices this config: its own, or the one nearest in image size."""
    name = Path(cfg.data.dataset).name
    if name in TABLE10_DATASETS:
        return name
    return min(TABLE10_DATASETS, key=lambda d: abs(math.log(DATASETS[d].img_size / cfg.data.img_size)))


def encoder_params(cfg: RunConfig) -> float:
    """Millions of encoder parameters, the architecture's, scaled for width and depth overrides."""
    params, width, depth = ENCODERS[cfg.model.arch]
    return params * ((cfg.model.embed_dim or width) / width) ** 2 * (cfg.model.depth or depth) / depth


def _arch_scale(cfg: RunConfig, column: str, method: str) -> tuple[str, float]:
    """The Table 10 architecture that prices this one, and the factor from it."""
    arch = cfg.model.arch
    if (arch, column) in TABLE10 and cfg.model.embed_dim is None and cfg.model.depth is None:
        return arch, 1.0
    reference = FAMILY_REFERENCE[arch.split("_")[0]]
    small, base = TABLE10[("vit_small", column)][method], TABLE10[("vit_base", column)][method]
    exponent = math.log(base / small) / math.log(ENCODERS["vit_base"][0] / ENCODERS["vit_small"][0])
    return reference, (encoder_params(cfg) / ENCODERS[reference][0]) ** exponent


def epoch_images(cfg: RunConfig, finetune: bool) -> int:
    """Images per epoch: the training split, and in fine-tuning the generated rows mixed in."""
    size = dataset_size(cfg) or DATASETS[_column(cfg)]
    if finetune and cfg.data.generated:
        return round(size.train / (1 - cfg.data.generated_fraction))
    return size.train


def table10_seconds(cfg: RunConfig, method: str, finetune: bool) -> float:
    """Seconds of one epoch of ``method`` (a Table 10 column) on Table 10's 4 GPUs, for this config."""
    column = _column(cfg)
    reference, scale = _arch_scale(cfg, column, method)
    paper = DATASETS[column]
    tokens = (cfg.data.img_size // cfg.model.patch_size) ** 2
    return (TABLE10[(reference, column)][method] * scale * epoch_images(cfg, finetune) / paper.train
            * tokens / paper.tokens)


@dataclass(frozen=True)
class Device:
    """The device a trial is priced on: Table 10's A6000 (``per_image`` empty: extrapolated from the
    paper as this module says), or the one a ``mimir bench --out`` report measured for one model,
    image size and precision (``per_image``: seconds per image of each Table 10 method on one device,
    ``measured``: the settings it was measured at, :data:`MEASURED_FIELDS`)."""

    name: str
    source: str
    kind: str = "cuda"  # cuda or cpu
    per_image: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)


PAPER = Device(PAPER_DEVICE, "the paper's Table 10 (seconds per epoch on 4 RTX A6000)")
# what a step's cost depends on: a bench report prices only trials that match it in all of them
MEASURED_FIELDS = ("model.arch", "model.patch_size", "model.embed_dim", "model.depth", "model.num_heads",
                   "model.mlp_ratio", "model.decoder_dim", "model.decoder_depth", "model.decoder_heads",
                   "data.img_size", "precision", "device")


def measured_settings(cfg: RunConfig) -> dict[str, Any]:
    """The :data:`MEASURED_FIELDS` of a config (precision resolved for its device)."""
    kind = "cuda" if cfg.scaling.use_gpu else "cpu"
    precision = cfg.scaling.precision
    if precision == "auto":
        precision = "fp16" if kind == "cuda" else "fp32"
    dumped = cfg.model_dump(mode="json")
    values = {f: dumped[f.split(".")[0]][f.split(".")[1]] for f in MEASURED_FIELDS if "." in f}
    return {**values, "precision": precision, "device": kind}


def differences(device: Device, cfg: RunConfig) -> list[str]:
    """What a bench report was measured at that this config does not run at (empty: it prices it)."""
    wanted = measured_settings(cfg)
    return [f"{f} {device.measured.get(f)} (the config: {wanted[f]})" for f in MEASURED_FIELDS
            if device.measured.get(f) != wanted[f]]


def bench_device(path: str | Path) -> Device:
    """The device of a ``mimir bench --out`` report: its seconds per image of each Table 10 method,
    for the model, image size, precision and device it measured."""
    try:
        report = json.loads(Path(path).read_text())
        cfg = RunConfig.model_validate(report["config"])
        batch, methods, machine = report["arguments"]["batch"], report["methods"], report["machine"]
        per_image = {m: methods[m]["median_s"] / batch for m in (*METHODS, *PRETRAIN_VARIANTS) if m in methods}
    except FileNotFoundError:
        raise ConfigError(f"--costs {path}: no such file (write one with `mimir bench --config CONFIG --out {path}`)"
                          ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--costs {path}: not a `mimir bench --out` report ({type(err).__name__}: {err})") from None
    missing = [m for m in METHODS if m not in per_image]
    if missing:
        raise ConfigError(f"--costs {path}: the report has no timing of {', '.join(missing)}, which the costs of a "
                          "run are made of; measure every method (`mimir bench` without --methods)")
    measured = measured_settings(cfg)  # the bench's config runs on the device it measured
    name = machine.get("device_name") or (f"CPU ({machine.get('processor') or machine.get('platform', '')}, "
                                          f"{machine.get('torch_threads', '?')} threads)")
    return Device(name, f"`mimir bench` report {path}", measured["device"], per_image, measured)


def epoch_seconds(cfg: RunConfig, method: str, finetune: bool, device: Device = PAPER) -> float:
    """Device-seconds of one epoch of a Table 10 method for this config: measured per image by a
    bench report of this very model, or Table 10 (4 GPUs) extrapolated."""
    if device.per_image:
        return device.per_image[method] * epoch_images(cfg, finetune)
    return table10_seconds(cfg, method, finetune) * PAPER_DEVICES


def attack_step_seconds(cfg: RunConfig, device: Device = PAPER) -> float:
    """Device-seconds of one attack step (forward and input gradient) on one image."""
    per_epoch = (epoch_seconds(cfg, "pgd10_at", True, device) - epoch_seconds(cfg, "fast_at", True, device)) / 9
    return per_epoch / epoch_images(cfg, True)


@dataclass(frozen=True)
class StageCosts:
    """Device-seconds of each stage of one run (0 for a stage it does not run)."""
    pretrain: float
    finetune: float
    evaluate: float


def _pretrain_method(cfg: RunConfig, device: Device) -> str:
    """The measured method whose one attack step (and MI penalty) prices this pre-training's: MIMIR
    with the authors' HSIC, or, where a bench report timed them, I_α or no penalty (Adv-MAE)."""
    variant = {"renyi": "mimir_renyi", "none": "adv_mae_1"}.get(cfg.pretrain.mi.estimator)
    return variant if variant in device.per_image else "mimir"


def pretrain_seconds(cfg: RunConfig, device: Device = PAPER) -> float:
    """The whole pre-training: MAE's epoch plus (MIMIR - MAE) per attack step (the MI penalty included)."""
    mae = epoch_seconds(cfg, "mae", False, device)
    mimir = epoch_seconds(cfg, _pretrain_method(cfg, device), False, device)
    return (mae + cfg.pretrain.attack.steps * (mimir - mae)) * cfg.pretrain.epochs


def finetune_seconds(cfg: RunConfig, device: Device = PAPER) -> float:
    """The whole fine-tuning: FastAT's epoch without its attack step, plus its attack steps (TRADES and
    MART take one more pass), plus the validations."""
    f = cfg.finetune
    pgd, fast = epoch_seconds(cfg, "pgd10_at", True, device), epoch_seconds(cfg, "fast_at", True, device)
    step = (pgd - fast) / 9
    steps = {"clean": 0, "fast": 1, "pgd": f.attack.steps, "trades": f.attack.steps + 1,
             "mart": f.attack.steps + 1}[f.method]
    epoch = fast - step + steps * step
    validations = math.ceil(f.epochs / f.validation.every) if f.validation.images else 0
    validation = f.validation.images * (f.validation.attack_steps + 1) * attack_step_seconds(cfg, device)
    return epoch * f.epochs + validation * validations


def evaluate_seconds(cfg: RunConfig, device: Device = PAPER) -> float:
    """The evaluation: every attack's steps on every test image (PGD-MI and PGD-feature take
    ``evaluate.adaptive_steps``)."""
    size = dataset_size(cfg) or DATASETS[_column(cfg)]
    images = min(size.test, cfg.evaluate.num_images or size.test)
    steps = sum(ATTACK_STEPS.get(a, cfg.evaluate.adaptive_steps) for a in cfg.evaluate.attacks)
    return images * steps * attack_step_seconds(cfg, device)


def surface_seconds(cfg: RunConfig, settings: Any, device: Device = PAPER) -> float:
    """A loss surface (``mimir surface``, Figure 5): at every grid point a forward pass on each image
    (about half an attack step) and, for the adversarial loss, PGD-k first."""
    size = dataset_size(cfg) or DATASETS[_column(cfg)]
    images = min(size.test, settings.num_images)
    per_image = sum(0.5 + (settings.attack_steps if kind == "adversarial" else 0) for kind in settings.inputs)
    return settings.steps ** 2 * images * per_image * attack_step_seconds(cfg, device)


# Wall seconds a stage spends outside its computation on a local Ray (a TorchTrainer's controller and
# worker processes starting, the first epoch's data, checkpoints, teardown), and each epoch's
# wait for its data; the evaluation's outside its attacks (in the fine-tuning workers: the test
# split's read, the model, the trainer's teardown). Measured on the quickstart on a 2-core machine
# (docs/performance.md, "Stage start-up in a plan"); a cluster's are of the same order, small
# against its epochs.
STAGE_START_SECONDS = 7.0
EPOCH_WAIT_SECONDS = 0.1
EVALUATE_START_SECONDS = 1.0


def stage_overhead(cfg: RunConfig, *, pretrain: bool = True, finetune: bool = True) -> StageCosts:
    """Wall seconds of each stage outside its computation (0 for a stage it does not run)."""
    def training(epochs: int) -> float:
        return STAGE_START_SECONDS + EPOCH_WAIT_SECONDS * epochs

    return StageCosts(training(cfg.pretrain.epochs) if pretrain and cfg.pretrain.enabled else 0.0,
                      training(cfg.finetune.epochs) if finetune else 0.0, EVALUATE_START_SECONDS)


def run_costs(cfg: RunConfig, device: Device = PAPER, *, pretrain: bool = True, finetune: bool = True) -> StageCosts:
    """Device-seconds of the stages a run trains (``pretrain`` / ``finetune`` False: reused) and evaluates."""
    return StageCosts(pretrain_seconds(cfg, device) if pretrain and cfg.pretrain.enabled else 0.0,
                      finetune_seconds(cfg, device) if finetune else 0.0, evaluate_seconds(cfg, device))
