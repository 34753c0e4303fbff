"""``mimir reproduce``: every table and figure of the paper as one command.

Each result has a spec in ``tune/`` named after it (``table2_cifar10.yaml`` is ``table2``);
``mimir reproduce --list`` lists them with what each runs and costs on the paper's hardware, and
``mimir reproduce table2`` is ``mimir sweep tune/table2_cifar10.yaml``. ``--tiny`` runs a spec's tiny
variant: the same rows on the bundled digits with a small model and one epoch per stage, on one CPU
worker, to check the whole chain (and the table) on a laptop before a cluster spends GPU-days on it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from mimir.config import ConfigError
from mimir.sweeps import Resources, SweepSpec

TUNE_DIR = Path(__file__).resolve().parents[1] / "tune"
TINY_SUFFIX = "_tiny"
# the quickstart's data and a smaller model; one epoch of each stage; a few test images
TINY: dict[str, Any] = {
    "data.dataset": "digits", "data.img_size": 16, "data.mean": [0.5, 0.5, 0.5], "data.std": [0.5, 0.5, 0.5],
    "data.crop_scale": [0.35, 1.0], "data.hflip": False, "data.generated": None,
    "model.patch_size": 4, "model.embed_dim": 64, "model.depth": 2, "model.num_heads": 4,
    "model.decoder_dim": 32, "model.decoder_depth": 1, "model.decoder_heads": 4,
    "pretrain.epochs": 1, "pretrain.warmup_epochs": 0, "pretrain.batch_size": 64, "pretrain.blr": 1.5e-3,
    "pretrain.checkpoint_every": 1,
    "finetune.epochs": 1, "finetune.warmup_epochs": 0, "finetune.batch_size": 64, "finetune.blr": 5.0e-3,
    "finetune.checkpoint_every": 1, "finetune.validation.images": 40, "finetune.validation.attack_steps": 1,
    "evaluate.num_images": 32, "evaluate.adaptive_steps": 5,
    "scaling.use_gpu": False, "scaling.max_failures": 0,
}
XCIT_TINY_PATCH = 8  # timm's XCiT patch embedding takes 8 or 16
TINY_SURFACE: dict[str, Any] = {"steps": 5, "num_images": 32, "attack_steps": 2}  # a loss surface in seconds


def _row_arch(spec: SweepSpec, base: dict[str, Any], row: Any) -> str:
    for values in (row.set, spec.overrides):
        if "model.arch" in values:
            return values["model.arch"]
    config = row.base if isinstance(row.base, dict) else base
    return config.get("model", {}).get("arch", "vit_tiny")


def tiny_variant(spec: SweepSpec, base: dict[str, Any]) -> SweepSpec:
    """The same rows (and groups, columns, paper numbers) on the digits with a small model, one epoch
    per stage, one CPU worker per trial; evaluation-only rows evaluate the tiny variant of their source."""
    rows = []
    for row in spec.rows:
        update: dict[str, Any] = {}
        if row.quoted is None and _row_arch(spec, base, row).startswith("xcit"):
            update["set"] = {**row.set, "model.patch_size": XCIT_TINY_PATCH}
        if row.evaluates is not None:
            update["evaluates"] = row.evaluates.model_copy(update={"name": row.evaluates.name + TINY_SUFFIX})
        rows.append(row.model_copy(update=update))
    title = (f"{spec.title or spec.name} — tiny variant (digits, small model, one epoch per stage: the paper's "
             "numbers are beside it for the layout, not for comparison)")
    surface = spec.surface.model_copy(update=TINY_SURFACE) if spec.surface is not None else None
    return spec.model_copy(update={"name": spec.name + TINY_SUFFIX, "title": title, "rows": rows,
                                   "overrides": {**spec.overrides, **TINY}, "resources": Resources(),
                                   "max_concurrent": 1, "surface": surface})


def paper_specs(tune_dir: Path = TUNE_DIR) -> dict[str, list[Path]]:
    """``{"table2": [tune/table2_cifar10.yaml], ...}``: the specs of the paper's tables and figures, in
    the paper's order (tables, then figures)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(tune_dir.glob("*.yaml")):
        key = path.stem.split("_")[0]
        if re.fullmatch(r"(table|figure)\d+", key):
            found.setdefault(key, []).append(path)
    order = lambda key: (key.startswith("figure"), int(re.sub(r"\D", "", key)))
    return {key: found[key] for key in sorted(found, key=order)}


def specs_for(name: str, tune_dir: Path = TUNE_DIR) -> list[Path]:
    """The specs of ``table2`` (a key), ``table2_cifar10`` (a spec's name) or a spec file."""
    if Path(name).is_file():
        return [Path(name)]
    specs = paper_specs(tune_dir)
    if name in specs:
        return specs[name]
    named = [p for paths in specs.values() for p in paths if p.stem == name]
    if not named:
        raise ConfigError(f"no spec for {name!r}; the paper's are: {', '.join(specs)} (mimir reproduce --list)")
    return named


def list_table(tune_dir: Path = TUNE_DIR) -> str:
    """Every table and figure with its spec, what it runs and its planned cost on the paper's hardware."""
    from mimir.plan import duration, plan_sweep

    lines = ["| result | spec | trials | pre-trainings | fine-tunings | evaluations | GPU-hours (A6000) | wall |",
             "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for key, paths in paper_specs(tune_dir).items():
        for path in paths:
            where = path.relative_to(tune_dir.parent) if path.is_relative_to(tune_dir.parent) else path
            try:
                plan = plan_sweep(path)
            except (ConfigError, ValueError) as err:
                lines.append(f"| {key} | `{where}` | cannot plan: {str(err).splitlines()[0]} | | | | | |")
                continue
            total += plan.device_hours
            lines.append(f"| {key} | `{where}` | {len(plan.trials) * plan.spec.seeds} | {plan.pretrainings} "
                         f"| {plan.finetunings} | {plan.evaluations} | {plan.device_hours:,.0f} "
                         f"| {duration(plan.wall_seconds)} |")
    lines += ["", f"total: {total:,.0f} GPU-hours on RTX A6000s (the paper's Table 10, extended as mimir/costs.py "
                  "says); wall = each spec's trials one after another (max_concurrent) on its resources"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``mimir reproduce`` handler: the list, or ``mimir sweep`` (or its plan) on each spec of a result."""
    from mimir.cli import run_sweep_command

    if args.list:
        print(list_table())
        return 0
    if args.name is None:
        raise ConfigError("name a table or figure (table2, figure4, ...) or pass --list")
    paths = specs_for(args.name)
    if args.out and len(paths) > 1:
        raise ConfigError(f"{args.name} has {len(paths)} specs; --out names one experiment folder")
    status = 0
    for path in paths:
        status = max(status, run_sweep_command(argparse.Namespace(**{**vars(args), "spec": str(path)})))
    return status
