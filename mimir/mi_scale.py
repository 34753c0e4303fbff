"""``mimir mi-scale``: how strongly the MI penalty acts at a config's lambda, before spending GPU-days.

The estimators live on scales orders of magnitude apart (Eq. 29 HSIC ~1e-3, I_alpha ~1, the
authors' normalized-CCA HSIC ~10), so the same lambda can be a real force with one and a no-op with
another. This command takes the first pre-training batch of a config's dataset (stored order, no
augmentation), the config's encoder (random init, or a pre-training checkpoint) and attack, and
prints per estimator: the estimate I, the MI term's share of the encoder gradient
||grad lambda * I|| / ||grad L_mse|| per unit lambda (the share is linear in lambda), the share at the
configured lambda, and the lambda range that puts the share between 1e-3 and 1e-1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from mimir.config import RunConfig, load_config
from mimir.mi import MIPenalty, make_estimator
from mimir.models import build_mae
from mimir.seeding import stream_seed
from mimir.train.checkpoint import load_weights
from mimir.train.steps import Precision, mi_gradient_share

ESTIMATORS = ("hsic", "hsic_cca", "renyi")
ACTIVE_SHARES = (1e-3, 1e-1)  # a share in this range moves the encoder without swamping the MSE


def first_batch(cfg: RunConfig) -> torch.Tensor:
    """The first per-worker pre-training batch of the training split, in stored order, as [0, 1] images."""
    from mimir.data.format import load_manifest
    from mimir.data.pipeline import eval_transform, resolve_dataset, split_files

    dataset_dir = resolve_dataset(cfg.data)
    manifest = load_manifest(dataset_dir)
    size = cfg.pretrain.batch_size // cfg.scaling.num_workers
    rows: dict[str, list[Any]] = {"image": [], "label": []}
    for path in split_files(dataset_dir, "train"):
        table = pq.read_table(path, columns=["image", "label"]).slice(0, size - len(rows["image"]))
        rows["image"] += table.column("image").to_pylist()
        rows["label"] += table.column("label").to_pylist()
        if len(rows["image"]) == size:
            break
    batch = eval_transform({"image": np.array(rows["image"], dtype=object), "label": np.array(rows["label"])},
                           manifest, cfg.data.img_size, cfg.data.eval_crop_pct)
    return torch.from_numpy(batch["image"]).float().div_(255)


def measure(cfg: RunConfig, images: torch.Tensor, checkpoint: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per estimator: estimate, share per unit lambda, share at the configured lambda, active range."""
    rows = []
    for name in ESTIMATORS:
        torch.manual_seed(stream_seed(cfg.seed, "init"))  # the same weights, mask and attack start for every estimator
        mae = build_mae(cfg)
        if checkpoint is not None:
            mae.load_state_dict(load_weights(checkpoint))
        mi_cfg = cfg.pretrain.mi
        sigma = mi_cfg.sigma if mi_cfg.estimator == name else None
        unit = MIPenalty(make_estimator(name, sigma, mi_cfg.alpha), 1.0, mi_cfg.input == "clean")
        share, value = mi_gradient_share(mae, images, cfg.pretrain, Precision.create("fp32", images.device), unit)
        share = share.item()
        rows.append({"estimator": name, "mi": value.item(), "share_per_lambda": share,
                     "share_at_weight": share * mi_cfg.weight,
                     "active_lambda": tuple(s / share if share > 0 else float("inf") for s in ACTIVE_SHARES)})
    return rows


def format_rows(cfg: RunConfig, rows: list[dict[str, Any]]) -> str:
    weight, chosen = cfg.pretrain.mi.weight, cfg.pretrain.mi.estimator
    lines = [f"| estimator | I | share per unit lambda | share at lambda={weight:g} | "
             f"lambda for share {ACTIVE_SHARES[0]:g}..{ACTIVE_SHARES[1]:g} |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " (configured)" if r["estimator"] == chosen else ""
        lo, hi = r["active_lambda"]
        lines.append(f"| {r['estimator']}{mark} | {r['mi']:.3g} | {r['share_per_lambda']:.3g} | "
                     f"{r['share_at_weight']:.3g} | {lo:.2g} .. {hi:.2g} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {args.checkpoint}")
    images = first_batch(cfg)
    print(f"{len(images)} training images of {cfg.data.dataset}, {cfg.model.arch}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random init'}, "
          f"{cfg.pretrain.attack.steps}-step attack, I({'x' if cfg.pretrain.mi.input == 'clean' else 'x + delta'}, z)")
    print(format_rows(cfg, measure(cfg, images, args.checkpoint)))
    return 0
