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
:func:`run_pairs` solves a whole batch by continuous batching inside one
compiled program: ``slots`` pairs are iterated at once and a slot whose plan
is solved takes the next waiting pair (no host round trip).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from raybary.geometry.bures import bures_cost, bures_cost_from_cross, bures_cross_sqrtm, sqrtm
from raybary.solvers.config import PlanOptions
from raybary.solvers.plans import (
    PlanLoop,
    init_state,
    plan_done,
    plan_finish,
    plan_geometry,
    plan_init,
    plan_matrix,
    plan_step,
    solve_plans,
)

__all__ = ["PairDistance", "PairStart", "component_costs", "pair_distance", "batch_distance",
           "pair_start", "pair_finish", "entropic_objective", "run_pairs"]


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


def _pair_setup(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon, relative):
    """Cost, plan geometry, cold plan state, absolute epsilon and the start of
    the epsilon-scaling (the independent coupling's cost) of one padded pair."""
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
    return cost, geo, state, eps, jnp.maximum(scale, eps)


def pair_distance(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon,
                  relative, *, options: PlanOptions) -> PairDistance:
    r"""Entropic :math:`MW_2^2` of one padded pair (components of zero weight,
    padding included, are masked out).

    ``epsilon`` is absolute, or (``relative``) a fraction of the independent
    coupling's cost :math:`\sum_{ij} w^a_i w^b_j C_{ij}` (the same scale as the
    barycenter's relative epsilon). The epsilon-scaling starts at that scale.
    """
    cost, geo, state, eps, start = _pair_setup(means_a, covs_a, weights_a, means_b, covs_b,
                                               weights_b, epsilon, relative)
    result = solve_plans(state, geo, epsilon=eps, epsilon_start=start, options=options)
    plan = plan_matrix(result.reduced, result.epsilon, geo.atom_mask, geo.comp_mask)
    return PairDistance(jnp.sum(plan * cost), plan, result.error, result.iteration, eps,
                        jnp.where(geo.atom_mask, result.f[0], 0.0),
                        jnp.where(geo.comp_mask, result.g, 0.0))


def batch_distance(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon,
                   relative, *, options: PlanOptions) -> PairDistance:
    """:func:`pair_distance` over a leading batch axis (``epsilon (B,)``, ``relative`` shared)."""
    fn = jax.vmap(lambda *args: pair_distance(*args, relative, options=options))
    return fn(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon)


class PairStart(NamedTuple):
    """A pair ready to iterate: the plan solver's ``loop`` state, its
    geometry ``geo``, the ``cost (Ka, Kb)`` and the absolute ``epsilon``."""

    loop: PlanLoop
    geo: object
    cost: jnp.ndarray
    epsilon: jnp.ndarray


class PairsOut(NamedTuple):
    r"""What :func:`run_pairs` returns, per pair: ``value`` (transport cost
    :math:`\langle P, C\rangle`), ``entropic`` (:func:`entropic_objective`),
    ``plan``, L1 marginal ``error``, ``iterations``, absolute ``epsilon``; and
    for the batch: ``slot_iterations`` (plan iterations run summed over slots,
    busy or idle) and ``blocks`` (loop blocks run)."""

    value: jnp.ndarray
    entropic: jnp.ndarray
    plan: jnp.ndarray
    error: jnp.ndarray
    iterations: jnp.ndarray
    epsilon: jnp.ndarray
    slot_iterations: jnp.ndarray
    blocks: jnp.ndarray


def pair_start(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon, relative,
               *, options: PlanOptions) -> PairStart:
    """:func:`pair_distance`'s set-up, with the plan solver started (not run)."""
    cost, geo, state, eps, start = _pair_setup(means_a, covs_a, weights_a, means_b, covs_b,
                                               weights_b, epsilon, relative)
    return PairStart(plan_init(state, geo, eps, start, options), geo, cost, eps)


def entropic_objective(plan, reduced, cost, epsilon, geo) -> jnp.ndarray:
    r""":math:`\mathrm{OT}_\varepsilon = \langle P, C\rangle + \varepsilon\,
    \mathrm{KL}(P \,|\, w^a \otimes w^b)` of a solved plan (the primal entropic
    objective, the convention of the Sinkhorn divergence of Feydy et al. 2019),
    with :math:`\log P = -\tilde C / \varepsilon` read from the reduced cost."""
    mask = geo.atom_mask[:, None] & geo.comp_mask[None, :]
    log_ab = geo.log_a[:, None] + geo.log_b[None, :]
    kl_terms = jnp.where(mask, -reduced - epsilon * log_ab, 0.0)
    return jnp.sum(plan * (cost + kl_terms))


def pair_finish(loop: PlanLoop, geo, cost, epsilon, options: PlanOptions):
    """``(value, entropic, plan, error, iterations)`` of a finished loop."""
    result = plan_finish(loop, geo, options)
    plan = plan_matrix(result.reduced, result.epsilon, geo.atom_mask, geo.comp_mask)
    entropic = entropic_objective(plan, result.reduced, cost, result.epsilon, geo)
    return jnp.sum(plan * cost), entropic, plan, result.error, result.iteration


def _where_rows(mask, new, old):
    """Leaf by leaf, row ``r`` of ``new`` where ``mask[r]``, else of ``old``."""
    return jax.tree_util.tree_map(
        lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), new, old)


def _rows(tree, idx):
    return jax.tree_util.tree_map(lambda x: x[idx], tree)


class _Slots(NamedTuple):
    """The working batch of :func:`run_pairs`: the pair in each slot (-1: idle)
    and its loop state, geometry and epsilon."""

    idx: jnp.ndarray
    loop: PlanLoop
    geo: object
    epsilon: jnp.ndarray


def _advance(sub: _Slots, width: int, start: PairStart, final: PlanLoop, taken, count,
             block: int, options: PlanOptions):
    """Run ``block`` plan iterations on the ``width`` slots, then store their
    finished pairs in ``final`` and refill them from the queue."""
    step = jax.vmap(lambda s, g, e: plan_step(s, g, e, options))
    done_fn = jax.vmap(lambda s, e: plan_done(s, e, options))

    def one(_, loop):
        done = done_fn(loop, sub.epsilon) | (sub.idx < 0)
        return _where_rows(done, loop, step(loop, sub.geo, sub.epsilon))

    loop = jax.lax.fori_loop(0, block, one, sub.loop)
    done = done_fn(loop, sub.epsilon) | (sub.idx < 0)
    finished = done & (sub.idx >= 0)
    B = start.epsilon.shape[0]
    target = jnp.where(finished, sub.idx, B)
    final = jax.tree_util.tree_map(lambda f, x: f.at[target].set(x, mode="drop"), final, loop)
    new = taken + jnp.cumsum(done, dtype=jnp.int32) - 1
    fresh = done & (new < count)
    safe = jnp.clip(new, 0, B - 1)
    sub = _Slots(jnp.where(fresh, new, jnp.where(done, -1, sub.idx)),
                 _where_rows(fresh, _rows(start.loop, safe), loop),
                 _where_rows(fresh, _rows(start.geo, safe), sub.geo),
                 jnp.where(fresh, start.epsilon[safe], sub.epsilon))
    taken = jnp.minimum(count, taken + jnp.sum(done, dtype=jnp.int32))
    return sub, final, taken


START_ROWS = 64  # pairs started at a time by run_pairs (padded rows cost nothing)


def _starts(inputs, count, relative, options: PlanOptions, rows: int) -> PairStart:
    """:func:`pair_start` of the batch, ``rows`` pairs at a time up to ``count``
    (rows past it keep the first pair's start): a batch padded far beyond its
    pairs costs memory, not work."""
    B = inputs[-1].shape[0]
    fn = jax.vmap(lambda *x: pair_start(*x, relative, options=options))
    first = fn(*_rows(inputs, slice(0, rows)))
    out = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[:1], (B,) + x.shape[1:]), first)
    out = jax.tree_util.tree_map(lambda o, x: o.at[:rows].set(x), out, first)

    def body(i, out):
        at = i * rows
        part = fn(*jax.tree_util.tree_map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, at, rows), inputs))
        return jax.tree_util.tree_map(
            lambda o, x: jax.lax.dynamic_update_slice_in_dim(o, x, at, 0), out, part)

    return jax.lax.fori_loop(1, (count + rows - 1) // rows, body, out)


def run_pairs(means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon, count,
              relative, *, options: PlanOptions, slots: int, block: int = 8) -> PairsOut:
    """Solve the first ``count`` pairs of a padded batch by continuous batching.

    ``slots`` pairs are iterated at once (vmapped :func:`~raybary.solvers.plans.plan_step`);
    every ``block`` iterations, the slots whose plans are solved (or out of
    iterations) hand their state to the output and take the next waiting
    pair, so a slow pair holds only its own slot, and no host round trip is
    needed. Each pair's arithmetic does not depend on its slot, so the
    results are those of :func:`pair_distance` (the same iterations, the same
    fixed point). The slots idle only in the tail, once none waits: a batch
    of ``count`` pairs about 16 times ``slots`` idles about a tenth of its
    slot iterations (docs/performance.md).
    """
    B = epsilon.shape[0]
    W = min(slots, B)
    start = _starts((means_a, covs_a, weights_a, means_b, covs_b, weights_b, epsilon), count,
                    relative, options, min(START_ROWS, B))
    first = jnp.arange(W)
    slots0 = _Slots(jnp.where(first < count, first, -1), _rows(start.loop, first),
                    _rows(start.geo, first), start.epsilon[:W])

    def body(carry):
        s, final, taken, blocks = carry
        s, final, taken = _advance(s, W, start, final, taken, count, block, options)
        return s, final, taken, blocks + 1

    carry = (slots0, start.loop, jnp.minimum(count, W).astype(jnp.int32),
             jnp.asarray(0, jnp.int32))
    _, final, _, blocks = jax.lax.while_loop(lambda c: jnp.any(c[0].idx >= 0), body, carry)
    value, entropic, plan, error, iterations = jax.vmap(
        lambda loop, g, c, e: pair_finish(loop, g, c, e, options))(
        final, start.geo, start.cost, start.epsilon)
    return PairsOut(value, entropic, plan, error, iterations, start.epsilon,
                    blocks * W * block, blocks)
