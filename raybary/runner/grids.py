r"""A shard's grids and curves at once: the runner's fast path to the values of
:func:`raybary.log_density_grid`, :func:`raybary.log_density` and
:func:`raybary.density.covering_extent` (used by
:func:`raybary.runner.shard.shard_grids`).

Extents: every component's box (:func:`raybary.density.component_boxes`) of
all the GMMs of a shard in one NumPy pass, their union per problem by
``np.minimum.reduceat`` -- the same arithmetic as ``covering_extent``, bit
for bit, without a Python call per problem.

Log-densities: a component's covariance (its 2-D marginal on the grid's
coordinates) has the Cholesky factor :math:`L = [[l_{00}, 0], [l_{10}, l_{11}]]`
in closed form, and at the grid point :math:`(x_j, y_i)`

.. math::
   u = (x_j - m_x) / l_{00}, \quad v = (y_i - m_y) / l_{11} - (l_{10} / l_{11})\, u,
   \quad \log w \mathcal{N} = c_0 - \tfrac12 u^2 - \tfrac12 v^2,
   \quad c_0 = \log w - \log l_{00} - \log l_{11} - \log 2\pi,

where :math:`x_j = x_0 + (x_1 - x_0) t_j` and :math:`y_i = y_0 + (y_1 - y_0) t_i`
(``t = linspace(0, 1, n)``): :math:`u_j = a + s\,t_j` and
:math:`v_{ij} = e + f\,t_i - b\,u_j`. So a component is six numbers
:math:`(c_0, a, s, e, f, b)`, computed here in float64, and one jitted
program (:func:`_lse_block`) evaluates a block of GMMs, ``B x K x H x W``,
in float32: a fused loop per component, the log-sum-exp over components
unrolled (no Cholesky, no solve, no points array). A ``d = 1`` curve is the
same with ``H = 1`` and :math:`v = 0`. Components of weight 0 give
:math:`c_0 = -\infty` (ignored, as in ``log_density``).

GMMs go in groups by their number of components rounded up by
:func:`~raybary.batch.padding.bucket_size` (at most a third of a group is
padding), in blocks of :data:`BLOCK` GMMs (fewer, a power of two, for a
smaller group): a run compiles one program per ``(block, K, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial, reduce
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from raybary.batch.padding import bucket_size, next_pow2
from raybary.density import OUTER_LEVEL, component_boxes, grown_window, marginal_components

__all__ = ["BLOCK", "Stacked", "stack_gmms", "stacked_extents", "grid_coefficients",
           "log_density_blocks", "rows_log_densities"]

#: GMMs per call of the jitted program (a 50 x 50 grid of 6 components: 15,000
#: values a GMM; 256 GMMs keep a block's arrays a few MB, in cache).
BLOCK = 256
#: Components up to which the log-sum-exp is unrolled (beyond: a loop).
UNROLL = 16


class Stacked(NamedTuple):
    """GMMs' components end to end: ``weights (N,)``, ``means (N, k)`` and
    ``covs (N, k, k)`` (float64, marginalised on the shown coordinates);
    GMM ``g`` has ``sizes[g]`` components, in order."""

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    sizes: np.ndarray

    def gmm_of_component(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.sizes)), self.sizes)


def stack_gmms(gmms: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], d: int,
               dims: Sequence[int]) -> Stacked:
    """:class:`Stacked` of GMMs ``(w, m, c)`` of dimension ``d``, marginalised on ``dims``."""
    sizes = np.fromiter((len(g[0]) for g in gmms), np.int64, len(gmms))
    if not len(gmms):
        return Stacked(np.zeros(0), np.zeros((0, len(dims))),
                       np.zeros((0, len(dims), len(dims))), sizes)
    w = np.concatenate([g[0] for g in gmms]).astype(np.float64, copy=False)
    m = np.concatenate([g[1] for g in gmms]).astype(np.float64, copy=False).reshape(-1, d)
    c = np.concatenate([g[2] for g in gmms]).astype(np.float64, copy=False).reshape(-1, d, d)
    if tuple(dims) != tuple(range(d)):
        m, c = marginal_components(m, c, tuple(dims))
    return Stacked(w, m, c, sizes)


def stacked_extents(st: Stacked, starts: np.ndarray, *, pad: float = 3.0,
                    level: float = OUTER_LEVEL, margin: float = 0.05) -> np.ndarray:
    """:func:`~raybary.density.covering_extent` of consecutive runs of GMMs at once:
    run ``p`` is the components from ``starts[p]`` to the next start (every run
    non-empty); returns ``(P, 2k)``."""
    log_k = np.repeat(np.log(np.maximum(st.sizes, 1)), st.sizes)
    lo, hi = component_boxes(st.weights, st.means, st.covs, log_k, pad=pad, level=level)
    return grown_window(np.minimum.reduceat(lo, starts, axis=0),
                        np.maximum.reduceat(hi, starts, axis=0), margin)


def grid_coefficients(st: Stacked, extents: np.ndarray) -> np.ndarray:
    """The six numbers ``(c0, a, s, e, f, b)`` of each component (module
    docstring) on its extent ``extents (N, 2k)``: ``(N, 6)`` float64."""
    w, m, c = st.weights, st.means, st.covs
    k = m.shape[-1]
    out = np.zeros((len(w), 6))
    with np.errstate(divide="ignore", invalid="ignore"):
        l00 = np.sqrt(c[:, 0, 0])
        out[:, 1] = (extents[:, 0] - m[:, 0]) / l00
        out[:, 2] = (extents[:, 1] - extents[:, 0]) / l00
        half_logdet = np.log(l00)
        if k == 2:
            l10 = 0.5 * (c[:, 0, 1] + c[:, 1, 0]) / l00  # as jnp.linalg.cholesky (symmetrised)
            l11 = np.sqrt(c[:, 1, 1] - l10 * l10)
            out[:, 3] = (extents[:, 2] - m[:, 1]) / l11
            out[:, 4] = (extents[:, 3] - extents[:, 2]) / l11
            out[:, 5] = l10 / l11
            half_logdet = half_logdet + np.log(l11)
        out[:, 0] = np.where(w > 0, np.log(np.where(w > 0, w, 1.0)), -np.inf)
        out[:, 0] -= half_logdet + 0.5 * k * np.log(2 * np.pi)
    return out


@partial(jax.jit, static_argnames=("shape",))
def _lse_block(coef, shape):
    """``log sum_k exp(c0 - u^2/2 - v^2/2)`` on an ``H x W`` grid for a block of
    GMMs' coefficients ``coef (B, K, 6)``: ``(B, H, W)``."""
    h, w = shape
    n_comp = coef.shape[1]
    t_x = jnp.linspace(0.0, 1.0, w, dtype=coef.dtype)
    t_y = jnp.linspace(0.0, 1.0, h, dtype=coef.dtype)

    def component(k):
        c0, a, s, e, f, b = (coef[:, k, i, None] for i in range(6))  # (B, 1) each
        u = a + s * t_x  # (B, W)
        v = (e + f * t_y)[:, :, None] - b[:, :, None] * u[:, None, :]  # (B, H, W)
        return (c0 - 0.5 * u * u)[:, None, :] - 0.5 * v * v

    if n_comp <= UNROLL:
        top = reduce(jnp.maximum, (component(k) for k in range(n_comp)))
    else:
        top = jax.lax.fori_loop(1, n_comp, lambda k, t: jnp.maximum(t, component(k)),
                                component(0))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    if n_comp <= UNROLL:
        total = reduce(jnp.add, (jnp.exp(component(k) - top) for k in range(n_comp)))
    else:
        total = jax.lax.fori_loop(0, n_comp, lambda k, t: t + jnp.exp(component(k) - top),
                                  jnp.zeros_like(top))
    return top + jnp.log(total)


def log_density_blocks(coef: np.ndarray, sizes: np.ndarray, shape: tuple[int, int],
                       out: np.ndarray | None = None,
                       index: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Log-densities of GMMs on their ``H x W`` grids, from their components'
    :func:`grid_coefficients` ``coef (N, 6)`` (GMM ``g`` has ``sizes[g]``
    components, in order); a GMM with no components is ``-inf``. GMM ``g``'s
    grid goes to ``out[tuple(i[g] for i in index)]`` (default: a new
    ``(G, H, W)`` float32 array, in order); returns ``out``."""
    h, w = (int(x) for x in shape)
    n_gmms = len(sizes)
    if out is None:
        out, index = np.empty((n_gmms, h, w), np.float32), (np.arange(n_gmms),)
    if not n_gmms:
        return out
    gmm_of = np.repeat(np.arange(n_gmms), sizes)
    position = np.arange(len(gmm_of)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    classes = {int(x): bucket_size(int(x)) for x in np.unique(sizes)}
    padded_k = np.array([classes[int(x)] for x in sizes])
    pending = []
    for k in sorted(set(classes.values())):
        members = np.flatnonzero(padded_k == k)
        block = min(BLOCK, next_pow2(len(members)))
        packed = np.zeros((-(-len(members) // block) * block, k, 6), np.float32)
        packed[..., 0] = -np.inf
        local = np.empty(n_gmms, np.int64)
        local[members] = np.arange(len(members))
        mine = padded_k[gmm_of] == k
        packed[local[gmm_of[mine]], position[mine]] = coef[mine]
        for start in range(0, len(members), block):  # dispatched now, read below
            pending.append((members[start:start + block],
                            _lse_block(packed[start:start + block], shape=(h, w))))
    for rows, values in pending:
        out[tuple(i[rows] for i in index)] = np.asarray(values)[: len(rows)]
    return out


def rows_log_densities(problems, results, rows: Sequence[int], ok: Sequence[int],
                       dims: Sequence[int], fixed: np.ndarray | None, extents: np.ndarray,
                       barycenters: np.ndarray, inputs: np.ndarray | None = None) -> None:
    """Extents and log-densities of the problems ``rows`` (all of one dimension),
    written into a shard's arrays as :func:`~raybary.runner.shard.shard_grids`
    stores them: ``extents (n, 2k)`` of every row, ``barycenters (n, H, W)``
    of the rows ``ok`` (a subset of ``rows``, in order) and ``inputs (n, J, H, W)``
    (if given) of each row's first ``J`` input GMMs; curves are ``H = 1``
    grids on ``dims = (0,)``. Extents are ``fixed`` for every row if given,
    else each problem's :func:`~raybary.runner.shard.problem_extents` (its
    inputs and, if ``ok``, its barycenter)."""
    gmms, owner, role = [], [], []
    is_ok = set(ok)
    for r, i in enumerate(rows):
        p = problems[i]
        gmms.extend((g.weights, g.means, g.covs) for g in p.gmms)
        owner.extend([r] * p.n_gmms)
        role.extend(range(p.n_gmms))
        if i in is_ok:
            b = results[i]
            gmms.append((b.weights, b.means, b.covs))
            owner.append(r)
            role.append(-1)
    st = stack_gmms(gmms, problems[rows[0]].dim, dims)
    owner, role = np.asarray(owner), np.asarray(role)
    comp_row = np.repeat(owner, st.sizes)
    if fixed is None:
        ext = stacked_extents(st, np.searchsorted(comp_row, np.arange(len(rows))))
    else:
        ext = np.broadcast_to(np.asarray(fixed, np.float64), (len(rows), 2 * len(dims)))
    extents[rows] = ext
    coef = grid_coefficients(st, ext[comp_row])
    rows = np.asarray(rows)
    n_inputs = 0 if inputs is None else inputs.shape[1]
    for mask, out in ((role == -1, barycenters), ((role >= 0) & (role < n_inputs), inputs)):
        if mask.any():
            index = (rows[owner[mask]],) if out is barycenters else (rows[owner[mask]], role[mask])
            log_density_blocks(coef[mask[st.gmm_of_component()]], st.sizes[mask],
                               out.shape[-2:], out, index)
