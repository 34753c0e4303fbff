"""Tables shaped like the paper's (Markdown, CSV, LaTeX) and plots, from a sweep's trial results.

Works on a partly finished sweep: a cell whose trial has not finished shows ``—``, one whose trial
failed shows ``failed`` and the reason is listed under the table.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from mimir.config import FAILED, TRIALS
from mimir.spec import LABEL_SEPARATOR, ROW, SweepSpec

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


def _find(records: list[dict[str, Any]], identity: dict[str, Any], values: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a table cell's trial: by the row and group it names, or (records written before
    trials named them) by its config."""
    for record in records:
        if "row" in record:
            if record["row"] == identity.get("row") and record.get("group") == identity.get("group"):
                return record
        elif identity.get("group") is None and _matches(record["config"], values):
            return record
    return None


def table_columns(spec: SweepSpec) -> list[tuple[str, str]]:
    """(key, title) of each metric column: the spec's columns, per column group when it has groups."""
    if not spec.groups:
        return [(c, TITLES.get(c, c)) for c in spec.columns]
    return [(f"{g.label}/{c}", f"{g.label} {TITLES.get(c, c)}") for g in spec.groups for c in spec.columns]


def table_rows(spec: SweepSpec, trials: list[dict[str, Any]],
               failures: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One entry per table row: label, our values, the paper's values (empty where missing), whether
    it was retried at lr / 10, why it failed (None unless it did), and the paper it is quoted from
    (None for a row that runs). With column groups, values are keyed ``<group>/<metric>``."""
    if spec.sampler == "tpe":
        ranked = sorted(trials, key=lambda t: t["accuracy"][spec.objective.metric],
                        reverse=spec.objective.mode == "max")
        keys = list(spec.space)
        return ([{"label": _label(t["config"], keys), **_ours(t), "paper": {}, "failed": None, "quoted": None,
                  "trials": 1, "done": 1, "details": detail_values(t, spec.details)} for t in ranked]
                + [{"label": _label(f["config"], keys), **_ours(None), "paper": {}, "failed": f["reason"],
                    "quoted": None, "trials": 1, "done": 0} for f in failures])
    out = []
    for row in spec.rows:
        entry = {"label": row.label, **_ours(None), "paper": {}, "set": dict(row.set), "failed": None,
                 "quoted": row.quoted, "trials": 0, "done": 0}
        for group in spec.groups or [None]:
            prefix = "" if group is None else f"{group.label}/"
            paper = row.paper if group is None else row.paper.get(group.label, {})
            entry["paper"].update({prefix + m: v for m, v in paper.items()})
            if row.quoted is not None:
                continue
            identity = {"row": row.label, "group": None if group is None else group.label}
            values = {**(group.set if group else {}), **row.set}
            match = _find(trials, identity, values)
            failure = None if match else _find(list(failures), identity, values)
            ours = _ours(match)
            entry["details"] = entry.get("details") or detail_values(match, spec.details)
            for field in ("ours", "std", "per_seed"):
                entry[field].update({prefix + m: v for m, v in ours[field].items()})
            entry["n"] = max(entry["n"], ours["n"])
            entry["retried"] = entry["retried"] or ours["retried"]
            entry["trials"] += 1
            entry["done"] += match is not None
            if failure and entry["failed"] is None:
                entry["failed"] = failure["reason"] if group is None else f"{group.label}: {failure['reason']}"
        out.append(entry)
    for point in spec.grid_points():
        if ROW in point:
            continue
        match = next((t for t in trials if _matches(t["config"], point)), None)
        failure = None if match else next((f for f in failures if _matches(f["config"], point)), None)
        out.append({"label": ", ".join(f"{k}={v}" for k, v in point.items()), **_ours(match), "paper": {},
                    "details": detail_values(match, spec.details),
                    "set": point, "failed": failure["reason"] if failure else None, "quoted": None, "trials": 1,
                    "done": int(match is not None)})
    add_paired_differences(spec, out)
    return out


def _ours(trial: dict[str, Any] | None) -> dict[str, Any]:
    """A trial's values for its table row: accuracies (the mean over seeds), their standard
    deviations, each seed's own values and the seed count, and whether a run was retried at lr / 10."""
    if trial is None:
        return {"ours": {}, "std": {}, "per_seed": {}, "n": 0, "retried": False}
    runs = trial.get("runs", [])
    per_seed = {m: {r["config"]["seed"]: r["accuracy"][m] for r in runs if m in r["accuracy"]}
                for m in trial["accuracy"]}
    return {"ours": dict(trial["accuracy"]), "std": dict(trial.get("accuracy_std", {})), "per_seed": per_seed,
            "n": trial.get("num_seeds", 1), "retried": bool(trial.get("retried"))}


def detail_values(trial: dict[str, Any] | None, paths: list[str]) -> dict[str, float]:
    """The mean over a trial's seeds (or its one run) of each dotted ``paths`` value in its results."""
    if trial is None:
        return {}
    runs = trial.get("runs") or [trial]
    out = {}
    for path in paths:
        values = [v for v in (config_value(run, path) for run in runs) if isinstance(v, (int, float))]
        if values:
            out[path] = statistics.mean(values)
    return out


def t_quantile(probability: float, dof: int) -> float:
    """Student's t quantile (scipy, imported only when a table has a reference row)."""
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def paired_difference(values: dict[int, float], reference: dict[int, float],
                      confidence: float = 0.95) -> dict[str, Any] | None:
    """The mean of the per-seed differences ``values[s] - reference[s]`` over the seeds both have,
    with its two-sided confidence interval from Student's t over the pairs; None for fewer than two
    pairs. ``resolved``: the interval excludes 0."""
    seeds = sorted(set(values) & set(reference))
    if len(seeds) < 2:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    mean = statistics.mean(diffs)
    half = t_quantile(0.5 + confidence / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "pairs": len(seeds), "resolved": low > 0 or high < 0}


def add_paired_differences(spec: SweepSpec, rows: list[dict[str, Any]]) -> None:
    """Each row's ``paired``: per column, its :func:`paired_difference` to the spec's reference row."""
    if spec.reference is None:
        return
    reference = next(r for r in rows if r["label"] == spec.reference)
    for row in rows:
        row["paired"] = {} if row is reference or row["quoted"] else {
            c: paired_difference(row["per_seed"].get(c, {}), reference["per_seed"].get(c, {}))
            for c, _ in table_columns(spec)}


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _paired_cells(row: dict[str, Any], column: str, split: bool) -> list[str]:
    """The paired difference to the reference row: one cell ``+2.00 [+0.48, +3.52] *`` (``*``: the
    interval excludes 0), or for CSV four (difference, low, high, resolved)."""
    if "paired" not in row:
        return []
    if row["quoted"]:
        return [""] * (4 if split else 1)
    if not row["paired"]:
        return ["reference", "", "", ""] if split else ["reference"]
    d = row["paired"].get(column)
    if d is None:
        return [MISSING, "", "", ""] if split else [MISSING]
    if split:
        return [f"{d['mean']:+.2f}", f"{d['low']:+.2f}", f"{d['high']:+.2f}", "yes" if d["resolved"] else "no"]
    return [f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" + (" *" if d["resolved"] else "")]


def _cells(row: dict[str, Any], columns: list[tuple[str, str]], seeds: int, split_std: bool = False,
           details: list[str] = ()) -> list[str]:
    """Per column: ours (mean ± std over seeds; std in a cell of its own for CSV), the paper's
    value and the difference of the mean, and with a reference row the paired difference to it;
    then the spec's details and the seed count when the spec runs several. A row quoted from
    another paper has no ours and no difference."""
    cells = []
    for c, _ in columns:
        ours, paper, std = row["ours"].get(c), row["paper"].get(c), row["std"].get(c)
        diff = f"{ours - paper:+.2f}" if ours is not None and paper is not None else MISSING
        shown = FAILED_CELL if row["failed"] else _fmt(ours)
        if row["quoted"]:
            shown = diff = ""
        if seeds > 1 and split_std:
            cells += [shown, "" if row["quoted"] else _fmt(std)]
        else:
            cells.append(f"{shown} ± {std:.2f}" if seeds > 1 and ours is not None and std is not None else shown)
        cells += [_fmt(paper), diff, *_paired_cells(row, c, split_std)]
    cells += [f"{row['details'][d]:.2g}" if d in row.get("details", {}) else ("" if row["quoted"] else MISSING)
              for d in details]
    return cells + ([str(row["n"]) if not row["quoted"] else ""] if seeds > 1 else [])


def _header(columns: list[tuple[str, str]], seeds: int, split_std: bool = False, paired: bool = False,
            details: list[str] = ()) -> list[str]:
    header = []
    for _, title in columns:
        header += [f"{title} ours", f"{title} std"] if seeds > 1 and split_std else [f"{title} ours"]
        header += [f"{title} paper", "Δ"]
        if paired:
            header += ([f"{title} Δ ref", f"{title} Δ ref low", f"{title} Δ ref high", f"{title} resolved"]
                       if split_std else [f"{title} Δ ref (95 % CI)"])
    return header + list(details) + (["seeds"] if seeds > 1 else [])


def _label_cells(spec: SweepSpec, row: dict[str, Any]) -> list[str]:
    """The row's label, split into the spec's label columns, marked when retried at lr / 10."""
    parts = row["label"].split(LABEL_SEPARATOR) if spec.label_columns else [row["label"]]
    if row["retried"]:
        parts[-1] += " (lr / 10 after NaN)"
    return parts


def markdown_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    columns = table_columns(spec)
    header = [*(spec.label_columns or ["Row"]), *_header(columns, spec.seeds, paired=spec.reference is not None,
                                                                details=spec.details)]
    lines = [f"**{spec.title or spec.name}**", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([*_label_cells(spec, row), *_cells(row, columns, spec.seeds, details=spec.details)]) + " |")
    runs = [r for r in rows if not r["quoted"]]
    done, total = sum(r["done"] for r in runs), sum(r["trials"] for r in runs)
    failed = [r for r in runs if r["failed"]]
    what = "trials" if spec.groups else "rows"
    summary = f"{done} of {total} {what} finished" + (f", {len(failed)} failed" if failed else "")
    spread = (f" ours = mean ± sample standard deviation over {spec.seeds} seeds, Δ = mean - paper."
              if spec.seeds > 1 else " Δ = ours - paper.")
    lines += ["", f"{summary}; accuracy in %;{spread}"]
    if spec.reference is not None:
        lines.append(f"Δ ref = the mean of the per-seed differences to the row {spec.reference!r}, with its 95 % "
                     "confidence interval (Student's t over the seed pairs); * marks a difference whose interval "
                     "excludes 0, i.e. larger than the seed spread.")
    quoted = list(dict.fromkeys(r["quoted"] for r in rows if r["quoted"]))
    if quoted:
        lines.append(f"Rows without ours are the paper's quotes of other work, not run here: {'; '.join(quoted)}.")
    lines += [f"- {r['label']} failed: {r['failed'].splitlines()[0]}" for r in failed]
    return "\n".join(lines)


def latex_table(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    columns = table_columns(spec)
    labels = spec.label_columns or ["Row"]
    header = [*labels, *_header(columns, spec.seeds, paired=spec.reference is not None,
                                                                details=spec.details)]
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("λ", r"$\lambda$").replace("Δ", r"$\Delta$")
    lines = [r"\begin{tabular}{" + "l" * len(labels) + "r" * (len(header) - len(labels)) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join([*(esc(c) for c in _label_cells(spec, r)), *_cells(r, columns, spec.seeds, details=spec.details)])
              .replace(MISSING, "--").replace("±", r"$\pm$").replace(" *", r"$^\ast$") + r" \\" for r in rows]
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
    columns = table_columns(spec)
    with open(experiment / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(spec.label_columns or ["row"]),
                         *_header(columns, spec.seeds, split_std=True, paired=spec.reference is not None,
                                  details=spec.details)])
        writer.writerows([*_label_cells(spec, r), *_cells(r, columns, spec.seeds, split_std=True, details=spec.details)] for r in rows)
    plot(spec, rows, experiment / "figure.png")
    return markdown
