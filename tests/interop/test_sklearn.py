"""GMM.from_sklearn / to_sklearn against scikit-learn's own densities, for every covariance type."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture  # noqa: E402

import raybary  # noqa: E402
from raybary import GMM  # noqa: E402
from raybary.interop.sklearn import expand_covariances, precisions_cholesky  # noqa: E402

TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(scope="module")
def iris() -> np.ndarray:
    return load_iris().data  # (150, 4)


@pytest.fixture(scope="module")
def fitted(iris) -> dict[str, GaussianMixture]:
    return {ct: GaussianMixture(3, covariance_type=ct, random_state=0).fit(iris) for ct in TYPES}


def numpy_log_density(gmm: GMM, x: np.ndarray) -> np.ndarray:
    """log sum_k w_k N(x; m_k, C_k), in NumPy (independent of raybary.density)."""
    d = x.shape[1]
    chol = np.linalg.cholesky(gmm.covs)
    diff = x[None] - gmm.means[:, None]  # (K, N, d)
    sol = np.linalg.solve(chol[:, None], diff[..., None])[..., 0]
    logn = (-0.5 * (sol**2).sum(-1) - np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(-1)[:, None]
            - 0.5 * d * np.log(2 * np.pi))
    a = logn + np.log(gmm.weights)[:, None]
    top = a.max(axis=0)
    return top + np.log(np.exp(a - top).sum(axis=0))


@pytest.mark.parametrize("ct", TYPES)
def test_from_sklearn_density_equals_score_samples(fitted, iris, ct):
    gm = fitted[ct]
    g = GMM.from_sklearn(gm)
    assert g.n_components == 3 and g.dim == 4 and g.covs.shape == (3, 4, 4)
    np.testing.assert_allclose(g.weights, gm.weights_)
    np.testing.assert_allclose(g.means, gm.means_)
    expected = gm.score_samples(iris)
    np.testing.assert_allclose(raybary.log_density(g, iris), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(numpy_log_density(g, iris), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ct", TYPES)
def test_round_trip_every_covariance_type(fitted, iris, ct):
    gm = fitted[ct]
    back = GMM.from_sklearn(gm).to_sklearn(random_state=0)
    assert back.covariance_type == "full" and back.n_components == 3 and back.converged_
    np.testing.assert_allclose(back.score_samples(iris), gm.score_samples(iris), rtol=1e-10)
    np.testing.assert_allclose(back.predict_proba(iris), gm.predict_proba(iris), atol=1e-10)
    np.testing.assert_array_equal(back.predict(iris), gm.predict(iris))
    np.testing.assert_allclose(back.score(iris), gm.score(iris), rtol=1e-10)
    x, labels = back.sample(200)
    assert x.shape == (200, 4) and set(labels) <= {0, 1, 2}
    np.testing.assert_array_equal(GMM.from_sklearn(gm).to_sklearn(random_state=0).sample(200)[0], x)
    # and back to raybary: the same arrays
    again = GMM.from_sklearn(back)
    np.testing.assert_allclose(again.covs, GMM.from_sklearn(gm).covs)


@pytest.mark.parametrize("ct", TYPES)
def test_to_sklearn_precisions_are_sklearns(fitted, ct):
    """precisions_cholesky_ / precisions_ as sklearn computes them for the full matrices."""
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    g = GMM.from_sklearn(fitted[ct])
    gm = g.to_sklearn()
    np.testing.assert_allclose(gm.precisions_cholesky_, _compute_precision_cholesky(g.covs, "full"),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gm.precisions_, np.linalg.inv(g.covs), rtol=1e-8, atol=1e-10)
    assert np.allclose(np.tril(gm.precisions_cholesky_, -1), 0)  # upper triangular
    assert gm.n_features_in_ == 4


def test_expanded_covariances_have_the_documented_structure(fitted):
    eye = np.eye(4)
    tied = GMM.from_sklearn(fitted["tied"]).covs
    assert np.array_equal(tied, np.broadcast_to(fitted["tied"].covariances_, (3, 4, 4)))
    diag = GMM.from_sklearn(fitted["diag"]).covs
    for k in range(3):
        np.testing.assert_array_equal(diag[k], np.diag(fitted["diag"].covariances_[k]))
    sph = GMM.from_sklearn(fitted["spherical"]).covs
    for k in range(3):
        np.testing.assert_array_equal(sph[k], fitted["spherical"].covariances_[k] * eye)
    with pytest.raises(ValueError, match="must have shape"):
        expand_covariances(np.ones((3, 4)), "spherical", 3, 4)
    with pytest.raises(ValueError, match="covariance_type must be one of"):
        expand_covariances(np.ones(3), "round", 3, 4)


@pytest.mark.parametrize("ct", TYPES)
def test_bayesian_gaussian_mixture(iris, ct):
    """The point estimate (weights_, means_, covariances_) of a BayesianGaussianMixture.

    Its own score_samples is a variational expectation, not this GMM's density,
    so the density is checked in NumPy and the round trip on the arrays.
    """
    bgm = BayesianGaussianMixture(n_components=3, covariance_type=ct, random_state=0,
                                  max_iter=300).fit(iris)
    g = GMM.from_sklearn(bgm)
    assert g.covs.shape == (3, 4, 4)
    np.testing.assert_allclose(g.weights, bgm.weights_)
    np.testing.assert_allclose(raybary.log_density(g, iris), numpy_log_density(g, iris), rtol=1e-10)
    back = g.to_sklearn()
    np.testing.assert_allclose(back.score_samples(iris), numpy_log_density(g, iris), rtol=1e-10)
    np.testing.assert_allclose(back.predict_proba(iris).sum(axis=1), 1.0)


def test_blobs_two_components_two_dims():
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(n_samples=120, centers=2, n_features=2, random_state=3)
    for ct in TYPES:
        gm = GaussianMixture(2, covariance_type=ct, random_state=0).fit(x)
        g = GMM.from_sklearn(gm)
        np.testing.assert_allclose(raybary.log_density(g, x), gm.score_samples(x), rtol=1e-10)
        np.testing.assert_allclose(g.to_sklearn().score_samples(x), gm.score_samples(x), rtol=1e-10)


def test_errors():
    with pytest.raises(NotFittedError):
        GMM.from_sklearn(GaussianMixture(2))
    with pytest.raises(TypeError, match="GaussianMixture or BayesianGaussianMixture"):
        GMM.from_sklearn(object())
    bad = GMM(np.array([0.5, 0.5]), np.zeros((2, 2)), np.array([np.eye(2), -np.eye(2)]))
    with pytest.raises(ValueError, match="component 1's covariance is not positive definite"):
        bad.to_sklearn()
    with pytest.raises(ValueError, match="component 1"):
        precisions_cholesky(bad.covs)
    ok = GMM(np.array([1.0]), np.zeros((1, 2)), np.eye(2)[None])
    with pytest.raises(TypeError, match="sets n_components itself"):
        ok.to_sklearn(n_components=3)


def test_missing_sklearn_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.mixture", None)  # import fails as if not installed
    g = GMM(np.array([1.0]), np.zeros((1, 2)), np.eye(2)[None])
    with pytest.raises(ImportError, match=r"GMM.to_sklearn needs scikit-learn: "
                                          r"pip install 'raybary\[sklearn\]'"):
        g.to_sklearn()
    with pytest.raises(ImportError, match=r"GMM.from_sklearn needs scikit-learn"):
        GMM.from_sklearn(object())


def test_importing_raybary_imports_no_optional_library():
    code = ("import sys, raybary, raybary.interop, raybary.storage.results; "
            "print(sorted(m for m in ('sklearn', 'ot', 'ott', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
