"""The public solver API: :func:`solve` over lists of ragged problems.

This is the glue between NumPy problems and the jitted JAX solver. Its steps:
check the arguments (:func:`_plan`), put every (problem, restart) pair in a
shape bucket (:func:`_bucket_rows`), pad each chunk of a bucket and run it
through an :class:`~raybary.batch.engine.Engine` (:func:`_solve_chunk`),
undo the normalisation and keep the best restart of each problem
(:func:`_to_result`, :func:`_better`). :func:`solve_with` does this for a
checked :class:`~raybary.options.SolverOptions` (what the runner and Ray Data
call); :func:`solve` takes the options as keywords.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from raybary.batch.engine import BATCH_SIZE, Engine, default_engine, engine_of
from raybary.batch.padding import Bucket, bucket_of, next_pow2, pad_problems
from raybary.options import DEFAULT_RELATIVE_EPSILON, SolverOptions
from raybary.types import Problem, Result

__all__ = ["solve", "solve_with", "configure_jax", "DEFAULT_RELATIVE_EPSILON",
           "DEFAULT_BATCH_SIZE", "Engine"]

DEFAULT_BATCH_SIZE = BATCH_SIZE  # problems per compiled call on a CPU (LaneRule.batch_size)
MERGE_BELOW = 4096  # buckets of one dimension with fewer rows than this share one program

InitArg = Sequence[tuple[np.ndarray, np.ndarray] | None] | None


def configure_jax() -> str | None:
    """Set up JAX as :func:`solve` will (:meth:`Engine.setup` of the default
    engine: the persistent compilation cache), before anything compiles;
    returns the cache directory in use. Processes that compile other programs
    first (the runner's actors: density grids) call it at start."""
    return default_engine().setup()


def solve(
    problems: Problem | Sequence[Problem],
    *,
    bar_size: int | Sequence[int],
    epsilon: float | None = None,
    relative_epsilon: float | None = None,
    init: InitArg = None,
    restarts: int = SolverOptions.restarts,
    learn_weights: bool = SolverOptions.learn_weights,
    dtype: str = SolverOptions.dtype,
    seed: int = SolverOptions.seed,
    ids: Sequence[int] | None = None,
    max_iterations: int | None = None,
    tol: float | None = None,
    batch_size: int | None = None,
    config=None,
    validate: bool = True,
    progress: Callable[[int], None] | None = None,
    stats: dict | None = None,
    engine: Engine | None = None,
) -> list[Result]:
    r"""Wasserstein barycenters (MW2, Bures ground cost) of many GMM problems at once.

    Args:
      problems: one :class:`~raybary.Problem` or a sequence of them; ragged
        (different d, J, K_j) is fine.
      bar_size: barycenter components ``n``, one for all or one per problem.
      epsilon: absolute entropic regularisation, in squared units of the data
        (the tutorial's ``epsilon=0.1``).
      relative_epsilon: regularisation relative to the mean cost between the
        initial barycenter and the inputs (scale-free). The default, when
        neither is given, is :data:`~raybary.options.DEFAULT_RELATIVE_EPSILON`:
        the same for data of any scale, and small enough that the exact MW2
        objective of the barycenter matches POT's exact fixed point closely
        (the atoms sit at a stationary point, so the blur of the plans costs
        only second order; docs/solver.md has the trade). Give at most one.
      init: ``None`` (k-means++ seeding over the input components by Bures
        cost) or one ``(means (n, d), covs (n, d, d))`` pair (or ``None``) per
        problem. A given init is used for restart 0.
      restarts: initialisations solved per problem inside the same batch; the
        lowest objective wins. Restarts alternate k-means++ (even) and
        components drawn by mass with replacement (odd), which puts several
        atoms on heavy components.
      learn_weights: also optimise the barycenter's component weights (the
        objective is then at most that of uniform weights).
      dtype: ``"float32"`` (default) or ``"float64"``.
      seed: seed of the k-means++ draws (results are reproducible).
      ids: a stable integer id per problem (default: its position). The
        draws of problem ``i`` depend only on ``seed`` and ``ids[i]``, so its
        initialisation does not depend on the call, batch or position that
        solved it (``raybary run`` passes the store's ``problem_id``).
      max_iterations, tol: outer iterations and relative objective tolerance
        (defaults: :meth:`~raybary.SolverConfig.for_dtype`).
      batch_size: problems per compiled call (rounded up to a power of two;
        any size: 2**20 tutorial problems hold about 6 GiB of solver state
        on the host). A chunk runs in lanes of at most the engine's slots,
        refilled from the chunk's waiting problems. Default: the engine's
        :class:`~raybary.batch.engine.LaneRule` ``batch_size``, by JAX's
        backend: :data:`DEFAULT_BATCH_SIZE` (4,096; lanes of 1,024) on a
        CPU, 2**20 (lanes of 131,072) on a GPU or TPU.
      config: a :class:`~raybary.SolverConfig` to start from instead of the
        defaults of ``dtype``; ``learn_weights=True``, ``max_iterations`` and
        ``tol``, when given, replace its fields.
      validate: check the inputs first (:mod:`raybary.validation`, with the
        conditioning ``dtype`` can represent) and raise ``ValueError`` naming
        every bad problem.
      progress: called after each chunk with the number of problems whose
        every restart is finished.
      stats: if a dict, it receives the solver's work counters: ``slot_blocks``
        (loop blocks run, summed over batch slots, busy or idle) and
        ``plan_block`` (plan iterations per block); their product against
        the sum of ``extra["plan_iterations"]`` is the share of slot
        iterations that did no needed work (``benchmarks/bench_speed.py``
        prints it); ``blocks``, ``calls`` and ``run_seconds`` (loop blocks
        summed over calls, host round trips, their time:
        :meth:`~raybary.batch.engine.Engine.solve_arrays`;
        ``benchmarks/gpu_check.py`` prints them).
      engine: the :class:`~raybary.batch.engine.Engine` to run on (its
        compiled programs and JAX set-up); default: the process's.

    Returns:
      One :class:`~raybary.Result` per problem, in order.
    """
    options = SolverOptions.build(
        bar_size=bar_size, epsilon=epsilon, relative_epsilon=relative_epsilon,
        restarts=restarts, learn_weights=learn_weights, dtype=dtype, seed=seed,
        max_iterations=max_iterations, tol=tol)
    return solve_with(problems, options, init=init, ids=ids, batch_size=batch_size,
                      config=config, validate=validate, progress=progress, stats=stats,
                      engine=engine)


@dataclass(frozen=True)
class _Plan:
    """The checked per-problem arguments of one :func:`solve_with` call."""

    sizes: list[int]
    ids: np.ndarray
    inits: list


def solve_with(problems: Problem | Sequence[Problem], options: SolverOptions, *,
               init: InitArg = None, ids: Sequence[int] | None = None,
               batch_size: int | None = None, config=None, validate: bool = True,
               progress: Callable[[int], None] | None = None, stats: dict | None = None,
               engine: Engine | None = None) -> list[Result]:
    """:func:`solve` for checked :class:`~raybary.options.SolverOptions` (the
    other arguments as there)."""
    problems = [problems] if isinstance(problems, Problem) else list(problems)
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not problems:
        return []
    plan = _plan(problems, options, init, ids)
    if validate:
        _raise_invalid(problems, options.dtype)
    config = options.config(config)
    engine = engine_of(engine)
    batch_size = engine.lanes.batch_size if batch_size is None else int(batch_size)
    if stats is not None:
        stats["plan_block"] = config.plan_block
    best: list[Result | None] = [None] * len(problems)
    finished = _Finished(options.restarts, progress)
    for bucket, rows in sorted(_bucket_rows(problems, plan.sizes, options.restarts).items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            out, norm = _solve_chunk(engine, problems, plan, options, config, bucket, chunk,
                                     min(next_pow2(len(chunk)), next_pow2(batch_size)), stats)
            for row, (i, r) in enumerate(chunk):
                res = _to_result(out, row, plan.sizes[i], problems[i], norm, r)
                if best[i] is None or _better(res, best[i]):
                    best[i] = res
            finished.add(i for i, _ in chunk)
    return best  # type: ignore[return-value]


def _plan(problems: list[Problem], options: SolverOptions, init: InitArg,
          ids: Sequence[int] | None) -> _Plan:
    """The per-problem bar sizes, ids and inits, checked against the problems."""
    P = len(problems)
    size = options.bar_size
    sizes = list(size) if isinstance(size, tuple) else [int(size)] * P
    if len(sizes) != P:
        raise ValueError(f"bar_size has {len(sizes)} entries for {P} problems")
    ids = np.arange(P, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (P,):
        raise ValueError(f"ids has shape {ids.shape} for {P} problems")
    inits = [None] * P if init is None else list(init)
    if len(inits) != P:
        raise ValueError(f"init has {len(inits)} entries for {P} problems")
    for i, (ini, n, p) in enumerate(zip(inits, sizes, problems)):
        if ini is not None:
            m, c = np.asarray(ini[0]), np.asarray(ini[1])
            if m.shape != (n, p.dim) or c.shape != (n, p.dim, p.dim):
                raise ValueError(
                    f"init of problem {i}: expected means ({n}, {p.dim}) and covs "
                    f"({n}, {p.dim}, {p.dim}), got {m.shape} and {c.shape}"
                )
    return _Plan(sizes, ids, inits)


def _raise_invalid(problems: Sequence[Problem], dtype: str) -> None:
    """Raise ``ValueError`` naming every invalid problem (ids = positions)."""
    from raybary.validation import problems_errors

    errors = [e for e in problems_errors(problems, dtype=dtype) if e is not None]
    if errors:
        raise ValueError("invalid problems:\n  " + "\n  ".join(errors))


class _Finished:
    """Counts the problems whose every restart is solved (a problem's restarts
    can fall on both sides of a chunk boundary) and reports them to ``progress``."""

    def __init__(self, restarts: int, progress: Callable[[int], None] | None):
        self.restarts, self.progress = restarts, progress
        self.rows: dict[int, int] = defaultdict(int)
        self.done = 0

    def add(self, problems) -> None:
        for i in problems:
            self.rows[i] += 1
            self.done += self.rows[i] == self.restarts
        if self.progress is not None:
            self.progress(self.done)


def _bucket_rows(problems: Sequence[Problem], sizes: Sequence[int],
                 restarts: int) -> dict[Bucket, list[tuple[int, int]]]:
    """Every (problem, restart) pair as a row of its shape bucket, small
    buckets merged (:func:`_merge_small`)."""
    rows: dict[Bucket, list[tuple[int, int]]] = defaultdict(list)
    for i, p in enumerate(problems):
        b = bucket_of(p, sizes[i])
        rows[b].extend((i, r) for r in range(restarts))
    return _merge_small(rows)


def _solve_chunk(engine: Engine, problems, plan: _Plan, options: SolverOptions, config,
                 bucket: Bucket, chunk: list[tuple[int, int]], batch: int, stats):
    """Pad the rows ``chunk`` of ``bucket`` into a batch of ``batch`` and solve it."""
    keys = np.array([_key_words(options.seed, int(plan.ids[i]), options.restarts, r)
                     for i, r in chunk], np.uint32)
    arrays, norm = pad_problems(
        [problems[i] for i, _ in chunk],
        [plan.sizes[i] for i, _ in chunk],
        bucket,
        batch,
        epsilons=[options.epsilon_value] * len(chunk),
        relative_epsilon=options.is_relative,
        inits=[plan.inits[i] if r == 0 else None for i, r in chunk],
        keys=keys,
        dtype=np.dtype(options.dtype),
        restarts=[r for _, r in chunk],
    )
    out = engine.solve_arrays(arrays, config, options.dtype, count=len(chunk), stats=stats)
    return out, norm


def _key_words(seed: int, problem_id: int, restarts: int, restart: int) -> list[int]:
    """PRNG key data of one (problem, restart): the seed with the id's high
    bits, and the id's low bits with the restart."""
    low = (problem_id * restarts + restart) & 0xFFFFFFFF
    high = (problem_id * restarts + restart) >> 32
    return [(seed + high * 0x9E3779B1) & 0xFFFFFFFF, low]


def _merge_small(rows: dict) -> dict:
    """Merge the small buckets of each dimension into one, their elementwise
    max: a compile costs about as much as solving a few thousand problems in
    a bucket twice the needed size, which is about the most the coarse
    classes of :func:`raybary.batch.padding.bucket_of` pad to."""
    groups: dict[int, list[Bucket]] = defaultdict(list)
    for b in rows:
        groups[b.d].append(b)
    merged: dict[Bucket, list] = {}
    for d, buckets in groups.items():
        small = [b for b in buckets if len(rows[b]) < MERGE_BELOW]
        for b in buckets:
            if b not in small or len(small) == 1:
                merged[b] = rows[b]
        if len(small) > 1:
            big = Bucket(d, max(b.n for b in small), max(b.J for b in small),
                         max(b.L for b in small), max(b.K for b in small))
            merged.setdefault(big, [])
            merged[big] = merged[big] + [item for b in sorted(small) for item in rows[b]]
    return merged


def _better(a: Result, b: Result) -> bool:
    if a.status != b.status:
        return a.status == "ok"
    return bool(a.objective < b.objective)


def _split_plans(out: dict, row: int, n: int, problem: Problem) -> tuple[np.ndarray, list, bool]:
    """The per-GMM costs ``(J,)`` (solver units) and plans (``(n, K_j)``, ``None``
    for GMMs that take no part: NaN cost) of row ``row``, and whether the plans
    are finite: the flat layout holds GMM j's components contiguously, in input
    order (views of one array: one check, no copy per GMM)."""
    costs = out["costs"][row, :problem.n_gmms].astype(np.float64)
    sizes = [g.n_components for g in problem.gmms]
    flat = out["plans"][row, :n, :sum(sizes)].astype(np.float64)
    plans, start = [], 0
    for size, cost in zip(sizes, costs.tolist()):
        plans.append(None if cost != cost else flat[:, start:start + size])  # NaN: no part
        start += size
    return costs, plans, bool(np.isfinite(flat).all())


def _to_result(out: dict, row: int, n: int, problem: Problem, norm, restart: int) -> Result:
    d = problem.dim
    c, s = norm.center[row, :d], norm.scale[row]
    weights = out["weights"][row, :n].astype(np.float64)
    means = out["means"][row, :n, :d].astype(np.float64) * s + c
    covs = out["covs"][row, :n, :d, :d].astype(np.float64) * s**2
    objective = float(out["objective"][row]) * s**2
    costs, plans, plans_finite = _split_plans(out, row, n, problem)
    costs *= s**2
    finite = (
        np.isfinite(objective)
        and plans_finite
        and np.isfinite(weights).all()
        and np.isfinite(means).all()
        and np.isfinite(covs).all()
    )
    return Result(
        weights=weights,
        means=means,
        covs=covs,
        objective=objective,
        converged=bool(out["converged"][row]),
        iterations=int(out["iterations"][row]),
        marginal_error=float(out["marginal_error"][row]),
        restart=restart,
        status="ok" if finite else "failed",
        error=None if finite else "solver produced non-finite values",
        extra={
            "plan_iterations": int(out["plan_iterations"][row]),
            "epsilon": float(out["epsilon"][row]) * s**2,
        },
        costs=costs if finite else None,
        plans=plans if finite else None,
    )
