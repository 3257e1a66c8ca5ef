"""A batch of validated problems solved with failure isolation, as a
:class:`~raybary.types.BatchOutcome`: one row per problem, whatever happened.

The runner (each shard, and a shard given up), Ray Data's
:class:`~raybary.interop.BarycenterSolver` and anything else that must
account for every problem call :func:`solve_outcome`:

* a problem that failed validation is ``invalid`` with its message;
* the valid ones are solved together; if the solver raises, the batch is
  split in halves and each half is retried, so one poison problem costs
  ``O(log n)`` extra solver calls and ends up alone, ``failed`` with the
  exception's message, while the rest are solved normally;
* a result the solver itself marks ``failed`` (non-finite values) keeps
  that status and message;
* with ``give_up``, nothing is solved: the valid problems are ``failed``
  with that message (a shard whose attempts were all lost).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from raybary.options import SolverOptions
from raybary.types import BatchOutcome, Problem, Result

__all__ = ["solve_outcome", "solve_isolated", "problem_seconds", "SolveFn"]

#: ``solve_fn(problems, options, ids) -> results``, one per problem (default:
#: :func:`raybary.batch.api.solve_with` without validation).
SolveFn = Callable[[Sequence[Problem], SolverOptions, Sequence[int]], list]


def solve_outcome(problem_ids: Sequence[int] | np.ndarray, problems: Sequence[Problem | None],
                  errors: Sequence[str | None], options: SolverOptions, *,
                  solve_fn: SolveFn | None = None, give_up: str | None = None) -> BatchOutcome:
    """The outcome of a validated batch: ``problems[i]`` is ``None`` where
    ``errors[i]`` says why it is invalid. Solved unless ``give_up`` (see the
    module docstring); ``seconds`` splits the solver's time by plan iterations
    (:func:`problem_seconds`)."""
    ids = np.asarray(problem_ids, dtype=np.int64).reshape(-1)
    n = len(ids)
    if len(problems) != n or len(errors) != n:
        raise ValueError(f"{len(problems)} problems and {len(errors)} errors for {n} ids")
    valid = [i for i in range(n) if problems[i] is not None and errors[i] is None]
    statuses = ["invalid" if problems[i] is None or errors[i] is not None else "ok"
                for i in range(n)]
    messages = list(errors)
    results: list[Result | None] = [None] * n
    seconds = np.full(n, np.nan)
    if give_up is not None:
        for i in valid:
            statuses[i], messages[i] = "failed", give_up
    elif valid:
        started = time.perf_counter()
        solved = solve_isolated([problems[i] for i in valid], options, solve_fn,
                                [int(ids[i]) for i in valid])
        elapsed = time.perf_counter() - started
        for i, r in zip(valid, solved):
            results[i] = r
            if r.status != "ok":
                statuses[i], messages[i] = "failed", r.error or "solver failed (no message)"
        seconds = problem_seconds(elapsed, results)
    return BatchOutcome(ids, statuses, messages, results, seconds)


def _solve_with(problems: Sequence[Problem], options: SolverOptions,
                ids: Sequence[int]) -> list[Result]:
    from raybary.batch.api import solve_with

    return solve_with(problems, options, ids=ids, validate=False)


def _failed(message: str) -> Result:
    nan = float("nan")
    return Result(weights=np.zeros(0), means=np.zeros((0, 0)), covs=np.zeros((0, 0, 0)),
                  objective=nan, converged=False, iterations=0, marginal_error=nan,
                  status="failed", error=message)


def solve_isolated(problems: Sequence[Problem], options: SolverOptions,
                   solve_fn: SolveFn | None = None,
                   ids: Sequence[int] | None = None) -> list[Result]:
    """Solve ``problems`` (already validated); an exception fails only the
    problem(s) that raise it (found by bisection), with its message. ``ids``
    (the problems' ids) seed each problem's initialisation, so a result does
    not depend on the batch or the problem's place in it."""
    solve_fn = solve_fn or _solve_with
    problems = list(problems)
    if not problems:
        return []
    ids = list(range(len(problems))) if ids is None else [int(i) for i in ids]
    try:
        out = list(solve_fn(problems, options, ids))
        if len(out) != len(problems):
            raise RuntimeError(f"solver returned {len(out)} results for {len(problems)} problems")
        return out
    except Exception as e:  # noqa: BLE001 - anything the solver raises is isolated
        if len(problems) == 1:
            return [_failed(f"solver error: {type(e).__name__}: {e}".strip())]
    half = len(problems) // 2
    return (solve_isolated(problems[:half], options, solve_fn, ids[:half])
            + solve_isolated(problems[half:], options, solve_fn, ids[half:]))


def problem_seconds(total: float, results: Sequence[Result | None]) -> np.ndarray:
    """Each solved problem's share of a batch's solver time: ``total`` split in
    proportion to the plan iterations it needed (the unit of work of the
    batched solver; a problem's own wall time does not exist when a thousand
    are solved at once). NaN where there is no result."""
    work = np.array([float(max((r.extra or {}).get("plan_iterations", 0), 1))
                     if r is not None else 0.0 for r in results])
    out = np.full(len(results), np.nan)
    if work.sum() > 0:
        mask = work > 0
        out[mask] = total * work[mask] / work.sum()
    return out
