"""``mimir export``: a run's encoder or classifier as timm-native weights anyone can load.

The folder written is what timm's own ``save_for_hf`` writes: ``model.safetensors`` with timm's keys
(no ``encoder.`` / ``net.`` prefixes) and a ``config.json`` with the architecture, the model
arguments (img_size, patch_size, widths), num_classes and the normalization mean / std, so either
of these loads it with no missing or unexpected key::

    timm.create_model("local-dir:DIR", pretrained=True)
    timm.create_model(arch, pretrained=True,
                      pretrained_cfg_overlay=dict(file="DIR/model.safetensors", num_classes=N),
                      num_classes=N, **model_args)  # model_args: config.json's, widths and global_pool

(timm replaces a head whose class count differs from its pretrained config's, hence ``num_classes``
in the overlay too.)

A timm model reads normalized images; mimir's classifier (``mimir.load_classifier``) normalizes
[0, 1] images itself, so ``timm_model(normalize(x)) == mimir_classifier(x)``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import timm.models
import torch.nn as nn

from mimir import model_card
from mimir.config import RunConfig
from mimir.errors import ConfigError
from mimir.storage import filesystem
from mimir.evaluation import load_classifier as load_classifier_weights
from mimir.models import create_encoder
from mimir.stages import read_stage_record, stage_checkpoint, storage_root
from mimir.train.checkpoint import STATE, WEIGHTS, load_state, load_weights

STAGES = ("pretrain", "finetune")


def _is_checkpoint(path: str) -> bool:
    fs, inner = filesystem(path)
    return all(fs.get_file_info(f"{inner}/{name}").type == pafs.FileType.File for name in (STATE, WEIGHTS))


def find_checkpoint(run: str | Path, stage: str = "finetune", which: str | None = None) -> ray.train.Checkpoint:
    """A stage's checkpoint: ``run`` is a run folder (a ``mimir run`` output_dir, with config.json)
    or a checkpoint folder itself. ``which`` is ``best`` or ``last``; by default the fine-tuning
    checkpoint that evaluation uses (``evaluate.checkpoint``) and the last pre-training one."""
    if stage not in STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, not {stage!r}")
    run = str(run)
    if _is_checkpoint(run):
        return ray.train.Checkpoint(run if "://" in run else str(Path(run).resolve()))
    config_file = Path(run) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run}: neither a run folder (no config.json) nor a checkpoint folder")
    cfg = RunConfig.model_validate(json.loads(config_file.read_text()))
    storage = storage_root(cfg)
    record = read_stage_record(storage, stage)
    if record is None:
        raise FileNotFoundError(f"{run}: no finished {stage} stage under {storage}")
    return stage_checkpoint(storage, record, which or (cfg.evaluate.checkpoint if stage == "finetune" else "last"))


@contextlib.contextmanager
def checkpoint_directory(checkpoint: ray.train.Checkpoint, stage: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A local copy of a checkpoint (a URI is downloaded) and its state, checked to be of ``stage``."""
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
        if state.get("stage") != stage:
            raise ConfigError(f"{checkpoint.path} is a {state.get('stage')} checkpoint, not a {stage} one")
        yield Path(directory), state


def timm_model(checkpoint: ray.train.Checkpoint, stage: str) -> tuple[nn.Module, RunConfig]:
    """The plain timm module of a checkpoint: the classifier (fine-tuning) or the encoder with no head
    (pre-training), and the run config it was trained with."""
    with checkpoint_directory(checkpoint, stage) as (directory, state):
        cfg = RunConfig.model_validate(state["config"])
        if stage == "finetune":
            return load_classifier_weights(directory, cfg).net, cfg
        m = cfg.model
        encoder = create_encoder(m.arch, img_size=cfg.data.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                                 depth=m.depth, num_heads=m.num_heads)
        weights = {k.removeprefix("encoder."): v for k, v in load_weights(directory).items() if k.startswith("encoder.")}
        encoder.load_state_dict(weights)  # strict: every encoder key, nothing else
        return encoder, cfg


def export(run: str | Path, out: str | Path, stage: str = "finetune", which: str | None = None) -> Path:
    """Write a run's (or checkpoint's) model as ``model.safetensors`` + ``config.json`` in ``out``; a
    fine-tuned classifier also gets its model card (``README.md``) and, where the run measured
    AutoAttack, ``robustbench.json`` (:mod:`mimir.model_card`)."""
    checkpoint = find_checkpoint(run, stage, which)
    model, cfg = timm_model(checkpoint, stage)
    out = Path(out)
    timm.models.save_for_hf(model.eval(), str(out), safe_serialization=True,
                            data_config={"mean": tuple(cfg.data.mean), "std": tuple(cfg.data.std)})
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    for inherited in ("tag", "license"):  # timm's default config describes its ImageNet weights, not these
        config["pretrained_cfg"].pop(inherited, None)
    config["mimir"] = {"stage": stage, "checkpoint": checkpoint.path, "dataset": cfg.data.dataset,
                       "config_hash": cfg.config_hash()}
    config_file.write_text(json.dumps(config, indent=2))
    if stage == "finetune":
        results_file = Path(str(run)) / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
        if results is not None and results.get("evaluated_checkpoint") not in (None, checkpoint.path):
            results = None  # its accuracies are another checkpoint's
        model_card.write(out, cfg, results, config["architecture"], config["num_classes"])
    return out


def main(args: Any) -> int:
    """``mimir export`` handler."""
    out = export(args.run, args.out, args.stage, args.checkpoint)
    config = json.loads((out / "config.json").read_text())
    print(f"exported the {args.stage} {config['architecture']} ({config['num_classes']} classes) -> {out}")
    print(f'load it: timm.create_model("local-dir:{out}", pretrained=True)')
    return 0
