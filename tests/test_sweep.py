"""Sweeps: spec validation, a real 4-trial Tune + Optuna sweep, the pre-training cache, resume, tables."""

import json
from pathlib import Path

import optuna
import pytest

from mimir.config import ConfigError
from mimir.report import markdown_table, table_rows, write_reports
from mimir.sweep import SweepSpec, load_spec, run_sweep

REPO = Path(__file__).resolve().parents[1]


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
    ("rows: [{label: a, set: {pretrain.mask_ratio: 2}}]\n", "pretrain.mask_ratio"),
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


def test_a_four_trial_sweep_runs_caches_pretraining_and_resumes(ray_local, data_root, tmp_path):
    overrides = [f"data.root={data_root}", "pretrain.epochs=1", "pretrain.warmup_epochs=0", "finetune.epochs=1",
                 "finetune.warmup_epochs=0", "finetune.attack.steps=1", "evaluate.num_images=32",
                 "evaluate.attacks=[natural, pgd20]"]
    spec_path = REPO / "tune" / "quickstart.yaml"
    experiment = run_sweep(spec_path, overrides, out=str(tmp_path / "exp"))
    results = [json.loads(p.read_text()) for p in sorted((experiment / "trials").glob("*/results.json"))]
    assert len(results) == 4
    # two pre-training configs, each pre-trained once and reused by the trial that differs in fine-tuning
    assert len(list((experiment / "pretrain_cache").glob("*/mimir_stage.json"))) == 2
    assert sorted(r["pretrain_cache_hit"] for r in results) == [False, False, True, True]
    # the Optuna study holds the same four trials as Tune, with the same parameters and values
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{experiment / 'optuna.db'}")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4
    ours = sorted((r["config"]["pretrain"]["mi"]["weight"], r["config"]["finetune"]["blr"], r["accuracy"]["pgd20"])
                  for r in results)
    theirs = sorted((json.loads(t.params["pretrain.mi.weight"]), json.loads(t.params["finetune.blr"]), t.value)
                    for t in finished)
    assert ours == theirs
    # --resume on a finished sweep reruns nothing
    stamps = {p: p.stat().st_mtime for p in (experiment / "trials").glob("*/results.json")}
    run_sweep(spec_path, overrides, out=str(tmp_path / "exp"), resume=True)
    assert {p: p.stat().st_mtime for p in (experiment / "trials").glob("*/results.json")} == stamps
    assert len(optuna.load_study(study_name="quickstart", storage=f"sqlite:///{experiment / 'optuna.db'}").trials) == 4
    spec, _ = load_spec(spec_path)
    rows = table_rows(spec, [json.loads(p.read_text()) for p in stamps])
    assert all(r["ours"] for r in rows) and "4 of 4 rows finished" in markdown_table(spec, rows)
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(spec_path, overrides, out=str(tmp_path / "exp"))
