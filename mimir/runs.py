"""Runs as first-class objects: ``mimir runs DIR`` lists the runs under a folder (``--fixed-costs``:
where each stage's wall time went besides its computation), ``mimir compare RUN RUN ...`` shows the
config fields in which runs differ and their results side by side.

A run is a folder with the ``config.json`` that ``mimir run`` (or a stage command) writes first, or
a sweep trial's folder (one seed's run of it), whose ``results.json`` holds its config; ``results.json``
appears when a run finished, ``failed.json`` when it diverged. Reads those files only: no Ray, no torch.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mimir.config import FAILED, PRETRAIN_CACHE, STAGE_RECORD, STAGES, TRIALS, flatten


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_config(folder: Path) -> dict[str, Any] | None:
    """A run folder's config: its ``config.json``, else (a sweep trial's run) the one its
    ``results.json`` records; None for any other folder, a multi-seed trial's summary included (its
    seeds' runs are the runs)."""
    config = _read(folder / "config.json")
    if config is not None:
        return config
    results = _read(folder / "results.json")
    return results["config"] if results and "config" in results and "runs" not in results else None


def find_runs(root: str | Path) -> list[Path]:
    """Every run folder under ``root`` (``root`` itself included), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    folders = {p.parent for name in ("config.json", "results.json") for p in root.rglob(name)}
    return sorted(f for f in folders if not f.name.startswith(".") and run_config(f) is not None)


def validation_moved(history: list[dict[str, Any]], epochs: int) -> float | None:
    """How far validation PGD accuracy moved (its max less its min, in points) over the last quarter
    of fine-tuning: from the model at the quarter's start (the last validation after at most 3/4 of
    ``epochs``) to the end. None without two such validations. Less than a couple of points (a few
    images of the validation split) says the fine-tuning converged."""
    scores = {row["epoch"] + 1: row["val_pgd"] for row in history if "val_pgd" in row}  # a resumed epoch's last
    start = max((done for done in scores if done <= 0.75 * epochs), default=None)
    quarter = [score for done, score in scores.items() if start is not None and done >= start]
    return max(quarter) - min(quarter) if len(quarter) > 1 else None


def run_summary(folder: Path, root: Path | None = None) -> dict[str, Any]:
    """Name, status (finished, failed, unfinished), stages done, natural and robust accuracy (the
    first attack after natural), the number of test images, how far validation PGD accuracy moved
    over the last quarter of fine-tuning (:func:`validation_moved`) and wall time of one run folder."""
    results, failed = _read(folder / "results.json"), _read(folder / FAILED)
    config = run_config(folder) or {}
    finetune = stage_folder(folder, config, results or {}, "finetune")
    epochs = (config.get("finetune") or {}).get("epochs")
    done = [s for s in STAGES if (folder / s / STAGE_RECORD).is_file()]
    if results is not None:
        done = [s for s in STAGES if results.get(s) is not None or (s == "evaluate" and "accuracy" in results)]
    accuracy = (results or {}).get("accuracy", {})
    robust = next((name for name in accuracy if name != "natural"), None)
    return {"run": str(folder.relative_to(root)) if root and folder != root else str(folder),
            "status": "finished" if results else "failed" if failed else "unfinished",
            "stages": done, "natural": accuracy.get("natural"), "robust": robust and accuracy[robust],
            "attack": robust, "images": (results or {}).get("num_images"),
            "val_moved": validation_moved(_history(finetune), epochs) if finetune and epochs else None,
            "seconds": sum((results or {}).get("seconds", {}).values()) or None,
            "reason": (failed or {}).get("reason")}


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "—"
    return str(value)


def _render(header: list[str], rows: list[list[Any]], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return out.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(root: str | Path, fmt: str = "markdown") -> str:
    """``mimir runs DIR``: one row per run under the folder."""
    root = Path(root)
    summaries = [run_summary(folder, root) for folder in find_runs(root)]
    if not summaries:
        raise FileNotFoundError(f"no runs under {root} (a run folder holds the config.json or results.json mimir "
                                "writes)")
    header = ["run", "status", "stages", "natural", "robust", "attack", "images", "val_moved", "seconds"]
    return _render(header, [[s[k] for k in header] for s in summaries], fmt)


def compare_table(folders: list[str | Path], fmt: str = "markdown") -> str:
    """``mimir compare RUN RUN ...``: the config fields that differ between the runs, then their
    results (every evaluated attack, the wall time), one column per run."""
    paths = [Path(f) for f in folders]
    configs = []
    for path in paths:
        config = run_config(path)
        if config is None:
            raise FileNotFoundError(f"{path} is not a run folder (no config.json, nor a results.json with a "
                                    "config)")
        configs.append(flatten(config))
    keys = sorted(set().union(*configs))
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    summaries = [run_summary(p) for p in paths]
    results = [_read(p / "results.json") or {} for p in paths]
    attacks = list(dict.fromkeys(a for r in results for a in r.get("accuracy", {})))
    rows = [[k, *(json.dumps(c[k]) if k in c else "(unset)" for c in configs)] for k in differ]
    rows += [[f"accuracy.{a}", *(r.get("accuracy", {}).get(a) for r in results)] for a in attacks]
    rows += [["status", *(s["status"] for s in summaries)], ["seconds", *(s["seconds"] for s in summaries)]]
    return _render(["field", *(str(p) for p in paths)], rows, fmt)


# -- fixed costs ---------------------------------------------------------------------------------
def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def stage_fixed_costs(results: dict[str, Any], stage_folder: Path | None, stage: str) -> dict[str, float] | None:
    """Where one stage's wall time went besides its computation, from its window in results.json and
    the wall-clock start of each epoch (``started_at``) in its metrics.jsonl: ``start`` (the stage's
    start to its first epoch: worker processes, process group, datasets), ``first_batch`` (the first
    epoch's wait for data: Ray Data's first execution), ``data_waits`` (every later epoch's),
    ``between_epochs`` (checkpoints and reports), ``teardown`` (the last epoch's end to the stage's);
    ``computation`` is the rest (steps, probes, validations). The evaluation: ``start`` is what its
    attacks did not take. None where the files do not say."""
    window = results.get("stage_times", {}).get(stage)
    if window is None:
        return None
    started, ended = window
    wall = ended - started
    if stage == "evaluate":
        attacks = sum(results.get("attack_seconds", {}).values())
        return {"wall": wall, "computation": attacks, "start": wall - attacks, "fixed": wall - attacks}
    rows = _history(stage_folder) if stage_folder is not None else []
    if not rows or "started_at" not in rows[0]:
        return None

    def end(row: dict[str, Any]) -> float:
        return row["started_at"] + row["seconds"] + row.get("validation_seconds", 0.0)

    waits = [row.get("data_seconds", 0.0) for row in rows]
    parts = {"start": rows[0]["started_at"] - started, "first_batch": waits[0], "data_waits": sum(waits[1:]),
             "between_epochs": sum(b["started_at"] - end(a) for a, b in zip(rows, rows[1:])),
             "teardown": ended - end(rows[-1])}
    computation = sum(r["seconds"] - w + r.get("validation_seconds", 0.0) for r, w in zip(rows, waits))
    return {"wall": wall, "computation": computation, **parts, "fixed": sum(parts.values())}


def stage_folder(run: Path, config: dict[str, Any], results: dict[str, Any], stage: str) -> Path | None:
    """Where a run's stage wrote its metrics: the run folder (a ``mimir run``, a sweep trial), else
    its local ``scaling.storage_path`` (a sweep trial's: the sweep's storage, with the trial's folder
    under it and the pre-training it filled in the shared cache); None for a pre-training the trial
    found cached (no work of its own) or storage behind a URI."""
    if results.get("pretrain_cache_hit") and stage == "pretrain":
        return None
    root = (config.get("scaling") or {}).get("storage_path")
    root = root and root.removeprefix("file://")
    candidates = [run / stage]
    if root and "://" not in root:
        if "pretrain_cache_hit" in results and stage == "pretrain":
            candidates.append(Path(root, PRETRAIN_CACHE, results.get("pretrain_hash", "")))
        elif TRIALS in run.parts:  # <experiment>/trials/<trial>[/seed-N] mirrored under the sweep's storage
            last = len(run.parts) - 1 - run.parts[::-1].index(TRIALS)
            candidates.append(Path(root, *run.parts[last:], stage))
        candidates.append(Path(root, stage))
    return next((c for c in candidates if (c / "metrics.jsonl").is_file()), None)


def run_fixed_costs(results: dict[str, Any], stage_costs: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """The whole run's (or sweep trial's) wall time from ``run_window`` in results.json, less the
    computation of its stages: ``start`` (the run's start to its first stage's: the checks, Ray's
    start), ``teardown`` (its last stage's end to its own: writing the results) and what lies between
    (each stage's own fixed costs, a wait for a cached pre-training). None where it is not recorded."""
    window = results.get("run_window")
    if window is None:
        return None
    stage_windows = list(results.get("stage_times", {}).values())
    first = min((w[0] for w in stage_windows), default=window[1])
    last = max((w[1] for w in stage_windows), default=window[0])
    computation = sum(costs["computation"] for costs in stage_costs.values())
    wall = window[1] - window[0]
    return {"wall": wall, "computation": computation, "fixed": wall - computation, "start": first - window[0],
            "teardown": window[1] - last}


COST_COLUMNS = ("wall", "computation", "fixed", "start", "first_batch", "data_waits", "between_epochs", "teardown")


def fixed_costs_rows(root: str | Path) -> list[list[Any]]:
    """A row per finished stage of every run under the folder, and one per whole run (stage ``run``):
    the runs whose ``results.json`` records stage times."""
    root, rows = Path(root), []
    for run in find_runs(root):
        results = _read(run / "results.json")
        if results is None or "stage_times" not in results:
            continue
        config = run_config(run) or {}
        name = str(run.relative_to(root)) if run != root else str(run)
        stage_costs = {stage: costs for stage in STAGES
                       if (costs := stage_fixed_costs(results, stage_folder(run, config, results, stage), stage))}
        # the whole run where every stage it ran says what it computed (a cached pre-training: nothing)
        known = all(stage in stage_costs or (stage == "pretrain" and results.get("pretrain_cache_hit"))
                    for stage in results.get("stage_times", {}))
        whole = run_fixed_costs(results, stage_costs) if known else None
        for stage, costs in [*stage_costs.items(), *([("run", whole)] if whole else [])]:
            rows.append([name, stage, *(costs.get(k) for k in COST_COLUMNS)])
    return rows


def fixed_costs_table(root: str | Path, fmt: str = "markdown", whole_runs: bool = False) -> str:
    """``mimir runs DIR --fixed-costs``: a row per finished stage of every run under the folder and
    one per run; ``whole_runs``: the runs' rows only (what ``mimir sweep`` prints at its end)."""
    rows = [row for row in fixed_costs_rows(root) if not whole_runs or row[1] == "run"]
    if not rows:
        raise FileNotFoundError(f"no finished run under {root} records its stages' times (runs of this version do)")
    header = ["run", "stage", "wall", "computation", "fixed", "start", "first batch", "data waits",
              "between epochs", "teardown"]
    if whole_runs:
        header, rows = header[:6] + header[-1:], [row[:6] + row[-1:] for row in rows]
    return _render(header, rows, fmt) + ("" if fmt == "csv" else "\n(seconds)")


def main(args: Any) -> int:
    """The ``runs`` and ``compare`` commands."""
    fmt = "csv" if args.csv else "markdown"
    if args.command == "compare":
        print(compare_table(args.runs, fmt))
    else:
        print(fixed_costs_table(args.folder, fmt) if args.fixed_costs else runs_table(args.folder, fmt))
    return 0
