from pathlib import Path

import pytest

from mimir.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_paper_presets_are_all_there():
    names = {p.stem for p in CONFIGS}
    expected = {f"cifar10_{a}" for a in ("vit_t", "vit_s", "vit_b", "convit_t", "convit_s", "convit_b")}
    expected |= {"tinyimagenet_vit_s", "tinyimagenet_vit_b", "quickstart"}
    expected |= {f"imagenet_{a}_eps{e}" for a in ("vit_s", "vit_b") for e in (2, 4)}
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.data.img_size % cfg.model.patch_size == 0


def test_presets_carry_the_paper_hyperparameters():
    cfg = load_config(CONFIGS[0].parent / "cifar10_vit_s.yaml")
    assert (cfg.model.patch_size, cfg.pretrain.mask_ratio, cfg.pretrain.blr, cfg.pretrain.batch_size) == (2, 0.75, 1.5e-4, 512)
    assert cfg.pretrain.attack.steps == 1 and cfg.pretrain.attack.eps == pytest.approx(8 / 255)
    assert cfg.pretrain.mi.estimator == "hsic_cca" and cfg.pretrain.mi.weight == 1e-5
    assert (cfg.finetune.layer_decay, cfg.finetune.drop_path, cfg.finetune.attack.steps) == (0.65, 0.1, 10)
    imagenet = load_config(CONFIGS[0].parent / "imagenet_vit_b_eps4.yaml")
    assert imagenet.finetune.method == "fast" and imagenet.evaluate.eps == pytest.approx(4 / 255)
