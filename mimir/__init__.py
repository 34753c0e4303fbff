"""mimir: MIMIR masked adversarial pre-training of vision transformers, on Ray.

The Python API (``mimir.run``, ``pretrain``, ``finetune``, ``evaluate``, ``sweep``,
``load_classifier``, ``load_run_config``) lives in :mod:`mimir.api`; it is imported on first use so
that ``import mimir`` (and the command line's ``--help``) stays free of torch and Ray.
"""

from typing import Any

from mimir.version import __version__

API = ("run", "pretrain", "finetune", "evaluate", "sweep", "load_classifier", "load_run_config")
__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    if name in API:
        from mimir import api

        return getattr(api, name)
    raise AttributeError(f"module 'mimir' has no attribute {name!r}")
