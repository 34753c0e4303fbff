"""The errors a user meets, each ending a command with a message instead of a traceback
(``mimir.cli``). Kept free of heavy imports, so that the CLI can catch them without torch or Ray."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the offending field."""


class DatasetError(ValueError):
    """A dataset source or prepared dataset that cannot be used; the message names the path."""


class StageExistsError(RuntimeError):
    """A run folder holds earlier work that this run may not continue or reuse as asked."""


class NonFiniteRun(RuntimeError):
    """A stage ended with a non-finite loss (or skipped most of its updates as non-finite)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage} {message}")
        self.stage, self.message = stage, message

    def __reduce__(self) -> tuple[Any, ...]:  # Ray and copy rebuild exceptions from their arguments
        return type(self), (self.stage, self.message)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or altered since it was written; the message names it."""


class StorageError(OSError):
    """A file of the run that could not be written (a full disk, an unwritable or unreachable storage
    path); the message names the path. What was finished before stays as it was."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"could not write {path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.reason)


class FolderInUse(RuntimeError):
    """Another live process is writing the run or experiment folder; the message names it."""


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run (SIGINT, SIGTERM): raised in the main thread by :mod:`mimir.cli`."""

    def __init__(self, signal_name: str, code: int):
        super().__init__(signal_name)
        self.signal_name, self.code = signal_name, code

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.signal_name, self.code)


# the errors that end a command with their message (exit code 2), wherever they were raised
USER_ERRORS = (ConfigError, DatasetError, StageExistsError, CheckpointError, StorageError, FolderInUse,
               FileNotFoundError)


def named_cause(err: BaseException) -> BaseException | None:
    """The mimir error a failure from Ray carries (a worker's, a task's), unwrapped from Ray's
    exceptions so that it prints as its own message; None when it carries none."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        wrapped = getattr(current, "cause", None)  # ray.exceptions.RayTaskError and its per-cause subclasses
        if isinstance(current, (*USER_ERRORS, NonFiniteRun)) and not isinstance(wrapped, BaseException):
            return current
        pending += [wrapped, *getattr(current, "worker_failures", {}).values(),
                    getattr(current, "controller_failure", None), current.__cause__, current.__context__]
    return None
