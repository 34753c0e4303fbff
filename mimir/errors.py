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
