"""Feature nets and the Frechet distance on real MNIST digits."""

from __future__ import annotations

import numpy as np
import pytest

from mpq_search.data import mnist_split
from mpq_search.errors import UnknownFeatureNetError
from mpq_search.fid import (
    FeatureStats,
    cached_stats,
    frechet_distance,
    get_feature_net,
    stats_of_features,
    stats_of_images,
)


def test_shipped_lenet_is_accurate_on_heldout() -> None:
    net = get_feature_net("lenet")
    images, labels = mnist_split("heldout")
    accuracy = (net.net(images).argmax(1) == labels).float().mean()  # type: ignore[attr-defined]
    assert float(accuracy) >= 0.98


def test_fid_of_a_set_against_itself_is_zero() -> None:
    net = get_feature_net("lenet")
    images, _ = mnist_split("heldout")
    stats = stats_of_images(images[:500], net)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)


def test_fid_separates_different_distributions() -> None:
    net = get_feature_net("lenet")
    images, labels = mnist_split("heldout")
    train_images, _ = mnist_split("train")
    same = frechet_distance(
        stats_of_images(train_images[:1000], net), stats_of_images(images, net)
    )
    ones = stats_of_images(images[labels == 1], net)
    sevens = stats_of_images(images[labels == 7], net)
    different = frechet_distance(ones, sevens)
    assert same < 40
    assert different > 50 * same


def test_frechet_distance_matches_closed_form_for_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = stats_of_features(rng.normal(0.0, 1.0, size=(20000, 3)))
    b = stats_of_features(rng.normal(1.0, 1.0, size=(20000, 3)))
    # Same covariance: FID = |mu_a - mu_b|^2 = 3 (up to sampling noise).
    assert frechet_distance(a, b) == pytest.approx(3.0, abs=0.1)


def test_unknown_feature_net() -> None:
    with pytest.raises(UnknownFeatureNetError, match="lenet, inception"):
        get_feature_net("resnet")


def test_inception_gives_2048_features_offline() -> None:
    net = get_feature_net("inception")
    images, _ = mnist_split("heldout")
    features = net.features(images[:3])
    assert features.shape == (3, 2048)
    assert np.isfinite(features).all()


def test_cached_stats_computes_once() -> None:
    calls = []

    def compute():  # type: ignore[no-untyped-def]
        calls.append(1)
        return stats_of_features(np.arange(12, dtype=float).reshape(4, 3))

    key = {"kind": "unit-test", "n": 4}
    first = cached_stats(key, compute)
    second = cached_stats(key, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.mu, second.mu)


def test_frechet_distance_works_with_a_scipy_without_sqrtm_disp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """scipy 1.18 removed `sqrtm(..., disp=False)`, which pytorch-fid 0.3 passes: the distance
    must come out the same through the compatibility wrapper."""
    from pytorch_fid import fid_score
    from scipy import linalg

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)) + 0.5
    a = FeatureStats(x.mean(0), np.cov(x, rowvar=False), 300)
    b = FeatureStats(y.mean(0), np.cov(y, rowvar=False), 300)
    expected = frechet_distance(a, b)
    plain_sqrtm = linalg.sqrtm

    def sqrtm_without_disp(matrix: np.ndarray) -> np.ndarray:
        return plain_sqrtm(matrix)

    monkeypatch.setattr(linalg, "sqrtm", sqrtm_without_disp)
    monkeypatch.setattr(fid_score, "linalg", linalg)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
