import math
import os

import pytest
import torch

from mimir.mi import MIPenalty
from mimir.models import build_classifier, build_mae
from mimir.train.steps import (Precision, finetune_optimizer, finetune_step, lr_at, pretrain_optimizer,
                               pretrain_step, set_lr)

CPU = torch.device("cpu")


def _digits_batch(n=32):
    """A fixed, learnable batch: 4 classes of blurred blocks in different corners."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % 4
    images = torch.rand(n, 3, 16, 16, generator=g) * 0.2
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        images[i, :, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] += 0.7
    return images.clamp(0, 1), labels


@pytest.mark.parametrize("estimator,attack_steps", [("hsic", 1), ("renyi", 1), ("none", 0), ("hsic_cca", 2)])
def test_pretrain_step_lowers_the_loss_on_a_fixed_batch(tiny_config, estimator, attack_steps):
    cfg = tiny_config.pretrain.model_copy(update={"blr": 1.5e-3 * 256 / 16})
    cfg.attack.steps = attack_steps
    cfg.mi.estimator, cfg.mi.weight = estimator, 1e-3
    mae = build_mae(tiny_config)
    opt = pretrain_optimizer(mae, cfg)
    images, _ = _digits_batch(16)
    precision = Precision.create("fp32", CPU)
    est = MIPenalty.from_config(cfg.mi)
    torch.manual_seed(0)
    first = [pretrain_step(mae, opt, images, cfg, precision, est) for _ in range(3)]
    for _ in range(20):
        pretrain_step(mae, opt, images, cfg, precision, est)
    last = [pretrain_step(mae, opt, images, cfg, precision, est) for _ in range(3)]
    mean = lambda rows, k: sum(r[k].item() for r in rows) / len(rows)
    assert mean(last, "mse") < 0.8 * mean(first, "mse")
    assert all(r["skipped"] == 0 for r in first + last)
    if estimator != "none":
        assert mean(first, "mi") != 0.0
        assert mean(first, "loss") == pytest.approx(mean(first, "mse") + 1e-3 * mean(first, "mi"), rel=1e-4)
        assert mean(first, "mi_term") == pytest.approx(1e-3 * mean(first, "mi"), rel=1e-6)
    else:
        assert est is None
        assert all(r["mi"] == 0.0 and r["mi_term"] == 0.0 for r in first)


@pytest.mark.parametrize("method", ["clean", "pgd", "fast", "trades", "mart"])
def test_finetune_step_learns_the_fixed_batch(tiny_config, method):
    cfg = tiny_config.finetune.model_copy(update={"method": method, "blr": 2e-3 * 256 / 32, "layer_decay": 1.0,
                                                  "drop_path": 0.0})
    cfg.attack.steps = 2
    clf = build_classifier(tiny_config.model_copy(update={"finetune": cfg}), num_classes=4)
    opt = finetune_optimizer(clf, cfg)
    images, labels = _digits_batch(32)
    precision = Precision.create("fp32", CPU)
    first = finetune_step(clf, opt, images, labels, cfg, precision)
    for _ in range(25):
        last = finetune_step(clf, opt, images, labels, cfg, precision)
    assert last["loss"] < first["loss"]
    assert 0.0 <= last["acc"] <= 1.0


def test_non_finite_loss_never_updates_weights(tiny_config):
    mae = build_mae(tiny_config)
    cfg = tiny_config.pretrain
    opt = pretrain_optimizer(mae, cfg)
    before = {k: v.clone() for k, v in mae.state_dict().items()}
    images = torch.rand(8, 3, 16, 16)
    images[0, 0, 0, 0] = float("nan")
    metrics = pretrain_step(mae, opt, images, cfg, Precision.create("fp32", CPU), MIPenalty.from_config(cfg.mi))
    assert metrics["skipped"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in mae.state_dict().items())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_and_report_finite_metrics(tiny_config, precision):
    mae = build_mae(tiny_config)
    prec = Precision.create(precision, CPU)
    assert (prec.scaler is not None) == (precision == "fp16")
    opt = pretrain_optimizer(mae, tiny_config.pretrain)
    metrics = pretrain_step(mae, opt, torch.rand(8, 3, 16, 16), tiny_config.pretrain, prec,
                            MIPenalty.from_config(tiny_config.pretrain.mi))
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["mi"]) and metrics["mi"] != 0


def test_learning_rate_warms_up_then_follows_the_cosine(tiny_config):
    cfg = tiny_config.pretrain.model_copy(update={"epochs": 100, "warmup_epochs": 10, "blr": 1.5e-4,
                                                  "batch_size": 512})
    assert cfg.lr == pytest.approx(1.5e-4 * 2)  # lr = blr * batch / 256
    assert lr_at(0, cfg) == 0
    assert lr_at(5, cfg) == pytest.approx(cfg.lr / 2)
    assert lr_at(10, cfg) == pytest.approx(cfg.lr)
    assert lr_at(55, cfg) == pytest.approx(cfg.lr / 2)
    assert lr_at(100, cfg) == pytest.approx(0, abs=1e-12)


def test_layer_decay_scales_lower_layers(tiny_config):
    clf = build_classifier(tiny_config, 10)
    opt = finetune_optimizer(clf, tiny_config.finetune)
    set_lr(opt, 1.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    head, embed = clf.net.head.weight, clf.net.patch_embed.proj.weight
    assert lr_of[id(head)] == pytest.approx(1.0)
    # depth 2: embed, block 0, block 1, head -> embed scaled by 0.65^3
    assert lr_of[id(embed)] == pytest.approx(0.65**3)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(clf.net.head.bias)] == 0.0 and decay_of[id(head)] == 0.05


def test_scaling_deterministic_switches_torchs_deterministic_algorithms(monkeypatch):
    from mimir.train.steps import use_deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        use_deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    finally:
        use_deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_an_epochs_data_wait_counts_the_time_spent_getting_batches_not_the_steps():
    import time

    from mimir.train.loops import _TimedBatches

    def slow_batches():
        for i in range(3):
            time.sleep(0.05)  # the data side: counted
            yield {"image": torch.full((1,), i)}

    batches = _TimedBatches(slow_batches())
    seen = []
    for batch in batches:
        seen.append(int(batch["image"]))
        time.sleep(0.2)  # the step: not counted
    assert seen == [0, 1, 2]
    assert 0.15 <= batches.seconds < 0.15 + 0.6  # three waits, and none of the 0.6 s of steps

