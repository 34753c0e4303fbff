"""The ``mimir`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mimir.config import ConfigError, load_config
from mimir.bench import add_parser as add_bench_parser
from mimir.mi_scale import add_parser as add_mi_scale_parser
from mimir.submit import add_parser as add_submit_parser

ATTACK_TITLES = {"natural": "Natural", "pgd10": "PGD-10", "pgd20": "PGD-20", "pgd100": "PGD-100", "autoattack": "AutoAttack",
                 "pgd_mi": "PGD-MI", "pgd_feature": "PGD-feature"}


def format_results(results: dict[str, Any]) -> str:
    """A small Markdown table of the accuracies (%) and stage times in ``results.json``."""
    lines = []
    if "accuracy" in results:
        names = list(results["accuracy"])
        lines += ["| " + " | ".join(ATTACK_TITLES.get(n, n) for n in names) + " |",
                  "|" + "---|" * len(names),
                  "| " + " | ".join(f"{results['accuracy'][n]:.2f}" for n in names) + " |",
                  f"({results['num_images']} test images, accuracy in %)"]
    times = ", ".join(f"{stage} {sec:.0f} s" for stage, sec in results.get("seconds", {}).items())
    if times:
        lines.append(f"time: {times}")
    return "\n".join(lines)


def _stage_command(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    from mimir import runner

    cfg = load_config(args.config, args.overrides)
    pretrained = finetuned = None
    if getattr(args, "pretrained", None):
        pretrained = _checkpoint(args.pretrained, "pretrain", "--pretrained")
    if getattr(args, "checkpoint", None):
        finetuned = _checkpoint(args.checkpoint, "finetune", "--checkpoint")
    results = runner.run_pipeline(cfg, stages, resume=args.resume, overwrite=args.overwrite,
                                  pretrained=pretrained, finetuned=finetuned)
    print(format_results(results))
    print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return 0


def _checkpoint(path: str, stage: str, option: str) -> Any:
    """A checkpoint folder of ``stage``, checked here (local paths) before Ray or any data starts."""
    import ray.train

    from mimir.train.checkpoint import load_state

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
    return ray.train.Checkpoint(path if "://" in path else str(Path(path).resolve()))


def _data_prepare(args: argparse.Namespace) -> int:
    from mimir.data.format import default_data_dir
    from mimir.data.sources import prepare_dataset

    out = Path(args.out) if args.out else default_data_dir()
    path = prepare_dataset(args.name, args.source, out, download=args.download, overwrite=args.overwrite,
                           name_as=args.name_as)
    print(f"prepared {args.name} -> {path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mimir.report import write_reports
    from mimir.sweep import load_spec, run_sweep

    experiment = run_sweep(args.spec, args.overrides, out=args.out, storage_url=args.storage, resume=args.resume)
    spec, _ = load_spec(args.spec)
    print(write_reports(spec, experiment))
    print(f"experiment: {experiment}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from mimir.report import write_reports
    from mimir.sweep import experiment_dir, load_spec

    spec, _ = load_spec(args.spec)
    experiment = experiment_dir(spec, args.out)
    if not experiment.is_dir():
        raise FileNotFoundError(f"no sweep results in {experiment}; run `mimir sweep {args.spec}` first")
    print(write_reports(spec, experiment))
    print(f"written: {experiment}/table.md, table.csv, table.tex")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="run config YAML (configs/...)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pretrain.epochs=2")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true", help="continue an interrupted run in output_dir")
        mode.add_argument("--overwrite", action="store_true",
                          help="replace the stages in output_dir that this run trains (a changed config)")
        return p

    stage("run", "pre-train, fine-tune and evaluate").set_defaults(stages=("pretrain", "finetune", "evaluate"))
    stage("pretrain", "MIMIR pre-training only").set_defaults(stages=("pretrain",))
    finetune = stage("finetune", "adversarial fine-tuning only")
    finetune.add_argument("--pretrained", help="pre-training checkpoint (default: the one in output_dir)")
    finetune.set_defaults(stages=("finetune",))
    evaluate = stage("evaluate", "robustness evaluation only")
    evaluate.add_argument("--checkpoint", help="fine-tuned checkpoint (default: the one in output_dir)")
    evaluate.set_defaults(stages=("evaluate",))

    sweep = sub.add_parser("sweep", help="Ray Tune + Optuna sweep from a tune/*.yaml spec, then its table")
    sweep.add_argument("spec", help="sweep spec YAML (tune/...)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides for every trial")
    sweep.add_argument("--out", help="experiment folder (default results/sweeps/<spec name>)")
    sweep.add_argument("--storage", help="Optuna storage URL (default sqlite in the experiment folder)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    sweep.set_defaults(handler=_sweep)
    table = sub.add_parser("table", help="the paper-shaped table of a (partly) finished sweep")
    table.add_argument("spec", help="sweep spec YAML (tune/...)")
    table.add_argument("--out", help="experiment folder (default results/sweeps/<spec name>)")
    table.set_defaults(handler=_table)

    add_submit_parser(sub)
    add_bench_parser(sub)
    add_mi_scale_parser(sub)

    data = sub.add_parser("data", help="dataset conversion").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="convert a dataset to Parquet shards once")
    prepare.add_argument("name", help="cifar10, tiny-imagenet, imagenet, generated or digits")
    prepare.add_argument("--source", help="archive, folder or .npz to convert")
    prepare.add_argument("--out", help="folder of prepared datasets (default $MIMIR_DATA_DIR or ~/.cache/mimir/datasets)")
    prepare.add_argument("--name-as", help="folder name for the prepared dataset")
    prepare.add_argument("--download", action="store_true", help="fetch CIFAR-10 first (needs a network)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    prepare.set_defaults(handler=_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mimir.data.format import DatasetError
    from mimir.runner import NonFiniteRun, StageExistsError

    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "stages"):
            return _stage_command(args, args.stages)
        return args.handler(args)
    except (ConfigError, DatasetError, StageExistsError, FileNotFoundError) as err:
        print(f"mimir: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteRun as err:
        print(f"mimir: error: {err}; no results were written (see failed.json). The paper reran such "
              f"runs with a ten times smaller learning rate ({err.stage}.blr)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
