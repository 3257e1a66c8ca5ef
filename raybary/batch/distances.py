r"""Mixture-Wasserstein distances between GMMs: :func:`mw2` and :func:`mw2_batch`.

NumPy in, NumPy out; the math is :mod:`raybary.solvers.distance`. The steps:
check every pair (:func:`_checked_pairs`, :mod:`raybary.validation`'s rules),
group the pairs by padded dimension (:func:`~raybary.batch.padding.dim_class`),
pad each group to one component count and a power-of-two batch
(:func:`_pad_group`; few compiled shapes), centre and scale each pair (MW2 is
translation invariant and scales as ``s**2``, which keeps float32 accurate on
data of any scale and position), solve, and undo the scale.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from raybary.batch.padding import dim_class, next_pow2
from raybary.options import SolverOptions
from raybary.types import GMM, Problem

__all__ = ["mw2", "mw2_batch", "solve_pairs", "PairsResult", "DEFAULT_MW2_RELATIVE_EPSILON"]

#: The regularisation of :func:`mw2` when neither ``epsilon`` nor
#: ``relative_epsilon`` is given, relative to the independent coupling's cost
#: :math:`\sum_{ij} w^a_i w^b_j C_{ij}`: within 1e-3 relative of POT's exact
#: ``gmm_ot_loss`` on random pairs (docs/distances.md has the measured trade).
DEFAULT_MW2_RELATIVE_EPSILON = 1e-4
MIN_COMPONENTS = 4  # components are padded to a power of two, at least this: few shapes
MIN_BATCH = 8  # pairs per compiled call, at least (then powers of two)
MAX_BATCH = 1024  # pairs per compiled call, at most
LEVEL_TOL = 1e-3  # marginal error at which epsilon-scaling goes down a level
FALLBACK_DECAY = 0.5  # epsilon-scaling factor of the second try (_fallback)


def mw2(a: GMM, b: GMM, *, epsilon: float | None = None,
        relative_epsilon: float | None = None, dtype: str = "float32",
        max_iterations: int | None = None, tol: float | None = None,
        validate: bool = True) -> float:
    r"""Squared mixture-Wasserstein distance :math:`MW_2^2(a, b)` between two GMMs.

    The transport cost of the optimal coupling of the component weights under
    the squared Bures–Wasserstein cost between components (POT's
    ``ot.gmm.gmm_ot_loss`` convention), computed from the entropic plan at
    ``epsilon`` solved as the barycenter's plans are: it tends to the exact
    value as epsilon goes down (docs/distances.md). See :func:`mw2_batch` for
    the options; many pairs are much faster through it.
    """
    return float(mw2_batch([(a, b)], epsilon=epsilon, relative_epsilon=relative_epsilon,
                           dtype=dtype, max_iterations=max_iterations, tol=tol,
                           validate=validate)[0])


def mw2_batch(pairs: Sequence[tuple[GMM, GMM]], *, plans: bool = False,
              epsilon: float | None = None, relative_epsilon: float | None = None,
              dtype: str = "float32", max_iterations: int | None = None,
              tol: float | None = None, validate: bool = True):
    r""":math:`MW_2^2` of every ``(a, b)`` pair, ragged shapes (d, K_a, K_b) in one call.

    Args:
      pairs: ``(a, b)`` pairs of :class:`~raybary.GMM` of one dimension each.
      plans: also return each pair's optimal plan, ``(K_a, K_b)``, whose rows
        sum to ``a.weights`` and columns to ``b.weights`` (normalised).
      epsilon: absolute entropic regularisation, in squared units of the data.
      relative_epsilon: regularisation relative to the pair's independent
        coupling cost :math:`\sum_{ij} w^a_i w^b_j C_{ij}` (scale-free). With
        neither, :data:`DEFAULT_MW2_RELATIVE_EPSILON`. Give at most one.
        Smaller is closer to the exact value (and needs more plan iterations).
      dtype: ``"float32"`` (default) or ``"float64"``.
      max_iterations, tol: the plan solver's iteration cap and L1 marginal
        tolerance (default: :meth:`~raybary.SolverConfig.for_dtype`'s
        ``plan_max_iterations`` and ``plan_tol``). A pair whose plan misses
        ``tol`` within the cap is solved again with a slower epsilon schedule
        and twice the cap; if it misses again, a ``RuntimeWarning`` names it.
      validate: check the GMMs first (:mod:`raybary.validation`'s rules) and
        raise ``ValueError`` naming every bad pair and field.

    Returns:
      ``float64 (len(pairs),)``; with ``plans=True``, ``(values, plans)``
      with ``plans`` a list of ``float64 (K_a, K_b)`` arrays.
    """
    options = SolverOptions.build(epsilon=epsilon, relative_epsilon=relative_epsilon,
                                  dtype=dtype)
    pairs = _checked_pairs(pairs, options.dtype, validate)
    out = solve_pairs(pairs, options, max_iterations=max_iterations, tol=tol, plans=plans)
    bad = [int(i) for i in np.flatnonzero(~out.converged)]
    if bad:
        warnings.warn(f"mw2: the plans of pairs {bad} did not reach the marginal "
                      "tolerance (raise max_iterations or epsilon)", RuntimeWarning,
                      stacklevel=2)
    return (out.values, out.plans) if plans else out.values


class PairsResult(NamedTuple):
    """What :func:`solve_pairs` found: ``values`` (float64, in the data's
    units), ``converged`` (bool: the plan reached the marginal tolerance),
    plan ``iterations`` (of the last try) and, if asked, ``plans`` (a list of
    float64 ``(K_a, K_b)`` arrays, else None)."""

    values: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    plans: list | None


def solve_pairs(pairs: Sequence[tuple[GMM, GMM]], options: SolverOptions, *,
                max_iterations: int | None = None, tol: float | None = None,
                plans: bool = False) -> PairsResult:
    """Solve already-checked pairs (:func:`_checked_pairs`'s output; no
    validation here): the engine under :func:`mw2_batch` and the distance job.
    A pair whose plan misses the tolerance is solved once more with
    :func:`_fallback`'s slower schedule; ``converged`` says whether it then made it."""
    plan_options = _plan_options(options.dtype, max_iterations, tol)
    eps = options.epsilon if options.epsilon is not None else (
        DEFAULT_MW2_RELATIVE_EPSILON if options.relative_epsilon is None
        else options.relative_epsilon)
    n = len(pairs)
    out = PairsResult(np.full(n, np.nan), np.zeros(n, bool), np.zeros(n, np.int64),
                      [None] * n)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (a, _) in enumerate(pairs):
        groups[dim_class(a.dim)].append(i)
    for d, idx in sorted(groups.items()):
        for start in range(0, len(idx), MAX_BATCH):
            chunk = idx[start:start + MAX_BATCH]
            bad = _solve_group(pairs, d, eps, options, plan_options, chunk, out)
            if bad:  # rare stalls of the fast schedule: once more, slower
                _solve_group(pairs, d, eps, options, _fallback(plan_options), bad, out)
    return out if plans else out._replace(plans=None)


def _fallback(plan_options):
    """The plan options of a second try: epsilon-scaling by :data:`FALLBACK_DECAY`
    per level (the default 0.2 stalled on about one random pair in a
    thousand, at marginal error 0.3; 0.5 solved every pair measured, for
    about 1.4x the iterations) and twice the iterations."""
    return replace(plan_options, decay=FALLBACK_DECAY,
                   max_iterations=2 * plan_options.max_iterations)


def _plan_options(dtype: str, max_iterations: int | None, tol: float | None):
    """The plan solver's options for a distance: :meth:`SolverConfig.for_dtype`'s
    with epsilon-scaling going down a level only once the current one is solved
    to :data:`LEVEL_TOL`. The barycenter's Newton default (0.1) suits its warm
    re-solves; from a cold start it can stall in float32 (a random d = 1 pair,
    K = 4 and 7, at relative epsilon 1e-4 stayed at marginal error 0.09 for
    3,000 iterations), which 1e-3 avoids for about twice the iterations."""
    from raybary.solvers.config import SolverConfig

    config = replace(SolverConfig.for_dtype(dtype), level_tol=LEVEL_TOL)
    if max_iterations is not None:
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
        config = replace(config, plan_max_iterations=int(max_iterations))
    if tol is not None:
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        config = replace(config, plan_tol=float(tol))
    return config.plan_options()


def _checked_pairs(pairs, dtype: str, validate: bool) -> list[tuple[GMM, GMM]]:
    """The pairs as a list of ``(GMM, GMM)``; with ``validate``, cleaned by
    :func:`raybary.validation.problem_errors` (weights divided by their sum,
    covariances symmetrised), else ``ValueError`` naming each bad pair."""
    from raybary.validation import join_messages, problem_errors

    out, errors = [], []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(g, GMM) for g in pair)):
            errors.append(f"pair {i}: must be an (a, b) pair of raybary.GMM, "
                          f"got {type(pair).__name__}")
            continue
        a, b = pair
        if a.dim != b.dim:
            errors.append(f"pair {i}: a and b differ in dimension (a: {a.dim}, b: {b.dim})")
            continue
        if validate:
            clean, message = problem_errors(Problem((a, b), np.ones(2)), i, dtype=dtype)
            if message is not None:
                errors.append(message.replace(f"problem {i}, gmm 0", f"pair {i}, a")
                              .replace(f"problem {i}, gmm 1", f"pair {i}, b"))
                continue
            a, b = clean.gmms
        out.append((a, b))
    if errors:
        raise ValueError(f"invalid GMM pairs: {join_messages(errors)}")
    return out


def _pad_group(pairs: list[tuple[GMM, GMM]], d: int, dtype) -> tuple[dict, np.ndarray]:
    """Arrays ``(B, K, ...)`` of the pairs, centred and scaled, and each pair's scale.

    ``K`` is the largest component count rounded up to a power of two (at
    least :data:`MIN_COMPONENTS`), ``B`` the pairs rounded up likewise (at
    least :data:`MIN_BATCH`); padded components have weight 0 (masked out),
    a padded dimension holds ``N(0, 1)`` in both GMMs (zero cost), padded
    rows repeat the first pair.
    """
    K = max(MIN_COMPONENTS, next_pow2(max(max(a.n_components, b.n_components)
                                          for a, b in pairs)))
    B = max(MIN_BATCH, next_pow2(len(pairs)))
    arrays = {f"{name}_{side}": np.zeros(shape, np.float64)
              for side in "ab" for name, shape in
              (("means", (B, K, d)), ("covs", (B, K, d, d)), ("weights", (B, K)))}
    for side in "ab":
        arrays[f"covs_{side}"][...] = np.eye(d)
    scales = np.ones(B)
    for r in range(B):
        a, b = pairs[r if r < len(pairs) else 0]
        w = np.concatenate([a.weights, b.weights]) / 2.0
        m = np.concatenate([a.means, b.means])
        c = np.concatenate([a.covs, b.covs])
        center = w @ m
        second = w @ (np.sum((m - center) ** 2, axis=1) + np.trace(c, axis1=1, axis2=2))
        scales[r] = float(np.sqrt(second)) if second > 0 else 1.0
        for side, g in (("a", a), ("b", b)):
            k, e = g.n_components, g.dim
            arrays[f"means_{side}"][r, :k, :e] = (g.means - center) / scales[r]
            arrays[f"covs_{side}"][r, :k, :e, :e] = g.covs / scales[r] ** 2
            arrays[f"weights_{side}"][r, :k] = g.weights
    return {k: v.astype(dtype) for k, v in arrays.items()}, scales


@functools.cache
def _program():
    """The jitted :func:`~raybary.solvers.distance.batch_distance` (built once)."""
    import jax

    from raybary.solvers.distance import batch_distance

    return jax.jit(batch_distance, static_argnames=("relative", "options"))


def _solve_group(pairs, d, eps, options: SolverOptions, plan_options, idx,
                 result: PairsResult) -> list[int]:
    """Solve the pairs ``idx`` (of one dimension class) in one compiled call;
    fill ``result`` (values back in the data's units) at ``idx``; return the
    pairs whose plans missed ``plan_options.tol``."""
    import jax

    from raybary.batch.api import configure_jax

    configure_jax()
    group = [pairs[i] for i in idx]
    arrays, scales = _pad_group(group, d, np.dtype(options.dtype))
    relative = options.epsilon is None
    epsilons = np.full(len(scales), eps) if relative else eps / scales**2
    with jax.enable_x64(options.dtype == "float64"):
        out = _program()(**arrays, epsilon=epsilons.astype(options.dtype),
                         relative=relative, options=plan_options)
        out = jax.tree_util.tree_map(np.asarray, out)
    n = len(group)
    ok = out.error[:n] <= plan_options.tol
    result.values[idx] = out.value[:n].astype(np.float64) * scales[:n] ** 2
    result.converged[idx] = ok
    result.iterations[idx] = out.iterations[:n]
    for r, i in enumerate(idx):
        a, b = group[r]
        result.plans[i] = out.plan[r, :a.n_components, :b.n_components].astype(np.float64)
    return [i for i, good in zip(idx, ok) if not good]
