"""Bad input never reaches a traceback: each of these is refused by the CLI with exit code 2 and a
message naming the field or path, before Ray starts, and nothing is written to the output folder."""

import json
from pathlib import Path

import pytest

from mimir import cli, runner

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

RUN_OVERRIDES = [  # (override(s), what the message must name)
    (["pretrain.mask_ratio=1.0"], "pretrain.mask_ratio"),
    (["pretrain.mask_ratio=0"], "pretrain.mask_ratio"),
    (["finetune.attack.eps=-0.1"], "finetune.attack.eps"),
    (["finetune.attack.eps=8/0"], "finetune.attack.eps"),
    (["model.patch_size=3"], "model.patch_size 3"),
    (["model.arch=resnet50"], "resnet50"),
    (["pretrain.mi.estimator=kde"], "pretrain.mi.estimator"),
    (["pretrain.epochs=many"], "pretrain.epochs"),
    (["pretrian.epochs=3"], "pretrian"),
    (["pretrain.lr=3"], "pretrain.lr"),
    (["model.arch=convit_tiny", "pretrain.mask_ratio=0.8"], "square grid"),
    (["model.arch=convit_tiny", "pretrain.mask_ratio=0.6", "pretrain.mask_sampling=grid"], "square grid"),
    (["model.arch=xcit_small", "model.patch_size=2"], "XCiT"),
    (["scaling.num_workers=3"], "scaling.num_workers"),
    (["model.embed_dim=102"], "model.embed_dim 102"),
    (["model.embed_dim=126", "model.num_heads=6"], "model.embed_dim 126"),
    (["pretrain.warmup_epochs=50"], "warmup_epochs"),
    (["model.decoder_heads=5"], "decoder_heads"),
    (["pretrain.mi.sigma=-1.0"], "pretrain.mi"),
    (["pretrain.mi.sigma=wide"], "pretrain.mi.sigma"),
    (["pretrain.mi.sigma=median"], "pretrain.mi"),
    (["pretrain.mi.estimator=renyi", "pretrain.mi.alpha=1"], "alpha"),
    (["pretrain.mi.weight=-1"], "pretrain.mi.weight"),
    (["pretrain.mi.input=both"], "pretrain.mi.input"),
    (["pretrain.attack_mask=random"], "pretrain.attack_mask"),
    (["pretrain.attack_target=x"], "pretrain.attack_target"),
    (["finetune.global_pool=max"], "finetune.global_pool"),
    (["finetune.method=fgsm"], "finetune.method"),
    (["finetune.attack.steps=0"], "attack.steps"),
    (["finetune.label_smoothing=1.5"], "finetune.label_smoothing"),
    (["finetune.drop_path=1"], "finetune.drop_path"),
    (["finetune.layer_decay=0"], "finetune.layer_decay"),
    (["finetune.mart_start=zero"], "finetune.mart_start"),
    (["evaluate.attacks=[pgd7]"], "evaluate.attacks"),
    (["evaluate.attacks=[pgd_mi]", "evaluate.pgd_mi.weight=0"], "pgd_mi"),
    (["evaluate.num_images=0"], "evaluate.num_images"),
    (["data.crop_scale=[0.9, 0.1]"], "crop_scale"),
    (["data.std=[0, 1, 1]"], "std"),
    (["data.img_size=0"], "data.img_size"),
    (["data.augment=strong"], "data.augment"),
    (["data.shuffle_buffer=-1"], "data.shuffle_buffer"),
    (["scaling.precision=fp8"], "scaling.precision"),
    (["model.init=kaiming"], "model.init"),
    (["pretrain.epochs"], "key=value"),
    (["=3"], "key=value"),
    (["pretrain=3", "pretrain.epochs=2"], "conflicts"),
    (["data.dataset=no-such-dataset"], "no-such-dataset"),
]


@pytest.fixture
def files(tmp_path):
    """Broken config files, spec files, checkpoints and folders to feed the CLI."""
    f = {"out": tmp_path / "out", "data": tmp_path / "data"}
    f["not_utf8"] = tmp_path / "latin1.yaml"
    f["not_utf8"].write_bytes("name: caf\xe9\n".encode("latin-1"))
    f["bad_yaml"] = tmp_path / "bad.yaml"
    f["bad_yaml"].write_text("pretrain: [1, 2\n")
    f["list_yaml"] = tmp_path / "list.yaml"
    f["list_yaml"].write_text("- a\n- b\n")
    f["not_checkpoint"] = tmp_path / "not-a-checkpoint"
    f["not_checkpoint"].mkdir()
    (f["not_checkpoint"] / "notes.txt").write_text("hello")
    f["finetune_ckpt"] = tmp_path / "finetune-ckpt"
    f["finetune_ckpt"].mkdir()
    (f["finetune_ckpt"] / "state.json").write_text(json.dumps({"stage": "finetune", "epoch": 0}))
    (f["finetune_ckpt"] / "model.safetensors").write_bytes(b"")
    f["no_weights"] = tmp_path / "no-weights"
    f["no_weights"].mkdir()
    (f["no_weights"] / "state.json").write_text(json.dumps({"stage": "pretrain", "epoch": 0}))
    f["broken_state"] = tmp_path / "broken-state"
    f["broken_state"].mkdir()
    (f["broken_state"] / "state.json").write_text("{not json")
    for name, text in {
        "good_spec": "rows: [{label: a}]\n",
        "empty_spec": "rows: []\n",
        "unevaluated_spec": "objective: {metric: autoattack}\nrows: [{label: a}]\n",
        "unknown_spec_field": "rows: [{label: a}]\nsamplr: grid\n",
        "tpe_rows_spec": "sampler: tpe\nrows: [{label: a}]\n",
        "bad_row_spec": "rows: [{label: a, set: {pretrain.epochs: -1}}]\n",
        "bad_space_spec": "space: {finetune.blr: {uniform: [0.1, 0.2]}}\n",
    }.items():
        f[name] = tmp_path / f"{name}.yaml"
        f[name].write_text(f"name: t\nbase: {QUICKSTART}\n{text}")
    f["missing_base_spec"] = tmp_path / "missing_base.yaml"
    f["missing_base_spec"].write_text("name: t\nbase: no-such-base.yaml\nrows: [{label: a}]\n")
    return f


def _cases():
    run = lambda *extra: ["run", str(QUICKSTART), "output_dir={out}", "data.root={data}", *extra]
    cases = [(run(*overrides), named) for overrides, named in RUN_OVERRIDES]
    cases += [
        (["run", "{out}/../no-such.yaml"], "not found"),
        (["run", "{not_utf8}", "output_dir={out}"], "UTF-8"),
        (["run", "{bad_yaml}", "output_dir={out}"], "not valid YAML"),
        (["run", "{list_yaml}", "output_dir={out}"], "mapping"),
        (["evaluate", str(QUICKSTART), "output_dir={out}", "--checkpoint", "{out}/../nothing-here"], "--checkpoint"),
        (["evaluate", str(QUICKSTART), "output_dir={out}", "--checkpoint", "{not_checkpoint}"], "not a mimir checkpoint"),
        (["evaluate", str(QUICKSTART), "output_dir={out}", "--checkpoint", "{broken_state}"], "--checkpoint"),
        (["finetune", str(QUICKSTART), "output_dir={out}", "--pretrained", "{finetune_ckpt}"], "pretrain one is needed"),
        (["finetune", str(QUICKSTART), "output_dir={out}", "--pretrained", "{no_weights}"], "model.safetensors"),
        (["finetune", str(QUICKSTART), "output_dir={out}", "data.root={data}"], "no finished pre-training"),
        (["evaluate", str(QUICKSTART), "output_dir={out}", "data.root={data}"], "no finished fine-tuning"),
        (["run", str(QUICKSTART), "output_dir={out}", "--resume", "--overwrite"], "not allowed with"),
        (["sweep", "{out}/../no-such-spec.yaml", "--out", "{out}"], "not found"),
        (["sweep", "{empty_spec}", "--out", "{out}"], "search space is empty"),
        (["sweep", "{unevaluated_spec}", "--out", "{out}"], "objective.metric"),
        (["sweep", "{unknown_spec_field}", "--out", "{out}"], "samplr"),
        (["sweep", "{tpe_rows_spec}", "--out", "{out}"], "sampler"),
        (["sweep", "{bad_row_spec}", "--out", "{out}"], "pretrain.epochs"),
        (["sweep", "{bad_space_spec}", "--out", "{out}"], "grid"),
        (["sweep", "{missing_base_spec}", "--out", "{out}"], "no-such-base.yaml"),
        (["sweep", "{good_spec}", "model.arch=resnet50", "--out", "{out}"], "resnet50"),
        (["data", "prepare", "imagenet", "--out", "{out}"], "source path is required"),
        (["data", "prepare", "mnist", "--out", "{out}"], "unknown dataset"),
        (["data", "prepare", "imagenet", "--source", "{out}/../no-such-folder", "--out", "{out}"], "not found"),
        (["data", "prepare", "tiny-imagenet", "--download", "--out", "{out}"], "only CIFAR-10"),
        (["data", "prepare", "digits", "--source", "{bad_yaml}", "--out", "{out}"], "ships with"),
        (["data", "prepare", "digits", "--name-as", ".hidden", "--out", "{out}"], "invalid dataset name"),
        (["mi-scale", str(QUICKSTART), "model.arch=resnet50"], "resnet50"),
        (["mi-scale", str(QUICKSTART), "--checkpoint", "{out}/../nothing-here"], "not found"),
        (["bench", "--methods", "nope", "--out", "{out}/bench.json"], "nope"),
        (["frobnicate"], "invalid choice"),
    ]
    return cases


CASES = _cases()


def test_there_are_at_least_fifty_bad_inputs():
    assert len(CASES) >= 50


@pytest.mark.parametrize("argv,named", CASES, ids=[" ".join(a[-2:]) for a, _ in CASES])
def test_bad_input_is_refused_by_name_before_ray(files, argv, named, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    argv = [a.format(**files) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    message = captured.err + captured.out
    assert code == 2, message
    assert named in message, message
    assert "Traceback" not in message
    out = files["out"]
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
