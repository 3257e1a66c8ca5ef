r"""Bures–Wasserstein geometry of Gaussians.

For Gaussians :math:`\mathcal{N}(m_1, C_1)` and :math:`\mathcal{N}(m_2, C_2)`,

.. math::
   W_2^2 = \|m_1 - m_2\|^2 + \operatorname{tr} C_1 + \operatorname{tr} C_2
           - 2 \operatorname{tr}\big(C_1^{1/2} C_2 C_1^{1/2}\big)^{1/2}.

Every function here acts on the trailing ``(d, d)`` (or ``(d,)``) axes and
broadcasts over leading axes, so it can be vmapped or applied to whole blocks
of matrices at once. The dimension ``d`` is static: ``d = 1`` and ``d = 2`` use
closed forms (no eigendecomposition); larger ``d`` a symmetric
eigendecomposition, with eigenvalues floored at ``10 eps`` times the largest
(what rounding to the dtype cannot resolve). Up to ``d = 8`` the
decompositions (the square roots, and the cross terms: one per atom and
component, the bulk of the work) come from :func:`jacobi_svd`, one-sided
Jacobi rotations written as elementwise arithmetic over the batch: much
faster on CPU than a batch of LAPACK calls at these sizes
(docs/performance.md), as accurate, and no custom call in the compiled
program; above ``d = 8``, LAPACK's ``eigh``.

References:
  Hestenes (1958), *Inversion of matrices by biorthogonalization*; Demmel &
  Veselić (1992), *Jacobi's method is more accurate than QR* (one-sided
  Jacobi). Bhatia, Jain & Lim (2019), *On the Bures–Wasserstein distance between
  positive definite matrices*. The 2x2 square root is the Cayley–Hamilton
  formula :math:`\sqrt{A} = (A + \sqrt{\det A}\, I) / \sqrt{\operatorname{tr} A + 2\sqrt{\det A}}`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "jacobi_svd",
    "symmetrize",
    "sqrtm",
    "sqrtm_and_inv",
    "trace",
    "bures_cross_sqrtm",
    "bures_cost",
    "bures_cost_from_cross",
    "bures_barycenter_step",
    "bures_barycenter",
]


def symmetrize(a: jnp.ndarray) -> jnp.ndarray:
    """:math:`(A + A^T) / 2` on the trailing two axes."""
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def trace(a: jnp.ndarray) -> jnp.ndarray:
    """Trace over the trailing two axes."""
    return jnp.trace(a, axis1=-2, axis2=-1)


def _tiny(dtype) -> float:
    return float(jnp.finfo(dtype).tiny) * 1e4


def _det2(a: jnp.ndarray) -> jnp.ndarray:
    return a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]


def _sqrtm2(a: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Square root of PSD 2x2 matrices and its determinant (= sqrt(det a))."""
    s = jnp.sqrt(jnp.maximum(_det2(a), 0.0))
    t = jnp.sqrt(jnp.maximum(trace(a) + 2.0 * s, _tiny(a.dtype)))
    eye = jnp.eye(2, dtype=a.dtype)
    root = (a + s[..., None, None] * eye) / t[..., None, None]
    return root, s


def _rel_floor(dtype) -> float:
    """Smallest eigenvalue kept, relative to the largest: ``10 eps`` of the dtype.

    Rounding a matrix to ``dtype`` moves its eigenvalues by about ``eps`` times
    the largest, so smaller ones carry no information (the validation refuses
    inputs below this ratio: :func:`raybary.validation.pd_rtol`). Without the
    floor, an eigenvalue lost to rounding makes :math:`A^{-1/2}` explode, and
    with it the covariance fixed point (float32, condition numbers ~1e4).
    """
    return 10.0 * float(jnp.finfo(dtype).eps)


JACOBI_MAX_DIM = 8  # above, LAPACK's eigh (the unrolled rotations grow as d^3)


def _jacobi_sweeps(d: int) -> int:
    """Cyclic sweeps run: convergence is quadratic, 4 sweeps resolve float32 at
    ``d = 3`` and 5 at ``d = 5`` on condition numbers 1e4; one more for margin."""
    return 6 if d <= 5 else 7


def _jacobi_columns(a: jnp.ndarray) -> tuple[list[list[jnp.ndarray]], list[list[jnp.ndarray]]]:
    r"""One-sided (Hestenes) Jacobi: an orthogonal :math:`W` with :math:`A W = B`
    of orthogonal columns.

    Each rotation of columns :math:`p, q` of :math:`B` (and of :math:`W`) by
    :math:`\begin{pmatrix} c & s \\ -s & c \end{pmatrix}` zeroes
    :math:`b_p \cdot b_q`: with :math:`\alpha = |b_p|^2`, :math:`\beta = |b_q|^2`,
    :math:`\gamma = b_p \cdot b_q`, :math:`\zeta = (\beta - \alpha) / 2\gamma`,
    :math:`t = \operatorname{sign}\zeta / (|\zeta| + \sqrt{1 + \zeta^2})`,
    :math:`c = 1/\sqrt{1 + t^2}`, :math:`s = c t`. Cyclic sweeps over all pairs
    converge quadratically. Every entry is a separate array over the leading
    (batch) axes, so a rotation is a few elementwise operations on whole
    batches (what XLA vectorises well), not a call per matrix.

    Returns the columns of :math:`B` and :math:`W` as ``cols[k][i]`` (entry
    ``i`` of column ``k``).
    """
    d = a.shape[-1]
    entries = jnp.moveaxis(a, (-2, -1), (0, 1))  # (d, d, ...): entries[i, k] = A[i, k]
    b = [[entries[i, k] for i in range(d)] for k in range(d)]
    one, zero = jnp.ones_like(entries[0, 0]), jnp.zeros_like(entries[0, 0])
    w = [[one if i == k else zero for i in range(d)] for k in range(d)]
    tiny = jnp.finfo(a.dtype).tiny

    def dot(x, y):
        out = x[0] * y[0]
        for xi, yi in zip(x[1:], y[1:]):
            out = out + xi * yi
        return out

    def rotate(x, y, c, s):
        return [c * u - s * v for u, v in zip(x, y)], [s * u + c * v for u, v in zip(x, y)]

    def sweep(_, carry):
        b, w = [list(col) for col in carry[0]], [list(col) for col in carry[1]]
        for p in range(d):
            for q in range(p + 1, d):
                alpha, beta, gamma = dot(b[p], b[p]), dot(b[q], b[q]), dot(b[p], b[q])
                zeta = (beta - alpha) / (2.0 * jnp.where(gamma == 0, 1.0, gamma))
                t = jnp.sign(zeta) / (jnp.abs(zeta) + jnp.sqrt(1.0 + zeta * zeta))
                t = jnp.where(zeta == 0, 1.0, t)
                t = jnp.where(jnp.abs(gamma) <= tiny, 0.0, t)
                c = jax.lax.rsqrt(1.0 + t * t)
                s = c * t
                b[p], b[q] = rotate(b[p], b[q], c, s)
                w[p], w[q] = rotate(w[p], w[q], c, s)
        return b, w

    return jax.lax.fori_loop(0, _jacobi_sweeps(d), sweep, (b, w))


def _compose(w: list[list[jnp.ndarray]], values: list[jnp.ndarray]) -> jnp.ndarray:
    r""":math:`\sum_k v_k w_k w_k^T` from columns ``w[k][i]``, as ``(..., d, d)`` (symmetric)."""
    d = len(w)
    out = [[None] * d for _ in range(d)]
    for i in range(d):
        for j in range(i, d):
            acc = values[0] * w[0][i] * w[0][j]
            for k in range(1, d):
                acc = acc + values[k] * w[k][i] * w[k][j]
            out[i][j] = out[j][i] = acc
    return jnp.stack([jnp.stack(row, axis=-1) for row in out], axis=-2)


def _svd_columns(m: jnp.ndarray) -> tuple[list[jnp.ndarray], list[list[jnp.ndarray]]]:
    """Singular values and left singular vectors of ``m`` as separate arrays
    (``sig[k]``, ``u[k][i]``): :func:`jacobi_svd` before stacking."""
    b, u = _jacobi_columns(jnp.swapaxes(m, -1, -2))
    return [jnp.sqrt(sum(x * x for x in col)) for col in b], u


def jacobi_svd(m: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    r"""Singular values :math:`\sigma` ``(..., d)`` (unsorted) and left singular
    vectors :math:`U` ``(..., d, d)`` (as columns) of :math:`M = U \Sigma V^T`.

    One-sided Jacobi on :math:`M^T`: :math:`M^T U = V \Sigma` has orthogonal
    columns of norms :math:`\sigma_i`, accurate to about ``eps`` times the
    largest (better, relative to each, for well-scaled columns).
    """
    sig, u = _svd_columns(m)
    return (jnp.stack(sig, axis=-1),
            jnp.stack([jnp.stack(col, axis=-1) for col in u], axis=-1))


def _eigh_apply(a: jnp.ndarray, fns):
    """``fn(A)`` for each ``fn`` of ``fns`` (elementwise on the eigenvalues,
    floored at :func:`_rel_floor` times the largest) of symmetric PSD ``a``.

    Up to :data:`JACOBI_MAX_DIM` the eigenpairs are :func:`jacobi_svd`'s (for a
    PSD matrix the singular values are the eigenvalues): elementwise batch
    arithmetic, no LAPACK call, so the solver's programs for ``d <= 8`` hold no
    custom call (concurrent executions of programs calling LAPACK's ``eigh``
    deadlock XLA's CPU runtime); above, LAPACK's ``eigh``.
    """
    a = symmetrize(a)
    floor = _rel_floor(a.dtype)
    if a.shape[-1] <= JACOBI_MAX_DIM:
        lam, vec = _svd_columns(a)
        top = lam[0]
        for x in lam[1:]:
            top = jnp.maximum(top, x)
        lam = [jnp.maximum(x, floor * top) for x in lam]
        return [_compose(vec, [fn(x) for x in lam]) for fn in fns]
    lam, vec = jnp.linalg.eigh(a)
    top = jnp.max(lam, axis=-1, keepdims=True)
    lam = jnp.maximum(lam, floor * jnp.maximum(top, 0.0))
    out = []
    for fn in fns:
        out.append(symmetrize((vec * fn(lam)[..., None, :]) @ jnp.swapaxes(vec, -1, -2)))
    return out


def sqrtm(a: jnp.ndarray) -> jnp.ndarray:
    """Principal square root of symmetric PSD matrices (negative eigenvalues clipped)."""
    d = a.shape[-1]
    if d == 1:
        return jnp.sqrt(jnp.maximum(a, 0.0))
    if d == 2:
        return _sqrtm2(a)[0]
    return _eigh_apply(a, [jnp.sqrt])[0]


def sqrtm_and_inv(a: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    r""":math:`(A^{1/2}, A^{-1/2})` of symmetric positive definite matrices."""
    d = a.shape[-1]
    tiny = _tiny(a.dtype)
    if d == 1:
        r = jnp.sqrt(jnp.maximum(a, tiny))
        return r, 1.0 / r
    if d == 2:
        root, s = _sqrtm2(a)
        # det(root) = sqrt(det a) = s; inverse of a 2x2 matrix is adj / det.
        adj = jnp.stack(
            [
                jnp.stack([root[..., 1, 1], -root[..., 0, 1]], axis=-1),
                jnp.stack([-root[..., 1, 0], root[..., 0, 0]], axis=-1),
            ],
            axis=-2,
        )
        # sqrt(det a) = sqrt(l1 l2) >= sqrt(floor) * l1: the same floor as below.
        floor = jnp.sqrt(_rel_floor(a.dtype)) * trace(a)
        return root, adj / jnp.maximum(s, jnp.maximum(floor, tiny))[..., None, None]
    root, inv = _eigh_apply(
        a, [jnp.sqrt, lambda lam: 1.0 / jnp.sqrt(jnp.maximum(lam, tiny))]
    )
    return root, inv


def bures_cross_sqrtm(sqrt_s: jnp.ndarray, c: jnp.ndarray,
                      sqrt_c: jnp.ndarray | None = None) -> jnp.ndarray:
    r""":math:`(S^{1/2} C S^{1/2})^{1/2}` given :math:`S^{1/2}` (broadcasting).

    Without ``sqrt_c``: the square root of the product (closed form for
    ``d <= 2``, else a symmetric eigendecomposition). With
    :math:`C^{1/2}` given and ``d >= 3``, from the singular values of
    :math:`M = S^{1/2} C^{1/2} = U \Sigma V^T`: :math:`S^{1/2} C S^{1/2} = M M^T
    = U \Sigma^2 U^T`, whose root is :math:`U \Sigma U^T`. They are the
    eigenpairs of the symmetric ``2d x 2d`` matrix
    :math:`\begin{pmatrix} 0 & M \\ M^T & 0 \end{pmatrix}` (eigenvalues
    :math:`\pm\sigma_i`, eigenvectors :math:`(u_i, \pm v_i)/\sqrt 2`), so
    :math:`U \Sigma U^T = 2 \sum_{\sigma_i > 0} \sigma_i w_i w_i^T` with
    :math:`w_i` the top half of the eigenvector. The singular values are
    accurate to about ``eps`` times the largest, where the eigenvalues of
    :math:`S^{1/2} C S^{1/2}` are accurate to ``eps`` times the largest
    *squared*: in float32 an input of condition number 1e4 paired with an atom
    like it (1e8 in the product) loses its small directions, with cost errors
    of several units that made the solver's outer iteration cycle. Up to
    ``d = 8`` the singular value decomposition is :func:`jacobi_svd` (no
    ``2d x 2d`` matrix), above it the eigendecomposition of that matrix.
    """
    d = c.shape[-1]
    if d <= 2 or sqrt_c is None:
        return sqrtm(symmetrize(sqrt_s @ c @ sqrt_s))
    m = sqrt_s @ sqrt_c
    if d <= JACOBI_MAX_DIM:
        sig, u = _svd_columns(m)
        return _compose(u, sig)
    zeros = jnp.zeros_like(m)
    big = jnp.concatenate(
        [jnp.concatenate([zeros, m], axis=-1),
         jnp.concatenate([jnp.swapaxes(m, -1, -2), zeros], axis=-1)], axis=-2)
    sig, vec = jnp.linalg.eigh(big)  # ascending: the top d are +sigma_i
    sig = jnp.maximum(sig[..., d:], 0.0)
    w = vec[..., :d, d:]
    return symmetrize(2.0 * (w * sig[..., None, :]) @ jnp.swapaxes(w, -1, -2))


def bures_cost_from_cross(
    m1: jnp.ndarray,
    s1: jnp.ndarray,
    m2: jnp.ndarray,
    c2: jnp.ndarray,
    cross: jnp.ndarray,
) -> jnp.ndarray:
    """Bures–Wasserstein cost given the cross term ``(S1^1/2 C2 S1^1/2)^1/2``; clipped at 0."""
    diff = m1 - m2
    val = jnp.sum(diff * diff, axis=-1) + trace(s1) + trace(c2) - 2.0 * trace(cross)
    return jnp.maximum(val, 0.0)


def bures_cost(
    m1: jnp.ndarray, s1: jnp.ndarray, m2: jnp.ndarray, c2: jnp.ndarray
) -> jnp.ndarray:
    r"""Squared 2-Wasserstein distance between Gaussians, broadcasting over leading axes.

    For ``d = 2`` the cross term is
    :math:`\operatorname{tr}(S^{1/2} C S^{1/2})^{1/2} = \sqrt{\operatorname{tr}(SC) + 2\sqrt{\det S \det C}}`.
    """
    d = m1.shape[-1]
    diff = m1 - m2
    base = jnp.sum(diff * diff, axis=-1) + trace(s1) + trace(c2)
    if d == 1:
        cross_tr = jnp.sqrt(jnp.maximum(s1[..., 0, 0] * c2[..., 0, 0], 0.0))
    elif d == 2:
        tr_sc = jnp.sum(s1 * jnp.swapaxes(c2, -1, -2), axis=(-2, -1))
        dets = jnp.maximum(_det2(s1) * _det2(c2), 0.0)
        cross_tr = jnp.sqrt(jnp.maximum(tr_sc + 2.0 * jnp.sqrt(dets), 0.0))
    else:
        cross_tr = trace(bures_cross_sqrtm(sqrtm(s1), c2))
    return jnp.maximum(base - 2.0 * cross_tr, 0.0)


def bures_barycenter_step(
    inv_sqrt_s: jnp.ndarray, cross: jnp.ndarray, weights: jnp.ndarray
) -> jnp.ndarray:
    r"""One fixed-point step for the covariance of a Gaussian barycenter.

    Álvarez-Esteban, del Barrio, Cuesta-Albertos & Matrán (2016), Theorem 4.2:

    .. math::
       S \leftarrow S^{-1/2} \Big(\sum_l w_l (S^{1/2} C_l S^{1/2})^{1/2}\Big)^2 S^{-1/2},

    which decreases :math:`\sum_l w_l W_2^2(\mathcal{N}(\cdot, S), \mathcal{N}(\cdot, C_l))`.

    Args:
      inv_sqrt_s: :math:`S^{-1/2}`, ``(..., d, d)``.
      cross: :math:`(S^{1/2} C_l S^{1/2})^{1/2}`, ``(..., L, d, d)``.
      weights: ``(..., L)``, summing to one over ``L``.
    """
    t = jnp.einsum("...l,...lab->...ab", weights, cross)
    half = inv_sqrt_s @ t
    return symmetrize(half @ jnp.swapaxes(half, -1, -2))


def bures_barycenter(
    means: jnp.ndarray,
    covs: jnp.ndarray,
    weights: jnp.ndarray,
    *,
    iterations: int = 50,
    init: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    r"""Barycenter of Gaussians :math:`\mathcal{N}(m_l, C_l)` with weights :math:`w_l`.

    Mean :math:`\sum_l w_l m_l`; covariance by :func:`bures_barycenter_step`
    iterated ``iterations`` times from ``init`` (default :math:`\sum_l w_l C_l`).
    """
    import jax  # local: keeps the module import light

    mean = jnp.einsum("l,ld->d", weights, means)
    s0 = jnp.einsum("l,lab->ab", weights, covs) if init is None else init

    def step(s, _):
        root, inv = sqrtm_and_inv(s)
        cross = bures_cross_sqrtm(root[None], covs)
        return bures_barycenter_step(inv, cross, weights), None

    s, _ = jax.lax.scan(step, s0, None, length=iterations)
    return mean, s
