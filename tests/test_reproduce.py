"""Reproducing the paper: the specs of every table, their plans (what runs, what is shared, what it
costs, whether a cluster can ever run it), their tiny variants end to end through the sweep's trial
hook, and tables in the paper's layout."""

import json
import math
from pathlib import Path

import pytest
import yaml

from mimir import costs
from mimir import plan as plan_module
from mimir.cli import main
from mimir.config import load_config
from mimir.errors import ConfigError
from mimir.plan import _wall_seconds, cluster_from_file, format_plan, plan_sweep
from mimir.report import write_reports
from mimir.reproduce import paper_specs, specs_for
from mimir.config import FAILED
from mimir.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
TUNE = (REPO / "tune").resolve()  # the bundled specs (mimir/tune; tune/ links there)
NEW_SPECS = ["table2_cifar10", "table3_imagenet", "table4_architectures", "table5_tinyimagenet", "table9_adaptive",
             "table14_clean_finetune"]


def spec_path(name):
    return TUNE / f"{name}.yaml"


CONNECTED_CLUSTER = plan_module.connected_cluster


@pytest.fixture(autouse=True)
def no_connected_cluster(monkeypatch):
    """Plans here see no Ray cluster unless a test connects one (the slow tests' shared local Ray may
    run in this process)."""
    monkeypatch.setattr(plan_module, "connected_cluster", lambda: None)


# -- the specs -----------------------------------------------------------------------------------
def test_every_table_of_the_paper_has_a_spec_in_the_papers_order():
    keys = list(paper_specs())
    for key in ["table1", "table2", "table3", "table4", "table5", "table6", "table7", "table8", "table9", "table14",
                "figure4"]:
        assert key in keys
    assert keys.index("table9") < keys.index("table14") < keys.index("figure4")
    assert specs_for("table9") == [spec_path("table9_adaptive")]
    assert specs_for("table2_cifar10") == [spec_path("table2_cifar10")]
    with pytest.raises(ConfigError, match="no spec for 'table99'"):
        specs_for("table99")


def test_the_specs_hold_the_papers_rows_settings_and_numbers():
    spec, _ = load_spec(spec_path("table2_cifar10"))
    runs = [r for r in spec.rows if r.quoted is None]
    assert len(spec.rows) == 24 and len(runs) == 12  # MAE and MIMIR per architecture; the rest quoted
    assert all(r.quoted == "Mo et al. [56]" and not r.set for r in spec.rows if "ImageNet-1K" in r.label)
    vit_s = next(r for r in spec.rows if r.label == "ViT-S | MIMIR | PGD")
    assert vit_s.paper == {"natural": 88.11, "pgd20": 56.63, "pgd100": 56.34, "autoattack": 53.18}
    _, base = load_spec(spec_path("table2_cifar10"))
    from mimir.spec import trial_config
    mae = trial_config(base, spec, spec.grid_points()[0])
    assert (mae.model.arch, mae.pretrain.attack.steps, mae.pretrain.mi.estimator) == ("vit_tiny", 0, "none")
    assert mae.data.generated == "cifar10-edm-5m" and mae.finetune.epochs == 100 and mae.pretrain.epochs == 800
    assert mae.evaluate.eps == pytest.approx(8 / 255) and mae.finetune.attack.steps == 10

    spec, base = load_spec(spec_path("table3_imagenet"))
    configs = [trial_config(base, spec, p) for p in spec.grid_points()]
    assert [(c.model.arch, round(c.finetune.attack.eps * 255, 3), round(c.evaluate.eps * 255, 3)) for c in configs] == [
        ("vit_small", 2, 2), ("vit_small", 4, 4), ("vit_base", 2, 2), ("vit_base", 4, 4)]
    assert all(c.finetune.method == "fast" and c.finetune.attack.step_size == pytest.approx(1.25 * c.finetune.attack.eps)
               and c.evaluate.step_size == pytest.approx(1 / 255) and c.pretrain.batch_size == 2048 for c in configs)

    spec, base = load_spec(spec_path("table14_clean_finetune"))
    configs = {spec.rows[p["__row__"]].label: trial_config(base, spec, p) for p in spec.grid_points()}
    assert {c.data.dataset for c in configs.values()} == {"cifar10", "tiny-imagenet", "imagenet"}
    assert all(c.finetune.method == "clean" and c.finetune.blr == 1e-3 and c.finetune.epochs == 50
               and c.model.arch == "vit_base" for c in configs.values())
    assert configs["ViT-B | Tiny-ImageNet | MAE"].pretrain.attack.steps == 0
    assert spec.rows[-1].quoted and "1,600" in spec.rows[-1].quoted

    spec, base = load_spec(spec_path("table9_adaptive"))
    imagenet = trial_config(base, spec, spec.grid_points()[-1])  # ImageNet ViT-B, Table 3's ε = 2/255 model
    assert (imagenet.data.dataset, imagenet.model.arch, imagenet.model.patch_size) == ("imagenet", "vit_base", 16)
    assert imagenet.evaluate.eps == pytest.approx(2 / 255) and imagenet.evaluate.attacks == ["pgd20", "pgd_mi",
                                                                                              "pgd_feature"]
    tiny = trial_config(base, spec, spec.grid_points()[4])
    assert (tiny.data.dataset, tiny.data.generated, tiny.model.arch) == ("tiny-imagenet", "tiny-imagenet-edm-1m",
                                                                         "vit_small")


def _write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(f"base: {REPO / 'configs' / 'quickstart.yaml'}\n" + text)
    return path


@pytest.mark.parametrize("text,message", [
    ("name: t\nrows: [{label: a, quoted: X, set: {finetune.blr: 1}}]\n", "quoted from X: it runs nothing"),
    ("name: t\nrows: [{label: a, quoted: X}]\n", "every row is quoted"),
    ("name: t\nrows: [{label: a}, {label: a}]\n", r"row labels must differ .*\['a'\]"),
    ("name: t\ngroups: [{label: g}]\nrows: [{label: a, paper: {natural: 1.0}}]\n", "maps each group label"),
    ("name: t\nrows: [{label: a, paper: {g: {natural: 1.0}}}]\n", "the spec has no groups"),
    ("name: t\nlabel_columns: [Model, Method]\nrows: [{label: a}]\n", r"2 parts joined by ' \| '"),
    ("name: t\nrows: [{label: a, evaluates: {spec: src.yaml, row: nope}}]\n", r"no row 'nope' that runs; its rows: \['x'\]"),
    ("name: t\nrows: [{label: a, evaluates: {spec: src.yaml, row: x, group: g}}]\n", "it has no group 'g'"),
    ("name: t\nseeds: 2\nrows: [{label: a, evaluates: {spec: src.yaml, row: x}}]\n", "seeds must be 1"),
    ("name: t\nrows: [{label: a, evaluates: {spec: spec.yaml, row: a}}]\n", "a cycle"),
])
def test_bad_reproduction_specs_fail_with_the_problem_named(tmp_path, text, message):
    _write(tmp_path, "name: src\nrows: [{label: x}, {label: q, quoted: Y}]\n", "src.yaml")
    with pytest.raises(ConfigError, match=message):
        load_spec(_write(tmp_path, text))


# -- costs and plans -----------------------------------------------------------------------------
def test_costs_are_table10_where_it_has_the_setting_and_scale_from_it_elsewhere():
    vit_s = load_config(REPO / "configs" / "cifar10_vit_s.yaml")
    assert costs.pretrain_seconds(vit_s) == pytest.approx(800 * 18.4 * 4)  # MIMIR, 4 A6000 x 800 epochs
    mae = vit_s.model_copy(update={"pretrain": vit_s.pretrain.model_copy(update={"attack": vit_s.pretrain.attack.model_copy(update={"steps": 0})})})
    assert costs.pretrain_seconds(mae) == pytest.approx(800 * 16.1 * 4)
    no_validation = load_config(REPO / "configs" / "cifar10_vit_s.yaml", ["finetune.validation.images=0"])
    assert costs.finetune_seconds(no_validation) == pytest.approx(100 * 149.3 * 4)  # PGD-10 AT
    fast = load_config(REPO / "configs" / "cifar10_vit_s.yaml", ["finetune.validation.images=0", "finetune.method=fast"])
    assert costs.finetune_seconds(fast) == pytest.approx(100 * 43.3 * 4)
    vit_b = load_config(REPO / "configs" / "imagenet_vit_b_eps2.yaml")
    assert costs.table10_seconds(vit_b, "mimir", False) == pytest.approx(509.9)
    # ViT-T is priced from ViT-S by parameters; it costs less than ViT-S and more than nothing
    vit_t = load_config(REPO / "configs" / "cifar10_vit_t.yaml")
    assert 0.1 * 18.4 < costs.table10_seconds(vit_t, "mimir", False) < 18.4
    # generated data: 0.7 of each fine-tuning epoch, so the epoch has 1 / 0.3 as many images
    generated = load_config(REPO / "configs" / "cifar10_vit_s.yaml", ["data.generated=edm"])
    assert costs.table10_seconds(generated, "pgd10_at", True) == pytest.approx(149.3 / 0.3, rel=1e-5)
    # an evaluation is its attacks' steps on the test split: PGD-100 costs five PGD-20s
    pgd20 = load_config(REPO / "configs" / "cifar10_vit_s.yaml", ["evaluate.attacks=[pgd20]"])
    pgd100 = load_config(REPO / "configs" / "cifar10_vit_s.yaml", ["evaluate.attacks=[pgd100]"])
    assert costs.evaluate_seconds(pgd100) == pytest.approx(5 * costs.evaluate_seconds(pgd20))


def test_a_plan_counts_the_pretrainings_that_really_run():
    table7 = plan_sweep(spec_path("table7_estimator"))
    assert (table7.pretrainings, table7.finetunings, table7.evaluations) == (9, 9, 9)
    table1 = plan_sweep(spec_path("table1_lr"))  # five learning rates of one pre-training
    assert (table1.pretrainings, table1.finetunings, table1.evaluations) == (1, 5, 5)
    assert [t.trains_pretrain for t in table1.trials] == [True, False, False, False, False]
    table3 = plan_sweep(spec_path("table3_imagenet"))  # two fine-tunings (ε) per pre-training
    assert (len(table3.trials), table3.pretrainings, table3.quoted) == (4, 2, 4)
    table9 = plan_sweep(spec_path("table9_adaptive"))  # evaluation only
    assert (table9.pretrainings, table9.finetunings, table9.evaluations) == (0, 0, 9)
    assert all("not there yet" in t.evaluates for t in table9.trials)
    text = format_plan(table1)
    assert "runs: 1 pre-trainings, 5 fine-tunings, 5 evaluations" in text
    assert "one pre-training" in text and "lr 5.0e-4; lr 1.0e-3" in text
    # the GPU-hours are the stages' device-seconds, the shared pre-training counted once
    first = table1.trials[0].costs
    expected = first.pretrain + 5 * (first.finetune + first.evaluate)
    assert table1.device_hours == pytest.approx(expected / 3600)
    # four slots of half a GPU: four trials wait for the one pre-training, the fifth starts when one ends
    assert table1.wall_seconds == pytest.approx((first.pretrain + 2 * (first.finetune + first.evaluate)) / 0.5
                                                + table1.trials[0].overhead.pretrain
                                                + 2 * (table1.trials[0].overhead.finetune + costs.EVALUATE_START_SECONDS))


def test_a_seeded_spec_pretrains_once_per_seed():
    plan = plan_sweep(REPO / "tune" / "digits_table7.yaml")
    assert (len(plan.trials), plan.pretrainings, plan.evaluations) == (6, 5 * 3, 6 * 3)  # no pre-training: 1 row


def test_the_wall_time_waits_for_a_shared_pretraining():
    plan = plan_sweep(spec_path("table3_imagenet"))
    trials = plan.trials  # ViT-S ε2 (pre-trains), ViT-S ε4, ViT-B ε2 (pre-trains), ViT-B ε4
    # training on the trial's 4 GPUs, evaluation as one task on one of them
    one_by_one = sum(((t.costs.pretrain if t.trains_pretrain else 0) + t.costs.finetune) / 4 + t.costs.evaluate
                     + (t.overhead.pretrain if t.trains_pretrain else 0) + t.overhead.finetune + t.overhead.evaluate
                     for t in trials)
    assert _wall_seconds(trials, 1) == pytest.approx(one_by_one)
    # with two slots the second ViT-S trial waits for its pre-training, then both models go in parallel
    assert _wall_seconds(trials, 2) < one_by_one


def test_cluster_files_are_read_and_trials_that_never_fit_are_named(tmp_path, capsys):
    aws = cluster_from_file(REPO / "cluster" / "aws-gpu.yaml")
    assert ("ray.worker.gpu", {"CPU": 8.0, "GPU": 1.0}, 4) in aws.nodes
    assert any("ray.head.cpu states no resources" in n for n in aws.notes)
    kuberay = cluster_from_file(REPO / "cluster" / "kuberay-rayjob.yaml")
    assert kuberay.nodes == [("head", {"CPU": 0.0}, 1), ("gpu", {"CPU": 8.0, "GPU": 1.0}, 4)]
    raycluster = tmp_path / "raycluster.yaml"
    raycluster.write_text(yaml.safe_dump({"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": {
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}},
        "workerGroupSpecs": [{"groupName": "a100", "replicas": 2, "rayStartParams": {"num-gpus": "8"},
                              "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "96000m"}}}]}}}]}}))
    assert cluster_from_file(raycluster).nodes == [("head", {"CPU": 0.0}, 1), ("a100", {"CPU": 96.0, "GPU": 8.0}, 2)]

    table7 = plan_sweep(spec_path("table7_estimator"), cluster=REPO / "cluster" / "aws-gpu.yaml")
    assert not table7.infeasible and set(table7.fits.values()) == {1}  # 4 GPUs: one trial at a time
    table1 = plan_sweep(spec_path("table1_lr"), cluster=raycluster)  # 16 GPUs, half a GPU each: 4 at once
    assert set(table1.fits.values()) == {4}
    wide = _write(tmp_path, "name: wide\nresources: {num_workers: 8, cpus_per_worker: 2, gpus_per_worker: 1}\n"
                            "rows: [{label: eight GPUs}]\n")
    assert main(["sweep", str(wide), "--plan", "--cluster", str(REPO / "cluster" / "aws-gpu.yaml")]) == 2
    out, err = capsys.readouterr()
    assert "CANNOT EVER BE SCHEDULED: eight GPUs" in out
    assert "8 workers × {CPU: 2, GPU: 1}" in err and "ray.worker.gpu" in err and "at most 4" in err
    assert main(["sweep", str(wide), "--plan", "--cluster", str(raycluster)]) == 0
    # more trials at once than the spec's one, where the cluster has room: 16 GPUs, 4 per trial
    wider = plan_sweep(spec_path("table7_estimator"), cluster=raycluster, max_concurrent=8)
    assert set(wider.fits.values()) == {4} and wider.wall_seconds < table7.wall_seconds / 2
    capsys.readouterr()
    assert main(["sweep", str(spec_path("table7_estimator")), "--plan", "--max-concurrent", "8",
                 "--cluster", str(raycluster)]) == 0
    assert "with max_concurrent 8 (the cluster runs 4 at once)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="neither a Ray cluster launcher config"):
        cluster_from_file(REPO / "configs" / "quickstart.yaml")


def _bench_report(path, cfg, per_image, device="cpu"):
    """A `mimir bench --out` report of ``cfg``'s model with these seconds per image."""
    batch = 128
    methods = {m: {"stage": "finetune" if m in ("pgd10_at", "fast_at") else "pretrain", "median_s": s * batch}
               for m, s in per_image.items()}
    bench_cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_gpu": device == "cuda"})})
    path.write_text(json.dumps({"arguments": {"batch": batch}, "machine": {"device": device, "processor": "x86_64"},
                                "config": bench_cfg.model_dump(mode="json"), "methods": methods}))
    return path


def test_cpu_trials_are_priced_from_a_bench_of_their_own_model_or_not_at_all(tmp_path, capsys):
    """A CPU report of the quickstart's model prices the digits Table 7 from its seconds per image
    (Table 10's rules for attack steps on top); without one the plan prices nothing rather than
    pretend the CPU is an A6000, and says how to measure it."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    per_image = {"mae": 1e-3, "mimir": 3e-3, "fast_at": 4e-3, "pgd10_at": 13e-3}  # one attack step: 1e-3
    report = _bench_report(tmp_path / "cpu.json", cfg, per_image)
    plan = plan_sweep(spec_path("digits_table7"), costs=[report])
    mimir_row, no_pretraining = plan.trials[0], plan.trials[-1]
    assert mimir_row.device.kind == "cpu" and "cpu.json" in mimir_row.device.source
    assert mimir_row.costs.pretrain == pytest.approx((1e-3 + 1 * 2e-3) * 1347 * 20)  # MAE + one attack step
    assert plan.trials[2].costs.pretrain == pytest.approx((1e-3 + 1 * 2e-3) * 1347 * 20)  # I_α, not timed: as HSIC
    with_renyi = plan_sweep(spec_path("digits_table7"), costs=[_bench_report(tmp_path / "renyi.json", cfg, {
        **per_image, "mimir_renyi": 5e-3})])
    assert with_renyi.trials[2].costs.pretrain == pytest.approx((1e-3 + 1 * 4e-3) * 1347 * 20)  # timed: its own
    train_rows, validations = 1347, 14  # validation every 3rd of 40 epochs and after the last
    assert mimir_row.costs.finetune == pytest.approx((4e-3 - 1e-3 + 2 * 1e-3) * train_rows * 40
                                                    + 150 * 6 * 1e-3 * validations)  # PGD-2; PGD-5 validation
    assert mimir_row.costs.evaluate == pytest.approx(450 * (1 + 20) * 1e-3)  # natural + PGD-20
    assert no_pretraining.costs.pretrain == 0 and not plan.unpriced
    assert main(["sweep", "digits_table7", "--plan", "--costs", str(report)]) == 0
    assert "[1] CPU (x86_64" in capsys.readouterr().out

    unpriced = plan_sweep(spec_path("digits_table7"))
    assert unpriced.device_hours == 0 and len(unpriced.unpriced) == 6
    text = format_plan(unpriced)
    assert "not priced |" in text and "wall not known (6 of 6 trials not priced)" in text
    assert "`mimir bench --config quickstart --device cpu --out bench-cpu.json`" in text

    other = _bench_report(tmp_path / "other.json", load_config(REPO / "configs" / "quickstart.yaml",
                                                               ["model.embed_dim=192", "data.img_size=32"]), per_image)
    with pytest.raises(ConfigError, match=r"model.embed_dim 192 \(the config: 128\); data.img_size 32 "):
        plan_sweep(spec_path("digits_table7"), costs=[other])
    gpu = _bench_report(tmp_path / "gpu.json", cfg, per_image, device="cuda")
    with pytest.raises(ConfigError, match=r"gpu.json prices none of this sweep's trials .*device cuda \(the config: cpu\)"):
        plan_sweep(spec_path("digits_table7"), costs=[gpu])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a `mimir bench --out` report"):
        plan_sweep(spec_path("table7_estimator"), costs=tmp_path / "bad.json")


def test_gpu_trials_are_priced_from_table10_or_a_bench_of_their_model(tmp_path):
    paper = plan_sweep(spec_path("table7_estimator"))
    assert all(t.device is costs.PAPER for t in paper.trials)
    assert "[1] NVIDIA RTX A6000: the paper's Table 10" in format_plan(paper)
    cfg = paper.trials[0].config
    report = _bench_report(tmp_path / "h100.json", cfg, {"mae": 1e-4, "mimir": 2e-4, "fast_at": 3e-4,
                                                          "pgd10_at": 12e-4}, device="cuda")
    measured = plan_sweep(spec_path("table7_estimator"), costs=report)
    assert all(t.device.kind == "cuda" and t.device is not costs.PAPER for t in measured.trials)
    assert measured.trials[0].costs.pretrain == pytest.approx(2e-4 * 50_000 * cfg.pretrain.epochs)
    assert measured.device_hours < paper.device_hours


def test_reproduce_list_prints_every_result_with_its_cost(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| t")}
    assert "`tune/table9_adaptive.yaml` | 9 | 0 | 0 | 9 |" in lines["table9"]
    assert "`tune/table7_estimator.yaml` | 9 | 9 | 9 | 9 | 104 |" in lines["table7"]
    assert "| table2 | `tune/table2_cifar10.yaml` | 12 | 12 | 12 | 12 | 2,118 |" in out
    assert "total:" in out
    assert main(["reproduce", "table3", "--plan"]) == 0
    assert "runs: 2 pre-trainings, 4 fine-tunings, 4 evaluations" in capsys.readouterr().out


# -- tables --------------------------------------------------------------------------------------
def test_a_grouped_table_with_quoted_rows_has_the_papers_layout(tmp_path):
    spec, _ = load_spec(spec_path("table3_imagenet"))
    for index, (group, pgd) in enumerate([("ε = 2/255", 55.0), ("ε = 4/255", 41.0)]):
        (tmp_path / "trials" / str(index)).mkdir(parents=True)
        (tmp_path / "trials" / str(index) / "results.json").write_text(json.dumps(
            {"config": {}, "row": "ViT-S | MIMIR | FastAT", "group": group,
             "accuracy": {"natural": 75.0, "pgd20": pgd, "pgd100": pgd - 0.5}}))
    markdown = write_reports(spec, tmp_path)
    header = markdown.splitlines()[2]
    assert header.startswith("| Models | Pre-train | Fine-tune | ε = 2/255 Natural ours | ε = 2/255 Natural paper | Δ |")
    assert "ε = 4/255 PGD-100 ours | ε = 4/255 PGD-100 paper | Δ |" in header
    assert "| ViT-S | MIMIR | FastAT | 75.00 | 74.60 | +0.40 | 55.00 | 54.56 | +0.44 |" in markdown
    # a row quoted from another paper: the paper's numbers, no ours and no difference
    assert "| ViT-S | – | AGAT |  | 70.62 |  |  | 49.00 |  |" in markdown
    assert "| ViT-B | MIMIR | FastAT | — | 75.88 | — |" in markdown  # not run yet
    assert "2 of 4 trials finished" in markdown and "not run here: Wu et al. [86]" in markdown
    assert (tmp_path / "table.csv").read_text().splitlines()[0].startswith("Models,Pre-train,Fine-tune,ε = 2/255 Natural")


# -- tiny variants end to end --------------------------------------------------------------------
def test_a_tiny_variant_keeps_the_rows_on_the_digits():
    spec, base = load_spec(spec_path("table4_architectures"), tiny=True)
    assert spec.name == "table4_architectures_tiny" and [r.label for r in spec.rows] == [
        "ViT-S", "ConViT-S", "XCiT-S", "XCiT-M"]
    assert spec.rows[0].evaluates.name == "table3_imagenet_tiny"
    from mimir.spec import trial_config
    configs = [trial_config(base, spec, p) for p in spec.grid_points()]
    assert {c.data.dataset for c in configs} == {"digits"} and {c.pretrain.epochs for c in configs} == {1}
    assert [c.model.arch for c in configs] == ["vit_small"] * 2 + ["convit_small"] * 2 + ["xcit_small"] * 2 + [
        "xcit_medium"] * 2
    assert [c.model.patch_size for c in configs] == [4, 4, 4, 4, 8, 8, 8, 8]  # XCiT takes 8 or 16
    assert all(not c.scaling.use_gpu and c.scaling.num_workers == 1 for c in configs)
    assert configs[1].evaluate.eps == pytest.approx(4 / 255)  # the groups' settings stay


def test_the_tiny_figure5_computes_a_small_surface():
    paper, _ = load_spec(spec_path("figure5_loss_surface"))
    tiny, _ = load_spec(spec_path("figure5_loss_surface"), tiny=True)
    assert (paper.surface.steps, paper.surface.num_images) == (51, 1000)
    assert (tiny.surface.steps, tiny.surface.num_images, tiny.surface.attack_steps) == (5, 32, 2)
    assert tiny.surface.inputs == paper.surface.inputs and tiny.surface.seed == paper.surface.seed


def test_the_plan_prices_each_trials_loss_surface():
    from mimir.costs import evaluate_seconds, surface_seconds

    plan = plan_sweep(spec_path("figure5_loss_surface"))
    spec, _ = load_spec(spec_path("figure5_loss_surface"))
    for trial in plan.trials:
        surface = surface_seconds(trial.config, spec.surface)
        assert trial.costs.evaluate == pytest.approx(evaluate_seconds(trial.config) + surface)
        # 51 x 51 points, each a forward and PGD-10 on 1000 images: far more than one evaluation
        assert surface > 10 * evaluate_seconds(trial.config)


def recording_trial(cfg, experiment, trial_dir, callbacks=(), finetuned=None):
    """The trial hook's stand-in, without Ray: an accuracy per attack that is a function of the config,
    the fine-tuned checkpoint it evaluated, and whether it trained one."""
    score = 50.0 + 100 * cfg.finetune.attack.eps + (cfg.pretrain.attack.steps > 0)
    return {"config": cfg.model_dump(mode="json"), "accuracy": {a: score for a in cfg.evaluate.attacks},
            "evaluated_checkpoint": finetuned or str(trial_dir / "finetune" / "checkpoint_best"),
            "trained": finetuned is None}


def run_tiny(name, root):
    """Every trial of a spec's tiny variant, as its Tune trials run them (``run_grid_trial``), in the
    experiment folder ``root/<name>_tiny``; returns that folder."""
    from mimir.spec import find_sources
    from mimir.sweeps import run_grid_trial

    spec, base = load_spec(spec_path(name), tiny=True)
    experiment = root / spec.name
    sources = find_sources(base, spec, experiment)
    for index, point in enumerate(spec.grid_points()):
        trial_dir = experiment / "trials" / f"t{index}"
        try:
            run_grid_trial(point, base=base, spec=spec, experiment=experiment, trial_dir=trial_dir,
                           storage=str(experiment), sources=sources, run=recording_trial, tune_session=False)
        except Exception:  # recorded in failed.json, as a Tune trial's failure
            pass
    return experiment


def _records(experiment):
    return [json.loads(p.read_text()) for p in sorted((experiment / "trials").glob("*/results.json"))]


def test_every_new_spec_runs_end_to_end_as_its_tiny_variant(tmp_path):
    """Tables 2, 3, 5 and 14 train; Table 4 trains three models and evaluates Table 3's ViT-S;
    Table 9 trains nothing and evaluates the models of Tables 2-5. Each table renders in the paper's
    layout with every row's numbers."""
    # before its sources exist, Table 9's rows fail, each naming the sweep to run first
    early = run_tiny("table9_adaptive", tmp_path / "early")
    reasons = [json.loads(p.read_text()) for p in (early / "trials").glob(f"*/{FAILED}")]
    assert len(reasons) == 9 and all(r["reason"].startswith("SourceUnavailable") for r in reasons)
    assert any("run `mimir sweep table2_cifar10.yaml` first" in r["reason"] for r in reasons)
    assert "CIFAR-10 | ViT-B" in {r["row"] for r in reasons}

    experiments = {}
    for name in ["table2_cifar10", "table3_imagenet", "table5_tinyimagenet", "table14_clean_finetune",
                 "table4_architectures", "table9_adaptive"]:
        experiments[name] = experiment = run_tiny(name, tmp_path)
        spec, _ = load_spec(spec_path(name), tiny=True)
        records = _records(experiment)
        assert not list(experiment.glob(f"trials/*/{FAILED}")), name
        assert len(records) == len(spec.grid_points()), name
        assert {r["config"]["data"]["dataset"] for r in records} == {"digits"}
        markdown = write_reports(spec, experiment)
        assert f"{len(records)} of {len(records)}" in markdown, name
        header = markdown.splitlines()[2]
        assert header.startswith("| " + " | ".join(spec.label_columns) + " |"), name
        for row in spec.rows:  # the paper's numbers of every row, quoted or ours
            for value in row.paper.values():
                for number in (value.values() if isinstance(value, dict) else [value]):
                    assert number is None or f"{number:.2f}" in markdown, (name, row.label)

    by_row = lambda name: {(r["row"], r["group"]): r for r in _records(experiments[name])}
    table2, table3, table4, table9 = (by_row(n) for n in ("table2_cifar10", "table3_imagenet", "table4_architectures",
                                                          "table9_adaptive"))
    # Table 4's ViT-S evaluated Table 3's models, per ε, with Table 4's attacks; it trained nothing
    for group in ("ε = 2/255", "ε = 4/255"):
        reused = table4[("ViT-S", group)]
        assert not reused["trained"] and set(reused["accuracy"]) == {"natural", "pgd100"}
        assert reused["evaluated_checkpoint"] == table3[("ViT-S | MIMIR | FastAT", group)]["evaluated_checkpoint"]
    assert table4[("XCiT-M", "ε = 4/255")]["trained"]
    # Table 9 evaluated the CIFAR-10 models of Table 2, and the ImageNet ones of Tables 3 and 4 at ε = 2/255
    assert not any(r["trained"] for r in table9.values())
    assert (table9[("CIFAR-10 | ViT-B", None)]["evaluated_checkpoint"]
            == table2[("ViT-B | MIMIR | PGD", None)]["evaluated_checkpoint"])
    assert (table9[("ImageNet-1K | ConViT-S", None)]["evaluated_checkpoint"]
            == table4[("ConViT-S", "ε = 2/255")]["evaluated_checkpoint"])
    assert set(table9[("Tiny-ImageNet | ViT-S", None)]["accuracy"]) == {"pgd20", "pgd_mi", "pgd_feature"}
    # the plan of Table 9 now finds every model it evaluates
    plan = plan_sweep(spec_path("table9_adaptive"), tiny=True, out=str(experiments["table9_adaptive"]))
    assert all(t.evaluates.endswith("(finished)") for t in plan.trials)


@pytest.fixture
def fake_trial(monkeypatch):
    """The sweep tests' stand-in trial, shipped to Tune's actors by value, without its pauses (no
    interrupt lands between these trials)."""
    import ray.cloudpickle

    import sweep_fakes

    monkeypatch.setattr(sweep_fakes, "SECONDS_PER_TRIAL", 0.0)
    monkeypatch.setattr(sweep_fakes, "REPORT_DRAIN_SECONDS", 0.0)
    ray.cloudpickle.register_pickle_by_value(sweep_fakes)
    return sweep_fakes.fake_trial


def test_an_evaluation_only_row_runs_through_tune_and_refuses_a_model_trained_otherwise(ray_local, tmp_path,
                                                                                       fake_trial):
    from mimir.sweeps import run_sweep

    common = ["pretrain.epochs=1", "pretrain.warmup_epochs=0", "finetune.epochs=1", "finetune.warmup_epochs=0"]
    source = _write(tmp_path, "name: source\nrows: [{label: mimir}]\n", "source.yaml")
    run_sweep(source, common, out=str(tmp_path / "source"), run=fake_trial)
    evaluator = _write(tmp_path, "name: evaluator\nrows: [{label: again, evaluates: {spec: source.yaml, row: mimir}}, "
                                 "{label: other lr, evaluates: {spec: source.yaml, row: mimir}, "
                                 "set: {finetune.blr: 1.0e-4}}]\n", "evaluator.yaml")
    experiment = run_sweep(evaluator, common, out=str(tmp_path / "evaluator"), run=fake_trial)
    (record,) = _records(experiment)
    (failure,) = [json.loads(p.read_text()) for p in experiment.glob(f"trials/*/{FAILED}")]
    (trained,) = _records(tmp_path / "source")
    assert record["row"] == "again" and record["evaluated_checkpoint"] == trained["evaluated_checkpoint"]
    assert failure["row"] == "other lr"
    trained_blr = trained["config"]["finetune"]["blr"]
    assert f"trained with another config: finetune.blr: {trained_blr} -> 0.0001" in failure["reason"]
    assert math.isfinite(record["accuracy"]["pgd20"])


def test_a_plan_checks_the_connected_cluster(ray_local, monkeypatch, tmp_path):
    """The shared local Ray has 2 CPUs and no GPU: a CPU spec fits, a GPU spec never does."""
    monkeypatch.setattr(plan_module, "connected_cluster", CONNECTED_CLUSTER)
    cpu = plan_sweep(REPO / "tune" / "quickstart.yaml")
    assert "connected Ray cluster" in cpu.cluster.source and not cpu.infeasible
    gpu = plan_sweep(spec_path("table7_estimator"))
    assert len(gpu.infeasible) == 9 and "CANNOT EVER BE SCHEDULED" in format_plan(gpu)
