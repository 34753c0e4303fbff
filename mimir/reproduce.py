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

from mimir.config import BUNDLED
from mimir.errors import ConfigError

TUNE_DIR = BUNDLED / "tune"


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

    if not paper_specs(tune_dir):
        raise ConfigError(f"no sweep specs of the paper's tables in {tune_dir}: mimir was installed without its "
                          "bundled specs")
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
    from mimir.plan import show_plan

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
        if args.plan:
            status = max(status, show_plan(path, args.overrides, out=args.out, tiny=args.tiny, costs=args.costs,
                                           cluster=args.cluster, max_concurrent=args.max_concurrent))
            continue
        from mimir import api  # torch and Ray: only when a sweep runs

        result = api.sweep(path, *args.overrides, out=args.out, storage=args.storage, resume=args.resume,
                           tiny=args.tiny, max_concurrent=args.max_concurrent)
        print(result["table"])
        print(f"experiment: {result['experiment']}")
    return status
