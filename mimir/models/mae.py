"""The MIMIR masked autoencoder: a timm encoder that sees only visible patches, and a small decoder.

The encoder is the timm classifier itself (head removed); this module only adds the masked forward
pass for each family, the decoder of the paper's Table 11, and the reconstruction loss. Images come
in as [0, 1] tensors; normalization happens inside, so attacks work in pixel space.

Masking. By default every family uses per-sample uniform random masking (MAE, the paper's Sec. 3.3
and the authors' code). ConViT's gated positional attention and XCiT's local patch interaction read
the token sequence as a square grid; with uniform masking the visible tokens are read as a grid of
side sqrt(L_keep) in random order, as the authors' code does, so a token's grid neighbours are not
its image neighbours. ``mask_sampling="grid"`` instead keeps one random patch in every k x k cell
(k = 2 at mask ratio 0.75), ordered cell by cell, so the visible tokens are a grid of side / k whose
neighbours are image neighbours; the masking stays random per sample and per cell.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from mimir.architectures import cell_size
from mimir.models.registry import FamilyAdapter


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch * patch * C), patches in raster order, pixels (p, q, c)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images."""
    b, length, _ = patches.shape
    side = int(round(length**0.5))
    x = patches.reshape(b, side, side, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, side * patch, side * patch)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (1, grid*grid [+1], dim); half the channels per axis."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def axis(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([axis(xs), axis(ys)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def uniform_mask(batch: int, num_patches: int, ratio: float, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Ids of the kept patches, (B, L_keep): a uniformly random subset per sample."""
    keep = int(num_patches * (1 - ratio))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep]


def cell_mask(batch: int, grid: int, cell: int, device: torch.device,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Ids of the kept patches, (B, (grid/cell)^2): one random patch per cell, cells in raster order."""
    cells = grid // cell
    offset = torch.randint(0, cell * cell, (batch, cells, cells), device=device, generator=generator)
    cy = torch.arange(cells, device=device).view(1, cells, 1)
    cx = torch.arange(cells, device=device).view(1, 1, cells)
    row = cy * cell + offset // cell
    col = cx * cell + offset % cell
    return (row * grid + col).reshape(batch, -1)


def init_like_mae(encoder: nn.Module) -> None:
    """MAE's initialization (also the authors'): xavier-uniform linear layers and patch projection
    (viewed as a linear map), zero biases, unit LayerNorms, N(0, 0.02) class token."""
    for m in encoder.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    proj = getattr(getattr(encoder, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    if isinstance(getattr(encoder, "cls_token", None), nn.Parameter):
        nn.init.normal_(encoder.cls_token, std=0.02)


def keep_to_mask(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, L_keep) kept ids -> (B, L) float mask, 1 = masked (removed), 0 = visible."""
    mask = torch.ones(keep.shape[0], num_patches, device=keep.device)
    return mask.scatter(1, keep, 0.0)


class MaskedAutoencoder(nn.Module):
    """MAE over a timm encoder. ``forward(images, keep)`` -> (per-patch prediction, latent z)."""

    def __init__(self, encoder: nn.Module, *, adapter: FamilyAdapter, img_size: int, patch_size: int,
                 mask_ratio: float, mean: tuple[float, ...], std: tuple[float, ...],
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True, in_chans: int = 3,
                 mask_sampling: str = "uniform"):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.mask_ratio = mask_ratio
        self.cell = cell_size(mask_ratio) if adapter.family.reads_grid and mask_sampling == "grid" else None
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

        width = encoder.embed_dim
        if adapter.family.sincos_pos_embed:
            # MAE's fixed sin-cos embedding; it is a timm parameter, so it is loaded (and may train)
            # in the fine-tuning classifier.
            with torch.no_grad():
                encoder.pos_embed.copy_(sincos_pos_embed(width, self.grid, cls_token=adapter.family.pos_embed_has_cls))
            encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, self.grid, cls_token=True),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # -- masking ---------------------------------------------------------------------------------
    def sample_keep(self, batch: int, device: torch.device | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one mask per sample; returns the ids of the visible patches, (B, L_keep)."""
        device = device or self.mean.device
        if self.cell is None:
            return uniform_mask(batch, self.num_patches, self.mask_ratio, device, generator)
        return cell_mask(batch, self.grid, self.cell, device, generator)

    def pixel_visibility(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) map, 1 on pixels of visible patches: where an attack may perturb."""
        visible = 1.0 - keep_to_mask(keep, self.num_patches)
        patches = visible.unsqueeze(-1).expand(-1, -1, self.patch_size**2)
        return unpatchify(patches, self.patch_size, channels=1)

    # -- forward ---------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def encode(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Latent z of the visible patches: (B, 1 + L_keep, D), class token first."""
        z = self.adapter.encode_visible(self.encoder, self.normalize(images), keep)
        return self.encoder.norm(z)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (B, L, p*p*C), from the latent of the visible ones."""
        x = self.decoder_embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        full = self.mask_token.to(x.dtype).expand(x.shape[0], self.num_patches, -1)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), visible)
        x = torch.cat([cls, full], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encode(images, keep)
        return self.decode(latent, keep), latent

    def reconstruction_loss(self, pred: torch.Tensor, target_images: torch.Tensor,
                            keep: torch.Tensor) -> torch.Tensor:
        """MSE on the masked patches against the (clean) target, per-patch normalized if configured."""
        target = patchify(self.normalize(target_images), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=-1)
        mask = keep_to_mask(keep, self.num_patches)
        return (per_patch * mask).sum() / mask.sum()
