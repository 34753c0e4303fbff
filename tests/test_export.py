"""`mimir export` and `mimir.load_classifier`: timm loads the exported weights with no missing or
unexpected key and gives mimir's logits; the pre-trained encoder exports with every key."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import mimir
from mimir.cli import main
from mimir.config import build_config
from mimir.models import build_classifier, build_mae
from mimir.train.checkpoint import save_checkpoint


def _run_folder(tmp_path, cfg, pool, name="run"):
    """A finished run's folder as mimir writes it: config.json, stage records, checkpoints."""
    run = tmp_path / name
    cfg = build_config(cfg.model_dump(mode="json") | {"output_dir": str(run)}
                       | {"finetune": cfg.finetune.model_dump(mode="json") | {"global_pool": pool}})
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    classifier = build_classifier(cfg, num_classes=7)
    for parameter in classifier.parameters():  # not the fresh head's zeros: every weight must make it across
        parameter.data.normal_(0, 0.1)
    mae = build_mae(cfg)
    state = {"epoch": 0, "config": cfg.model_dump(mode="json"), "num_classes": 7}
    for stage, model, checkpoints in (("pretrain", mae, ["checkpoint_a"]),
                                      ("finetune", classifier, ["checkpoint_a", "checkpoint_b"])):
        for name in checkpoints:
            save_checkpoint(run / stage / name, model, state | {"stage": stage})
        record = {"stage": stage, "checkpoint": f"{stage}/{checkpoints[-1]}", "best_checkpoint": f"{stage}/{checkpoints[0]}"}
        (run / stage / "mimir_stage.json").write_text(json.dumps(record))
    return run, cfg, classifier, mae


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_exported_classifier_loads_into_timm_with_mimirs_logits(tmp_path, tiny_config, pool):
    run, cfg, classifier, _ = _run_folder(tmp_path, tiny_config, pool)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "last"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 7
    assert config["pretrained_cfg"]["mean"] == list(cfg.data.mean) and config["mimir"]["stage"] == "finetune"
    assert not any(k.startswith(("net.", "encoder.")) for k in load_file(str(out / "model.safetensors")))

    images = torch.rand(3, 3, 16, 16)
    expected = classifier.eval()(images)
    normalized = (images - classifier.mean) / classifier.std
    # the folder as a timm model source, and the README's pretrained_cfg_overlay form
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    overlay = timm.create_model(config["architecture"], pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=7),
                                **config["model_args"]).eval()
    for model in (local, overlay):
        assert model.state_dict().keys() == load_file(str(out / "model.safetensors")).keys()
        torch.testing.assert_close(model(normalized), expected, rtol=1e-5, atol=1e-5)
    # mimir's own loader: [0, 1] images, the same logits
    torch.testing.assert_close(mimir.load_classifier(run, "last")(images), expected)


def test_export_picks_the_checkpoint_evaluation_uses(tmp_path, tiny_config):
    run, cfg, *_ = _run_folder(tmp_path, tiny_config, "avg")
    for which, checkpoint in (("best", "checkpoint_a"), ("last", "checkpoint_b")):
        out = tmp_path / which
        assert main(["export", str(run), "--out", str(out), "--checkpoint", which]) == 0
        assert json.loads((out / "config.json").read_text())["mimir"]["checkpoint"].endswith(checkpoint)
    out = tmp_path / "default"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert cfg.evaluate.checkpoint == "best"
    assert json.loads((out / "config.json").read_text())["mimir"]["checkpoint"].endswith("checkpoint_a")


def test_exported_encoder_has_every_key_and_fine_tunes_in_timm(tmp_path, tiny_config):
    run, cfg, _, mae = _run_folder(tmp_path, tiny_config, "avg")
    out = tmp_path / "encoder"
    assert main(["export", str(run / "pretrain" / "checkpoint_a"), "--out", str(out), "--stage", "pretrain"]) == 0
    weights = load_file(str(out / "model.safetensors"))
    encoder = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    assert weights.keys() == encoder.keys()
    assert all(torch.equal(weights[k], encoder[k]) for k in weights)
    # a new 5-class head on the exported encoder, as a user fine-tuning it elsewhere would do
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    torch.testing.assert_close(model.patch_embed.proj.weight, encoder["patch_embed.proj.weight"])


def test_export_names_what_is_wrong(tmp_path, tiny_config, capsys):
    run, *_ = _run_folder(tmp_path, tiny_config, "avg")
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["export", str(run / "pretrain" / "checkpoint_a"), "--out", str(tmp_path / "x")]) == 2
    assert "is a pretrain checkpoint, not a finetune one" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_readme_snippet_runs(tmp_path, tiny_config, monkeypatch):
    """The README's timm block, as written, on a run folder at results/quickstart."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Weights for timm and Python", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    _run_folder(tmp_path, tiny_config, "avg", name="results/quickstart")
    assert main(["export", "results/quickstart", "--out", "export/quickstart"]) == 0
    exec(compile(snippet, "README.md", "exec"), {})


def test_an_exported_model_leaves_with_its_model_card_and_robustbench_info(tmp_path, tiny_config):
    """The card's accuracies, settings and image count are results.json's; the model still loads in
    timm from the folder that holds the card."""
    import re

    from mimir.export import find_checkpoint

    run, cfg, classifier, _ = _run_folder(tmp_path, tiny_config, "avg")
    evaluated = find_checkpoint(run, "finetune", "last").path
    results = {"accuracy": {"natural": 91.25, "pgd20": 70.5, "autoattack": 66.75}, "num_images": 400,
               "evaluated_checkpoint": evaluated}
    (run / "results.json").write_text(json.dumps(results))
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "last"]) == 0
    card = (out / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\w+) \| .* \| ([\d.]+) \|$", card, re.MULTILINE))
    assert {name: float(acc) for name, acc in rows.items()} == results["accuracy"]
    assert "On 400 test images" in card and "PGD-20 on the cross-entropy, L∞ ε = 8/255, step 2/255" in card
    assert "AutoAttack standard" in card and f"mimir {mimir.__version__}" in card and "```yaml" in card
    info = json.loads((out / "robustbench.json").read_text())
    assert (info["clean_acc"], info["autoattack_acc"], info["eps"], info["threat_model"]) == ("91.25", "66.75", "8/255", "Linf")
    assert info["num_evaluated_points"] == 400 and info["architecture"] == "vit_tiny_patch16_224"
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model((images - classifier.mean) / classifier.std), classifier.eval()(images),
                               rtol=1e-5, atol=1e-5)
    # the best checkpoint was not the one evaluated: no accuracies are claimed for it, no RobustBench entry
    assert main(["export", str(run), "--out", str(tmp_path / "best"), "--checkpoint", "best"]) == 0
    assert "Not evaluated" in (tmp_path / "best" / "README.md").read_text()
    assert not (tmp_path / "best" / "robustbench.json").exists()
