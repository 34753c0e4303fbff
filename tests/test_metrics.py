"""What a run leaves to look at: metrics.jsonl, metrics.csv and TensorBoard event files per stage,
kept consistent across a resume; evaluation accuracies; curves drawn by `mimir plot`."""

import csv
import json
import math
import struct

import pytest
from tensorboardX.proto.event_pb2 import Event

from mimir.metrics import EVENTS_PREFIX, MetricsLog, read_history, tensorboard_tag, write_evaluation


def read_events(folder):
    """Every scalar in a folder's TensorBoard event files: {tag: {step: value}} (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    scalars = {}
    for path in sorted(folder.glob(EVENTS_PREFIX + "*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def _epoch(epoch, **extra):
    return {"loss": 2.0 - epoch / 10, "acc": 0.1 * epoch, "epoch": epoch, "lr": 1e-3, "seconds": 5.0,
            "images_per_second": 200.0, **extra}


def test_each_epoch_is_written_as_json_csv_and_tensorboard(tmp_path):
    log = MetricsLog(str(tmp_path), start_epoch=0)
    log.append(_epoch(0, checkpoint_score=-math.inf))
    log.append(_epoch(1, val_natural=55.0, val_pgd=30.0, checkpoint_score=30.0))
    log.close()
    assert [r["epoch"] for r in read_history(str(tmp_path))] == [0, 1]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == [2.0, 1.9]
    assert rows[0]["val_pgd"] == "" and float(rows[1]["val_pgd"]) == 30.0
    events = read_events(tmp_path)
    assert events["train/loss"] == pytest.approx({1: 2.0, 2: 1.9})
    assert events["validation/pgd"] == {2: 30.0} and events["validation/natural"] == {2: 55.0}
    assert set(events) == {"train/loss", "train/acc", "train/lr", "time/seconds", "time/images_per_second",
                           "validation/natural", "validation/pgd"}


def test_tensorboard_itself_reads_a_runs_curves(tmp_path):
    """The README's `tensorboard --logdir RUN` after `pip install -e ".[tensorboard]"`: TensorBoard's
    own reader (what its server serves) finds every stage's curves in a run folder."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    for stage in ("pretrain", "finetune"):
        log = MetricsLog(str(tmp_path / stage), start_epoch=0)
        log.append(_epoch(0))
        log.append(_epoch(1, val_pgd=30.0))
        log.close()
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path)).Reload()
    assert set(runs.Runs()) == {"pretrain", "finetune"}
    losses = runs.Scalars("finetune", "train/loss")
    assert [e.step for e in losses] == [1, 2] and [e.value for e in losses] == pytest.approx([2.0, 1.9])
    assert [(e.step, e.value) for e in runs.Scalars("finetune", "validation/pgd")] == [(2, 30.0)]


def test_a_resumed_stage_rewrites_the_epochs_it_runs_again(tmp_path):
    log = MetricsLog(str(tmp_path), 0)
    for epoch in range(3):
        log.append(_epoch(epoch))
    log.close()
    # killed after epoch 2 was logged but before its checkpoint: the run resumes at epoch 2
    resumed = MetricsLog(str(tmp_path), start_epoch=2)
    resumed.append(_epoch(2, loss=0.5))
    resumed.close()
    assert [r["loss"] for r in read_history(str(tmp_path))] == [2.0, 1.9, 0.5]
    assert len(list(tmp_path.glob(EVENTS_PREFIX + "*"))) == 1
    assert read_events(tmp_path)["train/loss"] == pytest.approx({1: 2.0, 2: 1.9, 3: 0.5})


def test_evaluation_writes_its_accuracies(tmp_path):
    write_evaluation(str(tmp_path), {"accuracy": {"natural": 80.0, "pgd20": 50.5}, "num_images": 64,
                                     "attack_seconds": {"natural": 0.1, "pgd20": 3.0}}, step=20)
    with open(tmp_path / "metrics.csv") as f:
        assert [(r["attack"], float(r["accuracy"])) for r in csv.DictReader(f)] == [("natural", 80.0), ("pgd20", 50.5)]
    assert read_events(tmp_path) == {"evaluate/natural": {20: 80.0}, "evaluate/pgd20": {20: 50.5}}


def test_tags():
    assert tensorboard_tag("mi_term") == "train/mi_term" and tensorboard_tag("val_pgd") == "validation/pgd"
    assert tensorboard_tag("epoch") is None and tensorboard_tag("checkpoint_score") is None


def test_a_uri_folder_gets_the_same_files(tmp_path):
    log = MetricsLog(f"file://{tmp_path}/stage", 0)
    log.append(_epoch(0))
    log.close()
    assert json.loads((tmp_path / "stage" / "metrics.jsonl").read_text())["epoch"] == 0
    assert read_events(tmp_path / "stage")["train/loss"] == {1: 2.0}


def _stage(folder, epochs, **extra):
    log = MetricsLog(str(folder), 0)
    for epoch in range(epochs):
        log.append(_epoch(epoch, **extra))
    log.close()


def test_plot_draws_a_run_and_every_trial_of_a_sweep(tmp_path, capsys):
    from matplotlib.image import imread

    from mimir.cli import main
    from mimir.plot import find_histories

    run = tmp_path / "run"
    _stage(run / "pretrain", 3, mse=1.0, mi_term=1e-4)
    _stage(run / "finetune", 4, val_natural=50.0, val_pgd=20.0)
    assert main(["plot", str(run)]) == 0
    assert f"curves: {run / 'curves.png'}" in capsys.readouterr().out
    assert imread(run / "curves.png").shape[:2] == (540, 1440)  # two panels at 120 dpi
    assert {k: set(v) for k, v in find_histories(run).items()} == {"run": {"pretrain", "finetune"}}

    sweep = tmp_path / "sweep"
    for trial in ("trials/a", "trials/b/seed-1"):
        _stage(sweep / trial / "finetune", 2)
    _stage(sweep / "pretrain_cache" / "0123abcd", 2, mse=1.0)
    assert set(find_histories(sweep)) == {"trials/a", "trials/b/seed-1", "pretrain_cache/0123abcd"}
    assert main(["plot", str(sweep), "--out", str(tmp_path / "sweep.png")]) == 0
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_plot_names_a_folder_without_metrics(tmp_path, capsys):
    from mimir.cli import main

    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl below it" in capsys.readouterr().err


def test_a_tracker_without_its_package_is_a_named_error(monkeypatch):
    import importlib.util

    from mimir.config import build_config
    from mimir.errors import ConfigError
    from mimir.metrics import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "wandb") else real(name, *a))
    check_trackers(build_config({}).log)  # none asked for: nothing needed
    for field in ("mlflow", "wandb"):
        with pytest.raises(ConfigError, match=f"log.{field} is set, but the {field} package is not installed"):
            check_trackers(build_config({"log": {field: {}}}).log)


def test_mlflow_receives_the_curves_and_the_test_accuracies(tmp_path, tiny_config):
    """Through Ray's setup_mlflow, as a worker's rank 0 does (skipped where mlflow is not installed)."""
    mlflow = pytest.importorskip("mlflow")
    from mimir.config import build_config
    from mimir.metrics import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config(tiny_config.model_dump(mode="json") | {"name": "toy", "log": {"mlflow": {"tracking_uri": uri}}})
    log = MetricsLog(str(tmp_path / "finetune"), 0, Tracker.for_run(cfg, "finetune"))
    for epoch in range(2):
        log.append(_epoch(epoch))
    log.close()
    write_evaluation(str(tmp_path / "evaluate"), {"accuracy": {"natural": 80.0}, "num_images": 8,
                                                   "attack_seconds": {"natural": 0.1}}, 10,
                     Tracker.for_run(cfg, "evaluate"))
    client = mlflow.tracking.MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("mimir").experiment_id])}
    assert set(runs) == {"toy/finetune", "toy/evaluate"}
    history = client.get_metric_history(runs["toy/finetune"].info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, pytest.approx(1.9))]
    assert runs["toy/evaluate"].data.metrics == {"evaluate/natural": 80.0}
    assert runs["toy/finetune"].data.params["finetune.blr"] == str(cfg.finetune.blr)


def test_wandb_offline_receives_the_curves(tmp_path, tiny_config, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from mimir.config import build_config
    from mimir.metrics import Tracker

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # Ray's setup_wandb wants one even offline, where it is never sent
    cfg = build_config(tiny_config.model_dump(mode="json") | {"name": "toy", "log": {"wandb": {"mode": "offline"}}})
    tracker = Tracker.for_run(cfg, "pretrain")
    log = MetricsLog(str(tmp_path / "pretrain"), 0, tracker)
    log.append(_epoch(0, loss=1.2345))
    assert tracker.wandb.name == "toy/pretrain" and tracker.wandb.config["pretrain.epochs"] == cfg.pretrain.epochs
    log.close()
    assert wandb.run is None  # finished
    # the offline run file (what `wandb sync` uploads) holds the logged history: its protobuf
    # records carry the keys and JSON values as plain bytes
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    assert b"train/loss" in data and b"1.2345" in data and b"time/images_per_second" in data
