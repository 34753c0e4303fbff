"""Peak resident memory of this process over a stretch of work (Linux; None elsewhere).

Linux keeps a high-water mark of resident memory (VmHWM) that writing 5 to /proc/self/clear_refs
resets to the current size, so the growth over a step or an evaluation can be read even in a worker
process that did other work before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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
    import torch

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
