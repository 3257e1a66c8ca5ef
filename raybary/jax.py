r"""Differentiable mixture-Wasserstein losses: pure JAX functions on arrays.

:func:`mw2_loss` is :func:`raybary.mw2` as a function of arrays, and
:func:`barycenter_objective` the barycenter's objective
:math:`\sum_j \lambda_j MW_2^2(\bar\mu, \mu_j)` for fixed barycenter
parameters. Both can be ``jax.jit``-ed, ``jax.vmap``-ed and differentiated
(``jax.grad``, ``jax.jacfwd``) with respect to every mean, covariance and
weight, of either side.

How the gradients are made (the envelope theorem, Danskin): the value is
:math:`\langle P, C(\theta)\rangle` with :math:`P` the entropic plan solved at
the inputs (the same solver, schedule and fixed point as :func:`raybary.mw2`).
The solve runs on ``stop_gradient``-ed inputs, so nothing differentiates
through its loop (no unrolled iterations in the backward pass; the forward
solve is the only one). With the plan and the dual potentials ``f, g`` held
fixed:

* means and covariances: :math:`\partial/\partial\theta \sum_{ij} P_{ij}
  C_{ij}(\theta)`, through :func:`bures_costs`, whose derivative is analytic
  (a ``jax.custom_jvp``): for :math:`C = |m_a - m_b|^2 + \operatorname{tr} A +
  \operatorname{tr} B - 2 \operatorname{tr}(A^{1/2} B A^{1/2})^{1/2}`,
  :math:`\partial C / \partial m_a = 2 (m_a - m_b)`,
  :math:`\partial C / \partial A = I - T_{AB}` and :math:`\partial C /
  \partial B = I - T_{BA}`, with :math:`T_{AB} = A^{-1/2} (A^{1/2} B
  A^{1/2})^{1/2} A^{-1/2}` the Monge map from :math:`\mathcal N(0, A)` to
  :math:`\mathcal N(0, B)` (Bhatia, Jain & Lim 2019). These are symmetric; the
  covariances are symmetrised before use, so the gradient of a covariance is
  the symmetric matrix ``G`` with directional derivative ``<G, E>`` for every
  symmetric ``E``.
* weights: the dual potentials, the derivative of the transport cost in the
  marginals. They are defined up to a constant (the weights live on the
  simplex), and are returned **centred**: the mean over a GMM's real
  components is subtracted, as POT's ``ot.emd2`` does (its gradients through
  the torch or JAX backends). Directions that keep the total weight (sum
  zero) are exact whatever the constant.

These are the gradients of the entropic objective :math:`\mathrm{OT}_\varepsilon`
(whose derivative in the cost is exactly the plan); the value returned is the
plan's transport cost (as :func:`raybary.mw2`), whose own derivative differs by
the entropic blur, a relative :math:`O(\varepsilon)`: both tend to the exact
:math:`MW_2^2`'s derivatives (where its plan is unique) as epsilon goes down
(docs/distances.md).

Components of weight 0 are padding (as in :func:`raybary.mw2_batch`): they
take no part, their means and covariances may hold anything finite, and their
gradients are 0. Weights must be non-negative and sum to 1 on each side. There
are no value checks inside (they would not run under ``jit``): check inputs on
the host with :mod:`raybary.validation` (:func:`raybary.mw2` does).

The precision is that of the inputs (float32, or float64 with
``jax_enable_x64``). Options that shape the compiled program
(``max_iterations``, ``tol``, ``fallback``) must be static: pass them with
``functools.partial`` before ``jax.jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from raybary.geometry.bures import bures_cross_sqrtm, sqrtm_and_inv, symmetrize
from raybary.solvers.distance import PairDistance, component_costs, pair_distance

__all__ = ["mw2_loss", "barycenter_objective", "bures_costs"]


@jax.custom_jvp
def bures_costs(means_a, covs_a, means_b, covs_b) -> jnp.ndarray:
    r"""Squared Wasserstein costs ``(Ka, Kb)`` between the Gaussians of ``a``
    and of ``b`` (:func:`raybary.solvers.distance.component_costs` of the
    symmetrised covariances), with the analytic derivative of the module's
    docstring: exact where the covariances are positive definite, where the
    matrix square root's own derivative (through an eigensolver's iterations
    or a closed form) would be neither cheap nor as accurate."""
    return component_costs(means_a, symmetrize(covs_a), means_b, symmetrize(covs_b))


@bures_costs.defjvp
def _bures_costs_jvp(primals, tangents):
    """``dC_ij = 2 (m_i - m_j).(dm_i - dm_j) + <I - T_ij, dA_i> + <I - T_ji, dB_j>``."""
    means_a, covs_a, means_b, covs_b = primals
    d_ma, d_ca, d_mb, d_cb = tangents
    cost = bures_costs(means_a, covs_a, means_b, covs_b)
    covs_a, covs_b = symmetrize(covs_a), symmetrize(covs_b)
    root_a, inv_a = sqrtm_and_inv(covs_a)
    root_b, inv_b = sqrtm_and_inv(covs_b)
    # T_ab = A^-1/2 (A^1/2 B A^1/2)^1/2 A^-1/2 maps N(0, A) to N(0, B); T_ba its inverse.
    cross_ab = bures_cross_sqrtm(root_a[:, None], covs_b[None], root_b[None])
    cross_ba = bures_cross_sqrtm(root_b[None], covs_a[:, None], root_a[:, None])
    eye = jnp.eye(covs_a.shape[-1], dtype=covs_a.dtype)
    grad_a = eye - inv_a[:, None] @ cross_ab @ inv_a[:, None]  # (Ka, Kb, d, d)
    grad_b = eye - inv_b[None] @ cross_ba @ inv_b[None]
    diff = means_a[:, None, :] - means_b[None, :, :]
    d_cost = (2.0 * jnp.sum(diff * (d_ma[:, None, :] - d_mb[None, :, :]), axis=-1)
              + jnp.einsum("ijab,iab->ij", grad_a, symmetrize(d_ca))
              + jnp.einsum("ijab,jab->ij", grad_b, symmetrize(d_cb)))
    return cost, d_cost


def mw2_loss(means_a, covs_a, weights_a, means_b, covs_b, weights_b, *,
             epsilon: float | None = None, relative_epsilon: float | None = None,
             max_iterations: int | None = None, tol: float | None = None,
             fallback: bool = True) -> jnp.ndarray:
    r""":math:`MW_2^2(a, b)` of two GMMs given as arrays: the value of :func:`raybary.mw2`,
    differentiable (module docstring: the gradients and their conventions).

    Args:
      means_a, covs_a, weights_a: ``(Ka, d)``, ``(Ka, d, d)``, ``(Ka,)``;
        components of weight 0 are padding.
      means_b, covs_b, weights_b: ``(Kb, d)``, ``(Kb, d, d)``, ``(Kb,)``.
      epsilon, relative_epsilon: as :func:`raybary.mw2` (at most one; the
        default is its :data:`~raybary.batch.distances.DEFAULT_MW2_RELATIVE_EPSILON`).
      max_iterations, tol: the plan solver's iteration cap and marginal
        tolerance, as :func:`raybary.mw2` (static).
      fallback: solve a plan that missed ``tol`` once more with the slower
        schedule, as :func:`raybary.mw2_batch` does (static). Under
        ``jax.vmap`` both solves run for every pair (a batched ``lax.cond``
        evaluates both branches); ``False`` saves that time.

    Returns:
      A scalar of the inputs' floating dtype.
    """
    arrays = _as_arrays(means_a, covs_a, weights_a, means_b, covs_b, weights_b)
    relative, eps = _epsilon(epsilon, relative_epsilon)
    options = _plan_options(arrays[0].dtype, max_iterations, tol)
    return _pair_loss(*arrays, eps, relative, options, fallback)


def barycenter_objective(bar_means, bar_covs, bar_weights, means, covs, weights, lambdas,
                         **options) -> jnp.ndarray:
    r"""The barycenter objective :math:`\sum_j \lambda_j MW_2^2(\bar\mu, \mu_j)`.

    Args:
      bar_means, bar_covs, bar_weights: the barycenter, ``(n, d)``,
        ``(n, d, d)``, ``(n,)``.
      means, covs, weights: the J input GMMs padded to K components,
        ``(J, K, d)``, ``(J, K, d, d)``, ``(J, K)`` (padding: weight 0).
      lambdas: ``(J,)``, used as given (not normalised); a GMM of lambda 0
        takes no part (it may be all padding) and gets zero gradients.
      **options: :func:`mw2_loss`'s keyword options.

    Returns:
      A scalar; its gradients are :func:`mw2_loss`'s, summed with the lambdas.
    """
    bar = _as_arrays(bar_means, bar_covs, bar_weights)
    means, covs, weights, lambdas = (jnp.asarray(x, bar[0].dtype)
                                     for x in (means, covs, weights, lambdas))
    if means.ndim != 3 or covs.shape != means.shape + means.shape[-1:] \
            or weights.shape != means.shape[:2] or lambdas.shape != means.shape[:1]:
        raise ValueError("barycenter_objective: inputs must be means (J, K, d), covs "
                         "(J, K, d, d), weights (J, K), lambdas (J,); got "
                         f"{means.shape}, {covs.shape}, {weights.shape}, {lambdas.shape}")
    # A GMM of lambda 0 becomes one harmless Gaussian (finite values and gradients).
    live = lambdas > 0
    one_hot = jnp.zeros(weights.shape[1:], weights.dtype).at[0].set(1.0)
    weights = jnp.where(live[:, None], weights, one_hot)
    covs = jnp.where(live[:, None, None, None], covs, jnp.eye(means.shape[-1], dtype=covs.dtype))
    means = jnp.where(live[:, None, None], means, 0.0)
    loss = functools.partial(mw2_loss, *bar, **options)
    terms = jax.vmap(loss)(means, covs, weights)
    return jnp.sum(jnp.where(live, lambdas * terms, 0.0))


def _as_arrays(*arrays) -> list[jnp.ndarray]:
    """``(means, covs, weights)`` triples as arrays of one floating dtype, shapes checked."""
    out = [jnp.asarray(x) for x in arrays]
    dtype = jnp.result_type(*out, jnp.float32)
    out = [x.astype(dtype) for x in out]
    for side, (m, c, w) in zip("ab", zip(out[0::3], out[1::3], out[2::3])):
        if m.ndim != 2 or c.shape != m.shape + m.shape[-1:] or w.shape != m.shape[:1]:
            raise ValueError(f"GMM {side}: means must be (K, d), covs (K, d, d) and weights "
                             f"(K,), got {m.shape}, {c.shape}, {w.shape}")
    if len(out) == 6 and out[0].shape[1] != out[3].shape[1]:
        raise ValueError(f"a and b differ in dimension (a: {out[0].shape[1]}, "
                         f"b: {out[3].shape[1]})")
    return out


def _epsilon(epsilon, relative_epsilon) -> tuple[bool, object]:
    """``(relative, value)`` of the options, :func:`raybary.mw2`'s rules."""
    from raybary.batch.distances import DEFAULT_MW2_RELATIVE_EPSILON

    if epsilon is not None and relative_epsilon is not None:
        raise ValueError("give at most one of epsilon and relative_epsilon")
    if epsilon is not None:
        return False, epsilon
    return True, DEFAULT_MW2_RELATIVE_EPSILON if relative_epsilon is None else relative_epsilon


def _plan_options(dtype, max_iterations, tol):
    """The plan options of :func:`raybary.mw2` for ``dtype``."""
    from raybary.batch.distances import _plan_options as distance_plan_options

    return distance_plan_options(str(np.dtype(dtype)), max_iterations, tol)


def _frame(means_a, covs_a, weights_a, means_b, covs_b, weights_b):
    """Centre and scale of a pair, as :func:`raybary.batch.distances._pair_arrays`
    takes them (the weighted mean and root second moment of both GMMs, each
    weighted 1/2): the solve runs in these units, like :func:`raybary.mw2`'s."""
    w = jnp.concatenate([weights_a, weights_b]) / 2.0
    m = jnp.concatenate([means_a, means_b])
    c = jnp.concatenate([covs_a, covs_b])
    centre = w @ m
    second = w @ (jnp.sum((m - centre) ** 2, axis=1) + jnp.trace(c, axis1=1, axis2=2))
    return centre, jnp.sqrt(jnp.where(second > 0, second, 1.0))


def _normalised(means, covs, weights, centre, scale):
    """Means and covariances in the pair's units; padded components (weight 0)
    become ``N(0, I)`` so that nothing non-finite reaches a cost or a gradient."""
    live = weights > 0
    eye = jnp.eye(means.shape[-1], dtype=means.dtype)
    means = jnp.where(live[:, None], (means - centre) / scale, 0.0)
    covs = jnp.where(live[:, None, None], symmetrize(covs) / scale**2, eye)
    return means, covs


def _solve(arrays, eps, relative, options, fallback) -> PairDistance:
    """The plan and potentials of a (normalised, gradient-stopped) pair."""
    first = pair_distance(*arrays, eps, relative, options=options)
    if not fallback:
        return first
    from raybary.batch.distances import _fallback

    return jax.lax.cond(first.error <= options.tol, lambda: first,
                        lambda: pair_distance(*arrays, eps, relative, options=_fallback(options)))


def _centred(potential, live):
    """The potential minus its mean over the real components; 0 on padding."""
    mean = jnp.sum(jnp.where(live, potential, 0.0)) / jnp.maximum(jnp.sum(live), 1)
    return jnp.where(live, potential - mean, 0.0)


def _pair_loss(means_a, covs_a, weights_a, means_b, covs_b, weights_b, eps, relative,
               options, fallback):
    """The loss with envelope gradients: solve on stopped values, then
    ``<P, C(theta)> + <f, w_a - stop(w_a)> + <g, w_b - stop(w_b)>``, scaled back."""
    stop = jax.lax.stop_gradient
    centre, scale = map(stop, _frame(means_a, covs_a, weights_a, means_b, covs_b, weights_b))
    ma, ca = _normalised(means_a, covs_a, weights_a, centre, scale)
    mb, cb = _normalised(means_b, covs_b, weights_b, centre, scale)
    eps = eps if relative else eps / scale**2
    sol = _solve(tuple(map(stop, (ma, ca, weights_a, mb, cb, weights_b))), eps, relative,
                 options, fallback)
    live_a, live_b = weights_a > 0, weights_b > 0
    cost = jnp.where(live_a[:, None] & live_b[None, :], bures_costs(ma, ca, mb, cb), 0.0)
    value = (jnp.sum(stop(sol.plan) * cost)
             + jnp.sum(stop(_centred(sol.f, live_a)) * (weights_a - stop(weights_a)))
             + jnp.sum(stop(_centred(sol.g, live_b)) * (weights_b - stop(weights_b))))
    return scale**2 * value
