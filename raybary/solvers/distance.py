r"""The mixture-Wasserstein distance between two GMMs, as one entropic plan.

:math:`MW_2^2(\mu_a, \mu_b) = \min_P \sum_{ij} P_{ij} W_2^2(\mathcal{N}_i^a,
\mathcal{N}_j^b)` over couplings :math:`P` of the component weights
:math:`w^a, w^b` (Delon & Desolneux 2020), the convention of POT's
``ot.gmm.gmm_ot_loss``. It is the plan problem of :mod:`raybary.solvers.plans`
with one input GMM (``J = 1``): ``a``'s components are the "atoms", ``b`` the
input, the cost is the Bures–Wasserstein cost between components
(:mod:`raybary.geometry.bures`). The plan is solved to the same fixed point
(same solver, same schedule) as the barycenter's plans, and the value returned
is its transport cost :math:`\langle P_\varepsilon, C\rangle` (not the entropic
objective), which tends to :math:`MW_2^2` as :math:`\varepsilon \to 0`.

Everything here is one pair, fixed shapes (padded components masked out), so
:func:`pair_distance` can be vmapped over a padded batch of pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from raybary.geometry.bures import bures_cost, bures_cost_from_cross, bures_cross_sqrtm, sqrtm
from raybary.solvers.config import PlanOptions
from raybary.solvers.plans import init_state, plan_geometry, plan_matrix, solve_plans

__all__ = ["PairDistance", "component_costs", "pair_distance", "batch_distance"]


class PairDistance(NamedTuple):
    """One pair's result: ``value`` (transport cost of the plan), ``plan
    (Ka, Kb)``, the plan's L1 marginal ``error``, plan ``iterations``, the
    absolute ``epsilon`` used (in the pair's units) and the dual potentials
    ``f (Ka,)``, ``g (Kb,)`` with ``plan = exp((f_i + g_j - C_ij) / epsilon)``
    on the real components (0 on padded ones; :mod:`raybary.jax`'s weight
    gradients)."""

    value: jnp.ndarray
    plan: jnp.ndarray
    error: jnp.ndarray
    iterations: jnp.ndarray
    epsilon: jnp.ndarray
    f: jnp.ndarray
    g: jnp.ndarray


def component_costs(means_a, covs_a, means_b, covs_b) -> jnp.ndarray:
    """Bures–Wasserstein cost ``(Ka, Kb)`` between every component of ``a`` and of ``b``.

    For ``d >= 3`` the cross term comes from the singular values of
    :math:`A^{1/2} B^{1/2}` (:func:`~raybary.geometry.bures.bures_cross_sqrtm`
    with both roots), which keeps ill-conditioned pairs accurate in float32.
    """
    ma, ca = means_a[:, None, :], covs_a[:, None, :, :]
    mb, cb = means_b[None, :, :], covs_b[None, :, :, :]
    if means_a.shape[-1] <= 2:
        return bures_cost(ma, ca, mb, cb)
    cross = bures_cross_sqrtm(sqrtm(covs_a)[:, None], cb, sqrtm(covs_b)[None])
    return bures_cost_from_cross(ma, ca, mb, cb, cross)


def pair_distance(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon,
                  relative, *, options: PlanOptions) -> PairDistance:
    r"""Entropic :math:`MW_2^2` of one padded pair (components of zero weight,
    padding included, are masked out).

    ``epsilon`` is absolute, or (``relative``) a fraction of the independent
    coupling's cost :math:`\sum_{ij} w^a_i w^b_j C_{ij}` (the same scale as the
    barycenter's relative epsilon). The epsilon-scaling starts at that scale.
    """
    dtype = means_a.dtype
    mask_a, mask_b = weights_a > 0, weights_b > 0
    mask = mask_a[:, None] & mask_b[None, :]
    cost = jnp.where(mask, component_costs(means_a, covs_a, means_b, covs_b), 0.0)
    scale = jnp.sum(weights_a[:, None] * weights_b[None, :] * cost)
    scale = jnp.maximum(scale, jnp.finfo(dtype).eps)
    eps = jnp.where(relative, epsilon * scale, epsilon)
    eps = jnp.maximum(eps, jnp.finfo(dtype).eps * scale).astype(dtype)
    log_a = jnp.where(mask_a, jnp.log(jnp.where(mask_a, weights_a, 1.0)), 0.0)
    log_b = jnp.where(mask_b, jnp.log(jnp.where(mask_b, weights_b, 1.0)), 0.0)
    n_a, n_b = weights_a.shape[0], weights_b.shape[0]
    gmm_index = jnp.zeros((n_b,), jnp.int32)
    geo = plan_geometry(log_a, log_b, gmm_index, mask_b[None, :], jnp.ones((1,), dtype), mask_a)
    state = init_state(cost, jnp.zeros((1, n_a), dtype), jnp.zeros((n_b,), dtype), log_a,
                       gmm_index)
    result = solve_plans(state, geo, epsilon=eps, epsilon_start=jnp.maximum(scale, eps),
                         options=options)
    plan = plan_matrix(result.reduced, result.epsilon, mask_a, mask_b)
    return PairDistance(jnp.sum(plan * cost), plan, result.error, result.iteration, eps,
                        jnp.where(mask_a, result.f[0], 0.0), jnp.where(mask_b, result.g, 0.0))


def batch_distance(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon,
                   relative, *, options: PlanOptions) -> PairDistance:
    """:func:`pair_distance` over a leading batch axis (``epsilon (B,)``, ``relative`` shared)."""
    fn = jax.vmap(lambda *args: pair_distance(*args, relative, options=options))
    return fn(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon)
