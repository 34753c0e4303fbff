"""``mimir plot``: the training curves of a run, or of every trial of a sweep, as one PNG.

Two panels, in the manner of the paper's Figures 3 and 6: pre-training (reconstruction loss, and
the MI term λ·I where there is one) and fine-tuning (adversarial training accuracy, and the
validation's natural and PGD accuracy where it ran), one line per run over epochs. The curves
come from each stage's ``metrics.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimir.metrics import HISTORY, read_history


def find_histories(root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{run label: {stage: epochs}}`` for every stage folder under ``root`` with metrics. The
    label is the run folder relative to ``root`` (a sweep's trial), or the stage folder itself where
    it is not named after its stage (a sweep's cached pre-trainings, named by config hash)."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(root.rglob(HISTORY)):
        folder = path.parent
        records = read_history(str(folder))
        if not records:
            continue
        stage = "pretrain" if "mse" in records[-1] else "finetune"
        run = folder.parent if folder.name == stage else folder
        label = root.resolve().name if run.resolve() == root.resolve() else str(run.relative_to(root))
        runs.setdefault(label, {})[stage] = records
    return runs


def plot_curves(root: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves under ``root`` (a run or experiment folder) into ``out`` (default
    ``root/curves.png``); raises FileNotFoundError when there are none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such run or experiment folder: {root}")
    runs = find_histories(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no {HISTORY} below it (a run or sweep writes one per stage)")
    fig, (pre, fine) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mi_axis = None  # λ·I is orders of magnitude below the MSE: its own scale, on the right
    for i, (label, stages) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        if "pretrain" in stages:
            epochs = [r["epoch"] + 1 for r in stages["pretrain"]]
            pre.plot(epochs, [r["mse"] for r in stages["pretrain"]], color=color, label=f"{label} MSE")
            if any(r.get("mi_term") for r in stages["pretrain"]):
                mi_axis = mi_axis or pre.twinx()
                mi_axis.plot(epochs, [r.get("mi_term", 0.0) for r in stages["pretrain"]], color=color, linestyle=":",
                             label=f"{label} λ·I")
        if "finetune" in stages:
            records = stages["finetune"]
            fine.plot([r["epoch"] + 1 for r in records], [100 * r["acc"] for r in records], color=color,
                      linestyle=":", label=f"{label} train (adversarial)")
            validated = [r for r in records if "val_pgd" in r]
            for key, style, name in (("val_natural", "--", "val natural"), ("val_pgd", "-", "val PGD")):
                if validated:
                    fine.plot([r["epoch"] + 1 for r in validated], [r[key] for r in validated], color=color,
                              linestyle=style, marker=".", label=f"{label} {name}")
    pre.set(title="pre-training", xlabel="epoch", ylabel="reconstruction loss (MSE)")
    if mi_axis is not None:
        mi_axis.set_ylabel("λ·I (dotted)")
        mi_axis.legend(fontsize="small", loc="center right")
    fine.set(title="fine-tuning", xlabel="epoch", ylabel="accuracy (%)")
    for axes in (pre, fine):
        if axes.lines:
            axes.legend(fontsize="small", loc="upper right" if axes is pre else "lower right")
        axes.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else root / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(args: Any) -> int:
    """``mimir plot`` handler."""
    print(f"curves: {plot_curves(args.path, args.out)}")
    return 0
