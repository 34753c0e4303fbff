"""Runs are first-class: `mimir runs DIR` lists what is under a folder, `mimir compare` puts runs
side by side, from the files a run leaves (no Ray, no training)."""

import json

import pytest

from mimir.cli import main
from mimir.runs import fixed_costs_table, validation_moved


def _run(folder, config, results=None, failed=None, stages=()):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if failed is not None:
        (folder / "failed.json").write_text(json.dumps({"config": config, "reason": failed}))
    for stage in stages:
        (folder / stage).mkdir()
        (folder / stage / "mimir_stage.json").write_text("{}")


CONFIG = {"seed": 0, "finetune": {"blr": 0.02, "epochs": 25}, "pretrain": {"mi": {"weight": 1e-5}}}
RESULTS = {"accuracy": {"natural": 98.6667, "pgd20": 86.8889}, "num_images": 450, "pretrain": {}, "finetune": {},
           "seconds": {"pretrain": 119.0, "finetune": 222.0, "evaluate": 26.0}}


def _validations(folder, scores):
    """A fine-tuning history with validation PGD accuracy ``scores`` ({epochs done: %})."""
    (folder / "finetune").mkdir(exist_ok=True)
    (folder / "finetune" / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": done - 1, "val_pgd": score}) + "\n" for done, score in scores.items()))


@pytest.fixture
def results_folder(tmp_path):
    _run(tmp_path / "quickstart", CONFIG, RESULTS)
    # 25 epochs, validated every 3: the last quarter runs from the validation after epoch 18 (<= 18.75)
    _validations(tmp_path / "quickstart", {15: 70.0, 18: 84.0, 21: 86.0, 24: 85.5, 25: 85.0})
    _run(tmp_path / "lr", {**CONFIG, "finetune": {"blr": 0.01, "epochs": 25}},
         {**RESULTS, "accuracy": {"natural": 97.0, "pgd20": 84.5}})
    _run(tmp_path / "sweeps" / "t" / "trials" / "a" / "seed-1", {**CONFIG, "seed": 1}, stages=("pretrain",))
    _run(tmp_path / "diverged", {**CONFIG, "pretrain": {"mi": {"weight": 10.0}}}, failed="pretrain ended with loss nan")
    return tmp_path


def test_runs_lists_every_run_under_a_folder_with_its_status_and_accuracies(results_folder, capsys):
    assert main(["runs", str(results_folder)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| run | status | stages | natural | robust | attack | images | val_moved | seconds |"
    # validation PGD over the last quarter: 84.0 (epoch 18), 86.0, 85.5, 85.0 -> moved 2 points
    assert ("| quickstart | finished | pretrain, finetune, evaluate | 98.67 | 86.89 | pgd20 | 450 | 2.00 | 367.00 |"
            in table)
    assert "| sweeps/t/trials/a/seed-1 | unfinished | pretrain | — | — | — | — | — | — |" in table
    assert "| diverged | failed | — | — | — | — | — | — | — |" in table
    assert len(table) == 2 + 4
    assert main(["runs", str(results_folder), "--csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "run,status,stages,natural,robust,attack,images,val_moved,seconds"
    assert "lr,finished,\"['pretrain', 'finetune', 'evaluate']\",97.0,84.5,pgd20,450,,367.0" in rows


def test_a_sweeps_trials_are_runs_though_only_their_results_hold_their_config(tmp_path, capsys):
    """A sweep writes no config.json in its trials' folders: a one-seed trial is a run, a multi-seed
    trial's summary is not (its seeds' runs are)."""
    trials = tmp_path / "exp" / "trials"
    for folder, record in (("a", {**RESULTS, "config": CONFIG}), ("b", {"config": CONFIG, "runs": 2}),
                           ("b/seed-0", {**RESULTS, "config": CONFIG}), ("b/seed-1", {**RESULTS, "config": CONFIG})):
        (trials / folder).mkdir(parents=True)
        (trials / folder / "results.json").write_text(json.dumps(record))
    _validations(trials / "b" / "seed-1", {18: 80.0, 21: 82.0, 24: 83.0, 25: 83.0})
    assert main(["runs", str(tmp_path / "exp"), "--csv"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["trials/a", "trials/b/seed-0", "trials/b/seed-1"]
    assert rows[2].endswith(",pgd20,450,3.0,367.0")
    assert main(["compare", str(trials / "a"), str(trials / "b" / "seed-1")]) == 0
    assert "| accuracy.pgd20 | 86.89 | 86.89 |" in capsys.readouterr().out


@pytest.mark.parametrize("scores, moved", [
    ({30: 90.0, 33: 89.33, 36: 90.67, 39: 92.0, 40: 92.0}, 2.67),  # rising to the end
    ({27: 95.0, 30: 91.33, 33: 90.67, 36: 92.67, 39: 90.67, 40: 90.67}, 2.0),  # epoch 27 is before the quarter
    ({29: 88.0, 32: 93.33, 35: 93.33, 38: 94.0, 40: 94.0}, 6.0),  # the quarter starts from epoch 29's model
    ({40: 94.0}, None), ({}, None)])
def test_validation_moved_is_the_range_of_validation_pgd_over_the_last_quarter(scores, moved):
    history = [{"epoch": done - 1, "loss": 1.0, "val_pgd": score} for done, score in scores.items()]
    result = validation_moved([{"epoch": 0, "loss": 2.0}, *history], 40)
    assert result == (None if moved is None else pytest.approx(moved))


def test_compare_shows_the_fields_that_differ_and_the_results_side_by_side(results_folder, capsys):
    assert main(["compare", str(results_folder / "quickstart"), str(results_folder / "lr"),
                 str(results_folder / "diverged")]) == 0
    table = capsys.readouterr().out
    assert "| finetune.blr | 0.02 | 0.01 | 0.02 |" in table
    assert "| pretrain.mi.weight | 1e-05 | 1e-05 | 10.0 |" in table
    assert "seed" not in table and "finetune.epochs" not in table  # the same in every run
    assert "| accuracy.pgd20 | 86.89 | 84.50 | — |" in table and "| status | finished | finished | failed |" in table
    assert main(["compare", str(results_folder / "quickstart"), str(results_folder / "lr"), "--csv"]) == 0
    assert "finetune.blr,0.02,0.01" in capsys.readouterr().out.splitlines()


def test_a_folder_without_runs_is_a_named_error(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "is not a run folder (no config.json, nor a results.json with a config)" in capsys.readouterr().err


def test_fixed_costs_split_each_stages_wall_time_into_computation_and_the_rest(tmp_path, capsys):
    """A hand-worked run from t=95 to t=203: pre-training from 100 to 150 with two epochs starting at
    110 and 125, fine-tuning from 150 to 190 with one, the evaluation 190-200 with 6 s of attacks."""
    run = tmp_path / "run"
    _run(run, CONFIG, {**RESULTS, "stage_times": {"pretrain": [100.0, 150.0], "finetune": [150.0, 190.0],
                                                  "evaluate": [190.0, 200.0]}, "run_window": [95.0, 203.0],
                       "attack_seconds": {"natural": 1.0, "pgd20": 5.0}})
    epochs = {"pretrain": [{"started_at": 110.0, "seconds": 12.0, "data_seconds": 4.0},
                           {"started_at": 125.0, "seconds": 10.0, "data_seconds": 1.0, "validation_seconds": 2.0}],
              "finetune": [{"started_at": 160.0, "seconds": 20.0, "data_seconds": 3.0, "validation_seconds": 4.0}]}
    for stage, rows in epochs.items():
        (run / stage).mkdir()
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["runs", str(tmp_path), "--fixed-costs", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run,stage,wall,computation,fixed,start,first batch,data waits,between epochs,teardown"
    # pre-training: start 10, first batch 4, later waits 1, 125 - 122 = 3 between, 150 - 137 = 13 teardown;
    # computation (12 - 4) + (10 - 1 + 2) = 19; 19 + 31 = 50 s of wall
    assert lines[1] == "run,pretrain,50.0,19.0,31.0,10.0,4.0,1.0,3.0,13.0"
    assert lines[2] == "run,finetune,40.0,21.0,19.0,10.0,3.0,0,0,6.0"
    assert lines[3] == "run,evaluate,10.0,6.0,4.0,4.0,,,,"
    # the whole run: 108 s, of which 19 + 21 + 6 = 46 computation; 5 s before its first stage, 3 after
    assert lines[4] == "run,run,108.0,46.0,62.0,5.0,,,,3.0"
    assert fixed_costs_table(tmp_path, "csv", whole_runs=True).splitlines() == [
        "run,stage,wall,computation,fixed,start,teardown", "run,run,108.0,46.0,62.0,5.0,3.0"]
    # a sweep's trials keep their records in the experiment folder (no config.json) and their stages
    # under the sweep's storage: trial a filled the shared pre-training cache, trial b (one seed's
    # run) found it there and waited 50 s for it, which is no computation of its own
    storage, experiment = tmp_path / "bucket" / "exp", tmp_path / "exp"
    config = {**CONFIG, "scaling": {"storage_path": f"file://{storage}"}}
    trial = {**RESULTS, "config": config, "stage_times": {"pretrain": [100.0, 150.0], "finetune": [150.0, 190.0],
                                                          "evaluate": [190.0, 200.0]},
             "run_window": [95.0, 203.0], "attack_seconds": {"natural": 1.0, "pgd20": 5.0}, "pretrain_hash": "h"}
    for record, folder in (({**trial, "pretrain_cache_hit": False}, "a"),
                           ({"config": config, "runs": 1}, "b"), ({**trial, "pretrain_cache_hit": True}, "b/seed-0")):
        (experiment / "trials" / folder).mkdir(parents=True)
        (experiment / "trials" / folder / "results.json").write_text(json.dumps(record))
    for stage, folder in (("pretrain", "pretrain_cache/h"), ("finetune", "trials/a/finetune"),
                          ("finetune", "trials/b/seed-0/finetune")):
        (storage / folder).mkdir(parents=True)
        (storage / folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs[stage]))
    assert main(["runs", str(experiment / "trials"), "--fixed-costs", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "a,pretrain,50.0,19.0,31.0,10.0,4.0,1.0,3.0,13.0", "a,finetune,40.0,21.0,19.0,10.0,3.0,0,0,6.0",
        "a,evaluate,10.0,6.0,4.0,4.0,,,,", "a,run,108.0,46.0,62.0,5.0,,,,3.0",
        "b/seed-0,finetune,40.0,21.0,19.0,10.0,3.0,0,0,6.0", "b/seed-0,evaluate,10.0,6.0,4.0,4.0,,,,",
        "b/seed-0,run,108.0,27.0,81.0,5.0,,,,3.0"]
