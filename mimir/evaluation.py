"""Robustness evaluation: natural, PGD-20, PGD-100, AutoAttack, PGD-MI and PGD-feature accuracy (%)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mimir import attacks
from mimir.config import RunConfig
from mimir.console import Progress
from mimir.memory import PrivateMemoryPeak
from mimir.mi import MIPenalty
from mimir.models import Classifier, build_classifier
from mimir.seeding import stream_seed
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
        return attacks.autoattack(model, x, y, ev.eps, batch_size=ev.batch_size, seed=stream_seed(cfg.seed, "evaluate"))
    raise ValueError(f"unknown evaluation attack {name!r}")


def attack_counts(model: Classifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  cfg: RunConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Images classified correctly under each configured attack (``correct``), the images seen
    (``num_images``, possibly 0: one worker's empty share) and seconds per attack, streamed: one
    batch of images ([0, 1]) and labels at a time, so memory does not grow with the test split.
    AutoAttack runs on each batch too (in chunks of ``evaluate.batch_size``). ``progress`` prints the
    running accuracies and the ETA while it goes."""
    model.eval()
    device = next(model.parameters()).device
    correct = {name: 0 for name in cfg.evaluate.attacks}
    seconds = {name: 0.0 for name in cfg.evaluate.attacks}
    total = 0
    for images, labels in batches:
        x, y = images.to(device), labels.to(device)
        for name in cfg.evaluate.attacks:
            started = time.perf_counter()
            adv = _attack(name, model, x, y, cfg)
            with torch.no_grad():
                correct[name] += (model(adv).argmax(dim=1) == y).sum().item()
            seconds[name] += time.perf_counter() - started
        total += len(y)
        if progress is not None and progress.due(total):
            running = " ".join(f"{name} {100.0 * n / total:.1f}" for name, n in correct.items())
            progress.report(total, f", accuracy so far: {running}")
    if progress is not None:
        progress.close()
    return {"correct": correct, "num_images": total, "seconds": seconds}


def accuracies(counts: dict[str, Any]) -> dict[str, Any]:
    """:func:`attack_counts`' result (or several workers' added up) as accuracies in percent."""
    total = counts["num_images"]
    if total == 0:
        raise ValueError("the test split gave no images to evaluate")
    return {"accuracy": {name: 100.0 * n / total for name, n in counts["correct"].items()},
            "seconds": counts["seconds"], "num_images": total}


def evaluate_batches(model: Classifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     cfg: RunConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Accuracy in percent under each configured attack, plus seconds per attack (:func:`attack_counts`)."""
    return accuracies(attack_counts(model, batches, cfg, progress))


def evaluate_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor,
                        cfg: RunConfig) -> dict[str, Any]:
    """:func:`evaluate_batches` over tensors already in memory."""
    size = cfg.evaluate.batch_size
    return evaluate_batches(model, zip(images.split(size), labels.split(size)), cfg)


def test_batches(source: Any, batch_size: int, memory: PrivateMemoryPeak | None,
                 device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images in [0, 1] and labels on ``device`` from a test dataset or a worker's share of one
    (anything with Ray Data's ``iter_torch_batches``: a Ray dataset or shard, or
    :class:`~mimir.data.pipeline.InMemoryRows`), sampling ``memory`` after each batch's attacks."""
    for batch in source.iter_torch_batches(batch_size=batch_size, device=device):
        yield batch["image"].float().div_(255), batch["label"]
        if memory is not None:
            memory.sample()


def classifier_from(cfg: RunConfig, num_classes: int, weights: dict[str, torch.Tensor],
                    device: torch.device | str = "cpu") -> Classifier:
    """A classifier of the config's architecture holding ``weights`` (a fine-tuned state dict)."""
    model = build_classifier(cfg, num_classes)
    model.load_state_dict(weights)
    return model.to(device)


def load_classifier(checkpoint_dir: str | Path, cfg: RunConfig, device: torch.device | str = "cpu") -> Classifier:
    """The fine-tuned classifier stored in a fine-tuning checkpoint."""
    return classifier_from(cfg, load_state(checkpoint_dir)["num_classes"], load_weights(checkpoint_dir, device),
                           device)
