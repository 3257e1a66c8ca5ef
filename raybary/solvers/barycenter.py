r"""Free-support Wasserstein barycenter of Gaussian mixtures (MW2, Bures ground cost).

One problem: J GMMs :math:`\nu_j = \sum_k w_{jk} \mathcal{N}(m_{jk}, C_{jk})`,
barycentric weights :math:`\lambda_j`, and a barycenter
:math:`\mu = \sum_i a_i \mathcal{N}(x_i, S_i)` with ``n`` atoms. We minimise
the transport objective

.. math::
   F(\mu, P) = \sum_j \lambda_j \langle P_j, C_j(\mu) \rangle,
   \qquad C_j(\mu)_{ik} = W_2^2\big(\mathcal{N}(x_i, S_i), \mathcal{N}(m_{jk}, C_{jk})\big),

over plans :math:`P_j \in \Pi(a, w_j)` and atoms, by block-coordinate descent
(Cuturi & Doucet 2014, Algorithm 2; Delon & Desolneux 2020, Section 5):

1. *plans*: entropic OT (:mod:`raybary.solvers.plans`) for the current costs;
2. *atoms*: atom i becomes the Gaussian barycenter of **all** input components
   with weights :math:`\lambda_j P_{j,ik} / \sum`: mean
   :math:`x_i = \sum \bar w\, m` (the exact minimiser for fixed plans), and
   ``config.fixed_point_steps`` steps of the covariance fixed point
   :func:`raybary.geometry.bures.bures_barycenter_step`: for fixed plans the
   update does not raise :math:`F` (tests/solvers/test_barycenter.py checks it). (From one outer iteration to the next,
   :math:`F` of the new entropic plans can rise slightly, by at most about
   :math:`\varepsilon \log n`: the plans trade transport cost for entropy;
   the entropic objective goes down.)

With ``learn_weights``, once the fixed-weight iteration has converged, the
weights ``a`` move too, by exponentiated (mirror) gradient steps on
:math:`\sum_j \lambda_j \mathrm{OT}(a, \nu_j)`, whose gradient in ``a`` is
:math:`\sum_j \lambda_j f_j` with :math:`f_j` the dual potentials of the plans
(Cuturi & Doucet 2014, Algorithm 1):
:math:`\log a \leftarrow \log a - t\,\textstyle\sum_j \lambda_j f_j + \mathrm{const}`.
A step is kept only if the objective went down (else it is undone and ``t``
halved), and the atoms are updated after each kept step, so the objective
never goes up and ends at most at the uniform-weight solution's.

Each outer iteration restarts the plan solver's epsilon-scaling from the potentials
of the previous plans at :math:`\varepsilon_0 = \min(\text{scale}, \max(\varepsilon,
\kappa \max_{il} |C^{new}_{il} - C^{old}_{il}|))`: the old potentials are
accurate up to the change of the cost, so the schedule starts where they stop
being good (Sinkhorn, :math:`\kappa = 2`: it moves potentials by about
epsilon per iteration and stalls when an atom jumps from a start at epsilon),
or near epsilon itself (Newton, :math:`\kappa = 0.05`: its damped steps with
a line search cover a change of the cost in a few iterations).

Loop structure: the plan solve and the outer iteration are one loop, not two
nested ones. A *block* is ``plan_block`` plan-solver iterations; after each
block, a problem whose plans are solved gets its barycenter update and the
next plan solve starts (:func:`_finish_plans`, :func:`_start_plans`). In a
batch (:func:`run_batch`) every slot does plan iterations all the time, and
the update, which costs a few plan iterations, is done only for the
problems that are ready (gathered, updated, scattered back), so no problem
waits for another's plans; :mod:`raybary.batch.api` refills the slots of
finished problems between calls (continuous batching).

Everything per problem is jittable and vmappable (flat layout: see
:mod:`raybary.solvers.plans`); :func:`solve_batch` solves a whole batch
in one call.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from raybary.geometry.bures import (
    bures_barycenter_step,
    bures_cost_from_cross,
    bures_cross_sqrtm,
    sqrtm_and_inv,
    trace,
)
from raybary.solvers.config import SolverConfig
from raybary.solvers.init import kmeanspp_init, mass_init
from raybary.solvers.plans import (
    PlanGeometry,
    PlanLoop,
    PlanState,
    block_slots,
    idle_loop,
    init_state,
    plan_done,
    plan_finish,
    plan_geometry,
    plan_init,
    plan_matrix,
    plan_step,
)
from raybary.solvers.weights import WeightState, weights_init, weights_keep, weights_update

__all__ = [
    "SolverConfig",
    "PaddedProblem",
    "BarycenterState",
    "BarycenterOutput",
    "init_one",
    "run_one",
    "finish_one",
    "solve_one",
    "init_batch",
    "run_batch",
    "finish_batch",
    "solve_batch",
]


ROUNDING_EPS = 10.0  # a cost is known to this many epsilons of the terms it is the difference of
SOLVED_ERROR = 1e-3  # plans with a larger L1 marginal error never count as converged
STALL_LIMIT = 3  # outer iterations in a row whose plans end at the cap unsolved: give up
UPDATE_DIVISOR = 4  # run_batch updates at most 1/UPDATE_DIVISOR of the batch per block
UPDATE_CHUNKS = 32  # ... in chunks of 1/UPDATE_CHUNKS of the batch, only as many as are ready


class PaddedProblem(NamedTuple):
    """One problem in the flat padded layout (batch axis in front under vmap).

    ``weights (L,)``, ``means (L, d)``, ``covs (L, d, d)``, ``gmm_index (L,)``
    (int32), ``lambdas (J,)``, ``atom_mask (n,)``, ``init_means (n, d)``,
    ``init_covs (n, d, d)``, ``has_init ()`` (use ``init_*`` rather than
    a drawn initialisation), ``epsilon ()``, ``key`` (PRNG key data, ``(2,)``
    uint32), ``restart ()`` (int32: even restarts draw the atoms by
    k-means++, odd ones by mass, :mod:`raybary.solvers.init`) and
    ``block_index (J, K)`` (int32: flat index of the k-th component of GMM j,
    ``L`` past its last; K is the largest GMM's size, padded) and
    ``comp_sqrt (L, d, d)``, the components' covariance square roots
    (constant: computed once, when padding), and ``relative_epsilon ()``
    (bool: ``epsilon`` is relative to the mean initial cost, else absolute).
    Padded components have weight 0 and identity covariance, padded GMMs
    lambda 0, padded atoms ``atom_mask`` false.
    """

    weights: jnp.ndarray
    means: jnp.ndarray
    covs: jnp.ndarray
    gmm_index: jnp.ndarray
    lambdas: jnp.ndarray
    atom_mask: jnp.ndarray
    init_means: jnp.ndarray
    init_covs: jnp.ndarray
    has_init: jnp.ndarray
    epsilon: jnp.ndarray
    key: jnp.ndarray
    restart: jnp.ndarray
    block_index: jnp.ndarray
    comp_sqrt: jnp.ndarray
    relative_epsilon: jnp.ndarray


class BarycenterState(NamedTuple):
    """Outer-loop state of one problem.

    ``objective`` is the transport objective of the last plans against the
    atoms they were computed for; ``reference`` the one it is compared with
    (the previous iteration's while the weights are fixed, the best kept one
    while they are learned). ``cost`` is the last cost matrix ``(n, L)``;
    ``weights`` the state of the weight learning
    (:class:`raybary.solvers.weights.WeightState`).
    ``cross (n, L, d, d)`` and ``inv_sqrt (n, d, d)`` are the Bures cross
    terms and :math:`S^{-1/2}` of the atoms ``cost`` was computed for (the
    atom update needs them); ``plans`` is the plan solve in progress for
    ``cost``; ``kept_plan (n, L)`` the plans (without lambda) of the last
    kept measurement, the ones :func:`finish_one` returns; ``blocks`` counts
    loop blocks (of ``config.plan_block`` plan iterations each); ``stalled`` the outer iterations in a row whose plan
    solve ran out of iterations without reaching :data:`SOLVED_ERROR` (the
    dtype cannot resolve the plans at this epsilon: after
    :data:`STALL_LIMIT` of them the problem stops, not converged, instead of
    running every outer iteration to the plan cap).
    """

    means: jnp.ndarray
    covs: jnp.ndarray
    log_a: jnp.ndarray
    f: jnp.ndarray
    g: jnp.ndarray
    cost: jnp.ndarray
    objective: jnp.ndarray
    reference: jnp.ndarray
    weights: WeightState
    iteration: jnp.ndarray
    done: jnp.ndarray
    converged: jnp.ndarray
    error: jnp.ndarray
    plan_iterations: jnp.ndarray
    epsilon: jnp.ndarray
    scale: jnp.ndarray
    cross: jnp.ndarray
    inv_sqrt: jnp.ndarray
    plans: PlanLoop
    kept_plan: jnp.ndarray
    blocks: jnp.ndarray
    stalled: jnp.ndarray


class BarycenterOutput(NamedTuple):
    r"""Result of one problem: the barycenter, its plans and diagnostics.

    ``plans (n, L)``: all J plans in the flat layout (GMM j's columns are its
    components, ``gmm_index == j``), without lambda, rows summing to
    ``weights`` and GMM j's columns to its component weights; ``costs (J,)``:
    each plan's transport cost :math:`\langle P_j, C_j\rangle` against the
    returned atoms (NaN for padded GMMs and GMMs of lambda 0); ``objective`` is
    :math:`\sum_j \lambda_j` ``costs[j]`` (normalised lambdas).
    """

    weights: jnp.ndarray
    means: jnp.ndarray
    covs: jnp.ndarray
    objective: jnp.ndarray
    converged: jnp.ndarray
    iterations: jnp.ndarray
    marginal_error: jnp.ndarray
    plan_iterations: jnp.ndarray
    epsilon: jnp.ndarray
    costs: jnp.ndarray
    plans: jnp.ndarray


def _costs(means, covs, comp_means, comp_covs, comp_sqrt, pair_mask):
    """Costs ``(n, L)``, cross terms ``(n, L, d, d)`` and ``S^{-1/2}`` of the atoms."""
    root, inv = sqrtm_and_inv(covs)
    cross = bures_cross_sqrtm(root[:, None], comp_covs[None], comp_sqrt[None])
    cost = bures_cost_from_cross(
        means[:, None], covs[:, None], comp_means[None], comp_covs[None], cross
    )
    return jnp.where(pair_mask, cost, 0.0), cross, inv


def _atom_update(means, covs, inv, cross, comp_means, comp_covs, comp_sqrt, weight_il, steps):
    """Gaussian barycenter of all components for each atom (weights ``(n, L)``)."""
    tot = jnp.sum(weight_il, axis=1)
    tiny = jnp.finfo(means.dtype).tiny * 1e6
    wn = weight_il / jnp.maximum(tot, tiny)[:, None]
    new_means = wn @ comp_means
    new_covs = bures_barycenter_step(inv, cross, wn)
    for _ in range(steps - 1):
        root, inv2 = sqrtm_and_inv(new_covs)
        cross2 = bures_cross_sqrtm(root[:, None], comp_covs[None], comp_sqrt[None])
        new_covs = bures_barycenter_step(inv2, cross2, wn)
    keep = tot <= tiny
    return (
        jnp.where(keep[:, None], means, new_means),
        jnp.where(keep[:, None, None], covs, new_covs),
    )


class ProblemMasks(NamedTuple):
    """Masks and normalised weights of a padded problem.

    ``comp_mask (L,)`` real components; ``member (J, L)`` component l is in
    GMM j; ``pair_mask (n, L)`` real atom and real component; ``lambdas (J,)``
    normalised over the GMMs that have components; ``component_lambda (L,)``
    the lambda of each component's GMM; ``log_b (L,)`` log-weights of the
    components (0 on padded ones); ``n_atoms`` real atoms; ``block_slot (L,)``
    each component's place in the per-GMM blocks (:func:`block_slots`).
    """

    comp_mask: jnp.ndarray
    member: jnp.ndarray
    pair_mask: jnp.ndarray
    lambdas: jnp.ndarray
    component_lambda: jnp.ndarray
    log_b: jnp.ndarray
    n_atoms: jnp.ndarray
    block_slot: jnp.ndarray


def problem_masks(p: PaddedProblem) -> ProblemMasks:
    """:class:`ProblemMasks` of a padded problem."""
    dtype = p.means.dtype
    J = p.lambdas.shape[0]
    comp_mask = p.weights > 0
    member = (p.gmm_index[None, :] == jnp.arange(J)[:, None]) & comp_mask[None, :]
    gmm_valid = jnp.any(member, axis=1) & (p.lambdas > 0)
    lam = jnp.where(gmm_valid, p.lambdas, 0.0)
    lam = lam / jnp.maximum(jnp.sum(lam), jnp.finfo(dtype).tiny)
    return ProblemMasks(
        comp_mask=comp_mask,
        member=member,
        pair_mask=p.atom_mask[:, None] & comp_mask[None, :],
        lambdas=lam,
        component_lambda=jnp.where(comp_mask, lam[p.gmm_index], 0.0),
        log_b=jnp.where(comp_mask, jnp.log(jnp.where(comp_mask, p.weights, 1.0)), 0.0),
        n_atoms=jnp.maximum(jnp.sum(p.atom_mask), 1).astype(dtype),
        block_slot=block_slots(p.block_index, comp_mask),
    )


def _geometry(log_a, p: PaddedProblem, masks: ProblemMasks) -> PlanGeometry:
    return plan_geometry(log_a, masks.log_b, p.gmm_index, masks.member, masks.lambdas,
                         p.atom_mask, p.block_index, masks.block_slot)


def _start_plans(s: BarycenterState, p: PaddedProblem, masks: ProblemMasks,
                 config: SolverConfig) -> BarycenterState:
    r"""Costs of the current atoms and a plan solve warm-started from the last potentials.

    The epsilon-scaling restarts at :math:`\min(\text{scale}, \max(\varepsilon,
    \kappa \max_{il} |C^{new}_{il} - C^{old}_{il}|))` (the whole range at
    the first iteration): the old potentials are good up to the change of the
    cost. New weights move the optimal potentials too, by about the scale
    times the change of ``log a``.
    """
    cost, cross, inv = _costs(s.means, s.covs, p.means, p.covs, p.comp_sqrt, masks.pair_mask)
    eps = s.epsilon
    moved = jnp.max(jnp.where(masks.pair_mask, jnp.abs(cost - s.cost), 0.0))
    reweighted = jnp.max(jnp.where(p.atom_mask, jnp.abs(s.log_a - s.weights.best_log_a), 0.0))
    moved = jnp.maximum(moved, s.scale * reweighted)
    top = jnp.maximum(s.scale, eps)
    eps_start = jnp.where(
        s.iteration == 0, top, jnp.clip(config.warm_factor() * moved, eps, top)
    )
    plans = plan_init(
        init_state(cost, s.f, s.g, s.log_a, p.gmm_index),
        _geometry(s.log_a, p, masks),
        eps,
        eps_start,
        config.plan_options(),
    )
    return s._replace(cost=cost, cross=cross, inv_sqrt=inv, plans=plans)


def init_one(p: PaddedProblem, config: SolverConfig) -> BarycenterState:
    """Initial atoms (given or k-means++), epsilon, the loop state of one
    problem and its first plan solve."""
    dtype = p.means.dtype
    n = p.atom_mask.shape[0]
    J = p.lambdas.shape[0]
    d = p.means.shape[-1]
    L = p.weights.shape[0]
    masks = problem_masks(p)
    key = jax.random.wrap_key_data(p.key)
    args = (key, p.weights, p.means, p.covs, masks.lambdas, p.gmm_index, n)
    kpp_means, kpp_covs = kmeanspp_init(*args)
    mass_means, mass_covs = mass_init(*args)
    by_mass = p.restart % 2 == 1
    kpp_means = jnp.where(by_mass, mass_means, kpp_means)
    kpp_covs = jnp.where(by_mass, mass_covs, kpp_covs)
    eye = jnp.eye(d, dtype=dtype)
    means0 = jnp.where(p.has_init, p.init_means, kpp_means)
    covs0 = jnp.where(p.has_init, p.init_covs, kpp_covs)
    means0 = jnp.where(p.atom_mask[:, None], means0, 0.0)
    covs0 = jnp.where(p.atom_mask[:, None, None], covs0, eye)

    # Scale of the problem: cost of the independent coupling at the start.
    cost0, _, _ = _costs(means0, covs0, p.means, p.covs, p.comp_sqrt, masks.pair_mask)
    a0 = jnp.where(p.atom_mask, 1.0 / masks.n_atoms, 0.0)
    scale = jnp.sum(a0[:, None] * (masks.component_lambda * p.weights)[None, :] * cost0)
    scale = jnp.maximum(scale, jnp.finfo(dtype).eps)
    eps = jnp.where(p.relative_epsilon, p.epsilon * scale, p.epsilon)
    eps = jnp.maximum(eps, jnp.finfo(dtype).eps * scale).astype(dtype)

    inf = jnp.asarray(jnp.inf, dtype)
    log_a0 = jnp.where(p.atom_mask, -jnp.log(masks.n_atoms), 0.0)
    zeros_l = jnp.zeros((L,), dtype)
    state = BarycenterState(
        means=means0,
        covs=covs0,
        log_a=log_a0,
        f=jnp.zeros((J, n), dtype),
        g=zeros_l,
        cost=cost0,
        objective=inf,
        reference=inf,
        weights=weights_init(log_a0, config.weight_step),
        iteration=jnp.asarray(0, jnp.int32),
        done=jnp.asarray(False),
        converged=jnp.asarray(False),
        error=inf,
        plan_iterations=jnp.asarray(0, jnp.int32),
        epsilon=eps,
        scale=scale,
        cross=jnp.zeros((n, L, d, d), dtype),
        inv_sqrt=jnp.zeros((n, d, d), dtype),
        plans=idle_loop(init_state(cost0, jnp.zeros((J, n), dtype), zeros_l, log_a0,
                                   p.gmm_index), J, eps),  # replaced by _start_plans
        kept_plan=jnp.zeros((n, L), dtype),
        blocks=jnp.asarray(0, jnp.int32),
        stalled=jnp.asarray(0, jnp.int32),
    )
    return _start_plans(state, p, masks, config)


class PlanMeasure(NamedTuple):
    """The solved plans of one outer iteration, measured.

    ``result``: the plan solver's output; ``plan (n, L)``: the plans;
    ``weight_il (n, L)``: the plans weighted by each component's lambda; ``objective``; ``slack``: how much
    the objective may move and still count as unchanged; ``solved``: the
    plans' marginal error is small enough for them to count.
    """

    result: PlanState
    plan: jnp.ndarray
    weight_il: jnp.ndarray
    objective: jnp.ndarray
    slack: jnp.ndarray
    solved: jnp.ndarray


def _measure_plans(s: BarycenterState, p: PaddedProblem, masks: ProblemMasks,
                   config: SolverConfig) -> PlanMeasure:
    r"""Objective :math:`\sum_{il} \lambda_{j(l)} P_{il} C_{il}` of the solved plans.

    Its noise floor: plans with an L1 marginal error ``e`` move the objective
    by up to about ``e`` times the typical cost (the scale), and each cost
    :math:`\|x_i - m_l\|^2 + \operatorname{tr} S_i + \operatorname{tr} C_l - 2
    \operatorname{tr}(\cdot)^{1/2}` is a difference of terms of size
    :math:`T_{il} = \|x_i - m_l\|^2 + \operatorname{tr} S_i + \operatorname{tr} C_l`,
    known to :data:`ROUNDING_EPS` times the dtype's epsilon of :math:`T` (in
    float32, with broad covariances, more than ``tol`` of the objective:
    such a problem would never see its objective settle). So the slack is
    ``tol * |objective| + e * scale + ROUNDING_EPS * eps * sum_il w_il T_il``.
    """
    dtype = p.means.dtype
    tiny = jnp.finfo(dtype).tiny
    result = plan_finish(s.plans, _geometry(s.log_a, p, masks), config.plan_options())
    plan = plan_matrix(result.reduced, result.epsilon, p.atom_mask, masks.comp_mask)
    weight_il = masks.component_lambda[None, :] * plan
    objective = jnp.sum(weight_il * s.cost)
    size = (jnp.sum((s.means[:, None, :] - p.means[None, :, :]) ** 2, axis=-1)
            + trace(s.covs)[:, None] + trace(p.covs)[None, :])
    rounding = ROUNDING_EPS * jnp.finfo(dtype).eps * jnp.sum(weight_il * size)
    slack = (config.tol * jnp.maximum(jnp.abs(objective), tiny) + result.error * s.scale
             + rounding)
    solved = result.error <= max(10 * config.plan_tol, SOLVED_ERROR)
    return PlanMeasure(result, plan, weight_il, objective, slack, solved)


def _move_atoms(s: BarycenterState, p: PaddedProblem, weight_il: jnp.ndarray, move: jnp.ndarray,
                config: SolverConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The atoms after the update (:func:`_atom_update`) where ``move``, else unchanged."""
    new_means, new_covs = _atom_update(
        s.means, s.covs, s.inv_sqrt, s.cross, p.means, p.covs, p.comp_sqrt, weight_il,
        config.fixed_point_steps,
    )
    return jnp.where(move, new_means, s.means), jnp.where(move, new_covs, s.covs)


def _finish_plans(s: BarycenterState, p: PaddedProblem, masks: ProblemMasks,
                  config: SolverConfig) -> BarycenterState:
    """The barycenter update once the plans for ``s.cost`` are solved.

    Measure the plans, test convergence, take the weight step (with
    ``learn_weights``: :mod:`raybary.solvers.weights`), move the atoms, then
    start the next plan solve.
    """
    m = _measure_plans(s, p, masks, config)
    ref = s.reference
    keep = weights_keep(s.weights, m.objective, ref, m.slack, m.solved)
    unchanged = (jnp.abs(ref - m.objective) <= m.slack) & m.solved
    capped = ~m.solved & (m.result.iteration >= config.plan_max_iterations)
    stalled = jnp.where(capped, s.stalled + 1, 0)
    w = weights_update(
        s.weights, s.log_a, m.result.f, masks.lambdas, p.atom_mask,
        keep=keep,
        converged=unchanged & (s.iteration > 0) & keep,
        last=(s.iteration + 1 >= config.max_iterations) | (stalled >= STALL_LIMIT),
        learn=config.learn_weights,
        first_step=config.weight_step,
        tol=config.tol,
    )
    means, covs = _move_atoms(s, p, m.weight_il, keep & ~w.stop, config)
    out = s._replace(
        means=means,
        covs=covs,
        log_a=w.log_a,
        f=m.result.f,
        g=m.result.g,
        objective=jnp.where(keep, m.objective, ref),
        reference=jnp.where(keep, m.objective, ref),
        kept_plan=jnp.where(keep, m.plan, s.kept_plan),
        weights=w.state,
        iteration=s.iteration + 1,
        done=w.stop,
        converged=w.finished,
        error=m.result.error,
        plan_iterations=s.plan_iterations + m.result.iteration,
        stalled=stalled,
    )
    return _start_plans(out, p, masks, config)


def _select(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def _advance(s: BarycenterState, p: PaddedProblem, masks: ProblemMasks,
             config: SolverConfig) -> BarycenterState:
    """``config.plan_block`` iterations of the plan solve (a solved plan stays put)."""
    options = config.plan_options()
    geo = _geometry(s.log_a, p, masks)

    def plan_iteration(_, plans):
        done = plan_done(plans, s.epsilon, options) | s.done
        return _select(done, plans, plan_step(plans, geo, s.epsilon, options))

    plans = jax.lax.fori_loop(0, config.plan_block, plan_iteration, s.plans)
    return s._replace(plans=plans, blocks=s.blocks + 1)


def _ready(s: BarycenterState, config: SolverConfig) -> jnp.ndarray:
    """The plans are solved and the barycenter update is due."""
    return plan_done(s.plans, s.epsilon, config.plan_options()) & ~s.done


def _update(s: BarycenterState, p: PaddedProblem, masks: ProblemMasks,
            config: SolverConfig) -> BarycenterState:
    """:func:`_finish_plans` if the plans are solved, else ``s``."""
    return _select(_ready(s, config), _finish_plans(s, p, masks, config), s)


def run_one(
    state: BarycenterState, p: PaddedProblem, config: SolverConfig, blocks: int | None = None
) -> BarycenterState:
    """Run one problem from ``state`` until done, or for at most ``blocks`` blocks.

    One loop, not two nested ones: each block advances the plan solve by
    ``config.plan_block`` iterations, then, if the plans are solved, does the
    barycenter update and starts the next plan solve (:func:`_finish_plans`).
    :func:`run_batch` is the batched form that does the update only for the
    problems that need it.
    """
    stop_at = state.blocks + (jnp.iinfo(jnp.int32).max // 2 if blocks is None else blocks)
    masks = problem_masks(p)

    def cond(s: BarycenterState):
        return ~s.done & (s.blocks < stop_at)

    def body(s: BarycenterState) -> BarycenterState:
        return _update(_advance(s, p, masks, config), p, masks, config)

    return jax.lax.while_loop(cond, body, state)


def finish_one(state: BarycenterState, p: PaddedProblem) -> BarycenterOutput:
    r"""The barycenter, its plans and diagnostics from a final state.

    The plans are the last kept ones (``state.kept_plan``), and each input's
    cost is their transport cost against the returned atoms:
    :math:`c_j = \langle P_j, C_j \rangle` with ``state.cost``, which
    :func:`_start_plans` computed for those atoms. The objective is
    :math:`\sum_j \lambda_j c_j`, so that it is exactly the objective of the
    returned barycenter and plans. With fixed weights that is the objective
    the loop last measured (the last iteration does not move the atoms); when
    learning weights ends on an undone trial, the atoms moved after the kept
    plans were measured, which lowers their cost (the atom update does not
    raise it for fixed plans). A problem never measured keeps its objective
    (infinite). A GMM of lambda 0 (or padded) takes no part: its plan is not
    solved and its cost is NaN.
    """
    dtype = p.means.dtype
    a = jnp.where(p.atom_mask, jnp.exp(jnp.where(p.atom_mask, state.log_a, 0.0)), 0.0)
    a = a / jnp.maximum(jnp.sum(a), jnp.finfo(dtype).tiny)
    masks = problem_masks(p)
    costs = masks.member.astype(dtype) @ jnp.sum(state.kept_plan * state.cost, axis=0)
    taking_part = masks.lambdas > 0  # the others' plans are not solved
    objective = jnp.where(jnp.isfinite(state.objective),
                          jnp.sum(jnp.where(taking_part, masks.lambdas * costs, 0.0)),
                          state.objective)
    costs = jnp.where(taking_part, costs, jnp.nan)
    return BarycenterOutput(
        weights=a,
        means=state.means,
        covs=state.covs,
        objective=objective,
        converged=state.converged,
        iterations=state.iteration,
        marginal_error=state.error,
        plan_iterations=state.plan_iterations,
        epsilon=state.epsilon,
        costs=costs,
        plans=state.kept_plan,
    )


def solve_one(p: PaddedProblem, config: SolverConfig) -> BarycenterOutput:
    """Solve one padded problem (jittable, vmappable; ``config`` is static)."""
    return finish_one(run_one(init_one(p, config), p, config), p)


@partial(jax.jit, static_argnames=("config",))
def init_batch(batch: PaddedProblem, config: SolverConfig) -> BarycenterState:
    """:func:`init_one` over a batch."""
    return jax.vmap(init_one, in_axes=(0, None))(batch, config)


@partial(jax.jit, static_argnames=("config",))
def run_batch(
    state: BarycenterState, batch: PaddedProblem, blocks: int, config: SolverConfig
) -> BarycenterState:
    """:func:`run_one` over a batch, for at most ``blocks`` blocks per call.

    The loop is over the batch (not a ``vmap`` of per-problem loops) so that
    the barycenter update, which costs a few plan iterations (many more in
    d >= 3, where it takes eigendecompositions), runs only for the problems
    whose plans are solved: after each block, the ready ones are gathered
    ``size / UPDATE_CHUNKS`` at a time (at most ``1 / UPDATE_DIVISOR`` of
    the batch per block; the rest wait one block), updated and scattered
    back; a block with none ready does no update at all. Every slot does plan
    iterations all the time.
    """
    size = batch.weights.shape[0]
    chunk = max(1, -(-size // UPDATE_CHUNKS))
    max_chunks = max(1, UPDATE_CHUNKS // UPDATE_DIVISOR)
    masks = jax.vmap(problem_masks)(batch)
    advance = jax.vmap(_advance, in_axes=(0, 0, 0, None))
    ready = jax.vmap(_ready, in_axes=(0, None))
    finish = jax.vmap(lambda s, p, m: _finish_plans(s, p, m, config))

    def update_chunk(_, s):
        (rows,) = jnp.nonzero(ready(s, config), size=chunk, fill_value=size)
        safe = jnp.minimum(rows, size - 1)
        sub = jax.tree_util.tree_map(lambda x: x[safe], (s, batch, masks))
        new = finish(*sub)
        return jax.tree_util.tree_map(lambda x, y: x.at[rows].set(y, mode="drop"), s, new)

    def cond(carry):
        s, k = carry
        return jnp.any(~s.done) & (k < blocks)

    def body(carry):
        s, k = carry
        s = advance(s, batch, masks, config)
        count = jnp.sum(ready(s, config))
        s = jax.lax.fori_loop(0, jnp.minimum(-(-count // chunk), max_chunks), update_chunk, s)
        return s, k + 1

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.asarray(0, jnp.int32)))
    return state


@jax.jit
def finish_batch(state: BarycenterState, batch: PaddedProblem) -> BarycenterOutput:
    """:func:`finish_one` over a batch."""
    return jax.vmap(finish_one)(state, batch)


@partial(jax.jit, static_argnames=("config",))
def solve_batch(batch: PaddedProblem, config: SolverConfig) -> BarycenterOutput:
    """Solve a batch of padded problems (leading axis) with one compiled program
    (:func:`init_batch`, :func:`run_batch` to the end, :func:`finish_batch`)."""
    state = run_batch(init_batch(batch, config), batch, 1 << 30, config)
    return finish_batch(state, batch)
