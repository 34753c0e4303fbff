"""Per-worker training loops handed to Ray Train's ``TorchTrainer``.

Each loop: build the model, ``prepare_model`` (device + DDP), restore from Ray Train's latest
checkpoint if there is one, then per epoch iterate this worker's dataset shard, call the pure step
function per batch, and ``ray.train.report`` the epoch's metrics with a checkpoint every
``checkpoint_every`` epochs and at the end.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mimir.config import OptimConfig, RunConfig
from mimir.mi import make_estimator
from mimir.models import build_classifier, build_mae, load_encoder_weights
from mimir.train.checkpoint import load_state, load_training_state, load_weights, save_checkpoint
from mimir.train.steps import (Precision, finetune_optimizer, finetune_step, lr_at, pretrain_optimizer,
                               pretrain_step, set_lr, unwrap)


def _mean_across_workers(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    total = max(values[-1].item(), 1.0)
    return {k: values[i].item() / total for i, k in enumerate(keys)}


def _worker_setup(cfg: RunConfig) -> torch.device:
    ctx = ray.train.get_context()
    # Ray Train logs every report at INFO on the worker; a user reads our epoch lines instead
    logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(cfg.seed * 1000 + ctx.get_world_rank())
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    return ray.train.torch.get_device()


def _train_epochs(stage: str, cfg: RunConfig, optim_cfg: OptimConfig, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, precision: Precision, steps_per_epoch: int,
                  step: Callable[[dict[str, torch.Tensor]], dict[str, float]], extra_state: dict[str, Any]) -> None:
    """The epoch loop shared by both stages: schedule, shard iteration, metrics, checkpoints."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            unwrap(model).load_state_dict(load_weights(directory, device))
            load_training_state(directory, optimizer, precision.scaler)
            start_epoch = load_state(directory)["epoch"] + 1
        if rank == 0:
            print(f"[{stage}] resuming from epoch {start_epoch} of {optim_cfg.epochs}", flush=True)
    shard = ray.train.get_dataset_shard("train")
    local_batch = optim_cfg.batch_size // world
    for epoch in range(start_epoch, optim_cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        steps, images_seen, started = 0, 0, time.perf_counter()
        batches = shard.iter_torch_batches(batch_size=local_batch, drop_last=True, device=device,
                                           local_shuffle_buffer_size=4 * local_batch)
        for batch in batches:
            lr = lr_at(epoch + min(steps / steps_per_epoch, 1.0), optim_cfg)
            set_lr(optimizer, lr)
            metrics = step(batch)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
            images_seen += batch["image"].shape[0]
        if steps == 0:
            raise RuntimeError(f"[{stage}] worker {rank} got no full batch of {local_batch} images; "
                               "lower the batch size or use fewer workers")
        elapsed = time.perf_counter() - started
        report = _mean_across_workers(sums, steps, device)
        report.update(epoch=epoch, lr=lr, seconds=elapsed, images_per_second=images_seen * world / elapsed)
        last = epoch == optim_cfg.epochs - 1
        if rank == 0:
            shown = " ".join(f"{k} {report[k]:.4g}" for k in ("loss", "mse", "mi", "acc") if k in report)
            skipped = f" skipped {report['skipped'] * steps:.0f}" if report.get("skipped") else ""
            print(f"[{stage}] epoch {epoch + 1}/{optim_cfg.epochs} {shown} lr {lr:.3g} "
                  f"{report['images_per_second']:.0f} img/s{skipped}", flush=True)
        if last or (epoch + 1) % optim_cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(tmp, unwrap(model), {"epoch": epoch, "stage": stage, "metrics": report,
                                                         "config": cfg.model_dump(mode="json"), **extra_state},
                                    optimizer, precision.scaler)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=checkpoint)
        else:
            ray.train.report(report)


def pretrain_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the pre-training TorchTrainer (Algorithm 1)."""
    cfg = RunConfig.model_validate(config["run"])
    device = _worker_setup(cfg)
    model = ray.train.torch.prepare_model(build_mae(cfg))
    optimizer = pretrain_optimizer(model, cfg.pretrain)
    precision = Precision.create(cfg.scaling.precision, device)
    mi = cfg.pretrain.mi
    estimator = make_estimator(mi.estimator, mi.sigma, mi.alpha)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        images = batch["image"].float().div_(255)
        return pretrain_step(model, optimizer, images, cfg.pretrain, precision, estimator)

    _train_epochs("pretrain", cfg, cfg.pretrain, model, optimizer, precision, config["steps_per_epoch"], step,
                  {"pretrain_hash": cfg.pretrain_hash()})


def finetune_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the fine-tuning TorchTrainer, starting from a pre-trained encoder."""
    cfg = RunConfig.model_validate(config["run"])
    device = _worker_setup(cfg)
    classifier = build_classifier(cfg, config["num_classes"])
    pretrained = config.get("pretrained")
    if pretrained is not None and ray.train.get_checkpoint() is None:
        with pretrained.as_directory() as directory:
            load_encoder_weights(classifier.net, load_weights(directory))
    model = ray.train.torch.prepare_model(classifier)
    optimizer = finetune_optimizer(model, cfg.finetune)
    precision = Precision.create(cfg.scaling.precision, device)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        images = batch["image"].float().div_(255)
        labels = batch["target"] if "target" in batch else batch["label"]
        return finetune_step(model, optimizer, images, labels, cfg.finetune, precision)

    _train_epochs("finetune", cfg, cfg.finetune, model, optimizer, precision, config["steps_per_epoch"], step,
                  {"num_classes": config["num_classes"], "pretrained": pretrained and pretrained.path})
