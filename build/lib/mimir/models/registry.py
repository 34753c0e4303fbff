"""Architectures MIMIR runs on, keyed by the names configs use, and one adapter per model family.

Each architecture names the timm model the encoder *is* (the MAE encoder is an instance of that
timm class with its head removed), so a fine-tuned classifier is a plain ``timm.create_model`` and
pre-trained weights load into it by name. Everything mimir must know about a family lives in its
adapter: which masks and patch sizes it can run, what it passes to timm, whether it takes MAE's fixed
sin-cos position embedding, and how its blocks encode only the visible tokens. Callers never branch
on the family. The adapters reach into timm's module attributes (``blocks``, ``pos_embed``,
``local_up_to_layer``, ``cls_attn_blocks``...), so timm is pinned to the range they are tested on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn


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


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows ``keep`` (B, L_keep) of ``tokens`` (B, L, D)."""
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class FamilyAdapter:
    """What a model family needs beyond ``timm.create_model``. Subclasses set the class attributes."""

    name: ClassVar[str]
    reads_grid: ClassVar[bool] = False  # its blocks read the visible tokens as a square grid
    sincos_pos_embed: ClassVar[bool] = True  # takes MAE's fixed 2-D sin-cos position embedding
    pos_embed_has_cls: ClassVar[bool] = False  # that embedding has a class-token row first

    def check(self, grid: int, mask_ratio: float, patch_size: int, mask_sampling: str) -> None:
        """Raise ValueError when this family cannot run at this grid / mask ratio / patch size."""
        if not self.reads_grid:
            return
        if mask_sampling == "grid":
            cell = cell_size(mask_ratio)
            if cell is None:
                raise ValueError(
                    f"pretrain.mask_ratio {mask_ratio} is not 1 - 1/k^2 (0.75, 0.889, ...): "
                    f"{self.name} grid masking needs the visible tokens to form a square grid")
            if grid % cell:
                raise ValueError(f"the {grid}x{grid} patch grid does not split into {cell}x{cell} cells "
                                 f"needed by {self.name} grid masking at ratio {mask_ratio}")
        elif visible_side(grid, mask_ratio) is None:
            raise ValueError(
                f"pretrain.mask_ratio {mask_ratio} keeps {num_visible(grid, mask_ratio)} of {grid * grid} "
                f"patches, not a square number: {self.name} needs the visible tokens to form a square grid")

    def timm_kwargs(self, default_heads: int, embed_dim: int | None, depth: int | None,
                    num_heads: int | None) -> dict[str, Any]:
        """Size overrides in the form this family's timm constructor takes them."""
        kwargs: dict[str, Any] = {}
        if num_heads is not None:
            kwargs["num_heads"] = num_heads
        if depth is not None:
            kwargs["depth"] = depth
        if embed_dim is not None:
            kwargs["embed_dim"] = embed_dim
        return kwargs

    def encode_visible(self, encoder: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Tokens (class token first) after the encoder's blocks, before its final norm, from the
        normalized images ``x`` of which only the patches ``keep`` are seen."""
        raise NotImplementedError


class ViTAdapter(FamilyAdapter):
    name = "vit"
    pos_embed_has_cls = True

    def encode_visible(self, encoder: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        tokens = gather_tokens(encoder.patch_embed(x) + encoder.pos_embed[:, 1:], keep)
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        z = encoder.norm_pre(encoder.pos_drop(torch.cat([cls, tokens], dim=1)))
        for block in encoder.blocks:
            z = block(z)
        return z


class ConViTAdapter(FamilyAdapter):
    """ConViT: gated positional self-attention (GPSA) blocks, then the class token joins for the last ones."""

    name = "convit"
    reads_grid = True

    def timm_kwargs(self, default_heads: int, embed_dim: int | None, depth: int | None,
                    num_heads: int | None) -> dict[str, Any]:
        kwargs = super().timm_kwargs(default_heads, None, depth, num_heads)
        if depth is not None:  # keep two class-token layers after the GPSA ones
            kwargs["local_up_to_layer"] = max(depth - 2, 1)
        if embed_dim is not None:  # timm's ConViT takes the width per head
            heads = num_heads or default_heads
            if embed_dim % heads:
                raise ValueError(f"model.embed_dim {embed_dim} is not divisible by {heads} heads")
            kwargs["embed_dim"] = embed_dim // heads
        return kwargs

    def encode_visible(self, encoder: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        z = encoder.pos_drop(gather_tokens(encoder.patch_embed(x) + encoder.pos_embed, keep))
        for i, block in enumerate(encoder.blocks):
            if i == encoder.local_up_to_layer:
                z = torch.cat([encoder.cls_token.expand(z.shape[0], -1, -1), z], dim=1)
            z = block(z)
        return z


class XCiTAdapter(FamilyAdapter):
    """XCiT: cross-covariance blocks with local patch interaction on the token grid, then class attention."""

    name = "xcit"
    reads_grid = True
    sincos_pos_embed = False  # XCiT computes its Fourier position encoding per forward

    def check(self, grid: int, mask_ratio: float, patch_size: int, mask_sampling: str) -> None:
        if patch_size not in (8, 16):
            raise ValueError(f"model.patch_size {patch_size} is not supported by XCiT (timm's convolutional "
                             "patch embedding takes 8 or 16)")
        super().check(grid, mask_ratio, patch_size, mask_sampling)

    def encode_visible(self, encoder: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        tokens, (hp, wp) = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            pos = encoder.pos_embed(tokens.shape[0], hp, wp).reshape(tokens.shape[0], -1, tokens.shape[1])
            tokens = tokens + pos.permute(0, 2, 1)
        z = encoder.pos_drop(gather_tokens(tokens, keep))
        side = math.isqrt(keep.shape[1])
        for block in encoder.blocks:
            z = block(z, side, side)
        z = torch.cat([encoder.cls_token.expand(z.shape[0], -1, -1), z], dim=1)
        for block in encoder.cls_attn_blocks:
            z = block(z)
        return z


@dataclass(frozen=True)
class Architecture:
    timm_name: str
    family: FamilyAdapter
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


VIT, CONVIT, XCIT = ViTAdapter(), ConViTAdapter(), XCiTAdapter()

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
