import pytest
import torch

from mimir.config import build_config
from mimir.models import build_classifier, build_mae, load_encoder_weights, patchify, unpatchify
from mimir.models.mae import cell_mask, keep_to_mask


def test_patchify_and_unpatchify_invert_each_other():
    images = torch.rand(3, 3, 16, 16)
    patches = patchify(images, 4)
    assert patches.shape == (3, 16, 48)
    # the first patch is the top-left 4x4 block, pixels in (row, col, channel) order
    assert torch.equal(patches[0, 0], images[0, :, :4, :4].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4), images)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_vit_encoder_sees_exactly_the_visible_fraction(tiny_config, ratio):
    cfg = build_config(tiny_config.model_dump() | {"pretrain": {"mask_ratio": ratio}})
    mae = build_mae(cfg)
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    keep = mae.sample_keep(4)
    pred, latent = mae(torch.rand(4, 3, 16, 16), keep)
    visible = int(64 * (1 - ratio))
    assert seen == [1 + visible]  # class token + visible patches
    assert latent.shape[1] == 1 + visible
    assert pred.shape == (4, 64, 2 * 2 * 3)
    assert (keep_to_mask(keep, 64).sum(dim=1) == 64 - visible).all()
    assert all(len(set(row.tolist())) == visible for row in keep)  # no patch drawn twice


def test_masked_patches_do_not_influence_the_latent(tiny_config):
    mae = build_mae(tiny_config).eval()
    x = torch.rand(2, 3, 16, 16)
    keep = mae.sample_keep(2)
    hidden = 1 - mae.pixel_visibility(keep)
    changed = x + hidden * torch.rand_like(x)
    assert torch.allclose(mae.encode(x, keep), mae.encode(changed, keep), atol=1e-6)
    assert not torch.allclose(mae.encode(x, keep), mae.encode(x + (1 - hidden) * 0.1, keep))


def test_cell_mask_keeps_one_patch_per_cell_as_a_grid():
    keep = cell_mask(5, grid=8, cell=2, device=torch.device("cpu"))
    assert keep.shape == (5, 16)
    rows, cols = keep // 8, keep % 8
    cells = torch.arange(16)
    assert torch.equal(rows // 2, (cells // 4).expand(5, -1))
    assert torch.equal(cols // 2, (cells % 4).expand(5, -1))


@pytest.mark.parametrize("sampling", ["uniform", "grid"])
@pytest.mark.parametrize("arch,patch", [("convit_tiny", 2), ("xcit_small", 8)])
def test_grid_families_run_on_half_side_grid(arch, patch, sampling):
    cfg = build_config({"data": {"img_size": 32}, "model": {"arch": arch, "patch_size": patch, "depth": 2},
                        "pretrain": {"mask_sampling": sampling}})
    mae = build_mae(cfg)
    keep = mae.sample_keep(2)
    # uniform (the paper): any subset of the patches; grid: one patch in each 2x2 cell
    cells = torch.stack([keep // (32 // patch) // 2, keep % (32 // patch) // 2], dim=-1)
    one_per_cell = all(len({tuple(c) for c in row.tolist()}) == keep.shape[1] for row in cells)
    assert one_per_cell if sampling == "grid" else mae.cell is None
    grid = 32 // patch
    assert keep.shape == (2, (grid // 2) ** 2)
    pred, latent = mae(torch.rand(2, 3, 32, 32), keep)
    assert pred.shape == (2, grid * grid, patch * patch * 3)
    clf = build_classifier(cfg, 10)
    load_encoder_weights(clf.net, mae.state_dict())
    assert clf(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_pretrained_encoder_loads_into_plain_timm_classifier(tiny_config, pool):
    cfg = build_config(tiny_config.model_dump() | {"finetune": tiny_config.finetune.model_dump() | {"global_pool": pool}})
    mae = build_mae(cfg)
    clf = build_classifier(cfg, num_classes=7)
    load_encoder_weights(clf.net, mae.state_dict())
    fresh = ("head.", "fc_norm.") if pool == "avg" else ("head.",)
    for name, value in clf.net.state_dict().items():
        if not name.startswith(fresh):
            assert torch.equal(value, mae.state_dict()["encoder." + name]), name
    # average pooling: the authors' fine-tuning drops the encoder's final norm for a fresh fc_norm
    assert ("norm.weight" in clf.net.state_dict()) == (pool == "token")
    # fixed sin-cos position embedding made it across
    assert torch.equal(clf.net.pos_embed, mae.encoder.pos_embed)


def test_loading_a_mismatched_checkpoint_names_the_keys(tiny_config):
    mae_state = build_mae(tiny_config).state_dict()
    clf = build_classifier(tiny_config, num_classes=7)
    broken = {k: v for k, v in mae_state.items() if k != "encoder.blocks.1.mlp.fc1.weight"}
    broken["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight.*extra\.weight"):
        load_encoder_weights(clf.net, broken)
    wider = build_config(tiny_config.model_dump() | {"model": tiny_config.model.model_dump() | {"embed_dim": 96}})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder_weights(clf.net, build_mae(wider).state_dict())
