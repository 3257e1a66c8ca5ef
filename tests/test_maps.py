"""raybary.map_samples: POT's gmm_ot_apply_map with the same plan, raybary's own
plan, the single-Gaussian closed form, the random map's proportions, errors.

GMMs are d = 1, 2 with at most 4 components (test_distances.py's compiled shapes).
"""

from __future__ import annotations

import numpy as np
import pytest

import raybary
from raybary import GMM
from raybary.batch import maps
from raybary.batch.maps import map_samples, monge_maps


def random_gmm(rng, d: int, k: int, shift: float = 0.0) -> GMM:
    a = rng.normal(size=(k, d, d))
    return GMM(rng.dirichlet(np.ones(k)), rng.normal(size=(k, d)) * 3.0 + shift,
               a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d))


def pot_plan(s: GMM, t: GMM) -> np.ndarray:
    ot = pytest.importorskip("ot")
    return ot.gmm.gmm_ot_plan(s.means, t.means, s.covs, t.covs, s.weights, t.weights)


def pot_map(x, s: GMM, t: GMM, plan) -> np.ndarray:
    ot = pytest.importorskip("ot")
    return ot.gmm.gmm_ot_apply_map(x, s.means, t.means, s.covs, t.covs, s.weights,
                                   t.weights, plan=plan, method="bary")


@pytest.mark.parametrize("d, ks, kt", [(1, 3, 2), (2, 3, 4), (3, 2, 3)])
def test_barycentric_map_is_pots_with_the_same_plan(d, ks, kt):
    rng = np.random.default_rng(d)
    s, t = random_gmm(rng, d, ks), random_gmm(rng, d, kt, shift=1.0)
    x = rng.normal(size=(300, d)) * 4.0
    plan = pot_plan(s, t)
    want = pot_map(x, s, t, plan)
    np.testing.assert_allclose(map_samples(x, s, t, plan=plan), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(map_samples(x, s, t, "bary", plan=plan), want, rtol=1e-10,
                               atol=1e-10)


def test_raybarys_own_plan_gives_pots_map(monkeypatch):
    rng = np.random.default_rng(7)
    s, t = random_gmm(rng, 2, 3), random_gmm(rng, 2, 4, shift=1.0)
    x = rng.normal(size=(500, 2)) * 4.0
    want = pot_map(x, s, t, pot_plan(s, t))
    spread = np.max(np.abs(want))
    # The entropic plan differs from the exact one by the blur (and float32's rounding).
    np.testing.assert_allclose(map_samples(x, s, t, dtype="float64"), want, atol=1e-8 * spread)
    np.testing.assert_allclose(map_samples(x, s, t), want, atol=1e-5 * spread)
    monkeypatch.setattr(maps, "CHUNK", 64)  # many blocks: the same numbers
    np.testing.assert_allclose(map_samples(x, s, t, dtype="float64"), want, atol=1e-8 * spread)
    assert raybary.map_samples is map_samples


def test_single_gaussians_the_map_is_the_monge_map():
    rng = np.random.default_rng(3)
    m1, m2 = np.array([1.0, -2.0]), np.array([4.0, 0.5])
    c1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    c2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
    s, t = GMM([1.0], [m1], [c1]), GMM([1.0], [m2], [c2])
    [[a]] = monge_maps(s.covs, t.covs)
    np.testing.assert_allclose(a, a.T, atol=1e-14)
    np.testing.assert_allclose(a @ c1 @ a, c2, atol=1e-12)  # pushes N(., c1) onto N(., c2)
    assert np.all(np.linalg.eigvalsh(a) > 0)
    x = rng.multivariate_normal(m1, c1, size=200_000)
    for method in ("barycentric", "random"):
        y = map_samples(x, s, t, method, seed=0)
        np.testing.assert_allclose(y, (x - m1) @ a + m2, atol=1e-12)
        # 200,000 samples: mean within ~4 standard errors, covariance within ~2%.
        assert np.all(np.abs(y.mean(axis=0) - m2) < 4 * np.sqrt(np.diag(c2) / len(x)))
        np.testing.assert_allclose(np.cov(y.T), c2, atol=0.02 * np.max(np.abs(c2)))
    # Commuting covariances: the map scales each axis by sqrt(var_t / var_s).
    d1, d2 = GMM([1.0], [[0.0]], [[[4.0]]]), GMM([1.0], [[3.0]], [[[9.0]]])
    np.testing.assert_allclose(map_samples([[0.0], [2.0]], d1, d2), [[3.0], [6.0]], atol=1e-12)


def test_random_map_sends_each_component_in_the_plans_proportions():
    # Well separated components, so each sample's source and target component is clear.
    s = GMM([0.5, 0.3, 0.2], [[0.0, 0.0], [40.0, 0.0], [0.0, 40.0]],
            [np.eye(2), 0.5 * np.eye(2), np.diag([1.0, 2.0])])
    t = GMM([0.25, 0.35, 0.4], [[100.0, 0.0], [100.0, 45.0], [60.0, 80.0]],
            [np.eye(2), np.diag([2.0, 0.5]), 1.5 * np.eye(2)])
    rng = np.random.default_rng(11)
    n = 40_000
    label = rng.choice(3, size=n, p=s.weights)
    noise = np.einsum("nab,nb->na", np.linalg.cholesky(s.covs)[label], rng.normal(size=(n, 2)))
    x = s.means[label] + noise
    _, [plan] = raybary.mw2_batch([(s, t)], plans=True, dtype="float64")
    y = map_samples(x, s, t, "random", seed=rng)
    target = np.argmin(np.sum((y[:, None, :] - t.means[None]) ** 2, axis=-1), axis=1)
    counts = np.zeros((3, 3))
    np.add.at(counts, (label, target), 1.0)
    # Each sample's posterior is one-hot here, so (source, target) is drawn from
    # plan / weights: joint frequencies within 5 binomial standard errors of the plan.
    expected = s.weights[:, None] * plan / plan.sum(axis=1, keepdims=True)
    np.testing.assert_array_less(np.abs(counts / n - expected),
                                 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12)
    assert np.count_nonzero(expected > 0.01) >= 4  # the plan splits mass: a real test
    # The same seed gives the same draw; another seed another one.
    again = map_samples(x[:100], s, t, "rand", seed=5)
    np.testing.assert_array_equal(again, map_samples(x[:100], s, t, "random", seed=5))
    assert not np.array_equal(again, map_samples(x[:100], s, t, "random", seed=6))


def test_bad_input_errors():
    rng = np.random.default_rng(1)
    s, t = random_gmm(rng, 2, 2), random_gmm(rng, 2, 3)
    x = rng.normal(size=(5, 2))
    with pytest.raises(ValueError, match=r"samples must be an \(n, 2\) array .* got shape \(5, 3\)"):
        map_samples(rng.normal(size=(5, 3)), s, t)
    with pytest.raises(ValueError, match=r"samples must be an \(n, 2\) array"):
        map_samples(np.zeros(2), s, t)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"samples must be finite: rows \[3\]"):
        map_samples(bad, s, t)
    with pytest.raises(ValueError, match="method must be 'barycentric' or 'random'"):
        map_samples(x, s, t, "nearest")
    with pytest.raises(ValueError, match="differ in dimension"):
        map_samples(x, s, random_gmm(rng, 3, 2))
    with pytest.raises(ValueError, match=r"plan must have shape \(2, 3\)"):
        map_samples(x, s, t, plan=np.ones((3, 2)) / 6)
    with pytest.raises(ValueError, match="plan must be finite and non-negative"):
        map_samples(x, s, t, plan=-np.ones((2, 3)))
    neg = GMM(s.weights, s.means, np.array([np.eye(2), -np.eye(2)]))
    with pytest.raises(ValueError, match="pair 0, a, component 1"):
        map_samples(x, neg, t)
    assert map_samples(np.zeros((0, 2)), s, t, plan=np.outer(s.weights, t.weights)).shape == (0, 2)
