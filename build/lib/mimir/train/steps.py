"""Pure PyTorch training steps: model, optimizer and batch in; loss and metrics out.

They know nothing of Ray, so the per-worker loops call them and tests exercise them directly.
Metrics come back as detached 0-dim tensors on the model's device: the loop sums them there and
synchronizes once per epoch (``.item()`` per step would stall a GPU every step).
A model may arrive wrapped in DistributedDataParallel: the update goes through the wrapper (so
gradients are all-reduced), attacks and masks use the bare module (no gradient sync needed).
"""

from __future__ import annotations

import contextlib
import os
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from mimir import attacks
from mimir.config import FinetuneConfig, OptimConfig, PretrainConfig
from mimir.mi import MIPenalty


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@dataclass
class Precision:
    """Autocast dtype (None = fp32) and the fp16 GradScaler, for one device."""

    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, precision: str, device: torch.device) -> "Precision":
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else "fp32"
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        return cls(device.type, dtype, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def use_deterministic_algorithms(on: bool) -> None:
    """``scaling.deterministic``: torch's deterministic kernels (an op without one raises), the
    cuBLAS workspace they need (read when cuBLAS starts) and no cuDNN autotuning; off: torch's defaults."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = False


def compile_forward(model: nn.Module, on: bool = True) -> nn.Module:
    """``scaling.compile``: compile the module's forward (and so its backward, for the update and for
    every attack's input gradient) with ``torch.compile``, in place, so parameter names, checkpoints
    and DDP wrapping stay as they are. Helpers called outside ``forward`` (masks, losses, the MI
    penalty, the optimizer) stay eager; train and eval mode each compile once."""
    if on:
        model.compile()
    return model


# -- learning rate -------------------------------------------------------------------------------
def lr_at(epoch: float, cfg: OptimConfig) -> float:
    """Linear warm-up then half-cycle cosine, evaluated per iteration (``epoch`` is fractional)."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def pretrain_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases and norms (MAE)."""
    groups = param_groups_weight_decay(unwrap(model), cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def finetune_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay over the timm network's blocks (BEiT / MAE fine-tuning)."""
    net = unwrap(model).net
    groups = param_groups_layer_decay(net, cfg.weight_decay, no_weight_decay_list=net.no_weight_decay(),
                                      layer_decay=cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


# -- the update ----------------------------------------------------------------------------------
def _params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on this worker and on every other one (one small all-reduce).

    Under DDP every rank must take the same decision: a rank that skips ``backward()`` while the
    others run it desynchronizes the gradient all-reduces (gradients of different steps get averaged,
    then a later collective aborts)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def apply_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, precision: Precision,
                 clip_grad: float | None) -> bool:
    """Backward and step; returns False (weights untouched) when the loss, on any worker, or the
    (all-reduced, so identical) gradients are not finite."""
    optimizer.zero_grad(set_to_none=True)
    if not _finite_on_every_rank(loss):
        return False
    scaler = precision.scaler
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(list(_params(optimizer)), clip_grad or float("inf"))
    if scaler:
        scaler.step(optimizer)  # skips the step itself on inf/NaN gradients
        scaler.update()
        return bool(torch.isfinite(norm))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def pretrain_adversary(mae: nn.Module, images: torch.Tensor, keep: torch.Tensor, cfg: PretrainConfig,
                       precision: Precision) -> torch.Tensor:
    """The encoder's input x + delta for this batch and mask (x itself when ``attack.steps == 0``)."""
    if cfg.attack.steps == 0:
        return images
    a = cfg.attack
    with precision.autocast():
        return attacks.reconstruction_attack(mae, images, keep, a.eps, a.step_size, a.steps, a.random_start,
                                             fresh_mask=cfg.attack_mask == "fresh",
                                             target_adversarial=cfg.attack_target == "adversarial")


def _pretrain_forward(model: nn.Module, images: torch.Tensor, cfg: PretrainConfig,
                      precision: Precision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask, attack and forward of a pre-training step: (x + delta, latent z, masked MSE to clean x)."""
    mae = unwrap(model)
    keep = mae.sample_keep(images.shape[0], images.device)
    adv = pretrain_adversary(mae, images, keep, cfg, precision)
    with precision.autocast():
        pred, latent = model(adv, keep)
        mse = mae.reconstruction_loss(pred, images, keep)
    return adv, latent, mse


def pretrain_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  cfg: PretrainConfig, precision: Precision, penalty: MIPenalty | None) -> dict[str, torch.Tensor]:
    """One step of Algorithm 1 with Eq. 8: attack, reconstruct the clean image, add lambda * I.

    ``attack.steps == 0`` is MAE; ``penalty is None`` is Adv-MAE. Metrics: ``loss``, ``mse``,
    ``mi`` (the estimate I), ``mi_term`` (lambda * I, what the loss adds) and ``skipped``.
    """
    adv, latent, mse = _pretrain_forward(model, images, cfg, precision)
    zero = torch.zeros((), device=images.device)
    mi = penalty.mi(images, adv, latent) if penalty else zero
    term = penalty.weight * mi if penalty else zero
    loss = mse + term
    updated = apply_update(loss, optimizer, precision, cfg.clip_grad)
    return {"loss": loss.detach(), "mse": mse.detach(), "mi": mi.detach(), "mi_term": term.detach(),
            "skipped": torch.tensor(float(not updated), device=images.device)}


def _grad_norm(output: torch.Tensor, params: list[torch.Tensor], retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(output, params, retain_graph=retain, allow_unused=True)
    return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))


def mi_gradient_share(model: nn.Module, images: torch.Tensor, cfg: PretrainConfig, precision: Precision,
                      penalty: MIPenalty) -> tuple[torch.Tensor, torch.Tensor]:
    """||grad_theta lambda * I|| / ||grad_theta L_mse|| over the encoder's parameters on this batch,
    and the estimate I itself.

    The same computation as a step (mask, attack, forward) on the bare module, without an update,
    without touching any gradient buffer and with its own random stream, so a run that measures it
    trains exactly as one that does not; costs about one step. It answers "does the penalty move
    the encoder at this lambda?", which the loss value alone cannot (lambda * I can be negligible
    next to the MSE while its gradient is not, and the other way round).
    """
    mae = unwrap(model)
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        adv, latent, mse = _pretrain_forward(mae, images, cfg, precision)  # bare module: no DDP sync
        mi = penalty.mi(images, adv, latent)
        params = [p for p in mae.encoder.parameters() if p.requires_grad]
        share = _grad_norm(penalty.weight * mi, params, retain=True) / _grad_norm(mse, params, retain=False)
    return share.detach(), mi.detach()


def finetune_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  labels: torch.Tensor, cfg: FinetuneConfig, precision: Precision) -> dict[str, torch.Tensor]:
    """One fine-tuning step: clean, PGD-k, FastAT (FGSM-RS), TRADES or MART.

    ``labels`` are class ids (B,) or soft targets (B, C) from MixUp / CutMix. Adversarial examples
    are crafted with the model in eval mode (no drop path), the update runs in train mode.
    Accuracy is measured on the inputs the update trains on (adversarial for the robust methods).
    """
    net = unwrap(model)
    a = cfg.attack
    with precision.autocast():
        adv = None
        if cfg.method != "clean":
            net.eval()
            if cfg.method == "trades":
                adv = attacks.trades_adversary(net, images, a.eps, a.step_size, a.steps)
            elif cfg.method == "fast":
                adv = attacks.fgsm_rs(net, images, labels, a.eps)
            elif cfg.method == "mart" and cfg.mart_start == "gaussian":
                adv = attacks.pgd_ce(net, images, labels, a.eps, a.step_size, a.steps,
                                     start=images + 0.001 * torch.randn_like(images))
            else:  # pgd, mart from a uniform start
                adv = attacks.pgd_ce(net, images, labels, a.eps, a.step_size, a.steps, a.random_start)
            net.train()
        if cfg.method in ("trades", "mart"):
            logits_nat, logits = model(torch.cat([images, adv])).float().chunk(2)
            loss_fn = attacks.trades_loss if cfg.method == "trades" else attacks.mart_loss
            loss = loss_fn(logits_nat, logits, labels, cfg.beta)
        else:
            logits = model(images if adv is None else adv).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    updated = apply_update(loss, optimizer, precision, cfg.clip_grad)
    hard = labels if labels.ndim == 1 else labels.argmax(dim=1)
    acc = (logits.argmax(dim=1) == hard).float().mean()
    return {"loss": loss.detach(), "acc": acc.detach(),
            "skipped": torch.tensor(float(not updated), device=images.device)}
