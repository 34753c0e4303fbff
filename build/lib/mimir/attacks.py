"""l-inf attacks on [0, 1] images: pre-training reconstruction attack, PGD, FGSM-RS, the TRADES and
MART training losses, the adaptive PGD-MI and PGD-feature attacks, and an AutoAttack adapter.

Every attack returns images inside the eps-ball around the input and inside [0, 1]. Attacks take
gradients only with respect to the perturbation (``torch.autograd.grad``), so they never leave
gradients on the model's parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimir.mi import MIPenalty


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model's weights without gradients while an attack runs: it needs the input's gradient
    only. Eager autograd then keeps fewer activations; a compiled model's backward (one fused graph
    for every input that requires a gradient) and a ``backward()`` call (AutoAttack's FAB) would
    otherwise compute every weight's gradient too. The weights' own flags come back afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip into the eps-ball around x and into the image range."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, step_size: float,
        steps: int, random_start: bool = True, region: torch.Tensor | None = None,
        start: torch.Tensor | None = None) -> torch.Tensor:
    """Maximize ``loss_fn(x_adv)`` by signed-gradient ascent inside the eps-ball.

    ``region`` (broadcastable to x, 0/1) confines the perturbation to part of the image; ``start``
    replaces the uniform random start (TRADES starts from a small Gaussian).
    """
    x = x.detach()
    region = torch.ones_like(x[:1]) if region is None else region.to(x.dtype)
    if start is not None:
        x_adv = project(x + (start.detach() - x) * region, x, eps)
    elif random_start:
        x_adv = project(x + torch.empty_like(x).uniform_(-eps, eps) * region, x, eps)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
        x_adv = project(x_adv.detach() + step_size * grad.sign() * region, x, eps)
    return x_adv.detach()


def reconstruction_attack(mae: nn.Module, x: torch.Tensor, keep: torch.Tensor, eps: float,
                          step_size: float, steps: int, random_start: bool = True, *,
                          fresh_mask: bool = False, target_adversarial: bool = False) -> torch.Tensor:
    """MIMIR's pre-training attack: maximize the masked MSE of decoder(encoder(x + delta)).

    By default (the paper) it uses the same mask ``keep`` as the update it feeds, perturbs only the
    visible patches (the masked ones never reach the encoder) and compares with the clean x (Eq. 9).
    ``fresh_mask`` draws a new mask at every step and perturbs the whole image; ``target_adversarial``
    compares with the attack's own input x + delta (Algorithm 1 line 5); both as in the authors' code.
    """
    def loss(x_adv: torch.Tensor) -> torch.Tensor:
        step_keep = mae.sample_keep(x.shape[0], x.device) if fresh_mask else keep
        pred, _ = mae(x_adv, step_keep)
        return mae.reconstruction_loss(pred, x_adv if target_adversarial else x, step_keep)

    region = None if fresh_mask else mae.pixel_visibility(keep)
    with frozen(mae):
        return pgd(loss, x, eps, step_size, steps, random_start, region=region)


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for hard labels (B,) or soft targets (B, C) (MixUp / CutMix)."""
    return F.cross_entropy(logits.float(), target)


def pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
           steps: int, random_start: bool = True, start: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier PGD on the cross-entropy (Madry et al.); ``start`` replaces the uniform start."""
    with frozen(model):
        return pgd(lambda xa: _soft_ce(model(xa), y), x, eps, step_size, steps, random_start, start=start)


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FastAT's FGSM with random start: one step of 1.25 eps from a uniform start."""
    return pgd_ce(model, x, y, eps, 1.25 * eps, steps=1, random_start=True)


def trades_adversary(model: nn.Module, x: torch.Tensor, eps: float, step_size: float, steps: int) -> torch.Tensor:
    """TRADES' inner maximization: x_adv maximizing KL(f(x) || f(x_adv)), from x + 0.001 N(0, I)."""
    with torch.no_grad():
        p_nat = F.softmax(model(x).float(), dim=1)
    with frozen(model):
        return pgd(lambda xa: F.kl_div(F.log_softmax(model(xa).float(), dim=1), p_nat, reduction="sum"),
                   x, eps, step_size, steps, start=x + 0.001 * torch.randn_like(x))


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv))."""
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_nat.float(), dim=1),
                      reduction="batchmean")
    return _soft_ce(logits_nat, y) + beta * robust


def mart_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART (Wang et al. 2020): boosted CE on x_adv + beta * KL(f(x) || f(x_adv)) weighted by 1 - p_y(x).

    x_adv comes from :func:`pgd_ce`; ``y`` must be class ids.
    """
    logits_nat, logits_adv = logits_nat.float(), logits_adv.float()
    p_adv = F.softmax(logits_adv, dim=1)
    # the most likely wrong class on x_adv, whose probability the margin term pushes down
    top2 = p_adv.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    p_nat = F.softmax(logits_nat, dim=1)
    true_prob = p_nat.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = (p_nat * (torch.log(p_nat + 1e-12) - torch.log(p_adv + 1e-12))).sum(dim=1)
    return boosted_ce + beta * (kl * (1.0 - true_prob)).mean()


def pgd_mi(model: nn.Module, x: torch.Tensor, y: torch.Tensor, penalty: MIPenalty,
           eps: float, step_size: float, steps: int) -> torch.Tensor:
    """Adaptive PGD-MI (Eq. 21): maximize CE(f(x + delta), y) + lambda * I(x + delta, z), with z the
    pooled features the head reads (as in the authors' attack)."""
    def loss(xa: torch.Tensor) -> torch.Tensor:
        z = model.pooled(model.features(xa))
        return _soft_ce(model.net.head(z), y) + penalty(x, xa, z)

    with frozen(model):
        return pgd(loss, x, eps, step_size, steps)


def pgd_feature(model: nn.Module, x: torch.Tensor, eps: float, step_size: float, steps: int) -> torch.Tensor:
    """Adaptive PGD-feature (Eq. 22): maximize the l2 distance of encoder features to the clean ones."""
    with torch.no_grad():
        clean = model.features(x).flatten(1).float()
    with frozen(model):
        return pgd(lambda xa: (model.features(xa).flatten(1).float() - clean).norm(dim=1).sum(),
                   x, eps, step_size, steps)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int = 256,
               seed: int = 0) -> torch.Tensor:
    """AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square); returns the adversarial images.

    Uses the original ``autoattack`` package when installed, else ``pyautoattack``.
    """
    try:
        from autoattack import AutoAttack as Reference
    except ImportError:
        Reference = None
    with frozen(model):
        if Reference is not None:
            adversary = Reference(model, norm="Linf", eps=eps, version="standard", device=x.device.type,
                                  seed=seed, verbose=False)
            return adversary.run_standard_evaluation(x, y, bs=batch_size)
        from pyautoattack import AutoAttack

        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=x.device, seed=seed)
        adversary.verbose = False
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        return x_adv
