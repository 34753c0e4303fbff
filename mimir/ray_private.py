"""Every use of Ray's private API, in one place.

mimir needs these things Ray does not expose publicly; each is read or set here and nowhere else,
and ``pyproject.toml`` pins Ray to the versions these were tested on (2.60.x). When Ray changes one
of them, ``tests/test_data_order.py`` (the execution counter), ``tests/test_console.py`` (the
logging config) and ``tests/test_pipeline.py`` (the shuffle buffer) fail first.

- Ray Data's per-dataset execution counter: the epoch a Ray Data task works for. Ray's own seeded
  operators (``RandomSeedConfig(reseed_after_execution=True)``, ``FileShuffleConfig``) key their
  draws on it; mimir keys each row's augmentation on it too, and starts it at the epoch a resumed
  run restarts from.
- Ray Data's default logging config, which mimir extends to quiet Ray Data's notices in the
  processes Ray starts.
- Ray Data's local shuffle buffer (``ShufflingBatcher``), which a lone worker runs over a small
  split it augments itself, so that its batches are those Ray Data would give.
- The raylet's idle-worker timeout (a ``_system_config`` key of ``ray.init``).
- Ray Train's default controller callbacks (``DataParallelTrainer._create_default_callbacks``), from
  which a local Ray's trainers drop the placement-group cleaner (:func:`local_torch_trainer`).
- Ray Train's backend interface (``Backend``, ``BackendConfig``) and its torch backend's worker
  functions (``ray.train.torch.config``), through which a local Ray's trainers set up torch's process
  group from a controller that never imports torch (:class:`ProcessGroupConfig`).
- The "(RayTrainWorker pid=N)" prefix on worker lines the driver prints: Ray reads its switch
  (``RAY_DISABLE_WORKER_LOG_PREFIX``) from the environment once, when ``ray`` is imported.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig


def data_epoch() -> int:
    """The execution index of the dataset the calling Ray Data task belongs to (its epoch)."""
    return ray.data.DataContext.get_current()._execution_idx


def start_executions_at(dataset: ray.data.Dataset, epoch: int) -> None:
    """Make the dataset's next execution count as ``epoch`` (the one after it ``epoch + 1``, ...)."""
    dataset.context._execution_idx = epoch


def ray_data_default_logging() -> dict[str, Any]:
    """A copy of Ray Data's own default logging config (everything to the session's ``ray-data.log``)."""
    from ray.data._internal.logging import DEFAULT_CONFIG

    return copy.deepcopy(DEFAULT_CONFIG)


def drop_worker_log_prefix() -> None:
    """Print the workers' lines on the driver's console as they are, without Ray's "(Name pid=N)"
    prefix and its colour codes; call before ``ray.init`` (``RAY_DISABLE_WORKER_LOG_PREFIX=1``, which
    Ray reads only when imported)."""
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX = True


def init_local_ray(idle_worker_ms: int, **kwargs: Any) -> None:
    """``ray.init(**kwargs)`` of a new local Ray whose raylet keeps an idle worker process for
    ``idle_worker_ms`` (a ``_system_config`` key). ``address="local"``: its own Ray even where a
    cluster started by ``ray start`` runs on this machine (plain ``ray.init()`` would join that one,
    and refuse these settings)."""
    ray.init(address="local", _system_config={"idle_worker_killing_time_threshold_ms": idle_worker_ms}, **kwargs)


def local_shuffle(rows: dict[str, Any], batch_size: int, buffer_rows: int, seed: int | None,
                  drop_last: bool) -> Iterator[dict[str, Any]]:
    """The numpy batches Ray Data's ``iter_batches(local_shuffle_buffer_size=buffer_rows,
    local_shuffle_seed=seed)`` gives over a dataset of one block holding ``rows``: Ray's own shuffle
    buffer, fed as its batching iterator feeds it."""
    from ray.data._internal.batcher import ShufflingBatcher
    from ray.data.block import BlockAccessor

    batcher = ShufflingBatcher(batch_size=batch_size, shuffle_buffer_min_size=buffer_rows, shuffle_seed=seed)
    batcher.add(BlockAccessor.batch_to_block(rows))
    while batcher.has_batch():
        yield BlockAccessor.for_block(batcher.next_batch()).to_batch_format("numpy")
    batcher.done_adding()
    while batcher.has_batch() or (batcher.has_any() and not drop_last):
        yield BlockAccessor.for_block(batcher.next_batch()).to_batch_format("numpy")


@functools.cache
def local_torch_trainer() -> type:
    """The ``TorchTrainer`` for a Ray that lives and dies with this process. It leaves out Ray Train's
    placement-group cleaner, a detached actor that frees a stage's placement group should its
    controller die without doing it itself: its process starts with every stage, and the controller
    waits for it before training (1.4 s of an empty trainer's 7.0 s on 2 cores); a local Ray's
    placement groups end with the process that started it. And it sets up torch's process group
    through :class:`ProcessGroupConfig`, whose controller does not import torch (0.9 s of an empty
    trainer's 5.3 s). (Built on first use: Ray Train's torch module imports torch, which this module's
    other users may not need.)"""
    import ray.train.torch
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LocalTorchTrainer(ray.train.torch.TorchTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, torch_config=ProcessGroupConfig(), **kwargs)

        def _create_default_callbacks(self) -> list[Any]:
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return LocalTorchTrainer


@dataclasses.dataclass
class ProcessGroupConfig(BackendConfig):
    """Ray Train's ``TorchConfig`` (gloo on CPUs, NCCL on GPUs, ``env://``, its default timeout) for a
    controller that never imports torch. ``TorchConfig`` lives in a module that imports torch, and
    the controller unpickles it before it starts a worker: about a second of every stage's start on
    2 cores. Here the controller holds this class, and torch is imported in the workers only, by Ray's
    own process-group functions (:class:`_ProcessGroupBackend`)."""

    backend: str | None = None  # None: NCCL where the workers have GPUs, else gloo
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type:
        return _ProcessGroupBackend

    @property
    def train_func_context(self) -> Any:
        # evaluated in the driver, which has torch; the workers enter it around the loop
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH


class _ProcessGroupBackend(Backend):
    """What Ray's ``_TorchBackend`` does for CPU and GPU workers, from the controller: the address of
    rank 0, torch's distributed environment variables, then ``init_process_group`` in every worker."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_distributed_environment, address=address, port=port)
        ray.get([worker_group.execute_single_async(rank, _init_process_group, backend=backend, world_rank=rank,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)

        timeout_s = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(worker_group.execute_async(_shutdown_torch, destroy_process_group=len(worker_group) > 1),
                    timeout=timeout_s)
        except GetTimeoutError:
            logging.getLogger(__name__).warning("torch's process group did not shut down in %g s", timeout_s)


# In the workers: Ray's own functions, imported there.
def _set_distributed_environment(address: str, port: int) -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    _set_torch_distributed_env_vars()


def _init_process_group(**kwargs: Any) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown_torch(**kwargs: Any) -> None:
    from ray.train.torch.config import _shutdown_torch as shutdown

    shutdown(**kwargs)
