"""Sweeps: spec validation, Tune + Optuna wiring through the trial hook (failures, retries, resume),
one real sweep that trains and shares a pre-training, tables."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from pydantic import ValidationError

from mimir.errors import ConfigError, NonFiniteRun
from mimir.report import markdown_table, table_rows, write_reports
from mimir.config import FAILED, load_config
from test_surface import check_trial_surfaces
from mimir.spec import SweepSpec, load_spec
from mimir.sweeps import TrialFailed, finished_results, run_sweep, run_with_retry, study_name

REPO = Path(__file__).resolve().parents[1]


def spec_of(path):
    return load_spec(path)[0]


def _spec(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'quickstart.yaml'}\nname: t\n" + text)
    return path


@pytest.mark.parametrize("text,message", [
    ("rows: []\n", "search space is empty"),
    ("space: {}\n", "search space is empty"),
    ("colour: red\nrows: [{label: a}]\n", "colour: unknown field"),
    ("rows: [{label: a, set: {}, paperz: {}}]\n", "paperz: unknown field"),
    ("sampler: tpe\nspace: {finetune.blr: {grid: [1, 2]}}\n", "grid values need sampler: grid"),
    ("space: {finetune.blr: {loguniform: [1.0e-4, 1.0e-2], grid: [1]}}\n", "exactly one"),
    ("sampler: tpe\nspace: {evaluate.attacks: {choice: [[natural], [natural, pgd20]]}}\n", "Optuna samples numbers"),
    ("overrides: {evaluate.attacks: [natural]}\nrows: [{label: a}]\n", "objective.metric: pgd20 is not evaluated"),
    ("objective: {metric: natural}\ncolumns: [natural, pgd100]\nrows: [{label: a}]\n", "columns: pgd100 is not evaluated"),
    ("rows: [{label: a, set: {pretrain.mask_ratio: 2}}]\n", "pretrain.mask_ratio"),
    ("scheduler: {type: asha}\nrows: [{label: a, set: {finetune.validation.images: 0}}]\n",
     "finetune.validation.images is 0"),
    ("seeds: 0\nrows: [{label: a}]\n", "seeds: Input should be greater than or equal to 1"),
])
def test_spec_schema_rejects_bad_specs_with_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec(tmp_path, text))


def test_every_shipped_spec_loads_and_table7_has_the_paper_rows():
    for path in sorted((REPO / "tune").glob("*.yaml")):
        load_spec(path)
    spec, _ = load_spec(REPO / "tune" / "table7_estimator.yaml")
    assert [r.label for r in spec.rows][-3:] == ["Adv-MAE (1-step)", "Adv-MAE (10-step)", "MAE"]
    assert spec.rows[2].paper == {"natural": 76.30, "pgd20": 47.60}


def test_table_from_a_results_fixture_matches_the_paper_layout(tmp_path):
    spec = SweepSpec.model_validate({
        "name": "t7", "title": "Table 7", "base": "x.yaml", "columns": ["natural", "pgd20"],
        "rows": [{"label": "MIMIR λ=1e-5 HSIC", "set": {"pretrain.mi.weight": 1e-5}, "paper": {"natural": 76.30, "pgd20": 47.60}},
                 {"label": "MAE", "set": {"pretrain.mi.weight": 0.0}, "paper": {"natural": 69.02, "pgd20": 42.31}}]})
    trial = {"config": {"pretrain": {"mi": {"weight": 1e-5}}}, "accuracy": {"natural": 77.0, "pgd20": 47.1}}
    for i, t in enumerate([trial]):
        (tmp_path / "trials" / str(i)).mkdir(parents=True)
        (tmp_path / "trials" / str(i) / "results.json").write_text(json.dumps(t))
    markdown = write_reports(spec, tmp_path)
    assert markdown.splitlines()[2] == "| Row | Natural ours | Natural paper | Δ | PGD-20 ours | PGD-20 paper | Δ |"
    assert "| MIMIR λ=1e-5 HSIC | 77.00 | 76.30 | +0.70 | 47.10 | 47.60 | -0.50 |" in markdown
    assert "| MAE | — | 69.02 | — | — | 42.31 | — |" in markdown  # not finished yet: marked missing
    assert "1 of 2 rows finished" in markdown
    assert (tmp_path / "table.csv").read_text().splitlines()[1].startswith("MIMIR λ=1e-5 HSIC,77.00,76.30,+0.70")
    assert r"\begin{tabular}" in (tmp_path / "table.tex").read_text()


def test_a_seeded_table_shows_mean_and_spread_per_cell(tmp_path):
    spec = SweepSpec.model_validate({
        "name": "t7", "base": "x.yaml", "columns": ["natural", "pgd20"], "seeds": 3,
        "rows": [{"label": "MIMIR", "set": {"pretrain.mi.weight": 1e-5}, "paper": {"natural": 76.30, "pgd20": 47.60}}]})
    trial = {"config": {"pretrain": {"mi": {"weight": 1e-5}}}, "num_seeds": 3,
             "accuracy": {"natural": 77.0, "pgd20": 47.1}, "accuracy_std": {"natural": 1.0, "pgd20": 0.25}}
    (tmp_path / "trials" / "0").mkdir(parents=True)
    (tmp_path / "trials" / "0" / "results.json").write_text(json.dumps(trial))
    markdown = write_reports(spec, tmp_path)
    assert markdown.splitlines()[2] == ("| Row | Natural ours | Natural paper | Δ | PGD-20 ours | PGD-20 paper | Δ "
                                        "| seeds |")
    assert "| MIMIR | 77.00 ± 1.00 | 76.30 | +0.70 | 47.10 ± 0.25 | 47.60 | -0.50 | 3 |" in markdown
    assert "mean ± sample standard deviation over 3 seeds" in markdown
    csv_lines = (tmp_path / "table.csv").read_text().splitlines()
    assert csv_lines[0] == "row,Natural ours,Natural std,Natural paper,Δ,PGD-20 ours,PGD-20 std,PGD-20 paper,Δ,seeds"
    assert csv_lines[1] == "MIMIR,77.00,1.00,76.30,+0.70,47.10,0.25,47.60,-0.50,3"
    assert r"77.00 $\pm$ 1.00 & 76.30 & +0.70" in (tmp_path / "table.tex").read_text()


def _seeded_trial(index, tmp_path, pgd20_by_seed):
    runs = [{"config": {"seed": seed}, "accuracy": {"natural": 90.0, "pgd20": value}}
            for seed, value in pgd20_by_seed.items()]
    trial = {"config": {}, "row": f"row {index}", "num_seeds": len(runs), "runs": runs,
             "accuracy": {"natural": 90.0, "pgd20": sum(pgd20_by_seed.values()) / len(runs)}}
    (tmp_path / "trials" / str(index)).mkdir(parents=True)
    (tmp_path / "trials" / str(index) / "results.json").write_text(json.dumps(trial))


def test_a_reference_row_gives_each_row_its_paired_difference_with_a_t_interval(tmp_path):
    """Worked by hand: per-seed differences 1, 2, 3 have mean 2 and standard deviation 1; with
    t(0.975, 2 degrees of freedom) = 4.3027 the 95 % interval is 2 ± 4.3027 / sqrt(3) = [-0.48, +4.48]
    (contains 0: not resolved). Differences 4, 5, 6: [+2.52, +7.48] (resolved). Pairing matters:
    row 2's values are spread over 10 points, more than its mean difference, but pair by pair it
    is always 4-6 above the reference."""
    spec = SweepSpec.model_validate({
        "name": "t", "base": "x.yaml", "columns": ["natural", "pgd20"], "seeds": 3, "reference": "row 0",
        "rows": [{"label": f"row {i}"} for i in range(3)]})
    _seeded_trial(0, tmp_path, {0: 50.0, 1: 60.0, 2: 55.0})
    _seeded_trial(1, tmp_path, {0: 51.0, 1: 62.0, 2: 58.0})
    _seeded_trial(2, tmp_path, {0: 54.0, 1: 65.0, 2: 61.0})
    markdown = write_reports(spec, tmp_path)
    assert "| row 0 | 90.00 | — | — | reference | 55.00 | — | — | reference | 3 |" in markdown
    assert "| row 1 | 90.00 | — | — | +0.00 [+0.00, +0.00] | 57.00 | — | — | +2.00 [-0.48, +4.48] | 3 |" in markdown
    assert "| row 2 | 90.00 | — | — | +0.00 [+0.00, +0.00] | 60.00 | — | — | +5.00 [+2.52, +7.48] * | 3 |" in markdown
    assert "Student's t over the seed pairs" in markdown
    rows = {line.split(",")[0]: line.split(",") for line in (tmp_path / "table.csv").read_text().splitlines()}
    assert rows["row"][-5:] == ["PGD-20 Δ ref", "PGD-20 Δ ref low", "PGD-20 Δ ref high", "PGD-20 resolved", "seeds"]
    assert rows["row 1"][-5:] == ["+2.00", "-0.48", "+4.48", "no", "3"]
    assert rows["row 2"][-5:] == ["+5.00", "+2.52", "+7.48", "yes", "3"]
    assert r"+5.00 [+2.52, +7.48]$^\ast$" in (tmp_path / "table.tex").read_text()


def test_details_show_a_results_value_averaged_over_the_seeds(tmp_path):
    spec = SweepSpec.model_validate({"name": "t", "base": "x.yaml", "columns": ["pgd20"], "seeds": 2,
                                     "details": ["pretrain.metrics.mi_share"], "rows": [{"label": "a"}, {"label": "b"}]})
    runs = [{"config": {"seed": s}, "accuracy": {"pgd20": 50.0}, "pretrain": {"metrics": {"mi_share": share}}}
            for s, share in ((0, 1e-3), (1, 3e-3))]
    (tmp_path / "trials" / "0").mkdir(parents=True)
    (tmp_path / "trials" / "0" / "results.json").write_text(json.dumps(
        {"config": {}, "row": "a", "num_seeds": 2, "runs": runs, "accuracy": {"pgd20": 50.0}}))
    markdown = write_reports(spec, tmp_path)
    assert markdown.splitlines()[2].endswith("| pretrain.metrics.mi_share | seeds |")
    assert "| a | 50.00 | — | — | 0.002 | 2 |" in markdown
    assert "| b | — | — | — | — | 0 |" in markdown


def test_a_reference_must_be_a_row_that_runs_with_several_seeds():
    base = {"name": "t", "base": "x.yaml", "rows": [{"label": "a"}, {"label": "b"}]}
    with pytest.raises(ValidationError, match="reference 'c' is not the label of a row that runs"):
        SweepSpec.model_validate({**base, "seeds": 3, "reference": "c"})
    with pytest.raises(ValidationError, match="reference needs seeds >= 2"):
        SweepSpec.model_validate({**base, "reference": "a"})


def test_failed_rows_are_marked_with_their_reason(tmp_path):
    spec = SweepSpec.model_validate({
        "name": "t", "base": "x.yaml", "columns": ["pgd20"],
        "rows": [{"label": "ok", "set": {"finetune.blr": 1e-3}, "paper": {"pgd20": 40.0}},
                 {"label": "diverged", "set": {"finetune.blr": 1e9}, "paper": {"pgd20": 41.0}},
                 {"label": "pending", "set": {"finetune.blr": 5e-3}}]})
    (tmp_path / "trials" / "a").mkdir(parents=True)
    (tmp_path / "trials" / "a" / "results.json").write_text(json.dumps(
        {"config": {"finetune": {"blr": 1e-3}}, "accuracy": {"pgd20": 42.0}}))
    (tmp_path / "trials" / "b").mkdir(parents=True)
    (tmp_path / "trials" / "b" / FAILED).write_text(json.dumps(
        {"config": {"finetune": {"blr": 1e9}}, "reason": "TrialFailed: finetune ended with loss nan"}))
    markdown = write_reports(spec, tmp_path)
    assert "| ok | 42.00 | 40.00 | +2.00 |" in markdown
    assert "| diverged | failed | 41.00 | — |" in markdown
    assert "| pending | — | — | — |" in markdown
    assert "1 of 3 rows finished, 1 failed" in markdown
    assert "- diverged failed: TrialFailed: finetune ended with loss nan" in markdown


def _fake_run(outcomes):
    """A stand-in for run_trial that raises or returns the next outcome and records its configs."""
    calls = []

    def run(cfg, experiment, trial_dir, callbacks):
        calls.append((cfg, trial_dir))
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return dict(outcome)
    return run, calls


def test_a_nan_run_is_retried_once_at_a_tenth_of_the_lr(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"output_dir={tmp_path}"])
    run, calls = _fake_run([NonFiniteRun("finetune", "ended with loss nan"), {"accuracy": {"pgd20": 50.0}}])
    results = run_with_retry(cfg, tmp_path, tmp_path, run=run)
    assert results["retried"] == {"reason": "finetune ended with loss nan", "stage": "finetune", "lr_divided_by": 10}
    retry_cfg, retry_dir = calls[1]
    assert retry_cfg.finetune.blr == pytest.approx(cfg.finetune.blr / 10) and retry_cfg.pretrain == cfg.pretrain
    assert retry_dir == tmp_path / "retry_lr_div10" and retry_cfg.output_dir == str(retry_dir)
    assert json.loads((tmp_path / "results.json").read_text())["retried"]["stage"] == "finetune"
    # a restarted trial finds what it wrote, as long as it is the same trial
    assert finished_results(cfg, tmp_path)["accuracy"] == {"pgd20": 50.0}
    assert finished_results(retry_cfg, tmp_path) is None and finished_results(cfg, tmp_path / "none") is None

    run, calls = _fake_run([NonFiniteRun("pretrain", "ended with loss inf"), NonFiniteRun("pretrain", "ended with loss nan")])
    with pytest.raises(TrialFailed, match="loss inf; the retry with pretrain lr / 10 failed too"):
        run_with_retry(cfg, tmp_path, tmp_path / "b", run=run)
    assert calls[1][0].pretrain.blr == pytest.approx(cfg.pretrain.blr / 10) and len(calls) == 2

    run, calls = _fake_run([FileNotFoundError("no dataset")])  # only non-finite runs are retried
    with pytest.raises(FileNotFoundError):
        run_with_retry(cfg, tmp_path, tmp_path / "c", run=run)
    assert len(calls) == 1


@pytest.fixture
def fake_trial():
    """The trial hook's stand-in, shipped to Tune's actors by value."""
    import ray.cloudpickle

    import sweep_fakes

    ray.cloudpickle.register_pickle_by_value(sweep_fakes)
    return sweep_fakes.fake_trial


def test_failing_trials_are_recorded_and_do_not_stop_the_sweep(ray_local, tmp_path, fake_trial):
    spec_path = _spec(tmp_path, (
        "overrides: {pretrain.enabled: false, evaluate.attacks: [natural]}\n"
        "columns: [natural]\nobjective: {metric: natural}\n"
        "rows:\n"
        "  - {label: missing data, set: {data.dataset: no-such-dataset}}\n"
        "  - {label: diverges, set: {finetune.blr: 1.0e+9}}\n"
        "  - {label: fine, set: {finetune.blr: 1.0e-3}}\n"))
    experiment = run_sweep(spec_path, out=str(tmp_path / "exp"), run=fake_trial)
    failures = {json.loads(p.read_text())["config"]["data"]["dataset"]: json.loads(p.read_text())["reason"]
                for p in (experiment / "trials").glob(f"*/{FAILED}")}
    assert len(failures) == 2
    assert "no-such-dataset" in failures["no-such-dataset"]
    assert "retry with finetune lr / 10 failed too" in failures["digits"]  # 1e9 and 1e8 both diverge
    assert len(list((experiment / "trials").glob("*/results.json"))) == 1  # the sweep went on
    spec, _ = load_spec(spec_path)
    markdown = write_reports(spec, experiment)
    assert "1 of 3 rows finished, 2 failed" in markdown and "| diverges | failed |" in markdown
    # trials that ran on another node wrote their records there: the driver keeps them from what
    # they reported to Tune (emulated: the records written here are removed, the sweep resumed)
    records = {p.relative_to(experiment): json.loads(p.read_text()) for p in experiment.glob("trials/*/*.json")}
    for path in records:
        (experiment / path).unlink()
    run_sweep(spec_path, out=str(tmp_path / "exp"), resume=True, run=fake_trial)
    kept = {p.relative_to(experiment): json.loads(p.read_text()) for p in experiment.glob("trials/*/*.json")}
    assert kept.keys() == records.keys()
    assert [kept[p] for p in sorted(kept) if p.name == "results.json"] == [
        records[p] for p in sorted(records) if p.name == "results.json"]
    assert sorted(r["reason"].split(":")[0] for r in kept.values() if "reason" in r) == ["DatasetError", "TrialFailed"]
    assert "| diverges | failed |" in write_reports(spec, experiment)


def _trial_records(experiment: Path) -> list[dict]:
    """Every finished trial's results.json, in folder order."""
    return [json.loads(p.read_text()) for p in sorted((experiment / "trials").glob("*/results.json"))]


def _tune_trials(experiment: Path) -> list[tuple[dict, float]]:
    """Each trial Tune recorded: its point and its final objective."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(experiment / "tune"))
    return [(trial.config, trial.last_result["objective"]) for trial in analysis.trials]


def test_a_grid_sweep_is_tunes_grid_search_and_resumes(ray_local, tmp_path, fake_trial):
    spec_path = _spec(tmp_path, "space: {pretrain.mi.weight: {grid: [1.0e-5, 0.0]}, finetune.blr: {grid: [5.0e-3, 1.0e-2]}}\n")
    experiment = run_sweep(spec_path, out=str(tmp_path / "exp"), run=fake_trial)
    results = _trial_records(experiment)
    assert len(results) == 4
    # Tune holds the same four trials as the records, named by their values, with the same values; no
    # Optuna study for a grid
    ours = sorted((f"pretrain.mi.weight={r['config']['pretrain']['mi']['weight']}, "
                   f"finetune.blr={r['config']['finetune']['blr']}", r["accuracy"]["pgd20"]) for r in results)
    theirs = sorted((params["trial"], value) for params, value in _tune_trials(experiment))
    assert ours == theirs and not (experiment / "optuna.db").exists()
    # --resume on a finished sweep reruns nothing
    stamps = {p: p.stat().st_mtime for p in (experiment / "trials").glob("*/results.json")}
    run_sweep(spec_path, out=str(tmp_path / "exp"), resume=True, run=fake_trial)
    assert {p: p.stat().st_mtime for p in (experiment / "trials").glob("*/results.json")} == stamps
    assert len(_tune_trials(experiment)) == 4
    spec, _ = load_spec(spec_path)
    rows = table_rows(spec, [json.loads(p.read_text()) for p in stamps])
    assert all(r["ours"] for r in rows) and "4 of 4 rows finished" in markdown_table(spec, rows)
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(spec_path, out=str(tmp_path / "exp"), run=fake_trial)


def test_asha_steers_on_validation_and_never_stops_a_trial_before_its_evaluation(ray_local, tmp_path, fake_trial):
    """Two fine-tuning epochs, ASHA rungs at 1 and 2 (= max_t): a trial reporting its last epoch to ASHA
    would be stopped there, before its evaluation. Each point runs with two seeds."""
    from ray import tune

    spec_path = _spec(tmp_path, (
        "overrides: {pretrain.enabled: false, finetune.epochs: 2, finetune.warmup_epochs: 0}\n"
        "scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\nseeds: 2\n"
        "space: {finetune.blr: {grid: [1.0e-3, 2.0e-3]}}\n"))
    experiment = run_sweep(spec_path, out=str(tmp_path / "exp"), run=fake_trial)
    results = _trial_records(experiment)
    assert len(results) == 2  # both evaluated
    for r in results:
        assert r["num_seeds"] == 2 and r["seeds"] == [0, 1]
        assert r["accuracy"]["pgd20"] == pytest.approx(51.5 + 1000 * r["config"]["finetune"]["blr"])  # + 1e5 * λ
        assert r["accuracy_std"]["pgd20"] == pytest.approx(0.5 ** 0.5)
        assert [run["config"]["seed"] for run in r["runs"]] == [0, 1]
    assert len(list((experiment / "trials").glob("*/seed-1/results.json"))) == 2
    histories = tune.ExperimentAnalysis(str(experiment / "tune")).trial_dataframes.values()
    assert len(histories) == 2
    for history in histories:
        # validation epochs 1..3 of 4 (two seeds x two epochs), then the final evaluation at 4
        assert history["finetune_epoch"].tolist() == [1, 2, 3, 4]
        assert history["objective"].tolist()[:3] == [30.0, 30.0, 30.0]  # val_pgd, not training accuracy
        assert history["objective"].tolist()[3] == history["accuracy_pgd20"].tolist()[3]


def test_a_sampled_sweep_is_optunas_tpe_and_learns_final_values_only(ray_local, tmp_path, fake_trial):
    """TPE samples three points of the space; each trial reports validation epochs to Tune, but the
    Optuna study holds the three final (evaluated) values only."""
    spec_path = _spec(tmp_path, (
        "overrides: {pretrain.enabled: false, finetune.epochs: 2, finetune.warmup_epochs: 0}\n"
        "sampler: tpe\nnum_samples: 3\n"
        "space: {finetune.blr: {loguniform: [1.0e-4, 1.0e-2]}, finetune.method: {choice: [pgd, fast]}}\n"))
    experiment = run_sweep(spec_path, out=str(tmp_path / "exp"), run=fake_trial)
    results = _trial_records(experiment)
    assert len(results) == 3
    assert all(1e-4 <= r["config"]["finetune"]["blr"] <= 1e-2 for r in results)
    study = optuna.load_study(study_name=study_name(spec_of(spec_path), experiment),
                              storage=f"sqlite:///{experiment / 'optuna.db'}")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted((t.params["point/finetune.blr"], t.params["point/finetune.method"], t.value) for t in finished) == \
        sorted((r["config"]["finetune"]["blr"], r["config"]["finetune"]["method"], r["accuracy"]["pgd20"]) for r in results)
    assert all(t.intermediate_values == {} for t in study.trials)  # Optuna sees final values only


def test_a_real_sweep_trains_shares_one_pretraining_and_evaluates(ray_local, data_root, tmp_path, capsys):
    """The one sweep that really trains: two trials that differ in fine-tuning share a pre-training,
    with scaling.storage_path a URI (as s3:// on a cluster): runs, cache and Tune state live there.
    Each trial also computes its loss surface (Figure 5's hook) on a tiny grid."""
    overrides = [f"data.root={data_root}", "pretrain.epochs=1", "pretrain.warmup_epochs=0", "finetune.epochs=1",
                 "finetune.warmup_epochs=0", "finetune.attack.steps=1", "finetune.batch_size=128", "evaluate.num_images=32",
                 "evaluate.attacks=[natural, pgd20]", f"scaling.storage_path=file://{tmp_path}/bucket/sweeps"]
    spec_path = _spec(tmp_path, (
        "resources: {num_workers: 1, cpus_per_worker: 1}\n"
        "surface: {steps: 3, num_images: 12, attack_steps: 2, inputs: [natural, adversarial]}\n"
        "rows: [{label: blr 5e-3, set: {finetune.blr: 5.0e-3}}, {label: blr 1e-2, set: {finetune.blr: 1.0e-2}}]\n"))
    experiment = run_sweep(spec_path, overrides, out=str(tmp_path / "exp"))
    results = _trial_records(experiment)
    assert len(results) == 2
    # at its end, each trial's wall time, its computation and the rest
    printed = capsys.readouterr().out.split("[sweep] each trial's time besides its computation")[1].splitlines()
    assert printed[1].startswith("| run | stage | wall | computation | fixed |")
    assert sum(line.split(" | ")[1:2] == ["run"] for line in printed) == 2  # a row per trial
    stored = tmp_path / "bucket" / "sweeps" / "exp"
    assert len(list((stored / "pretrain_cache").glob("*/mimir_stage.json"))) == 1
    assert len(list((stored / "trials").glob("*/finetune/mimir_stage.json"))) == 2
    assert (stored / "tune").is_dir() and not (experiment / "tune").exists()
    assert not list(experiment.glob("pretrain_cache")) and not list(experiment.glob("trials/*/finetune"))
    assert sorted(r["pretrain_cache_hit"] for r in results) == [False, True]
    assert all(set(r["seconds"]) == {"pretrain", "finetune", "evaluate"} for r in results)
    assert all(0 <= r["accuracy"]["pgd20"] <= r["accuracy"]["natural"] <= 100 for r in results)
    assert all(r["pretrain"]["metrics"]["mi_share"] > 0 for r in results)
    assert sorted(value for _, value in _tune_trials(stored)) == sorted(r["accuracy"]["pgd20"] for r in results)
    check_trial_surfaces(experiment, results, spec_of(spec_path).surface, tmp_path, capsys)


def test_an_interrupted_sweep_resumes_without_rerunning_or_losing_trials(ray_local, tmp_path, fake_trial):
    spec_path = _spec(tmp_path, (
        "overrides: {pretrain.enabled: false, evaluate.attacks: [natural]}\n"
        "columns: [natural]\nobjective: {metric: natural}\n"
        "space: {finetune.blr: {grid: [1.0e-3, 2.0e-3, 3.0e-3]}}\n"))
    out = tmp_path / "exp"
    # a sweep driver of its own on this test's Ray, stopped with Ctrl-C after its first trial
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import ray.cloudpickle, sweep_fakes\n"
        "ray.cloudpickle.register_pickle_by_value(sweep_fakes)\n"
        "from mimir.sweeps import run_sweep\n"
        f"run_sweep({str(spec_path)!r}, out={str(out)!r}, run=sweep_fakes.fake_trial)\n")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    sweep = subprocess.Popen([sys.executable, str(driver)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("trials/*/results.json")):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0][-3000:]
        time.sleep(0.2)
    sweep.send_signal(signal.SIGINT)
    log = sweep.communicate(timeout=180)[0]
    done = {p: p.stat().st_mtime for p in out.glob("trials/*/results.json")}
    assert 1 <= len(done) < 3, log[-3000:]

    run_sweep(spec_path, out=str(out), resume=True, run=fake_trial)
    results = {p: json.loads(p.read_text()) for p in out.glob("trials/*/results.json")}
    assert len(results) == 3  # none lost
    assert {p: p.stat().st_mtime for p in done} == done  # finished trials were not rerun
    assert sorted(r["config"]["finetune"]["blr"] for r in results.values()) == [1.0e-3, 2.0e-3, 3.0e-3]
    assert len(_tune_trials(out)) == 3


def test_the_users_scaling_overrides_win_over_the_specs_resources_and_the_plan_shows_them():
    from mimir.plan import plan_sweep

    spec_path = REPO / "tune" / "table7_estimator.yaml"
    plan = plan_sweep(spec_path, ["scaling.num_workers=8"])
    assert {t.workers for t in plan.trials} == {8} and all(t.worker.get("GPU") == 1 for t in plan.trials)
    assert all(t.config.scaling.num_workers == 8 and t.config.scaling.use_gpu for t in plan.trials)
    on_cpus = plan_sweep(spec_path, ["scaling.use_gpu=false", "scaling.cpus_per_worker=4"])
    assert all(not t.worker.get("GPU") and t.worker["CPU"] == 4 and t.workers == 4 for t in on_cpus.trials)
    assert all(not t.config.scaling.use_gpu for t in on_cpus.trials)
    with pytest.raises(ConfigError, match=r"scaling\.num_workers: Input should be greater than or equal to 1"):
        plan_sweep(spec_path, ["scaling.num_workers=0"])
