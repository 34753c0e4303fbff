"""``mimir bench``: the paper's Table 10 (time per epoch of MAE, MIMIR, FastAT and PGD-10 AT) as ratios,
with MIMIR's I_alpha variant and Adv-MAE (1 and 10 attack steps) beside them.

Every method is a real training step (forward, attack, backward, optimizer) of the same encoder and
config on random [0, 1] images, timed in one process and interleaved: each round runs ``steps``
steps of every method, in an order rotated per round, so drift of the machine (clock, caches, other
load) spreads over all methods instead of biasing one. Absolute seconds depend on the hardware; the
ratios to MIMIR are what compare with the paper, whose per-epoch times at one dataset size are
proportional to the per-image times measured here. Besides the methods, it times the MI penalty
alone (the authors' normalized-CCA HSIC and I_alpha with their gradients, at the batch's latent
shape) and MIMIR's 1-step attack alone, the two parts of a MIMIR step that a MAE step does not have.

``--ray`` also runs a small pre-training through Ray Train + Ray Data and as a bare loop over
in-memory tensors, and reports the per-epoch time ratio as ``ray_overhead``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimir.config import RunConfig, build_config, deep_merge, find_file, load_config, parse_overrides
from mimir.errors import ConfigError
from mimir.memory import (MeasuredStep, check_memory, estimate_memory, fixed_batch, memory_kind, stage_step,
                          step_memory_mb)
from mimir.mi import MIPenalty
from mimir.models import build_mae
from mimir.seeding import stream_seed
from mimir.train.steps import (Precision, compile_forward, lr_at, mi_gradient_share, pretrain_adversary,
                               pretrain_optimizer, pretrain_step, set_lr)

NUM_CLASSES = 10
REFERENCE = "mimir"  # ratios are to this method's median step time
ONE_STEP = {"steps": 1, "eps": "8/255", "step_size": "10/255"}  # MIMIR's pre-training attack
# name -> (stage, config overrides on top of the shared config)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "mae": ("pretrain", {"pretrain": {"attack": {"steps": 0}, "mi": {"estimator": "none"}}}),
    "mimir": ("pretrain", {"pretrain": {"attack": ONE_STEP, "mi": {"estimator": "hsic_cca", "weight": 1e-5}}}),
    "mimir_renyi": ("pretrain", {"pretrain": {"attack": ONE_STEP, "mi": {"estimator": "renyi", "weight": 1e-5}}}),
    "adv_mae_1": ("pretrain", {"pretrain": {"attack": ONE_STEP, "mi": {"estimator": "none", "weight": 0.0}}}),
    "adv_mae_10": ("pretrain", {"pretrain": {"attack": {"steps": 10, "eps": "8/255", "step_size": "2/255"},
                                             "mi": {"estimator": "none", "weight": 0.0}}}),
    "fast_at": ("finetune", {"finetune": {"method": "fast", "attack": {"eps": "8/255"}}}),
    "pgd10_at": ("finetune", {"finetune": {"method": "pgd", "attack": {"steps": 10, "eps": "8/255",
                                                                        "step_size": "2/255"}}}),
}
# Table 10, ViT-S on CIFAR-10, seconds per epoch on 4 A6000 GPUs
PAPER_SECONDS = {"pgd10_at": 149.3, "fast_at": 43.3, "mae": 16.1, "mimir": 18.4}
# the MI penalty estimators whose cost alone is measured on the latent shapes
MI_PROBES = {"mimir": "hsic_cca", "mimir_renyi": "renyi"}
ATTACK_PROBE = "attack:reconstruction"
TARGETS = {"mimir_over_mae": 1.15, "mimir_over_pgd10_at": 0.2, "hsic_over_mae": 0.10}


def main(args: argparse.Namespace) -> int:
    """``mimir bench`` handler: run, print the table, write the JSON report."""
    if getattr(args, "data", False):
        from mimir.data.bench import format_data_table, run_data_bench

        # every core but the consumer's (it stands in for the training worker and its own CPUs)
        cpus = args.data_cpus or max((os.cpu_count() or 2) - 1, 1)
        report = run_data_bench(args.data_images, args.data_epochs, cpus, args.data_dir)
        print(format_data_table(report))
    elif getattr(args, "compile", False):
        report = run_compile_bench(args)
        print(format_compile_table(report))
    else:
        report = run_bench(args)
        print(format_table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")
    return 0


# -- configs ------------------------------------------------------------------------------------
SHAPE_DEFAULTS = {"arch": "vit_tiny", "img_size": 32, "patch_size": 2, "batch": 512}


def _base_raw(args: argparse.Namespace) -> dict[str, Any]:
    """What every method shares: the model, image size and precision of ``--config`` (a run config,
    whose pre-training batch is the default batch) or of the flags; a flag given explicitly wins.
    The resolved values are written back into ``args``, so the report names them."""
    raw: dict[str, Any] = {}
    if args.config:
        cfg = load_config(find_file("configs", args.config))
        raw = {"data": {"img_size": cfg.data.img_size}, "model": cfg.model.model_dump(mode="json"),
               "scaling": {"precision": cfg.scaling.precision}}
        given = {"arch": cfg.model.arch, "img_size": cfg.data.img_size, "patch_size": cfg.model.patch_size,
                 "batch": cfg.pretrain.batch_size, "precision": cfg.scaling.precision}
        for name, value in given.items():
            if getattr(args, name) in (None, "auto"):
                setattr(args, name, value)
    for name, value in SHAPE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    raw = deep_merge(raw, {"data": {"img_size": args.img_size},
                           "model": {"arch": args.arch, "patch_size": args.patch_size},
                           "pretrain": {"batch_size": args.batch},
                           "finetune": {"batch_size": args.batch},
                           "scaling": {"precision": args.precision, "use_gpu": args.device == "cuda"}})
    return deep_merge(raw, parse_overrides(args.overrides))


def method_config(raw: dict[str, Any], method: str) -> RunConfig:
    return build_config(raw, METHODS[method][1], source=f"bench method {method}")


def _named(methods: str) -> list[str]:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return names


def _selected(methods: str | None) -> list[str]:
    """The methods to time, in table order; None means all."""
    if methods is None:
        return list(METHODS)
    return [m for m in METHODS if m in {"mae", REFERENCE, *_named(methods)}]  # table order


def _device(args: argparse.Namespace) -> torch.device:
    """``--device``, with ``auto`` resolved (and written back, so the report names it)."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    return torch.device(args.device)


# -- timing -------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def _mi_probe(estimator_name: str, cfg: RunConfig, images: torch.Tensor,
              device: torch.device) -> tuple[MeasuredStep, list[int]]:
    """The MI penalty alone on (x + delta, z) of this config's latent shape: estimate and its gradient
    with respect to z (x + delta carries none in a pre-training step). Returns it and z's shape."""
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    mae = build_mae(cfg).to(device)
    with torch.no_grad():
        _, latent = mae(images, mae.sample_keep(images.shape[0], device))
    latent = latent.float().requires_grad_(True)
    penalty = MIPenalty.from_config(cfg.pretrain.mi.model_copy(update={"estimator": estimator_name, "weight": 1.0}))
    return MeasuredStep(lambda: torch.autograd.grad(penalty(images, images, latent), latent), []), list(latent.shape)


def _attack_probe(cfg: RunConfig, images: torch.Tensor, device: torch.device) -> MeasuredStep:
    """MIMIR's pre-training attack alone (its forward and the gradient to the input), the part of a
    MIMIR step that MAE does not have besides the MI penalty."""
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    mae = build_mae(cfg).to(device).train()
    keep = mae.sample_keep(images.shape[0], device)
    precision = Precision.create(cfg.scaling.precision, device)
    return MeasuredStep(lambda: pretrain_adversary(mae, images, keep, cfg.pretrain, precision), [])  # as in the step


def _summary(seconds: list[float]) -> dict[str, Any]:
    arr = np.asarray(seconds)
    return {"step_seconds": seconds, "median_s": float(np.median(arr)), "min_s": float(arr.min()),
            "max_s": float(arr.max()), "q25_s": float(np.percentile(arr, 25)),
            "q75_s": float(np.percentile(arr, 75))}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Time every selected method (and the MI penalty alone); returns the JSON report."""
    device = _device(args)
    raw = _base_raw(args)  # resolves args.img_size and args.batch
    methods = _selected(args.methods)
    configs = {m: method_config(raw, m) for m in methods}
    images, labels = fixed_batch(args.batch, args.img_size, device)

    check_memory({m: estimate_memory(METHODS[m][0], configs[m], device) for m in methods}, args.batch, device)
    timers = {m: stage_step(METHODS[m][0], configs[m], images, labels, device) for m in methods}
    probes = {MI_PROBES[m]: _mi_probe(MI_PROBES[m], configs[m], images, device) for m in methods if m in MI_PROBES}
    timers.update({f"mi:{name}": probe for name, (probe, _) in probes.items()})
    timers[ATTACK_PROBE] = _attack_probe(configs[REFERENCE], images, device)
    names = list(timers)
    for name in names:
        for _ in range(args.warmup):
            timers[name].step()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name] += [_timed(timers[name].step, device) for _ in range(args.steps)]
            print(f"[bench] round {r + 1}/{args.rounds} {name}: {np.median(seconds[name]):.3f} s/step", flush=True)

    results: dict[str, Any] = {}
    for m in methods:
        row = {"stage": METHODS[m][0], **_summary(seconds[m])}
        step_mb = step_memory_mb(timers[m].step, device)
        row.update(images_per_second=args.batch / row["median_s"], step_memory_mb=step_mb,
                   state_mb=timers[m].state_mb(),
                   peak_memory_mb=None if step_mb is None else step_mb + timers[m].state_mb())
        results[m] = row
    reference, mae_s = results[REFERENCE]["median_s"], results["mae"]["median_s"]
    for m, row in results.items():
        row["ratio_to_mimir"] = row["median_s"] / reference
        row["paper_seconds_per_epoch"] = PAPER_SECONDS.get(m)
        row["paper_ratio_to_mimir"] = PAPER_SECONDS[m] / PAPER_SECONDS[REFERENCE] if m in PAPER_SECONDS else None
    mi_only = {name: {**_summary(seconds[f"mi:{name}"]), "x_shape": list(images.shape), "z_shape": z_shape,
                      "ratio_to_mae_step": float(np.median(seconds[f"mi:{name}"])) / mae_s}
               for name, (_, z_shape) in probes.items()}
    attack_s = float(np.median(seconds[ATTACK_PROBE]))
    attack_only = {**_summary(seconds[ATTACK_PROBE]), "ratio_to_mae_step": attack_s / mae_s}
    measured = {"mimir_over_mae": reference / mae_s,
                "mimir_over_pgd10_at": reference / results["pgd10_at"]["median_s"] if "pgd10_at" in results else None,
                "hsic_over_mae": mi_only["hsic_cca"]["ratio_to_mae_step"]}
    # the MI penalty inside a whole step: MIMIR against the same step without it (Adv-MAE, 1 step)
    mi_in_step = reference / results["adv_mae_1"]["median_s"] - 1.0 if "adv_mae_1" in results else None
    report: dict[str, Any] = {
        "arguments": {k: v for k, v in vars(args).items() if k != "handler"},
        "machine": _machine(device),
        "config": configs[REFERENCE].model_dump(mode="json"),
        "memory_kind": memory_kind(device),
        "methods": results,
        "attack_and_mi_overhead": reference / mae_s - 1.0,
        "mi_overhead_in_step": mi_in_step,
        "mi_only": mi_only,
        "attack_only": attack_only,
        "targets": {k: {"value": v, "target": TARGETS[k], "met": None if v is None else v <= TARGETS[k]}
                    for k, v in measured.items()},
    }
    if args.ray:
        report["ray"] = measure_ray_overhead(raw, args.ray_epochs, args.ray_batch, device)
    return report


# -- compiled against eager -----------------------------------------------------------------------
COMPILE_CHECK_STEPS = 3
# largest loss difference allowed between eager and compiled steps, by autocast dtype: in fp32 the
# two differ by summation order alone; in bf16 / fp16 compiled kernels round where eager ones do not
# (on an H200, 2.8e-3 in bf16 for MIMIR at batch 256, about what bf16 itself moves the loss from fp32)
COMPILE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}
COMPILE_TARGET = 1.25  # the MIMIR step's speed-up to reach


def _seeded_losses(timed: MeasuredStep, steps: int) -> list[float]:
    """The losses of ``steps`` steps, each drawing its mask and attack start from a fixed seed."""
    losses = []
    for i in range(steps):
        torch.manual_seed(stream_seed(0, "step", epoch=i))
        losses.append(float(timed.step()["loss"]))
    return losses


def run_compile_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``mimir bench --compile``: each method eager and under ``torch.compile`` (``scaling.compile``),
    from the same initialization. First both run :data:`COMPILE_CHECK_STEPS` seeded steps whose losses
    must agree to :data:`COMPILE_TOLERANCE` at the steps' precision (the compiled side's first steps
    include compiling), then rounds of steps alternate between the two."""
    import torch._inductor.config as inductor_config

    device = _device(args)
    # random ops inside a compiled forward (drop path) draw as eager ones do, so losses can agree
    inductor_config.fallback_random = True
    raw = _base_raw(args)
    # MIMIR (the target's method) and the ones asked for; MAE beside it by default
    methods = [m for m in METHODS if m in {REFERENCE, *_named(args.methods)}] if args.methods else ["mae", REFERENCE]
    configs = {m: method_config(raw, m) for m in methods}
    images, labels = fixed_batch(args.batch, args.img_size, device)
    check_memory({m: estimate_memory(METHODS[m][0], configs[m], device) for m in methods}, args.batch, device)
    dtype = Precision.create(args.precision, device).dtype
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    tolerance = COMPILE_TOLERANCE[precision]

    results: dict[str, Any] = {}
    for m in methods:
        eager = stage_step(METHODS[m][0], configs[m], images, labels, device)
        compiled = stage_step(METHODS[m][0], configs[m], images, labels, device)
        for module in compiled.modules:
            compile_forward(module)
        eager_losses = _seeded_losses(eager, COMPILE_CHECK_STEPS)
        started = time.perf_counter()
        compiled_losses = _seeded_losses(compiled, COMPILE_CHECK_STEPS)
        first_steps = time.perf_counter() - started
        difference = max(abs(a - b) for a, b in zip(eager_losses, compiled_losses))
        print(f"[bench] {m}: losses eager {eager_losses} compiled {compiled_losses} "
              f"(largest difference {difference:.2e}); first {COMPILE_CHECK_STEPS} compiled steps {first_steps:.1f} s",
              flush=True)
        seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
            for name in order:
                timed = eager if name == "eager" else compiled
                seconds[name] += [_timed(timed.step, device) for _ in range(args.steps)]
            print(f"[bench] round {r + 1}/{args.rounds} {m}: eager {np.median(seconds['eager']):.3f} s/step, "
                  f"compiled {np.median(seconds['compiled']):.3f} s/step", flush=True)
        eager_s, compiled_s = float(np.median(seconds["eager"])), float(np.median(seconds["compiled"]))
        results[m] = {"stage": METHODS[m][0], "eager": _summary(seconds["eager"]),
                      "compiled": _summary(seconds["compiled"]), "speedup": eager_s / compiled_s,
                      # the first steps less what they would have cost once compiled
                      "compile_seconds": first_steps - COMPILE_CHECK_STEPS * compiled_s,
                      "eager_losses": eager_losses, "compiled_losses": compiled_losses,
                      "largest_loss_difference": difference, "losses_match": difference <= tolerance}
    speedup = results[REFERENCE]["speedup"]
    return {"arguments": {k: v for k, v in vars(args).items() if k != "handler"}, "machine": _machine(device),
            "config": configs[REFERENCE].model_dump(mode="json"), "methods": results,
            "precision": precision, "tolerance": tolerance,
            "target": {"mimir_speedup": speedup, "target": COMPILE_TARGET, "met": speedup >= COMPILE_TARGET}}


def format_compile_table(report: dict[str, Any]) -> str:
    args, machine = report["arguments"], report["machine"]
    header = (f"{'method':<12} {'eager s/step':>12} {'compiled s/step':>15} {'speed-up':>8} {'compile s':>9} "
              f"{'loss diff':>9} {'same':>5}")
    lines = [f"mimir bench --compile: {args['arch']} img {args['img_size']} patch {args['patch_size']} batch "
             f"{args['batch']}, {args['rounds']} rounds x {args['steps']} steps alternating, {machine['device']} "
             f"({machine['torch_threads']} threads, torch {machine['torch']})", header, "-" * len(header)]
    for name, row in report["methods"].items():
        lines.append(f"{name:<12} {row['eager']['median_s']:>12.4f} {row['compiled']['median_s']:>15.4f} "
                     f"{row['speedup']:>8.3f} {row['compile_seconds']:>9.1f} {row['largest_loss_difference']:>9.1e} "
                     f"{'yes' if row['losses_match'] else 'NO':>5}")
    t = report["target"]
    lines.append(f"losses of {COMPILE_CHECK_STEPS} seeded steps from the same initialization, eager vs compiled, "
                 f"must agree to {report['tolerance']:g} in {report['precision']}")
    lines.append(f"target MIMIR compiled speed-up >= {t['target']}: {t['mimir_speedup']:.3f} "
                 f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


# -- Ray overhead --------------------------------------------------------------------------------
class _Reports:
    """A tiny Ray actor body collecting every epoch report of a Ray Train run."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def get(self) -> list[dict[str, Any]]:
        return self.rows


def _forward_reports(sink: Any) -> Any:
    """A Ray Train callback, run in the controller, that forwards rank 0's report of each epoch to the
    collector (made here so that the step benches import no Ray: a GPU box may time steps without it)."""
    import ray.train

    class ForwardReports(ray.train.UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            sink.add.remote(dict(metrics[0]))

    return ForwardReports()


def _bare_epochs(cfg: RunConfig, images: torch.Tensor, device: torch.device) -> list[float]:
    """The same pre-training as a plain loop of ``pretrain_step`` over in-memory tensors, with the
    same per-epoch MI probe as the Ray loop, so both sides do the same work."""
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    mae = build_mae(cfg).to(device)
    optimizer = pretrain_optimizer(mae, cfg.pretrain)
    precision = Precision.create(cfg.scaling.precision, device)
    penalty = MIPenalty.from_config(cfg.pretrain.mi)
    batch = cfg.pretrain.batch_size
    steps = len(images) // batch
    epochs = []
    for epoch in range(cfg.pretrain.epochs):
        mae.train()
        _sync(device)
        started = time.perf_counter()
        order = torch.randperm(len(images), device=device)
        if penalty is not None:
            mi_gradient_share(mae, images[order[:batch]], cfg.pretrain, precision, penalty)
        for i in range(steps):
            set_lr(optimizer, lr_at(epoch + i / steps, cfg.pretrain))
            pretrain_step(mae, optimizer, images[order[i * batch:(i + 1) * batch]], cfg.pretrain, precision, penalty)
        _sync(device)
        epochs.append(time.perf_counter() - started)
    return epochs


def measure_ray_overhead(raw: dict[str, Any], epochs: int, batch: int, device: torch.device) -> dict[str, Any]:
    """MIMIR pre-training on the bundled digits through ``run_pretrain`` (1 worker, Ray Data) and as a
    bare loop; per-epoch seconds of both after the first epoch, and their ratio."""
    import ray

    from mimir.data.format import read_split_arrays
    from mimir.data.pipeline import resolve_dataset
    from mimir.ray_env import init_ray
    from mimir.trainers import run_pretrain

    if epochs < 2:
        raise ConfigError("--ray-epochs must be at least 2 (the first epoch is warm-up and not counted)")
    ray_raw = deep_merge(raw, {"data": {"dataset": "digits", "img_size": 16},
                               "pretrain": {"batch_size": batch, "epochs": epochs, "warmup_epochs": 0,
                                            "checkpoint_every": epochs},
                               "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1}})
    cfg = method_config(ray_raw, REFERENCE)
    dataset_dir = resolve_dataset(cfg.data)
    arrays, _ = read_split_arrays(dataset_dir, "train")
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255).to(device)

    init_ray()
    sink = ray.remote(num_cpus=0)(_Reports).remote()
    with tempfile.TemporaryDirectory(prefix="mimir-bench-") as storage:
        started = time.perf_counter()
        run_pretrain(cfg, storage=storage, name="bench_pretrain", callbacks=[_forward_reports(sink)])
        ray_wall = time.perf_counter() - started
    reports = sorted(ray.get(sink.get.remote()), key=lambda row: row["epoch"])
    ray_epochs = [row["seconds"] for row in reports]

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.scaling.torch_threads)  # as the Ray worker does
    try:
        started = time.perf_counter()
        bare_epochs = _bare_epochs(cfg, images, device)
        bare_wall = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    ray_median, bare_median = float(np.median(ray_epochs[1:])), float(np.median(bare_epochs[1:]))
    return {"dataset": str(dataset_dir), "images": len(images), "batch_size": batch, "epochs": epochs,
            "steps_per_epoch": len(images) // batch, "torch_threads": cfg.scaling.torch_threads,
            "config": cfg.model_dump(mode="json"),
            "ray_epoch_seconds": ray_epochs, "bare_epoch_seconds": bare_epochs,
            "ray_median_epoch_s": ray_median, "bare_median_epoch_s": bare_median,
            "ray_wall_seconds": ray_wall, "bare_wall_seconds": bare_wall,
            "ray_overhead": ray_median / bare_median}


# -- report ---------------------------------------------------------------------------------------
def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table plus the overhead lines."""
    args, machine = report["arguments"], report["machine"]
    header = (f"{'method':<12} {'median s/step':>13} {'min-max s':>17} {'img/s':>8} {'peak MB':>8} "
              f"{'x MIMIR':>8} {'paper s/ep':>10} {'paper x':>8}")
    lines = [f"mimir bench: {args['arch']} img {args['img_size']} patch {args['patch_size']} batch {args['batch']}, "
             f"{args['rounds']} rounds x {args['steps']} steps, {machine['device']} "
             f"({machine['torch_threads']} threads, torch {machine['torch']})",
             header, "-" * len(header)]
    for name, row in report["methods"].items():
        spread = f"{row['min_s']:.3f}-{row['max_s']:.3f}"
        lines.append(f"{name:<12} {row['median_s']:>13.4f} {spread:>17} {row['images_per_second']:>8.1f} "
                     f"{_num(row['peak_memory_mb'], '.0f'):>8} {row['ratio_to_mimir']:>8.3f} "
                     f"{_num(row['paper_seconds_per_epoch'], '.1f'):>10} {_num(row['paper_ratio_to_mimir'], '.3f'):>8}")
    lines.append(f"memory: {report['memory_kind']}")
    lines.append("paper: Table 10, ViT-S CIFAR-10, seconds per epoch on 4 A6000 GPUs")
    lines.append(f"attack + MI over MAE (MIMIR / MAE - 1): {report['attack_and_mi_overhead']:+.3f}")
    if report["mi_overhead_in_step"] is not None:
        lines.append(f"MI penalty in a step (MIMIR / Adv-MAE 1-step - 1): {report['mi_overhead_in_step']:+.3f}")
    lines.append(f"MIMIR's 1-step attack alone (forward + input gradient): {report['attack_only']['median_s']:.4f} s = "
                 f"{report['attack_only']['ratio_to_mae_step']:.1%} of a MAE step")
    for name, row in report["mi_only"].items():
        lines.append(f"MI penalty alone ({name}, forward + backward): {row['median_s']:.4f} s = "
                     f"{row['ratio_to_mae_step']:.3%} of a MAE step")
    for name, t in report["targets"].items():
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"target {name} <= {t['target']}: {_num(t['value'], '.3f')} {verdict}")
    if "ray" in report:
        r = report["ray"]
        lines.append(f"ray: {r['epochs']} epochs of {r['steps_per_epoch']} steps (batch {r['batch_size']}), "
                     f"per-epoch median after the first: Ray Train {r['ray_median_epoch_s']:.2f} s, bare loop "
                     f"{r['bare_median_epoch_s']:.2f} s, ray_overhead {r['ray_overhead']:.3f}")
    return "\n".join(lines)
