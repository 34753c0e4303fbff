"""Architectures MIMIR runs on, keyed by the names configs use.

Each entry names the timm model the encoder *is* (the MAE encoder is an instance of that timm
class with its head removed), so a fine-tuned classifier is a plain ``timm.create_model`` and
pre-trained weights load into it by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["vit", "convit", "xcit"]


@dataclass(frozen=True)
class Architecture:
    timm_name: str
    family: Family
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self, grid: int, mask_ratio: float, patch_size: int, mask_sampling: str = "uniform") -> None:
        """Raise ValueError when this architecture cannot run at this grid / mask ratio / patch."""
        if self.family == "xcit" and patch_size not in (8, 16):
            raise ValueError(
                f"model.patch_size {patch_size} is not supported by XCiT (timm's convolutional patch "
                "embedding takes 8 or 16)")
        if self.family == "vit":
            return
        # ConViT's gated positional attention and XCiT's local patch interaction read the visible
        # tokens as a square grid
        if mask_sampling == "grid":
            cell = cell_size(mask_ratio)
            if cell is None:
                raise ValueError(
                    f"pretrain.mask_ratio {mask_ratio} is not 1 - 1/k^2 (0.75, 0.889, ...): "
                    f"{self.family} grid masking needs the visible tokens to form a square grid")
            if grid % cell:
                raise ValueError(
                    f"the {grid}x{grid} patch grid does not split into {cell}x{cell} cells "
                    f"needed by {self.family} grid masking at ratio {mask_ratio}")
        elif visible_side(grid, mask_ratio) is None:
            raise ValueError(
                f"pretrain.mask_ratio {mask_ratio} keeps {num_visible(grid, mask_ratio)} of {grid * grid} "
                f"patches, not a square number: {self.family} needs the visible tokens to form a square grid")


def num_visible(grid: int, mask_ratio: float) -> int:
    """How many of the grid x grid patches a mask at this ratio keeps (MAE's rounding)."""
    return int(grid * grid * (1 - mask_ratio))


def visible_side(grid: int, mask_ratio: float) -> int | None:
    """The side of the square the visible tokens form, or None when their count is not a square."""
    side = math.isqrt(num_visible(grid, mask_ratio))
    return side if side > 0 and side * side == num_visible(grid, mask_ratio) else None


def cell_size(mask_ratio: float) -> int | None:
    """k such that keeping one patch per k x k cell masks exactly ``mask_ratio``; None if none."""
    k = round(1.0 / math.sqrt(1.0 - mask_ratio))
    return k if k >= 2 and math.isclose(1.0 - 1.0 / k**2, mask_ratio, abs_tol=1e-6) else None


ARCHITECTURES: dict[str, Architecture] = {
    "vit_tiny": Architecture("vit_tiny_patch16_224", "vit"),
    "vit_small": Architecture("vit_small_patch16_224", "vit"),
    "vit_base": Architecture("vit_base_patch16_224", "vit"),
    "convit_tiny": Architecture("convit_tiny", "convit"),
    "convit_small": Architecture("convit_small", "convit"),
    "convit_base": Architecture("convit_base", "convit"),
    "xcit_small": Architecture("xcit_small_12_p16_224", "xcit"),
    "xcit_medium": Architecture("xcit_medium_24_p16_224", "xcit"),
}
