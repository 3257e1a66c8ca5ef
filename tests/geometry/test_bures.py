"""raybary.geometry.bures: closed forms against eigendecompositions and SciPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from raybary.geometry.bures import (
    bures_barycenter,
    bures_cost,
    bures_cost_from_cross,
    bures_cross_sqrtm,
    jacobi_svd,
    sqrtm,
    sqrtm_and_inv,
)


def spd(rng, n, d, cond=30.0):
    q, _ = np.linalg.qr(rng.normal(size=(n, d, d)))
    lam = np.exp(rng.uniform(0, np.log(cond), size=(n, d)))
    return (q * lam[:, None, :]) @ np.swapaxes(q, -1, -2)


def reference_cost(m1, s1, m2, c2):
    r = scipy.linalg.sqrtm(s1)
    cross = scipy.linalg.sqrtm(r @ c2 @ r).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(c2) - 2 * np.trace(cross))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_sqrtm_and_inverse_match_the_eigendecomposition(d):
    a = spd(np.random.default_rng(d), 8, d)
    lam, vec = np.linalg.eigh(a)
    expected = (vec * np.sqrt(lam)[:, None, :]) @ np.swapaxes(vec, -1, -2)
    root = np.asarray(sqrtm(jnp.asarray(a, jnp.float32)))
    np.testing.assert_allclose(root, expected, rtol=2e-5, atol=2e-5)
    root2, inv = (np.asarray(x) for x in sqrtm_and_inv(jnp.asarray(a, jnp.float32)))
    np.testing.assert_allclose(root2, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(inv @ root2, np.broadcast_to(np.eye(d), a.shape), atol=1e-4)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_bures_cost_closed_forms_match_scipy(d):
    rng = np.random.default_rng(10 + d)
    s, c = spd(rng, 6, d), spd(rng, 6, d)
    m1, m2 = rng.normal(size=(6, d)), rng.normal(size=(6, d))
    ours = np.asarray(bures_cost(*(jnp.asarray(x, jnp.float32) for x in (m1, s, m2, c))))
    expected = [reference_cost(m1[i], s[i], m2[i], c[i]) for i in range(6)]
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    # The cross-term route (what the solver uses) gives the same numbers.
    root = sqrtm(jnp.asarray(s, jnp.float32))
    cross = bures_cross_sqrtm(root, jnp.asarray(c, jnp.float32))
    via_cross = bures_cost_from_cross(*(jnp.asarray(x, jnp.float32) for x in (m1, s, m2, c)), cross)
    np.testing.assert_allclose(np.asarray(via_cross), expected, rtol=1e-4, atol=1e-4)


def test_commuting_covariances_and_a_padded_dimension():
    # Diagonal covariances: W2^2 = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2.
    a, b = np.array([0.5, 2.0]), np.array([3.0, 0.25])
    m1, m2 = np.array([1.0, -1.0]), np.array([0.0, 2.0])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = bures_cost(jnp.asarray(m1), jnp.diag(jnp.asarray(a)), jnp.asarray(m2), jnp.diag(jnp.asarray(b)))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # A third dimension that is N(0, 1) in both adds nothing (padding is exact).
    pad = bures_cost(jnp.asarray(np.append(m1, 0.0)), jnp.diag(jnp.asarray(np.append(a, 1.0))),
                     jnp.asarray(np.append(m2, 0.0)), jnp.diag(jnp.asarray(np.append(b, 1.0))))
    np.testing.assert_allclose(float(pad), expected, rtol=1e-5)


def test_gaussian_barycenter_of_commuting_covariances_is_closed_form():
    # Commuting covariances: S = (sum_l w_l C_l^{1/2})^2, mean = sum_l w_l m_l.
    w = np.array([0.2, 0.5, 0.3])
    diag = np.array([[1.0, 4.0], [9.0, 0.25], [2.0, 2.0]])
    means = np.array([[0.0, 1.0], [2.0, -1.0], [1.0, 1.0]])
    covs = np.stack([np.diag(x) for x in diag])
    m, s = bures_barycenter(jnp.asarray(means, jnp.float32), jnp.asarray(covs, jnp.float32),
                            jnp.asarray(w, jnp.float32), iterations=30)
    np.testing.assert_allclose(np.asarray(m), w @ means, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s), np.diag((w @ np.sqrt(diag)) ** 2), rtol=1e-5, atol=1e-6)


def test_cross_term_keeps_small_directions_in_float32():
    # Condition numbers ~4e3 (validation allows up to ~8e5 in float32): the
    # eigenvalues of S^1/2 C S^1/2 span ~1e7, more than float32 resolves, so a
    # square root taken from them lost the small directions (costs off by up
    # to 2.6 here, enough to make the outer iteration cycle); the singular
    # values of S^1/2 C^1/2 span only ~4e3.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(64, 3, 3)))
    c = (q * np.array([1.0, 650.0, 4400.0])) @ np.swapaxes(q, 1, 2)
    q, _ = np.linalg.qr(rng.normal(size=(64, 3, 3)))
    s = (q * np.array([1.5, 300.0, 5000.0])) @ np.swapaxes(q, 1, 2)
    ref = np.array([scipy.linalg.sqrtm(scipy.linalg.sqrtm(a) @ b @ scipy.linalg.sqrtm(a)).real
                    for a, b in zip(s, c)])
    s32, c32 = jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32)
    cross = np.asarray(bures_cross_sqrtm(sqrtm(s32), c32, sqrtm(c32)))
    assert np.abs(cross - ref).max() < 0.05  # 0.98 from the square root of the product
    old = np.asarray(bures_cross_sqrtm(sqrtm(s32), c32))
    assert np.abs(old - ref).max() > 0.1  # the case is hard for the old route
    cost_err = 2 * np.abs(np.trace(cross - ref, axis1=1, axis2=2))
    assert cost_err.max() < 0.1  # was 2.6
    root, inv = sqrtm_and_inv(c32)
    np.testing.assert_allclose(np.asarray(inv @ root), np.broadcast_to(np.eye(3), c.shape), atol=1e-3)


@pytest.mark.parametrize("d", [3, 5, 8])
def test_jacobi_svd_matches_lapack_on_ill_conditioned_batches(d):
    # One-sided Jacobi (the d >= 3 cross term): singular values and vectors of
    # M = S^1/2 C^1/2 against NumPy's LAPACK in float64,
    # computed in float32 on condition numbers 1e4 (each factor: 1e8 in products).
    rng = np.random.default_rng(d)
    s, c = spd(rng, 256, d, cond=1e4), spd(rng, 256, d, cond=1e4)
    m = np.array([scipy.linalg.sqrtm(a).real @ scipy.linalg.sqrtm(b).real for a, b in zip(s, c)])
    sig, u = jacobi_svd(jnp.asarray(m, jnp.float32))
    ref = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(np.sort(np.asarray(sig), axis=-1)[:, ::-1], ref,
                               rtol=0, atol=2e-6 * ref.max())
    # U diagonalises M M^T with the squared singular values
    mmt = np.einsum("bij,bkj->bik", m, m)
    np.testing.assert_allclose(np.einsum("bji,bjk,bkl->bil", np.asarray(u), mmt, np.asarray(u)),
                               np.asarray(sig)[:, :, None] ** 2 * np.eye(d), rtol=0,
                               atol=1e-5 * ref.max() ** 2)
    u = np.asarray(u)
    np.testing.assert_allclose(np.swapaxes(u, 1, 2) @ u, np.broadcast_to(np.eye(d), u.shape),
                               atol=1e-5)
    # The cross term it gives equals SciPy's (S^1/2 C S^1/2)^1/2.
    cross = np.asarray(bures_cross_sqrtm(jnp.asarray([scipy.linalg.sqrtm(a).real for a in s],
                                                     jnp.float32),
                                         jnp.asarray(c, jnp.float32),
                                         jnp.asarray([scipy.linalg.sqrtm(b).real for b in c],
                                                     jnp.float32)))
    ref_cross = np.array([scipy.linalg.sqrtm(mm @ mm.T).real for mm in m])
    np.testing.assert_allclose(cross, ref_cross, rtol=0, atol=1e-5 * np.abs(ref_cross).max())
