"""Stage records and the run folder: where each stage's Ray Train run lives, whether a finished stage
can be reused (same stage hash) or an unfinished one resumed, the checks before anything trains,
and the files that say how a run ended.

Storage: every stage is a Ray Train run ``<storage>/<stage name>`` (storage = ``scaling.storage_path``
or ``output_dir``; a local path or a URI such as ``s3://bucket/x``). Re-creating a trainer with the
same storage and name makes Ray Train restore its latest checkpoint, which is how ``--resume`` and
driver restarts continue; a finished stage leaves ``mimir_stage.json`` in its run folder and is not
run again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train

from mimir.config import FAILED, STAGE_RECORD, RunConfig, config_changes
from mimir.errors import NonFiniteRun, StageExistsError
from mimir.storage import filesystem, is_remote, read_bytes, write_json


def storage_root(cfg: RunConfig) -> str:
    """Absolute local path or URI under which the stages' Ray Train runs live."""
    root = cfg.scaling.storage_path or cfg.output_dir
    return root if "://" in root else str(Path(root).expanduser().resolve())


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def read_stage_record(storage: str, name: str) -> dict[str, Any] | None:
    data = read_bytes(_join(storage, name, STAGE_RECORD))
    return None if data is None else json.loads(data)


def _write_stage_record(storage: str, name: str, record: dict[str, Any]) -> None:
    write_json(_join(storage, name, STAGE_RECORD), record)


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


def checkpoints_to_read(cfg: RunConfig, stages: Sequence[str], *, resume: bool = False,
                        pretrained_given: bool = False, finetuned_given: bool = False) -> list[str]:
    """The checkpoints in the run folder that this run will start from (an unfinished stage's latest
    under --resume, the pre-training fine-tuning starts from, the fine-tuning evaluated), so that a
    damaged one is named before anything starts. Empty for remote storage: a worker verifies what
    it downloads."""
    storage = storage_root(cfg)
    if is_remote(storage):
        return []
    paths = []
    records = {stage: read_stage_record(storage, stage) for stage in ("pretrain", "finetune")}
    for stage in ("pretrain", "finetune"):
        if stage in stages and records[stage] is None and resume and _run_exists(storage, stage):
            try:
                latest = ray.train.Result.from_path(_join(storage, stage)).checkpoint
            except RuntimeError:  # no checkpoint registered yet
                latest = None
            if latest is not None:
                paths.append(latest.path)
    if ("finetune" in stages and records["finetune"] is None and cfg.pretrain.enabled and not pretrained_given
            and records["pretrain"] is not None):
        paths.append(stage_checkpoint(storage, records["pretrain"]).path)
    if "evaluate" in stages and not finetuned_given and records["finetune"] is not None:
        paths.append(stage_checkpoint(storage, records["finetune"], cfg.evaluate.checkpoint).path)
    return paths


def check_finite(stage: str, record: dict[str, Any] | None) -> None:
    """Raise NonFiniteRun when a finished stage diverged: its weights are no result."""
    metrics = (record or {}).get("metrics", {})
    loss, skipped = metrics.get("loss", 0.0), metrics.get("skipped", 0.0)
    if not math.isfinite(loss) or skipped > 0.5:
        raise NonFiniteRun(stage, f"ended with loss {loss} ({skipped:.0%} of steps skipped as non-finite)")


def record_failure(out: Path, cfg: RunConfig, err: BaseException) -> None:
    """``failed.json`` where ``results.json`` would be: the config and the reason."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / FAILED, {"config": cfg.model_dump(mode="json"),
                                         "reason": f"{type(err).__name__}: {err}"})
