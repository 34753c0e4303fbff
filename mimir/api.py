"""mimir from Python: the commands as functions, each returning the record the CLI writes.

    import mimir
    result = mimir.run("configs/quickstart.yaml", pretrain__epochs=2, finetune__epochs=2)
    result["accuracy"]                        # what results.json holds
    model = mimir.load_classifier(result["config"]["output_dir"])   # nn.Module on [0, 1] images

Overrides are ``"key=value"`` strings, as on the command line, or keywords with ``__`` for the dots
(``pretrain__mi__weight=1e-3``); a config is a YAML path or a ``RunConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray.train
import torch

from mimir.config import RunConfig, build_config, load_config
from mimir.errors import CheckpointError
from mimir.models import Classifier
from mimir.train.checkpoint import load_state, verify_checkpoint

__all__ = ["evaluate", "finetune", "load_classifier", "load_run_config", "pretrain", "run", "sweep"]


def _overrides(overrides: tuple[str, ...], fields: dict[str, Any]) -> list[str]:
    # JSON is YAML, so keyword values reach the config exactly as typed on the command line would
    return [*overrides, *(f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in fields.items())]


def load_run_config(config: str | Path | RunConfig, *overrides: str, **fields: Any) -> RunConfig:
    """The validated run config (what ``mimir config show`` prints) of a YAML path or a RunConfig."""
    items = _overrides(overrides, fields)
    if isinstance(config, RunConfig):
        return build_config(config.model_dump(mode="json"), items, source="RunConfig")
    return load_config(config, items)


def checkpoint_argument(path: str | Path, stage: str, option: str) -> ray.train.Checkpoint:
    """A checkpoint folder of ``stage`` given by the user, checked (local paths) before Ray starts."""
    path = str(path)
    if "://" not in path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{option}: checkpoint directory not found: {path}")
        try:
            state = load_state(path)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"{option}: {err}") from None
        if not (Path(path) / "model.safetensors").is_file():
            raise FileNotFoundError(f"{option}: {path}: not a mimir checkpoint (no model.safetensors)")
        if state.get("stage") not in (None, stage):
            raise FileNotFoundError(f"{option}: {path} is a {state['stage']} checkpoint; a {stage} one is needed")
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(f"{option}: {err}") from None
    return ray.train.Checkpoint(path if "://" in path else str(Path(path).resolve()))


CheckpointArgument = str | Path | ray.train.Checkpoint | None


def dry_run(stages: tuple[str, ...], config: str | Path | RunConfig, *overrides: str, resume: bool = False,
            overwrite: bool = False, pretrained: CheckpointArgument = None, checkpoint: CheckpointArgument = None,
            **fields: Any) -> list[str]:
    """``--dry-run``: every check the stages make before Ray starts, and what each would do, with
    nothing trained, started or removed; raises on the first problem."""
    from mimir.runner import preflight

    cfg = load_run_config(config, *overrides, **fields)
    if pretrained is not None and not isinstance(pretrained, ray.train.Checkpoint):
        checkpoint_argument(pretrained, "pretrain", "pretrained")
    if checkpoint is not None and not isinstance(checkpoint, ray.train.Checkpoint):
        checkpoint_argument(checkpoint, "finetune", "checkpoint")
    _, lines = preflight(cfg, stages, resume=resume, overwrite=overwrite, pretrained_given=pretrained is not None,
                         finetuned_given=checkpoint is not None, dry_run=True)
    return [f"config: {cfg.name}, output_dir {cfg.output_dir}, config hash {cfg.config_hash()}", *lines]


def _stages(stages: tuple[str, ...], config: str | Path | RunConfig, overrides: tuple[str, ...],
            fields: dict[str, Any], *, resume: bool, overwrite: bool, pretrained: CheckpointArgument = None,
            checkpoint: CheckpointArgument = None) -> dict[str, Any]:
    from mimir.runner import run_pipeline

    cfg = load_run_config(config, *overrides, **fields)
    if pretrained is not None and not isinstance(pretrained, ray.train.Checkpoint):
        pretrained = checkpoint_argument(pretrained, "pretrain", "pretrained")
    if checkpoint is not None and not isinstance(checkpoint, ray.train.Checkpoint):
        checkpoint = checkpoint_argument(checkpoint, "finetune", "checkpoint")
    return run_pipeline(cfg, stages, resume=resume, overwrite=overwrite, pretrained=pretrained, finetuned=checkpoint)


def run(config: str | Path | RunConfig, *overrides: str, resume: bool = False, overwrite: bool = False,
        **fields: Any) -> dict[str, Any]:
    """``mimir run``: pre-train, fine-tune, evaluate; returns ``results.json``'s record."""
    return _stages(("pretrain", "finetune", "evaluate"), config, overrides, fields, resume=resume, overwrite=overwrite)


def pretrain(config: str | Path | RunConfig, *overrides: str, resume: bool = False, overwrite: bool = False,
             **fields: Any) -> dict[str, Any]:
    """``mimir pretrain``: MIMIR pre-training only."""
    return _stages(("pretrain",), config, overrides, fields, resume=resume, overwrite=overwrite)


def finetune(config: str | Path | RunConfig, *overrides: str, pretrained: CheckpointArgument = None,
             resume: bool = False, overwrite: bool = False, **fields: Any) -> dict[str, Any]:
    """``mimir finetune``: fine-tuning from ``pretrained`` (default: the pre-training in output_dir)."""
    return _stages(("finetune",), config, overrides, fields, resume=resume, overwrite=overwrite, pretrained=pretrained)


def evaluate(config: str | Path | RunConfig, *overrides: str, checkpoint: CheckpointArgument = None,
             resume: bool = False, overwrite: bool = False, **fields: Any) -> dict[str, Any]:
    """``mimir evaluate``: the config's attacks on ``checkpoint`` (default: the run's fine-tuning)."""
    return _stages(("evaluate",), config, overrides, fields, resume=resume, overwrite=overwrite, checkpoint=checkpoint)


def sweep(spec: str | Path, *overrides: str, out: str | Path | None = None, storage: str | None = None,
          resume: bool = False, tiny: bool = False, max_concurrent: int | None = None, **fields: Any) -> dict[str, Any]:
    """``mimir sweep``: runs the spec's trials (``tiny``: its tiny variant on the digits; ``max_concurrent``
    at once instead of the spec's number) and writes its tables; returns the experiment folder, the
    Markdown table and every finished trial's results record."""
    from mimir.report import collect_trials, write_reports
    from mimir.spec import load_spec
    from mimir.sweeps import run_sweep

    experiment = run_sweep(spec, _overrides(overrides, fields), out=str(out) if out else None, storage_url=storage,
                           resume=resume, tiny=tiny, max_concurrent=max_concurrent)
    loaded, _ = load_spec(spec, tiny=tiny)
    return {"experiment": str(experiment), "table": write_reports(loaded, experiment),
            "trials": collect_trials(experiment)}


def load_classifier(run: str | Path, which: str | None = None, device: str | torch.device = "cpu") -> Classifier:
    """The fine-tuned classifier of a run folder (or a fine-tuning checkpoint folder), in eval mode,
    taking [0, 1] images. ``which``: ``best`` or ``last`` (default: the one evaluation used)."""
    from mimir.evaluation import load_classifier as load_weights_into_classifier
    from mimir.export import checkpoint_directory, find_checkpoint

    with checkpoint_directory(find_checkpoint(run, "finetune", which), "finetune") as (directory, state):
        model = load_weights_into_classifier(directory, RunConfig.model_validate(state["config"]), device)
    return model.eval()
