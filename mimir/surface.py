"""``mimir surface``: loss surfaces around a fine-tuned model (the paper's Eq. 23 and Figure 5).

f(α, β) = L(θ* + α θ1 + β θ2) on a grid of α, β in [-span, span], where θ* are the fine-tuned
weights and θ1, θ2 two random directions, filter-normalized as in Li et al. 2018 (the paper's
[47]; their ``loss-landscape`` code): a Gaussian direction per parameter tensor, each output filter
(first-axis slice) rescaled to the norm of the same filter of θ*, and every bias and norm-layer
parameter (tensors of one axis) zeroed ("ignore biasbn"). L is the cross-entropy on the first
``num_images`` test images, natural and adversarial (PGD-k regenerated against the perturbed
weights at every grid point, with the same seeded random start everywhere). A seed fixes the
directions, so a surface is reproducible.

The grid points are spread over Ray tasks, each loading the model once and evaluating a chunk of
points; the result equals the single-process computation (:func:`grid_losses`). Writes
``surface.csv`` (one row per grid point), ``surface.json`` (the grid, settings and checkpoint) and
``surface.png`` (per input kind, a 3-D surface above its contour, as in Figure 5).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationError

from mimir import attacks
from mimir.config import RunConfig, format_errors
from mimir.errors import ConfigError
from mimir.seeding import stream_seed
from mimir.spec import SurfaceSettings

METRICS = ("loss", "accuracy")
CHUNK = 64  # grid points per Ray task at most


# -- directions (Li et al.) ---------------------------------------------------------------------
def filter_normalize(direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``direction`` with each output filter (slice along the first axis) scaled to the norm of the
    same filter of ``weight``; zero for biases and norm-layer parameters (one axis), which Li et al.
    leave unperturbed."""
    if direction.dim() <= 1:
        return torch.zeros_like(direction)
    d, w = direction.flatten(1), weight.flatten(1)
    scale = w.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + 1e-10)  # Li et al.'s 1e-10
    return (d * scale).view_as(direction)


def random_directions(model: nn.Module, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """θ1 and θ2: filter-normalized Gaussian directions over ``model.parameters()``, drawn on the
    CPU from ``seed`` (the same on every machine and worker), on the parameters' device."""
    generator = torch.Generator().manual_seed(stream_seed(seed, "directions"))
    weights = [p.detach() for p in model.parameters()]

    def draw() -> list[torch.Tensor]:
        return [filter_normalize(torch.randn(w.shape, generator=generator), w.float().cpu()).to(w.device)
                for w in weights]

    first = draw()
    return first, draw()


def perturb(model: nn.Module, base: Sequence[torch.Tensor], directions: tuple[Sequence[torch.Tensor], ...],
            alpha: float, beta: float) -> None:
    """Set the model's parameters to θ* + α θ1 + β θ2 (``base`` is θ*)."""
    first, second = directions
    with torch.no_grad():
        for p, w, d1, d2 in zip(model.parameters(), base, first, second):
            p.copy_(w + alpha * d1 + beta * d2)


# -- the loss at grid points --------------------------------------------------------------------
def point_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: SurfaceSettings,
                 eps: float, step_size: float, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy (%) of the model as it stands, on natural and/or PGD images."""
    torch.manual_seed(stream_seed(settings.seed, "evaluate"))  # the same attack starts at every grid point
    sums = {f"{kind}_{metric}": 0.0 for kind in settings.inputs for metric in METRICS}
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        for kind in settings.inputs:
            xk = x if kind == "natural" else attacks.pgd_ce(model, x, y, eps, step_size, settings.attack_steps)
            with torch.no_grad():
                logits = model(xk).float()
            sums[f"{kind}_loss"] += F.cross_entropy(logits, y, reduction="sum").item()
            sums[f"{kind}_accuracy"] += 100.0 * (logits.argmax(dim=1) == y).sum().item()
    return {key: value / len(labels) for key, value in sums.items()}


def grid_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: SurfaceSettings,
                eps: float, step_size: float, batch_size: int, indices: Sequence[int] | None = None
                ) -> list[dict[str, float]]:
    """:func:`point_losses` at the grid points ``indices`` (default all) of ``settings.points()``;
    the model's weights are restored afterwards."""
    model.eval().requires_grad_(False)  # the attacks take gradients of the input only
    points = settings.points()
    base = [p.detach().clone() for p in model.parameters()]
    directions = random_directions(model, settings.seed)
    out = []
    try:
        for i in range(len(points)) if indices is None else indices:
            perturb(model, base, directions, *points[i])
            out.append(point_losses(model, images, labels, settings, eps, step_size, batch_size))
    finally:
        with torch.no_grad():
            for p, w in zip(model.parameters(), base):
                p.copy_(w)
    return out


# -- the surface as data ------------------------------------------------------------------------
@dataclass
class Surface:
    """One model's surface: per metric (``natural_loss``, ``adversarial_accuracy``, ...) a grid with
    ``values[m][j][i]`` at α = ``axis[i]``, β = ``axis[j]``; ``info`` says how it was made."""

    axis: list[float]
    values: dict[str, list[list[float]]]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_points(cls, settings: SurfaceSettings, results: Sequence[dict[str, float]],
                    info: dict[str, Any]) -> "Surface":
        n = settings.steps
        values = {m: [[results[j * n + i][m] for i in range(n)] for j in range(n)] for m in results[0]}
        return cls(settings.axis().tolist(), values, info)

    def to_record(self) -> dict[str, Any]:
        return {"axis": self.axis, "values": self.values, **self.info}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Surface":
        info = {k: v for k, v in record.items() if k not in ("axis", "values")}
        return cls(record["axis"], record["values"], info)

    def write_csv(self, path: Path) -> None:
        """One row per grid point: alpha, beta, then each metric."""
        metrics = list(self.values)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["alpha", "beta", *metrics])
            for j, beta in enumerate(self.axis):
                for i, alpha in enumerate(self.axis):
                    writer.writerow([alpha, beta, *(self.values[m][j][i] for m in metrics)])

    @classmethod
    def read_csv(cls, path: Path, info: dict[str, Any] | None = None) -> "Surface":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        axis = sorted({float(r["alpha"]) for r in rows})
        index = {a: k for k, a in enumerate(axis)}
        metrics = [k for k in rows[0] if k not in ("alpha", "beta")]
        values = {m: [[math.nan] * len(axis) for _ in axis] for m in metrics}
        for r in rows:
            for m in metrics:
                values[m][index[float(r["beta"])]][index[float(r["alpha"])]] = float(r[m])
        return cls(axis, values, info or {})


# -- Ray: the grid spread over workers ----------------------------------------------------------
def load_test_subset(cfg: RunConfig, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_images`` test images (uint8, NCHW) and labels, read through Ray Data."""
    from mimir.data.pipeline import eval_dataset, resolve_dataset

    batches = list(eval_dataset(resolve_dataset(cfg.data), cfg.data, num_images).iter_batches(
        batch_size=1024, batch_format="numpy"))
    if not batches:
        raise ValueError("the test split gave no images")
    return (np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches]))


def _chunk_task(cfg_json: dict[str, Any], checkpoint: Any, settings_json: dict[str, Any], indices: list[int],
                images: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    from mimir.evaluation import load_classifier
    from mimir.ray_env import quiet_ray_data

    quiet_ray_data()
    cfg, settings = RunConfig.model_validate(cfg_json), SurfaceSettings.model_validate(settings_json)
    # several chunks run side by side: each keeps to its own CPUs (more threads only contend)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    with checkpoint.as_directory() as directory:
        model = load_classifier(directory, cfg, device)
    x = torch.tensor(images, device=device).float().div_(255)  # a copy: Ray's shared array is read-only
    y = torch.tensor(labels, device=device)
    return grid_losses(model, x, y, settings, cfg.evaluate.eps, cfg.evaluate.step_size, cfg.evaluate.batch_size,
                       indices)


def default_workers(cfg: RunConfig) -> int:
    """How many chunk tasks the cluster runs at once: its GPUs (or CPUs) over one task's share."""
    import ray

    total = ray.cluster_resources()
    s = cfg.scaling
    if s.use_gpu and s.gpus_per_worker > 0:
        return max(1, int(total.get("GPU", 0) // s.gpus_per_worker))
    return max(1, int(total.get("CPU", 1) // s.cpus_per_worker))


def compute_surface(cfg: RunConfig, checkpoint: Any, settings: SurfaceSettings, workers: int | None = None
                    ) -> Surface:
    """The surface of a fine-tuning checkpoint (a ``ray.train.Checkpoint``), its grid in chunks over
    Ray tasks (``workers`` at a time; default :func:`default_workers`). Ray must be initialized."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mimir.console import Progress

    started = time.perf_counter()
    images, labels = load_test_subset(cfg, settings.num_images)
    workers = workers or default_workers(cfg)
    points = len(settings.points())
    # at least four chunks per worker, so the workers finish together, and at most CHUNK points per
    # chunk, so progress shows often; each chunk loads the model once (a second at most)
    count = min(points, max(4 * workers, math.ceil(points / CHUNK)))
    chunks = [c.tolist() for c in np.array_split(np.arange(points), count)]
    s = cfg.scaling
    # never inside a caller's placement group (a sweep trial reserves none of the CPUs this needs)
    task = ray.remote(_chunk_task).options(
        num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker if s.use_gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    shared = [ray.put(cfg.model_dump(mode="json")), checkpoint, ray.put(settings.model_dump(mode="json"))]
    data = [ray.put(images), ray.put(labels)]
    pending = {task.remote(*shared, chunk, *data): k for k, chunk in enumerate(chunks)}
    print(f"[surface] {points} grid points on {len(labels)} test images ({', '.join(settings.inputs)}), "
          f"{len(chunks)} chunks over {workers} workers", flush=True)
    progress = Progress("[surface]", points, "points", cfg.log.progress_percent, cfg.log.progress_after_seconds)
    results: list[list[dict[str, float]] | None] = [None] * len(chunks)
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(ready[0])
        results[k] = ray.get(ready[0])
        done += len(chunks[k])
        if progress.due(done):
            progress.report(done)
    progress.close()
    info = {"checkpoint": checkpoint.path, "name": cfg.name, "arch": cfg.model.arch,
            "settings": settings.model_dump(mode="json"), "num_images": int(len(labels)),
            "eps": cfg.evaluate.eps, "step_size": cfg.evaluate.step_size, "workers": workers,
            "seconds": time.perf_counter() - started}
    return Surface.from_points(settings, [r for chunk in results for r in chunk], info)


# -- figures ------------------------------------------------------------------------------------
def plot_surfaces(columns: Sequence[tuple[str, Surface]], out: Path, title: str = "") -> Path:
    """Figure 5's layout: one column per model; per input kind a 3-D surface above its contour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm

    kinds = [k for k in ("natural", "adversarial") if any(f"{k}_loss" in s.values for _, s in columns)]
    fig = plt.figure(figsize=(4 * len(columns), 3.6 * 2 * len(kinds)))
    for c, (name, surface) in enumerate(columns):
        a, b = np.meshgrid(surface.axis, surface.axis)
        for r, kind in enumerate(kinds):
            if f"{kind}_loss" not in surface.values:
                continue
            z = np.array(surface.values[f"{kind}_loss"])
            top = fig.add_subplot(2 * len(kinds), len(columns), 2 * r * len(columns) + c + 1, projection="3d")
            top.plot_surface(a, b, z, cmap=cm.coolwarm, linewidth=0, antialiased=False)  # as Li et al.
            top.set(title=f"{name}\n{kind} loss", xlabel="α", ylabel="β")
            flat = fig.add_subplot(2 * len(kinds), len(columns), (2 * r + 1) * len(columns) + c + 1)
            lines = flat.contour(a, b, z, levels=12, cmap=cm.coolwarm)
            flat.clabel(lines, inline=True, fontsize=7)
            flat.plot([0], [0], "k+")  # θ*
            flat.set(xlabel="α", ylabel="β", aspect="equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_surface(surface: Surface, out: Path, name: str) -> dict[str, Path]:
    """``surface.csv``, ``surface.json`` and ``surface.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "surface.csv", "json": out / "surface.json", "png": out / "surface.png"}
    surface.write_csv(paths["csv"])
    paths["json"].write_text(json.dumps(surface.to_record(), indent=2))
    plot_surfaces([(name, surface)], paths["png"])
    return paths


# -- the command and the sweep hook -------------------------------------------------------------
def resolve_run(run: str | Path, which: str | None) -> tuple[Any, RunConfig]:
    """The fine-tuning checkpoint of a run folder (or a checkpoint folder) and its config; raises
    FileNotFoundError or ConfigError, before Ray starts, when there is no finished fine-tuning."""
    from mimir.export import checkpoint_directory, find_checkpoint

    checkpoint = find_checkpoint(run, "finetune", which)
    with checkpoint_directory(checkpoint, "finetune") as (_, state):
        return checkpoint, RunConfig.model_validate(state["config"])


def trial_surface(results: dict[str, Any], settings: SurfaceSettings) -> dict[str, Any]:
    """The sweep hook: the surface record of a finished trial's evaluated checkpoint (with several
    seeds, the first seed's run)."""
    import ray.train

    run = results["runs"][0] if "runs" in results else results
    cfg = RunConfig.model_validate(run["config"])
    return compute_surface(cfg, ray.train.Checkpoint(run["evaluated_checkpoint"]), settings).to_record()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "row"


def sweep_figure(spec: Any, experiment: Path) -> Path | None:
    """The sweep's figure, one column per spec row whose trial has a surface (in row order), as
    ``surface.png``, and each row's grid as ``surfaces/<row>.csv``, in the experiment folder."""
    from mimir.report import collect_trials, config_value

    trials = collect_trials(experiment)
    columns = []
    for row in spec.rows:
        match = next((t for t in trials if "surface" in t
                      and all(config_value(t["config"], k) == v for k, v in row.set.items())), None)
        if match is not None:
            surface = Surface.from_record(match["surface"])
            (experiment / "surfaces").mkdir(exist_ok=True)
            surface.write_csv(experiment / "surfaces" / f"{_slug(row.label)}.csv")
            columns.append((row.label, surface))
    if not columns:
        return None
    return plot_surfaces(columns, experiment / "surface.png", spec.title or spec.name)


def settings_from_args(args: Any) -> SurfaceSettings:
    """The command's options as settings; an option left out keeps the settings' default."""
    given = {"steps": args.steps, "span": args.span, "num_images": args.images, "inputs": args.inputs,
             "attack_steps": args.attack_steps, "seed": args.seed, "checkpoint": args.checkpoint}
    try:
        return SurfaceSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(format_errors(err, "mimir surface")) from None


def main(args: Any) -> int:
    """``mimir surface`` handler."""
    from mimir.data.pipeline import resolve_dataset
    from mimir.ray_env import init_ray

    settings = settings_from_args(args)
    checkpoint, cfg = resolve_run(args.run, settings.checkpoint)
    resolve_dataset(cfg.data)  # a missing dataset stops here, before Ray starts
    init_ray()
    surface = compute_surface(cfg, checkpoint, settings, workers=args.workers)
    paths = write_surface(surface, Path(args.out) if args.out else Path(args.run) / "surface",
                          f"{cfg.name} ({cfg.model.arch})")
    centre = settings.steps // 2
    at_centre = ", ".join(f"{m} {v[centre][centre]:.4g}" for m, v in surface.values.items())
    print(f"surface: {settings.steps}x{settings.steps} points in {surface.info['seconds']:.0f} s"
          + (f"; at the centre: {at_centre}" if settings.steps % 2 else ""))
    print(f"written: {paths['csv']}, {paths['json']}, {paths['png']}")
    return 0
