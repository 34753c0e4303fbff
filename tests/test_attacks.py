import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mimir import attacks
from mimir.models import Classifier, build_mae, create_encoder
from mimir.mi import MIPenalty, make_estimator

EPS = 8 / 255


def _in_ball(adv, x, eps=EPS):
    return (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    net = create_encoder("vit_tiny", img_size=16, patch_size=4, num_classes=10, embed_dim=64, depth=2,
                         num_heads=4)
    return Classifier(net, (0.5,) * 3, (0.5,) * 3).eval()


def test_reconstruction_attack_raises_masked_mse_stays_in_ball_and_visible(tiny_config):
    mae = build_mae(tiny_config)
    x = torch.rand(8, 3, 16, 16)
    keep = mae.sample_keep(8)
    clean_loss = mae.reconstruction_loss(mae(x, keep)[0], x, keep)
    adv = attacks.reconstruction_attack(mae, x, keep, EPS, 2 / 255, steps=5)
    adv_loss = mae.reconstruction_loss(mae(adv, keep)[0], x, keep)
    assert adv_loss > clean_loss
    assert _in_ball(adv, x)
    hidden = 1 - mae.pixel_visibility(keep)
    assert torch.equal(adv * hidden, x * hidden)  # masked patches stay clean
    assert not torch.equal(adv, x)


@pytest.mark.parametrize("make", [
    lambda m, x, y: attacks.pgd_ce(m, x, y, EPS, 2 / 255, 10),
    lambda m, x, y: attacks.fgsm_rs(m, x, y, EPS),
])
def test_classifier_attacks_raise_cross_entropy_and_stay_in_ball(classifier, make):
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    adv = make(classifier, x, y)
    assert _in_ball(adv, x)
    with torch.no_grad():
        assert F.cross_entropy(classifier(adv), y) > F.cross_entropy(classifier(x), y)
    assert all(p.grad is None for p in classifier.parameters())  # attacks leave no parameter grads


def test_pgd_respects_image_range_at_the_edges(classifier):
    x = torch.cat([torch.zeros(4, 3, 16, 16), torch.ones(4, 3, 16, 16)])
    adv = attacks.pgd_ce(classifier, x, torch.randint(0, 10, (8,)), EPS, 2 / 255, 3)
    assert _in_ball(adv, x)


def test_trades_adversary_raises_kl_and_losses_are_finite(classifier):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    adv = attacks.trades_adversary(classifier, x, EPS, 2 / 255, 5)
    assert _in_ball(adv, x)
    with torch.no_grad():
        nat, rob = classifier(x), classifier(adv)
        assert F.kl_div(F.log_softmax(rob, 1), F.softmax(nat, 1), reduction="sum") > 0
        trades = attacks.trades_loss(nat, rob, y, beta=6.0)
        assert trades > F.cross_entropy(nat, y)  # KL term is positive
        assert torch.isfinite(attacks.mart_loss(nat, rob, y, beta=6.0))
        # with identical logits TRADES reduces to CE
        assert attacks.trades_loss(nat, nat, y, 6.0).item() == pytest.approx(F.cross_entropy(nat, y).item(), abs=1e-5)


def test_adaptive_attacks_raise_their_objectives(classifier):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    adv = attacks.pgd_feature(classifier, x, EPS, 2 / 255, 5)
    assert _in_ball(adv, x)
    with torch.no_grad():
        assert (classifier.features(adv) - classifier.features(x)).norm() > 0
    estimator = make_estimator("hsic_cca")
    adv_mi = attacks.pgd_mi(classifier, x, y, MIPenalty(estimator, 1e-5), EPS, 2 / 255, 5)
    assert _in_ball(adv_mi, x)
    with torch.no_grad():
        def objective(z_in):
            z = classifier.pooled(classifier.features(z_in))  # the authors' z: what the head reads
            return F.cross_entropy(classifier.net.head(z), y) + 1e-5 * estimator(z_in, z)
        assert objective(adv_mi) > objective(x)


def test_autoattack_adapter_returns_bounded_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    adv = attacks.autoattack(model, x, y, EPS, batch_size=6)
    assert adv.shape == x.shape and _in_ball(adv, x)
    with torch.no_grad():
        assert (model(adv).argmax(1) == y).float().mean() <= (model(x).argmax(1) == y).float().mean()


def test_autoattack_freezes_the_weights_and_finds_the_packages_own_examples():
    from pyautoattack import AutoAttack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correct; a small eps leaves some for FAB-T and Square
    eps = 2 / 255
    package = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=0)
    package.verbose = False
    reference, _ = package.run_standard_evaluation(x, y, batch_size=6)
    # the package alone: FAB's backward() computes (and keeps) every weight's gradient, the work
    # freezing saves
    assert any(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    ours = attacks.autoattack(model, x, y, eps, batch_size=6)
    assert torch.equal(ours, reference)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the flags come back
    with torch.no_grad():
        robust = (model(ours).argmax(1) == y).sum().item()
    assert 0 < robust < len(y)  # some points broken and some left after all four attacks ran


def test_attacks_leave_no_weight_gradient_and_give_the_weights_their_flags_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    model[1].bias.requires_grad_(False)  # a flag of the caller's own survives the attack
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module[1].weight.requires_grad))
    attacks.pgd_ce(model, x, y, EPS, EPS / 4, steps=2)
    assert seen == [False, False]  # frozen while it ran
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[1].weight.grad is None
