"""A finished or unfinished stage in output_dir is reused or continued only for the same config; any
other config stops before Ray starts, names what changed, and leaves the folder as it was."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from mimir import cli, config, errors, pretrain_cache, runner, stages, trainers
from mimir.config import load_config

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _config(out, *overrides):
    return load_config(QUICKSTART, [f"output_dir={out}", f"data.root={out.parent / 'data'}", *overrides])


def _finish(cfg, stage):
    """Leave a stage record and its checkpoint as a finished TorchTrainer stage would."""
    import torch

    from mimir.train.checkpoint import save_checkpoint

    storage = stages.storage_root(cfg)
    save_checkpoint(Path(storage) / stage / "checkpoint_x", torch.nn.Linear(1, 1), {"epoch": 0, "stage": stage})
    stages._write_stage_record(storage, stage, {
        "stage": stage, "checkpoint": f"{stage}/checkpoint_x", "metrics": {},
        "stage_hash": cfg.stage_hash(stage), "stage_config": cfg.stage_config(stage)})


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    cfg = _config(out)
    _finish(cfg, "pretrain")
    _finish(cfg, "finetune")
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    return out, cfg


def test_the_same_config_reuses_both_stages(finished):
    out, cfg = finished
    storage = stages.storage_root(cfg)
    assert stages.check_stage("pretrain", cfg, storage, "pretrain", resume=False)
    assert stages.check_stage("finetune", cfg, storage, "finetune", resume=False)
    # evaluation settings are not part of what the stages trained
    stages.check_output(_config(out, "evaluate.attacks=[natural]"), config.STAGES)


def test_a_changed_pretraining_config_is_refused_naming_the_field(finished):
    out, cfg = finished
    with pytest.raises(errors.StageExistsError, match=r"pretrain\.mask_ratio: 0\.75 -> 0\.5"):
        stages.check_output(_config(out, "pretrain.mask_ratio=0.5"), config.STAGES)
    with pytest.raises(errors.StageExistsError, match=r"model\.depth: 4 -> 2"):
        stages.check_output(_config(out, "model.depth=2"), ("evaluate",))  # would not load the weights


def test_a_changed_finetuning_config_keeps_the_pretraining_and_refuses_the_finetuning(finished):
    out, cfg = finished
    blr = cfg.finetune.blr * 2
    changed = _config(out, f"finetune.blr={blr}")
    storage = stages.storage_root(changed)
    assert stages.check_stage("pretrain", changed, storage, "pretrain", resume=False)
    with pytest.raises(errors.StageExistsError, match=re.escape(f"finetune.blr: {cfg.finetune.blr} -> {blr}")):
        stages.check_output(changed, config.STAGES)
    stages.check_output(changed, config.STAGES, overwrite=True)  # clears only what no longer fits
    assert stages.read_stage_record(storage, "pretrain") is not None
    assert not (Path(storage) / "finetune").exists()


def test_the_cli_refuses_before_ray_and_leaves_config_json_alone(finished, capsys):
    out, cfg = finished
    before = (out / "config.json").read_text()
    assert cli.main(["run", str(QUICKSTART), f"output_dir={out}", f"data.root={out.parent / 'data'}",
                     "pretrain.mask_ratio=0.5"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.mask_ratio" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "config.json").read_text() == before


def test_resume_continues_only_an_unfinished_run_of_the_same_config(tmp_path):
    out = tmp_path / "run"
    cfg = _config(out)
    checkpoint = Path(stages.storage_root(cfg)) / "pretrain" / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"epoch": 3, "config": cfg.model_dump(mode="json")}))
    storage = stages.storage_root(cfg)
    with pytest.raises(errors.StageExistsError, match="--resume"):
        stages.check_stage("pretrain", cfg, storage, "pretrain", resume=False)
    assert stages.check_stage("pretrain", cfg, storage, "pretrain", resume=True) is False  # runs on
    with pytest.raises(errors.StageExistsError, match=r"pretrain\.blr"):
        stages.check_stage("pretrain", _config(out, "pretrain.blr=0.01"), storage, "pretrain", resume=True)


def test_a_diverged_stage_is_no_result():
    stages.check_finite("pretrain", {"metrics": {"loss": 0.7, "skipped": 0.1}})
    with pytest.raises(errors.NonFiniteRun, match="finetune ended with loss nan") as err:
        stages.check_finite("finetune", {"metrics": {"loss": float("nan"), "skipped": 0.0}})
    assert err.value.stage == "finetune"
    with pytest.raises(errors.NonFiniteRun, match="60% of steps skipped"):
        stages.check_finite("pretrain", {"metrics": {"loss": 0.7, "skipped": 0.6}})


def test_mimir_run_of_a_diverged_run_writes_failed_json_and_no_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(runner, "init_ray", lambda: None)

    def diverges(*args, **kwargs):
        raise errors.NonFiniteRun("finetune", "ended with loss nan (100% of steps skipped as non-finite)")

    monkeypatch.setattr(runner, "run_stages", diverges)
    assert cli.main(["run", str(QUICKSTART), f"output_dir={out}", f"data.root={tmp_path / 'data'}"]) == 1
    assert "finetune.blr" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    failed = json.loads((out / "failed.json").read_text())
    assert "loss nan" in failed["reason"] and failed["config"]["output_dir"] == str(out)


def test_a_restarted_worker_group_gets_its_data_at_the_epoch_it_resumes(tmp_path, monkeypatch):
    """Ray Train calls the dataset factory at every worker-group start: the first start gets the
    dataset built up front, a restart one rebuilt at the epoch after the newest checkpoint that Ray
    Train registered (the one it restores)."""
    built = []

    def datasets(start_epoch):
        built.append(start_epoch)
        return {"train": f"data from epoch {start_epoch}"}

    factory = trainers._restart_aware(datasets, str(tmp_path), "finetune", "train", "first")
    assert factory() == "first" and built == []
    registered = {}  # run folder -> the epoch of its newest registered checkpoint

    def from_path(path):
        if path not in registered:
            raise RuntimeError(f"Experiment folder {path} doesn't exist.")
        return SimpleNamespace(checkpoint=object(), metrics={"epoch": registered[path]})

    monkeypatch.setattr(stages.ray.train.Result, "from_path", from_path)
    registered[str(tmp_path / "finetune")] = 4
    assert factory() == "data from epoch 5" and built == [5]
    assert stages.resume_epoch(str(tmp_path), "pretrain") == 0


def test_a_checkpoint_folder_ray_train_never_registered_does_not_move_the_data_epoch(tmp_path):
    """A driver killed right after a worker wrote checkpoint files, before Ray Train registered
    them: Ray Train restarts from scratch there, and so must the data (seen with a killed driver
    that had joined a running cluster)."""
    folder = tmp_path / "finetune" / "checkpoint_2026-01-01_00-00-01"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"epoch": 0}))
    assert stages.resume_epoch(str(tmp_path), "finetune") == 0


def test_pretrain_leases_exclude_and_lapse(monkeypatch):
    """One trial at a time fills a cached pre-training; a holder that stops renewing (its process
    or node died) loses the lease after lease_seconds."""

    clock = [100.0]
    monkeypatch.setattr(pretrain_cache.time, "monotonic", lambda: clock[0])
    leases = pretrain_cache.PretrainLeases(lease_seconds=60)
    assert leases.try_acquire("abc", "trial-1") and not leases.try_acquire("abc", "trial-2")
    assert leases.try_acquire("other", "trial-2")  # another pre-training is free
    clock[0] += 50
    leases.renew("abc", "trial-1")
    clock[0] += 50  # 100 s after taking it, 50 after renewing: still held
    assert not leases.try_acquire("abc", "trial-2")
    leases.release("abc", "trial-2")  # only the holder releases
    assert not leases.try_acquire("abc", "trial-2")
    clock[0] += 61  # trial-1 went silent
    assert leases.try_acquire("abc", "trial-2")
    leases.release("abc", "trial-2")
    assert leases.try_acquire("abc", "trial-3")


def test_one_trial_at_a_time_fills_a_cached_pretraining(ray_local, tmp_path):
    """Through the leases actor, as trials on several nodes would: never two inside at once."""
    import threading
    import time


    inside, seen = [0], []

    def trial():
        with pretrain_cache.cache_lease(f"file://{tmp_path}/pretrain_cache", "abc"):
            inside[0] += 1
            seen.append(inside[0])
            time.sleep(0.3)
            inside[0] -= 1

    threads = [threading.Thread(target=trial) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == [1, 1, 1]


def test_only_stages_that_will_train_are_checked_for_memory(finished, monkeypatch):
    """The memory pre-check probes the stages a run trains, not the finished ones it reuses."""
    out, cfg = finished
    checked = []
    monkeypatch.setattr(runner, "check_run_memory", lambda cfg, stages: checked.append(list(stages)))
    monkeypatch.setattr(runner, "init_ray", lambda: None)
    monkeypatch.setattr(runner, "run_stages", lambda *a, **k: {"seconds": {}})
    runner.run_pipeline(cfg)
    runner.run_pipeline(cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"blr": 1e-3})}),
                        overwrite=True)
    assert checked == [[], ["finetune"]]


def test_a_dry_run_checks_everything_and_says_what_each_stage_would_do_without_training(
        tmp_path, data_root, monkeypatch, capsys):
    from mimir.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runner, "init_ray", lambda *a, **k: pytest.fail("a dry run must not start Ray"))
    out = tmp_path / "run"
    args = ["run", str(QUICKSTART), f"output_dir={out}", f"data.root={data_root}"]
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "pretrain: trains 20 epochs at batch 128" in printed and "finetune: trains 40 epochs at batch 32" in printed
    assert "evaluate: natural, pgd20 on 450 test images" in printed and "accelerator: CPU" in printed
    assert "memory: each training stage's batch fits" in printed and not out.exists()
    # the first problem ends it, non-zero, before anything runs
    import torch

    if not torch.cuda.is_available():
        assert main([*args, "scaling.use_gpu=true", "--dry-run"]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
    assert main([*args, "data.dataset=nowhere", "--dry-run"]) == 2
    assert "dataset 'nowhere' not found" in capsys.readouterr().err


def test_a_damaged_checkpoint_a_run_starts_from_is_named_before_ray_starts(finished, monkeypatch):
    out, cfg = finished
    monkeypatch.setattr(runner, "init_ray", lambda *a, **k: pytest.fail("checked before Ray starts"))
    weights = out / "finetune" / "checkpoint_x" / "model.safetensors"  # what evaluation would load
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(errors.CheckpointError, match=f"{weights}: truncated"):
        runner.run_pipeline(cfg)
    with pytest.raises(errors.CheckpointError):  # the same for `mimir evaluate` alone
        runner.run_pipeline(cfg, ("evaluate",))
    runner.preflight(cfg, ("pretrain",))  # a stage that does not read it passes


def test_the_workers_evaluation_counts_only_for_this_call_and_the_checkpoint_the_record_names(tmp_path):
    cfg = _config(tmp_path / "run", "evaluate.checkpoint=best")
    storage = stages.storage_root(cfg)
    stages._write_stage_record(storage, "finetune", {
        "stage": "finetune", "checkpoint": "finetune/checkpoint_b", "metrics": {"epoch": 4},
        "best_checkpoint": "finetune/checkpoint_a", "best_metrics": {"epoch": 2}})
    path = str(Path(storage) / "finetune" / trainers.EVALUATION_FILE)
    asked = {"path": path, "token": "this-call"}
    assert trainers._workers_evaluation(cfg, storage, "finetune", asked) is None  # none written
    written = {"accuracy": {"natural": 90.0}, "num_images": 450, "seconds": {"natural": 1.0}, "workers": 2,
               "window": [10.0, 12.0]}
    Path(path).write_text(json.dumps({**written, "token": "this-call", "epoch": 2}))
    taken = trainers._workers_evaluation(cfg, storage, "finetune", asked)
    assert taken["accuracy"] == {"natural": 90.0} and taken["checkpoint"].endswith("finetune/checkpoint_a")
    # an earlier call's file, or weights of another epoch than the best checkpoint's: the task evaluates
    assert trainers._workers_evaluation(cfg, storage, "finetune", {**asked, "token": "another"}) is None
    Path(path).write_text(json.dumps({**written, "token": "this-call", "epoch": 4}))
    assert trainers._workers_evaluation(cfg, storage, "finetune", asked) is None
    last = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"checkpoint": "last"})})
    assert trainers._workers_evaluation(last, storage, "finetune", asked)["checkpoint"].endswith("checkpoint_b")
    assert trainers._workers_evaluation(cfg, storage, "finetune", None) is None  # not asked


def test_an_evaluation_in_the_fine_tuning_workers_gets_its_own_window():
    seconds, windows = {"finetune": 50.0}, {"finetune": [100.0, 150.0]}
    runner._split_window(seconds, windows, 140.0)
    assert windows == {"finetune": [100.0, 140.0], "evaluate": [140.0, 150.0]}
    assert seconds == {"finetune": 40.0, "evaluate": 10.0}
    seconds, windows = {"finetune": 50.0}, {"finetune": [100.0, 150.0]}
    runner._split_window(seconds, windows, 151.0)  # a worker's clock a little ahead: kept in the stage
    assert windows["evaluate"] == [150.0, 150.0] and seconds["finetune"] == 50.0
