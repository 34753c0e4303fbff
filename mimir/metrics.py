"""What a run leaves to look at: each stage's metrics in its run folder, three ways.

- ``metrics.jsonl``: one JSON object per epoch, every key (mimir reads it back on resume, and
  ``mimir plot`` draws it);
- ``metrics.csv``: the same table for spreadsheets and pandas;
- TensorBoard event files (tensorboardX): ``tensorboard --logdir RUN_OR_EXPERIMENT`` shows every
  stage (and every trial of a sweep) as a run, with the tags ``train/*``, ``validation/*``,
  ``time/*`` per epoch and ``evaluate/*`` (test accuracy per attack, at the last fine-tuning epoch).

Folders may be local paths or URIs (``s3://``, ``gs://``): each file is rewritten whole (the
TensorBoard file is written locally and copied up), so object stores work too.

With ``log.mlflow`` or ``log.wandb`` in the config, the same curves (same tag names) and the test
accuracies also go to MLflow or Weights & Biases, one tracker run per stage named
``<config name>/<stage>``, through Ray's integrations (``setup_mlflow``, ``setup_wandb``). Neither
package is required otherwise.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from mimir.storage import filesystem, with_retries, write_bytes

HISTORY = "metrics.jsonl"
TABLE = "metrics.csv"
EVENTS_PREFIX = "events.out.tfevents."
TIMING_KEYS = ("seconds", "images_per_second", "data_seconds", "probe_seconds", "validation_seconds")
# the step itself; a selection score (-inf between validations); the epoch's wall-clock start
UNPLOTTED = ("epoch", "checkpoint_score", "started_at")


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a per-epoch metric, or None for what is not a curve."""
    if key in UNPLOTTED:
        return None
    if key.startswith("val_"):
        return f"validation/{key.removeprefix('val_')}"
    if key in TIMING_KEYS:
        return f"time/{key}"
    return f"train/{key}"



def csv_text(records: list[dict[str, Any]]) -> str:
    """Records as CSV, one column per key in order of first appearance (blank where absent)."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def read_history(folder: str) -> list[dict[str, Any]]:
    """A stage's per-epoch metrics, oldest first; empty before its first epoch."""
    fs, path = filesystem(folder)
    path = f"{path}/{HISTORY}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    with fs.open_input_stream(path) as stream:
        return [json.loads(line) for line in stream.read().decode().splitlines()]


class _Events:
    """A TensorBoard event file for ``folder``, written locally and copied there if it is a URI.
    Earlier event files in the folder are removed: their steps are rewritten from the kept records."""

    def __init__(self, folder: str):
        # the synchronous writer: SummaryWriter queues events for a thread, and its flush() does not
        # wait for that queue, so a copy to a URI could miss the epoch just logged
        from tensorboardX.event_file_writer import EventsWriter

        self.folder, (self.fs, self.path) = folder, filesystem(folder)
        self.remote = "://" in folder
        self.fs.create_dir(self.path, recursive=True)
        for info in self.fs.get_file_info(pafs.FileSelector(self.path)):
            if info.base_name.startswith(EVENTS_PREFIX):
                self.fs.delete_file(info.path)
        self.local = tempfile.mkdtemp(prefix="mimir-events-") if self.remote else self.path
        self.writer = EventsWriter(f"{self.local}/events")

    def scalars(self, values: dict[str, float], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for tag, value in values.items():
            self.writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(tag, value)))
        with_retries(self.local, self.writer.flush, waits=())
        if self.remote:
            for name in Path(self.local).iterdir():
                write_bytes(f"{self.folder.rstrip('/')}/{name.name}", name.read_bytes())

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def _curves(record: dict[str, Any]) -> dict[str, float]:
    curves = {}
    for key, value in record.items():
        tag = tensorboard_tag(key)
        if tag is not None and isinstance(value, (int, float)) and math.isfinite(value):
            curves[tag] = float(value)
    return curves


def check_trackers(log: Any) -> None:
    """Before anything runs: a tracker the config asks for must have its package installed."""
    from mimir.errors import ConfigError

    for field in ("mlflow", "wandb"):
        if getattr(log, field) is not None and importlib.util.find_spec(field) is None:
            raise ConfigError(f"log.{field} is set, but the {field} package is not installed "
                              f"(pip install {field}), or remove log.{field}")


class Tracker:
    """An experiment tracker run (MLflow or W&B) that receives the same curves as TensorBoard."""

    def __init__(self, log: Any, run_name: str, params: dict[str, Any]):
        self.mlflow = self.wandb = None
        if log.mlflow is not None:
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(params, tracking_uri=log.mlflow.tracking_uri,
                                       experiment_name=log.mlflow.experiment, run_name=run_name,
                                       create_experiment_if_not_exists=True)
        if log.wandb is not None:
            from ray.air.integrations.wandb import setup_wandb

            self.wandb = setup_wandb(params, project=log.wandb.project, name=run_name, mode=log.wandb.mode,
                                     trial_id=None, trial_name=run_name, group=None)

    @classmethod
    def for_run(cls, cfg: Any, stage: str) -> Tracker | None:
        """The stage's tracker run when the config asks for one."""
        if cfg.log.mlflow is None and cfg.log.wandb is None:
            return None
        from mimir.config import flatten

        return cls(cfg.log, f"{cfg.name}/{stage}", flatten(cfg.model_dump(mode="json")))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


class MetricsLog:
    """A stage's per-epoch metrics in its run folder (rank 0 writes it), and to ``tracker`` when
    there is one. A resumed run keeps the epochs before the one it resumes at and rewrites the
    later ones."""

    def __init__(self, folder: str, start_epoch: int, tracker: Tracker | None = None):
        self.folder = folder.rstrip("/")
        self.records = [r for r in read_history(folder) if r["epoch"] < start_epoch] if start_epoch else []
        self.sinks: list[_Events | Tracker] = [_Events(folder), *([tracker] if tracker else [])]
        for record in self.records:
            self._curves(record)

    def _curves(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.scalars(_curves(record), record["epoch"] + 1)  # x axis: epochs done

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        write_bytes(f"{self.folder}/{HISTORY}", "".join(json.dumps(r) + "\n" for r in self.records).encode())
        write_bytes(f"{self.folder}/{TABLE}", csv_text(self.records).encode())
        self._curves(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def write_evaluation(folder: str, results: dict[str, Any], step: int, tracker: Tracker | None = None) -> None:
    """The test accuracies of an evaluation: ``metrics.csv`` (attack, accuracy %, seconds) and the
    tags ``evaluate/<attack>`` at ``step`` (the fine-tuning epochs) in TensorBoard and ``tracker``."""
    rows = [{"attack": attack, "accuracy": accuracy, "seconds": results["attack_seconds"].get(attack),
             "num_images": results["num_images"]} for attack, accuracy in results["accuracy"].items()]
    write_bytes(f"{folder.rstrip('/')}/{TABLE}", csv_text(rows).encode())
    accuracies = {f"evaluate/{attack}": accuracy for attack, accuracy in results["accuracy"].items()}
    for sink in (_Events(folder), *([tracker] if tracker else [])):
        sink.scalars(accuracies, step)
        sink.close()
