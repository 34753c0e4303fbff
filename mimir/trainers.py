"""The stages as Ray: pre-training and fine-tuning as ``TorchTrainer`` runs (reused when finished,
resumed when not: :mod:`mimir.stages`), and the evaluation: in the fine-tuning workers when a run
fine-tunes and evaluates (no process to start, the weights already there), else as a Ray task that
streams the test split."""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from mimir import ray_private
from mimir.config import RunConfig
from mimir.console import Progress
from mimir.data.format import load_manifest
from mimir.data.pipeline import (eval_dataset, holdout_indices, local_train_split, num_test_images, num_train_rows,
                                 part_name, resolve_dataset, small_test_rows, train_dataset, validation_parts)
from mimir.errors import named_cause
from mimir.evaluation import evaluate_batches, load_classifier, test_batches
from mimir.memory import PrivateMemoryPeak
from mimir.ray_env import on_local_ray, quiet_ray_data
from mimir.seeding import stream_seed
from mimir.stages import (_join, _write_stage_record, check_stage, read_stage_record, resume_epoch,
                          stage_checkpoint, storage_root)
from mimir.storage import read_bytes

EVALUATION_FILE = "evaluation.json"  # in the fine-tuning run folder, from its workers' evaluation


def _scaling(cfg: RunConfig) -> ray.train.ScalingConfig:
    s = cfg.scaling
    resources = {**s.resources_per_worker, "CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources)


def _fit(stage: str, cfg: RunConfig, storage: str, name: str, loop: Any, loop_config: dict[str, Any],
         datasets: Callable[[int], dict[str, Any]], resume: bool,
         callbacks: Sequence[Any] = (), scored: bool = False) -> ray.train.Checkpoint:
    """Run one TorchTrainer stage (or reuse it when already finished); returns its final checkpoint.

    ``datasets(start_epoch)`` builds the stage's data: Ray datasets, and a small split's rows in
    memory (:func:`_training_split`, :func:`_test_part`), which go to the workers in their config.
    Ray Train calls it whenever it starts the workers, at the first start and after every restart,
    so the data continues at the epoch the weights continue from (rows in memory are indexed by
    epoch in the worker). Several workers split "train" between them; every other dataset is one
    worker's fixed part (``val_<rank>``, ``test_<rank>``). ``scored``: keep the checkpoint with the
    best ``checkpoint_score`` beside the latest; the stage record names it ``best_checkpoint``."""
    if check_stage(stage, cfg, storage, name, resume):
        print(f"[{stage}] already finished in {_join(storage, name)}; reusing its checkpoint", flush=True)
        return stage_checkpoint(storage, read_stage_record(storage, name))
    checkpoints = (ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="checkpoint_score",
                                              checkpoint_score_order="max")
                   if scored else ray.train.CheckpointConfig(num_to_keep=2))
    first = datasets(resume_epoch(storage, name))  # built here too, so a bad dataset fails before training
    in_memory = {key: data for key, data in first.items() if not isinstance(data, ray.data.Dataset)}
    trainer_class = ray_private.local_torch_trainer() if on_local_ray() else ray.train.torch.TorchTrainer
    # the loop's config (rows in memory, mimir's classes) travels inside the loop function, which Ray
    # Train puts in the object store for the workers: its controller unpickles a train_loop_config
    # before it starts a worker, which imported mimir's data classes and torch there (2.4 s on 2 cores)
    trainer = trainer_class(
        functools.partial(loop, {**loop_config, "run_folder": _join(storage, name), "in_memory": in_memory}),
        scaling_config=_scaling(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=checkpoints,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures,
                                                   max_preemption_failures=cfg.scaling.max_preemption_failures),
            callbacks=list(callbacks) or None,
            logging_config=ray.train.LoggingConfig(log_level=os.environ.get("MIMIR_TRAIN_LOG_LEVEL", "WARNING")),
        ),
        datasets={key: _restart_aware(datasets, storage, name, key, first[key]) for key in first
                  if key not in in_memory},
        # rows in the seeded order the dataset puts them in, not the order Ray's tasks finish. A lone
        # worker iterates the dataset itself: a split would start a coordinator process to hand it all
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if cfg.scaling.num_workers > 1 else [],
            execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        named = named_cause(err)
        if named is None:
            raise
        raise named from None
    if result.checkpoint is None:
        raise RuntimeError(f"[{stage}] finished without a checkpoint")
    record = {"stage": stage, "checkpoint": _relative(result.checkpoint), "metrics": result.metrics,
              "config_hash": cfg.config_hash(), "pretrain_hash": cfg.pretrain_hash(),
              "stage_hash": cfg.stage_hash(stage), "stage_config": cfg.stage_config(stage)}
    if scored and result.best_checkpoints:
        # the highest score; on a tie the later epoch
        best, metrics = max(result.best_checkpoints,
                            key=lambda pair: (pair[1]["checkpoint_score"], pair[1]["epoch"]))
        record.update(best_checkpoint=_relative(best), best_metrics=metrics)
    _write_stage_record(storage, name, record)
    return stage_checkpoint(storage, record)


def _relative(checkpoint: ray.train.Checkpoint) -> str:
    """``<run name>/<checkpoint folder>``: a checkpoint's path below the storage root."""
    return "/".join(checkpoint.path.rstrip("/").rsplit("/", 2)[-2:])


def _restart_aware(datasets: Callable[[int], dict[str, Any]], storage: str, name: str, key: str,
                   first: ray.data.Dataset) -> Callable[[], ray.data.Dataset]:
    """The dataset for Ray Train: ``first`` at the first start, rebuilt at the resumed epoch after a restart."""
    started = [False]

    def build() -> ray.data.Dataset:
        if not started[0]:
            started[0] = True
            return first
        return datasets(resume_epoch(storage, name))[key]

    return build


def run_pretrain(cfg: RunConfig, *, storage: str | None = None, name: str = "pretrain", resume: bool = False,
                 callbacks: Sequence[Any] = ()) -> ray.train.Checkpoint:
    """MIMIR pre-training on Ray Train; returns the final checkpoint."""
    from mimir.train.loops import pretrain_worker

    dataset_dir = resolve_dataset(cfg.data)
    steps = max(num_train_rows(dataset_dir, cfg.data, finetune=False) // cfg.pretrain.batch_size, 1)

    def datasets(start_epoch: int) -> dict[str, Any]:
        return {"train": _training_split(cfg, dataset_dir, finetune=False, start_epoch=start_epoch)}

    return _fit("pretrain", cfg, storage or storage_root(cfg), name, pretrain_worker,
                {"run": cfg.model_dump(mode="json"), "steps_per_epoch": steps}, datasets, resume, callbacks)


def run_finetune(cfg: RunConfig, pretrained: ray.train.Checkpoint | None, *, storage: str | None = None,
                 name: str = "finetune", resume: bool = False, callbacks: Sequence[Any] = (),
                 evaluate: bool = False) -> tuple[ray.train.Checkpoint, dict[str, Any] | None]:
    """Adversarial fine-tuning on Ray Train from a pre-training checkpoint (None: from scratch),
    validated on a held-out part of the training split (:func:`holdout_indices`). Returns the final
    checkpoint and, with ``evaluate``, the run's evaluation as the workers did it after training
    (:func:`mimir.train.loops.evaluate_in_workers`), or None where they could not (the stage was
    finished before, or restarted after its best epoch: :func:`run_evaluate` does it then)."""
    from mimir.train.loops import finetune_worker

    dataset_dir = resolve_dataset(cfg.data)
    generated = resolve_dataset(cfg.data.model_copy(update={"dataset": cfg.data.generated})) \
        if cfg.data.generated else None
    manifest = load_manifest(dataset_dir)
    holdout = holdout_indices(dataset_dir, cfg.finetune.validation.images, cfg.seed)
    rows = num_train_rows(dataset_dir, cfg.data, finetune=True) - len(holdout)
    steps = max(rows // cfg.finetune.batch_size, 1)
    loop_config = {"run": cfg.model_dump(mode="json"), "steps_per_epoch": steps,
                   "num_classes": manifest["num_classes"], "pretrained": pretrained}
    storage = storage or storage_root(cfg)
    workers = cfg.scaling.num_workers
    if evaluate:
        # a token of this call, so an evaluation file an earlier run left is never taken for this one's
        loop_config["evaluation"] = {"path": _join(storage, name, EVALUATION_FILE), "token": uuid.uuid4().hex,
                                     "images": num_test_images(dataset_dir, cfg.evaluate.num_images)}

    def datasets(start_epoch: int) -> dict[str, Any]:
        built = {"train": _training_split(cfg, dataset_dir, finetune=True, start_epoch=start_epoch, holdout=holdout,
                                          generated_dir=generated)}
        if len(holdout):
            built.update({part_name("val", rank): part for rank, part in
                          enumerate(validation_parts(dataset_dir, cfg.data, holdout, workers))})
        if evaluate:
            built.update({part_name("test", rank): _test_part(cfg, dataset_dir, (rank, workers))
                          for rank in range(workers)})
        return built

    checkpoint = _fit("finetune", cfg, storage, name, finetune_worker, loop_config, datasets, resume, callbacks,
                      scored=bool(len(holdout)))
    return checkpoint, _workers_evaluation(cfg, storage, name, loop_config.get("evaluation"))


def _training_split(cfg: RunConfig, dataset_dir: Path, *, finetune: bool, start_epoch: int,
                    holdout: np.ndarray | None = None, generated_dir: Path | None = None) -> Any:
    """A stage's training split: a lone worker's small split in memory (it augments each epoch
    itself: no Ray Data execution, no task process), else the Ray Data pipeline."""
    batch_size = (cfg.finetune if finetune else cfg.pretrain).batch_size // cfg.scaling.num_workers
    kwargs = dict(finetune=finetune, seed=cfg.seed, holdout=holdout, batch_size=batch_size, generated_dir=generated_dir)
    local = local_train_split(dataset_dir, cfg.data, **kwargs) if cfg.scaling.num_workers == 1 else None
    return local if local is not None else train_dataset(dataset_dir, cfg.data, start_epoch=start_epoch, **kwargs)


def _test_part(cfg: RunConfig, dataset_dir: Path, part: tuple[int, int]) -> Any:
    """A worker's share of the test split: decoded rows in memory for a small split, else Ray Data's."""
    rows = small_test_rows(dataset_dir, cfg.data, cfg.evaluate.num_images, part)
    return rows if rows is not None else eval_dataset(dataset_dir, cfg.data, cfg.evaluate.num_images, part=part)


def _workers_evaluation(cfg: RunConfig, storage: str, name: str,
                        asked: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluation the fine-tuning workers wrote in this call (its token), of the checkpoint the
    stage record names for ``evaluate.checkpoint`` (its epoch); else None."""
    data = asked and read_bytes(asked["path"])
    if not data:
        return None
    evaluation = json.loads(data)
    record = read_stage_record(storage, name)
    best = cfg.evaluate.checkpoint == "best" and "best_checkpoint" in record
    if evaluation.get("token") != asked["token"] or \
            evaluation["epoch"] != record["best_metrics" if best else "metrics"]["epoch"]:
        return None
    return {**evaluation, "checkpoint": stage_checkpoint(storage, record, cfg.evaluate.checkpoint).path}


def validation_record(cfg: RunConfig) -> dict[str, Any]:
    """What results.json says of the validation split: its size, seed and the held-out rows."""
    holdout = holdout_indices(resolve_dataset(cfg.data), cfg.finetune.validation.images, cfg.seed)
    return {"images": len(holdout), "seed": cfg.seed, "every": cfg.finetune.validation.every,
            "attack_steps": cfg.finetune.validation.attack_steps, "indices": holdout.tolist()}


def _evaluate_task(cfg_json: dict[str, Any], checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    cfg = RunConfig.model_validate(cfg_json)
    quiet_ray_data()
    torch.manual_seed(stream_seed(cfg.seed, "evaluate"))  # the attacks' random starts
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    memory = PrivateMemoryPeak()
    with checkpoint.as_directory() as directory:
        model = load_classifier(directory, cfg, device)
    dataset_dir = resolve_dataset(cfg.data)
    test = _test_part(cfg, dataset_dir, (0, 1))

    total = num_test_images(dataset_dir, cfg.evaluate.num_images)
    progress = Progress("[evaluate]", total, "images", cfg.log.progress_percent, cfg.log.progress_after_seconds)
    result = evaluate_batches(model, test_batches(test, cfg.evaluate.batch_size, memory, device), cfg, progress)
    result["private_memory_mb"] = memory.grown_mb()
    return result


def run_evaluate(cfg: RunConfig, checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """Evaluation as a Ray task (on a GPU when the config asks for one), streaming the test split."""
    s = cfg.scaling
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # never inside a caller's placement group (a Tune trial reserves none of the CPUs this needs)
    task = ray.remote(_evaluate_task).options(
        num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker if s.use_gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    try:
        return ray.get(task.remote(cfg.model_dump(mode="json"), checkpoint))
    except ray.exceptions.RayTaskError as err:
        named = named_cause(err)
        if named is None:
            raise
        raise named from None
