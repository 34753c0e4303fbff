"""What a run leaves to look at: each stage's metrics in its run folder, three ways.

- ``metrics.jsonl``: one JSON object per epoch, every key (mimir reads it back on resume, and
  ``mimir plot`` draws it);
- ``metrics.csv``: the same table for spreadsheets and pandas;
- TensorBoard event files (tensorboardX): ``tensorboard --logdir RUN_OR_EXPERIMENT`` shows every
  stage (and every trial of a sweep) as a run, with the tags ``train/*``, ``validation/*``,
  ``time/*`` per epoch and ``evaluate/*`` (test accuracy per attack, at the last fine-tuning epoch).

Folders may be local paths or URIs (``s3://``, ``gs://``): each file is rewritten whole (the
TensorBoard file is written locally and copied up), so object stores work too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

HISTORY = "metrics.jsonl"
TABLE = "metrics.csv"
EVENTS_PREFIX = "events.out.tfevents."
TIMING_KEYS = ("seconds", "images_per_second", "probe_seconds", "validation_seconds")
UNPLOTTED = ("epoch", "checkpoint_score")  # the step itself; a selection score (-inf between validations)


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a per-epoch metric, or None for what is not a curve."""
    if key in UNPLOTTED:
        return None
    if key.startswith("val_"):
        return f"validation/{key.removeprefix('val_')}"
    if key in TIMING_KEYS:
        return f"time/{key}"
    return f"train/{key}"


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).expanduser().resolve()))


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


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
    fs, path = _fs(folder)
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

        self.fs, self.path = _fs(folder)
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
        self.writer.flush()
        if self.remote:
            for name in Path(self.local).iterdir():
                _write(self.fs, f"{self.path}/{name.name}", name.read_bytes())

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


class MetricsLog:
    """A stage's per-epoch metrics in its run folder (rank 0 writes it). A resumed run keeps the
    epochs before the one it resumes at and rewrites the later ones."""

    def __init__(self, folder: str, start_epoch: int):
        self.fs, self.path = _fs(folder)
        self.records = [r for r in read_history(folder) if r["epoch"] < start_epoch] if start_epoch else []
        self.events = _Events(folder)
        for record in self.records:
            self.events.scalars(_curves(record), record["epoch"] + 1)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        _write(self.fs, f"{self.path}/{HISTORY}", "".join(json.dumps(r) + "\n" for r in self.records).encode())
        _write(self.fs, f"{self.path}/{TABLE}", csv_text(self.records).encode())
        self.events.scalars(_curves(record), record["epoch"] + 1)  # x axis: epochs done

    def close(self) -> None:
        self.events.close()


def write_evaluation(folder: str, results: dict[str, Any], step: int) -> None:
    """The test accuracies of an evaluation: ``metrics.csv`` (attack, accuracy %, seconds) and the
    TensorBoard tags ``evaluate/<attack>`` at ``step`` (the fine-tuning epochs)."""
    fs, path = _fs(folder)
    rows = [{"attack": attack, "accuracy": accuracy, "seconds": results["attack_seconds"].get(attack),
             "num_images": results["num_images"]} for attack, accuracy in results["accuracy"].items()]
    _write(fs, f"{path}/{TABLE}", csv_text(rows).encode())
    events = _Events(folder)
    events.scalars({f"evaluate/{attack}": accuracy for attack, accuracy in results["accuracy"].items()}, step)
    events.close()
