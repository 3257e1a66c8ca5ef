r"""Samples moved from one GMM to another along their MW2 plan: :func:`map_samples`.

POT's ``ot.gmm.gmm_ot_apply_map`` (Delon & Desolneux 2020, Section 6), as
NumPy over all samples at once. With :math:`P` the optimal coupling of the
component weights (``source.weights`` on its rows, ``target.weights`` on its
columns), :math:`g_i` the source's component densities, :math:`p = \sum_k
w_k g_k` the source density and :math:`T_{ij}(x) = A_{ij} (x - m_i) + m_j`
the Gaussian Monge map from component ``i`` of the source to component ``j``
of the target (:math:`A_{ij} = C_i^{-1/2} (C_i^{1/2} C_j C_i^{1/2})^{1/2}
C_i^{-1/2}`), a sample ``x`` goes to

* ``"barycentric"`` (POT's ``"bary"``, :math:`T_{bary}`):
  :math:`\sum_{ij} P_{ij}\, g_i(x) / p(x)\; T_{ij}(x)`, the barycentric
  projection of the GMM-OT plan;
* ``"random"`` (POT's ``"rand"``, :math:`T_{rand}`): :math:`T_{ij}(x)` for one
  pair ``(i, j)`` drawn with probability :math:`P_{ij}\, g_i(x) / p(x)`. Samples
  of the source then follow the target exactly (each component's share
  :math:`P_{ij}/w_i` of it is pushed onto component ``j``).

The plan is raybary's entropic plan (:func:`raybary.mw2_batch` with
``plans=True``) unless one is given. Its rows are rescaled to sum exactly to
the source's weights first (an entropic plan meets them to the solver's
tolerance), so the weights :math:`P_{ij} g_i / p` of a sample sum to one.
"""

from __future__ import annotations

import numpy as np

from raybary.types import GMM

__all__ = ["map_samples"]

METHODS = {"barycentric": "barycentric", "bary": "barycentric",
           "random": "random", "rand": "random"}
CHUNK = 65_536  # samples per block: bounds the (n, Ks, Kt) weights in memory


def map_samples(x, source: GMM, target: GMM, method: str = "barycentric", *,
                plan=None, seed: int | np.random.Generator | None = None,
                epsilon: float | None = None, relative_epsilon: float | None = None,
                dtype: str = "float32", max_iterations: int | None = None,
                tol: float | None = None, validate: bool = True) -> np.ndarray:
    """Move samples ``x (n, d)`` of ``source`` along the MW2 plan to ``target``.

    Args:
      x: the samples, ``(n, d)`` with ``d = source.dim``, finite.
      source, target: :class:`~raybary.GMM` of one dimension.
      method: ``"barycentric"`` or ``"random"`` (module docstring; POT's
        ``"bary"`` and ``"rand"`` are taken too).
      plan: the coupling ``(K_source, K_target)`` to use (e.g. POT's exact
        ``ot.gmm.gmm_ot_plan``); by default raybary's, solved with the
        options below (:func:`raybary.mw2_batch`'s).
      seed: for ``"random"``: a seed or a ``numpy.random.Generator``.
      epsilon, relative_epsilon, dtype, max_iterations, tol, validate: as
        :func:`raybary.mw2_batch`.

    Returns:
      ``float64 (n, d)``, the moved samples.
    """
    from raybary.batch.distances import _checked_pairs, mw2_batch

    if method not in METHODS:
        raise ValueError(f"method must be 'barycentric' or 'random', got {method!r}")
    [(source, target)] = _checked_pairs([(source, target)], dtype, validate)
    x = _checked_samples(x, source.dim)
    if plan is None:
        _, [plan] = mw2_batch([(source, target)], plans=True, epsilon=epsilon,
                              relative_epsilon=relative_epsilon, dtype=dtype,
                              max_iterations=max_iterations, tol=tol, validate=False)
    plan = _checked_plan(plan, source, target)
    linear = monge_maps(source.covs, target.covs)  # (Ks, Kt, d, d)
    shift = target.means[None, :, :] - np.einsum("ijab,ib->ija", linear, source.means)
    d = source.dim
    linear, shift = linear.reshape(-1, d, d), shift.reshape(-1, d)  # pair (i, j) -> i * Kt + j
    rng = np.random.default_rng(seed) if METHODS[method] == "random" else None
    out = np.empty_like(x)
    for start in range(0, len(x), CHUNK):  # blocks of samples, each vectorised
        block = x[start:start + CHUNK]
        coef = _pair_weights(block, source, plan).reshape(len(block), -1)  # rows sum to 1
        if rng is None:
            moved = (block @ np.swapaxes(linear, 0, 1).reshape(d, -1)).reshape(len(block), -1, d)
            out[start:start + CHUNK] = np.einsum("nk,nka->na", coef, moved) + coef @ shift
        else:
            pick = _draw(coef, rng)
            out[start:start + CHUNK] = np.einsum("nab,nb->na", linear[pick], block) + shift[pick]
    return out


def monge_maps(covs_s: np.ndarray, covs_t: np.ndarray) -> np.ndarray:
    r"""Linear parts :math:`A_{ij} = S_i^{-1/2} (S_i^{1/2} T_j S_i^{1/2})^{1/2} S_i^{-1/2}`
    ``(Ks, Kt, d, d)`` of the Gaussian Monge maps from ``N(., S_i)`` to ``N(., T_j)``
    (float64 eigendecompositions; symmetric positive definite)."""
    root, inv_root = _sqrt_and_inv(covs_s)
    middle = root[:, None] @ covs_t[None] @ root[:, None]
    cross, _ = _sqrt_and_inv(0.5 * (middle + np.swapaxes(middle, -1, -2)))
    out = inv_root[:, None] @ cross @ inv_root[:, None]
    return 0.5 * (out + np.swapaxes(out, -1, -2))


def _sqrt_and_inv(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square root and inverse square root of symmetric positive definite matrices."""
    lam, vec = np.linalg.eigh(a)
    lam = np.maximum(lam, np.finfo(np.float64).tiny)
    vt = np.swapaxes(vec, -1, -2)
    return (vec * np.sqrt(lam)[..., None, :]) @ vt, (vec / np.sqrt(lam)[..., None, :]) @ vt


def _log_densities(x: np.ndarray, gmm: GMM) -> np.ndarray:
    """``log g_k(x)`` of every component, ``(n, K)``, by Cholesky factors."""
    chol = np.linalg.cholesky(gmm.covs)  # (K, d, d)
    diff = x[:, None, :] - gmm.means[None, :, :]  # (n, K, d)
    z = np.einsum("kab,nkb->nka", np.linalg.inv(chol), diff)  # L^-1 (x - m)
    log_det = 2.0 * np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
    return -0.5 * (np.sum(z * z, axis=-1) + log_det + gmm.dim * np.log(2.0 * np.pi))


def _pair_weights(x: np.ndarray, source: GMM, plan: np.ndarray) -> np.ndarray:
    r""":math:`P_{ij}\, g_i(x) / p(x)` ``(n, Ks, Kt)`` (POT's ``plan / denom``), in logs."""
    log_g = _log_densities(x, source)
    with np.errstate(divide="ignore"):
        log_w = np.log(source.weights)
    joint = log_g + log_w[None, :]
    top = np.max(joint, axis=1, keepdims=True)
    log_p = top + np.log(np.sum(np.exp(joint - top), axis=1, keepdims=True))
    return np.exp(log_g - log_p)[:, :, None] * plan[None, :, :]


def _draw(prob: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of ``prob (n, m)`` (rows summing to ~1), vectorised:
    the first column whose cumulative sum passes a uniform draw."""
    cum = np.cumsum(prob, axis=1)
    u = rng.random(len(prob)) * cum[:, -1]
    return np.minimum(np.sum(cum <= u[:, None], axis=1), prob.shape[1] - 1)


def _checked_samples(x, d: int) -> np.ndarray:
    """``x`` as float64 ``(n, d)``, else ``ValueError`` naming the problem."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"samples must be an (n, {d}) array (the GMMs' dimension), "
                         f"got shape {x.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
    if bad.size:
        raise ValueError(f"samples must be finite: rows {bad[:5].tolist()}"
                         f"{' ...' if bad.size > 5 else ''} hold NaN or inf")
    return x


def _checked_plan(plan, source: GMM, target: GMM) -> np.ndarray:
    """The plan as float64, rows rescaled to sum to ``source.weights``."""
    plan = np.asarray(plan, dtype=np.float64)
    shape = (source.n_components, target.n_components)
    if plan.shape != shape:
        raise ValueError(f"plan must have shape {shape} (source x target components), "
                         f"got {plan.shape}")
    if not np.all(np.isfinite(plan)) or np.any(plan < 0):
        raise ValueError("plan must be finite and non-negative")
    rows = plan.sum(axis=1)
    if np.any((rows <= 0) & (source.weights > 0)):
        raise ValueError("plan has an empty row for a source component of positive weight")
    scale = np.where(rows > 0, source.weights / np.where(rows > 0, rows, 1.0), 0.0)
    return plan * scale[:, None]
