"""The sweep spec: a ``tune/*.yaml`` file as a validated ``SweepSpec``, and everything read from it
before any Ray work starts.

This is the ground floor of the sweep tier: the planner, the report, the loss surfaces and the sweep
runner depend on it, and it depends on none of them. It holds the schema (rows, column groups,
search spaces, seeds, the reference row, loss-surface settings), loading (rows' own base configs,
evaluation-only rows' sources, the command's overrides), each trial's config and identity, the
tiny variant of a spec, and where a sweep's records live (``<experiment>/trials/<trial id>/``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from mimir.config import (TRIALS, EvalAttack, RunConfig, Strict, build_config, config_changes, deep_merge, find_file,
                          flatten, format_errors, load_yaml, nest, parse_overrides)
from mimir.errors import ConfigError
from mimir.metrics import check_trackers


# -- loss surfaces (Figure 5) ---------------------------------------------------------------------
InputKind = Literal["natural", "adversarial"]


class SurfaceSettings(Strict):
    """What the paper leaves open about Figure 5, with Li et al.'s values where they have one."""

    steps: int = Field(51, ge=2)  # grid points per axis (Li et al.'s -1:1:51)
    span: float = Field(1.0, gt=0)  # α and β run over [-span, span]
    num_images: int = Field(1000, ge=1)  # the first N test images
    inputs: list[InputKind] = Field(["natural", "adversarial"], min_length=1)
    attack_steps: int = Field(10, ge=1)  # PGD-k for the adversarial loss, at evaluate.eps / step_size
    seed: int = 123  # fixes θ1, θ2 and the attack starts (Li et al. seed torch with 123)
    checkpoint: Literal["best", "last"] | None = None  # None: the one evaluation used

    def axis(self) -> np.ndarray:
        return np.linspace(-self.span, self.span, self.steps)

    def points(self) -> list[tuple[float, float]]:
        """(α, β) of every grid point, β-major: point ``i`` is row ``i // steps`` of the grid."""
        axis = self.axis().tolist()
        return [(a, b) for b in axis for a in axis]


# -- the spec ------------------------------------------------------------------------------------
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
        if self.choice is not None and not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise ValueError(f"choice {values} holds a list or mapping; Optuna samples numbers, strings, booleans and "
                             "null only (list such values as rows or a grid)")
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
        if self.space and self.sampler == "grid":  # a sampled space has no points until Optuna draws them
            keys = list(self.space)
            points += [dict(zip(keys, values)) for values in itertools.product(*(self.space[k].grid for k in keys))]
        return points


def load_spec(path: str | Path, _loading: tuple[Path, ...] = (), *,
              tiny: bool = False) -> tuple[SweepSpec, dict[str, Any]]:
    """The validated spec and its base run config (raw dict), with the spec's overrides applied; rows
    with a base of their own, or that evaluate another spec's model, carry that run config.
    ``tiny``: the spec's tiny variant instead (:func:`tiny_variant`). ``path`` may name a bundled spec."""
    path = find_file("tune", path)
    raw = load_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, str(path))) from None
    base_path = (Path(path).parent / spec.base).resolve()
    base = load_yaml(base_path)
    spec = _resolve_rows(spec, Path(path), _loading)
    if tiny:
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


def trial_label(spec: SweepSpec, point: dict[str, Any], index: int = 0) -> str:
    """How a trial is named to a user (the plan, Tune's progress table): its row and group, else its
    point's values, else (a sampled trial) its number."""
    identity = trial_identity(spec, point)
    # a label's parts (the table's label columns) joined so that they stay one cell of a table
    return " / ".join(v.replace(LABEL_SEPARATOR, " · ") for v in (identity.get("row"), identity.get("group"))
                      if v) or (", ".join(f"{k}={v}" for k, v in point.items()) if point else f"sample {index + 1}")


def grid_trials(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """A grid spec's trials by label (a repeated label gets `` #n``)."""
    trials: dict[str, dict[str, Any]] = {}
    for index, point in enumerate(spec.grid_points()):
        label = trial_label(spec, point, index)
        trials[label if label not in trials else f"{label} #{index + 1}"] = point
    return trials


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


def source_key(point: dict[str, Any]) -> str:
    return f"{point[ROW]}/{point.get(GROUP, '')}"


def find_sources(base: dict[str, Any], spec: SweepSpec, experiment: Path) -> dict[str, dict[str, Any] | str]:
    """For each evaluation-only trial (by ``source_key``), the finished trial of another sweep whose
    model it evaluates, or why there is none. Read by the driver, which holds every sweep's records,
    and checked to have trained with the config the row asks for (a row may change only how it is
    evaluated)."""
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


def experiment_dir(spec: SweepSpec, out: str | None) -> Path:
    return Path(out or Path("results") / "sweeps" / spec.name).expanduser().resolve()


def load_command_spec(spec_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, tiny: bool = False,
                      max_concurrent: int | None = None) -> tuple[SweepSpec, dict[str, Any]]:
    """The spec as a command runs it (``mimir sweep``, ``--plan``): loaded, or its tiny variant, with
    the command's ``key=value`` overrides and ``--max-concurrent``; trials checked when overridden."""
    spec, base = load_spec(spec_path, tiny=tiny)
    if max_concurrent is not None:
        spec = spec.model_copy(update={"max_concurrent": max_concurrent})
    if overrides:
        command = flatten(parse_overrides(list(overrides)))
        resources = command_resources(spec, command)
        spec = spec.model_copy(update={"overrides": {**spec.overrides, **command}, "resources": resources})
        load_spec_check(base, spec)
    return spec, base


def command_resources(spec: SweepSpec, command: dict[str, Any]) -> Resources:
    """The spec's ``resources:`` with the command's ``scaling.num_workers``, ``cpus_per_worker``,
    ``gpus_per_worker`` (taken out of ``command``) and ``use_gpu`` put over it: what the user types
    wins over what the spec says, and the plan shows it (the resources block would otherwise
    override those fields in every trial). ``scaling.use_gpu=false`` means no GPU a worker;
    ``scaling.use_gpu=true`` on a CPU spec, one."""
    resources = spec.resources.model_dump()
    for field in ("num_workers", "cpus_per_worker", "gpus_per_worker"):
        if f"scaling.{field}" in command:
            resources[field] = command.pop(f"scaling.{field}")
    if "scaling.use_gpu" in command:
        use_gpu = command["scaling.use_gpu"]
        if use_gpu is False:
            resources["gpus_per_worker"] = 0.0
        elif use_gpu is True and not resources["gpus_per_worker"]:
            resources["gpus_per_worker"] = 1.0
        elif use_gpu not in (True, False):
            raise ConfigError(f"scaling.use_gpu: expected true or false, got {use_gpu!r}")
    try:
        return Resources.model_validate(resources)
    except ValidationError as err:
        raise ConfigError(format_errors(err, f"the command's overrides of {spec.name}'s resources")
                          .replace("\n  ", "\n  scaling.")) from None


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


# -- tiny variants -------------------------------------------------------------------------------
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
