"""Checkpoint directories: weights as safetensors, optimizer/scaler state, epoch and config as JSON.

Loading never unpickles arbitrary objects: weights come from safetensors, and the optimizer file is
read with ``torch.load(weights_only=True)`` (tensors, numbers, lists and dicts only).

``state.json`` is written last and records each file's size and SHA-256 (``files``); every load checks
them first, so a checkpoint truncated or altered after it was written ends in a CheckpointError that
names the file, never in weights that load wrongly (hashing costs about a second per GB).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load, save

from mimir.errors import CheckpointError
from mimir.storage import with_retries

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def save_checkpoint(directory: str | Path, model: nn.Module, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write a checkpoint directory; ``state`` (epoch, stage, config, metrics) must be JSON-able.
    A failed write (a full disk) is a StorageError naming the file."""
    directory = Path(directory)
    files = {WEIGHTS: save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})}
    if optimizer is not None:
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, buffer)
        files[OPTIMIZER] = buffer.getvalue()
    recorded = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    files[STATE] = json.dumps({**state, "files": recorded}, indent=2, sort_keys=True).encode()
    for name, data in files.items():  # state.json last: a checkpoint without it is no checkpoint
        path = directory / name
        with_retries(str(path), lambda: _write(path, data), waits=())
    return directory


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a mimir checkpoint (no {STATE})")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: damaged, not JSON ({err})") from err


def read_verified(directory: str | Path, name: str) -> bytes:
    """The bytes of one checkpoint file, checked against the size and SHA-256 ``state.json`` records
    for it: a CheckpointError naming the file when it is missing, truncated or altered. (Checkpoints
    written before sizes were recorded are read unchecked.)"""
    path = Path(directory) / name
    expected = load_state(directory).get("files", {}).get(name)
    if not path.is_file():
        if expected is not None:
            raise CheckpointError(f"{path}: missing from its checkpoint (state.json records it)")
        raise FileNotFoundError(f"{directory}: not a mimir checkpoint (no {name})")
    data = path.read_bytes()
    if expected is not None:
        if len(data) != expected["bytes"]:
            what = "truncated" if len(data) < expected["bytes"] else "longer than written"
            raise CheckpointError(f"{path}: {what}: {len(data)} bytes where {expected['bytes']} were written")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"{path}: altered since it was written (its SHA-256 differs from state.json's)")
    return data


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file of a checkpoint (before a stage starts from it)."""
    for name in load_state(directory).get("files", {}):
        read_verified(directory, name)


def load_weights(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    weights = load(read_verified(directory, WEIGHTS))
    return {k: v.to(device) for k, v in weights.items()}


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None = None) -> None:
    """Restore optimizer (and GradScaler) state saved by :func:`save_checkpoint`."""
    saved = torch.load(io.BytesIO(read_verified(directory, OPTIMIZER)), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
