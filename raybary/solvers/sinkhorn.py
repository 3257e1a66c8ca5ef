r"""Log-domain Sinkhorn between the barycenter's atoms and J input GMMs at once.

Layout of one problem (the flat layout used throughout :mod:`raybary.solvers`):
the components of all input GMMs are stacked into one axis of length ``L``;
``gmm_index[l]`` says which GMM component ``l`` belongs to, and ``member[j, l]``
is true when component ``l`` is a (non-padded) component of GMM ``j``. The
barycenter has ``n`` atoms with weights ``a`` (``atom_mask`` marks real atoms).
All J plans are stored together as one ``(n, L)`` matrix, since column ``l``
belongs to exactly one plan:

.. math::
   P_{il} = \exp\big((f_{j(l), i} + g_l - C_{il}) / \varepsilon\big).

Updates (Cuturi 2013 in log form; Peyré & Cuturi 2019, Remark 4.23):

.. math::
   g_l &= \varepsilon \log b_l - \varepsilon \operatorname{LSE}_i \big((f_{j(l),i} - C_{il})/\varepsilon\big), \\
   f_{ji} &= \varepsilon \log a_i - \varepsilon \operatorname{LSE}_{l \in j} \big((g_l - C_{il})/\varepsilon\big).

The total potentials ``f`` are kept: :math:`\sum_j \lambda_j f_j` is the
gradient of :math:`\sum_j \lambda_j \mathrm{OT}_\varepsilon(a, b_j)` in ``a``
(up to a constant), which :mod:`raybary.solvers.barycenter` uses to learn the
barycenter's weights (Cuturi & Doucet 2014, Algorithm 1).

Numerics: the potentials are *absorbed* into a reduced cost
:math:`\tilde C_{il} = C_{il} - f_{j(l),i} - g_l` after every half-step
(Schmitzer 2019, Section 3.2), so each log-sum-exp works on small numbers near
the plan's support; in float32 this is what lets the marginals converge at
small epsilon, where ``(f + g - C) / epsilon`` would otherwise lose every digit.
The plans are :math:`P = \exp(-\tilde C / \varepsilon)`.

``epsilon`` follows a geometric schedule (epsilon-scaling, Schmitzer 2019)
from :math:`\varepsilon_0` down to the target, from warm-started potentials:
it is multiplied by :math:`\rho` whenever the marginal error at the current
level is below ``level_tol``. Going down one level per iteration regardless
loses the plan's small entries: once :math:`\varepsilon` shrinks faster than
the potentials can follow (each step moves them by about
:math:`\varepsilon \log(\text{marginal ratio})`), a mass that needs a costly
entry is lost and takes :math:`O(C/\varepsilon)` iterations to come back. Padded entries are masked out of every log-sum-exp, so no
``log(0)`` reaches arithmetic and nothing padded produces NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "SinkhornState",
    "init_state",
    "masked_logsumexp",
    "plan_matrix",
    "reduce_cost",
    "segment_logsumexp",
    "sinkhorn",
]


class SinkhornState(NamedTuple):
    """Loop state: reduced cost ``(n, L)``, total potentials ``f (J, n)``,
    ``g (L,)``, log-weights of the atoms, iteration count, marginal error and
    the current epsilon of the schedule."""

    reduced: jnp.ndarray
    f: jnp.ndarray
    g: jnp.ndarray
    log_a: jnp.ndarray
    iteration: jnp.ndarray
    error: jnp.ndarray
    epsilon: jnp.ndarray


def masked_logsumexp(x: jnp.ndarray, mask: jnp.ndarray, axis: int) -> jnp.ndarray:
    """``log sum exp x`` over the entries where ``mask`` holds; 0 where none does."""
    x = jnp.where(mask, x, -jnp.inf)
    m = jnp.max(x, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.where(mask, jnp.exp(x - m_safe), 0.0), axis=axis, keepdims=True)
    out = jnp.log(jnp.where(s > 0, s, 1.0)) + m_safe
    return jnp.squeeze(jnp.where(s > 0, out, 0.0), axis=axis)


def segment_logsumexp(z: jnp.ndarray, member: jnp.ndarray, gmm_index: jnp.ndarray) -> jnp.ndarray:
    """``LSE_{l in j} z_il`` for each GMM j: ``(n, L) -> (J, n)``, 0 for empty groups.

    Only the max is taken over the ``(J, n, L)`` block; the ``n * L``
    exponentials are summed per GMM with a one-hot matmul.
    """
    zmax = jnp.max(jnp.where(member[:, None, :], z[None], -jnp.inf), axis=-1)
    zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)  # (J, n)
    comp_mask = jnp.any(member, axis=0)
    e = jnp.where(comp_mask[None, :], jnp.exp(jnp.where(comp_mask, z - zmax[gmm_index].T, 0.0)), 0.0)
    total = (e @ member.T.astype(z.dtype)).T  # (J, n)
    return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + zmax, 0.0)


def reduce_cost(cost, f, g, gmm_index) -> jnp.ndarray:
    """:math:`C_{il} - f_{j(l),i} - g_l`."""
    return cost - f[gmm_index].T - g[None, :]


def plan_matrix(reduced, eps, atom_mask, comp_mask) -> jnp.ndarray:
    """All J plans as one ``(n, L)`` matrix (zero on padded rows and columns)."""
    mask = atom_mask[:, None] & comp_mask[None, :]
    return jnp.where(mask, jnp.exp(-jnp.where(mask, reduced, 0.0) / eps), 0.0)


def init_state(cost, f, g, log_a, gmm_index) -> SinkhornState:
    """Warm start from potentials ``f, g`` for a new cost matrix."""
    inf = jnp.asarray(jnp.inf, cost.dtype)
    return SinkhornState(
        reduce_cost(cost, f, g, gmm_index), f, g, log_a, jnp.asarray(0, jnp.int32), inf, inf
    )


def sinkhorn(
    state: SinkhornState,
    *,
    log_b: jnp.ndarray,
    gmm_index: jnp.ndarray,
    member: jnp.ndarray,
    lambdas: jnp.ndarray,
    atom_mask: jnp.ndarray,
    epsilon: jnp.ndarray,
    epsilon_start: jnp.ndarray,
    decay: float,
    tol: float,
    max_iterations: int,
    level_tol: float = 1e-3,
    relaxation: float = 1.0,
) -> SinkhornState:
    r"""Run Sinkhorn from ``state`` until the marginal
    error is at most ``tol`` at the target ``epsilon``, or ``max_iterations``.

    The error is :math:`\max_j \|P_j \mathbb{1} - a\|_1` measured after the
    ``g`` half-step. With ``relaxation`` :math:`\omega` each half-step moves
    the potentials :math:`\omega` times the exact Sinkhorn update
    (over-relaxation, Thibault et al. 2017; :math:`\omega = 1` makes columns,
    then rows, exact); the fixed point is the same.
    """
    comp_mask = jnp.any(member, axis=0)
    gmm_valid = jnp.any(member, axis=1) & (lambdas > 0)
    row_mask = gmm_valid[:, None] & atom_mask[None, :]
    start = state.iteration
    log_a = state.log_a
    a = jnp.where(atom_mask, jnp.exp(jnp.where(atom_mask, log_a, 0.0)), 0.0)
    level_tol = jnp.maximum(level_tol, tol)

    def cond(s: SinkhornState):
        not_done = (s.error > tol) | (s.epsilon > epsilon)
        return (s.iteration - start < max_iterations) & not_done

    def update(s: SinkhornState, eps, omega) -> SinkhornState:
        # g half-step: columns exact (for omega = 1).
        col = masked_logsumexp(-s.reduced / eps, atom_mask[:, None], axis=0)
        dg = jnp.where(comp_mask, omega * eps * (log_b - col), 0.0)
        reduced = s.reduced - dg[None, :]
        # Row marginals of each plan, (J, n).
        log_mu = segment_logsumexp(-reduced / eps, member, gmm_index)
        mu = jnp.where(row_mask, jnp.exp(jnp.where(row_mask, log_mu, 0.0)), 0.0)
        err = jnp.max(jnp.where(gmm_valid, jnp.sum(jnp.abs(mu - a[None, :]), axis=1), 0.0))
        # f half-step: rows exact (for omega = 1).
        df = jnp.where(row_mask, omega * eps * (log_a[None, :] - log_mu), 0.0)
        reduced = reduced - df[gmm_index].T
        return SinkhornState(reduced, s.f + df, s.g + dg, log_a, s.iteration + 1, err, eps)

    def body(s: SinkhornState) -> SinkhornState:
        # Next level once the current one is solved to ``level_tol``; the state
        # keeps the epsilon its reduced cost is consistent with.
        eps = jnp.where(s.error <= level_tol, jnp.maximum(epsilon, s.epsilon * decay), s.epsilon)
        return update(s, eps, relaxation)

    inf = jnp.asarray(jnp.inf, state.reduced.dtype)
    state = state._replace(
        epsilon=jnp.maximum(epsilon_start, epsilon).astype(inf.dtype), error=inf
    )
    out = jax.lax.while_loop(cond, body, state)
    # One plain (unrelaxed) iteration last: the rows of the plans are then
    # exact, and a problem whose plans are determined by their marginals (one
    # atom, one component) gets them exactly.
    return update(out, out.epsilon, 1.0)
