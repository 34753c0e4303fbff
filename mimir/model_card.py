"""What leaves with an exported model: a model card (``README.md``) and, where the run measured
AutoAttack, a RobustBench-style model-info JSON.

The card states the architecture, the data, the training config, every evaluated attack with its
settings and accuracy, the number of test images, and the mimir version and commit that trained it;
its numbers are read from the run's ``results.json`` and nothing else.
"""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from mimir.version import __version__
from mimir.config import RunConfig

ROBUSTBENCH = "robustbench.json"


def budget(value: float) -> str:
    """``8/255`` for a budget that is a whole number of 255ths, else the number."""
    fraction = Fraction(value).limit_denominator(255)
    return f"{round(value * 255)}/255" if abs(value * 255 - round(value * 255)) < 1e-6 else f"{fraction}"


def attack_settings(name: str, cfg: RunConfig) -> str:
    """How an evaluation attack was run, in words (``evaluate.*`` of the run's config)."""
    ev = cfg.evaluate
    if name == "natural":
        return "clean test images"
    if name.startswith("pgd") and name[3:].isdigit():
        return f"PGD-{name[3:]} on the cross-entropy, L∞ ε = {budget(ev.eps)}, step {budget(ev.step_size)}"
    if name == "autoattack":
        return f"AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), L∞ ε = {budget(ev.eps)}"
    if name == "pgd_mi":
        return (f"adaptive PGD-MI, {ev.adaptive_steps} steps: cross-entropy + {ev.pgd_mi.weight:g} · "
                f"{ev.pgd_mi.estimator} MI, L∞ ε = {budget(ev.eps)}, step {budget(ev.step_size)}")
    if name == "pgd_feature":
        return (f"adaptive PGD on the encoder features (l2), {ev.adaptive_steps} steps, L∞ ε = {budget(ev.eps)}, "
                f"step {budget(ev.step_size)}")
    return name


def source_commit() -> str | None:
    """The git commit of the mimir checkout this runs from (None for an installed package)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def model_card(cfg: RunConfig, results: dict[str, Any] | None, architecture: str, num_classes: int) -> str:
    """The export folder's README.md."""
    m, p, f = cfg.model, cfg.pretrain, cfg.finetune
    pretraining = ("none (fine-tuned from random initialization)" if not p.enabled else
                   f"{p.epochs} epochs, mask ratio {p.mask_ratio}, {p.attack.steps}-step attack at ε = "
                   f"{budget(p.attack.eps)}, MI penalty {p.mi.estimator} at λ = {p.mi.weight:g}")
    lines = [f"# {cfg.name}: {architecture} trained with mimir", "",
             f"- architecture: `{architecture}` (timm), {m.patch_size}-pixel patches, {cfg.data.img_size}-pixel "
             f"images, {num_classes} classes; inputs normalized with mean {list(cfg.data.mean)}, std {list(cfg.data.std)}",
             f"- data: `{cfg.data.dataset}`" + (f" with generated data `{cfg.data.generated}`" if cfg.data.generated else "")
             + (f"; {f.validation.images} training images held out for validation" if f.validation.images else ""),
             f"- pre-training (MIMIR): {pretraining}",
             f"- fine-tuning: {f.method}, {f.epochs} epochs, {f.attack.steps}-step attack at ε = {budget(f.attack.eps)}",
             f"- trained with mimir {__version__}, commit {source_commit() or 'unknown'}", ""]
    if results and results.get("accuracy"):
        lines += ["## Robustness", "",
                  f"On {results['num_images']} test images, checkpoint `{results.get('evaluated_checkpoint', '?')}`:", "",
                  "| attack | settings | accuracy (%) |", "|---|---|---|"]
        lines += [f"| {name} | {attack_settings(name, cfg)} | {acc:.2f} |" for name, acc in results["accuracy"].items()]
    else:
        lines += ["## Robustness", "", "Not evaluated: the run has no results.json for this checkpoint."]
    lines += ["", "## Training config", "", "```yaml",
              yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(lines)


def robustbench_info(cfg: RunConfig, results: dict[str, Any], architecture: str) -> dict[str, Any] | None:
    """RobustBench's model-info fields, where the run measured clean and AutoAttack accuracy."""
    accuracy = results.get("accuracy", {})
    if "natural" not in accuracy or "autoattack" not in accuracy:
        return None
    return {"name": cfg.name, "dataset": cfg.data.dataset, "threat_model": "Linf", "eps": budget(cfg.evaluate.eps),
            "architecture": architecture, "clean_acc": f"{accuracy['natural']:.2f}",
            "autoattack_acc": f"{accuracy['autoattack']:.2f}", "reported": f"{accuracy['autoattack']:.2f}",
            "additional_data": bool(cfg.data.generated), "number_forward_passes": 1,
            "num_evaluated_points": results["num_images"], "mimir_version": __version__, "commit": source_commit()}


def write(out: Path, cfg: RunConfig, results: dict[str, Any] | None, architecture: str, num_classes: int) -> None:
    """README.md (always) and robustbench.json (where the accuracies it needs were measured) in ``out``."""
    (out / "README.md").write_text(model_card(cfg, results, architecture, num_classes))
    info = robustbench_info(cfg, results or {}, architecture)
    (out / ROBUSTBENCH).unlink(missing_ok=True)
    if info is not None:
        (out / ROBUSTBENCH).write_text(json.dumps(info, indent=2))
