"""The probe behind docs/digits-recipe.md: one digits run (pre-training, fine-tuning, test accuracy)
through mimir's own model builders, step functions and attacks, with the data in memory instead of
Ray Data, so that a setting costs two to three minutes rather than a full `mimir run`. Its
augmentation draws differ from Ray Data's seeded ones, so its numbers compare settings with each
other, not with `mimir run`.

    python docs/digits_recipe_probe.py data.finetune_crop=resized finetune.blr=2e-2

prints one JSON line: test natural and PGD-20 accuracy, clean accuracy on the training digits,
optimizer steps, seconds, and the validation PGD accuracy every 2 epochs. Pre-trainings are cached
in --cache by their stage hash; --pretrained CHECKPOINT fine-tunes from a `mimir` pre-training
checkpoint instead (a run's ``pretrain/checkpoint_*`` folder, or one in a sweep's pre-training cache).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T

from mimir import attacks
from mimir.config import RunConfig, load_config
from mimir.data.pipeline import random_crop
from mimir.data.sources.digits import digits_arrays
from mimir.mi import MIPenalty
from mimir.models import build_classifier, build_mae, load_encoder_weights
from mimir.train.checkpoint import load_weights
from mimir.train.steps import (Precision, finetune_optimizer, finetune_step, lr_at, pretrain_optimizer,
                               pretrain_step, set_lr)

CPU = torch.device("cpu")
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def holdout(labels: np.ndarray, images: int, seed: int) -> np.ndarray:
    """A stratified, seeded validation hold-out of ``images`` training rows (largest remainders)."""
    rng = np.random.default_rng([seed, 0x7A11D])
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * images / len(labels)
    per_class = np.floor(quota).astype(int)
    per_class[np.argsort(-(quota - per_class), kind="stable")[:images - per_class.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, per_class)]
    return np.sort(np.concatenate(chosen)).astype(int)


def augmented(images: torch.Tensor, crop: T.Transform, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([crop(image) for image in images])


def pretrain(cfg: RunConfig, images: torch.Tensor, cache: Path) -> dict[str, torch.Tensor]:
    path = cache / f"pretrain-{cfg.pretrain_hash()}.pt"
    if path.exists():
        return torch.load(path)
    torch.manual_seed(cfg.seed * 1000)
    mae, p = build_mae(cfg), cfg.pretrain
    optimizer, penalty = pretrain_optimizer(mae, p), MIPenalty.from_config(p.mi)
    steps = len(images) // p.batch_size
    for epoch in range(p.epochs):
        torch.manual_seed(cfg.seed * 7919 + epoch)
        order = torch.randperm(len(images))
        batch_images = augmented(images[order], random_crop(cfg.data, "resized"), cfg.seed * 100003 + epoch)
        for step in range(steps):
            set_lr(optimizer, lr_at(epoch + step / steps, p))
            batch = batch_images[step * p.batch_size:(step + 1) * p.batch_size].float() / 255
            pretrain_step(mae, optimizer, batch, p, Precision.create("fp32", CPU), penalty)
    state = mae.state_dict()
    torch.save(state, path)
    return state


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: RunConfig,
             attack_steps: int) -> tuple[float, float]:
    """Natural and PGD-``attack_steps`` accuracy (%) at the config's evaluation budget."""
    model.eval()
    natural = robust = 0
    for x, y in zip((images.float() / 255).split(256), labels.split(256)):
        with torch.no_grad():
            natural += (model(x).argmax(1) == y).sum().item()
        if attack_steps:
            adv = attacks.pgd_ce(model, x, y, cfg.evaluate.eps, cfg.evaluate.step_size, attack_steps)
            with torch.no_grad():
                robust += (model(adv).argmax(1) == y).sum().item()
    return 100 * natural / len(labels), 100 * robust / len(labels)


def probe(cfg: RunConfig, cache: Path, pretrained: Path | None = None) -> dict:
    arrays = digits_arrays()
    train_x, train_y = (torch.from_numpy(a) for a in arrays["train"])
    test_x, test_y = (torch.from_numpy(a) for a in arrays["test"])
    train_x, test_x = train_x.permute(0, 3, 1, 2).contiguous(), test_x.permute(0, 3, 1, 2).contiguous()
    held = holdout(train_y.numpy(), cfg.finetune.validation.images, cfg.seed)
    kept = np.setdiff1d(np.arange(len(train_y)), held)
    started = time.perf_counter()
    state = (load_weights(pretrained) if pretrained is not None
             else pretrain(cfg, train_x[kept], cache) if cfg.pretrain.enabled else None)
    pretrain_seconds = time.perf_counter() - started
    torch.manual_seed(cfg.seed * 1000)
    model = build_classifier(cfg, 10)
    if state is not None:
        load_encoder_weights(model.net, state)
    f = cfg.finetune
    optimizer, crop = finetune_optimizer(model, f), random_crop(cfg.data, cfg.data.finetune_crop)
    images, labels = train_x[kept], train_y[kept]
    steps, validations, started = len(kept) // f.batch_size, [], time.perf_counter()
    for epoch in range(f.epochs):
        torch.manual_seed(cfg.seed * 7919 + 50000 + epoch)
        order = torch.randperm(len(kept))
        batch_images, batch_labels = augmented(images[order], crop, cfg.seed * 100003 + 50000 + epoch), labels[order]
        model.train()
        for step in range(steps):
            set_lr(optimizer, lr_at(epoch + step / steps, f))
            part = slice(step * f.batch_size, (step + 1) * f.batch_size)
            finetune_step(model, optimizer, batch_images[part].float() / 255, batch_labels[part], f,
                          Precision.create("fp32", CPU))
        if len(held) and ((epoch + 1) % 2 == 0 or epoch == f.epochs - 1):
            validations.append((epoch + 1, round(accuracy(model, train_x[held], train_y[held], cfg,
                                                          f.validation.attack_steps)[1], 2)))
    natural, pgd20 = accuracy(model, test_x, test_y, cfg, 20)
    return {"natural": round(natural, 2), "pgd20": round(pgd20, 2),
            "train_clean": round(accuracy(model, images, labels, cfg, 0)[0], 2),
            "steps": steps * f.epochs, "pretrain_seconds": round(pretrain_seconds, 1),
            "finetune_seconds": round(time.perf_counter() - started, 1), "val_pgd": validations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(QUICKSTART))
    parser.add_argument("--cache", default="results/recipe-probe")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    parser.add_argument("--pretrained", type=Path, help="a mimir pre-training checkpoint folder to fine-tune from")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides)
    print(json.dumps({"overrides": args.overrides, **probe(cfg, cache, args.pretrained)}), flush=True)


if __name__ == "__main__":
    main()
