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
- The "(RayTrainWorker pid=N)" prefix on worker lines the driver prints: Ray reads its switch
  (``RAY_DISABLE_WORKER_LOG_PREFIX``) from the environment once, when ``ray`` is imported.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import ray


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
    """The ``TorchTrainer`` for a Ray that lives and dies with this process: without Ray Train's
    placement-group cleaner, a detached actor that frees a stage's placement group should its
    controller die without doing it itself. Its process starts with every stage, and the controller
    waits for it before training (1.4 s of an empty trainer's 7.0 s on 2 cores); a local Ray's
    placement groups end with the process that started it. (Built on first use: Ray Train's torch
    module imports torch, which this module's other users may not need.)"""
    import ray.train.torch
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LocalTorchTrainer(ray.train.torch.TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return LocalTorchTrainer
