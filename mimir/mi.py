"""Mutual-information estimators for the penalty I(x + delta, z), all differentiable.

Inputs are (N, ...) batches flattened per sample. Everything runs in float32 with autocast off:
Gram matrices of exponentials lose too much in half precision. A kernel width of ``None`` uses the
median heuristic: sigma = median pairwise Euclidean distance of the batch (detached, floored at
1e-2, the mean distance when the median is zero), so the kernel adapts to the data's scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIN_SIGMA = 1e-2


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


def gaussian_gram(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))."""
    sq = squared_distances(x)
    s = median_sigma(sq) if sigma is None else torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return torch.exp(-sq / (2 * s * s))


def _centering(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, device=device) - torch.full((n, n), 1.0 / n, device=device)


def hsic(x: torch.Tensor, y: torch.Tensor, sigma_x: float | None = None,
         sigma_y: float | None = None) -> torch.Tensor:
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


def renyi_mi(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.01, sigma_x: float | None = None,
             sigma_y: float | None = None) -> torch.Tensor:
    """Matrix-based Renyi alpha-order MI in bits, Eq. 25-27: H(X) + H(Y) - H(X, Y)."""
    if alpha == 1.0:
        raise ValueError("alpha must differ from 1")
    with torch.autocast(x.device.type, enabled=False):
        x, y = _prepare(x, y)
        kx, ky = gaussian_gram(x, sigma_x), gaussian_gram(y, sigma_y)
        return renyi_entropy(kx, alpha) + renyi_entropy(ky, alpha) - renyi_entropy(kx * ky, alpha)


Estimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_estimator(name: str, sigma: float | None = None, alpha: float = 1.01) -> Estimator | None:
    """The estimator a config names, bound to its options; None for ``"none"``."""
    if name == "none":
        return None
    if name == "hsic":
        return lambda x, y: hsic(x, y, sigma, sigma)
    if name == "hsic_cca":
        return lambda x, y: hsic_cca(x, y, 5.0 if sigma is None else sigma)
    if name == "renyi":
        return lambda x, y: renyi_mi(x, y, alpha, sigma, sigma)
    raise ValueError(f"unknown MI estimator {name!r}; choose none, hsic, hsic_cca or renyi")
