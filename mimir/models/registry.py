"""How each model family's timm encoder is built and run: one adapter per family.

The facts a config is checked against (architectures, families, what they can run) live in
:mod:`mimir.architectures`, free of torch; an adapter adds what needs torch and timm: the size
arguments the family's timm constructor takes, and how its blocks encode only the visible tokens.
Callers never branch on the family. The adapters reach into timm's module attributes (``blocks``,
``pos_embed``, ``local_up_to_layer``, ``cls_attn_blocks``...), so timm is pinned to the range they
are tested on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from mimir.architectures import CONVIT, VIT, XCIT, Family


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows ``keep`` (B, L_keep) of ``tokens`` (B, L, D)."""
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class FamilyAdapter:
    """What a model family needs beyond ``timm.create_model``; ``family`` holds its facts."""

    def __init__(self, family: Family) -> None:
        self.family = family

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
    def encode_visible(self, encoder: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        tokens = gather_tokens(encoder.patch_embed(x) + encoder.pos_embed[:, 1:], keep)
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        z = encoder.norm_pre(encoder.pos_drop(torch.cat([cls, tokens], dim=1)))
        for block in encoder.blocks:
            z = block(z)
        return z


class ConViTAdapter(FamilyAdapter):
    """ConViT: gated positional self-attention (GPSA) blocks, then the class token joins for the last ones."""

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


ADAPTERS: dict[str, FamilyAdapter] = {VIT.name: ViTAdapter(VIT), CONVIT.name: ConViTAdapter(CONVIT),
                                      XCIT.name: XCiTAdapter(XCIT)}
