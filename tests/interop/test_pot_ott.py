"""GMM.to_pot / from_pot and to_ott / from_ott, checked with POT's and OTT-JAX's own functions."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import raybary
from raybary import GMM


def random_gmm(seed: int, k: int = 3, d: int = 2) -> GMM:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d))
    w = rng.uniform(0.2, 1.0, size=k)
    return GMM(w / w.sum(), rng.normal(scale=3.0, size=(k, d)),
               a @ np.swapaxes(a, 1, 2) + 0.3 * np.eye(d))


def points(seed: int = 9, n: int = 50, d: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=3.0, size=(n, d))


# ------------------------------------------------------------------ POT
def test_to_pot_is_means_covs_weights_and_round_trips():
    g = random_gmm(0)
    m, c, w = g.to_pot()
    assert m.shape == (3, 2) and c.shape == (3, 2, 2) and w.shape == (3,)
    np.testing.assert_array_equal(m, g.means)
    np.testing.assert_array_equal(c, g.covs)
    np.testing.assert_array_equal(w, g.weights)
    m[0, 0] = 99.0  # copies: the GMM is unchanged
    assert g.means[0, 0] != 99.0
    back = GMM.from_pot(*g.to_pot())
    for a, b in zip((back.weights, back.means, back.covs), (g.weights, g.means, g.covs)):
        np.testing.assert_array_equal(a, b)


def test_pot_pdf_equals_our_density():
    ot = pytest.importorskip("ot")
    g, x = random_gmm(1), points()
    pdf = ot.gmm.gmm_pdf(x, *g.to_pot())
    np.testing.assert_allclose(np.log(pdf), raybary.log_density(g, x), rtol=1e-10, atol=1e-12)


def test_pot_gmm_ot_loss_on_converted_arrays():
    ot = pytest.importorskip("ot")
    g1, g2 = random_gmm(2), random_gmm(3, k=2)
    m1, c1, w1 = g1.to_pot()
    m2, c2, w2 = g2.to_pot()
    assert ot.gmm.gmm_ot_loss(m1, m1, c1, c1, w1, w1) == pytest.approx(0.0, abs=1e-8)
    d12 = ot.gmm.gmm_ot_loss(m1, m2, c1, c2, w1, w2)
    d21 = ot.gmm.gmm_ot_loss(m2, m1, c2, c1, w2, w1)
    assert d12 > 0 and d12 == pytest.approx(d21, rel=1e-9)
    # a single Gaussian each: MW2^2 is the Bures-Wasserstein distance (POT's own)
    a, b = GMM(*[x[:1] for x in (w1 * 0 + 1, m1, c1)]), GMM(*[x[:1] for x in (w2 * 0 + 1, m2, c2)])
    (ma, ca, wa), (mb, cb, wb) = a.to_pot(), b.to_pot()
    assert ot.gmm.gmm_ot_loss(ma, mb, ca, cb, wa, wb) == pytest.approx(
        float(ot.gmm.dist_bures_squared(ma, mb, ca, cb)[0, 0]), rel=1e-8)


def test_pot_barycenter_back_into_a_gmm():
    """POT's fixed-point barycenter, fed our arrays, comes back as a valid GMM."""
    ot = pytest.importorskip("ot")
    g1, g2 = random_gmm(4), random_gmm(5)
    (m1, c1, w1), (m2, c2, w2) = g1.to_pot(), g2.to_pot()
    means, covs = ot.gmm.gmm_barycenter_fixed_point([m1, m2], [c1, c2], [w1, w2], m1, c1,
                                                    np.array([0.5, 0.5]), w_bar=w1, iterations=5)
    bary = GMM.from_pot(means, covs, w1)
    assert bary.means.shape == (3, 2) and np.all(np.linalg.eigvalsh(bary.covs) > 0)


def test_from_pot_takes_other_backends():
    pytest.importorskip("ot")
    jnp = pytest.importorskip("jax.numpy")
    g = random_gmm(6)
    back = GMM.from_pot(*(jnp.asarray(a) for a in g.to_pot()))
    assert back.means.dtype == np.float64 and isinstance(back.means, np.ndarray)
    np.testing.assert_allclose(back.covs, g.covs, rtol=1e-6)


def test_from_pot_without_pot_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot.backend", None)

    class Foreign:  # not NumPy: needs POT's backends
        pass

    with pytest.raises(ImportError, match=r"needs POT: pip install 'raybary\[pot\]'"):
        GMM.from_pot(Foreign(), Foreign(), Foreign())
    g = GMM.from_pot(np.zeros((1, 2)), np.eye(2)[None], np.ones(1))  # NumPy needs no POT
    assert g.n_components == 1


# ------------------------------------------------------------------ OTT-JAX
@pytest.fixture
def ott_gm():
    return pytest.importorskip("ott.tools.gaussian_mixture.gaussian_mixture")


def test_ott_log_prob_equals_our_density(ott_gm):
    import jax

    g, x = random_gmm(7), points()
    ours = raybary.log_density(g, x)
    gm = g.to_ott()
    assert isinstance(gm, ott_gm.GaussianMixture) and gm.n_components == 3
    np.testing.assert_allclose(np.asarray(gm.log_prob(x)), ours, rtol=1e-4, atol=1e-4)  # float32
    with jax.enable_x64(True):
        gm64 = g.to_ott()
        assert gm64.loc.dtype == np.float64
        np.testing.assert_allclose(np.asarray(gm64.log_prob(x)), ours, rtol=1e-10, atol=1e-10)
        back = GMM.from_ott(gm64)
    for a, b in zip((back.weights, back.means, back.covs), (g.weights, g.means, g.covs)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_from_ott_of_an_ott_mixture(ott_gm):
    import jax

    with jax.enable_x64(True):
        gm = ott_gm.GaussianMixture.from_random(jax.random.key(0), n_components=4, n_dimensions=3)
        g = GMM.from_ott(gm)
        x = np.asarray(gm.sample(jax.random.key(1), 40))
        assert g.n_components == 4 and g.dim == 3 and g.weights.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(raybary.log_density(g, x), np.asarray(gm.log_prob(x)),
                                   rtol=1e-10, atol=1e-10)
        again = g.to_ott()
        np.testing.assert_allclose(np.asarray(again.log_prob(x)), np.asarray(gm.log_prob(x)),
                                   rtol=1e-10, atol=1e-10)


def test_to_ott_weights_zero_and_unnormalised(ott_gm):
    import jax

    g = random_gmm(8, k=3)
    w = np.array([0.5, 0.0, 1.5])  # unnormalised, and a component of weight 0
    with jax.enable_x64(True):
        gm = GMM(w, g.means, g.covs).to_ott()
        assert gm.n_components == 2
        np.testing.assert_allclose(np.asarray(gm.component_weights), [0.25, 0.75])
        np.testing.assert_allclose(np.asarray(gm.loc), g.means[[0, 2]])
        x = points()
        ref = raybary.log_density(GMM(w / w.sum(), g.means, g.covs), x)
        np.testing.assert_allclose(np.asarray(gm.log_prob(x)), ref, rtol=1e-10)


def test_ott_errors(ott_gm, monkeypatch):
    bad = GMM(np.array([0.5, 0.5]), np.zeros((2, 2)), np.array([np.eye(2), -np.eye(2)]))
    with pytest.raises(ValueError, match="component 1's covariance is not positive definite"):
        bad.to_ott()
    with pytest.raises(ValueError, match="every component has weight 0"):
        GMM(np.zeros(1), np.zeros((1, 2)), np.eye(2)[None]).to_ott()
    with pytest.raises(TypeError, match="GaussianMixture"):
        GMM.from_ott(object())
    monkeypatch.setitem(sys.modules, "ott.tools.gaussian_mixture.gaussian_mixture", None)
    with pytest.raises(ImportError, match=r"GMM.to_ott needs OTT-JAX: pip install 'raybary\[ott\]'"):
        random_gmm(0).to_ott()
