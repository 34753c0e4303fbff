"""Sweeps: a ``tune/*.yaml`` spec -> a Ray Tune ``Tuner`` whose trials run the same pre-train ->
fine-tune -> evaluate pipeline as ``mimir run``.

A spec either lists ``rows`` (the cells of a paper table; each row is one trial) or grid values,
run as Tune's ``grid_search``, or gives a ``space`` of distributions, sampled by Optuna's TPE
through ``OptunaSearch``. Every trial's record is its
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
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from mimir.config import FAILED, PRETRAIN_CACHE, TRIALS
from mimir.errors import ConfigError
from mimir.storage import filesystem
from mimir.spec import (SweepSpec, experiment_dir, find_sources, grid_trials, load_command_spec, source_key,
                        trial_config, trial_identity)
from mimir.surface import sweep_figure, trial_surface

RECORD = "record_json"  # a trial's final Tune report carries its results record


TRIAL = "trial"  # a grid trial's parameter: its label (what Tune's progress table shows)
POINT = "point"  # a sampled trial's parameters: {"point": {dotted config key: value}}


# -- running -------------------------------------------------------------------------------------
def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune search space: a grid spec's trials as ``tune.grid_search`` over their labels (a row's
    label, or its values; :func:`trial_point` maps a label to its overrides, so a row that leaves a
    key out simply has no such key), a sampled spec's distributions as Tune's domains, which
    ``OptunaSearch`` hands to Optuna's TPE sampler."""
    from ray import tune

    if spec.sampler == "grid":
        return {TRIAL: tune.grid_search(list(grid_trials(spec)))}
    space: dict[str, Any] = {}
    for key, d in spec.space.items():
        if d.choice is not None:
            space[key] = tune.choice(d.choice)
        elif d.int is not None:
            space[key] = tune.randint(d.int[0], d.int[1] + 1)  # Tune's upper bound is exclusive, the spec's inclusive
        elif d.uniform is not None:
            space[key] = tune.uniform(*d.uniform)
        else:
            space[key] = tune.loguniform(*d.loguniform)
    return {POINT: space}


def trial_point(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's parameters -> its point (the config overrides of its row or sample)."""
    return grid_trials(spec)[params[TRIAL]] if TRIAL in params else params[POINT]


class FinalValueSearch(OptunaSearch):
    """Optuna's search, told each trial's final (evaluated) value only, never its validation curve: a
    scheduler steers on validation, Optuna learns what was evaluated."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Nothing: intermediate (validation) results are the scheduler's, not Optuna's."""


def final_value_search(spec: SweepSpec, experiment: Path, storage_url: str | None) -> FinalValueSearch:
    """Optuna's TPE over a sampled spec, its study in ``<experiment>/optuna.db`` (or ``storage_url``)."""
    database = optuna.storages.RDBStorage(storage_url or f"sqlite:///{experiment / 'optuna.db'}")
    return FinalValueSearch(metric="objective", mode=spec.objective.mode,
                            sampler=optuna.samplers.TPESampler(seed=spec.seed),
                            study_name=study_name(spec, experiment), storage=database)


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
    from mimir.storage import write_json
    from mimir.errors import NonFiniteRun

    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
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
    results["run_window"] = [started, time.time()]  # the trial's fixed costs outside its stages
    write_json(trial_dir / "results.json", results)
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
    from mimir.storage import write_json

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
    write_json(trial_dir / "results.json", combined)
    return combined


def run_grid_trial(point: dict[str, Any], *, base: dict[str, Any], spec: SweepSpec, experiment: Path,
                   trial_dir: Path, storage: str, sources: dict[str, dict[str, Any] | str],
                   run: TrialRunner = run_trial, tune_session: bool = True) -> tuple[Any, dict[str, Any]]:
    """What a Tune trial does with its point: build the trial's config, run it with each seed (once
    more at lr / 10 on NaN), or, for an evaluation-only row, evaluate its source's model; write the
    record, which names the trial's row and group. A failure is written to the trial's folder and
    raised. Returns the config and the record. ``tune_session`` False: outside Tune, so no validation
    epochs are reported to it."""
    from mimir.stages import record_failure
    from mimir.storage import write_json

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
            write_json(trial_dir / "results.json", results)
    except Exception as err:
        record_failure(trial_dir, cfg, err)
        if identity:
            failure = json.loads((trial_dir / FAILED).read_text())
            write_json(trial_dir / FAILED, {**failure, **identity})
        raise
    if identity:
        write_json(trial_dir / "results.json", results)
    return cfg, results


def _trainable(params: dict[str, Any], *, base: dict[str, Any], spec_json: dict[str, Any], experiment: str,
               storage: str, sources: dict[str, dict[str, Any] | str], run: TrialRunner = run_trial) -> None:
    """The Tune trial: ``run_grid_trial`` in the trial's folder, then its final report. A failure is
    raised, so Tune records the trial as errored."""
    from ray import tune

    from mimir.ray_env import quiet_ray_data

    quiet_ray_data()
    spec = SweepSpec.model_validate(spec_json)
    trial_dir = Path(experiment) / TRIALS / tune.get_context().get_trial_id()
    cfg, results = run_grid_trial(trial_point(spec, params), base=base, spec=spec, experiment=Path(experiment),
                                  trial_dir=trial_dir, storage=storage, sources=sources, run=run)
    tune.report({"objective": results["accuracy"][spec.objective.metric],
                 "finetune_epoch": cfg.finetune.epochs * spec.seeds,
                 **{f"accuracy_{k}": v for k, v in results["accuracy"].items()},
                 "retried": bool(results.get("retried")),
                 # the record, for the driver to keep where the trial's own node cannot write; one JSON
                 # string, as Tune would flatten a nested dict into a column per leaf
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


def run_sweep(spec_path: str | Path, overrides: list[str] = (), *, out: str | None = None,
              storage_url: str | None = None, resume: bool = False, tiny: bool = False,
              max_concurrent: int | None = None, run: TrialRunner = run_trial) -> Path:
    """Run (or continue) the sweep; returns the experiment folder. Failed trials do not stop it.
    ``tiny``: the spec's tiny variant (``mimir.reproduce.tiny_variant``: the same rows on the digits);
    ``max_concurrent``: trials at once, instead of the spec's (a cluster bigger than it assumed).

    ``run`` is the trial hook: what one trial does with its config (default: the real pipeline).
    Tests replace it to exercise Tune, Optuna, failures and resume without training."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from mimir.folder_lock import folder_lock
    from mimir.pretrain_cache import pretrain_leases, release_pretrain_leases
    from mimir.ray_env import init_ray

    spec, base = load_command_spec(spec_path, overrides, tiny=tiny, max_concurrent=max_concurrent)
    experiment = experiment_dir(spec, out)
    with folder_lock(experiment, "sweep"):
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
            # a grid is Tune's own grid search; a sampled space goes to Optuna
            searcher = final_value_search(spec, experiment, storage_url) if spec.sampler == "tpe" else None
            scheduler = None
            if spec.scheduler is not None:
                scheduler = ASHAScheduler(time_attr="finetune_epoch", metric="objective", mode=spec.objective.mode,
                                          max_t=max_finetune_epochs(spec, base) * spec.seeds,
                                          grace_period=spec.scheduler.grace_period,
                                          reduction_factor=spec.scheduler.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(spec),
                # reuse_actors: the next trial runs in the finished trial's process, which has imported
                # torch and mimir already (seconds per trial on a small machine)
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                            num_samples=1 if spec.sampler == "grid" else spec.num_samples,
                                            max_concurrent_trials=spec.max_concurrent, reuse_actors=True),
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
        print_trial_costs(experiment)
    return experiment


def print_trial_costs(experiment: Path) -> None:
    """Each trial run's wall time, its computation and the rest (``mimir runs --fixed-costs`` splits
    the rest by stage)."""
    from mimir.runs import fixed_costs_table

    try:
        table = fixed_costs_table(experiment / TRIALS, whole_runs=True)
    except FileNotFoundError:  # no trial finished
        return
    print(f"[sweep] each trial's time besides its computation (`mimir runs {experiment} --fixed-costs` splits it "
          f"by stage):\n{table}", flush=True)


def keep_record(experiment: Path, base: dict[str, Any], spec: SweepSpec, result: Any) -> None:
    """A trial's ``results.json`` (or ``failed.json``) in the experiment folder, from what it reported
    to Tune, where its own process could not write it (it ran on another node of a cluster)."""
    from mimir.storage import write_json

    # Tune names a trial's folder "<trainable>_<trial id>_<index>_..."; the trainable is "_trainable"
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("_trainable_").split("_")[0]
    trial_dir = experiment / TRIALS / trial_id
    if (trial_dir / "results.json").exists() or (trial_dir / FAILED).exists():
        return
    if RECORD in (result.metrics or {}):
        write_json(trial_dir / "results.json", json.loads(result.metrics[RECORD]))
    elif result.error is not None:
        params = result.config or json.loads(_read(f"{result.path}/params.json"))  # restored: only on storage
        point = trial_point(spec, params)
        cfg = trial_config(base, spec, point, output_dir=str(trial_dir))
        # the traceback's last line, "package.module.Error: message", as the trial itself words it
        name, _, message = str(result.error).strip().splitlines()[-1].partition(": ")
        write_json(trial_dir / FAILED, {"config": cfg.model_dump(mode="json"),
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


