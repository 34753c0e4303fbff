"""Sweeps: a ``tune/*.yaml`` spec -> a Ray Tune ``Tuner`` with ``OptunaSearch`` whose trials run the
same pre-train -> fine-tune -> evaluate pipeline as ``mimir run``.

A spec either lists ``rows`` (the cells of a paper table; each row is one trial, searched as a grid)
or gives a ``space`` of distributions for Optuna's TPE. Every trial's record is its
``results.json`` under ``<experiment>/trials/<trial id>/``; pre-training is cached under
``<storage>/pretrain_cache/<pretrain hash>/`` so trials that differ only in fine-tuning share one,
one trial filling it while the others wait (a lease held through a Ray actor, so trials on any node
of a cluster agree). ``<storage>`` is the experiment folder, or ``<scaling.storage_path>/<experiment
name>`` when the config sets one (a URI works): the trials' training runs, the cache and Tune's state
live there, and the driver keeps each trial's record in the experiment folder from what the trial
reported to Tune, so trials on other nodes need no shared disk.
With ``seeds: N`` a trial runs its point N times (seeds ``seed`` .. ``seed + N - 1``, one after
another, each in ``<trial>/seed-<s>/``, pre-training cached per seed) and reports the mean.

Tune sees one metric, ``objective``: while a trial fine-tunes it is the spec's validation metric
(robust accuracy on the held-out split, what a scheduler such as ASHA stops on, with time counted in
fine-tuning epochs); the trial's final report sets it to the evaluated metric, and only that final
value reaches Optuna. A trial's last epoch is left to that final report, so no scheduler can stop a
trial between its last epoch and its evaluation.
"""

from __future__ import annotations

import functools
import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mimir.config import (ConfigError, EvalAttack, Strict, build_config, deep_merge, flatten, format_errors, load_yaml,
                          nest, parse_overrides)
from mimir.metrics import check_trackers, filesystem
from mimir.surface import SurfaceSettings, sweep_figure, trial_surface

TRIALS = "trials"
RECORD = "record_json"  # a trial's final Tune report carries its results record
PRETRAIN_CACHE = "pretrain_cache"
FAILED = "failed.json"  # a trial folder's record of why it failed (runner.record_failure)


ROW, GROUP = "__row__", "__group__"  # grid-point keys: the index of a trial's row and column group
LABEL_SEPARATOR = " | "  # splits a row label into the spec's label_columns


class Source(Strict):
    """The trained model an evaluation-only row evaluates: a row (and column group) of another spec's
    finished sweep, so that a table of attacks (Table 9) reuses the models of other tables."""
    spec: str  # that spec, relative to this spec file
    row: str  # its row label
    group: str | None = None  # its column group (default: the evaluating trial's own group label)
    # its experiment folder (default: the folder beside this sweep's named after that spec)
    experiment: str | None = None
    name: str | None = None  # that spec's name: filled in when this spec loads


class Row(Strict):
    label: str
    set: dict[str, Any] = {}  # dotted config overrides that make this row's trial
    # the paper's reported numbers, by metric; in a spec with column groups, by group label, then metric
    paper: dict[str, float | None | dict[str, float | None]] = {}
    # a run config of the row's own (rows over datasets and architectures), relative to the spec file;
    # replaced by its content when the spec loads, so that trials on any node of a cluster have it
    base: str | dict[str, Any] | None = None
    quoted: str | None = None  # the paper these numbers are quoted from: shown in the table, never run
    evaluates: Source | None = None  # evaluation only: another spec's trained model, with this row's attacks

    @model_validator(mode="after")
    def _check(self) -> "Row":
        if self.quoted is not None and (self.set or self.base is not None or self.evaluates is not None):
            raise ValueError(f"row {self.label!r} is quoted from {self.quoted}: it runs nothing, so it takes no "
                             "set, base or evaluates")
        if self.evaluates is not None and isinstance(self.base, str):
            raise ValueError(f"row {self.label!r} evaluates another spec's model, whose config is its base; "
                             "give no base")
        return self


class Group(Strict):
    """A column group of a table (Table 3's ε = 2/255 and ε = 4/255): every row runs once per group,
    with the group's overrides, and the groups stand side by side in the table."""
    label: str
    set: dict[str, Any] = {}


class Distribution(Strict):
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, int (got {given or 'none'})")
        values = getattr(self, given[0])
        if not values:
            raise ValueError(f"{given[0]} is empty")
        return self


class Objective(Strict):
    metric: EvalAttack = "pgd20"  # a trial's value: its final evaluation
    mode: Literal["max", "min"] = "max"
    # what a scheduler steers on while a trial fine-tunes (never training accuracy)
    validation: Literal["val_pgd", "val_natural"] = "val_pgd"


class Scheduler(Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)  # fine-tuning epochs before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1)


class Resources(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # fractions pack several trials on one GPU


class SweepSpec(Strict):
    name: str
    title: str = ""
    base: str  # run config, relative to the spec file
    overrides: dict[str, Any] = {}
    objective: Objective = Objective()
    sampler: Literal["grid", "tpe"] = "grid"
    space: dict[str, Distribution] = {}
    rows: list[Row] = []
    num_samples: int = Field(1, ge=1)  # TPE trials (grid: one per row / grid point)
    max_concurrent: int = Field(1, ge=1)
    scheduler: Scheduler | None = None
    resources: Resources = Resources()
    columns: list[EvalAttack] = ["natural", "pgd20"]  # metrics shown in the table
    plot: str | None = None  # a config key to plot the columns against (a paper figure)
    seed: int = 0  # Optuna's sampler
    seeds: int = Field(1, ge=1)  # runs per row / sampled point, with seeds seed, seed + 1, ...
    groups: list[Group] = []  # column groups: each row runs once per group (Table 3's two ε)
    label_columns: list[str] = []  # the table's label columns; each row label gives one part per column
    surface: SurfaceSettings | None = None  # also each trial's loss surface, and surface.png (Figure 5)
    # a row label: with seeds > 1 the table adds each row's paired per-seed difference to this row,
    # with a 95 % confidence interval (Student's t over the seed pairs)
    reference: str | None = None
    # values from each run's results.json shown beside the accuracies (the mean over seeds), as dotted
    # paths, e.g. pretrain.metrics.mi_share (the MI term's share of the encoder gradient, last epoch)
    details: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        if not self.rows and not self.space:
            raise ValueError("the search space is empty: give `rows` or `space`")
        if self.rows and not self.space and all(r.quoted for r in self.rows):
            raise ValueError("every row is quoted from another paper: there is nothing to run")
        if self.sampler == "tpe":
            if self.rows or self.groups:
                raise ValueError("rows and groups are grid trials; use sampler: grid (or a space for tpe)")
            bad = [k for k, d in self.space.items() if d.grid is not None]
            if bad:
                raise ValueError(f"grid values need sampler: grid ({bad})")
        elif any(d.grid is None for d in self.space.values()):
            raise ValueError("sampler grid takes only `grid:` entries in space")
        for what, labels in (("row", [r.label for r in self.rows]), ("group", [g.label for g in self.groups])):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ValueError(f"{what} labels must differ (they name the trials): {repeated} repeated")
        self._check_paper_numbers()
        if self.label_columns:
            bad = [r.label for r in self.rows if len(r.label.split(LABEL_SEPARATOR)) != len(self.label_columns)]
            if bad:
                raise ValueError(f"label_columns has {len(self.label_columns)} columns, so each row label needs "
                                 f"{len(self.label_columns)} parts joined by {LABEL_SEPARATOR!r}: not {bad}")
        if self.seeds > 1 and any(r.evaluates for r in self.rows):
            raise ValueError("evaluation-only rows evaluate one trained model each: seeds must be 1")
        if self.reference is not None:
            runs = [r.label for r in self.rows if r.quoted is None]
            if self.reference not in runs:
                raise ValueError(f"reference {self.reference!r} is not the label of a row that runs ({runs})")
            if self.seeds < 2:
                raise ValueError("reference needs seeds >= 2: a paired difference's confidence interval "
                                 "comes from the spread over seed pairs")
        return self

    def _check_paper_numbers(self) -> None:
        """The paper's numbers are by metric, or with column groups by group label, then metric."""
        groups = {g.label for g in self.groups}
        for row in self.rows:
            for key, value in row.paper.items():
                if groups and (key not in groups or not isinstance(value, dict)):
                    raise ValueError(f"row {row.label!r}: with column groups, paper: maps each group label "
                                     f"({sorted(groups)}) to its numbers; got {key!r}")
                if not groups and isinstance(value, dict):
                    raise ValueError(f"row {row.label!r}: paper: {key!r} is a group of numbers, but the spec has "
                                     "no groups")

    def grid_points(self) -> list[dict[str, Any]]:
        """Trials of a grid sweep: every row that runs, once per column group (each point names its row
        and group under ``ROW`` / ``GROUP``), then the cartesian product of the space."""
        points = []
        for index, row in enumerate(self.rows):
            if row.quoted is not None:
                continue
            for group_index, group in enumerate(self.groups or [None]):
                where = {ROW: index} if group is None else {ROW: index, GROUP: group_index, **group.set}
                points.append({**where, **row.set})
        if self.space:
            keys = list(self.space)
            points += [dict(zip(keys, values)) for values in itertools.product(*(self.space[k].grid for k in keys))]
        return points


def load_spec(path: str | Path, _loading: tuple[Path, ...] = (), *,
              tiny: bool = False) -> tuple[SweepSpec, dict[str, Any]]:
    """The validated spec and its base run config (raw dict), with the spec's overrides applied; rows
    with a base of their own, or that evaluate another spec's model, carry that run config.
    ``tiny``: the spec's tiny variant instead (``mimir.reproduce.tiny_variant``)."""
    raw = load_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, str(path))) from None
    base_path = (Path(path).parent / spec.base).resolve()
    base = load_yaml(base_path)
    spec = _resolve_rows(spec, Path(path), _loading)
    if tiny:
        from mimir.reproduce import tiny_variant

        spec = tiny_variant(spec, base)
    load_spec_check(base, spec)
    return spec, base


def _resolve_rows(spec: SweepSpec, path: Path, loading: tuple[Path, ...]) -> SweepSpec:
    """Rows' own base configs and the trained models of evaluation-only rows, read into the spec."""
    rows = []
    for row in spec.rows:
        if isinstance(row.base, str):
            row = row.model_copy(update={"base": load_yaml(path.parent / row.base)})
        elif row.evaluates is not None:
            row = _resolve_source(row, path, loading)
        rows.append(row)
    return spec.model_copy(update={"rows": rows})


def _resolve_source(row: Row, path: Path, loading: tuple[Path, ...]) -> Row:
    """An evaluation-only row's base: the run config its source row trained with (that spec's base or
    the row's own, its overrides, its group's and its row's values)."""
    where = f"{path}: row {row.label!r} evaluates {row.evaluates.spec}"
    source_path = (path.parent / row.evaluates.spec).resolve()
    if source_path in loading:
        raise ConfigError(f"{where}, which evaluates it back (a cycle)")
    source, source_base = load_spec(source_path, _loading=(*loading, source_path))
    found = next((r for r in source.rows if r.label == row.evaluates.row), None)
    if found is None or found.quoted is not None:
        runs = [r.label for r in source.rows if r.quoted is None]
        raise ConfigError(f"{where}: it has no row {row.evaluates.row!r} that runs; its rows: {runs}")
    if found.evaluates is not None:
        raise ConfigError(f"{where}: its row {found.label!r} trains nothing either; name the spec that trains it")
    items = dict(source.overrides)
    if row.evaluates.group is not None:
        group = next((g for g in source.groups if g.label == row.evaluates.group), None)
        if group is None:
            raise ConfigError(f"{where}: it has no group {row.evaluates.group!r}; its groups: "
                              f"{[g.label for g in source.groups]}")
        items.update(group.set)
    items.update(found.set)
    trained = deep_merge(found.base if isinstance(found.base, dict) else source_base, nest(items))
    return row.model_copy(update={"base": trained,
                                  "evaluates": row.evaluates.model_copy(update={"name": source.name})})


def trial_identity(spec: SweepSpec, point: dict[str, Any]) -> dict[str, str | None]:
    """The row and column group a grid point runs (empty for a point of a space)."""
    if ROW not in point:
        return {}
    group = spec.groups[point[GROUP]].label if GROUP in point else None
    return {"row": spec.rows[point[ROW]].label, "group": group}


def trial_config(base: dict[str, Any], spec: SweepSpec, point: dict[str, Any], output_dir: str | None = None):
    """The RunConfig of one trial: base (the spec's, or its row's own), spec overrides, resources,
    then the trial's own values."""
    row = spec.rows[point[ROW]] if ROW in point else None
    if row is not None and isinstance(row.base, dict):
        base = row.base
    point = {k: v for k, v in point.items() if k not in (ROW, GROUP)}
    items = {**spec.overrides, **point}
    items.update({f"scaling.{k}": v for k, v in spec.resources.model_dump().items() if k != "gpus_per_worker"})
    if spec.resources.gpus_per_worker > 0:
        items.update({"scaling.use_gpu": True, "scaling.gpus_per_worker": spec.resources.gpus_per_worker})
    if output_dir is not None:
        items["output_dir"] = output_dir
    return build_config(base, nest(items), source=f"sweep {spec.name} trial {point}")


# -- running -------------------------------------------------------------------------------------
def _optuna_space(spec: SweepSpec) -> tuple[dict[str, Any], list[dict[str, Any]] | None, int]:
    """Optuna distributions, the points to evaluate first, and the number of trials."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if spec.sampler == "grid":
        points = spec.grid_points()
        keys = sorted({k for p in points for k in p})
        # a row that leaves a key out means "the base value": make that explicit for Optuna
        filled = [{k: p.get(k, "__base__") for k in keys} for p in points]
        space = {k: CategoricalDistribution(sorted({json.dumps(p[k]) for p in filled})) for k in keys}
        return space, [{k: json.dumps(p[k]) for k in keys} for p in filled], len(points)
    space: dict[str, Any] = {}
    for key, d in spec.space.items():
        if d.choice is not None:
            space[key] = CategoricalDistribution([json.dumps(v) for v in d.choice])
        elif d.int is not None:
            space[key] = IntDistribution(*d.int)
        else:
            lo, hi = d.uniform or d.loguniform
            space[key] = FloatDistribution(lo, hi, log=d.loguniform is not None)
    return space, None, spec.num_samples


def _decode_point(params: dict[str, Any]) -> dict[str, Any]:
    """Tune/Optuna parameters -> config overrides (categoricals travel as JSON strings)."""
    point = {}
    for key, value in params.items():
        if isinstance(value, str):
            value = json.loads(value)
            if value == "__base__":
                continue
        point[key] = value
    return point


class TrialFailed(RuntimeError):
    """A trial that failed after its retry."""


def run_trial(cfg: Any, experiment: Path, trial_dir: Path, callbacks: list[Any] = (),
              finetuned: str | None = None) -> dict[str, Any]:
    """One trial: the pipeline of ``mimir run`` with the sweep's pre-training cache, or, given the
    ``finetuned`` checkpoint of another sweep's trial (an evaluation-only row), its evaluation alone.
    Its runs live at the trial folder's place under the sweep's storage (``sweep_storage``)."""
    import ray.train

    from mimir import runner

    trial_dir.mkdir(parents=True, exist_ok=True)
    root = cfg.scaling.storage_path or str(experiment)
    storage = "/".join([root.rstrip("/"), *trial_dir.relative_to(experiment).parts])
    if finetuned is not None:
        results = runner.run_stages(cfg, ("evaluate",), storage=storage, finetuned=ray.train.Checkpoint(finetuned))
        return {**results, "evaluated_checkpoint": finetuned}
    return runner.run_stages(cfg, storage=storage, resume=True, pretrain_cache=f"{root.rstrip('/')}/{PRETRAIN_CACHE}",
                             callbacks=callbacks)


class SourceUnavailable(RuntimeError):
    """An evaluation-only row whose model is not there, or trained with another config."""


def source_key(point: dict[str, Any]) -> str:
    return f"{point[ROW]}/{point.get(GROUP, '')}"


def find_sources(base: dict[str, Any], spec: SweepSpec, experiment: Path) -> dict[str, dict[str, Any] | str]:
    """For each evaluation-only trial (by ``source_key``), the finished trial of another sweep whose
    model it evaluates, or why there is none. Read by the driver, which holds every sweep's records,
    and checked to have trained with the config the row asks for (a row may change only how it is
    evaluated)."""
    from mimir.config import RunConfig, config_changes

    found: dict[str, dict[str, Any] | str] = {}
    for point in spec.grid_points():
        row = spec.rows[point[ROW]] if ROW in point else None
        if row is None or row.evaluates is None:
            continue
        source = row.evaluates
        group = source.group or trial_identity(spec, point)["group"]
        folder = Path(source.experiment).expanduser().resolve() if source.experiment else experiment.parent / source.name
        which = f"{source.name} row {source.row!r}" + (f" (group {group!r})" if group else "")
        records = [(p, json.loads(p.read_text())) for p in sorted((folder / TRIALS).glob("*/results.json"))]
        match = next(((p, r) for p, r in records if r.get("row") == source.row and r.get("group") == group), None)
        if match is None:
            found[source_key(point)] = (f"row {row.label!r} evaluates the model of {which}, but {folder} holds no "
                                        f"finished trial of it: run `mimir sweep {source.spec}` first (or set "
                                        "evaluates.experiment to the folder that has it)")
            continue
        path, record = match
        trained = RunConfig.model_validate(record["config"]).stage_config("finetune")
        asked = trial_config(base, spec, point).stage_config("finetune")
        if "evaluated_checkpoint" not in record:
            found[source_key(point)] = f"{path} names no fine-tuned checkpoint (evaluated_checkpoint)"
        elif trained != asked:
            found[source_key(point)] = (f"row {row.label!r} would evaluate {path.parent} ({which}), which trained "
                                        f"with another config: {'; '.join(config_changes(trained, asked))}")
        else:
            found[source_key(point)] = record
    return found


def sweep_storage(base: dict[str, Any], spec: SweepSpec, experiment: Path) -> str:
    """Where a sweep's training runs, pre-training cache and Tune state live: the experiment folder,
    or with ``scaling.storage_path`` (a path, or a URI such as s3://) a folder of the experiment's
    name under it. Trial records, tables and the Optuna database stay in the experiment folder."""
    root = trial_config(base, spec, {}).scaling.storage_path
    if root is None:
        return str(experiment)
    root = root if "://" in root else str(Path(root).expanduser().resolve())
    return f"{root.rstrip('/')}/{experiment.name}"


def _validation_callback(metric: str, seed_index: int, epochs: int, seeds: int) -> Any:
    """A TuneReportCallback that reports each validated fine-tuning epoch: ``objective`` = the
    validation ``metric``, ``finetune_epoch`` = epochs done over the trial's seeds. The trial's last
    epoch is not reported; its final report (with the evaluation) takes that place."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationObjective(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            report = metrics[0]
            done = seed_index * epochs + report["epoch"] + 1
            if metric in report and done < epochs * seeds:
                first = dict(report, objective=report[metric], finetune_epoch=done)
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ValidationObjective()


def run_with_retry(cfg: Any, experiment: Path, trial_dir: Path, callbacks: list[Any] = (),
                   run: Callable[..., dict[str, Any]] = run_trial) -> dict[str, Any]:
    """``run`` the trial; on a non-finite run, once more with that stage's lr / 10 (the authors'
    remedy), in ``trial_dir/retry_lr_div10``. Writes ``trial_dir/results.json``, whose ``retried``
    says whether the retry made them."""
    from mimir.runner import NonFiniteRun, write_json_atomically

    trial_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run(cfg, experiment, trial_dir, callbacks)
    except NonFiniteRun as err:
        stage = err.stage
        print(f"[sweep] {err}; retrying once with {stage} lr / 10", flush=True)
        settings = getattr(cfg, stage)
        retry_dir = trial_dir / "retry_lr_div10"
        retry = cfg.model_copy(update={stage: settings.model_copy(update={"blr": settings.blr / 10}),
                                       "output_dir": str(retry_dir)})
        try:
            results = run(retry, experiment, retry_dir, callbacks)
        except Exception as retry_err:
            raise TrialFailed(f"{err}; the retry with {stage} lr / 10 failed too: {retry_err}") from retry_err
        results["retried"] = {"reason": str(err), "stage": stage, "lr_divided_by": 10}
    results["trial_config_hash"] = cfg.config_hash()  # of the trial as asked for, before any retry
    write_json_atomically(trial_dir / "results.json", results)
    return results


def finished_results(cfg: Any, trial_dir: Path) -> dict[str, Any] | None:
    """The results this trial already wrote (a sweep interrupted between a trial's end and Tune's
    record of it restarts the trial), or None."""
    path = trial_dir / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("trial_config_hash") == cfg.config_hash() else None


TrialRunner = Callable[..., dict[str, Any]]


def combine_seeds(cfg: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for a point run with several seeds: mean and sample standard deviation of each
    accuracy, the count, and every run's own results."""
    metrics = sorted(set.intersection(*(set(r["accuracy"]) for r in runs)))
    values = {m: [r["accuracy"][m] for r in runs] for m in metrics}
    mean = {m: statistics.mean(v) for m, v in values.items()}
    std = {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in values.items()}
    return {"config": cfg.model_dump(mode="json"), "accuracy": mean, "accuracy_std": std, "num_seeds": len(runs),
            "seeds": [r["config"]["seed"] for r in runs], "runs": runs,
            "retried": [r["retried"] for r in runs if "retried" in r] or None,
            "trial_config_hash": cfg.config_hash()}


def run_point(cfg: Any, spec: SweepSpec, experiment: Path, trial_dir: Path,
              run: TrialRunner = run_trial, tune_session: bool = True) -> dict[str, Any]:
    """A trial's point run with ``spec.seeds`` seeds, each reusing its results if it finished before
    an interruption; writes and returns the trial's record (one run's, or their combination)."""
    from mimir.runner import write_json_atomically

    if spec.seeds > 1:
        done = finished_results(cfg, trial_dir)
        if done is not None:
            return done
    runs = []
    for index in range(spec.seeds):
        seed = cfg.seed + index
        seed_dir = trial_dir if spec.seeds == 1 else trial_dir / f"seed-{seed}"
        seed_cfg = cfg if spec.seeds == 1 else cfg.model_copy(update={"seed": seed, "output_dir": str(seed_dir)})
        results = finished_results(seed_cfg, seed_dir)
        if results is not None:
            print(f"[sweep] {seed_dir.relative_to(experiment)} had finished before the sweep was interrupted; "
                  "reusing its results", flush=True)
        else:
            callbacks = ([_validation_callback(spec.objective.validation, index, cfg.finetune.epochs, spec.seeds)]
                         if tune_session else [])
            results = run_with_retry(seed_cfg, experiment, seed_dir, callbacks, run=run)
        runs.append(results)
    if spec.seeds == 1:
        return runs[0]
    combined = combine_seeds(cfg, runs)
    write_json_atomically(trial_dir / "results.json", combined)
    return combined


def run_grid_trial(point: dict[str, Any], *, base: dict[str, Any], spec: SweepSpec, experiment: Path,
                   trial_dir: Path, storage: str, sources: dict[str, dict[str, Any] | str],
                   run: TrialRunner = run_trial, tune_session: bool = True) -> tuple[Any, dict[str, Any]]:
    """What a Tune trial does with its point: build the trial's config, run it with each seed (once
    more at lr / 10 on NaN), or, for an evaluation-only row, evaluate its source's model; write the
    record, which names the trial's row and group. A failure is written to the trial's folder and
    raised. Returns the config and the record. ``tune_session`` False: outside Tune, so no validation
    epochs are reported to it."""
    from mimir.runner import record_failure, write_json_atomically

    identity = trial_identity(spec, point)
    cfg = trial_config(base, spec, point, output_dir=str(trial_dir))
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"storage_path": storage})})
    try:
        source = sources.get(source_key(point)) if identity else None
        if isinstance(source, str):
            raise SourceUnavailable(source)
        if source is not None:
            run = functools.partial(run, finetuned=source["evaluated_checkpoint"])
        results = {**run_point(cfg, spec, Path(experiment), trial_dir, run=run, tune_session=tune_session),
                   **identity}
        if spec.surface is not None and "surface" not in results:
            results["surface"] = trial_surface(results, spec.surface)
            write_json_atomically(trial_dir / "results.json", results)
    except Exception as err:
        record_failure(trial_dir, cfg, err)
        if identity:
            failure = json.loads((trial_dir / FAILED).read_text())
            write_json_atomically(trial_dir / FAILED, {**failure, **identity})
        raise
    if identity:
        write_json_atomically(trial_dir / "results.json", results)
    return cfg, results


def _trainable(params: dict[str, Any], *, base: dict[str, Any], spec_json: dict[str, Any], experiment: str,
               storage: str, sources: dict[str, dict[str, Any] | str], run: TrialRunner = run_trial) -> None:
    """The Tune trial: ``run_grid_trial`` in the trial's folder, then its final report. A failure is
    raised, so Tune records the trial as errored."""
    from ray import tune

    from mimir.runner import quiet_ray_data

    quiet_ray_data()
    spec = SweepSpec.model_validate(spec_json)
    trial_dir = Path(experiment) / TRIALS / tune.get_context().get_trial_id()
    cfg, results = run_grid_trial(_decode_point(params), base=base, spec=spec, experiment=Path(experiment),
                                  trial_dir=trial_dir, storage=storage, sources=sources, run=run)
    tune.report({"objective": results["accuracy"][spec.objective.metric],
                 "finetune_epoch": cfg.finetune.epochs * spec.seeds,
                 **{f"accuracy_{k}": v for k, v in results["accuracy"].items()},
                 "retried": bool(results.get("retried")),
                 # the record, for the driver to keep where the trial's own node cannot write
                 RECORD: json.dumps(results)})


def max_finetune_epochs(spec: SweepSpec, base: dict[str, Any]) -> int:
    """The most fine-tuning epochs any trial runs (a scheduler's ``max_t``, per seed)."""
    epochs = [trial_config(base, spec, point).finetune.epochs for point in spec.grid_points() or [{}]]
    sampled = spec.space.get("finetune.epochs")
    if spec.sampler == "tpe" and sampled is not None:
        epochs.append(int(max(sampled.choice or sampled.int or sampled.uniform or sampled.loguniform)))
    return max(epochs)


def study_name(spec: SweepSpec, experiment: Path) -> str:
    """The experiment's own Optuna study: two experiments sharing one --storage database never mix."""
    return f"{spec.name}:{experiment}"


def experiment_dir(spec: SweepSpec, out: str | None) -> Path:
    return Path(out or Path("results") / "sweeps" / spec.name).expanduser().resolve()


def run_sweep(spec_path: str | Path, overrides: list[str] = (), *, out: str | None = None,
              storage_url: str | None = None, resume: bool = False, tiny: bool = False,
              max_concurrent: int | None = None, run: TrialRunner = run_trial) -> Path:
    """Run (or continue) the sweep; returns the experiment folder. Failed trials do not stop it.
    ``tiny``: the spec's tiny variant (``mimir.reproduce.tiny_variant``: the same rows on the digits);
    ``max_concurrent``: trials at once, instead of the spec's (a cluster bigger than it assumed).

    ``run`` is the trial hook: what one trial does with its config (default: the real pipeline).
    Tests replace it to exercise Tune, Optuna, failures and resume without training."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    class FinalValueSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            """Nothing: Optuna learns a trial's final (evaluated) value only, never its validation curve."""
    from mimir.runner import init_ray, pretrain_leases, release_pretrain_leases

    spec, base = load_command_spec(spec_path, overrides, tiny=tiny, max_concurrent=max_concurrent)
    experiment = experiment_dir(spec, out)
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "spec.json").write_text(json.dumps({"spec": spec.model_dump(mode="json"),
                                                      "spec_path": str(Path(spec_path).resolve())}, indent=2))
    init_ray()
    storage = sweep_storage(base, spec, experiment)
    # the trials' lock on the pre-training cache, owned here so that it outlives every trial
    leases = pretrain_leases(f"{storage}/{PRETRAIN_CACHE}")
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=base, spec_json=spec.model_dump(mode="json"), experiment=str(experiment),
                             storage=storage, sources=find_sources(base, spec, experiment), run=run),
        # the trial driver only orchestrates: no CPU (its TorchTrainer workers and Ray Data take those)
        {"cpu": 0, "memory": 256 * 1024**2})
    tune_dir = f"{storage}/tune"
    if resume and tune.Tuner.can_restore(tune_dir):
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_errored=False, restart_errored=False)
    else:
        if _exists(tune_dir):
            raise ConfigError(f"{experiment} already holds this sweep (in {tune_dir}); pass --resume to continue it, "
                              "or --out another folder")
        space, points, num_samples = _optuna_space(spec)
        database = optuna.storages.RDBStorage(storage_url or f"sqlite:///{experiment / 'optuna.db'}")
        searcher = FinalValueSearch(space, metric="objective", mode=spec.objective.mode, points_to_evaluate=points,
                                    sampler=optuna.samplers.TPESampler(seed=spec.seed),
                                    study_name=study_name(spec, experiment), storage=database)
        scheduler = None
        if spec.scheduler is not None:
            scheduler = ASHAScheduler(time_attr="finetune_epoch", metric="objective", mode=spec.objective.mode,
                                      max_t=max_finetune_epochs(spec, base) * spec.seeds,
                                      grace_period=spec.scheduler.grace_period,
                                      reduction_factor=spec.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            # reuse_actors: the next trial runs in the finished trial's process, which has imported
            # torch and mimir already (seconds per trial on a small machine)
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, spec.max_concurrent),
                                        scheduler=scheduler, num_samples=num_samples, reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
    grid = tuner.fit()
    release_pretrain_leases(leases)
    for result in grid:
        keep_record(experiment, base, spec, result)
        if result.error:
            print(f"[sweep] trial failed: {type(result.error).__name__}: {str(result.error).splitlines()[0]}",
                  flush=True)
    if spec.surface is not None:
        sweep_figure(spec, experiment)
    return experiment


def keep_record(experiment: Path, base: dict[str, Any], spec: SweepSpec, result: Any) -> None:
    """A trial's ``results.json`` (or ``failed.json``) in the experiment folder, from what it reported
    to Tune, where its own process could not write it (it ran on another node of a cluster)."""
    from mimir.runner import write_json_atomically

    # Tune names a trial's folder "<trainable>_<trial id>_<index>_..."; the trainable is "_trainable"
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("_trainable_").split("_")[0]
    trial_dir = experiment / TRIALS / trial_id
    if (trial_dir / "results.json").exists() or (trial_dir / FAILED).exists():
        return
    if RECORD in (result.metrics or {}):
        write_json_atomically(trial_dir / "results.json", json.loads(result.metrics[RECORD]))
    elif result.error is not None:
        params = result.config or json.loads(_read(f"{result.path}/params.json"))  # restored: only on storage
        point = _decode_point(params)
        cfg = trial_config(base, spec, point, output_dir=str(trial_dir))
        # the traceback's last line, "package.module.Error: message", as the trial itself words it
        name, _, message = str(result.error).strip().splitlines()[-1].partition(": ")
        write_json_atomically(trial_dir / FAILED, {"config": cfg.model_dump(mode="json"),
                                                   "reason": f"{name.rsplit('.', 1)[-1]}: {message}",
                                                   **trial_identity(spec, point)})


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def _read(path: str) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def load_command_spec(spec_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, tiny: bool = False,
                      max_concurrent: int | None = None) -> tuple[SweepSpec, dict[str, Any]]:
    """The spec as a command runs it (``mimir sweep``, ``--plan``): loaded, or its tiny variant, with
    the command's ``key=value`` overrides and ``--max-concurrent``; trials checked when overridden."""
    spec, base = load_spec(spec_path, tiny=tiny)
    if max_concurrent is not None:
        spec = spec.model_copy(update={"max_concurrent": max_concurrent})
    if overrides:
        spec = spec.model_copy(update={"overrides": {**spec.overrides, **flatten(parse_overrides(list(overrides)))}})
        load_spec_check(base, spec)
    return spec, base


def load_spec_check(base: dict[str, Any], spec: SweepSpec) -> None:
    """Validate every grid trial's config now, before any Ray work starts, and that each trial
    evaluates the objective and the table's columns."""
    for point in spec.grid_points() or [{}]:
        cfg = trial_config(base, spec, point)
        check_trackers(cfg.log)
        if spec.scheduler is not None and not cfg.finetune.validation.images:
            raise ConfigError(f"scheduler: steers on validation accuracy, but trial {point or 'base'} holds out "
                              "none (finetune.validation.images is 0); set it, or remove the scheduler")
        wanted = {"objective.metric": [spec.objective.metric], "columns": spec.columns}
        for field, metrics in wanted.items():
            missing = [m for m in metrics if m not in cfg.evaluate.attacks]
            if missing:
                raise ConfigError(f"{field}: {', '.join(missing)} is not evaluated (evaluate.attacks is "
                                  f"{cfg.evaluate.attacks}); add it there or choose one of those")
