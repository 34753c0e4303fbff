"""Mutual-information estimators for the penalty I(x + delta, z), all differentiable, and the
penalty lambda * I itself (:class:`MIPenalty`), the one object the pre-training step, the bench and
PGD-MI use.

Inputs are (N, ...) batches flattened per sample. Everything runs in float32 with autocast off:
Gram matrices of exponentials lose too much in half precision. Kernel widths (detached, floored at
1e-2): "median" is the median pairwise Euclidean distance of the batch (the mean when the median is
zero); "authors" is the I_alpha rule of the authors' code, which uses exp(-d^2 / s) with s the mean
distance from the batch's first 10 samples to all samples, i.e. the RBF of Eq. 25 with
sigma = sqrt(s / 2).

The estimators live on very different scales, so one lambda means different things for each. On a
quickstart batch (128 digits, its ViT at random init, 1-step attack) the values are about hsic
1.2e-3, renyi 6.9 (authors' width; 0.96 with the median width) and hsic_cca 8.5, and the MI term's
share of the encoder gradient per unit lambda about 1.9e-3, 0.037 (1.4) and 7.9 (``mimir mi-scale
CONFIG`` measures it for any config); the README lists the lambda range that makes each active.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mimir.config import EstimatorConfig, MIConfig

MIN_SIGMA = 1e-2
AUTHORS_WIDTH_SAMPLES = 10  # the authors' I_alpha width averages distances from this many samples
Width = float | str | None


def _prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"MI estimation needs a batch of at least 2 samples, got {x.shape[0]}")
    return x.reshape(x.shape[0], -1).float(), y.reshape(y.shape[0], -1).float()


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances of the rows of x, clamped at 0 against round-off."""
    sq = (x * x).sum(dim=1, keepdim=True)
    return (sq - 2 * x @ x.T + sq.T).clamp_min(0.0)


def median_sigma(sq_dist: torch.Tensor) -> torch.Tensor:
    """Median pairwise distance (off-diagonal) as the Gaussian kernel width; no gradient flows."""
    n = sq_dist.shape[0]
    dist = sq_dist.detach()[~torch.eye(n, dtype=torch.bool, device=sq_dist.device)].sqrt()
    sigma = dist.median()
    if sigma <= 0:
        sigma = dist.mean()
    return sigma.clamp_min(MIN_SIGMA)


def authors_sigma(sq_dist: torch.Tensor) -> torch.Tensor:
    """The authors' I_alpha width as an RBF sigma: sqrt(s / 2), s = mean distance of the first 10 rows."""
    s = sq_dist.detach()[:AUTHORS_WIDTH_SAMPLES].sqrt().mean().clamp_min(MIN_SIGMA)
    return (s / 2).sqrt()


def gaussian_gram(x: torch.Tensor, sigma: Width = None) -> torch.Tensor:
    """K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)); sigma a number, "median" / None or "authors"."""
    sq = squared_distances(x)
    if sigma is None or sigma == "median":
        s = median_sigma(sq)
    elif sigma == "authors":
        s = authors_sigma(sq)
    else:
        s = torch.as_tensor(float(sigma), dtype=x.dtype, device=x.device)
    return torch.exp(-sq / (2 * s * s))


def _centering(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, device=device) - torch.full((n, n), 1.0 / n, device=device)


def hsic(x: torch.Tensor, y: torch.Tensor, sigma_x: Width = None, sigma_y: Width = None) -> torch.Tensor:
    """Empirical HSIC, Eq. 29: (1/N^2) tr(Kx H Ky H) with Gaussian kernels."""
    with torch.autocast(x.device.type, enabled=False):
        x, y = _prepare(x, y)
        n = x.shape[0]
        h = _centering(n, x.device)
        kx, ky = gaussian_gram(x, sigma_x), gaussian_gram(y, sigma_y)
        # tr(Kx H Ky H) = sum((H Kx H) * Ky), since H is symmetric and idempotent
        return ((h @ kx @ h) * ky).sum() / (n * n)


def hsic_cca(x: torch.Tensor, y: torch.Tensor, sigma: float = 5.0, eps: float = 1e-5) -> torch.Tensor:
    """The normalized-CCA HSIC of the authors' released code (what their runs call HSIC).

    K = exp(-||xi - xj||^2 / (2 sigma^2 d)) with d the feature dimension, centred on the right
    (K H); R = K (K + eps N I)^-1; the value is sum(Rx * Ry^T).
    """
    with torch.autocast(x.device.type, enabled=False):
        x, y = _prepare(x, y)
        n = x.shape[0]
        h = _centering(n, x.device)
        ridge = eps * n * torch.eye(n, device=x.device)

        def resolvent(v: torch.Tensor) -> torch.Tensor:
            k = torch.exp(-squared_distances(v) / (2 * sigma * sigma * v.shape[1])) @ h
            return torch.linalg.solve(k + ridge, k, left=False)  # k (k + ridge)^-1

        return (resolvent(x) * resolvent(y).T).sum()


def renyi_entropy(gram: torch.Tensor, alpha: float = 1.01) -> torch.Tensor:
    """Matrix-based Renyi alpha-entropy in bits, Eq. 25, of a (PSD) Gram matrix."""
    normalized = gram / torch.trace(gram)
    eigenvalues = torch.linalg.eigvalsh(normalized).clamp_min(0.0)
    return torch.log2((eigenvalues**alpha).sum()) / (1.0 - alpha)


def renyi_mi(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.01, sigma_x: Width = None,
             sigma_y: Width = None) -> torch.Tensor:
    """Matrix-based Renyi alpha-order MI in bits, Eq. 25-27: H(X) + H(Y) - H(X, Y)."""
    if alpha == 1.0:
        raise ValueError("alpha must differ from 1")
    with torch.autocast(x.device.type, enabled=False):
        x, y = _prepare(x, y)
        kx, ky = gaussian_gram(x, sigma_x), gaussian_gram(y, sigma_y)
        return renyi_entropy(kx, alpha) + renyi_entropy(ky, alpha) - renyi_entropy(kx * ky, alpha)


Estimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_estimator(name: str, sigma: Width = None, alpha: float = 1.01) -> Estimator | None:
    """The estimator a config names, bound to its options; None for ``"none"``.

    ``sigma=None`` takes each estimator's default width: hsic_cca 5.0, hsic "median", renyi "authors".
    """
    if name == "none":
        return None
    if name == "hsic":
        width = "median" if sigma is None else sigma
        return lambda x, y: hsic(x, y, width, width)
    if name == "hsic_cca":
        if isinstance(sigma, str):
            raise ValueError(f"hsic_cca takes a numeric kernel width, got {sigma!r}")
        return lambda x, y: hsic_cca(x, y, 5.0 if sigma is None else sigma)
    if name == "renyi":
        width = "authors" if sigma is None else sigma
        return lambda x, y: renyi_mi(x, y, alpha, width, width)
    raise ValueError(f"unknown MI estimator {name!r}; choose none, hsic, hsic_cca or renyi")


@dataclass(frozen=True)
class MIPenalty:
    """lambda * I(input, z) for the pre-training loss (Eq. 8) or an adaptive attack (Eq. 21).

    ``on_clean`` estimates I(x, z) instead of I(x + delta, z) (the authors' I_alpha code).
    """

    estimator: Estimator
    weight: float
    on_clean: bool = False

    @classmethod
    def from_config(cls, cfg: "EstimatorConfig | MIConfig") -> "MIPenalty | None":
        """The configured penalty, or None when it is off (no estimator, or lambda = 0)."""
        estimator = make_estimator(cfg.estimator, cfg.sigma, cfg.alpha)
        if estimator is None or cfg.weight == 0:
            return None
        return cls(estimator, cfg.weight, getattr(cfg, "input", "adversarial") == "clean")

    def mi(self, clean: torch.Tensor, adversarial: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The unweighted estimate I(input, z)."""
        return self.estimator(clean if self.on_clean else adversarial, latent)

    def __call__(self, clean: torch.Tensor, adversarial: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return self.weight * self.mi(clean, adversarial, latent)
