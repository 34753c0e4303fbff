import pytest
import torch

# fixtures that start Ray (or a Ray cluster): every test using one belongs to the slow tier
SLOW_FIXTURES = {"ray_local", "ray_head"}


def pytest_collection_modifyitems(config, items):
    """``-m "not slow"`` is the fast tier: no test that starts Ray or trains through it."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

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


@pytest.fixture(scope="session")
def ray_local():
    """One in-process local Ray shared by every test that needs it (starting Ray costs seconds)."""
    import ray

    from mimir.ray_env import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A private dataset cache so tests never touch the user's ~/.cache."""
    return tmp_path_factory.mktemp("datasets")


def quick_overrides(output_dir, data_root, pretrain_epochs=2, finetune_epochs=1):
    """The quickstart shrunk to seconds: few epochs, few evaluation images."""
    return [f"output_dir={output_dir}", f"data.root={data_root}",
            f"pretrain.epochs={pretrain_epochs}", "pretrain.warmup_epochs=0", "pretrain.checkpoint_every=1",
            f"finetune.epochs={finetune_epochs}", "finetune.warmup_epochs=0", "finetune.attack.steps=1",
            "finetune.batch_size=128",  # fewer, larger steps than the recipe's 32: the same checks, faster
            "finetune.validation.images=40", "finetune.validation.attack_steps=2",
            "evaluate.num_images=64", "evaluate.attacks=[natural, pgd20]"]
