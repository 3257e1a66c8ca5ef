"""Solver benchmark: raybary's batched solver beside OTT-JAX and POT.

Tutorial-sized problems (J=3, K=(2,3,5), d=2, n=6; OTT-JAX at the tutorial's
absolute epsilon=0.1) at batch sizes from 1 to 16384, then d=5 and a ragged
mix. For each solver: problems per second, and the exact MW2 objective gap
against POT's exact fixed point (``ot.gmm.gmm_barycenter_fixed_point``) from
the same initialisation, measured on a sample of problems with POT's exact LP
(``ot.gmm.gmm_ot_loss``). Run it in one go so that every number comes from the
same (noisy, shared) machine state::

    python benchmarks/bench_solver.py            # full table (~10 min on 2 cores)
    python benchmarks/bench_solver.py --quick    # smaller sizes

Needs the ``test`` extra (POT, OTT-JAX). Times exclude compilation: each
solver is run once on the same shapes before it is timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import reference as ref  # noqa: E402

import raybary  # noqa: E402
from raybary.storage.generate import random_columns, tutorial_problems  # noqa: E402


def shared_init(problem, n: int, rng: np.random.Generator):
    """``n`` input components drawn by mass (means jittered), the same for all solvers."""
    w = np.concatenate([lam * g.weights for lam, g in zip(problem.lambdas, problem.gmms)])
    m = np.concatenate([g.means for g in problem.gmms])
    c = np.concatenate([g.covs for g in problem.gmms])
    pick = rng.choice(len(w), size=n, replace=True, p=w / w.sum())
    sd = np.sqrt(np.trace(c[pick], axis1=1, axis2=2) / m.shape[1])
    return m[pick] + 0.1 * sd[:, None] * rng.normal(size=(n, m.shape[1])), c[pick]


def gap(problem, result_wmc, pot_objective: float) -> float:
    ours = ref.exact_objective(problem, *result_wmc)
    return (ours - pot_objective) / max(pot_objective, 1e-12)


def rate(fn, count: int) -> float:
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def bench_family(name, problems, n, sizes, sample, ott_count, pot_count, dtype):
    rng = np.random.default_rng(0)
    inits = [shared_init(p, n, rng) for p in problems]
    rows = []
    # Reference objectives on a sample (POT from the shared init).
    k = min(sample, len(problems))
    pot_obj = []
    t0 = time.perf_counter()
    for p, i in zip(problems[:k], inits[:k]):
        pot_obj.append(ref.exact_objective(p, *ref.pot_fixed_point(p, *i)))
    pot_rate = k / (time.perf_counter() - t0)
    # raybary, same init and default init (k-means++), at each batch size.
    ours_same = raybary.solve(problems[:k], bar_size=n, init=inits[:k], dtype=dtype)
    ours_default = raybary.solve(problems[:k], bar_size=n, dtype=dtype)
    g_same = [gap(p, (r.weights, r.means, r.covs), q) for p, r, q in zip(problems, ours_same, pot_obj)]
    g_def = [gap(p, (r.weights, r.means, r.covs), q) for p, r, q in zip(problems, ours_default, pot_obj)]
    for size in sizes:
        batch = problems[:size]
        raybary.solve(batch, bar_size=n, dtype=dtype)  # compile these shapes
        r = rate(lambda b=batch: raybary.solve(b, bar_size=n, dtype=dtype), len(batch))
        rows.append((name, f"raybary {dtype}", size, r))
    # OTT-JAX (jitted once, looped), only for a single shape family.
    g_ott, ott_rate = [], float("nan")
    if ott_count and len({tuple(g.n_components for g in p.gmms) for p in problems}) == 1:
        fn = ref.ott_solve_fn(problems[0].dim, epsilon=0.1)
        ref.ott_solve(problems[0], *inits[0], fn=fn)
        t0 = time.perf_counter()
        outs = [ref.ott_solve(p, *i, fn=fn) for p, i in zip(problems[:ott_count], inits[:ott_count])]
        ott_rate = ott_count / (time.perf_counter() - t0)
        g_ott = [gap(p, o, q) for p, o, q in zip(problems, outs, pot_obj)]
    return {
        "rows": rows,
        "pot_rate": pot_rate,
        "ott_rate": ott_rate,
        "gap_same": np.array(g_same),
        "gap_default": np.array(g_def),
        "gap_ott": np.array(g_ott),
        "sample": k,
    }


def ragged_problems(count: int, seed: int = 0):
    problems, _ = random_columns(count, seed=seed).to_problems()
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch sizes")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--sample", type=int, default=30, help="problems compared with POT")
    args = ap.parse_args()
    sizes = [1, 16, 256, 1024] if args.quick else [1, 16, 256, 1024, 4096, 16384]
    biggest = max(sizes)
    report = []
    tut = tutorial_problems(biggest, seed=0)
    report.append(("tutorial d=2", bench_family("tutorial d=2", tut, 6, sizes, args.sample,
                                                 20, args.sample, args.dtype)))
    d5 = tutorial_problems(min(biggest, 4096), dim=5, seed=1)
    report.append(("tutorial d=5", bench_family("tutorial d=5", d5, 6, [s for s in sizes if s <= 4096],
                                                 args.sample, 10, args.sample, args.dtype)))
    rag = ragged_problems(min(biggest, 4096), seed=2)
    report.append(("ragged mix", bench_family("ragged mix", rag, 6, [s for s in sizes if s <= 4096],
                                               args.sample, 0, args.sample, args.dtype)))

    print("\n| family | solver | batch | problems/s |")
    print("|---|---|---:|---:|")
    for name, res in report:
        for fam, solver, size, r in res["rows"]:
            print(f"| {fam} | {solver} | {size} | {r:,.0f} |")
        if np.isfinite(res["ott_rate"]):
            print(f"| {name} | OTT-JAX (jit, loop, eps=0.1) | 1 | {res['ott_rate']:,.1f} |")
        print(f"| {name} | POT fixed point (exact) | 1 | {res['pot_rate']:,.2f} |")
    print("\nExact MW2 objective gap vs POT's fixed point from the same init "
          "(relative; negative = better than POT):")
    print("| family | solver | median | max | sample |")
    print("|---|---|---:|---:|---:|")
    for name, res in report:
        for label, g in (("raybary, same init", res["gap_same"]),
                         ("raybary, k-means++ init", res["gap_default"]),
                         ("OTT-JAX, same init", res["gap_ott"])):
            if len(g):
                print(f"| {name} | {label} | {np.median(g):.2e} | {g.max():.2e} | {len(g)} |")


if __name__ == "__main__":
    main()
