"""Tables shaped like the paper's (Markdown, CSV, LaTeX) and plots, from a sweep's trial results.

Works on a partly finished sweep: a cell whose trial has not finished shows ``—``, one whose trial
failed shows ``failed`` and the reason is listed under the table.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from mimir.sweeps import FAILED, TRIALS, SweepSpec

TITLES = {"natural": "Natural", "pgd10": "PGD-10", "pgd20": "PGD-20", "pgd100": "PGD-100", "autoattack": "AA",
          "pgd_mi": "PGD-MI", "pgd_feature": "PGD-feature"}
MISSING = "—"
FAILED_CELL = "failed"


def config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def collect_trials(experiment: Path) -> list[dict[str, Any]]:
    """Every finished trial's results.json in the experiment folder."""
    return [json.loads(p.read_text()) for p in sorted((experiment / TRIALS).glob("*/results.json"))]


def collect_failures(experiment: Path) -> list[dict[str, Any]]:
    """Every failed trial's record (config and reason) in the experiment folder."""
    return [json.loads(p.read_text()) for p in sorted((experiment / TRIALS).glob(f"*/{FAILED}"))]


def _label(config: dict[str, Any], keys: list[str]) -> str:
    values = {k: config_value(config, k) for k in keys}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _matches(config: dict[str, Any], values: dict[str, Any]) -> bool:
    return all(_same(config_value(config, k), v) for k, v in values.items())


def table_rows(spec: SweepSpec, trials: list[dict[str, Any]],
               failures: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One entry per table row: label, our values, the paper's values (empty where missing), whether
    it was retried at lr / 10, and why it failed (None unless it did)."""
    if spec.sampler == "tpe":
        ranked = sorted(trials, key=lambda t: t["accuracy"][spec.objective.metric],
                        reverse=spec.objective.mode == "max")
        keys = list(spec.space)
        return ([{"label": _label(t["config"], keys), **_ours(t), "paper": {}, "failed": None} for t in ranked]
                + [{"label": _label(f["config"], keys), **_ours(None), "paper": {}, "failed": f["reason"]}
                   for f in failures])
    rows = [(r.label, r.set, r.paper) for r in spec.rows]
    rows += [(", ".join(f"{k}={v}" for k, v in point.items()), point, {})
             for point in spec.grid_points()[len(spec.rows):]]
    out = []
    for label, values, paper in rows:
        match = next((t for t in trials if _matches(t["config"], values)), None)
        failure = None if match else next((f for f in failures if _matches(f["config"], values)), None)
        out.append({"label": label, **_ours(match), "paper": paper, "set": values,
                    "failed": failure["reason"] if failure else None})
    return out


def _ours(trial: dict[str, Any] | None) -> dict[str, Any]:
    """A trial's values for its table row: accuracies (the mean over seeds), their standard
    deviations and seed count, and whether a run was retried at lr / 10."""
    if trial is None:
        return {"ours": {}, "std": {}, "n": 0, "retried": False}
    return {"ours": trial["accuracy"], "std": trial.get("accuracy_std", {}), "n": trial.get("num_seeds", 1),
            "retried": bool(trial.get("retried"))}


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _cells(row: dict[str, Any], columns: list[str], seeds: int, split_std: bool = False) -> list[str]:
    """Per column: ours (mean ± std over seeds; std in a cell of its own for CSV), the paper's
    value and the difference of the mean; then the seed count when the spec runs several."""
    cells = []
    for c in columns:
        ours, paper, std = row["ours"].get(c), row["paper"].get(c), row["std"].get(c)
        diff = f"{ours - paper:+.2f}" if ours is not None and paper is not None else MISSING
        shown = FAILED_CELL if row["failed"] else _fmt(ours)
        if seeds > 1 and split_std:
            cells += [shown, _fmt(std)]
        else:
            cells.append(f"{shown} ± {std:.2f}" if seeds > 1 and ours is not None and std is not None else shown)
        cells += [_fmt(paper), diff]
    return cells + ([str(row["n"])] if seeds > 1 else [])


def _header(columns: list[str], seeds: int, split_std: bool = False) -> list[str]:
    header = []
    for c in columns:
        title = TITLES.get(c, c)
        header += [f"{title} ours", f"{title} std"] if seeds > 1 and split_std else [f"{title} ours"]
        header += [f"{title} paper", "Δ"]
    return header + (["seeds"] if seeds > 1 else [])


def markdown_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    header = ["Row", *_header(spec.columns, spec.seeds)]
    lines = [f"**{spec.title or spec.name}**", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for row in rows:
        label = row["label"] + (" (lr / 10 after NaN)" if row["retried"] else "")
        lines.append("| " + " | ".join([label, *_cells(row, spec.columns, spec.seeds)]) + " |")
    done = sum(1 for r in rows if r["ours"])
    failed = [r for r in rows if r["failed"]]
    summary = f"{done} of {len(rows)} rows finished" + (f", {len(failed)} failed" if failed else "")
    spread = (f" ours = mean ± sample standard deviation over {spec.seeds} seeds, Δ = mean - paper."
              if spec.seeds > 1 else " Δ = ours - paper.")
    lines += ["", f"{summary}; accuracy in %;{spread}"]
    lines += [f"- {r['label']} failed: {r['failed'].splitlines()[0]}" for r in failed]
    return "\n".join(lines)


def latex_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    header = ["Row", *_header(spec.columns, spec.seeds)]
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("λ", r"$\lambda$").replace("Δ", r"$\Delta$")
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join([esc(r["label"]), *_cells(r, spec.columns, spec.seeds)]).replace(MISSING, "--")
              .replace("±", r"$\pm$") + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def plot(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Ours (solid) and the paper's (dashed) values of each column against ``spec.plot``."""
    if spec.plot is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spec.columns), figsize=(4 * len(spec.columns), 3.2), squeeze=False)
    points = sorted((r["set"].get(spec.plot), r) for r in rows if r["set"].get(spec.plot) is not None)
    for ax, column in zip(axes[0], spec.columns):
        for source, style in (("ours", "o-"), ("paper", "s--")):
            xy = [(x, r[source][column]) for x, r in points if r[source].get(column) is not None]
            if xy:
                ax.plot(*zip(*xy), style, label=source)
        ax.set_xlabel(spec.plot)
        ax.set_ylabel(f"{TITLES.get(column, column)} accuracy (%)")
        ax.legend()
    fig.suptitle(spec.title or spec.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(spec: SweepSpec, experiment: Path) -> str:
    """Write table.md / table.csv / table.tex (and figure.png) into the experiment; return the Markdown."""
    rows = table_rows(spec, collect_trials(experiment), collect_failures(experiment))
    markdown = markdown_table(spec, rows)
    (experiment / "table.md").write_text(markdown + "\n")
    (experiment / "table.tex").write_text(latex_table(spec, rows) + "\n")
    with open(experiment / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *_header(spec.columns, spec.seeds, split_std=True)])
        writer.writerows([r["label"], *_cells(r, spec.columns, spec.seeds, split_std=True)] for r in rows)
    plot(spec, rows, experiment / "figure.png")
    return markdown
