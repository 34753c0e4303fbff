import pytest
import torch

from mimir.config import build_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    """A 16x16 ViT small enough for a CPU step in milliseconds."""
    return build_config({
        "data": {"img_size": 16},
        "model": {"arch": "vit_tiny", "patch_size": 2, "embed_dim": 64, "depth": 2, "num_heads": 4,
                  "decoder_dim": 32, "decoder_heads": 4},
        "pretrain": {"batch_size": 16, "epochs": 10, "warmup_epochs": 0},
        "finetune": {"batch_size": 16, "epochs": 10, "warmup_epochs": 0},
    })
