"""Model factories: the MAE for pre-training and the plain timm classifier for fine-tuning."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn

from mimir.models.mae import MaskedAutoencoder, init_like_mae, patchify, unpatchify
from mimir.architectures import ARCHITECTURES, Architecture, cell_size
from mimir.models.registry import ADAPTERS

__all__ = [
    "ARCHITECTURES", "Architecture", "Classifier", "MaskedAutoencoder", "build_classifier", "build_mae",
    "cell_size", "create_encoder", "load_encoder_weights", "patchify", "unpatchify",
]


def create_encoder(arch: str, *, img_size: int, patch_size: int, num_classes: int = 0,
                   drop_path: float = 0.0, embed_dim: int | None = None, depth: int | None = None,
                   num_heads: int | None = None, in_chans: int = 3, global_pool: str = "token") -> nn.Module:
    """``timm.create_model`` of the architecture at this image and patch size (random init)."""
    spec = ARCHITECTURES[arch]
    sizes = ADAPTERS[spec.family.name].timm_kwargs(spec.default_heads, embed_dim, depth, num_heads)
    return timm.create_model(spec.timm_name, pretrained=False, img_size=img_size, patch_size=patch_size,
                             num_classes=num_classes, drop_path_rate=drop_path, in_chans=in_chans,
                             global_pool=global_pool, **sizes)


def _model_kwargs(cfg: Any) -> dict[str, Any]:
    m = cfg.model
    return dict(img_size=cfg.data.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                depth=m.depth, num_heads=m.num_heads)


def build_mae(cfg: Any) -> MaskedAutoencoder:
    """The pre-training autoencoder for a RunConfig."""
    encoder = create_encoder(cfg.model.arch, **_model_kwargs(cfg))
    m, p = cfg.model, cfg.pretrain
    if m.init == "mae":
        init_like_mae(encoder)
    return MaskedAutoencoder(
        encoder, adapter=ADAPTERS[ARCHITECTURES[m.arch].family.name], img_size=cfg.data.img_size,
        patch_size=m.patch_size, mask_ratio=p.mask_ratio, mask_sampling=p.mask_sampling, mean=cfg.data.mean,
        std=cfg.data.std, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
        mlp_ratio=m.mlp_ratio, norm_pix_loss=p.norm_pix_loss)


class Classifier(nn.Module):
    """A timm classifier (``.net``) behind the dataset's normalization, taking [0, 1] images."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder tokens before the head (the ``f_e`` of the adaptive attacks)."""
        return self.net.forward_features((images - self.mean) / self.std)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The pooled pre-logits vector the head reads (the authors' ``z`` for PGD-MI)."""
        return self.net.forward_head(features, pre_logits=True)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_classifier(cfg: Any, num_classes: int) -> Classifier:
    net = create_encoder(cfg.model.arch, num_classes=num_classes, drop_path=cfg.finetune.drop_path,
                         global_pool=cfg.finetune.global_pool, **_model_kwargs(cfg))
    return Classifier(net, cfg.data.mean, cfg.data.std)


def load_encoder_weights(net: nn.Module, mae_state: dict[str, torch.Tensor]) -> None:
    """Load a pre-training state dict's ``encoder.*`` weights into a timm classifier.

    Only the classifier head (and, with average pooling, its fresh ``fc_norm``) may be missing; with
    average pooling the encoder's final ``norm`` is dropped, as in the authors' fine-tuning. Any other
    missing or unexpected key is an error that names the keys (a wrong architecture or size must not
    fine-tune from a half-loaded encoder).
    """
    own = net.state_dict()
    encoder_state = {k.removeprefix("encoder."): v for k, v in mae_state.items() if k.startswith("encoder.")}
    if not encoder_state:
        raise ValueError("the pre-training checkpoint holds no 'encoder.*' weights")
    if not any(k.startswith("norm.") for k in own):  # timm replaced it by fc_norm after the pooling
        encoder_state = {k: v for k, v in encoder_state.items() if not k.startswith("norm.")}
    head_keys = {k for k in own if k.startswith(("head.", "fc_norm."))}
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in encoder_state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError("pre-trained encoder does not fit the classifier (shape mismatch): "
                         + "; ".join(mismatched))
    result = net.load_state_dict(encoder_state, strict=False)
    missing = sorted(set(result.missing_keys) - head_keys)
    if missing or result.unexpected_keys:
        raise ValueError(f"pre-trained encoder does not fit the classifier: missing {missing}, "
                         f"unexpected {sorted(result.unexpected_keys)}")
