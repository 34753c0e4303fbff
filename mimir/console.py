"""What a run prints: mimir's own lines at the default verbosity, Ray's logs too with ``-v``.

Quiet means: Ray Data's per-execution banners ("Dataset ... execution finished") and its notice
that progress bars are off, Ray's start-up notice that token authentication is on, and (on a local
Ray, where nodes are never drained) the Ray Train preemption watcher, whose actor makes Ray core log
an error line per stage that no user can act on. Nothing else is filtered: warnings and errors from
Ray stay visible. Ray Data's own log file (``ray-data.log`` in the session folder) keeps everything.

Inside an epoch, and through an evaluation, :class:`Progress` shows how far it is (steps or images
done, loss, images/s, ETA) once the epoch or evaluation has run for ``log.progress_after_seconds``:
a bar on a terminal, a line every ``log.progress_percent`` % in a log. Long ImageNet epochs and
AutoAttack runs show life; short digits epochs stay one line each.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VERBOSE_ENV = "MIMIR_VERBOSE"
TERMINAL_ENV = "MIMIR_TERMINAL"  # the driver's console is a terminal: workers draw bars through it
# exact messages that are noise to a mimir user, by logger
DROPPED = {
    "ray.data": ("Progress bars disabled. To enable, set",),
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
}


# where Ray Train's worker logs the traceback of an exception from the training function
RAY_TRAIN_USER_ERROR_LOGGER = "ray.train.v2._internal.util"


class NamedErrorTracebacks(logging.Filter):
    """Drops a worker's traceback of a mimir error (a damaged checkpoint, a full disk): the driver
    prints its message, which names what is wrong; other errors keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Error in training function")
                    and message.rstrip().splitlines()[-1].startswith("mimir.errors."))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    """``-v``: Ray's logs are shown as Ray shows them (read by every process this one starts)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...] | list[str] = ()):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class RayDataNotices(DropMessages):
    """Ray Data's notices that are noise to a mimir user (Ray Data builds its filters with no arguments)."""

    def __init__(self) -> None:
        super().__init__(DROPPED["ray.data"])


def ray_data_logging_config() -> dict[str, Any]:
    """Ray Data's logging config for the processes Ray starts: its own default (everything to the
    session's ``ray-data.log``), with the console at WARNING and the progress-bar notice dropped."""
    from mimir.ray_private import ray_data_default_logging

    config = ray_data_default_logging()
    config["filters"]["mimir_drop"] = {"()": f"{__name__}.RayDataNotices"}
    console = config["handlers"]["console"]
    console["level"] = "WARNING"
    console["filters"] = [*console.get("filters", []), "mimir_drop"]
    return config


def quiet_this_process() -> None:
    """The same quieting for loggers already set up in this process (Ray Data configures its
    logging when imported, before any environment variable of ours could reach it)."""
    for name, prefixes in DROPPED.items():
        logging.getLogger(name).addFilter(DropMessages(prefixes))
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(RayDataNotices())


def ray_process_env(local: bool) -> dict[str, str]:
    """Environment for the processes of this job (runtime_env env_vars). On a cluster, Ray's
    defaults: its nodes may be drained, and a config file written here would not exist there."""
    env = {TERMINAL_ENV: "1"} if sys.stdout.isatty() else {}
    if verbose():
        return {**env, VERBOSE_ENV: "1"}
    if not local:
        return env
    config = Path(tempfile.gettempdir()) / f"mimir-ray-data-logging-{os.getuid()}.json"
    config.write_text(json.dumps(ray_data_logging_config()))
    # Ray Data reads RAY_DATA_LOGGING_CONFIG as YAML, of which JSON is a subset; no node of a local
    # Ray is ever drained, so there is no preemption to watch for
    return {**env, "RAY_DATA_LOGGING_CONFIG": str(config), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class Progress:
    """Progress of long work (rank 0): ``[finetune] epoch 3/100 40% 400/1000 steps loss 0.71,
    812 img/s, ETA 5h 12m``. Once the work has run ``after_seconds``: a bar when the console is a
    terminal (tqdm; from a Ray worker through Ray's ``tqdm_ray``, which the driver draws), else a
    line each time ``done`` passes another ``percent`` % of ``total``. ``queued`` units of the same
    pace follow this part (the stage's later epochs), so the ETA is the stage's."""

    BAR_REFRESH_SECONDS = 1.0

    def __init__(self, label: str, total: int, unit: str, percent: int, after_seconds: float, queued: int = 0):
        self.label, self.total, self.unit, self.queued = label, max(1, total), unit, queued
        self.every = self.total * percent / 100 if percent > 0 else 0.0
        self.after_seconds = after_seconds
        self.next_mark = self.every
        self.started = self.reported = time.perf_counter()
        self.terminal = sys.stdout.isatty() or os.environ.get(TERMINAL_ENV) == "1"
        self.bar: Any = None

    def due(self, done: int) -> bool:
        """Whether to :meth:`report` after ``done`` units (cheap; call it every step)."""
        if not self.every or done >= self.total:
            return False
        if self.terminal:
            now = time.perf_counter()
            return now - self.started >= self.after_seconds and now - self.reported >= self.BAR_REFRESH_SECONDS
        if done < self.next_mark:
            return False
        while self.next_mark <= done:
            self.next_mark += self.every
        return time.perf_counter() - self.started >= self.after_seconds

    def report(self, done: int, detail: str = "") -> None:
        self.reported = time.perf_counter()
        if self.terminal:
            self._bar().n = done
            self.bar.set_description(f"{self.label}{detail}, ETA {format_duration(self._remaining(done))}")
        else:
            print(self.line(done, detail), flush=True)

    def line(self, done: int, detail: str = "") -> str:
        return (f"{self.label} {100 * done // self.total}% {done}/{self.total} {self.unit}{detail}, "
                f"ETA {format_duration(self._remaining(done))}")

    def close(self) -> None:
        """Ends the bar, if one was drawn (before the line that sums the work up)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _remaining(self, done: int) -> float:
        return (self.total - done + self.queued) * (time.perf_counter() - self.started) / max(done, 1)

    def _bar(self) -> Any:
        if self.bar is None:
            if sys.stdout.isatty():
                from tqdm.auto import tqdm
            else:  # a Ray worker, whose driver has the terminal
                from ray.experimental.tqdm_ray import tqdm
            self.bar = tqdm(total=self.total, desc=self.label, unit=self.unit)
        return self.bar


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"
