r"""The plan solvers: entropic OT between the barycenter's atoms and J input GMMs at once.

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

Two solvers share this layout and the schedule: :func:`newton_step` (damped
Newton on the semi-dual, the default: tens of iterations at the tutorial's
epsilon) and :func:`sinkhorn_step` (over-relaxed alternating projections:
thousands). Each is a triple ``*_init`` / ``*_step`` / :func:`plan_finish`
over a loop state, so the barycenter loop can interleave plan iterations
with its own updates (:mod:`raybary.solvers.barycenter`); :func:`solve_plans`
runs one to the end.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from raybary.solvers.config import PlanOptions

__all__ = [
    "PlanGeometry",
    "PlanOptions",
    "PlanLoop",
    "PlanState",
    "gauss_jordan_solve",
    "idle_loop",
    "init_state",
    "masked_logsumexp",
    "plan_done",
    "plan_finish",
    "plan_geometry",
    "block_slots",
    "plan_init",
    "plan_matrix",
    "plan_step",
    "reduce_cost",
    "segment_logsumexp",
    "solve_plans",
]


class PlanState(NamedTuple):
    """Result of a plan solve: reduced cost ``(n, L)``, total potentials
    ``f (J, n)``, ``g (L,)``, log-weights of the atoms, iterations done, the
    largest L1 marginal error and the epsilon the reduced cost is at."""

    reduced: jnp.ndarray
    f: jnp.ndarray
    g: jnp.ndarray
    log_a: jnp.ndarray
    iteration: jnp.ndarray
    error: jnp.ndarray
    epsilon: jnp.ndarray


class PlanGeometry(NamedTuple):
    """Masks and marginals of the J plans of one problem (flat layout).

    ``a (n,)`` atom weights (0 on padded atoms) and ``log_a``; ``b (L,)``
    component weights and ``log_b``; ``gmm_index (L,)``; ``member (J, L)``;
    ``gmm_of (J, L)`` the same as numbers; ``comp_mask (L,)``; ``atom_mask
    (n,)``; ``gmm_valid (J,)`` (has components and a positive lambda);
    ``row_mask (J, n)``; ``block_index (J, K)`` the flat index of the k-th
    component of GMM j (``L`` where GMM j has fewer than K) and ``block_slot
    (L,)`` the inverse, ``j * K + k`` (``J * K`` for padded components): the
    Newton system is block diagonal over the GMMs and is solved per block.
    """

    a: jnp.ndarray
    log_a: jnp.ndarray
    b: jnp.ndarray
    log_b: jnp.ndarray
    gmm_index: jnp.ndarray
    member: jnp.ndarray
    gmm_of: jnp.ndarray
    comp_mask: jnp.ndarray
    atom_mask: jnp.ndarray
    gmm_valid: jnp.ndarray
    row_mask: jnp.ndarray
    block_index: jnp.ndarray
    block_slot: jnp.ndarray


def block_slots(block_index: jnp.ndarray, comp_mask: jnp.ndarray) -> jnp.ndarray:
    """Inverse of ``block_index (J, K)``: each real component's ``j * K + k``
    (``J * K`` for padded ones)."""
    J, K = block_index.shape
    L = comp_mask.shape[0]
    slot = jnp.full((L + 1,), J * K, jnp.int32).at[block_index.reshape(-1)].set(
        jnp.arange(J * K, dtype=jnp.int32))
    return jnp.where(comp_mask, slot[:L], J * K)


def plan_geometry(log_a, log_b, gmm_index, member, lambdas, atom_mask,
                  block_index=None, block_slot=None) -> PlanGeometry:
    """:class:`PlanGeometry` of one problem. Without ``block_index`` each GMM's
    block has room for all L components (correct, but the solve costs
    ``J L^3`` instead of ``J K^3``)."""
    comp_mask = jnp.any(member, axis=0)
    if block_index is None:
        L = member.shape[1]
        block_index = jnp.where(member, jnp.arange(L, dtype=jnp.int32)[None, :], L)
    if block_slot is None:
        block_slot = block_slots(block_index, comp_mask)
    gmm_valid = jnp.any(member, axis=1) & (lambdas > 0)
    a = jnp.where(atom_mask, jnp.exp(jnp.where(atom_mask, log_a, 0.0)), 0.0)
    b = jnp.where(comp_mask, jnp.exp(jnp.where(comp_mask, log_b, 0.0)), 0.0)
    return PlanGeometry(
        a=a, log_a=log_a, b=b, log_b=log_b, gmm_index=gmm_index, member=member,
        gmm_of=member.astype(log_b.dtype), comp_mask=comp_mask, atom_mask=atom_mask,
        gmm_valid=gmm_valid, row_mask=gmm_valid[:, None] & atom_mask[None, :],
        block_index=block_index, block_slot=block_slot,
    )


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


def init_state(cost, f, g, log_a, gmm_index) -> PlanState:
    """Warm start from potentials ``f, g`` for a new cost matrix."""
    inf = jnp.asarray(jnp.inf, cost.dtype)
    return PlanState(
        reduce_cost(cost, f, g, gmm_index), f, g, log_a, jnp.asarray(0, jnp.int32), inf, inf
    )


UNROLL_SOLVE = 12  # systems up to this size are eliminated with unrolled steps


def gauss_jordan_solve(a: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
    """Solve ``a x = r`` for small symmetric positive definite ``a (..., m, m)``.

    Gauss–Jordan elimination without pivoting: every step is one rank-one
    update of the augmented matrix, so under ``vmap`` it is a few wide vector
    operations rather than one LAPACK call per matrix (which is what
    ``jnp.linalg.solve`` does on CPU). Up to :data:`UNROLL_SOLVE` the steps
    are unrolled (fastest); larger systems loop, which keeps compiles short.
    """
    m = a.shape[-1]
    aug = jnp.concatenate([a, r[..., None]], axis=-1)
    eye = jnp.eye(m, dtype=a.dtype)

    def eliminate(k, aug):
        row = jnp.take(aug, k, axis=-2)
        row = row / jnp.take(row, k, axis=-1)[..., None]
        factor = jnp.take(aug, k, axis=-1) - jnp.take(eye, k, axis=0)
        return aug - factor[..., :, None] * row[..., None, :]

    if m <= UNROLL_SOLVE:
        for k in range(m):
            aug = eliminate(k, aug)
    else:
        aug = jax.lax.fori_loop(0, m, eliminate, aug)
    return aug[..., :, m]


class PlanLoop(NamedTuple):
    """State of a plan solve in progress (both methods; Sinkhorn leaves
    ``plan``, ``residual`` and ``step`` unused).

    ``reduced (n, L)``, ``f (J, n)``, ``g (L,)``; ``plan (n, L)`` at the
    current point, ``residual (L,)`` its column error ``b - P^T 1``,
    ``error (J,)`` each plan's L1 marginal error, ``epsilon`` the current
    level, ``step (L,)`` the proposed change of ``g``, ``damping (J,)``,
    ``iteration`` and ``log_colsum (L,)`` the exact log column sums of ``plan``.
    """

    reduced: jnp.ndarray
    f: jnp.ndarray
    g: jnp.ndarray
    plan: jnp.ndarray
    residual: jnp.ndarray
    error: jnp.ndarray
    epsilon: jnp.ndarray
    step: jnp.ndarray
    damping: jnp.ndarray
    iteration: jnp.ndarray
    log_colsum: jnp.ndarray


def _exact_rows(reduced, eps, geo: PlanGeometry):
    """``f`` half-step: rows of every plan exact. Returns the reduced cost and ``df (J, n)``."""
    log_mu = segment_logsumexp(-reduced / eps, geo.member, geo.gmm_index)
    df = jnp.where(geo.row_mask, eps * (geo.log_a[None, :] - log_mu), 0.0)
    return reduced - df[geo.gmm_index].T, df


def _columns(reduced, eps, geo: PlanGeometry):
    """Plans, column residual ``b - P^T 1``, each plan's L1 column error and
    the exact column log-sums (one pass of exponentials for all of them)."""
    mask = geo.atom_mask[:, None] & geo.comp_mask[None, :]
    z = jnp.where(mask, -reduced / eps, -jnp.inf)
    top = jnp.max(z, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    scaled = jnp.where(mask, jnp.exp(jnp.where(mask, z - top[None, :], 0.0)), 0.0)
    total = jnp.sum(scaled, axis=0)
    log_c = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top, 0.0)
    plan = scaled * jnp.exp(top)[None, :]
    residual = jnp.where(geo.comp_mask, geo.b - jnp.sum(plan, axis=0), 0.0)
    error = jnp.where(geo.gmm_valid, geo.gmm_of @ jnp.abs(residual), 0.0)
    return plan, residual, error, log_c


def _newton_direction(log_c, plan, damping, eps, geo: PlanGeometry):
    r"""Newton step on the log-marginals, in Jacobi-scaled form (see :func:`newton_step`)."""
    v = jnp.where(geo.comp_mask, geo.log_b - log_c, 0.0)  # Sinkhorn's step / eps
    root_c = jnp.where(geo.comp_mask, jnp.exp(0.5 * jnp.where(geo.comp_mask, log_c, 0.0)), 0.0)
    tiny = jnp.finfo(plan.dtype).tiny ** 0.5
    live = root_c > tiny
    root_a = jnp.where(geo.atom_mask, jnp.sqrt(geo.a), 1.0)
    q = jnp.where(live[None, :], plan / (root_a[:, None] * jnp.where(live, root_c, 1.0)[None, :]), 0.0)
    solve = _solve_blocks if blocks_pay(*q.shape, *geo.block_index.shape) else _solve_whole
    y = solve(q, root_c, root_c * v, damping, geo)
    d = jnp.where(live, y / jnp.where(live, root_c, 1.0), v)
    return jnp.where(geo.comp_mask, eps * d, 0.0)


def blocks_pay(n: int, L: int, J: int, K: int) -> bool:
    """Whether the Newton system is solved per GMM block (``J`` blocks of ``K``)
    rather than whole (``L x L``, unrolled up to :data:`UNROLL_SOLVE`): the
    blocks' elimination and coupling, about ``J K^2 (K + n)`` multiply-adds,
    must cost under 3/4 of the whole system's ``L^2 (L + n)`` (gathering the
    blocks costs the rest), or the system be too large to unroll."""
    return L > UNROLL_SOLVE or 4 * J * K * K * (K + n) < 3 * L * L * (L + n)


def _solve_whole(q, u, rhs, damping, geo: PlanGeometry):
    """``((1 + tau) I - Q^T Q + u u^T) y = rhs`` as one unrolled solve of the whole
    (block diagonal) system: fastest for small systems of large blocks
    (:func:`blocks_pay`)."""
    gi = geo.gmm_index
    same = (gi[:, None] == gi[None, :]) & geo.comp_mask[:, None] & geo.comp_mask[None, :]
    coupling = q.T @ q - u[:, None] * u[None, :]
    return gauss_jordan_solve(jnp.diag(1.0 + damping[gi]) - jnp.where(same, coupling, 0.0), rhs)


def _solve_blocks(q, u, rhs, damping, geo: PlanGeometry):
    """The same system solved per GMM block, each block's columns gathered by
    ``geo.block_index`` (slot L reads zeros): about ``J K^3`` instead of ``L^3``."""
    K = geo.block_index.shape[1]
    q_b = jnp.pad(q, ((0, 0), (0, 1)))[:, geo.block_index]  # (n, J, K)
    u_b = jnp.pad(u, (0, 1))[geo.block_index]  # (J, K)
    rhs_b = jnp.pad(rhs, (0, 1))[geo.block_index]
    coupling = jnp.einsum("nja,njb->jab", q_b, q_b) - u_b[:, :, None] * u_b[:, None, :]
    m = (1.0 + damping)[:, None, None] * jnp.eye(K, dtype=q.dtype) - coupling
    y_b = gauss_jordan_solve(m, rhs_b)  # (J, K)
    return jnp.pad(y_b.reshape(-1), (0, 1))[geo.block_slot]


def _start(state: PlanState, epsilon, epsilon_start):
    return jnp.maximum(epsilon_start, epsilon).astype(state.reduced.dtype)


def newton_init(state: PlanState, geo: PlanGeometry, epsilon, epsilon_start,
                options: PlanOptions) -> PlanLoop:
    """Rows exact at the first level and the first Newton proposal."""
    eps0 = _start(state, epsilon, epsilon_start)
    reduced, df = _exact_rows(state.reduced, eps0, geo)
    plan, residual, error, log_c = _columns(reduced, eps0, geo)
    damping = jnp.full(geo.member.shape[:1], options.damping, reduced.dtype)
    return PlanLoop(reduced, state.f + df, state.g, plan, residual, error, eps0,
                    _newton_direction(log_c, plan, damping, eps0, geo), damping,
                    jnp.asarray(0, jnp.int32), log_c)


def newton_step(s: PlanLoop, geo: PlanGeometry, epsilon, options: PlanOptions) -> PlanLoop:
    r"""One damped Newton step on the semi-dual of every plan.

    With the rows of the plans exact (the ``f`` half-step in closed form),
    the semi-dual :math:`F(g) = \sum_i a_i f_i(g) + \sum_l b_l g_l` is concave,
    with gradient :math:`r = b - c`, :math:`c = P^T \mathbb{1}` (the column
    error), and Hessian :math:`-M / \varepsilon`,

    .. math::
       M = \operatorname{diag}(c) - P^T \operatorname{diag}(1/a)\, P,

    block diagonal over the GMMs (Brauer, Clason, Lorenz & Wirth 2017, *A
    Sinkhorn–Newton method for entropic optimal transport*). The step is
    Newton's on the log-marginals, :math:`\Delta g = \varepsilon M^{-1}
    \operatorname{diag}(c)(\log b - \log c)`, solved in Jacobi-scaled form:
    with :math:`u = \sqrt{c}` and :math:`Q = \operatorname{diag}(a)^{-1/2} P
    \operatorname{diag}(u)^{-1}`,

    .. math::
       \big((1 + \tau_j) I - Q^T Q + u u^T\big)\, y = u \odot (\log b - \log c),
       \qquad \Delta g = \varepsilon\, y / u,

    per GMM block, where :math:`u u^T` fills the block's null direction (a
    constant shift of ``g`` against ``f``) and :math:`\tau_j` is a
    Levenberg–Marquardt damping per plan. A column whose mass underflowed
    (:math:`u \approx 0`) takes Sinkhorn's step
    :math:`\varepsilon (\log b - \log c)`; near the solution the step is the
    Newton step on :math:`r` and converges quadratically. A step that raises
    ``F`` by at least ``armijo`` times its linear prediction
    :math:`r^T \Delta g` (and not below 0), or lowers the plan's error, is
    kept and :math:`\tau_j` shrinks 4x; otherwise it is dropped and
    :math:`\tau_j` grows 16x (a large :math:`\tau_j` gives a short step).
    ``epsilon`` goes down a level (by ``decay``) once every plan's error is
    below ``level_tol``.
    """
    down = (jnp.max(s.error) <= options.level_tol) & (s.epsilon > epsilon)
    eps = jnp.where(down, jnp.maximum(epsilon, s.epsilon * options.decay), s.epsilon)
    step = jnp.where(down, 0.0, s.step)
    reduced, df = _exact_rows(s.reduced - step[None, :], eps, geo)
    plan, residual, error, log_c = _columns(reduced, eps, geo)
    gain = jnp.sum(geo.a[None, :] * df, axis=1) + geo.gmm_of @ (geo.b * step)
    predicted = geo.gmm_of @ (s.residual * step)
    better = ((gain >= options.armijo * predicted) & (gain >= 0)) | (error < s.error)
    ok = down | (jnp.all(jnp.isfinite(df), axis=1) & jnp.isfinite(error) & better)
    col_ok = ok[geo.gmm_index]
    damping = jnp.where(ok, jnp.maximum(s.damping * 0.25, options.damping),
                        jnp.minimum(s.damping * 16.0, 1e4))
    plan = jnp.where(col_ok[None, :], plan, s.plan)
    residual = jnp.where(col_ok, residual, s.residual)
    log_c = jnp.where(col_ok, log_c, s.log_colsum)
    return PlanLoop(
        reduced=jnp.where(col_ok[None, :], reduced, s.reduced),
        f=jnp.where(ok[:, None], s.f + df, s.f),
        g=jnp.where(col_ok, s.g + step, s.g),
        plan=plan,
        residual=residual,
        error=jnp.where(ok, error, s.error),
        epsilon=eps,
        step=_newton_direction(log_c, plan, damping, eps, geo),
        log_colsum=log_c,
        damping=damping,
        iteration=s.iteration + 1,
    )


def idle_loop(state: PlanState, n_gmms: int, epsilon) -> PlanLoop:
    """A loop state at ``epsilon`` from ``state``'s potentials, with unknown
    (infinite) errors and nothing proposed."""
    n, L = state.reduced.shape
    dtype = state.reduced.dtype
    zeros_l = jnp.zeros((L,), dtype)
    return PlanLoop(state.reduced, state.f, state.g, jnp.zeros((n, L), dtype), zeros_l,
                    jnp.full((n_gmms,), jnp.inf, dtype), jnp.asarray(epsilon, dtype), zeros_l,
                    jnp.zeros((n_gmms,), dtype), jnp.asarray(0, jnp.int32), zeros_l)


def sinkhorn_init(state: PlanState, geo: PlanGeometry, epsilon, epsilon_start,
                  options: PlanOptions) -> PlanLoop:
    """Sinkhorn's loop state at the first level (error unknown: infinite)."""
    del options
    return idle_loop(state, geo.member.shape[0], _start(state, epsilon, epsilon_start))


def _sinkhorn_update(s: PlanLoop, geo: PlanGeometry, eps, omega) -> PlanLoop:
    gi = geo.gmm_index
    # g half-step: columns exact (for omega = 1).
    col = masked_logsumexp(-s.reduced / eps, geo.atom_mask[:, None], axis=0)
    dg = jnp.where(geo.comp_mask, omega * eps * (geo.log_b - col), 0.0)
    reduced = s.reduced - dg[None, :]
    # Row marginals of each plan, (J, n), and their L1 error.
    log_mu = segment_logsumexp(-reduced / eps, geo.member, gi)
    mu = jnp.where(geo.row_mask, jnp.exp(jnp.where(geo.row_mask, log_mu, 0.0)), 0.0)
    err = jnp.where(geo.gmm_valid, jnp.sum(jnp.abs(mu - geo.a[None, :]), axis=1), 0.0)
    # f half-step: rows exact (for omega = 1).
    df = jnp.where(geo.row_mask, omega * eps * (geo.log_a[None, :] - log_mu), 0.0)
    reduced = reduced - df[gi].T
    return s._replace(reduced=reduced, f=s.f + df, g=s.g + dg, error=err, epsilon=eps,
                      iteration=s.iteration + 1)


def sinkhorn_step(s: PlanLoop, geo: PlanGeometry, epsilon, options: PlanOptions) -> PlanLoop:
    r"""One over-relaxed Sinkhorn iteration (log domain, absorbed potentials).

    The error is :math:`\max_j \|P_j \mathbb{1} - a\|_1` after the ``g``
    half-step. With ``relaxation`` :math:`\omega` each half-step moves the
    potentials :math:`\omega` times the exact update (Thibault et al. 2017;
    :math:`\omega = 1` makes columns, then rows, exact); the fixed point is
    the same. The next level starts once the current one is solved to
    ``level_tol``; the state keeps the epsilon its reduced cost is consistent with.
    """
    level_tol = max(options.level_tol, options.tol)
    eps = jnp.where(jnp.max(s.error) <= level_tol,
                    jnp.maximum(epsilon, s.epsilon * options.decay), s.epsilon)
    return _sinkhorn_update(s, geo, eps, options.relaxation)


def plan_init(state, geo, epsilon, epsilon_start, options: PlanOptions) -> PlanLoop:
    """Start a plan solve from ``state`` (warm potentials) at ``epsilon_start``."""
    if options.method == "newton":
        return newton_init(state, geo, epsilon, epsilon_start, options)
    if options.method == "sinkhorn":
        return sinkhorn_init(state, geo, epsilon, epsilon_start, options)
    raise ValueError(f"unknown plan solver {options.method!r}: use 'newton' or 'sinkhorn'")


def plan_step(s: PlanLoop, geo: PlanGeometry, epsilon, options: PlanOptions) -> PlanLoop:
    """One iteration of ``options.method``."""
    fn = newton_step if options.method == "newton" else sinkhorn_step
    return fn(s, geo, epsilon, options)


def plan_done(s: PlanLoop, epsilon, options: PlanOptions) -> jnp.ndarray:
    """Solved to ``tol`` at the target epsilon, or out of iterations."""
    solved = (jnp.max(s.error) <= options.tol) & (s.epsilon <= epsilon)
    return solved | (s.iteration >= options.max_iterations)


def plan_finish(s: PlanLoop, geo: PlanGeometry, options: PlanOptions) -> PlanState:
    """The solve's result. Sinkhorn ends with one plain (unrelaxed) iteration:
    the rows of its plans are then exact, and a problem whose plans are
    determined by their marginals (one atom, one component) gets them exactly."""
    if options.method == "sinkhorn":
        s = _sinkhorn_update(s, geo, s.epsilon, 1.0)
    return PlanState(s.reduced, s.f, s.g, geo.log_a, s.iteration, jnp.max(s.error),
                         s.epsilon)


def solve_plans(
    state: PlanState,
    geo: PlanGeometry,
    *,
    epsilon: jnp.ndarray,
    epsilon_start: jnp.ndarray,
    options: PlanOptions,
) -> PlanState:
    """Solve the J plans from ``state`` until the marginal error is at most
    ``options.tol`` at the target ``epsilon``, or ``options.max_iterations``."""
    loop = plan_init(state, geo, epsilon, epsilon_start, options)
    loop = jax.lax.while_loop(
        lambda s: ~plan_done(s, epsilon, options),
        lambda s: plan_step(s, geo, epsilon, options),
        loop,
    )
    return plan_finish(loop, geo, options)
