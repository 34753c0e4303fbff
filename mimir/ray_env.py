"""The Ray a command runs on: join the cluster in RAY_ADDRESS, or start an in-process local one,
quiet unless ``-v`` (:mod:`mimir.console`)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

import ray

from mimir import ray_private
from mimir.console import quiet_this_process, ray_process_env, verbose

IDLE_WORKER_MS = 300_000  # how long the local Ray keeps an idle worker process
LOCAL_POLL_SECONDS = 0.2  # how often Ray Train's controller polls its workers on a local Ray
LOCAL_RAY_ENV = "MIMIR_LOCAL_RAY"  # "1" in every process of a Ray that this command started itself
_local_gcs_address: str | None = None  # of the local Ray this process started, while it runs


def quiet_ray_data() -> None:
    """No progress bars or per-execution banners from the Ray Data pipelines this process builds:
    they would bury the epoch lines. Each process that creates datasets calls it (the driver, a Tune
    trial, the evaluation task); the env var reaches the tasks those datasets start."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start an in-process local Ray; quiet unless ``-v``
    (mimir.console)."""
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    _init(num_cpus)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaces the caller's with sys.exit


def on_local_ray() -> bool:
    """Whether this process belongs to a local Ray a mimir command started (in its driver, a Tune
    trial or a worker): one that ends with that command, placement groups and all. In the driver that
    started it, only while it is that Ray it is connected to: ``LOCAL_RAY_ENV`` outlives a
    ``ray.shutdown()``, after which the caller may join a cluster with its own ``ray.init``."""
    if os.environ.get(LOCAL_RAY_ENV) != "1":
        return False
    return _local_gcs_address is None or (
        ray.is_initialized() and ray.get_runtime_context().gcs_address == _local_gcs_address)


def _init(num_cpus: int | None) -> None:
    global _local_gcs_address
    quiet_ray_data()
    local = not os.environ.get("RAY_ADDRESS")
    os.environ[LOCAL_RAY_ENV] = "1" if local else "0"
    if not verbose():
        quiet_this_process()
        ray_private.drop_worker_log_prefix()  # the console shows mimir's lines as mimir printed them
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # -v in a log file: Ray's prefixes without colour codes
    # workers print their epoch lines straight to stdout: Ray Train's print patch would route them
    # through its logger, which shows every line twice
    env_vars = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                LOCAL_RAY_ENV: os.environ[LOCAL_RAY_ENV], **ray_process_env(local)}
    if local:
        # Ray Train's controller polls its workers every 2 s (sized for clusters); a stage waits on
        # those polls to start, to see its workers finish and to stop: an empty trainer took 8.3-8.8 s
        # on 2 cores, 4.5-4.8 s polling every 0.2 s (docs/performance.md)
        env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(LOCAL_POLL_SECONDS)
    kwargs: dict[str, Any] = dict(logging_level=logging.INFO if verbose() else logging.WARNING, log_to_driver=True,
                                  runtime_env={"env_vars": env_vars})
    if not local:
        _local_gcs_address = None
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # with the dashboard (on 127.0.0.1), whose State API Ray Train's placement-group cleaner and
        # state tracking poll (a local Ray's trainers have no cleaner: ray_private.local_torch_trainer;
        # a user may turn the tracking on). They ask for "the" Ray of this machine, which fails (a
        # traceback every stage) where two local Rays run, e.g. two mimir runs side by side: its
        # processes are told ours.
        port = free_port()
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # A Ray Train run keeps more actors alive than a laptop has CPUs, so Ray would kill every
        # idle worker after 1 s and each epoch's Ray Data tasks would start a fresh process (seconds
        # of importing torch); kept for minutes, the next epoch, stage and trial reuse them
        ray_private.init_local_ray(IDLE_WORKER_MS, num_cpus=num_cpus, dashboard_port=port, **kwargs)
        _local_gcs_address = ray.get_runtime_context().gcs_address


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
