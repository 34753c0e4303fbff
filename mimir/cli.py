"""mimir: MIMIR, masked adversarial pre-training of vision transformers with a mutual-information
penalty (Xu et al.), then adversarial fine-tuning and robustness evaluation, on Ray.

One machine or a Ray cluster, the same commands:
  mimir run configs/quickstart.yaml          pre-train, fine-tune and evaluate (bundled digits, CPU)
  mimir sweep tune/table7_estimator.yaml     a Ray Tune + Optuna sweep and its paper-shaped table
  mimir submit -- mimir run CONFIG           the same as a Ray job on a cluster

Every command takes key=value overrides of the config (pretrain.epochs=2). Each subcommand's
--help answers without starting Ray or importing torch.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mimir.version import __version__
from mimir.console import set_verbose
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


def _stage_command(args: argparse.Namespace) -> int:
    from mimir import api

    options: dict[str, Any] = {}
    if getattr(args, "pretrained", None):
        options["pretrained"] = api.checkpoint_argument(args.pretrained, "pretrain", "--pretrained")
    if getattr(args, "checkpoint", None):
        options["checkpoint"] = api.checkpoint_argument(args.checkpoint, "finetune", "--checkpoint")
    if args.dry_run:
        stages = ("pretrain", "finetune", "evaluate") if args.command == "run" else (args.command,)
        for line in api.dry_run(stages, args.config, *args.overrides, resume=args.resume, overwrite=args.overwrite,
                                **options):
            print(line)
        print("dry run: every check passed; nothing was trained")
        return 0
    command = getattr(api, args.command)  # run, pretrain, finetune or evaluate
    results = command(args.config, *args.overrides, resume=args.resume, overwrite=args.overwrite, **options)
    print(format_results(results))
    print(f"results: {Path(results['config']['output_dir']) / 'results.json'}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from mimir.data.format import default_data_dir
    from mimir.data.sources import prepare_dataset

    out = Path(args.out) if args.out else default_data_dir()
    path = prepare_dataset(args.name, args.source, out, download=args.download, overwrite=args.overwrite,
                           name_as=args.name_as)
    print(f"prepared {args.name} -> {path}")
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from mimir.config import DataConfig
    from mimir.data.format import verify_dataset
    from mimir.data.pipeline import resolve_dataset

    path = resolve_dataset(DataConfig(dataset=args.name, root=args.root))
    verify_dataset(path, hashes=True)
    print(f"{path}: every shard is whole and as written")
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    """``mimir sweep`` (and ``mimir reproduce`` on each spec): the plan with --plan, else the sweep."""
    if args.plan:
        from mimir.plan import show_plan

        return show_plan(args.spec, args.overrides, out=args.out, tiny=args.tiny, costs=args.costs,
                         cluster=args.cluster, max_concurrent=args.max_concurrent)
    from mimir import api

    result = api.sweep(args.spec, *args.overrides, out=args.out, storage=args.storage, resume=args.resume,
                       tiny=args.tiny, max_concurrent=args.max_concurrent)
    print(result["table"])
    print(f"experiment: {result['experiment']}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from mimir.report import write_reports
    from mimir.spec import experiment_dir, load_spec

    spec, _ = load_spec(args.spec, tiny=args.tiny)
    experiment = experiment_dir(spec, args.out)
    if not experiment.is_dir():
        raise FileNotFoundError(f"no sweep results in {experiment}; run `mimir sweep {args.spec}` first")
    print(write_reports(spec, experiment))
    print(f"written: {experiment}/table.md, table.csv, table.tex")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    import yaml

    from mimir.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    return 0


def _module_doc(module: str) -> str:
    """A module's docstring, read from its source without importing it (most import torch)."""
    spec = importlib.util.find_spec(module)
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


def load_handler(target: str) -> Callable[[argparse.Namespace], int]:
    """``"module:function"`` imported when the command runs, so that ``--help`` stays fast."""
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value
    return parse


_positive = _at_least(1)
BENCH_METHODS = ("mae", "mimir", "mimir_renyi", "adv_mae_1", "adv_mae_10", "fast_at", "pgd10_at")  # bench.METHODS


def _add_bench_parser(sub: Any, verbosity: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", help="time MAE, MIMIR, FastAT and PGD-10 AT steps (Table 10 as ratios)",
                       parents=[verbosity], description=_module_doc("mimir.bench"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every method, e.g. model.embed_dim=64 model.depth=4")
    p.add_argument("--config", help="time the model, image size and precision of this run config (a path or a bundled "
                                     "name such as quickstart; its pre-training batch is the default --batch): "
                                     "`mimir sweep --plan --costs` prices that config's trials from the report")
    p.add_argument("--arch", help="encoder architecture (default vit_tiny, or --config's)")
    p.add_argument("--img-size", type=_positive, help="default 32, or --config's")
    p.add_argument("--patch-size", type=_positive, help="default 2, or --config's")
    p.add_argument("--batch", type=_positive, help="images per step, every method (default 512, or --config's "
                                                   "pre-training batch)")
    p.add_argument("--steps", type=_positive, default=3, help="timed steps per method and round")
    p.add_argument("--rounds", type=_positive, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=_at_least(0), default=1, help="untimed steps per method before round 1")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when there is one")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--methods", help=f"comma list of {', '.join(BENCH_METHODS)} (default all; mae and mimir are "
                                     "always timed; with --compile: mimir and these, default mae,mimir)")
    p.add_argument("--out", default="bench.json", help="JSON report path")
    p.add_argument("--ray", action="store_true",
                   help="also measure Ray Train + Ray Data overhead on a small digits pre-training")
    p.add_argument("--ray-epochs", type=_at_least(2), default=3, help="epochs of the --ray pre-training (>= 2)")
    p.add_argument("--ray-batch", type=_positive, default=128, help="batch size of the --ray pre-training")
    p.add_argument("--data", action="store_true",
                   help="instead of steps: images/s of the ImageNet training transform through Ray Data per CPU "
                        "against a bare PIL + torchvision loop, and the CPUs per GPU that keep a GPU fed")
    p.add_argument("--data-images", type=_positive, default=1024, help="synthetic JPEGs for --data (default 1024)")
    p.add_argument("--data-epochs", type=_positive, default=3, help="timed epochs per side for --data (default 3)")
    p.add_argument("--data-cpus", type=_positive, help="CPUs of the local Ray for --data (default: all but one, which the consumer "
                                                  "takes as a training worker would)")
    p.add_argument("--data-dir", help="a prepared JPEG dataset to time with --data instead of synthetic images")
    p.add_argument("--compile", action="store_true",
                   help="time each method eager against torch.compile'd (scaling.compile), alternating, after "
                        "checking their losses agree (default methods: mae, mimir)")
    p.set_defaults(handler="mimir.bench:main")


def _add_mi_scale_parser(sub: Any) -> None:
    p = sub.add_parser("mi-scale", help="the MI penalty's share of the encoder gradient per estimator",
                       description=_module_doc("mimir.mi_scale"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config YAML (configs/...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pretrain.mi.weight=1e-3")
    p.add_argument("--checkpoint", help="pre-training checkpoint folder to measure (default: random init)")
    p.set_defaults(handler="mimir.mi_scale:main")


SURFACE_INPUTS = ("natural", "adversarial")  # surface.InputKind


def _surface_inputs(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SURFACE_INPUTS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(SURFACE_INPUTS)}, got {text!r}")
    return kinds


def _add_surface_parser(sub: Any, verbosity: argparse.ArgumentParser) -> None:
    # an option left out takes surface.SurfaceSettings' default, which its help names (test_surface)
    p = sub.add_parser("surface", help="loss surface around a fine-tuned model (Eq. 23, Figure 5) as CSV and PNG",
                       parents=[verbosity], description=_module_doc("mimir.surface"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (output_dir of mimir run) or fine-tuning checkpoint folder")
    p.add_argument("--out", help="folder to write (default RUN/surface)")
    p.add_argument("--steps", type=_at_least(2), help="grid points per axis (default 51)")
    p.add_argument("--span", type=float, help="alpha and beta run over [-span, span] (default 1)")
    p.add_argument("--images", type=_positive, help="the first N test images (default 1000)")
    p.add_argument("--inputs", type=_surface_inputs,
                   help="natural, adversarial or both, comma-separated (default both)")
    p.add_argument("--attack-steps", type=_positive,
                   help="PGD steps of the adversarial loss, at the run's evaluate.eps and step_size (default 10)")
    p.add_argument("--seed", type=int, help="fixes the two directions and the attack starts (default 123)")
    p.add_argument("--checkpoint", choices=("best", "last"),
                   help="which fine-tuning checkpoint (default: the one evaluation used)")
    p.add_argument("--workers", type=_positive, help="chunk tasks at once (default: what the Ray cluster fits)")
    p.set_defaults(handler="mimir.surface:main")


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    """What ``mimir sweep`` and ``mimir reproduce`` both take."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides for every trial")
    p.add_argument("--out", help="experiment folder (default results/sweeps/<spec name>)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite in the experiment folder)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--tiny", action="store_true",
                   help="the spec's tiny variant: the same rows on the digits, small model, one epoch per stage")
    p.add_argument("--max-concurrent", type=_positive, metavar="N",
                   help="trials at once (default: the spec's max_concurrent), for a cluster that has room for more")
    p.add_argument("--plan", action="store_true",
                   help="run nothing: print the trials, the pre-trainings they share, their resources against "
                        "the cluster, and the estimated GPU-hours and wall time")
    p.add_argument("--cluster", metavar="FILE", help="with --plan: a Ray cluster launcher YAML or KubeRay "
                   "RayCluster / RayJob to check the resources against (default: the cluster RAY_ADDRESS names)")
    p.add_argument("--costs", metavar="BENCH_JSON", nargs="+",
                   help="with --plan: price the trials from `mimir bench --config CONFIG --out` reports of your "
                        "hardware, each for the model, image size, precision and device it measured (a report "
                        "for another is refused); default: GPU trials from the paper's Table 10 (RTX A6000), "
                        "CPU trials not priced")
    p.set_defaults(handler=run_sweep_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimir", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mimir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="show Ray's own logs too (by default only mimir's lines, Ray's warnings and errors)")

    def stage(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=[verbosity])
        p.add_argument("config", help="run config YAML (configs/...)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pretrain.epochs=2")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true", help="continue an interrupted run in output_dir")
        mode.add_argument("--overwrite", action="store_true",
                          help="replace the stages in output_dir that this run trains (a changed config)")
        p.add_argument("--dry-run", action="store_true",
                       help="check everything the run needs (config, dataset, output_dir, accelerator, memory) "
                            "and say what each stage would do; train nothing")
        p.set_defaults(handler=_stage_command)
        return p

    stage("run", "pre-train, fine-tune and evaluate")
    stage("pretrain", "MIMIR pre-training only")
    stage("finetune", "adversarial fine-tuning only").add_argument(
        "--pretrained", help="pre-training checkpoint (default: the one in output_dir)")
    stage("evaluate", "robustness evaluation only").add_argument(
        "--checkpoint", help="fine-tuned checkpoint (default: the one in output_dir)")

    sweep = sub.add_parser("sweep", help="Ray Tune + Optuna sweep from a tune/*.yaml spec, then its table",
                           parents=[verbosity])
    sweep.add_argument("spec", help="sweep spec YAML (tune/...)")
    _add_sweep_options(sweep)
    table = sub.add_parser("table", help="the paper-shaped table of a (partly) finished sweep")
    table.add_argument("spec", help="sweep spec YAML (tune/...)")
    table.add_argument("--out", help="experiment folder (default results/sweeps/<spec name>)")
    table.add_argument("--tiny", action="store_true", help="the table of the spec's tiny variant")
    table.set_defaults(handler=_table)
    reproduce = sub.add_parser("reproduce", help="a table or figure of the paper: mimir sweep on its spec",
                               parents=[verbosity], description=_module_doc("mimir.reproduce"),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    reproduce.add_argument("name", nargs="?", help="table2, table3, ..., figure4 (see --list)")
    reproduce.add_argument("--list", action="store_true",
                           help="every table and figure with its spec and planned cost on the paper's hardware")
    _add_sweep_options(reproduce)
    reproduce.set_defaults(handler="mimir.reproduce:main")

    config = sub.add_parser("config", help="show the resolved config").add_subparsers(dest="config_command",
                                                                                       required=True)
    show = config.add_parser("show", help="print the validated config, every default filled in, as YAML")
    show.add_argument("config", help="run config YAML (configs/...)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pretrain.epochs=2")
    show.set_defaults(handler=_config_show)

    export = sub.add_parser("export", help="a run's encoder or classifier as timm weights (model.safetensors + config.json)",
                            description=_module_doc("mimir.export"), formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run", help="run folder (output_dir of mimir run) or checkpoint folder")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--stage", choices=("pretrain", "finetune"), default="finetune",
                        help="the pre-trained encoder or the fine-tuned classifier (default)")
    export.add_argument("--checkpoint", choices=("best", "last"),
                        help="which fine-tuning checkpoint (default: the one evaluation uses, evaluate.checkpoint)")
    export.set_defaults(handler="mimir.export:main")

    runs = sub.add_parser("runs", help="the runs under a folder: status, stages done, accuracies, how far "
                                       "validation moved over the last quarter, wall time")
    runs.add_argument("folder", help="a folder holding run folders (results/, a sweep's experiment folder)")
    runs.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    runs.add_argument("--fixed-costs", action="store_true",
                      help="per run and stage, the wall time outside the computation: the stage's start, its first "
                           "batch, later data waits, checkpoints and reports between epochs, teardown")
    runs.set_defaults(handler="mimir.runs:main")
    compare = sub.add_parser("compare", help="the config fields in which runs differ, and their results")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each holds config.json)")
    compare.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    compare.set_defaults(handler="mimir.runs:main")
    plot = sub.add_parser("plot", help="training curves of a run or a sweep as a PNG",
                          description=_module_doc("mimir.plot"), formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("path", help="run folder (output_dir) or sweep experiment folder")
    plot.add_argument("--out", help="PNG to write (default PATH/curves.png)")
    plot.set_defaults(handler="mimir.plot:main")

    add_submit_parser(sub)
    _add_surface_parser(sub, verbosity)
    _add_bench_parser(sub, verbosity)
    _add_mi_scale_parser(sub)

    data = sub.add_parser("data", help="dataset conversion").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="convert a dataset to Parquet shards once")
    prepare.add_argument("name", help="cifar10, tiny-imagenet, imagenet, generated or digits")
    prepare.add_argument("--source", help="archive, folder or .npz to convert")
    prepare.add_argument("--out", help="folder of prepared datasets (default $MIMIR_DATA_DIR or ~/.cache/mimir/datasets)")
    prepare.add_argument("--name-as", help="folder name for the prepared dataset")
    prepare.add_argument("--download", action="store_true", help="fetch CIFAR-10 first (needs a network)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    prepare.set_defaults(handler=_data_prepare)
    verify = data.add_parser("verify", help="check every shard of a prepared dataset against the sizes and "
                                            "SHA-256 its manifest recorded (a run checks sizes always, hashes up to 2 GiB)")
    verify.add_argument("name", help="a prepared dataset's name or folder")
    verify.add_argument("--root", help="folder of prepared datasets (default $MIMIR_DATA_DIR or ~/.cache/mimir/datasets)")
    verify.set_defaults(handler=_data_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    from mimir.errors import USER_ERRORS, Interrupted, NonFiniteRun

    handler = load_handler(args.handler) if isinstance(args.handler, str) else args.handler
    received: list[Interrupted] = []
    try:
        with stop_on_signals(received):
            return handler(args)
    except USER_ERRORS as err:
        print(f"mimir: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteRun as err:
        print(f"mimir: error: {err}; no results were written (see failed.json). The paper reran such "
              f"runs with a ten times smaller learning rate ({err.stage}.blr)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # ours, or the one Ray raises in its place inside ray.get
        stop = err if isinstance(err, Interrupted) else (received or [Interrupted("SIGINT", 130)])[0]
        print(f"mimir: stopped by {stop.signal_name}. Finished stages and the checkpoints registered before it are "
              "kept; the same command with --resume continues from them", file=sys.stderr)
        return stop.code


@contextlib.contextmanager
def stop_on_signals(received: list[Any]) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice before it preempts a job) raise Interrupted
    in the main thread, so the command unwinds: Ray Train's workers stop with the driver, a
    checkpoint being written when the signal came is never registered (a resume ignores it), the
    stages finished before stay finished. A second signal, also while Ray shuts down after the
    command returned, exits at once. ``received`` collects the signal (as Interrupted): Ray's
    ``ray.get`` raises a KeyboardInterrupt of its own in place of the handler's exception."""
    from mimir.errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received:
            print(f"mimir: {name} again: aborting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        received.append(Interrupted(name, 128 + signum))
        print(f"mimir: {name} received: stopping (send it again to abort at once)", file=sys.stderr, flush=True)
        raise received[0]

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if not received:  # after one, the process is ending: the next must still abort it
            for signum, handler in previous.items():
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
