import math

import pytest
import torch

from mimir.mi import gaussian_gram, hsic, hsic_cca, make_estimator, renyi_entropy, renyi_mi


def test_hsic_matches_hand_computed_two_points():
    # Two samples at distance 1 with sigma 1: K = [[1, k], [k, 1]], k = exp(-1/2).
    # H K H = (1 - k)/2 * [[1, -1], [-1, 1]], so tr(Kx H Ky H) = sum(H K H * K) = (1 - k)^2
    # and HSIC = (1 - k)^2 / N^2 with N = 2.
    x = torch.tensor([[0.0], [1.0]])
    k = math.exp(-0.5)
    expected = (1 - k) ** 2 / 4
    assert hsic(x, x, 1.0, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_hsic_matches_trace_formula():
    x, y = torch.randn(7, 3), torch.randn(7, 5)
    kx, ky = gaussian_gram(x, 1.5), gaussian_gram(y, 2.0)
    h = torch.eye(7) - torch.ones(7, 7) / 7
    expected = torch.trace(kx @ h @ ky @ h) / 49
    assert hsic(x, y, 1.5, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hsic_independent_near_zero_dependent_larger():
    x = torch.randn(256, 8)
    independent = hsic(x, torch.randn(256, 8)).item()
    dependent = hsic(x, x).item()
    assert abs(independent) < 0.1 * dependent
    assert dependent > 5 * abs(independent)


def test_renyi_mi_of_x_with_itself_is_its_entropy():
    # Four well-separated clusters of identical points: the Gram matrix is 0/1, so Kx * Kx = Kx and
    # I(X; X) = H(X) exactly (= log2 4 bits for four equal clusters).
    centers = torch.eye(4) * 100.0
    x = centers.repeat_interleave(5, dim=0)
    h = renyi_entropy(gaussian_gram(x, 1.0), alpha=1.01)
    assert h.item() == pytest.approx(2.0, abs=1e-3)
    assert renyi_mi(x, x, alpha=1.01, sigma_x=1.0, sigma_y=1.0).item() == pytest.approx(h.item(), abs=1e-4)


def test_renyi_mi_bounded_by_entropies_and_larger_when_dependent():
    x = torch.randn(64, 4)
    mi_self = renyi_mi(x, x).item()
    mi_indep = renyi_mi(x, torch.randn(64, 4)).item()
    h = renyi_entropy(gaussian_gram(x)).item()
    assert mi_self <= h + 1e-4
    assert mi_self > mi_indep


def test_hsic_cca_follows_the_released_formula():
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    h = (torch.eye(6) - torch.ones(6, 6) / 6).double()

    def r(v):
        d = torch.cdist(v, v) ** 2
        k = torch.exp(-d / (2 * 25.0 * v.shape[1])) @ h
        return k @ torch.inverse(k + 1e-5 * 6 * torch.eye(6, dtype=k.dtype))

    expected = (r(x.double()) * r(y.double()).T).sum()
    # the ridge eps * N = 6e-5 makes (K + ridge) ill-conditioned (~1e5): float32 agrees to ~1e-2
    assert hsic_cca(x, y).item() == pytest.approx(expected.item(), rel=2e-2)
    assert hsic_cca(x, x).item() > hsic_cca(x, y).item()


@pytest.mark.parametrize("name", ["hsic", "hsic_cca", "renyi"])
def test_estimators_are_differentiable_float32_and_finite_on_degenerate_batches(name):
    estimator = make_estimator(name)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    z = torch.randn(8, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = estimator(x, z)
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    same = torch.ones(4, 10)
    assert torch.isfinite(estimator(same, same))
    with pytest.raises(ValueError, match="at least 2"):
        estimator(torch.randn(1, 3), torch.randn(1, 3))


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="nope"):
        make_estimator("nope")
