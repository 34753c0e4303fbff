"""Robustness evaluation: natural, PGD-20, PGD-100, AutoAttack, PGD-MI and PGD-feature accuracy (%)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mimir import attacks
from mimir.config import RunConfig
from mimir.mi import MIPenalty
from mimir.models import Classifier, build_classifier
from mimir.train.checkpoint import load_state, load_weights


def _attack(name: str, model: Classifier, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    ev = cfg.evaluate
    if name == "natural":
        return x
    if name in ("pgd10", "pgd20", "pgd100"):
        return attacks.pgd_ce(model, x, y, ev.eps, ev.step_size, int(name[3:]))
    if name == "pgd_mi":
        penalty = MIPenalty.from_config(ev.pgd_mi)  # never None: the config refuses an inactive pgd_mi
        return attacks.pgd_mi(model, x, y, penalty, ev.eps, ev.step_size, ev.adaptive_steps)
    if name == "pgd_feature":
        return attacks.pgd_feature(model, x, ev.eps, ev.step_size, ev.adaptive_steps)
    if name == "autoattack":
        return attacks.autoattack(model, x, y, ev.eps, batch_size=ev.batch_size, seed=cfg.seed)
    raise ValueError(f"unknown evaluation attack {name!r}")


def evaluate_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor,
                        cfg: RunConfig) -> dict[str, Any]:
    """Accuracy in percent under each configured attack, plus seconds per attack."""
    model.eval()
    device = next(model.parameters()).device
    accuracy: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name in cfg.evaluate.attacks:
        started = time.perf_counter()
        correct = 0
        # AutoAttack batches internally; the others go batch by batch
        size = len(images) if name == "autoattack" else cfg.evaluate.batch_size
        for start in range(0, len(images), size):
            x = images[start:start + size].to(device)
            y = labels[start:start + size].to(device)
            adv = _attack(name, model, x, y, cfg)
            with torch.no_grad():
                correct += (model(adv).argmax(dim=1) == y).sum().item()
        accuracy[name] = 100.0 * correct / len(images)
        seconds[name] = time.perf_counter() - started
    return {"accuracy": accuracy, "seconds": seconds, "num_images": len(images)}


def load_classifier(checkpoint_dir: str | Path, cfg: RunConfig, device: torch.device | str = "cpu") -> Classifier:
    """The fine-tuned classifier stored in a fine-tuning checkpoint."""
    state = load_state(checkpoint_dir)
    model = build_classifier(cfg, state["num_classes"])
    model.load_state_dict(load_weights(checkpoint_dir, device))
    return model.to(device)
