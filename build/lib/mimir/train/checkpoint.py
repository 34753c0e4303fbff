"""Checkpoint directories: weights as safetensors, optimizer/scaler state, epoch and config as JSON.

Loading never unpickles arbitrary objects: weights come from safetensors, and the optimizer file is
read with ``torch.load(weights_only=True)`` (tensors, numbers, lists and dicts only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def save_checkpoint(directory: str | Path, model: nn.Module, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write a checkpoint directory; ``state`` (epoch, stage, config, metrics) must be JSON-able."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return directory


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a mimir checkpoint (no {STATE})")
    return json.loads(path.read_text())


def load_weights(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a mimir checkpoint (no {WEIGHTS})")
    return load_file(str(path), device=str(device))


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None = None) -> None:
    """Restore optimizer (and GradScaler) state saved by :func:`save_checkpoint`."""
    saved = torch.load(Path(directory) / OPTIMIZER, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
