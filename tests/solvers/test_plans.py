"""The plan solvers of raybary.solvers.plans, tested directly: the small
linear solve, the masked log-sum-exp, and Newton against Sinkhorn (the same
entropic fixed point, marginals met, padding inert)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raybary.solvers import plans as pl


def test_gauss_jordan_matches_numpy_on_spd_batches():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 7, 7))
    spd = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(7)
    r = rng.normal(size=(5, 7))
    with jax.enable_x64(True):
        x = np.asarray(pl.gauss_jordan_solve(jnp.asarray(spd), jnp.asarray(r)))
    np.testing.assert_allclose(x, np.linalg.solve(spd, r[..., None])[..., 0], rtol=1e-9, atol=1e-9)


def test_masked_logsumexp_empty_mask_is_zero_not_nan():
    x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    mask = jnp.asarray([[False, False], [True, False]])
    out = np.asarray(pl.masked_logsumexp(x, mask, axis=1))
    np.testing.assert_allclose(out, [0.0, 3.0])
    assert np.all(np.isfinite(out))


def _problem():
    """Two plans in the flat layout: GMM 0 has 2 components, GMM 1 has 3, one
    padded component; 4 atoms, the last one padded."""
    rng = np.random.default_rng(3)
    n, L = 4, 6
    gmm_index = np.array([0, 0, 1, 1, 1, 0], np.int32)
    comp = np.array([True] * 5 + [False])
    member = (gmm_index[None, :] == np.arange(2)[:, None]) & comp[None, :]
    w = np.array([0.3, 0.7, 0.2, 0.5, 0.3, 0.0])
    atom_mask = np.array([True, True, True, False])
    log_a = np.where(atom_mask, np.log(1 / 3), 0.0)
    log_b = np.where(comp, np.log(np.where(comp, w, 1.0)), 0.0)
    cost = rng.uniform(0, 1, (n, L))
    return cost, gmm_index, member, log_a, log_b, atom_mask, comp, w


@pytest.mark.parametrize("epsilon", [0.05, 2e-3])
def test_newton_and_sinkhorn_reach_the_same_plans(epsilon):
    cost, gmm_index, member, log_a, log_b, atom_mask, comp, w = _problem()
    with jax.enable_x64(True):
        geo = pl.plan_geometry(jnp.asarray(log_a), jnp.asarray(log_b), jnp.asarray(gmm_index),
                               jnp.asarray(member), jnp.ones(2), jnp.asarray(atom_mask))
        state = pl.init_state(jnp.asarray(cost), jnp.zeros((2, 4)), jnp.zeros(6),
                              jnp.asarray(log_a), jnp.asarray(gmm_index))
        plans = {}
        for method in ("newton", "sinkhorn"):
            opts = pl.PlanOptions(method=method, tol=1e-11, max_iterations=20000,
                                  decay=0.5, level_tol=1e-3)
            out = pl.solve_plans(state, geo, epsilon=jnp.asarray(epsilon), epsilon_start=1.0,
                                 options=opts)
            assert float(out.error) <= 1e-9, (method, float(out.error))
            assert float(out.epsilon) == pytest.approx(epsilon)
            p = np.asarray(pl.plan_matrix(out.reduced, out.epsilon, geo.atom_mask, geo.comp_mask))
            plans[method] = (p, int(out.iteration))
    p, iters = plans["newton"]
    np.testing.assert_allclose(p, plans["sinkhorn"][0], atol=1e-8)
    # Marginals: each plan's rows are a, its columns the GMM's weights; padding is empty.
    for j in range(2):
        cols = member[j]
        np.testing.assert_allclose(p[:3][:, cols].sum(axis=1), np.full(3, 1 / 3), atol=1e-9)
        np.testing.assert_allclose(p[:, cols].sum(axis=0), w[cols], atol=1e-9)
    assert np.all(p[3] == 0) and np.all(p[:, 5] == 0)
    # And the entropic optimality: P = exp((f + g - C) / eps) up to the potentials,
    # so log P + C / eps is a sum of a row and a column term on each block.
    for j in range(2):
        block = np.log(p[:3][:, member[j]]) + cost[:3][:, member[j]] / epsilon
        resid = block - block[:, :1] - block[:1, :] + block[0, 0]
        assert np.max(np.abs(resid)) < 1e-6
    assert iters < plans["sinkhorn"][1]


def test_newton_ignores_a_gmm_with_zero_lambda_and_stays_finite():
    cost, gmm_index, member, log_a, log_b, atom_mask, comp, w = _problem()
    with jax.enable_x64(True):
        geo = pl.plan_geometry(jnp.asarray(log_a), jnp.asarray(log_b), jnp.asarray(gmm_index),
                               jnp.asarray(member), jnp.asarray([1.0, 0.0]),
                               jnp.asarray(atom_mask))
        state = pl.init_state(jnp.asarray(cost), jnp.zeros((2, 4)), jnp.zeros(6),
                              jnp.asarray(log_a), jnp.asarray(gmm_index))
        out = pl.solve_plans(state, geo, epsilon=jnp.asarray(0.01), epsilon_start=1.0,
                             options=pl.PlanOptions(tol=1e-10))
        p = np.asarray(pl.plan_matrix(out.reduced, out.epsilon, geo.atom_mask, geo.comp_mask))
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(np.asarray(out.f)))
    assert float(out.error) <= 1e-10
    np.testing.assert_allclose(p[:3][:, member[0]].sum(axis=1), np.full(3, 1 / 3), atol=1e-9)


def test_unknown_plan_solver_is_refused():
    cost, gmm_index, member, log_a, log_b, atom_mask, comp, w = _problem()
    geo = pl.plan_geometry(jnp.asarray(log_a, jnp.float32), jnp.asarray(log_b, jnp.float32),
                           jnp.asarray(gmm_index), jnp.asarray(member), jnp.ones(2),
                           jnp.asarray(atom_mask))
    state = pl.init_state(jnp.asarray(cost, jnp.float32), jnp.zeros((2, 4)), jnp.zeros(6),
                          geo.log_a, jnp.asarray(gmm_index))
    with pytest.raises(ValueError, match="unknown plan solver 'lbfgs'"):
        pl.solve_plans(state, geo, epsilon=jnp.asarray(0.1), epsilon_start=1.0,
                       options=pl.PlanOptions(method="lbfgs"))


def test_newton_blocks_solve_the_block_diagonal_system():
    """Above 12 components the Newton system is solved per GMM block, gathered
    by ``block_index``: the direction must equal a dense solve of the whole
    block-diagonal system (NumPy), and the default blocks (room for all L)."""
    rng = np.random.default_rng(5)
    n, sizes = 5, (7, 8, 4)  # L = 19 real components, one padded: 20 > 12
    L = sum(sizes) + 1
    gmm_index = np.concatenate([np.full(k, j) for j, k in enumerate(sizes)] + [[0]]).astype(np.int32)
    comp = np.arange(L) < sum(sizes)
    member = (gmm_index[None, :] == np.arange(3)[:, None]) & comp[None, :]
    block_index = np.full((3, 8), L, np.int32)
    start = 0
    for j, k in enumerate(sizes):
        block_index[j, :k] = np.arange(start, start + k)
        start += k
    atom_mask = np.arange(n) < 4
    log_a = np.where(atom_mask, np.log(1 / 4), 0.0)
    w = np.where(comp, rng.uniform(0.5, 1.5, L), 0.0)
    for j in range(3):
        w[member[j]] /= w[member[j]].sum()
    log_b = np.where(comp, np.log(np.where(comp, w, 1.0)), 0.0)
    plan = np.where(atom_mask[:, None] & comp[None, :], rng.uniform(0.01, 0.2, (n, L)), 0.0)
    log_c = np.where(comp, np.log(np.maximum(plan.sum(axis=0), 1e-300)), 0.0)
    damping, eps = np.array([1e-3, 0.5, 2.0]), 0.1
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (log_a, log_b, gmm_index, member, np.ones(3), atom_mask)]
        dirs = []
        for blocks in (jnp.asarray(block_index), None):
            geo = pl.plan_geometry(*args, block_index=blocks)
            dirs.append(np.asarray(pl._newton_direction(jnp.asarray(log_c), jnp.asarray(plan),
                                                        jnp.asarray(damping), eps, geo)))
    # dense reference: ((1 + tau) I - Q^T Q + u u^T per block) y = u (log b - log c)
    u = np.where(comp, np.exp(0.5 * log_c), 0.0)
    q = np.where(comp[None, :], plan / (np.sqrt(np.where(atom_mask, 1 / 4, 1.0))[:, None]
                                        * np.where(comp, u, 1.0)[None, :]), 0.0)
    same = (gmm_index[:, None] == gmm_index[None, :]) & comp[:, None] & comp[None, :]
    m = np.diag(1.0 + damping[gmm_index]) - np.where(same, q.T @ q - np.outer(u, u), 0.0)
    y = np.linalg.solve(m, u * np.where(comp, log_b - log_c, 0.0))
    expected = np.where(comp, eps * y / np.where(comp, u, 1.0), 0.0)
    np.testing.assert_allclose(dirs[0], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dirs[1], expected, rtol=1e-9, atol=1e-12)
