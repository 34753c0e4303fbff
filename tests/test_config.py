import pytest

from mimir.config import build_config, load_config, parse_overrides
from mimir.errors import ConfigError


@pytest.mark.parametrize("raw,field", [
    ({"pretrain": {"mask_ratio": 1.0}}, "pretrain.mask_ratio"),
    ({"pretrain": {"mask_ratio": 0.0}}, "pretrain.mask_ratio"),
    ({"finetune": {"attack": {"eps": -0.1}}}, "finetune.attack.eps"),
    ({"data": {"img_size": 32}, "model": {"patch_size": 3}}, "patch_size 3 does not divide"),
    ({"model": {"arch": "resnet50"}}, "unknown architecture 'resnet50'"),
    ({"pretrain": {"mi": {"estimator": "kde"}}}, "pretrain.mi.estimator"),
    ({"pretrain": {"epochs": "many"}}, "pretrain.epochs"),
    ({"pretrian": {"epochs": 3}}, "pretrian: unknown field"),
    ({"pretrain": {"lr": 3}}, "pretrain.lr: unknown field"),
    ({"model": {"arch": "convit_tiny"}, "pretrain": {"mask_ratio": 0.7}}, "square grid"),
    ({"model": {"arch": "convit_tiny"}, "pretrain": {"mask_ratio": 0.6, "mask_sampling": "grid"}}, "square grid"),
    ({"evaluate": {"attacks": ["pgd_mi"], "pgd_mi": {"weight": 0}}}, "pgd_mi"),
    ({"pretrain": {"mi": {"estimator": "hsic_cca", "sigma": "median"}}}, "pretrain.mi"),
    ({"pretrain": {"mi": {"sigma": -1.0}}}, "pretrain.mi"),
    ({"finetune": {"global_pool": "max"}}, "finetune.global_pool"),
    ({"model": {"arch": "xcit_small", "patch_size": 2}, "data": {"img_size": 32}}, "XCiT"),
    ({"scaling": {"num_workers": 3}}, "not divisible by scaling.num_workers"),
])
def test_bad_configs_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert field in str(err.value)


def test_fractions_overrides_and_hashes(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("pretrain:\n  attack: {eps: 8/255, step_size: 10/255}\n")
    cfg = load_config(path, ["pretrain.epochs=3", "pretrain.warmup_epochs=1", "finetune.blr=1e-3", "model.arch=vit_small"])
    assert cfg.pretrain.attack.eps == pytest.approx(8 / 255)
    assert (cfg.pretrain.epochs, cfg.finetune.blr, cfg.model.arch) == (3, 1e-3, "vit_small")
    other_finetune = load_config(path, ["pretrain.epochs=3", "pretrain.warmup_epochs=1", "finetune.blr=5e-3", "model.arch=vit_small"])
    assert cfg.pretrain_hash() == other_finetune.pretrain_hash()
    assert cfg.config_hash() != other_finetune.config_hash()
    other_lambda = load_config(path, ["pretrain.epochs=3", "pretrain.warmup_epochs=1", "pretrain.mi.weight=0.001", "model.arch=vit_small"])
    assert cfg.pretrain_hash() != other_lambda.pretrain_hash()


def test_override_syntax_errors():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["pretrain.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")
