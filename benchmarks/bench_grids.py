"""Grids benchmark: ``shard_grids`` (the runner's grids step), old against new, side by side.

On one shard of ``--problems`` tutorial problems (default 1,000, d = 2) with
``--grid`` grids (default 50x50), without and with ``--input-grids``
(default 3), this script times

* **new**: :func:`raybary.runner.shard.shard_grids` as it is now (a whole
  shard at once: :mod:`raybary.runner.grids`);
* **old**: the implementation before it, kept in this file only
  (:func:`old_shard_grids`: a Python call of
  :func:`raybary.density.covering_extent` per problem, GMMs padded to powers
  of two, :func:`raybary.log_density_grid`'s Cholesky and triangular solve
  per component),

alternating old and new ``--repeats`` times in one process after a warm-up
call of each (compiles), and prints ms per problem (best and median of the
repetitions) and the split between extents and evaluation (extents: the
old per-problem ``problem_extents`` loop, the new stacking and
``stacked_extents``, timed alone; evaluation: the rest). It checks that
both give the same values: extents bit for bit, log-densities to float32
rounding (max absolute and relative difference printed).

The barycenters are stand-ins unless ``--solve``: the ``--bar-size`` (6)
components of largest lambda-weighted weight among a problem's inputs,
renormalised -- grids of the same shape as a solved barycenter's. With
``--solve`` they are solved once with :func:`raybary.solve` and cached in
``--cache`` (an ``.npz``; reused when it matches).

Like a runner actor, the process runs XLA without its intra-op thread
pool (``--xla_cpu_multi_thread_eigen=false``; ``--xla-threads`` keeps it).

Usage::

    python benchmarks/bench_grids.py                       # 1,000 problems, 50x50, J = 0 and 3
    python benchmarks/bench_grids.py --problems 200 --repeats 3 --input-grids 0
    python benchmarks/bench_grids.py --solve --cache /tmp/bary-1000.npz --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


# ------------------------------------------------------------------ the old implementation
def _pad_gmms(gmms, d):
    from raybary.batch.padding import next_pow2

    b = len(gmms)
    k = next_pow2(max(len(w) for w, _, _ in gmms))
    bp = next_pow2(b)
    W = np.zeros((bp, k))
    M = np.zeros((bp, k, d))
    C = np.broadcast_to(np.eye(d), (bp, k, d, d)).copy()
    for i in range(bp):
        w, m, c = gmms[i if i < b else 0]
        W[i, : len(w)], M[i, : len(w)], C[i, : len(w)] = w, m, c
    return W, M, C


def _padded_rows(extents, rows):
    out = np.empty((rows, extents.shape[1]))
    out[: len(extents)] = extents
    out[len(extents):] = extents[0]
    return out


def _old_eval_grids(gmms, extents, grid, d):
    from raybary.density import log_density_grid

    W, M, C = _pad_gmms(gmms, d)
    values, _ = log_density_grid((W, M, C), shape=grid.shape,
                                 bounds=_padded_rows(extents, W.shape[0]), dims=grid.dims,
                                 dtype="float32")
    return np.asarray(values[: len(gmms)], dtype=np.float32)


def _old_eval_curves(gmms, extents, length):
    from raybary.density import log_density

    W, M, C = _pad_gmms(gmms, 1)
    ext = _padded_rows(extents, W.shape[0])
    t = np.linspace(0.0, 1.0, length)
    points = (ext[:, :1] + (ext[:, 1:2] - ext[:, :1]) * t)[..., None]
    values = log_density((W, M, C), points, dtype="float32")
    return np.asarray(values[: len(gmms)], dtype=np.float32)


def old_shard_grids(problems, results, statuses, grid, curve_length=None):
    """``raybary.runner.shard.shard_grids`` as it was before the whole-shard path
    (commit 2e5d17e), for this benchmark and for nothing else."""
    from raybary.runner.shard import blank_shard_grids, problem_extents

    n, j = len(problems), grid.input_gmms
    out = blank_shard_grids(n, grid, curve_length)
    length = out.curve.shape[1]
    by_dim = {}
    for i, p in enumerate(problems):
        if p is not None and (p.dim == 1 or max(grid.dims) < p.dim):
            by_dim.setdefault(p.dim, []).append(i)
    for d, rows in sorted(by_dim.items()):
        if d == 1:
            extents, bary, inputs = out.curve_extent, out.curve, out.curve_inputs
            fixed = None if grid.bounds is None else grid.bounds[:2]

            def evaluate(gm, ext):
                return _old_eval_curves(gm, ext, length)
        else:
            extents, bary, inputs = out.extent, out.barycenter, out.inputs
            fixed = grid.bounds

            def evaluate(gm, ext, d=d):
                return _old_eval_grids(gm, ext, grid, d)
        ok = [i for i in rows if statuses[i] == "ok"]
        for i in rows:
            extents[i] = fixed if fixed is not None else problem_extents(
                problems[i], grid.dims, results[i] if statuses[i] == "ok" else None)
        if ok:
            gm = [(results[i].weights, results[i].means, results[i].covs) for i in ok]
            bary[ok] = evaluate(gm, extents[ok])
        if j:
            pairs = [(i, g) for i in rows for g in range(min(j, problems[i].n_gmms))]
            gm = [(problems[i].gmms[g].weights, problems[i].gmms[g].means,
                   problems[i].gmms[g].covs) for i, g in pairs]
            vals = evaluate(gm, np.stack([extents[i] for i, _ in pairs]))
            for (i, g), v in zip(pairs, vals):
                inputs[i, g] = v
    return out


# ------------------------------------------------------------------ extents alone
def old_extents(problems, results, dims=(0, 1)):
    from raybary.runner.shard import problem_extents

    return np.stack([problem_extents(p, dims, r) for p, r in zip(problems, results)])


def new_extents(problems, results, dims=(0, 1)):
    """The new path's extents step alone: stacking every GMM, then the boxes."""
    from raybary.runner.grids import stack_gmms, stacked_extents

    gmms, sizes = [], []
    for p, r in zip(problems, results):
        gmms.extend((g.weights, g.means, g.covs) for g in p.gmms)
        gmms.append((r.weights, r.means, r.covs))
        sizes.append(sum(len(g.weights) for g in p.gmms) + len(r.weights))
    st = stack_gmms(gmms, problems[0].dim, dims)
    return stacked_extents(st, np.cumsum(sizes) - sizes)


# ------------------------------------------------------------------ problems
def stand_in(problem, bar_size):
    """The ``bar_size`` components of largest lambda-weighted weight of the inputs."""
    from raybary.types import Result

    w = np.concatenate([lam * g.weights for lam, g in zip(problem.lambdas, problem.gmms)])
    m = np.concatenate([g.means for g in problem.gmms])
    c = np.concatenate([g.covs for g in problem.gmms])
    keep = np.argsort(-w, kind="stable")[:bar_size]
    return Result(w[keep] / w[keep].sum(), m[keep], c[keep], 0.0, True, 1, 0.0)


def barycenters(problems, args):
    """Stand-ins, or (``--solve``) solved barycenters, cached in ``--cache``."""
    from raybary.types import Result

    if not args.solve:
        return [stand_in(p, args.bar_size) for p in problems]
    if args.cache and os.path.exists(args.cache):
        z = np.load(args.cache)
        if z["w"].shape == (len(problems), args.bar_size):
            return [Result(w, m, c, 0.0, True, 1, 0.0) for w, m, c in zip(z["w"], z["m"], z["c"])]
    import raybary

    t0 = time.perf_counter()
    res = raybary.solve(problems, bar_size=args.bar_size)
    print(f"solved {len(res)} problems in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.cache:
        np.savez(args.cache, w=np.stack([r.weights for r in res]),
                 m=np.stack([r.means for r in res]), c=np.stack([r.covs for r in res]))
    return res


# ------------------------------------------------------------------ measuring
def compare(old, new) -> dict:
    """Largest differences of the new values from the old (NaN where both are NaN)."""
    out = {"extent_max_abs": float(np.nanmax(np.abs(new.extent - old.extent)))}
    pairs = [("barycenter", old.barycenter, new.barycenter)]
    if old.inputs is not None:
        pairs.append(("inputs", old.inputs, new.inputs))
    for name, a, b in pairs:
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        diff = np.abs(b.astype(np.float64) - a)
        out[f"{name}_max_abs"] = float(np.nanmax(diff))
        out[f"{name}_max_rel"] = float(np.nanmax(diff / np.maximum(np.abs(a), 1e-30)))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(problems, results, j: int, args) -> dict:
    from raybary.runner.options import GridOptions
    from raybary.runner.shard import shard_grids

    grid = GridOptions(shape=args.grid, input_gmms=j)
    statuses = ["ok"] * len(problems)
    calls = {"old": lambda: old_shard_grids(problems, results, statuses, grid),
             "new": lambda: shard_grids(problems, results, statuses, grid)}
    extents = {"old": lambda: old_extents(problems, results),
               "new": lambda: new_extents(problems, results)}
    warm = {k: timed(f) for k, f in calls.items()}  # compiles (or loads from the cache)
    diff = compare(calls["old"](), calls["new"]())
    np.testing.assert_array_equal(extents["old"](), extents["new"]())
    times = {k: [] for k in ("old", "new", "old_extents", "new_extents")}
    for _ in range(args.repeats):
        for k in ("old", "new"):
            times[k].append(timed(calls[k]))
            times[f"{k}_extents"].append(timed(extents[k]))
    n = len(problems)
    ms = {k: {"best": 1e3 * min(v) / n, "median": 1e3 * float(np.median(v)) / n,
              "all": [1e3 * x / n for x in v]} for k, v in times.items()}
    return {"input_grids": j, "problems": n, "grid": list(args.grid), "warmup_s": warm,
            "ms_per_problem": ms, "differences": diff}


def report(case: dict) -> None:
    ms = case["ms_per_problem"]
    print(f"\n{case['problems']} problems, {case['grid'][0]}x{case['grid'][1]} grids, "
          f"--input-grids {case['input_grids']}  (ms per problem; best / median of "
          f"{len(ms['old']['all'])}; first call {case['warmup_s']['old']:.2f} s old, "
          f"{case['warmup_s']['new']:.2f} s new)")
    for k in ("old", "new"):
        total, ext = ms[k], ms[f"{k}_extents"]
        print(f"  {k}: total {total['best']:.4f} / {total['median']:.4f}   extents "
              f"{ext['best']:.4f} / {ext['median']:.4f}   evaluation "
              f"{total['best'] - ext['best']:.4f}   all: "
              + " ".join(f"{x:.4f}" for x in total["all"]))
    print(f"  speed-up (best): {ms['old']['best'] / ms['new']['best']:.1f}x")
    print("  new - old: " + ", ".join(f"{k} {v:.2g}" for k, v in case["differences"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--grid", default="50x50", help="HxW, or one size for both")
    ap.add_argument("--input-grids", type=int, nargs="+", default=[0, 3],
                    help="the cases' --input-grids (default 0 and 3)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bar-size", type=int, default=6)
    ap.add_argument("--solve", action="store_true", help="solve the barycenters (else stand-ins)")
    ap.add_argument("--cache", help="an .npz to keep the solved barycenters in")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--xla-threads", action="store_true",
                    help="keep XLA's intra-op thread pool (an actor runs without)")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    h, _, w = args.grid.partition("x")
    args.grid = (int(h), int(w or h))
    if not args.xla_threads:
        from raybary.batch.engine import lane_xla_flags

        os.environ["XLA_FLAGS"] = lane_xla_flags(os.environ.get("XLA_FLAGS", ""))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from raybary.batch.api import configure_jax
    from raybary.storage.generate import tutorial_problems

    configure_jax()
    problems = tutorial_problems(args.problems, seed=args.seed)
    results = barycenters(problems, args)
    print(f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    cases = []
    for j in args.input_grids:
        cases.append(bench_case(problems, results, j, args))
        report(cases[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
