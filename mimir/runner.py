"""A run: pre-train -> fine-tune -> evaluate (or a subset), checked before Ray starts, writing
``results.json``. The pieces: :mod:`mimir.ray_env` (Ray start-up), :mod:`mimir.stages` (stage records
and the run folder), :mod:`mimir.trainers` (the TorchTrainers and the evaluation) and
:mod:`mimir.pretrain_cache` (a sweep's shared pre-trainings)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray.train
import torch

from mimir.config import FAILED, STAGES, RunConfig
from mimir.data.format import load_manifest, verify_dataset
from mimir.data.pipeline import num_test_images, resolve_dataset
from mimir.errors import ConfigError, NonFiniteRun
from mimir.folder_lock import folder_lock
from mimir.memory import check_run_memory
from mimir.metrics import Tracker, check_trackers, write_evaluation
from mimir.pretrain_cache import cache_lease
from mimir.ray_env import init_ray
from mimir.stages import (_join, check_finite, check_output, check_stage, checkpoints_to_read, read_stage_record,
                          record_failure, stage_checkpoint, storage_root)
from mimir.storage import check_writable, write_json
from mimir.train.checkpoint import verify_checkpoint
from mimir.trainers import run_evaluate, run_finetune, run_pretrain, validation_record


@contextlib.contextmanager
def timed(seconds: dict[str, float], windows: dict[str, list[float]], stage: str) -> Iterator[None]:
    """``with timed(seconds, windows, "finetune"):`` stores the block's duration in
    ``seconds["finetune"]`` and its wall-clock start and end in ``windows["finetune"]`` (what
    ``mimir runs --fixed-costs`` holds the epochs' own start times against)."""
    started, wall = time.perf_counter(), time.time()
    yield
    seconds[stage] = time.perf_counter() - started
    windows[stage] = [wall, time.time()]


def _split_window(seconds: dict[str, float], windows: dict[str, list[float]], evaluation_started: float) -> None:
    """The fine-tuning stage's time, once its workers evaluated too, as the stage's up to their
    evaluation's start and the evaluation's from there to the stage's end (a worker's clock, kept
    inside the stage's window)."""
    start, end = windows["finetune"]
    split = min(max(evaluation_started, start), end)
    windows["finetune"], windows["evaluate"] = [start, split], [split, end]
    seconds["finetune"], seconds["evaluate"] = seconds["finetune"] - (end - split), end - split


def run_stages(cfg: RunConfig, stages: Sequence[str] = STAGES, *, storage: str, resume: bool = False,
               pretrain_cache: str | None = None, pretrained: ray.train.Checkpoint | None = None,
               finetuned: ray.train.Checkpoint | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """The one orchestration of pre-train -> fine-tune -> evaluate (or a subset) under ``storage``,
    used by ``mimir run`` / ``pretrain`` / ``finetune`` / ``evaluate`` and by every sweep trial.

    ``pretrain_cache`` (sweeps) keeps pre-trainings under ``<cache>/<pretrain hash>`` so configs that
    differ only after pre-training share one, one process training it while the others wait.
    ``callbacks`` go to the fine-tuning trainer. A stage that diverged raises NonFiniteRun. Returns
    the results record (stage records, accuracies, seconds per stage and per attack)."""
    seconds: dict[str, float] = {}
    windows: dict[str, list[float]] = {}
    evaluation: dict[str, Any] | None = None
    results: dict[str, Any] = {"name": cfg.name, "config": cfg.model_dump(mode="json"),
                               "config_hash": cfg.config_hash(), "pretrain_hash": cfg.pretrain_hash()}
    pretrain_storage, pretrain_name = storage, "pretrain"
    if pretrain_cache is not None:
        pretrain_storage, pretrain_name = pretrain_cache, cfg.pretrain_hash()
    if "pretrain" in stages and cfg.pretrain.enabled:
        with timed(seconds, windows, "pretrain"), cache_lease(pretrain_cache, pretrain_name):
            if pretrain_cache is not None:
                hit = read_stage_record(pretrain_storage, pretrain_name) is not None
                print(f"[sweep] pre-training cache {'hit, reusing' if hit else 'miss, pre-training'} "
                      f"{pretrain_name}", flush=True)
                results["pretrain_cache_hit"] = hit
            pretrained = run_pretrain(cfg, storage=pretrain_storage, name=pretrain_name,
                                      resume=resume or pretrain_cache is not None)
        results["pretrain"] = read_stage_record(pretrain_storage, pretrain_name)
        check_finite("pretrain", results["pretrain"])
    if "finetune" in stages:
        if pretrained is None and cfg.pretrain.enabled:
            record = read_stage_record(pretrain_storage, pretrain_name)
            if record is None:
                raise FileNotFoundError(f"no finished pre-training in {_join(pretrain_storage, pretrain_name)}; "
                                        "run `mimir pretrain` first or pass --pretrained CHECKPOINT")
            pretrained = stage_checkpoint(pretrain_storage, record)
        with timed(seconds, windows, "finetune"):
            _, evaluation = run_finetune(cfg, pretrained if cfg.pretrain.enabled else None, storage=storage,
                                         resume=resume, callbacks=callbacks,
                                         evaluate="evaluate" in stages and finetuned is None)
        results["finetune"] = read_stage_record(storage, "finetune")
        check_finite("finetune", results["finetune"])
        results["validation"] = validation_record(cfg)
    if evaluation is not None:  # the fine-tuning workers evaluated
        _split_window(seconds, windows, evaluation["window"][0])
        results.update(evaluated_checkpoint=evaluation["checkpoint"], evaluated_by=f"{evaluation['workers']} "
                       f"fine-tuning worker{'s' if evaluation['workers'] > 1 else ''}")
    elif "evaluate" in stages:
        if finetuned is None:
            record = read_stage_record(storage, "finetune")
            if record is None:
                raise FileNotFoundError(f"no finished fine-tuning in {_join(storage, 'finetune')}; run "
                                        "`mimir finetune` first or pass --checkpoint CHECKPOINT")
            finetuned = stage_checkpoint(storage, record, cfg.evaluate.checkpoint)
            results["evaluated_checkpoint"] = finetuned.path
        with timed(seconds, windows, "evaluate"):
            evaluation = run_evaluate(cfg, finetuned)
        results["evaluated_by"] = "an evaluation task"
    if evaluation is not None:
        results.update(accuracy=evaluation["accuracy"], num_images=evaluation["num_images"],
                       attack_seconds=evaluation["seconds"],
                       evaluate_private_memory_mb=evaluation.get("private_memory_mb"))
        write_evaluation(_join(storage, "evaluate"), results, step=cfg.finetune.epochs,
                         tracker=Tracker.for_run(cfg, "evaluate"))
    results["seconds"], results["stage_times"] = seconds, windows
    return results


def accelerator(cfg: RunConfig) -> str:
    """Where the run's workers compute, in words; a ConfigError for a local run that asks for GPUs
    this machine does not have."""
    s = cfg.scaling
    workers = f"{s.num_workers} worker{'s' if s.num_workers > 1 else ''}"
    if os.environ.get("RAY_ADDRESS"):
        return (f"the Ray cluster at {os.environ['RAY_ADDRESS']}: {workers} of {s.cpus_per_worker:g} CPUs"
                + (f" and {s.gpus_per_worker:g} GPU" if s.use_gpu else "") + " each (not checked from here)")
    if s.use_gpu:
        if not torch.cuda.is_available():
            raise ConfigError("scaling.use_gpu is true, but torch sees no CUDA device on this machine; set "
                              "scaling.use_gpu=false or run on a cluster (RAY_ADDRESS)")
        return f"CUDA: {workers} on {torch.cuda.device_count()} visible GPU(s) ({torch.cuda.get_device_name(0)})"
    return f"CPU: {workers} of {s.cpus_per_worker:g} CPUs, {s.torch_threads or max(1, int(s.cpus_per_worker))} torch threads each"


def preflight(cfg: RunConfig, stages: Sequence[str] = STAGES, *, resume: bool = False, overwrite: bool = False,
              pretrained_given: bool = False, finetuned_given: bool = False,
              dry_run: bool = False) -> tuple[list[str], list[str]]:
    """Everything a run checks before Ray starts, in order: the dataset and its manifest, the
    trackers, the output folder (stages of another config, unfinished ones, what a stage run alone
    needs), the accelerator and whether each training stage's batch fits in memory. Returns the
    training stages that will run and a line per stage saying what happens to it; raises on the
    first problem. ``dry_run``: nothing is removed (``--overwrite`` only names what it would replace)."""
    dataset_dir = resolve_dataset(cfg.data)  # a missing or damaged dataset stops here, before anything is removed
    verify_dataset(dataset_dir)
    manifest = load_manifest(dataset_dir)
    check_trackers(cfg.log)
    if cfg.data.generated:
        verify_dataset(resolve_dataset(cfg.data.model_copy(update={"dataset": cfg.data.generated})))
    replaced = check_output(cfg, stages, resume=resume, overwrite=overwrite, pretrained_given=pretrained_given,
                            finetuned_given=finetuned_given, remove=not dry_run)
    for checkpoint in checkpoints_to_read(cfg, stages, resume=resume, pretrained_given=pretrained_given,
                                          finetuned_given=finetuned_given):
        verify_checkpoint(checkpoint)
    storage = storage_root(cfg)
    if not dry_run:
        check_writable(storage)
    training, lines = [], []
    for stage in ("pretrain", "finetune"):
        if stage not in stages:
            continue
        if stage == "pretrain" and not cfg.pretrain.enabled:
            lines.append("pretrain: off (pretrain.enabled is false)")
            continue
        reused = stage not in replaced and check_stage(stage, cfg, storage, stage, resume)
        if not reused:
            training.append(stage)
        optim = getattr(cfg, stage)
        what = ("reused: finished with this stage hash" if reused else
                "trains, replacing the stage of another config (--overwrite)" if stage in replaced else
                f"trains {optim.epochs} epochs at batch {optim.batch_size}")
        lines.append(f"{stage}: {what} ({_join(storage, stage)})")
    if "evaluate" in stages:
        lines.append(f"evaluate: {', '.join(cfg.evaluate.attacks)} on "
                     f"{num_test_images(dataset_dir, cfg.evaluate.num_images)} test images")
    lines.append(f"accelerator: {accelerator(cfg)}")
    check_run_memory(cfg, training)  # an OOM kill an hour in is worse than a message now
    lines.append(f"memory: each training stage's batch fits ({', '.join(training) or 'nothing trains'})")
    return training, lines


def run_pipeline(cfg: RunConfig, stages: Sequence[str] = STAGES, *, resume: bool = False, overwrite: bool = False,
                 pretrained: ray.train.Checkpoint | None = None,
                 finetuned: ray.train.Checkpoint | None = None) -> dict[str, Any]:
    """``mimir run`` and the single-stage commands: hold the output folder (one writer at a time),
    check it, run the stages, write ``results.json`` (or ``failed.json`` for a diverged run) and
    return the results."""
    started = time.time()
    out = Path(cfg.output_dir).expanduser()
    with folder_lock(out, "run"):
        preflight(cfg, stages, resume=resume, overwrite=overwrite, pretrained_given=pretrained is not None,
                  finetuned_given=finetuned is not None)
        storage = storage_root(cfg)
        init_ray()
        write_json(out / "config.json", cfg.model_dump(mode="json"))
        try:
            results = run_stages(cfg, stages, storage=storage, resume=resume, pretrained=pretrained,
                                 finetuned=finetuned)
        except NonFiniteRun as err:
            record_failure(out, cfg, err)
            raise
        results["run_window"] = [started, time.time()]  # the fixed costs outside the stages (mimir runs --fixed-costs)
        write_json(out / "results.json", results)
        (out / FAILED).unlink(missing_ok=True)  # an earlier attempt's failure no longer describes this folder
    return results
