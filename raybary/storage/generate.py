"""Seeded, vectorised generators of problem batches (NumPy only).

Two families:

``tutorial``
  The OTT-JAX GMM-barycenter tutorial's problem: three GMMs with 2, 3 and 5
  components; GMM j has offset ``c_j`` (``[-20,-15]``, ``[60,-15]``,
  ``[50,65]``), ``m_j = 0.1 * mean(c_j)`` and ``s_j`` (4, 3, 5); means
  ``m_j u + c_j`` with ``u ~ N(0, I_d)``; covariances ``U diag(s_j e^h) U^T``
  with ``U`` a Haar-random orthogonal matrix and ``h ~ N(0, I_d)``; weights
  ``softmax(0.1 v)`` with ``v ~ N(0, I)``; lambdas ``~ Dirichlet(50, 50, 50)``.
  For ``d != 2`` the offsets repeat their two coordinates
  (``c_j[i] = c2_j[i mod 2]``, so ``d=1`` uses ``-20, 60, 50`` and ``d=3``
  ``[-20,-15,-20]``, ...), and everything else is as above.

``random``
  Ragged problems: ``d`` from ``{1, 2, 3, 5}`` per problem (or ``dim``),
  ``J`` uniform in 1..6, ``K_j`` uniform in 1..8; GMM centres ``~ N(0, 10^2 I)``,
  component means centre ``+ N(0, 3^2 I)``; covariances ``U diag(e) U^T`` with
  log-spaced eigenvalues from ``s`` to ``s * kappa``, ``s ~ LogNormal(0, 0.5)``
  and condition number ``kappa = 10^U(0, 4)`` (up to 1e4); weights
  ``~ Dirichlet(1, ..., 1)``; lambdas ``~ Dirichlet(1, ..., 1)``.

Both families draw full covariances. ``covariance_type="diag"`` stores the
same problems with each covariance replaced by its diagonal (the variances,
``diag(C)``), ``"spherical"`` by its mean variance (``trace(C)/d * I``):
the random draws are unchanged, so problem ``i`` of a diagonal store is
problem ``i`` of the full one without its correlations.

Only :func:`generate` writes a store, so only it imports the store writers
(and with them fsspec, and Zarr for ``*.zarr``): the rest needs NumPy and
pyarrow, so ``tutorial_problems`` works where neither fsspec nor Zarr is
installed (``benchmarks/gpu_check.sh`` runs there).

Problem ids are ``0..n-1``. Randomness is drawn per block of
:data:`SEED_BLOCK` problems from ``numpy.random.default_rng([seed, block])``,
so a problem does not depend on how the output is chunked, and ``.parquet``
and ``.zarr`` outputs with the same seed hold the same problems.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from raybary.storage.columns import ProblemColumns, check_covariance_type, segment_indices
from raybary.storage.errors import StoreDataError
from raybary.types import Problem

if TYPE_CHECKING:  # pragma: no cover
    from raybary.storage.base import ProblemStore

__all__ = [
    "FAMILIES",
    "SEED_BLOCK",
    "TUTORIAL_OFFSETS",
    "TUTORIAL_SCALES",
    "TUTORIAL_COMPONENTS",
    "RANDOM_DIMS",
    "tutorial_columns",
    "random_columns",
    "family_columns",
    "tutorial_problems",
    "generate",
    "random_orthogonal",
    "project_covariances",
]

FAMILIES = ("tutorial", "random")
#: Problems per random stream; the unit of reproducibility.
SEED_BLOCK = 4096
TUTORIAL_OFFSETS = np.array([[-20.0, -15.0], [60.0, -15.0], [50.0, 65.0]])
TUTORIAL_SCALES = np.array([4.0, 3.0, 5.0])
TUTORIAL_COMPONENTS = (2, 3, 5)
TUTORIAL_ALPHA = 50.0
RANDOM_DIMS = (1, 2, 3, 5)
RANDOM_MAX_GMMS = 6
RANDOM_MAX_COMPONENTS = 8
RANDOM_MAX_LOG10_CONDITION = 4.0


def random_orthogonal(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` Haar-random orthogonal ``d x d`` matrices, ``(n, d, d)``."""
    if d == 1:
        return rng.choice([-1.0, 1.0], size=(n, 1, 1))
    if d == 2:
        theta = rng.uniform(0.0, 2 * np.pi, n)
        c, s = np.cos(theta), np.sin(theta)
        flip = rng.choice([-1.0, 1.0], size=n)
        return np.stack([np.stack([c, -s * flip], -1), np.stack([s, c * flip], -1)], -2)
    q, r = np.linalg.qr(rng.standard_normal((n, d, d)))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]


def _covariances(rng: np.random.Generator, eig: np.ndarray) -> np.ndarray:
    """``U diag(eig) U^T`` with Haar-random ``U``, symmetric to the last bit."""
    n, d = eig.shape
    if d <= 2:
        # closed forms, faster than the einsum; the random draws are exactly those of
        # random_orthogonal (the reflection is drawn but cancels in U diag(e) U^T)
        if d == 1:
            rng.choice([-1.0, 1.0], size=(n, 1, 1))
            return eig.reshape(n, 1, 1).copy()
        theta = rng.uniform(0.0, 2 * np.pi, n)
        rng.choice([-1.0, 1.0], size=n)
        c, s = np.cos(theta), np.sin(theta)
        e0, e1 = eig[:, 0], eig[:, 1]
        cov = np.empty((n, 2, 2))
        cov[:, 0, 0] = c * c * e0 + s * s * e1
        cov[:, 1, 1] = s * s * e0 + c * c * e1
        cov[:, 0, 1] = cov[:, 1, 0] = c * s * (e0 - e1)
        return cov
    u = random_orthogonal(rng, n, d)
    cov = np.einsum("nij,nj,nkj->nik", u, eig, u)
    return 0.5 * (cov + np.swapaxes(cov, -1, -2))


def _tutorial_block(rng: np.random.Generator, n: int, d: int, first_id: int) -> ProblemColumns:
    k = np.array(TUTORIAL_COMPONENTS)
    gid = np.repeat(np.arange(len(k)), k)
    kt = int(k.sum())
    offsets = TUTORIAL_OFFSETS[:, np.arange(d) % 2]
    m = 0.1 * offsets.mean(axis=1)
    lambdas = rng.dirichlet(np.full(len(k), TUTORIAL_ALPHA), size=n)
    u = rng.standard_normal((n, kt, d))
    means = m[gid][None, :, None] * u + offsets[gid][None]
    h = rng.standard_normal((n * kt, d))
    eig = TUTORIAL_SCALES[np.tile(gid, n)][:, None] * np.exp(h)
    covs = _covariances(rng, eig)
    a = 0.1 * rng.standard_normal((n, kt))
    e = np.exp(a - a.max(axis=1, keepdims=True))
    sums = np.stack([e[:, gid == j].sum(axis=1) for j in range(len(k))], axis=1)
    weights = e / sums[:, gid]
    return ProblemColumns.from_dense(
        problem_id=np.arange(first_id, first_id + n),
        gmm_offset=np.arange(n + 1) * len(k),
        lambdas=lambdas.reshape(-1),
        comp_offset=np.concatenate([[0], np.cumsum(np.tile(k, n))]),
        weight=weights.reshape(-1),
        mean=means.reshape(-1, d),
        cov=covs,
    )


def _dirichlet_segments(rng: np.random.Generator, offsets: np.ndarray) -> np.ndarray:
    """Dirichlet(1, ..., 1) draws for each CSR segment, flattened."""
    x = rng.standard_exponential(int(offsets[-1])) + 1e-12
    sums = np.add.reduceat(x, offsets[:-1]) if len(x) else np.zeros(0)
    return x / np.repeat(sums, np.diff(offsets))


def _random_block(rng: np.random.Generator, n: int, dim: int | None, first_id: int) -> ProblemColumns:
    d_p = rng.choice(RANDOM_DIMS, n) if dim is None else np.full(n, dim)
    j_p = rng.integers(1, RANDOM_MAX_GMMS + 1, n)
    gmm_offset = np.concatenate([[0], np.cumsum(j_p)])
    k_g = rng.integers(1, RANDOM_MAX_COMPONENTS + 1, int(gmm_offset[-1]))
    comp_offset = np.concatenate([[0], np.cumsum(k_g)])
    d_g = np.repeat(d_p, j_p)
    d_c = np.repeat(d_g, k_g)
    mean_offset = np.concatenate([[0], np.cumsum(d_c)])
    cov_offset = np.concatenate([[0], np.cumsum(d_c * d_c)])
    mean_values = np.empty(int(mean_offset[-1]))
    cov_values = np.empty(int(cov_offset[-1]))
    for d in np.unique(d_p):
        d = int(d)
        gsel = np.flatnonzero(d_g == d)
        csel, local = segment_indices(comp_offset, gsel)
        owner = np.repeat(np.arange(len(gsel)), np.diff(local))
        centres = 10.0 * rng.standard_normal((len(gsel), d))
        means = centres[owner] + 3.0 * rng.standard_normal((len(csel), d))
        covs = _covariances(rng, _random_eigenvalues(rng, len(csel), d))
        mean_values[mean_offset[csel][:, None] + np.arange(d)] = means
        cov_values[cov_offset[csel][:, None] + np.arange(d * d)] = covs.reshape(-1, d * d)
    return ProblemColumns(
        problem_id=np.arange(first_id, first_id + n, dtype=np.int64),
        gmm_offset=gmm_offset.astype(np.int64),
        gmm_label=(np.arange(len(d_g)) - np.repeat(gmm_offset[:-1], j_p)).astype(np.int32),
        lambdas=_dirichlet_segments(rng, gmm_offset),
        comp_offset=comp_offset.astype(np.int64),
        weight=_dirichlet_segments(rng, comp_offset),
        mean_offset=mean_offset.astype(np.int64),
        mean_values=mean_values,
        cov_offset=cov_offset.astype(np.int64),
        cov_values=cov_values,
    )


def _random_eigenvalues(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    scale = np.exp(0.5 * rng.standard_normal(n))
    log_kappa = rng.uniform(0.0, RANDOM_MAX_LOG10_CONDITION, n) * np.log(10.0)
    t = np.sort(rng.uniform(size=(n, d)), axis=1)
    if d > 1:
        t[:, 0], t[:, -1] = 0.0, 1.0
    else:
        t[:] = 0.0
    return scale[:, None] * np.exp(t * log_kappa[:, None])


_BLOCKS = {"tutorial": _tutorial_block, "random": _random_block}


def family_columns(
    family: str, n_problems: int, *, dim: int | None = None, seed: int = 0, start: int = 0
) -> ProblemColumns:
    """Problems ``start .. start+n_problems-1`` of a family as one batch."""
    if family not in _BLOCKS:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if family == "tutorial" and dim is None:
        dim = 2
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    stop = start + n_problems
    parts = []
    for block in range(start // SEED_BLOCK, -(-stop // SEED_BLOCK)):
        b0 = block * SEED_BLOCK
        rng = np.random.default_rng([seed, block])
        cols = _BLOCKS[family](rng, SEED_BLOCK, dim, b0)
        lo, hi = max(start, b0) - b0, min(stop, b0 + SEED_BLOCK) - b0
        parts.append(cols if (lo, hi) == (0, SEED_BLOCK) else cols.slice(lo, hi))
    if not parts:
        return _BLOCKS[family](np.random.default_rng(seed), 0, dim or 1, start)
    return ProblemColumns.concat(parts)


def tutorial_columns(n_problems: int, *, dim: int = 2, seed: int = 0, start: int = 0) -> ProblemColumns:
    """The tutorial family (see the module docstring), ids ``start..start+n-1``."""
    return family_columns("tutorial", n_problems, dim=dim, seed=seed, start=start)


def random_columns(
    n_problems: int, *, dim: int | None = None, seed: int = 0, start: int = 0
) -> ProblemColumns:
    """The random ragged family (see the module docstring), ids ``start..start+n-1``."""
    return family_columns("random", n_problems, dim=dim, seed=seed, start=start)


def tutorial_problems(n_problems: int, *, dim: int = 2, seed: int = 0) -> list[Problem]:
    """The tutorial family as :class:`Problem` objects (for tests and small runs)."""
    problems, _ = tutorial_columns(n_problems, dim=dim, seed=seed).to_problems()
    return problems


def project_covariances(cols: ProblemColumns, covariance_type: str) -> ProblemColumns:
    """The batch with its covariances made ``covariance_type``: ``full`` keeps them,
    ``diag`` keeps their diagonals (``diag(C)``), ``spherical`` their mean
    variance (``trace(C)/d * I``). Used by :func:`generate`; a store written
    with that ``covariance_type`` then holds these covariances exactly."""
    check_covariance_type(covariance_type)
    if covariance_type == "full":
        return cols
    d = np.rint(np.sqrt(cols.cov_lengths())).astype(np.int64)
    c = np.repeat(np.arange(len(d)), d)
    i = np.arange(len(c)) - np.repeat(np.cumsum(d) - d, d)
    on_diagonal = cols.cov_offset[c] + i * (d[c] + 1)
    variances = cols.cov_values[on_diagonal]
    if covariance_type == "spherical":
        starts = np.concatenate([[0], np.cumsum(d)[:-1]]).astype(np.int64)
        sums = np.add.reduceat(variances, starts) if len(variances) else np.zeros(0)
        variances = np.repeat(sums / np.maximum(d, 1), d)
    values = np.zeros_like(cols.cov_values)
    values[on_diagonal] = variances
    return replace(cols, cov_values=values)


def _blocks(family: str, n_problems: int, dim: int | None, seed: int,
            block_problems: int, covariance_type: str = "full") -> Iterator[ProblemColumns]:
    for start in range(0, n_problems, block_problems):
        n = min(block_problems, n_problems - start)
        yield project_covariances(family_columns(family, n, dim=dim, seed=seed, start=start),
                                  covariance_type)


def generate(
    url: str,
    n_problems: int,
    *,
    family: str = "tutorial",
    dim: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    chunk_problems: int | None = None,
    progress: Callable[[int], None] | None = None,
    covariance_type: str = "full",
    storage_options: Mapping[str, Any] | None = None,
) -> ProblemStore:
    """Write ``n_problems`` problems of ``family`` to ``url`` (``*.parquet`` or ``*.zarr``).

    ``storage_options`` go to the URL's fsspec filesystem (e.g. an S3
    ``endpoint_url`` and keys; :class:`~raybary.storage.options.StorageOptions`).

    ``covariance_type`` ``"diag"`` or ``"spherical"`` writes a diagonal or
    spherical store of the same problems (:func:`project_covariances`).

    Generation is vectorised in blocks of 16 x :data:`SEED_BLOCK` problems, so
    memory is bounded whatever ``n_problems``. The random family mixes
    dimensions unless ``dim`` is given; a Zarr store holds one ``d``, so
    ``random`` to ``*.zarr`` needs ``dim`` (refused before writing otherwise).
    """
    from raybary.storage.conversion import output_format, write_store  # fsspec, Zarr

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if n_problems < 0:
        raise ValueError("n_problems must be non-negative")
    check_covariance_type(covariance_type)
    if output_format(url) == "zarr" and family == "random" and dim is None:
        raise StoreDataError(
            f"the random family mixes dimensions {list(RANDOM_DIMS)}, but a Zarr store holds one "
            "dimension d: pass dim (--dim D), or write Parquet (*.parquet)"
        )
    block = 16 * SEED_BLOCK
    store_dim = 2 if family == "tutorial" and dim is None else dim
    return write_store(url, _blocks(family, n_problems, dim, seed, block, covariance_type),
                       overwrite=overwrite, dim=store_dim, chunk_problems=chunk_problems,
                       progress=progress, covariance_type=covariance_type,
                       storage_options=storage_options)
