"""The GPU tier: the training steps on CUDA under fp16 / bf16 autocast, and what a seed fixes there.
Skipped where no CUDA device is present (CI); run it on a GPU machine with
``python -m pytest -q tests/test_gpu.py -s`` (``-s`` shows the measured nondeterminism).
"""

import pytest
import torch

from mimir.bench import COMPILE_TOLERANCE
from mimir.config import build_config
from mimir.mi import MIPenalty
from mimir.models import build_classifier, build_mae
from mimir.train.steps import (Precision, compile_forward, finetune_optimizer, finetune_step, pretrain_optimizer,
                               pretrain_step, use_deterministic_algorithms)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STEPS = 4


def _config():
    """ViT-T width at 32x32, patch 4: the shapes of the CIFAR-10 presets, small enough for seconds."""
    return build_config({
        "data": {"img_size": 32},
        "model": {"arch": "vit_tiny", "patch_size": 4},
        "pretrain": {"batch_size": 64, "epochs": 1, "warmup_epochs": 0},
        "finetune": {"batch_size": 64, "epochs": 1, "warmup_epochs": 0},
    })


def _pretrain_losses(precision: str, deterministic: bool, compiled: bool = False) -> list[float]:
    cfg, device = _config(), torch.device("cuda")
    use_deterministic_algorithms(deterministic)
    torch.manual_seed(0)
    model = compile_forward(build_mae(cfg).to(device), compiled)
    optimizer = pretrain_optimizer(model, cfg.pretrain)
    amp = Precision.create(precision, device)
    penalty = MIPenalty.from_config(cfg.pretrain.mi)
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    losses = [pretrain_step(model, optimizer, images, cfg.pretrain, amp, penalty)["loss"].item()
              for _ in range(STEPS)]
    use_deterministic_algorithms(False)
    return losses


def _finetune_losses(precision: str, deterministic: bool, compiled: bool = False) -> list[float]:
    cfg, device = _config(), torch.device("cuda")
    use_deterministic_algorithms(deterministic)
    torch.manual_seed(0)
    model = compile_forward(build_classifier(cfg, 10).to(device), compiled)
    optimizer = finetune_optimizer(model, cfg.finetune)
    amp = Precision.create(precision, device)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(64, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (64,), generator=generator).to(device)
    losses = [finetune_step(model, optimizer, images, labels, cfg.finetune, amp)["loss"].item()
              for _ in range(STEPS)]
    use_deterministic_algorithms(False)
    return losses


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_seed_fixes_the_steps_on_cuda_with_deterministic_algorithms(stage, precision):
    run = _pretrain_losses if stage == "pretrain" else _finetune_losses
    first = run(precision, deterministic=True)
    assert all(map(torch.isfinite, torch.tensor(first)))
    assert run(precision, deterministic=True) == first
    # without deterministic algorithms: measured, not asserted (it depends on the GPU and kernels)
    free = [run(precision, deterministic=False) for _ in range(3)]
    worst = max(abs(a - b) for losses in free[1:] for a, b in zip(losses, free[0]))
    print(f"\n[{stage} {precision}] deterministic losses {first}; default algorithms, 3 runs: "
          f"{sum(f == free[0] for f in free[1:]) + 1} alike, largest loss difference {worst:.3g}")



@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_compiled_steps_give_the_eager_losses_on_cuda(stage, precision, monkeypatch):
    """``scaling.compile`` on CUDA (Triton kernels, attack included): the same seeded steps from the
    same initialization give the eager steps' losses."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # drop path draws as eager does
    run = _pretrain_losses if stage == "pretrain" else _finetune_losses
    eager = run(precision, deterministic=False)
    compiled = run(precision, deterministic=False, compiled=True)
    worst = max(abs(a - b) for a, b in zip(eager, compiled))
    print(f"\n[{stage} {precision}] eager {eager} compiled {compiled}: largest difference {worst:.3g}")
    assert worst <= COMPILE_TOLERANCE[precision]  # what `mimir bench --compile` requires
