"""Memory: what this process holds, and whether a training step of a config will fit.

Linux keeps a high-water mark of resident memory (VmHWM) that writing 5 to /proc/self/clear_refs
resets to the current size, so the growth over a step or an evaluation can be read even in a worker
process that did other work before (None elsewhere). On it rests the estimate of a stage's step
memory, fitted on two small real steps, that `mimir run` checks before Ray starts and `mimir bench`
before it times anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from mimir.config import RunConfig
from mimir.errors import ConfigError
from mimir.mi import MIPenalty
from mimir.models import build_classifier, build_mae
from mimir.seeding import stream_seed
from mimir.train.steps import (Precision, finetune_optimizer, finetune_step, pretrain_optimizer,
                               pretrain_step)

PROBE_CLASSES = 10  # the measured classifier's head (its size does not matter to the estimate)


def _kb_field(path: str, field: str) -> int | None:
    """``Field:   123 kB`` from a /proc file such as /proc/self/status or /proc/meminfo."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _proc_status_kb(field: str) -> int | None:
    return _kb_field("/proc/self/status", field)


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc only), so the starting size holds no freed cache."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


class PeakRSS:
    """``peak = PeakRSS()`` ... ``peak.grown_mb()``: how far resident memory rose above the start."""

    def __init__(self) -> None:
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.start_kb = _proc_status_kb("VmRSS")
        except OSError:
            self.start_kb = None

    def grown_mb(self) -> float | None:
        peak = _proc_status_kb("VmHWM")
        return None if peak is None or self.start_kb is None else max(peak - self.start_kb, 0) / 1024


class PrivateMemoryPeak:
    """The largest rise of this process's private (anonymous) memory over the samples taken.

    For work that reads Ray's object store: pages of the shared store that a worker touches count in
    its resident size (and its VmHWM) although they belong to the store, so the private part,
    sampled after each unit of work, is what shows whether the work itself holds more and more."""

    def __init__(self) -> None:
        self.start_kb = _proc_status_kb("RssAnon")
        self.peak_kb = self.start_kb

    def sample(self) -> None:
        now = _proc_status_kb("RssAnon")
        if now is not None and self.peak_kb is not None:
            self.peak_kb = max(self.peak_kb, now)

    def grown_mb(self) -> float | None:
        return None if self.start_kb is None else (self.peak_kb - self.start_kb) / 1024


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_mb(device: torch.device) -> float | None:
    """Memory this process could still take: free GPU memory, or on the CPU the smaller of the
    kernel's MemAvailable and what the cgroup (a container's limit) leaves; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20
    candidates = []
    meminfo = _kb_field("/proc/meminfo", "MemAvailable")
    if meminfo is not None:
        candidates.append(meminfo / 1024)
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        candidates.append((limit - used) / 2**20)
    return min(candidates) if candidates else None


# -- a training step, measured ------------------------------------------------------------------
def fixed_batch(batch: int, img_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random [0, 1] images and labels for every method and probe."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, PROBE_CLASSES, (batch,), generator=generator).to(device)
    return images, labels


@dataclass
class MeasuredStep:
    """One callable to time or to measure: a method's training step, or the MI penalty alone."""

    step: Callable[[], Any]
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer | None = None

    def state_mb(self) -> float:
        """Weights, gradients and optimizer state this method keeps between steps."""
        tensors = [p for m in self.modules for p in m.parameters()]
        tensors += [p.grad for p in tensors if p.grad is not None]
        if self.optimizer is not None:
            tensors += [v for state in self.optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def stage_step(stage: str, cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device) -> MeasuredStep:
    """One real training step of a stage (``pretrain`` or ``finetune``) of ``cfg`` on the fixed batch."""
    torch.manual_seed(stream_seed(cfg.seed, "init"))  # every method starts from the same initialization
    precision = Precision.create(cfg.scaling.precision, device)
    if stage == "pretrain":
        mae = build_mae(cfg).to(device).train()
        optimizer = pretrain_optimizer(mae, cfg.pretrain)
        penalty = MIPenalty.from_config(cfg.pretrain.mi)
        return MeasuredStep(lambda: pretrain_step(mae, optimizer, images, cfg.pretrain, precision, penalty),
                      [mae], optimizer)
    classifier = build_classifier(cfg, PROBE_CLASSES).to(device).train()
    optimizer = finetune_optimizer(classifier, cfg.finetune)
    return MeasuredStep(lambda: finetune_step(classifier, optimizer, images, labels, cfg.finetune, precision),
                  [classifier], optimizer)


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        step = ("torch.cuda.max_memory_allocated over one step (reset per method) minus the allocation "
                "before it")
    else:
        step = ("peak RSS over one step minus the RSS before it (Linux VmHWM reset via /proc/self/clear_refs "
                "after malloc_trim)")
    return (f"step_memory_mb: {step} = activations and temporaries; state_mb: this method's weights, "
            "gradients and optimizer state; peak_memory_mb = their sum")


def step_memory_mb(step: Callable[[], Any], device: torch.device) -> float | None:
    """Memory one (untimed) step needs above what is allocated before it; None when the OS cannot tell."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    peak = PeakRSS()
    step()
    return peak.grown_mb()


# -- will it fit? -------------------------------------------------------------------------------
PROBE_BATCHES = (16, 32)  # smaller batches understate the per-image slope (allocator granularity)
ACTIVATION_MARGIN = 1.25  # the linear fit's error at 4x the larger probe, measured on CPU: -25 % to +11 %
HEADROOM = 0.9  # of the memory available, what the steps may plan to take


@dataclass
class MemoryEstimate:
    """A step's memory as ``state_mb`` (weights, gradients, optimizer state) plus activations that
    grow linearly with the batch, fitted on two small real steps."""

    state_mb: float
    base_mb: float
    per_image_mb: float

    def step_mb(self, batch: int) -> float:
        return ACTIVATION_MARGIN * max(self.base_mb + self.per_image_mb * batch, 0.0)

    def times(self, workers: int) -> MemoryEstimate:
        """``workers`` such steps side by side on one machine."""
        return MemoryEstimate(self.state_mb * workers, self.base_mb * workers, self.per_image_mb * workers)


def _probe(stage: str, cfg: RunConfig, device: torch.device, batch: int) -> tuple[float | None, float]:
    """One real step's memory (after a warm-up step, which allocates the optimizer state) and the
    state it keeps, at ``batch`` images."""
    images, labels = fixed_batch(batch, cfg.data.img_size, device)
    timed = stage_step(stage, cfg, images, labels, device)
    timed.step()
    return step_memory_mb(timed.step, device), timed.state_mb()


def estimate_memory(stage: str, cfg: RunConfig, device: torch.device,
                    first: tuple[float | None, float] | None = None) -> MemoryEstimate | None:
    """Fit a stage's step memory on real steps of ``PROBE_BATCHES`` images (``first``: the smaller
    probe's result, when already taken); None where the OS cannot tell."""
    (small, large) = PROBE_BATCHES
    m_small, state_mb = first or _probe(stage, cfg, device, small)
    m_large, _ = _probe(stage, cfg, device, large)
    if m_small is None or m_large is None:
        return None
    per_image = max((m_large - m_small) / (large - small), 0.0)
    return MemoryEstimate(state_mb, m_small - per_image * small, per_image)


def largest_batch(estimates: dict[str, MemoryEstimate], budget_mb: float, multiple: int = 8) -> int:
    """The largest batch (a multiple of ``multiple``) at which the states of all and the largest step fit."""
    room = (budget_mb - sum(e.state_mb for e in estimates.values())) / ACTIVATION_MARGIN
    fits = min((room - e.base_mb) / e.per_image_mb if e.per_image_mb > 0 else float("inf")
               for e in estimates.values())
    return max(int(fits // multiple) * multiple, 0)


def check_memory(estimates: dict[str, MemoryEstimate | None], batch: int, device: torch.device,
                 what: str = "--batch", workers: int = 1) -> None:
    """Refuse, before any long work, a batch whose steps would not fit in this machine's memory:
    the states of every step kept alive together plus the largest step's activations. ``batch`` is
    per worker; the message names the batch of ``what``, ``workers`` times that."""
    known = {name: e for name, e in estimates.items() if e is not None}
    available = available_mb(device)
    if not known or available is None:
        return
    state = sum(e.state_mb for e in known.values())
    largest = max(known, key=lambda name: known[name].step_mb(batch))
    need = state + known[largest].step_mb(batch)
    if need <= HEADROOM * available:
        return
    fits = largest_batch(known, HEADROOM * available)
    advice = f"{what} {fits * workers} fits" if fits else "no batch fits; use a smaller model or a larger machine"
    raise ConfigError(
        f"{what} {batch * workers} does not fit in this machine's memory: {largest} needs about {need / 1024:.1f} GB "
        f"({state / 1024:.1f} GB of weights, gradients and optimizer state, {known[largest].step_mb(batch) / 1024:.1f} "
        f"GB for one step, estimated from steps of {PROBE_BATCHES[0]} and {PROBE_BATCHES[1]} images) and "
        f"{available / 1024:.1f} GB are available on {device.type}; {advice}")


def check_run_memory(cfg: RunConfig, stages: tuple[str, ...] | list[str]) -> None:
    """``mimir run``'s guard, before Ray starts: each training stage's per-worker batch must fit this
    machine (CPU workers share its memory; a GPU worker has a GPU of its own). Only for a local Ray:
    a cluster's workers run on other machines."""
    if os.environ.get("RAY_ADDRESS"):
        return
    gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    workers = 1 if gpu else cfg.scaling.num_workers
    for stage in ("pretrain", "finetune"):
        if stage not in stages or (stage == "pretrain" and not cfg.pretrain.enabled):
            continue
        batch = getattr(cfg, stage).batch_size // cfg.scaling.num_workers
        first, available = _probe(stage, cfg, device, PROBE_BATCHES[0]), available_mb(device)
        if first[0] is None or available is None:
            continue
        # every megabyte of the probe's step counted as growing with the batch: above the fitted
        # estimate for any batch beyond the probe (a step's fixed part is not negative)
        bound = MemoryEstimate(first[1], 0.0, first[0] / PROBE_BATCHES[0]).times(workers)
        if bound.state_mb + bound.step_mb(batch) <= HEADROOM * available / 2:
            continue  # fits by far: no need for the finer estimate
        estimate = estimate_memory(stage, cfg, device, first)
        check_memory({stage: estimate.times(workers) if estimate else None}, batch, device,
                     what=f"{stage}.batch_size", workers=cfg.scaling.num_workers)
