"""Padding ragged problems into fixed-shape buckets (NumPy only, no JAX).

A bucket is ``(d, n, J, L, K)``: dimension, atoms, GMMs, total components
and the components of the largest GMM, each rounded up to a coarse class
(:func:`bucket_of`), so that a batch of ragged problems compiles a handful of
programs, not one per shape. Padding is exact: padded atoms, components and
GMMs are masked out, and a padded dimension holds ``N(0, 1)`` in every
Gaussian, which adds nothing to any Bures cost and leaves the other
dimensions of the barycenter unchanged. Each problem is also centred and
scaled (translation and scale equivariance of the barycenter) so that float32
works on data far from the origin or of any scale: means ``(m - c) / s``,
covariances ``C / s^2``; costs and objectives scale by ``s^2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raybary.types import Problem

__all__ = ["Bucket", "Normalisation", "bucket_of", "bucket_size", "next_pow2", "pad_problems"]


def next_pow2(x: int) -> int:
    """Smallest power of two at least ``x`` (and at least 1)."""
    return 1 << max(int(x) - 1, 0).bit_length()


def bucket_size(x: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^k) at least ``x``.

    At most a third of a padded axis is waste, with about twice as many
    distinct sizes as powers of two alone.
    """
    p = next_pow2(x)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= x else p


@dataclass(frozen=True, order=True)
class Bucket:
    """Padded shape of a group of problems: dimension, atoms, GMMs, components
    in all, components of the largest GMM."""

    d: int
    n: int
    J: int
    L: int
    K: int = 0  # 0: as many as L


def dim_class(d: int) -> int:
    """1, 2 and 3 as they are (closed forms in d <= 2), then 5, 8, 12, 16, 24, ..."""
    return d if d <= 3 else 5 if d <= 5 else bucket_size(d)


def gmm_class(J: int) -> int:
    """3, 6, then 8, 12, 16, 24, ... (a padded GMM costs little)."""
    return 3 if J <= 3 else 6 if J <= 6 else bucket_size(J)


def components_class(L: int) -> int:
    """12, 24, 48, 96, ...: up to 12 the Newton system is solved whole, unrolled;
    above, per GMM block, so the cost grows about linearly in L."""
    return 12 * next_pow2(-(-L // 12))


def block_class(K: int) -> int:
    """4, 6, 8, 12, 16, ...: the size of the per-GMM Newton blocks (at most a
    third of a block is padding, which the block solves pay for cubically)."""
    return max(4, bucket_size(K))


def bucket_of(problem: Problem, n: int) -> Bucket:
    """Padded shape of ``problem`` with ``n`` atoms (coarse classes: few compiles;
    the padding costs at most ~2x in the Newton solve)."""
    return Bucket(
        dim_class(problem.dim),
        bucket_size(n),
        gmm_class(problem.n_gmms),
        components_class(problem.n_components),
        block_class(max(g.n_components for g in problem.gmms)),
    )


@dataclass(frozen=True)
class Normalisation:
    """Per-problem affine map into solver coordinates: ``x -> (x - center) / scale``."""

    center: np.ndarray  # (B, d)
    scale: np.ndarray  # (B,)


def _flat(problem: Problem):
    w = np.concatenate([g.weights for g in problem.gmms])
    m = np.concatenate([g.means for g in problem.gmms])
    c = np.concatenate([g.covs for g in problem.gmms])
    idx = np.concatenate(
        [np.full(g.n_components, j, dtype=np.int32) for j, g in enumerate(problem.gmms)]
    )
    return w, m, c, idx


def _normalisation(w, m, c, lam_l) -> tuple[np.ndarray, float]:
    mass = w * lam_l
    tot = mass.sum()
    mass = mass / tot if tot > 0 else np.full_like(w, 1.0 / len(w))
    center = mass @ m
    second = mass @ (np.sum((m - center) ** 2, axis=1) + np.trace(c, axis1=1, axis2=2))
    scale = float(np.sqrt(second)) if second > 0 else 1.0
    return center, scale


def pad_problems(
    problems: Sequence[Problem],
    bar_sizes: Sequence[int],
    bucket: Bucket,
    batch: int,
    *,
    epsilons: Sequence[float],
    relative_epsilon: bool,
    inits: Sequence[tuple[np.ndarray, np.ndarray] | None],
    keys: np.ndarray,
    dtype: np.dtype,
    restarts: Sequence[int] | None = None,
) -> tuple[dict[str, np.ndarray], Normalisation]:
    """Pad ``problems`` into arrays of the bucket's shape with ``batch`` rows.

    Rows past ``len(problems)`` repeat the first problem (harmless filler whose
    outputs are dropped). Returns the fields of
    :class:`raybary.solvers.barycenter.PaddedProblem` as NumPy arrays and the
    normalisation to undo on the outputs. ``keys`` is ``(len(problems), 2)``
    uint32 key data; ``restarts`` the restart index of each problem (default
    0). An absolute epsilon is divided by ``scale**2``; ``relative_epsilon``
    is recorded per row (the solver reads it there).
    """
    d, n, J, L = bucket.d, bucket.n, bucket.J, bucket.L
    K = bucket.K or L
    B = batch
    out = {
        "weights": np.zeros((B, L)),
        "means": np.zeros((B, L, d)),
        "covs": np.broadcast_to(np.eye(d), (B, L, d, d)).copy(),
        "gmm_index": np.zeros((B, L), np.int32),
        "lambdas": np.zeros((B, J)),
        "atom_mask": np.zeros((B, n), bool),
        "init_means": np.zeros((B, n, d)),
        "init_covs": np.broadcast_to(np.eye(d), (B, n, d, d)).copy(),
        "has_init": np.zeros((B,), bool),
        "epsilon": np.zeros((B,)),
        "key": np.zeros((B, 2), np.uint32),
        "restart": np.zeros((B,), np.int32),
        "block_index": np.full((B, J, K), L, np.int32),
        "relative_epsilon": np.full((B,), bool(relative_epsilon)),
    }
    centers = np.zeros((B, d))
    scales = np.ones((B,))
    for b in range(B):
        src = b if b < len(problems) else 0
        p = problems[src]
        w, m, c, idx = _flat(p)
        k = len(w)
        center, scale = _normalisation(w, m, c, p.lambdas[idx])
        e = p.dim  # dimensions past it stay N(0, 1): no cost, no effect on the rest
        centers[b, :e], scales[b] = center, scale
        out["weights"][b, :k] = w
        out["means"][b, :k, :e] = (m - center) / scale
        out["covs"][b, :k, :e, :e] = c / scale**2
        out["gmm_index"][b, :k] = idx
        first = np.searchsorted(idx, idx)  # components of a GMM are contiguous
        out["block_index"][b, idx, np.arange(k) - first] = np.arange(k)
        out["lambdas"][b, : p.n_gmms] = p.lambdas
        out["atom_mask"][b, : bar_sizes[src]] = True
        init = inits[src]
        if init is not None:
            im, ic = init
            out["init_means"][b, : bar_sizes[src], :e] = (np.asarray(im) - center) / scale
            out["init_covs"][b, : bar_sizes[src], :e, :e] = np.asarray(ic) / scale**2
            out["has_init"][b] = True
        eps = float(epsilons[src])
        out["epsilon"][b] = eps if relative_epsilon else eps / scale**2
        out["key"][b] = keys[src]
        out["restart"][b] = 0 if restarts is None else restarts[src]
    lam, vec = np.linalg.eigh(out["covs"])
    out["comp_sqrt"] = (vec * np.sqrt(np.maximum(lam, 0.0))[..., None, :]) @ np.swapaxes(vec, -1, -2)
    for name in ("weights", "means", "covs", "lambdas", "init_means", "init_covs", "epsilon",
                 "comp_sqrt"):
        out[name] = out[name].astype(dtype)
    return out, Normalisation(centers, scales)
