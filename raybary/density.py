r"""Log-densities of GMMs on points and on regular 2-D grids.

.. math::
   \log p(x) = \operatorname{LSE}_k \Big(\log w_k - \tfrac12 \|L_k^{-1}(x - m_k)\|^2
               - \textstyle\sum_i \log (L_k)_{ii} - \tfrac d2 \log 2\pi\Big),
   \qquad C_k = L_k L_k^T \text{ (Cholesky)}.

For ``d > 2`` a grid shows the 2-D marginal on coordinates ``dims = (i, j)``:
a GMM's marginal keeps its weights and takes the ``(i, j)`` entries of the
means and the ``(i, j) x (i, j)`` block of the covariances.

:func:`covering_extent` is the window that shows GMMs whole (the run's grid
extents and the figures' windows): every component's mean +- 3 standard
deviations, and all of the region where the mixture's ``-log p`` is below
:data:`OUTER_LEVEL` (the outermost contour a figure draws), plus a margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from raybary.types import GMM

__all__ = ["log_density", "log_density_grid", "marginal_components", "default_bounds",
           "covering_extent", "OUTER_LEVEL"]

#: ``-log p`` of the outermost contour the figures draw (levels 1..10, as in the
#: OTT-JAX tutorial); :func:`covering_extent` keeps that contour inside the window.
OUTER_LEVEL = 10.0


@jax.jit
def _log_density(weights, means, covs, points):
    d = means.shape[-1]
    chol = jnp.linalg.cholesky(covs)  # (K, d, d)
    diff = points[None, :, :] - means[:, None, :]  # (K, N, d)
    sol = jax.vmap(lambda c, x: jsl.solve_triangular(c, x.T, lower=True).T)(chol, diff)
    maha = jnp.sum(sol * sol, axis=-1)  # (K, N)
    logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    comp = -0.5 * maha - logdet[:, None] - 0.5 * d * jnp.log(2 * jnp.pi)
    pos = weights > 0
    logw = jnp.where(pos, jnp.log(jnp.where(pos, weights, 1.0)), -jnp.inf)
    return jax.nn.logsumexp(jnp.where(pos[:, None], comp + logw[:, None], -jnp.inf), axis=0)


_log_density_batch = jax.jit(jax.vmap(_log_density, in_axes=(0, 0, 0, 0)))


def _arrays(gmm):
    if isinstance(gmm, GMM):
        return gmm.weights, gmm.means, gmm.covs
    w, m, c = gmm
    return np.asarray(w), np.asarray(m), np.asarray(c)


def marginal_components(means, covs, dims: Sequence[int] | None):
    """Means ``(..., d)`` and covariances ``(..., d, d)`` of Gaussians, marginalised
    on coordinates ``dims``: ``(..., k)`` and ``(..., k, k)`` (NumPy; unchanged if
    ``dims`` is ``None``). A GMM's marginal keeps its weights."""
    means, covs = np.asarray(means), np.asarray(covs)
    if dims is None:
        return means, covs
    idx = np.asarray(dims)
    return means[..., idx], covs[..., idx[:, None], idx[None, :]]


def log_density(gmm, points, *, dims: Sequence[int] | None = None, dtype: str = "float64"):
    """Log-density of a GMM at ``points`` ``(N, d)`` (or ``(N, 2)`` with ``dims``).

    ``gmm`` is a :class:`~raybary.GMM` or ``(weights, means, covs)``; with
    leading batch axes on all three arrays and on ``points`` ``(B, N, d)`` it
    evaluates a batch of GMMs at once. Components of weight 0 are ignored.
    """
    w, m, c = _arrays(gmm)
    m, c = marginal_components(m, c, dims)
    pts = np.asarray(points)
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(x, dtype) for x in (w, m, c, pts)]
        fn = _log_density if args[0].ndim == 1 else _log_density_batch
        return np.asarray(fn(*args))


def default_bounds(means: np.ndarray, covs: np.ndarray, *, pad: float = 3.0) -> np.ndarray:
    """Grid extents ``(xmin, xmax, ymin, ymax)`` covering every mean +- ``pad`` std devs."""
    m = np.asarray(means).reshape(-1, 2)
    sd = np.sqrt(np.diagonal(np.asarray(covs).reshape(-1, 2, 2), axis1=1, axis2=2))
    lo, hi = (m - pad * sd).min(axis=0), (m + pad * sd).max(axis=0)
    return np.array([lo[0], hi[0], lo[1], hi[1]])


def covering_extent(gmms, dims: Sequence[int] | None = None, *, pad: float = 3.0,
                    level: float = OUTER_LEVEL, margin: float = 0.05) -> np.ndarray:
    r"""A window that shows every GMM of ``gmms`` whole, on coordinates ``dims``.

    ``gmms``: :class:`~raybary.GMM` s or ``(weights, means, covs)`` (``None``
    entries are skipped); ``dims``: one or two coordinates (default: all of
    them, ``d <= 2``). Returns ``(xmin, xmax)`` for one coordinate and
    ``(xmin, xmax, ymin, ymax)`` for two.

    On the GMMs' marginals on ``dims`` (``k`` coordinates), component ``i``
    of a GMM with ``K`` components covers its mean +- ``r_i`` standard
    deviations along each axis, with

    .. math::
       r_i = \max\Big(\text{pad}, \sqrt{2\big(\text{level} + \log K + \log w_i
             - \tfrac k2 \log 2\pi - \tfrac12 \log\det C_i\big)}\Big):

    at least ``pad`` standard deviations, and the whole ellipse where
    ``w_i N_i(x) >= e^{-level} / K``. As ``p <= K max_i w_i N_i``, that holds
    all of the region where ``-log p <= level``: the outermost contour of a
    figure is never cut. The box is then widened by ``margin`` of its size on
    each side.
    """
    ws, ms, cs, logk = [], [], [], []
    for g in gmms:
        if g is None:
            continue
        w, m, c = (np.asarray(x, np.float64) for x in _arrays(g))
        ws.append(w)
        ms.append(m)
        cs.append(c)
        logk.append(np.full(len(w), np.log(max(len(w), 1))))
    if not ws:
        raise ValueError("covering_extent needs at least one GMM")
    w, m, c, lk = (np.concatenate(x) for x in (ws, ms, cs, logk))
    if dims is None:
        dims = tuple(range(m.shape[-1]))
    m, c = marginal_components(m, c, tuple(int(i) for i in dims))
    lo, hi = component_boxes(w, m, c, lk, pad=pad, level=level)
    return grown_window(lo.min(axis=0), hi.max(axis=0), margin)


def component_boxes(weights, means, covs, log_k, *, pad: float = 3.0,
                    level: float = OUTER_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Each component's box of :func:`covering_extent`: ``(lo, hi)``, both ``(N, k)``.

    ``weights (N,)``, ``means (N, k)`` and ``covs (N, k, k)`` (float64, already
    marginalised on the shown coordinates, ``k`` of 1 or 2), ``log_k (N,)``:
    the log of the number of components of each one's GMM. The window of a
    set of GMMs is :func:`grown_window` of the boxes' union; the runner
    computes a whole shard's windows at once from these
    (:mod:`raybary.runner.grids`).
    """
    m, c = means, covs
    k = m.shape[-1]
    if k not in (1, 2):
        raise ValueError(f"covering_extent shows one or two coordinates, got {k}")
    sd = np.sqrt(np.diagonal(c, axis1=-2, axis2=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        _, logdet = np.linalg.slogdet(c)
        room = level + log_k + np.log(weights) - 0.5 * k * np.log(2 * np.pi) - 0.5 * logdet
        r = np.maximum(pad, np.sqrt(np.where(room > 0, 2 * room, 0.0)))
    return m - r[:, None] * sd, m + r[:, None] * sd


def grown_window(lo: np.ndarray, hi: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """``(xmin, xmax[, ymin, ymax])`` from the corners ``lo``, ``hi`` ``(..., k)`` of a
    box, widened by ``margin`` of its size on each side (leading axes kept)."""
    grow = margin * (hi - lo)
    return np.stack([lo - grow, hi + grow], axis=-1).reshape(*lo.shape[:-1], -1)


@partial(jax.jit, static_argnames=("shape",))
def _grid_batch(weights, means, covs, bounds, shape):
    h, w = shape
    t_x = jnp.linspace(0.0, 1.0, w)
    t_y = jnp.linspace(0.0, 1.0, h)

    def one(wt, m, c, b):
        xs = b[0] + (b[1] - b[0]) * t_x
        ys = b[2] + (b[3] - b[2]) * t_y
        gx, gy = jnp.meshgrid(xs, ys)
        pts = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
        return _log_density(wt, m, c, pts).reshape(h, w)

    return jax.vmap(one)(weights, means, covs, bounds)


def log_density_grid(
    gmm,
    shape: tuple[int, int] = (50, 50),
    bounds=None,
    *,
    dims: Sequence[int] = (0, 1),
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Log-density on a regular ``H x W`` grid; returns ``(grid, bounds)``.

    ``gmm`` is a :class:`~raybary.GMM`, ``(weights, means, covs)`` or a batch of
    them as arrays with a leading axis ``B`` (then ``grid`` is ``(B, H, W)`` and
    ``bounds`` ``(B, 4)``). ``bounds`` are ``(xmin, xmax, ymin, ymax)``, default
    from the GMM (:func:`default_bounds`). For ``d = 1`` the grid is undefined:
    use :func:`log_density`. For ``d > 2`` it is the marginal on ``dims``.
    """
    w, m, c = _arrays(gmm)
    if m.shape[-1] < 2:
        raise ValueError("log_density_grid needs d >= 2; use log_density for d = 1")
    dims = tuple(int(x) for x in dims)
    if len(dims) != 2 or len(set(dims)) != 2 or not all(0 <= x < m.shape[-1] for x in dims):
        raise ValueError(f"dims must be two distinct coordinates in [0, {m.shape[-1]}), got {dims}")
    m, c = marginal_components(m, c, dims)
    single = w.ndim == 1
    if single:
        w, m, c = w[None], m[None], c[None]
    if bounds is None:
        b = np.stack([default_bounds(mi, ci) for mi, ci in zip(m, c)])
    else:
        b = np.broadcast_to(np.asarray(bounds, np.float64), (w.shape[0], 4))
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(x, dtype) for x in (w, m, c, b)]
        grid = np.asarray(_grid_batch(*args, shape=tuple(int(s) for s in shape)))
    return (grid[0], b[0]) if single else (grid, b)
