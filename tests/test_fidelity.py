"""MIMIR as the paper and the authors' code define it: the MI penalty acts at the paper's lambda, the
authors' estimators are reproduced independently, and every fidelity choice of the README's table
changes exactly what it says."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimir import attacks, evaluation
from mimir.config import build_config, load_config
from mimir.mi import MIPenalty, hsic_cca, make_estimator, renyi_mi
from mimir.mi_scale import first_batch, measure
from mimir.models import build_classifier, build_mae
from mimir.train.loops import NO_EFFECT_SHARE, no_effect_warning
from mimir.train.steps import (Precision, finetune_optimizer, finetune_step, lr_at, mi_gradient_share,
                               pretrain_optimizer, pretrain_step, set_lr)

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
CPU = torch.device("cpu")
FP32 = Precision.create("fp32", CPU)
EPS = 8 / 255


# -- independent re-derivations of the authors' estimators (MI/hsic.py, MI/DIB_MI.py), in float64 ----
def authors_hsic_cca(x, y, sigma=5.0, eps=1e-5):
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    m = x.shape[0]
    centering = torch.eye(m, dtype=torch.float64) - torch.ones(m, m, dtype=torch.float64) / m

    def centred_gram(v):
        r = (v * v).sum(1).view(-1, 1)
        dist = (r - 2 * v @ v.T + r.T).abs()
        return torch.exp(-dist / (2.0 * sigma * sigma * v.shape[1])) @ centering

    kx, ky = centred_gram(x), centred_gram(y)
    ridge = eps * m * torch.eye(m, dtype=torch.float64)
    rx, ry = kx @ torch.inverse(kx + ridge), ky @ torch.inverse(ky + ridge)
    return (rx * ry.T).sum()


def authors_renyi_mi(x, z, alpha=1.01):
    x, z = x.reshape(len(x), -1).double(), z.reshape(len(z), -1).double()

    def width(v):
        return torch.sort(torch.cdist(v, v, p=2))[0][0:10].mean()

    def gram(v, s):
        r = (v ** 2).sum(-1).reshape(-1, 1)
        return torch.exp(-(-2 * v @ v.T + r + r.T) / s)

    def entropy(k):
        k = k / torch.trace(k)
        eig = torch.linalg.eigvalsh(k).abs()
        return torch.log2((eig ** alpha).sum()) / (1 - alpha)

    kx, kz = gram(x, width(x)), gram(z, width(z))
    return entropy(kx) + entropy(kz) - entropy(kx * kz)


@pytest.mark.parametrize("x_shape,z_shape", [((128, 3, 16, 16), (128, 5, 128)),  # quickstart latent
                                             ((128, 3, 32, 32), (128, 65, 192))])  # ViT-T, CIFAR-10
def test_hsic_cca_equals_the_authors_formula_at_real_sizes(x_shape, z_shape):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(x_shape, generator=g)
    z = torch.randn(z_shape, generator=g) + x.reshape(len(x), -1)[:, : z_shape[-1]].unsqueeze(1)
    assert hsic_cca(x, z).item() == pytest.approx(authors_hsic_cca(x, z).item(), rel=1e-4)


def test_renyi_with_the_authors_width_equals_their_dib_estimator():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 3, 8, 8, generator=g)
    z = torch.randn(64, 5, 16, generator=g) * 3
    ours = renyi_mi(x, z, 1.01, "authors", "authors")
    assert ours.item() == pytest.approx(authors_renyi_mi(x, z).item(), rel=1e-4)
    assert make_estimator("renyi")(x, z).item() == pytest.approx(ours.item(), rel=1e-6)  # the default width
    assert make_estimator("renyi", "median")(x, z).item() != pytest.approx(ours.item(), rel=1e-2)


# -- the penalty acts at the paper's lambda ---------------------------------------------------------
@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    cfg = load_config(QUICKSTART, [f"data.root={root}"])
    return cfg, first_batch(cfg)


def test_the_presets_default_to_the_authors_hsic_at_the_papers_lambda(quickstart):
    cfg, images = quickstart
    assert (cfg.pretrain.mi.estimator, cfg.pretrain.mi.weight) == ("hsic_cca", 1e-5)
    assert images.shape == (128, 3, 16, 16) and 0.0 <= images.min() and images.max() <= 1.0
    torch.manual_seed(cfg.seed)
    share, mi = mi_gradient_share(build_mae(cfg), images, cfg.pretrain, FP32, MIPenalty.from_config(cfg.pretrain.mi))
    assert share.item() > 1e-5, "the MI term must be a measurable part of the encoder gradient"
    assert math.isfinite(mi.item())


def test_mi_scale_puts_eq29_hsic_orders_of_magnitude_below_the_cca_estimator(quickstart):
    cfg, images = quickstart
    rows = {r["estimator"]: r for r in measure(cfg, images)}
    assert rows["hsic_cca"]["share_at_weight"] > 1e-5
    assert rows["hsic"]["share_at_weight"] < NO_EFFECT_SHARE  # Eq. 29 at 1e-5: a no-op
    assert rows["hsic_cca"]["share_per_lambda"] > 100 * rows["hsic"]["share_per_lambda"]
    lo, hi = rows["hsic"]["active_lambda"]
    assert lo * rows["hsic"]["share_per_lambda"] == pytest.approx(1e-3)


def _encoder_after_steps(cfg, images, steps=3):
    torch.manual_seed(0)
    mae = build_mae(cfg)
    optimizer = pretrain_optimizer(mae, cfg.pretrain)
    set_lr(optimizer, cfg.pretrain.lr)
    for _ in range(steps):
        pretrain_step(mae, optimizer, images, cfg.pretrain, FP32, MIPenalty.from_config(cfg.pretrain.mi))
    return torch.cat([p.detach().flatten() for p in mae.encoder.parameters()])


def test_the_penalty_at_the_preset_lambda_changes_what_the_encoder_learns(quickstart):
    cfg, images = quickstart

    def with_mi(estimator, weight):
        return cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(
            update={"mi": cfg.pretrain.mi.model_copy(update={"estimator": estimator, "weight": weight})})})

    without = _encoder_after_steps(with_mi("none", 0.0), images)
    assert torch.equal(without, _encoder_after_steps(with_mi("none", 0.0), images))  # nothing else varies
    shift = lambda w: ((w - without).norm() / without.norm()).item()
    cca, eq29 = shift(_encoder_after_steps(cfg, images)), shift(_encoder_after_steps(with_mi("hsic", 1e-5), images))
    assert cca > 1e-5
    assert cca > 10 * eq29


def test_measuring_the_share_leaves_the_training_run_unchanged(quickstart):
    """The per-epoch probe must not move the run: same weights and losses with or without it."""
    cfg, images = quickstart
    penalty = MIPenalty.from_config(cfg.pretrain.mi)

    def train(probe: bool):
        torch.manual_seed(0)
        mae = build_mae(cfg)
        optimizer = pretrain_optimizer(mae, cfg.pretrain)
        set_lr(optimizer, cfg.pretrain.lr)
        losses = []
        for _ in range(2):
            if probe:
                grads = [None if p.grad is None else p.grad.clone() for p in mae.parameters()]
                mi_gradient_share(mae, images, cfg.pretrain, FP32, penalty)
                after = [p.grad for p in mae.parameters()]  # gradient buffers untouched
                assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, after))
            losses.append(pretrain_step(mae, optimizer, images, cfg.pretrain, FP32, penalty)["loss"].item())
        return losses, torch.cat([p.detach().flatten() for p in mae.parameters()])

    (plain_losses, plain), (probed_losses, probed) = train(False), train(True)
    assert probed_losses == plain_losses and torch.equal(probed, plain)


def test_an_inactive_penalty_is_reported_once_after_warm_up():
    assert no_effect_warning({"epoch": 0, "mi_share": 1e-8}, warmup_epochs=2) is None  # still warming up
    assert "no effect" in no_effect_warning({"epoch": 1, "mi_share": 1e-8}, warmup_epochs=2)
    assert no_effect_warning({"epoch": 5, "mi_share": 1e-4}, warmup_epochs=2) is None
    assert no_effect_warning({"epoch": 5, "loss": 1.0}, warmup_epochs=2) is None  # lambda = 0: no probe


# -- each fidelity choice changes what it says ------------------------------------------------------
def _pretrain_cfg(tiny_config, **update):
    return tiny_config.pretrain.model_copy(update=update)


def test_attack_mask_shared_perturbs_visible_patches_only_fresh_the_whole_image(tiny_config):
    mae = build_mae(tiny_config)
    x = torch.rand(8, 3, 16, 16)
    keep = mae.sample_keep(8)
    hidden = 1 - mae.pixel_visibility(keep)
    shared = attacks.reconstruction_attack(mae, x, keep, EPS, 2 / 255, 2)
    fresh = attacks.reconstruction_attack(mae, x, keep, EPS, 2 / 255, 2, fresh_mask=True)
    assert ((shared - x) * hidden).abs().max() == 0
    assert ((fresh - x) * hidden).abs().max() > EPS / 2


def test_attack_target_clean_follows_eq9_adversarial_follows_algorithm_1(tiny_config):
    mae = build_mae(tiny_config)
    x = torch.rand(8, 3, 16, 16)
    keep = mae.sample_keep(8)
    step = 2 / 255

    region = mae.pixel_visibility(keep)

    def one_step(target_of):  # a random start, then one signed-gradient step, by hand
        torch.manual_seed(7)
        xa = attacks.project(x + torch.empty_like(x).uniform_(-EPS, EPS) * region, x, EPS).requires_grad_(True)
        grad, = torch.autograd.grad(mae.reconstruction_loss(mae(xa, keep)[0], target_of(xa), keep), xa)
        return attacks.project(xa.detach() + step * grad.sign() * region, x, EPS)

    def attack(**options):
        torch.manual_seed(7)
        return attacks.reconstruction_attack(mae, x, keep, EPS, step, 1, **options)

    assert torch.equal(attack(), one_step(lambda xa: x))
    assert torch.equal(attack(target_adversarial=True), one_step(lambda xa: xa))
    # with the shared mask delta is zero on the masked patches, where the loss is taken, so the two
    # targets give the same attack; they differ with the authors' fresh masks
    assert torch.equal(attack(), attack(target_adversarial=True))
    assert not torch.equal(attack(fresh_mask=True), attack(fresh_mask=True, target_adversarial=True))


def test_pretraining_attack_options_reach_the_step(tiny_config, monkeypatch):
    seen = []
    real = attacks.reconstruction_attack
    monkeypatch.setattr(attacks, "reconstruction_attack", lambda *a, **k: seen.append(k) or real(*a, **k))
    mae = build_mae(tiny_config)
    opt = pretrain_optimizer(mae, tiny_config.pretrain)
    for mask, target in [("shared", "clean"), ("fresh", "adversarial")]:
        cfg = _pretrain_cfg(tiny_config, attack_mask=mask, attack_target=target)
        pretrain_step(mae, opt, torch.rand(8, 3, 16, 16), cfg, FP32, None)
    assert seen == [{"fresh_mask": False, "target_adversarial": False},
                    {"fresh_mask": True, "target_adversarial": True}]


def test_mi_input_clean_estimates_i_of_x_adversarial_of_x_plus_delta(tiny_config):
    x, adv, z = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16), torch.randn(8, 5, 32)
    estimator = make_estimator("hsic_cca")
    on_adv = MIPenalty.from_config(tiny_config.pretrain.mi)
    on_clean = MIPenalty.from_config(tiny_config.pretrain.mi.model_copy(update={"input": "clean"}))
    assert on_adv.mi(x, adv, z).item() == pytest.approx(estimator(adv, z).item())
    assert on_clean.mi(x, adv, z).item() == pytest.approx(estimator(x, z).item())
    assert on_adv(x, adv, z).item() == pytest.approx(1e-5 * estimator(adv, z).item())
    assert MIPenalty.from_config(tiny_config.pretrain.mi.model_copy(update={"weight": 0.0})) is None


def test_grid_and_uniform_masking_differ_only_for_grid_families():
    raw = {"data": {"img_size": 32}, "model": {"arch": "convit_tiny", "patch_size": 2, "depth": 2}}
    uniform = build_mae(build_config(raw))
    grid = build_mae(build_config(raw | {"pretrain": {"mask_sampling": "grid"}}))
    assert uniform.cell is None and grid.cell == 2
    vit = build_mae(build_config(raw | {"model": {"arch": "vit_tiny", "patch_size": 2, "depth": 2},
                                        "pretrain": {"mask_sampling": "grid"}}))
    assert vit.cell is None  # ViT has no grid to keep


def test_global_pool_avg_reads_the_mean_patch_token_token_reads_the_class_token(tiny_config):
    x = torch.rand(4, 3, 16, 16)
    for pool in ("avg", "token"):
        cfg = build_config(tiny_config.model_dump() | {"finetune": tiny_config.finetune.model_dump() | {"global_pool": pool}})
        clf = build_classifier(cfg, 10).eval()
        tokens = clf.features(x)
        expected = clf.net.fc_norm(tokens[:, 1:].mean(1)) if pool == "avg" else tokens[:, 0]
        assert torch.allclose(clf.pooled(tokens), expected, atol=1e-6)
    assert build_config({}).finetune.global_pool == "avg"


def test_finetuning_defaults_follow_the_authors(tiny_config):
    cfg = build_config({}).finetune
    assert (cfg.label_smoothing, cfg.min_lr, cfg.mart_start) == (0.1, 1e-6, "gaussian")
    assert lr_at(cfg.epochs, cfg) == pytest.approx(1e-6)
    ft = tiny_config.finetune.model_copy(update={"method": "clean", "drop_path": 0.0})
    clf = build_classifier(tiny_config.model_copy(update={"finetune": ft}), 4)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    with torch.no_grad():
        logits = clf(x)
    loss = finetune_step(clf, finetune_optimizer(clf, ft), x, y, ft, FP32)["loss"]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)


@pytest.mark.parametrize("start", ["gaussian", "uniform"])
def test_mart_starts_where_configured(tiny_config, monkeypatch, start):
    seen = []
    real = attacks.pgd_ce
    monkeypatch.setattr(attacks, "pgd_ce", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    ft = tiny_config.finetune.model_copy(update={"method": "mart", "mart_start": start})
    clf = build_classifier(tiny_config, 4)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    finetune_step(clf, finetune_optimizer(clf, ft), x, y, ft, FP32)
    (args, kwargs), = seen
    if start == "gaussian":  # the authors': x + 0.001 N(0, I)
        assert kwargs["start"].sub(x).std().item() == pytest.approx(1e-3, rel=0.2)
    else:
        assert kwargs.get("start") is None and args[-1] is True  # uniform random start in the ball


def test_init_mae_is_xavier_uniform_timm_is_its_own(tiny_config):
    def qkv(init):
        cfg = build_config(tiny_config.model_dump() | {"model": tiny_config.model.model_dump() | {"init": init}})
        return build_mae(cfg).encoder.blocks[0].attn.qkv.weight.detach()

    mae, timm_init = qkv("mae"), qkv("timm")
    bound = math.sqrt(6 / (mae.shape[0] + mae.shape[1]))
    assert mae.abs().max() <= bound and mae.abs().max() > 0.95 * bound
    assert timm_init.std().item() == pytest.approx(0.02, rel=0.15)  # trunc_normal(std=.02)


def test_norm_pix_loss_normalizes_each_target_patch(tiny_config):
    mae = build_mae(tiny_config)
    x = torch.rand(4, 3, 16, 16)
    keep = mae.sample_keep(4)
    pred = mae(x, keep)[0]
    with_norm = mae.reconstruction_loss(pred, x, keep)
    mae.norm_pix_loss = False
    assert with_norm.item() != pytest.approx(mae.reconstruction_loss(pred, x, keep).item(), rel=1e-3)


def test_pgd_mi_uses_the_authors_penalty_even_for_lambda_zero_pretraining(tiny_config, monkeypatch):
    cfg = build_config(tiny_config.model_dump() | {"pretrain": {"mi": {"estimator": "none", "weight": 0.0}},
                                                   "evaluate": {"attacks": ["pgd_mi"], "adaptive_steps": 1}})
    seen = []
    monkeypatch.setattr(attacks, "pgd_mi", lambda model, x, y, penalty, *a: seen.append(penalty) or x)
    x = torch.rand(4, 3, 16, 16)
    evaluation._attack("pgd_mi", build_classifier(cfg, 10), x, torch.arange(4), cfg)
    penalty, = seen
    z = torch.randn(4, 32)
    assert penalty.weight == 1e-5 and not penalty.on_clean
    assert penalty.mi(x, x, z).item() == pytest.approx(hsic_cca(x, z).item())


# -- fine-tuning crop and evaluation transform (the paper contradicts itself; the authors' code decides)
def _digits_batch(n=16):
    import numpy as np
    from mimir.data.sources.digits import digits_arrays

    images, labels = digits_arrays()["train"]
    return {"image": np.array([im.tobytes() for im in images[:n]], dtype=object), "label": labels[:n],
            "index": np.arange(n)}, images[:n]


DIGITS_MANIFEST = {"encoding": "raw", "image_shape": [16, 16, 3]}


def test_the_padded_crop_only_shifts_the_image_the_resized_crop_rescales_it():
    """``finetune_crop: padded`` is the authors' RandomCrop(size, padding): every output is the
    zero-padded image at some offset within the padding; RandomResizedCrop rescales instead."""
    import numpy as np
    from mimir.config import DataConfig
    from mimir.data.pipeline import train_transform

    batch, originals = _digits_batch()
    data = DataConfig(img_size=16, hflip=False, crop_padding=2, crop_scale=(0.35, 1.0))
    padded = train_transform(batch, DIGITS_MANIFEST, data, False, seed=0, crop="padded")["image"]
    resized = train_transform(batch, DIGITS_MANIFEST, data, False, seed=0, crop="resized")["image"]

    def is_shift(out, original):
        canvas = np.pad(original.transpose(2, 0, 1), ((0, 0), (2, 2), (2, 2)))
        return any(np.array_equal(out, canvas[:, dy:dy + 16, dx:dx + 16]) for dy in range(5) for dx in range(5))

    assert all(is_shift(out, im) for out, im in zip(padded, originals))
    assert sum(is_shift(out, im) for out, im in zip(padded, originals)
               if not np.array_equal(out, im.transpose(2, 0, 1))) > 8  # most are really moved
    assert sum(is_shift(out, im) for out, im in zip(resized, originals)) < 4


def test_finetuning_crops_as_configured_pretraining_always_resizes(monkeypatch, tmp_path):
    """The padded crop is the default for fine-tuning (the authors' CIFAR-10 / Tiny-ImageNet scripts),
    the ImageNet-1K presets pick RandomResizedCrop; pre-training keeps RandomResizedCrop (Table 12)."""
    from mimir.config import DataConfig
    from mimir.data import pipeline

    assert DataConfig().finetune_crop == "padded" and DataConfig().crop_padding == 4
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(configs / "imagenet_vit_b_eps4.yaml").data.finetune_crop == "resized"
    assert load_config(configs / "cifar10_vit_t.yaml").data.finetune_crop == "padded"
    assert load_config(configs / "cifar10_vit_t.yaml").finetune.blr == 0.05  # the text, Table 1, the script

    crops = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            pass

        def map_batches(self, fn, **kwargs):
            crops.append(kwargs.get("fn_kwargs", {}).get("crop"))
            return self

        def randomize_block_order(self, **kwargs):
            return self

        context = type("Context", (), {"execution_options": type("Options", (), {})()})()

    monkeypatch.setattr(pipeline, "load_manifest", lambda d: {"num_classes": 10})
    monkeypatch.setattr(pipeline, "read_split", lambda *a, **k: Recorder())
    for finetune in (False, True):
        pipeline.train_dataset(tmp_path, DataConfig(finetune_crop="padded"), finetune=finetune)
    assert crops == ["resized", "padded"]


def test_the_eval_transform_resizes_by_the_crop_pct_then_centre_crops():
    """The authors' loader: resize (bicubic) to int(size / 0.875), centre-crop to size: a 16-pixel
    digit becomes an 18-pixel one cut back to 16, i.e. zoomed by 18/16; at 1.0 it is left as stored."""
    import numpy as np
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as TF
    from mimir.data.pipeline import eval_transform

    batch, originals = _digits_batch(4)
    plain = eval_transform(batch, DIGITS_MANIFEST, 16, 1.0)["image"]
    assert np.array_equal(plain, originals.transpose(0, 3, 1, 2))
    authors = eval_transform(batch, DIGITS_MANIFEST, 16, 0.875)["image"]
    chw = torch.from_numpy(originals.transpose(0, 3, 1, 2).copy())
    expected = TF.center_crop(TF.resize(chw, 18, interpolation=T.InterpolationMode.BICUBIC, antialias=True), 16)
    assert np.array_equal(authors, expected.numpy())
    assert not np.array_equal(authors, plain)
