"""The architectures configs can name, and what each model family can run: facts only, no torch.

Each architecture names the timm model the encoder *is* (the MAE encoder is an instance of that
timm class with its head removed), so a fine-tuned classifier is a plain ``timm.create_model`` and
pre-trained weights load into it by name. Configs check a model against these facts before anything
starts, and the commands that only read configs stay free of torch and timm; how each family's
timm encoder is built and run lives in :mod:`mimir.models.registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cell_size(mask_ratio: float) -> int | None:
    """k such that keeping one patch per k x k cell masks exactly ``mask_ratio``; None if none."""
    k = round(1.0 / math.sqrt(1.0 - mask_ratio))
    return k if k >= 2 and math.isclose(1.0 - 1.0 / k**2, mask_ratio, abs_tol=1e-6) else None


def num_visible(grid: int, mask_ratio: float) -> int:
    """How many of the grid x grid patches a mask at this ratio keeps (MAE's rounding)."""
    return int(grid * grid * (1 - mask_ratio))


def visible_side(grid: int, mask_ratio: float) -> int | None:
    """The side of the square the visible tokens form, or None when their count is not a square."""
    side = math.isqrt(num_visible(grid, mask_ratio))
    return side if side > 0 and side * side == num_visible(grid, mask_ratio) else None


@dataclass(frozen=True)
class Family:
    """What a model family can run."""

    name: str
    title: str  # as papers write it
    reads_grid: bool = False  # its blocks read the visible tokens as a square grid
    sincos_pos_embed: bool = True  # takes MAE's fixed 2-D sin-cos position embedding
    pos_embed_has_cls: bool = False  # that embedding has a class-token row first
    patch_sizes: tuple[int, ...] = ()  # the only patch sizes its timm patch embedding takes (empty: any)

    def check(self, grid: int, mask_ratio: float, patch_size: int, mask_sampling: str) -> None:
        """Raise ValueError when this family cannot run at this grid / mask ratio / patch size."""
        if self.patch_sizes and patch_size not in self.patch_sizes:
            raise ValueError(f"model.patch_size {patch_size} is not supported by {self.title} (timm's patch "
                             f"embedding takes {' or '.join(map(str, self.patch_sizes))})")
        if not self.reads_grid:
            return
        if mask_sampling == "grid":
            cell = cell_size(mask_ratio)
            if cell is None:
                raise ValueError(
                    f"pretrain.mask_ratio {mask_ratio} is not 1 - 1/k^2 (0.75, 0.889, ...): "
                    f"{self.title} grid masking needs the visible tokens to form a square grid")
            if grid % cell:
                raise ValueError(f"the {grid}x{grid} patch grid does not split into {cell}x{cell} cells "
                                 f"needed by {self.title} grid masking at ratio {mask_ratio}")
        elif visible_side(grid, mask_ratio) is None:
            raise ValueError(
                f"pretrain.mask_ratio {mask_ratio} keeps {num_visible(grid, mask_ratio)} of {grid * grid} "
                f"patches, not a square number: {self.title} needs the visible tokens to form a square grid")


@dataclass(frozen=True)
class Architecture:
    timm_name: str
    family: Family
    default_width: int
    default_heads: int

    def check(self, grid: int, mask_ratio: float, patch_size: int, mask_sampling: str = "uniform") -> None:
        self.family.check(grid, mask_ratio, patch_size, mask_sampling)

    def check_size(self, embed_dim: int | None, num_heads: int | None) -> None:
        """Raise ValueError, naming the fields, for a width the heads or the position embedding cannot take."""
        width, heads = embed_dim or self.default_width, num_heads or self.default_heads
        if width % heads:
            raise ValueError(f"model.embed_dim {width} is not divisible by model.num_heads {heads}")
        if self.family.sincos_pos_embed and width % 4:
            raise ValueError(f"model.embed_dim {width} must be divisible by 4 (MAE's 2-D sin-cos position "
                             "embedding gives each axis half the channels, as sines and cosines)")


VIT = Family("vit", "ViT", pos_embed_has_cls=True)
CONVIT = Family("convit", "ConViT", reads_grid=True)  # gated positional self-attention, then class-token layers
# XCiT computes its Fourier position encoding per forward; its convolutional patch embedding takes 8 or 16
XCIT = Family("xcit", "XCiT", reads_grid=True, sincos_pos_embed=False, patch_sizes=(8, 16))

ARCHITECTURES: dict[str, Architecture] = {
    "vit_tiny": Architecture("vit_tiny_patch16_224", VIT, 192, 3),
    "vit_small": Architecture("vit_small_patch16_224", VIT, 384, 6),
    "vit_base": Architecture("vit_base_patch16_224", VIT, 768, 12),
    "convit_tiny": Architecture("convit_tiny", CONVIT, 192, 4),
    "convit_small": Architecture("convit_small", CONVIT, 432, 9),
    "convit_base": Architecture("convit_base", CONVIT, 768, 16),
    "xcit_small": Architecture("xcit_small_12_p16_224", XCIT, 384, 8),
    "xcit_medium": Architecture("xcit_medium_24_p16_224", XCIT, 512, 8),
}
