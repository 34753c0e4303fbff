"""Per-worker training loops handed to Ray Train's ``TorchTrainer``.

Each loop: build the model, ``prepare_model`` (device + DDP), restore from Ray Train's latest
checkpoint if there is one, then per epoch iterate this worker's dataset shard, call the pure step
function per batch, and ``ray.train.report`` the epoch's metrics with a checkpoint every
``checkpoint_every`` epochs and at the end.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mimir import attacks
from mimir.config import OptimConfig, RunConfig
from mimir.console import RAY_TRAIN_USER_ERROR_LOGGER, NamedErrorTracebacks, Progress, verbose
from mimir.data.pipeline import epoch_batches, part_name
from mimir.errors import StorageError
from mimir.evaluation import accuracies, attack_counts, classifier_from, test_batches
from mimir.memory import PrivateMemoryPeak
from mimir.metrics import MetricsLog, Tracker
from mimir.mi import MIPenalty
from mimir.models import build_classifier, build_mae, load_encoder_weights
from mimir.seeding import stream_seed
from mimir.storage import write_json
from mimir.train.checkpoint import load_state, load_training_state, load_weights, save_checkpoint
from mimir.train.steps import (Precision, compile_forward, finetune_optimizer, finetune_step, lr_at,
                               mi_gradient_share, pretrain_optimizer, pretrain_step, set_lr, unwrap,
                               use_deterministic_algorithms)

Metrics = dict[str, torch.Tensor]
# below this share of the encoder gradient the MI penalty cannot change what the encoder learns
NO_EFFECT_SHARE = 1e-6


def _mean_across_workers(step_sums: Metrics, steps: int, epoch_values: Metrics,
                         device: torch.device) -> dict[str, float]:
    """Per-step metrics averaged over every step of every worker, per-epoch values over the workers;
    one all-reduce and one device sync for the whole epoch."""
    step_keys, epoch_keys = sorted(step_sums), sorted(epoch_values)
    parts = [step_sums[k] for k in step_keys] + [torch.tensor(float(steps), device=device)]
    parts += [epoch_values[k] for k in epoch_keys] + [torch.tensor(1.0, device=device)]
    values = torch.stack([p.to(device=device, dtype=torch.float64) for p in parts])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    values = values.tolist()
    total_steps, n_step = max(values[len(step_keys)], 1.0), len(step_keys) + 1
    workers = values[-1]
    report = {k: values[i] / total_steps for i, k in enumerate(step_keys)}
    report.update({k: values[n_step + i] / workers for i, k in enumerate(epoch_keys)})
    return report


def no_effect_warning(report: dict[str, float], warmup_epochs: float) -> str | None:
    """The warning for an epoch after warm-up whose MI penalty is too weak to matter, else None."""
    share = report.get("mi_share")
    if share is None or report["epoch"] + 1 < warmup_epochs or share >= NO_EFFECT_SHARE:
        return None
    return (f"WARNING: the MI penalty has no effect at this lambda: it makes {share:.2g} of the encoder "
            f"gradient (below {NO_EFFECT_SHARE:g}). Raise pretrain.mi.weight (`mimir mi-scale CONFIG` "
            "shows the lambda range where each estimator acts), or use the estimator the paper's "
            "lambdas were tuned with (pretrain.mi.estimator=hsic_cca).")


def _worker_setup(cfg: RunConfig) -> torch.device:
    # Ray Train logs every report at INFO on the worker; a user reads our epoch lines instead
    if not verbose():
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger(RAY_TRAIN_USER_ERROR_LOGGER).addFilter(NamedErrorTracebacks())
    if cfg.scaling.deterministic:
        use_deterministic_algorithms(True)
    torch.manual_seed(stream_seed(cfg.seed, "init"))  # DDP would broadcast rank 0's weights anyway
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    return ray.train.torch.get_device()


class _TimedBatches:
    """An epoch's batch iterator that adds up how long the loop waited for each batch (``seconds``):
    the epoch's start-up (Ray Data executing the epoch's pipeline) and every batch that was not ready
    when the step before it ended. On CUDA a step returns before its kernels finish, so a wait there
    overlaps the GPU's work; a wait is only lost time when the GPU then idles too."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        self.batches, self.seconds = iter(batches), 0.0

    def __iter__(self) -> "_TimedBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - started


def stage_data(config: dict[str, Any], name: str) -> Any:
    """This worker's dataset ``name``: what the driver handed over in memory (``config["in_memory"]``:
    a small split's :class:`~mimir.data.pipeline.LocalTrainSplit` or
    :class:`~mimir.data.pipeline.InMemoryRows`), else its Ray Data shard."""
    in_memory = config.get("in_memory", {})
    return in_memory[name] if name in in_memory else ray.train.get_dataset_shard(name)


def _train_epochs(stage: str, cfg: RunConfig, optim_cfg: OptimConfig, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, precision: Precision, steps_per_epoch: int, run_folder: str,
                  shard: Any, step: Callable[[dict[str, torch.Tensor]], Metrics], extra_state: dict[str, Any],
                  probe: Callable[[dict[str, torch.Tensor]], Metrics] | None = None,
                  validate: Callable[[], dict[str, float]] | None = None, validate_every: int = 1,
                  keep: str | None = None) -> Weights | None:
    """The epoch loop shared by both stages: schedule, shard iteration, metrics, checkpoints.

    ``probe`` measures per-epoch values on the epoch's first batch, before its step; it must leave
    the training state and random stream as they were (``mi_gradient_share`` does). ``validate``
    runs every ``validate_every`` epochs and after the last; those epochs always checkpoint, scored
    by ``checkpoint_score`` (the validation metric; -inf on other checkpoints) so Ray Train keeps the
    best one beside the latest. ``keep`` ("best" or "last"): return a CPU copy of the weights of the
    checkpoint the stage record will name so (the best: the highest score, on a tie the later epoch,
    as Ray Train ranks them; "best" without validation is the last), or None where this process
    did not see every epoch that competes for it (a restarted stage)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            unwrap(model).load_state_dict(load_weights(directory, device))
            load_training_state(directory, optimizer, precision.scaler)
            start_epoch = load_state(directory)["epoch"] + 1
        if rank == 0:
            print(f"[{stage}] resuming from epoch {start_epoch} of {optim_cfg.epochs}", flush=True)
    local_batch = optim_cfg.batch_size // world
    epoch_log = MetricsLog(run_folder, start_epoch, Tracker.for_run(cfg, stage)) if rank == 0 else None
    progress = None
    warned_no_effect = False
    best: Weights | None = None
    best_score = float("-inf")
    for epoch in range(start_epoch, optim_cfg.epochs):
        torch.manual_seed(stream_seed(cfg.seed, "step", epoch=epoch, rank=rank))
        model.train()
        sums: Metrics = {}
        epoch_values: Metrics = {}
        steps, images_seen, started, probe_seconds = 0, 0, time.perf_counter(), 0.0
        started_at = time.time()  # wall clock, to hold against the stage's window (mimir runs --fixed-costs)
        batches = _TimedBatches(epoch_batches(shard, batch_size=local_batch, data=cfg.data, seed=cfg.seed,
                                              epoch=epoch, rank=rank, device=device))
        if rank == 0:
            progress = Progress(f"[{stage}] epoch {epoch + 1}/{optim_cfg.epochs}", steps_per_epoch, "steps",
                                cfg.log.progress_percent, cfg.log.progress_after_seconds,
                                queued=(optim_cfg.epochs - epoch - 1) * steps_per_epoch)
        for batch in batches:
            if probe is not None and steps == 0:
                probe_started = time.perf_counter()
                epoch_values = probe(batch)
                probe_seconds = time.perf_counter() - probe_started
            lr = lr_at(epoch + min(steps / steps_per_epoch, 1.0), optim_cfg)
            set_lr(optimizer, lr)
            metrics = step(batch)
            for key, value in metrics.items():
                sums[key] = sums[key] + value if key in sums else value
            steps += 1
            images_seen += batch["image"].shape[0]
            if progress is not None and progress.due(steps):
                rate = images_seen * world / (time.perf_counter() - started)
                progress.report(steps, f" loss {metrics['loss'].item():.4g}, {rate:.0f} img/s")
        if progress is not None:
            progress.close()
        if steps == 0:
            raise RuntimeError(f"[{stage}] worker {rank} got no full batch of {local_batch} images; "
                               "lower the batch size or use fewer workers")
        elapsed = time.perf_counter() - started
        epoch_values["data_seconds"] = torch.tensor(batches.seconds)  # averaged over the workers
        report = _mean_across_workers(sums, steps, epoch_values, device)
        report.update(epoch=epoch, lr=lr, seconds=elapsed, images_per_second=images_seen * world / elapsed,
                      started_at=started_at)
        if probe is not None:
            report["probe_seconds"] = probe_seconds
        last = epoch == optim_cfg.epochs - 1
        validated = validate is not None and (last or (epoch + 1) % validate_every == 0)
        if validated:
            started = time.perf_counter()
            report.update(validate())
            report["validation_seconds"] = time.perf_counter() - started
        if validate is not None:
            report["checkpoint_score"] = report["val_pgd"] if validated else float("-inf")
            if keep == "best" and validated and start_epoch == 0 and report["checkpoint_score"] >= best_score:
                best_score, best = report["checkpoint_score"], Weights(epoch, _cpu_copy(model))
        if epoch_log is not None:
            epoch_log.append(report)
            shown = " ".join(f"{k} {report[k]:.4g}" for k in ("loss", "mse", "mi_term", "mi_share", "acc",
                                                               "val_natural", "val_pgd") if k in report)
            skipped = f" skipped {report['skipped'] * steps:.0f}" if report.get("skipped") else ""
            print(f"[{stage}] epoch {epoch + 1}/{optim_cfg.epochs} {shown} lr {lr:.3g} "
                  f"{report['images_per_second']:.0f} img/s{skipped}", flush=True)
            warning = None if warned_no_effect else no_effect_warning(report, optim_cfg.warmup_epochs)
            if warning:
                warned_no_effect = True
                print(f"[{stage}] {warning}", flush=True)
        if last or validated or (epoch + 1) % optim_cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(tmp, unwrap(model), {"epoch": epoch, "stage": stage, "metrics": report,
                                                         "config": cfg.model_dump(mode="json"), **extra_state},
                                    optimizer, precision.scaler)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                try:
                    ray.train.report(report, checkpoint=checkpoint)
                except StorageError:
                    raise
                except OSError as err:  # copying the checkpoint into the run folder
                    raise StorageError(run_folder, f"the checkpoint of epoch {epoch + 1}: {err}") from err
        else:
            ray.train.report(report)
    if epoch_log is not None:
        epoch_log.close()
    if keep == "last" or (keep == "best" and validate is None):
        return Weights(optim_cfg.epochs - 1, _cpu_copy(model))
    return best


@dataclass
class Weights:
    """A model's weights (on the CPU) and the epoch they ended."""

    epoch: int
    state: dict[str, torch.Tensor]


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in unwrap(model).state_dict().items()}


def pretrain_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the pre-training TorchTrainer (Algorithm 1)."""
    cfg = RunConfig.model_validate(config["run"])
    device = _worker_setup(cfg)
    model = ray.train.torch.prepare_model(compile_forward(build_mae(cfg), cfg.scaling.compile))
    optimizer = pretrain_optimizer(model, cfg.pretrain)
    precision = Precision.create(cfg.scaling.precision, device)
    penalty = MIPenalty.from_config(cfg.pretrain.mi)

    def step(batch: dict[str, torch.Tensor]) -> Metrics:
        images = batch["image"].float().div_(255)
        return pretrain_step(model, optimizer, images, cfg.pretrain, precision, penalty)

    def probe(batch: dict[str, torch.Tensor]) -> Metrics:
        images = batch["image"].float().div_(255)
        share, _ = mi_gradient_share(model, images, cfg.pretrain, precision, penalty)
        return {"mi_share": share}

    _train_epochs("pretrain", cfg, cfg.pretrain, model, optimizer, precision, config["steps_per_epoch"],
                  config["run_folder"], stage_data(config, "train"), step,
                  {"pretrain_hash": cfg.pretrain_hash()}, probe=probe if penalty else None)


def validation_accuracy(model: torch.nn.Module, shard: Any, cfg: RunConfig,
                        device: torch.device) -> dict[str, float]:
    """Natural and PGD-k accuracy (%) on the validation split, each worker on its shard, summed
    over the workers. The attack runs on the bare model, so no DDP gradient sync is involved."""
    net, ev, steps = unwrap(model), cfg.evaluate, cfg.finetune.validation.attack_steps
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in shard.iter_torch_batches(batch_size=cfg.evaluate.batch_size, device=device):
        x, y = batch["image"].float().div_(255), batch["label"]
        adv = attacks.pgd_ce(net, x, y, ev.eps, ev.step_size, steps)
        with torch.no_grad():
            counts += torch.stack([(net(x).argmax(1) == y).sum(), (net(adv).argmax(1) == y).sum(),
                                   torch.tensor(len(y), device=device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    net.train()
    natural, robust, total = counts.tolist()
    if total == 0:
        raise RuntimeError("the validation split gave no images")
    return {"val_natural": 100.0 * natural / total, "val_pgd": 100.0 * robust / total}


def finetune_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the fine-tuning TorchTrainer, starting from a pre-trained encoder."""
    cfg = RunConfig.model_validate(config["run"])
    device = _worker_setup(cfg)
    classifier = build_classifier(cfg, config["num_classes"])
    pretrained = config.get("pretrained")
    if pretrained is not None and ray.train.get_checkpoint() is None:
        with pretrained.as_directory() as directory:
            load_encoder_weights(classifier.net, load_weights(directory))
    model = ray.train.torch.prepare_model(compile_forward(classifier, cfg.scaling.compile))
    optimizer = finetune_optimizer(model, cfg.finetune)
    precision = Precision.create(cfg.scaling.precision, device)

    def step(batch: dict[str, torch.Tensor]) -> Metrics:
        images = batch["image"].float().div_(255)
        labels = batch["target"] if "target" in batch else batch["label"]
        return finetune_step(model, optimizer, images, labels, cfg.finetune, precision)

    validate = None
    if cfg.finetune.validation.images:
        rank = ray.train.get_context().get_world_rank()
        validate = functools.partial(validation_accuracy, model, stage_data(config, part_name("val", rank)), cfg,
                                     device)

    evaluation = config.get("evaluation")  # the run's evaluation, done here where the weights are
    kept = _train_epochs("finetune", cfg, cfg.finetune, model, optimizer, precision, config["steps_per_epoch"],
                         config["run_folder"], stage_data(config, "train"), step,
                         {"num_classes": config["num_classes"], "pretrained": pretrained and pretrained.path},
                         validate=validate, validate_every=cfg.finetune.validation.every,
                         keep=cfg.evaluate.checkpoint if evaluation else None)
    if kept is not None:
        # trained and checkpointed: the evaluation's model and attacks take the memory these held
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        evaluate_in_workers(cfg, config["num_classes"], kept, evaluation,
                            stage_data(config, part_name("test", ray.train.get_context().get_world_rank())))


def evaluate_in_workers(cfg: RunConfig, num_classes: int, weights: Weights, evaluation: dict[str, Any],
                        test_part: Any) -> None:
    """The run's evaluation in the fine-tuning workers, on the weights the stage record will name
    (no process to start, no checkpoint to read back, and every training GPU shares the work): each
    worker attacks its fixed share of the test split (``test_part``, dataset ``test_<rank>``) with
    its own seeded random starts, the counts add up over the workers, and rank 0 writes the result to
    ``evaluation["path"]`` with the driver's ``evaluation["token"]``. One worker evaluates exactly
    what the evaluation task (:func:`mimir.trainers.run_evaluate`) would."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    started = time.time()
    memory = PrivateMemoryPeak()
    model = classifier_from(cfg, num_classes, weights.state, device)
    torch.manual_seed(stream_seed(cfg.seed, "evaluate", rank=rank))  # the attacks' random starts
    batches = test_batches(test_part, cfg.evaluate.batch_size, memory, device)
    progress = None
    if rank == 0:
        share = -(-int(evaluation["images"]) // world)
        progress = Progress("[evaluate]", share, "images", cfg.log.progress_percent, cfg.log.progress_after_seconds)
    part = attack_counts(model, batches, cfg, progress)
    names = list(cfg.evaluate.attacks)
    counts = torch.tensor([part["correct"][n] for n in names] + [part["num_images"]], dtype=torch.float64,
                          device=device)
    seconds = torch.tensor([part["seconds"][n] for n in names], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the workers attack side by side: the slowest one's
    if rank != 0:
        return
    total = counts.tolist()
    result = accuracies({"correct": dict(zip(names, total[:-1])), "num_images": int(total[-1]),
                         "seconds": dict(zip(names, seconds.tolist()))})
    write_json(evaluation["path"], {**result, "token": evaluation["token"], "epoch": weights.epoch,
                                    "workers": world, "private_memory_mb": memory.grown_mb(),
                                    "window": [started, time.time()]})
