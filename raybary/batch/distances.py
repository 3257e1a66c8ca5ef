r"""Mixture-Wasserstein distances between GMMs: :func:`mw2` and :func:`mw2_batch`.

NumPy in, NumPy out; the math is :mod:`raybary.solvers.distance`. The steps:
check every distinct GMM once, vectorised (:func:`_checked_pairs`,
:mod:`raybary.validation`'s rules); index the pairs by their distinct GMMs
(:class:`_PairTable`); group them by padded dimension
(:func:`~raybary.batch.padding.dim_class`) and padded component counts of
each side (powers of two, the larger side first: the plan work scales with
``K_a K_b`` and the Newton system with the smaller); cut each group into
chunks of a power-of-two batch, one compiled call each, a thread per core;
centre and scale each pair (MW2 is translation invariant and scales as
``s**2``, which keeps float32 accurate on data of any scale and position);
solve by continuous batching inside the call
(:func:`~raybary.solvers.distance.run_pairs`); and undo the scale.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from raybary.batch.padding import dim_class, next_pow2
from raybary.options import SolverOptions
from raybary.types import GMM

__all__ = ["mw2", "mw2_batch", "solve_pairs", "PairsResult", "DEFAULT_MW2_RELATIVE_EPSILON"]

#: The regularisation of :func:`mw2` when neither ``epsilon`` nor
#: ``relative_epsilon`` is given, relative to the independent coupling's cost
#: :math:`\sum_{ij} w^a_i w^b_j C_{ij}`: within 1e-3 relative of POT's exact
#: ``gmm_ot_loss`` on random pairs (docs/distances.md has the measured trade).
DEFAULT_MW2_RELATIVE_EPSILON = 1e-4
MIN_COMPONENTS = 4  # components are padded to a power of two, at least this: few shapes
BATCHES = (64, 512, 4096)  # pairs per compiled call: the first of these that holds them
SLOTS = (64, 128)  # pairs iterated at once in a call, at least / at most (_slots)
BLOCK = 8  # plan iterations between two refills of the slots
LEVEL_TOL = 1e-3  # marginal error at which epsilon-scaling goes down a level
FALLBACK_DECAY = 0.5  # epsilon-scaling factor of the second try (_fallback)


def mw2(a: GMM, b: GMM, *, epsilon: float | None = None,
        relative_epsilon: float | None = None, dtype: str = "float32",
        max_iterations: int | None = None, tol: float | None = None,
        validate: bool = True, debiased: bool = False) -> float:
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
                           validate=validate, debiased=debiased)[0])


def mw2_batch(pairs: Sequence[tuple[GMM, GMM]], *, plans: bool = False,
              epsilon: float | None = None, relative_epsilon: float | None = None,
              dtype: str = "float32", max_iterations: int | None = None,
              tol: float | None = None, validate: bool = True, debiased: bool = False,
              workers: int | None = None):
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
      debiased: return the Sinkhorn divergence
        :math:`S_\varepsilon(a, b) = \mathrm{OT}_\varepsilon(a, b) -
        \tfrac12(\mathrm{OT}_\varepsilon(a, a) + \mathrm{OT}_\varepsilon(b, b))`
        instead, with :math:`\mathrm{OT}_\varepsilon(a, b) = \langle P, C\rangle
        + \varepsilon\,\mathrm{KL}(P \,|\, w^a \otimes w^b)` the entropic
        objective at the solved plan and all three terms at the pair's absolute
        epsilon: symmetric, 0 for identical mixtures up to float rounding
        (three solves per pair; docs/distances.md).
      workers: threads, one compiled call each at a time (default: a thread
        per core on a CPU, as :func:`raybary.solve`'s lanes).

    Returns:
      ``float64 (len(pairs),)``; with ``plans=True``, ``(values, plans)``
      with ``plans`` a list of ``float64 (K_a, K_b)`` arrays.
    """
    options = SolverOptions.build(epsilon=epsilon, relative_epsilon=relative_epsilon,
                                  dtype=dtype)
    pairs = _checked_pairs(pairs, options.dtype, validate)
    out = solve_pairs(pairs, options, max_iterations=max_iterations, tol=tol, plans=plans,
                      debiased=debiased, workers=workers)
    bad = [int(i) for i in np.flatnonzero(~out.converged)]
    if bad:
        warnings.warn(f"mw2: the plans of pairs {bad} did not reach the marginal "
                      "tolerance (raise max_iterations or epsilon)", RuntimeWarning,
                      stacklevel=2)
    return (out.values, out.plans) if plans else out.values


class PairsResult(NamedTuple):
    """What :func:`solve_pairs` found: ``values`` (float64, in the data's
    units; the Sinkhorn divergence with ``debiased=True``), ``converged``
    (bool: the plan reached the marginal tolerance), plan ``iterations`` (of
    the last try) and, if asked, ``plans`` (a list of float64 ``(K_a, K_b)``
    arrays, else None)."""

    values: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    plans: list | None


class _Solved(NamedTuple):
    """Per request of :func:`_solve_requests`, in the data's units: transport
    cost, entropic objective, absolute epsilon, converged, iterations, plans."""

    value: np.ndarray
    entropic: np.ndarray
    epsilon: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    plans: list


def solve_pairs(pairs: Sequence[tuple[GMM, GMM]], options: SolverOptions, *,
                max_iterations: int | None = None, tol: float | None = None,
                plans: bool = False, debiased: bool = False, workers: int | None = None,
                stats: dict | None = None) -> PairsResult:
    """Solve already-checked pairs (:func:`_checked_pairs`'s output; no
    validation here): the engine under :func:`mw2_batch` and the distance job.

    A pair whose plan misses the tolerance is solved once more with
    :func:`_fallback`'s slower schedule; ``converged`` says whether it then
    made it. ``debiased``: the Sinkhorn divergence (:func:`mw2_batch`), whose
    two self terms are solved at the pair's absolute epsilon (``converged``
    is then that of all three plans). ``workers``: threads, each running
    compiled calls on a core (default: the engine's, :func:`_workers`).
    ``stats`` gets, added: ``needed_iterations`` (plan iterations the pairs
    needed), ``slot_iterations`` (iterations run summed over slots, busy or
    idle), ``blocks``, ``calls`` and ``run_seconds`` (wall time of the calls).
    """
    plan_options = _plan_options(options.dtype, max_iterations, tol)
    relative = options.epsilon is None
    eps = options.epsilon if not relative else (
        DEFAULT_MW2_RELATIVE_EPSILON if options.relative_epsilon is None
        else options.relative_epsilon)
    table = getattr(pairs, "table", None) or _PairTable(pairs)
    n = len(pairs)
    main = _solve_requests(table, table.ia, table.ib, np.full(n, float(eps)), relative, options,
                           plan_options, plans, workers, stats)
    values, converged = main.value, main.converged
    if debiased and n:
        ent_a, ok_a = _self_terms(table, table.ia, main.epsilon, options, plan_options, workers,
                                  stats)
        ent_b, ok_b = _self_terms(table, table.ib, main.epsilon, options, plan_options, workers,
                                  stats)
        values = main.entropic - 0.5 * (ent_a + ent_b)
        converged = converged & ok_a & ok_b
    return PairsResult(values, converged, main.iterations, main.plans if plans else None)


def _self_terms(table, idx, epsilon, options, plan_options, workers, stats):
    """Entropic objectives ``OT_eps(g, g)`` of the GMMs ``idx`` at the absolute
    epsilons given (each distinct ``(GMM, epsilon)`` solved once)."""
    keys = np.stack([idx.astype(np.float64), epsilon], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    g = unique[:, 0].astype(np.int64)
    out = _solve_requests(table, g, g, unique[:, 1], False, options, plan_options, False,
                          workers, stats)
    inverse = inverse.reshape(-1)
    return out.entropic[inverse], out.converged[inverse]


def _solve_requests(table, ia, ib, epsilon, relative, options, plan_options, want_plans,
                    workers, stats) -> _Solved:
    """Solve the pairs ``(table.gmms[ia[r]], table.gmms[ib[r]])`` at ``epsilon[r]``
    (relative, or absolute in the data's units), group by group
    (:meth:`_PairTable.groups`), with one retry at :func:`_fallback`'s schedule."""
    n = len(ia)
    out = _Solved(np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool),
                  np.zeros(n, np.int64), [None] * n)
    for key, rows in table.groups(ia, ib):
        bad = _solve_group(table, key, ia, ib, rows, epsilon, relative, options, plan_options,
                           want_plans, workers, stats, out)
        if len(bad):  # rare stalls of the fast schedule: once more, slower
            _solve_group(table, key, ia, ib, bad, epsilon, relative, options,
                         _fallback(plan_options), want_plans, workers, stats, out)
    return out


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


class _Checked(list):
    """Checked pairs (a list of ``(GMM, GMM)``) and their :class:`_PairTable`,
    so that :func:`solve_pairs` does not index them again."""

    table: _PairTable


def _checked_pairs(pairs, dtype: str, validate: bool) -> list[tuple[GMM, GMM]]:
    """The pairs as a list of ``(GMM, GMM)``, else ``ValueError`` naming each
    bad pair. With ``validate``, every distinct GMM (by identity: a GMM in many
    pairs is checked once) is checked by :func:`raybary.validation.validate_arrays`,
    all of one dimension in one vectorised call; the GMMs are returned as
    given (the solver divides the weights by their sum and symmetrises the
    covariances itself, as validation's cleaning would)."""
    from raybary.validation import join_messages

    errors, kept = [], []
    for i, pair in enumerate(pairs):
        if (isinstance(pair, (tuple, list)) and len(pair) == 2
                and isinstance(pair[0], GMM) and isinstance(pair[1], GMM)):
            kept.append(i)
        else:
            errors.append(f"pair {i}: must be an (a, b) pair of raybary.GMM, "
                          f"got {type(pair).__name__}")
    table = _PairTable([pairs[i] for i in kept])
    da, db = table.dims[table.ia], table.dims[table.ib]
    for r in np.flatnonzero(da != db):
        errors.append(f"pair {kept[r]}: a and b differ in dimension (a: {da[r]}, b: {db[r]})")
    if validate and not errors:
        errors += _gmm_errors(table, kept, dtype)
    if errors:
        raise ValueError(f"invalid GMM pairs: {join_messages(errors)}")
    out = _Checked(tuple(pairs[i]) for i in kept)
    out.table = table
    return out


def _gmm_errors(table: _PairTable, labels: list[int], dtype: str) -> list[str]:
    """The messages of the pairs with an invalid GMM (``pair 3, b, component
    0: weight is negative (-0.5)``), in order, each distinct GMM checked once."""
    from raybary.validation import validate_arrays

    bad: dict[int, str] = {}
    for members in table.by_dim().values():
        flat = table.flat(members)
        n = len(members)
        checked = validate_arrays(problem_ids=np.arange(n), gmm_offset=np.arange(n + 1),
                                  lambdas=np.ones(n), comp_offset=flat["offset"],
                                  weights=flat["weights"], means=flat["means"],
                                  covs=flat["covs"], dtype=dtype)
        for r in np.flatnonzero(np.array([e is not None for e in checked.errors], bool)):
            bad[int(members[r])] = checked.errors[r].replace(f"problem {r}, gmm 0", "{side}")
    errors = []
    for r in np.flatnonzero(np.isin(table.ia, list(bad)) | np.isin(table.ib, list(bad))):
        for side, g in (("a", table.ia[r]), ("b", table.ib[r])):
            if int(g) in bad:
                errors.append(bad[int(g)].replace("{side}", f"pair {labels[r]}, {side}"))
    return errors


class _PairTable:
    """The pairs as indices into their distinct GMMs (by identity): ``gmms``,
    ``ia`` and ``ib`` (one entry per pair), each GMM's ``dims`` and ``counts``
    (components)."""

    def __init__(self, pairs: Sequence[tuple[GMM, GMM]]):
        index: dict[int, int] = {}
        self.gmms: list[GMM] = []
        shapes: list[tuple[int, int]] = []
        sides = []
        for pair in pairs:
            for g in pair:
                k = index.get(id(g))
                if k is None:
                    k = index[id(g)] = len(self.gmms)
                    self.gmms.append(g)
                    shapes.append(g.means.shape)
                sides.append(k)
        sides = np.array(sides, np.int64).reshape(-1, 2)
        self.ia, self.ib = sides[:, 0], sides[:, 1]
        shapes = np.array(shapes, np.int64).reshape(-1, 2)
        self.counts, self.dims = shapes[:, 0], shapes[:, 1]
        self._padded: dict[int, dict] = {}
        self._flat: dict[int, dict] = {}

    def by_dim(self) -> dict[int, np.ndarray]:
        """The GMMs of each dimension."""
        return {int(d): np.flatnonzero(self.dims == d) for d in np.unique(self.dims)}

    def flat(self, members: np.ndarray) -> dict:
        """CSR arrays (``offset``, ``weights``, ``means``, ``covs``) of GMMs of
        one dimension (:meth:`by_dim`'s groups are kept)."""
        key = int(members[0]) if len(members) else -1
        if key in self._flat and len(self._flat[key]["offset"]) == len(members) + 1:
            return self._flat[key]
        gmms = [self.gmms[int(g)] for g in members]
        self._flat[key] = dict(offset=np.concatenate([[0], np.cumsum(self.counts[members])]),
                    weights=np.concatenate([g.weights for g in gmms]),
                    means=np.concatenate([g.means for g in gmms]),
                    covs=np.concatenate([g.covs for g in gmms]))
        return self._flat[key]

    def groups(self, ia: np.ndarray, ib: np.ndarray):
        """``((d, ka, kb), rows)`` for the requests ``(ia, ib)``: padded
        dimension and padded components of the larger side and of the
        smaller (a pair whose ``a`` is the smaller is solved turned around,
        :meth:`turned`: the Newton system is of the second side's size)."""
        d = np.array([dim_class(int(x)) for x in range(int(self.dims.max(initial=0)) + 1)])
        cls = np.maximum(MIN_COMPONENTS, 1 << np.ceil(np.log2(np.maximum(self.counts, 1))).astype(
            np.int64))
        ka, kb = cls[ia], cls[ib]
        keys = np.stack([d[self.dims[ia]], np.maximum(ka, kb), np.minimum(ka, kb)], axis=1)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        for u, key in enumerate(unique):
            yield tuple(int(x) for x in key), np.flatnonzero(inverse == u)

    def turned(self, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        """Whether each request ``(ia, ib)`` is solved as ``(b, a)`` (``a``
        has fewer padded components)."""
        return self.counts[ia] < self.counts[ib]

    def padded(self, d: int) -> dict:
        """Every GMM of padded dimension ``d`` padded to the most components of
        any (weights divided by their sum, covariances symmetrised, padded
        dimensions ``N(0, 1)``); rows of other GMMs are unused."""
        if d in self._padded:
            return self._padded[d]
        G, K = len(self.gmms), int(self.counts.max(initial=1))
        K = max(MIN_COMPONENTS, next_pow2(K))
        w = np.zeros((G, K))
        m = np.zeros((G, K, d))
        c = np.zeros((G, K, d, d))
        c[...] = np.eye(d)
        for e, members in self.by_dim().items():
            if dim_class(e) != d:
                continue
            flat = self.flat(members)
            rows = np.repeat(members, self.counts[members])
            cols = np.arange(len(rows)) - np.repeat(flat["offset"][:-1], self.counts[members])
            w[rows, cols] = flat["weights"]
            m[rows, cols, :e] = flat["means"]
            c[rows, cols, :e, :e] = 0.5 * (flat["covs"] + np.swapaxes(flat["covs"], -1, -2))
        w /= np.where(w.sum(axis=1, keepdims=True) > 0, w.sum(axis=1, keepdims=True), 1.0)
        self._padded[d] = dict(weights=w, means=m, covs=c)
        return self._padded[d]


def _pair_arrays(table: _PairTable, key, ia, ib, dtype) -> tuple[dict, np.ndarray]:
    """Arrays ``(B, K, ...)`` of the requests ``(ia, ib)`` of group ``key``
    (:meth:`_PairTable.groups`), centred and scaled, and each pair's scale
    (MW2 is translation invariant and scales as ``s**2``)."""
    d, ka, kb = key
    turned = table.turned(ia, ib)
    ia, ib = np.where(turned, ib, ia), np.where(turned, ia, ib)
    p = table.padded(d)
    arrays = {}
    for side, idx, k in (("a", ia, ka), ("b", ib, kb)):
        for name in ("weights", "means", "covs"):
            arrays[f"{name}_{side}"] = p[name][idx, :k]
    w = np.concatenate([arrays["weights_a"], arrays["weights_b"]], axis=1) / 2.0
    m = np.concatenate([arrays["means_a"], arrays["means_b"]], axis=1)
    tr = np.trace(np.concatenate([arrays["covs_a"], arrays["covs_b"]], axis=1), axis1=2, axis2=3)
    center = np.einsum("bk,bkd->bd", w, m)
    second = np.einsum("bk,bk->b", w, np.sum((m - center[:, None]) ** 2, axis=2) + tr)
    scales = np.sqrt(np.where(second > 0, second, 1.0))
    for side in "ab":
        arrays[f"means_{side}"] = (arrays[f"means_{side}"] - center[:, None]) / scales[:, None, None]
        arrays[f"covs_{side}"] = arrays[f"covs_{side}"] / scales[:, None, None, None] ** 2
    return {k: v.astype(dtype) for k, v in arrays.items()}, scales


@functools.cache
def _program():
    """The jitted :func:`~raybary.solvers.distance.run_pairs` (built once)."""
    import jax

    from raybary.solvers.distance import run_pairs

    return jax.jit(run_pairs, static_argnames=("relative", "options", "slots", "block"))


def _workers(workers: int | None, d: int) -> int:
    """Threads for pairs of padded dimension ``d``: ``workers``, else the default
    engine's (a core each on a CPU, one on an accelerator); one above
    :data:`~raybary.geometry.bures.JACOBI_MAX_DIM`, where the program calls
    LAPACK, whose concurrent executions deadlock XLA's CPU runtime."""
    from raybary.batch.engine import default_engine
    from raybary.geometry.bures import JACOBI_MAX_DIM

    if d > JACOBI_MAX_DIM:
        return 1
    return max(1, int(workers) if workers is not None else default_engine().workers)


def _chunks(rows: np.ndarray, workers: int) -> list[np.ndarray]:
    """``rows`` cut into a multiple of ``workers`` chunks of about equal size,
    each at most the largest of :data:`BATCHES`."""
    count = workers * -(-len(rows) // (workers * BATCHES[-1]))
    count = min(count, max(1, len(rows)))
    return [c for c in np.array_split(rows, count) if len(c)]


def _solve_group(table, key, ia, ib, rows, epsilon, relative, options: SolverOptions,
                 plan_options, want_plans, workers, stats, out: _Solved) -> np.ndarray:
    """Solve the requests ``rows`` of group ``key`` in chunks, one compiled
    call each (padded to one of :data:`BATCHES`: few programs; the padding
    costs memory, not work), on :func:`_workers` threads; fill ``out`` at ``rows``; return
    the rows whose plans missed ``plan_options.tol``."""
    from concurrent.futures import ThreadPoolExecutor

    from raybary.batch.api import configure_jax

    configure_jax()
    threads = _workers(workers, key[0])
    chunks = _chunks(rows, threads)
    size = next(b for b in BATCHES if b >= max(len(c) for c in chunks))
    run = functools.partial(_solve_chunk, table, key, ia, ib, epsilon, relative, options,
                            plan_options, want_plans, size, out)
    if threads == 1 or len(chunks) == 1:
        done = [run(c) for c in chunks]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="raybary-mw2") as pool:
            done = list(pool.map(run, chunks))
    if stats is not None:
        for _, counts in done:
            for name, value in counts.items():
                stats[name] = stats.get(name, 0) + value
    return np.concatenate([bad for bad, _ in done])


def _slots(size: int) -> int:
    """Slots of a call of a batch of ``size``: a thirty-second of it, within
    :data:`SLOTS` (one per batch size: few programs). The slots idle only in
    the tail (the last pairs to finish), which this keeps to about a tenth
    of a full batch's work; narrower lanes cost more per slot
    (docs/performance.md)."""
    return min(SLOTS[1], max(SLOTS[0], size // 32), size)


def _solve_chunk(table, key, ia, ib, epsilon, relative, options: SolverOptions, plan_options,
                 want_plans, size, out: _Solved, rows) -> tuple[np.ndarray, dict]:
    """One compiled call on the requests ``rows`` (padded to ``size`` by
    repeating the first); returns those whose plans missed the tolerance and
    the call's counts (:func:`solve_pairs`'s ``stats``)."""
    import time

    import jax

    padded = np.concatenate([rows, np.full(size - len(rows), rows[0])])
    turned = table.turned(ia[rows], ib[rows])
    arrays, scales = _pair_arrays(table, key, ia[padded], ib[padded], np.dtype(options.dtype))
    eps = epsilon[padded] if relative else epsilon[padded] / scales**2
    started = time.perf_counter()
    with jax.enable_x64(options.dtype == "float64"):
        res = _program()(**arrays, epsilon=eps.astype(options.dtype),
                         count=np.int32(len(rows)), relative=relative, options=plan_options,
                         slots=_slots(size), block=BLOCK)
        res = jax.tree_util.tree_map(np.asarray, jax.block_until_ready(res))  # GIL released
    n, s2 = len(rows), scales[:len(rows)] ** 2
    ok = res.error[:n] <= plan_options.tol
    out.value[rows] = res.value[:n].astype(np.float64) * s2
    out.entropic[rows] = res.entropic[:n].astype(np.float64) * s2
    out.epsilon[rows] = res.epsilon[:n].astype(np.float64) * s2
    out.converged[rows] = ok
    out.iterations[rows] = res.iterations[:n]
    if want_plans:
        for r, i in enumerate(rows):
            ka, kb = table.counts[ia[i]], table.counts[ib[i]]
            plan = res.plan[r].T if turned[r] else res.plan[r]
            out.plans[i] = plan[:ka, :kb].astype(np.float64)
    counts = dict(needed_iterations=int(np.sum(res.iterations[:n])),
                  slot_iterations=int(res.slot_iterations), blocks=int(res.blocks), calls=1,
                  run_seconds=time.perf_counter() - started)
    return rows[~ok], counts
