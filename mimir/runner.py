"""Orchestration: Ray start-up, the pre-training and fine-tuning TorchTrainers, the evaluation task,
and the whole pipeline that writes ``results.json``.

Storage: every stage is a Ray Train run ``<storage>/<stage name>`` (storage = ``scaling.storage_path``
or ``output_dir``; a local path or a URI such as ``s3://bucket/x``). Re-creating a trainer with the
same storage and name makes Ray Train restore its latest checkpoint, which is how ``--resume`` and
driver restarts continue; a finished stage leaves ``mimir_stage.json`` in its run folder and is not
run again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch

from mimir import ray_private
from mimir.config import FAILED, STAGE_RECORD, STAGES, RunConfig, config_changes
from mimir.errors import ConfigError, NonFiniteRun, StageExistsError
from mimir.console import Progress, quiet_this_process, ray_process_env, verbose
from mimir.data.pipeline import (eval_dataset, holdout_indices, num_train_rows, resolve_dataset, train_dataset,
                                 validation_dataset)
from mimir.evaluation import evaluate_batches, load_classifier
from mimir.memory import PrivateMemoryPeak, check_run_memory
from mimir.metrics import Tracker, check_trackers, filesystem, write_evaluation
from mimir.seeding import stream_seed
from mimir.data.format import load_manifest

IDLE_WORKER_MS = 300_000  # how long the local Ray keeps an idle worker process
LOCAL_POLL_SECONDS = 0.2  # how often Ray Train's controller polls its workers on a local Ray
log = logging.getLogger("mimir")


# -- Ray ----------------------------------------------------------------------------------------
def quiet_ray_data() -> None:
    """No progress bars or per-execution banners from the Ray Data pipelines this process builds:
    they would bury the epoch lines. Each process that creates datasets calls it (the driver, a Tune
    trial, the evaluation task); the env var reaches the tasks those datasets start."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start an in-process local Ray; quiet unless ``-v``
    (mimir.console)."""
    if ray.is_initialized():
        return
    quiet_ray_data()
    local = not os.environ.get("RAY_ADDRESS")
    if not verbose():
        quiet_this_process()
        ray_private.drop_worker_log_prefix()  # the console shows mimir's lines as mimir printed them
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # -v in a log file: Ray's prefixes without colour codes
    # workers print their epoch lines straight to stdout: Ray Train's print patch would route them
    # through its logger, which shows every line twice
    env_vars = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **ray_process_env(local)}
    if local:
        # Ray Train's controller polls its workers every 2 s (sized for clusters); a stage waits on
        # those polls to start, to see its workers finish and to stop: an empty TorchTrainer took
        # 12.1 s here, 8.2 s polling every 0.2 s
        env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(LOCAL_POLL_SECONDS)
    kwargs: dict[str, Any] = dict(logging_level=logging.INFO if verbose() else logging.WARNING, log_to_driver=True,
                                  runtime_env={"env_vars": env_vars})
    if not local:
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # with the dashboard (on 127.0.0.1), whose State API Ray Train's placement-group cleaner
        # polls; without it the cleaner logs a warning every few seconds for the rest of the run.
        # A Ray Train run keeps more actors alive than a laptop has CPUs, so Ray would kill every
        # idle worker after 1 s and each epoch's Ray Data tasks would start a fresh process (seconds
        # of importing torch); kept for minutes, the next epoch, stage and trial reuse them
        ray_private.init_local_ray(IDLE_WORKER_MS, num_cpus=num_cpus, **kwargs)


@contextlib.contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """``with timed(seconds, "finetune"):`` stores the block's wall time in ``seconds["finetune"]``."""
    started = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - started


# -- storage ------------------------------------------------------------------------------------
def storage_root(cfg: RunConfig) -> str:
    """Absolute local path or URI under which the stages' Ray Train runs live."""
    root = cfg.scaling.storage_path or cfg.output_dir
    return root if "://" in root else str(Path(root).expanduser().resolve())


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def read_stage_record(storage: str, name: str) -> dict[str, Any] | None:
    fs, path = filesystem(_join(storage, name, STAGE_RECORD))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def _write_stage_record(storage: str, name: str, record: dict[str, Any]) -> None:
    fs, path = filesystem(_join(storage, name, STAGE_RECORD))
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(record, indent=2).encode())


def _run_exists(storage: str, name: str) -> bool:
    fs, path = filesystem(_join(storage, name))
    return fs.get_file_info(path).type == pafs.FileType.Directory


def stage_checkpoint(storage: str, record: dict[str, Any], which: str = "last") -> ray.train.Checkpoint:
    """A finished stage's last checkpoint, or (``which="best"``) its best-validated one where it has one."""
    key = "best_checkpoint" if which == "best" and "best_checkpoint" in record else "checkpoint"
    return ray.train.Checkpoint(_join(storage, record[key]))


def _latest_checkpoint_state(storage: str, name: str) -> dict[str, Any] | None:
    """``state.json`` of an unfinished run's newest checkpoint (Ray names them by time), if any."""
    fs, path = filesystem(_join(storage, name))
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    checkpoints = sorted(e.path for e in entries
                         if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_"))
    for directory in reversed(checkpoints):
        state = f"{directory}/state.json"
        if fs.get_file_info(state).type == pafs.FileType.File:
            with fs.open_input_stream(state) as stream:
                return json.loads(stream.read())
    return None


def _refuse_changed(stage: str, where: str, recorded: dict[str, Any] | None, cfg: RunConfig, what: str) -> None:
    changes = config_changes(recorded, cfg.stage_config(stage)) if recorded else ["(not recorded)"]
    raise StageExistsError(
        f"{where} holds {what} {stage} run of another config ({'; '.join(changes[:8])}"
        f"{'; ...' if len(changes) > 8 else ''}); choose another output_dir, or pass --overwrite to "
        "replace it")


def check_stage(stage: str, cfg: RunConfig, storage: str, name: str, resume: bool) -> bool:
    """Whether a finished stage can be reused (True), or must run (False); raises StageExistsError,
    before anything trains, when the folder holds this stage for another config or an unfinished run
    without ``--resume``. A stage is reused, and resumed, only for the same stage hash."""
    where = _join(storage, name)
    record = read_stage_record(storage, name)
    if record is not None:
        if record.get("stage_hash") != cfg.stage_hash(stage):
            _refuse_changed(stage, where, record.get("stage_config"), cfg, "a finished")
        return True
    if not _run_exists(storage, name):
        return False
    if not resume:
        raise StageExistsError(f"{where} holds an unfinished {stage} run; pass --resume to continue it, "
                               "--overwrite to replace it, or choose another output_dir")
    state = _latest_checkpoint_state(storage, name)
    if state is not None:
        recorded = RunConfig.model_validate(state["config"]).stage_config(stage)
        if recorded != cfg.stage_config(stage):
            _refuse_changed(stage, where, recorded, cfg, "an unfinished")
    return False


def remove_stage(storage: str, name: str) -> None:
    """Delete a stage's run folder (``--overwrite``)."""
    fs, path = filesystem(_join(storage, name))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


# -- trainers -----------------------------------------------------------------------------------
def _scaling(cfg: RunConfig) -> ray.train.ScalingConfig:
    s = cfg.scaling
    resources = {**s.resources_per_worker, "CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources)


def resume_epoch(storage: str, name: str) -> int:
    """The epoch a stage's run continues from: after the newest checkpoint Ray Train registered, the
    one it restores, or 0. Not the newest checkpoint folder: a run killed between writing a checkpoint
    and Ray Train registering it leaves a folder that Ray Train ignores, starting that epoch over, and
    the data must start over with it (else that epoch trains on the next epoch's augmentations)."""
    try:
        result = ray.train.Result.from_path(_join(storage, name))
    except RuntimeError:  # no run folder, or no checkpoint registered in it yet
        return 0
    return 0 if result.checkpoint is None else int(result.metrics["epoch"]) + 1


def _fit(stage: str, cfg: RunConfig, storage: str, name: str, loop: Any, loop_config: dict[str, Any],
         datasets: Callable[[int], dict[str, ray.data.Dataset]], resume: bool,
         callbacks: Sequence[Any] = (), scored: bool = False) -> ray.train.Checkpoint:
    """Run one TorchTrainer stage (or reuse it when already finished); returns its final checkpoint.

    ``datasets(start_epoch)`` builds the stage's data. Ray Train calls it whenever it starts the
    workers, at the first start and after every restart, so the data continues at the epoch the
    weights continue from. ``scored``: keep the checkpoint with the best ``checkpoint_score`` beside
    the latest; the stage record names it ``best_checkpoint``."""
    if check_stage(stage, cfg, storage, name, resume):
        print(f"[{stage}] already finished in {_join(storage, name)}; reusing its checkpoint", flush=True)
        return stage_checkpoint(storage, read_stage_record(storage, name))
    checkpoints = (ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="checkpoint_score",
                                              checkpoint_score_order="max")
                   if scored else ray.train.CheckpointConfig(num_to_keep=2))
    first = datasets(resume_epoch(storage, name))  # built here too, so a bad dataset fails before training
    trainer = ray.train.torch.TorchTrainer(
        loop,
        train_loop_config={**loop_config, "run_folder": _join(storage, name)},
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
        datasets={key: _restart_aware(datasets, storage, name, key, first[key]) for key in first},
        # rows in the seeded order the dataset puts them in, not the order Ray's tasks finish
        dataset_config=ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
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


def _restart_aware(datasets: Callable[[int], dict[str, ray.data.Dataset]], storage: str, name: str, key: str,
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

    def datasets(start_epoch: int) -> dict[str, ray.data.Dataset]:
        return {"train": train_dataset(dataset_dir, cfg.data, finetune=False, seed=cfg.seed, start_epoch=start_epoch)}

    return _fit("pretrain", cfg, storage or storage_root(cfg), name, pretrain_worker,
                {"run": cfg.model_dump(mode="json"), "steps_per_epoch": steps}, datasets, resume, callbacks)


def run_finetune(cfg: RunConfig, pretrained: ray.train.Checkpoint | None, *, storage: str | None = None,
                 name: str = "finetune", resume: bool = False, callbacks: Sequence[Any] = ()) -> ray.train.Checkpoint:
    """Adversarial fine-tuning on Ray Train from a pre-training checkpoint (None: from scratch),
    validated on a held-out part of the training split (:func:`holdout_indices`)."""
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

    def datasets(start_epoch: int) -> dict[str, ray.data.Dataset]:
        built = {"train": train_dataset(dataset_dir, cfg.data, finetune=True, seed=cfg.seed, start_epoch=start_epoch,
                                        holdout=holdout, generated_dir=generated,
                                        batch_size=cfg.finetune.batch_size // cfg.scaling.num_workers)}
        if len(holdout):
            built["val"] = validation_dataset(dataset_dir, cfg.data, holdout)
        return built

    return _fit("finetune", cfg, storage or storage_root(cfg), name, finetune_worker, loop_config, datasets,
                resume, callbacks, scored=bool(len(holdout)))


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
    ds = eval_dataset(dataset_dir, cfg.data, cfg.evaluate.num_images)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in ds.iter_torch_batches(batch_size=cfg.evaluate.batch_size):
            yield batch["image"].float().div_(255), batch["label"]
            memory.sample()  # after the batch's attacks ran

    test_rows = load_manifest(dataset_dir)["splits"]["test"]["num_rows"]
    total = min(test_rows, cfg.evaluate.num_images or test_rows)
    progress = Progress("[evaluate]", total, "images", cfg.log.progress_percent, cfg.log.progress_after_seconds)
    result = evaluate_batches(model, batches(), cfg, progress)
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
    return ray.get(task.remote(cfg.model_dump(mode="json"), checkpoint))


def check_output(cfg: RunConfig, stages: Sequence[str], *, resume: bool = False, overwrite: bool = False,
                 pretrained_given: bool = False, finetuned_given: bool = False, remove: bool = True) -> list[str]:
    """Before anything starts: refuse an output folder whose stages belong to another config (or are
    unfinished without --resume), or, with ``overwrite``, clear those of the stages this run trains
    (``remove=False``, a dry run: only name them). Returns the stages cleared."""
    storage = storage_root(cfg)
    training = [s for s in ("pretrain", "finetune") if s in stages and (s != "pretrain" or cfg.pretrain.enabled)]
    replaced = []
    for stage in training:
        try:
            check_stage(stage, cfg, storage, stage, resume)
        except StageExistsError:
            if not overwrite:
                raise
            replaced.append(stage)
            if remove:
                remove_stage(storage, stage)  # a stage of this very config is kept and reused
    # a stage run alone starts from the previous stage in output_dir: it must be there, and this config's
    if "finetune" in stages and "pretrain" not in stages and cfg.pretrain.enabled and not pretrained_given:
        if not check_stage("pretrain", cfg, storage, "pretrain", resume=False):
            raise FileNotFoundError(f"no finished pre-training in {_join(storage, 'pretrain')}; run "
                                    "`mimir pretrain` first or pass --pretrained CHECKPOINT")
    if "evaluate" in stages and "finetune" not in stages and not finetuned_given:
        if not check_stage("finetune", cfg, storage, "finetune", resume=False):
            raise FileNotFoundError(f"no finished fine-tuning in {_join(storage, 'finetune')}; run "
                                    "`mimir finetune` first or pass --checkpoint CHECKPOINT")
    return replaced


def check_finite(stage: str, record: dict[str, Any] | None) -> None:
    """Raise NonFiniteRun when a finished stage diverged: its weights are no result."""
    metrics = (record or {}).get("metrics", {})
    loss, skipped = metrics.get("loss", 0.0), metrics.get("skipped", 0.0)
    if not math.isfinite(loss) or skipped > 0.5:
        raise NonFiniteRun(stage, f"ended with loss {loss} ({skipped:.0%} of steps skipped as non-finite)")


def write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    """Write ``path`` through a renamed temporary file: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)


def record_failure(out: Path, cfg: RunConfig, err: BaseException) -> None:
    """``failed.json`` where ``results.json`` would be: the config and the reason."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / FAILED, {"config": cfg.model_dump(mode="json"),
                                         "reason": f"{type(err).__name__}: {err}"})


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
    results: dict[str, Any] = {"name": cfg.name, "config": cfg.model_dump(mode="json"),
                               "config_hash": cfg.config_hash(), "pretrain_hash": cfg.pretrain_hash()}
    pretrain_storage, pretrain_name = storage, "pretrain"
    if pretrain_cache is not None:
        pretrain_storage, pretrain_name = pretrain_cache, cfg.pretrain_hash()
    if "pretrain" in stages and cfg.pretrain.enabled:
        with timed(seconds, "pretrain"), cache_lease(pretrain_cache, pretrain_name):
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
        with timed(seconds, "finetune"):
            run_finetune(cfg, pretrained if cfg.pretrain.enabled else None, storage=storage, resume=resume,
                         callbacks=callbacks)
        results["finetune"] = read_stage_record(storage, "finetune")
        check_finite("finetune", results["finetune"])
        results["validation"] = validation_record(cfg)
    if "evaluate" in stages:
        if finetuned is None:
            record = read_stage_record(storage, "finetune")
            if record is None:
                raise FileNotFoundError(f"no finished fine-tuning in {_join(storage, 'finetune')}; run "
                                        "`mimir finetune` first or pass --checkpoint CHECKPOINT")
            finetuned = stage_checkpoint(storage, record, cfg.evaluate.checkpoint)
            results["evaluated_checkpoint"] = finetuned.path
        with timed(seconds, "evaluate"):
            evaluation = run_evaluate(cfg, finetuned)
        results.update(accuracy=evaluation["accuracy"], num_images=evaluation["num_images"],
                       attack_seconds=evaluation["seconds"],
                       evaluate_private_memory_mb=evaluation.get("private_memory_mb"))
        write_evaluation(_join(storage, "evaluate"), results, step=cfg.finetune.epochs,
                         tracker=Tracker.for_run(cfg, "evaluate"))
    results["seconds"] = seconds
    return results


class PretrainLeases:
    """Who is pre-training which cached pre-training, for every trial of a sweep on any node (the
    cache may be a URI, where no file lock exists). A lease lapses when its holder stops renewing it
    (a trial process or node that died), so a crash never blocks the other trials for good."""

    def __init__(self, lease_seconds: float):
        self.lease_seconds = lease_seconds
        self.leases: dict[str, tuple[str, float]] = {}

    def lease(self) -> float:
        return self.lease_seconds

    def try_acquire(self, key: str, holder: str) -> bool:
        now = time.monotonic()
        current = self.leases.get(key)
        if current is None or current[0] == holder or now - current[1] > self.lease_seconds:
            self.leases[key] = (holder, now)
            return True
        return False

    def renew(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            self.leases[key] = (holder, time.monotonic())

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            del self.leases[key]


LEASE_SECONDS = 60.0
LEASE_POLL_SECONDS = 2.0


_leases: dict[str, ray.actor.ActorHandle] = {}  # held for the process's life: Ray ends an actor with its owner's last handle
_leases_lock = threading.Lock()


def pretrain_leases(cache: str, lease_seconds: float = LEASE_SECONDS) -> ray.actor.ActorHandle:
    """The leases actor of one pre-training cache (created by the first caller: the sweep driver
    creates it before any trial, so it lives as long as the sweep)."""
    with _leases_lock:
        if cache not in _leases:
            _leases[cache] = ray.remote(num_cpus=0)(PretrainLeases).options(
                name=f"mimir-pretrain-leases:{cache}", get_if_exists=True).remote(lease_seconds)
        return _leases[cache]


def release_pretrain_leases(leases: ray.actor.ActorHandle) -> None:
    """End a sweep's leases actor (its trials are done)."""
    for cache, handle in list(_leases.items()):
        if handle == leases:
            del _leases[cache]
    ray.kill(leases)


@contextlib.contextmanager
def cache_lease(cache: str | None, key: str) -> Iterator[None]:
    """Hold the lease on one cached pre-training while checking and filling it (nothing to hold
    without a cache); renewed from a thread every third of the lease."""
    if cache is None:
        yield
        return
    leases = pretrain_leases(cache)
    holder = uuid.uuid4().hex
    lease_seconds = ray.get(leases.lease.remote())
    while not ray.get(leases.try_acquire.remote(key, holder)):
        time.sleep(LEASE_POLL_SECONDS)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds / 3):
            ray.get(leases.renew.remote(key, holder))

    renewer = threading.Thread(target=renew, daemon=True, name=f"lease {key}")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        ray.get(leases.release.remote(key, holder))


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
    manifest = load_manifest(resolve_dataset(cfg.data))  # a missing dataset stops here, before anything is removed
    check_trackers(cfg.log)
    if cfg.data.generated:
        load_manifest(resolve_dataset(cfg.data.model_copy(update={"dataset": cfg.data.generated})))
    replaced = check_output(cfg, stages, resume=resume, overwrite=overwrite, pretrained_given=pretrained_given,
                            finetuned_given=finetuned_given, remove=not dry_run)
    storage = storage_root(cfg)
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
        test_rows = manifest["splits"]["test"]["num_rows"]
        lines.append(f"evaluate: {', '.join(cfg.evaluate.attacks)} on "
                     f"{min(test_rows, cfg.evaluate.num_images or test_rows)} test images")
    lines.append(f"accelerator: {accelerator(cfg)}")
    check_run_memory(cfg, training)  # an OOM kill an hour in is worse than a message now
    lines.append(f"memory: each training stage's batch fits ({', '.join(training) or 'nothing trains'})")
    return training, lines


def run_pipeline(cfg: RunConfig, stages: Sequence[str] = STAGES, *, resume: bool = False, overwrite: bool = False,
                 pretrained: ray.train.Checkpoint | None = None,
                 finetuned: ray.train.Checkpoint | None = None) -> dict[str, Any]:
    """``mimir run`` and the single-stage commands: check the output folder, run the stages, write
    ``results.json`` (or ``failed.json`` for a diverged run) and return the results."""
    preflight(cfg, stages, resume=resume, overwrite=overwrite, pretrained_given=pretrained is not None,
              finetuned_given=finetuned is not None)
    storage = storage_root(cfg)
    init_ray()
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    try:
        results = run_stages(cfg, stages, storage=storage, resume=resume, pretrained=pretrained,
                             finetuned=finetuned)
    except NonFiniteRun as err:
        record_failure(out, cfg, err)
        raise
    write_json_atomically(out / "results.json", results)
    (out / FAILED).unlink(missing_ok=True)  # an earlier attempt's failure no longer describes this folder
    return results
