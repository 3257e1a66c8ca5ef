"""Where the solver's time goes: throughput with the four numbers behind it.

For each case (side by side, in one process, so that every number comes from
the same state of a shared, noisy machine) it prints:

- problems/s through ``raybary.solve`` (compiled shapes: each case is run once
  before it is timed), and the converged share;
- plan-solver iterations needed per problem: mean, p99, max;
- wall time per needed iteration (wall time / sum of the iterations);
- the floor, measured in the same run on the same batch width: one plain
  log-domain Sinkhorn iteration (two half-steps, no masks, no schedule, a
  ``fori_loop`` over a ``(B, 6, 10)`` batch), one bare Newton step of the
  solver (``raybary.solvers.plans.newton_step`` in a ``fori_loop``), and the
  machine's floor: the same Newton step as a plain compiled loop over
  problems (``benchmarks/floor_numba.py``, numba; on one core and on every
  core numba uses), where numba is installed (the ``bench`` extra);
- the share of slot iterations that did no needed work (finished, padded or
  waiting slots: ``1 - needed / (slot_blocks * plan_block)``).

Cases: the tutorial family (J=3, K=2,3,5, d=2, n=6) at the tutorial's
``epsilon=0.1`` and at the default relative epsilon, optionally the old
Sinkhorn plan solver, OTT-JAX's jitted solver in a loop at ``epsilon=0.1``,
and a ragged mix (d 1-5, J 1-6, K 1-8; first call, compiling, and a second
call). Accuracy: the exact MW2 objective gap to POT's fixed point from the
same initialisation, on a sample. Needs the ``test`` extra (POT, OTT-JAX)::

    python benchmarks/bench_speed.py                 # ~3-5 min on 2 cores
    python benchmarks/bench_speed.py --problems 1024 --sinkhorn
    python benchmarks/bench_speed.py --write-docs    # also rewrite docs/performance.md's table
    python benchmarks/bench_speed.py --floors-only   # the floors alone, ~30 s

``--write-docs [PATH]`` replaces the text between the ``bench_speed`` markers
of PATH (default ``docs/performance.md``) with this run's table, its date and
machine, and the floor, OTT-JAX and POT lines (:func:`render_docs`).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_solver import shared_init  # noqa: E402  (same folder)

import raybary  # noqa: E402
from raybary.solvers.barycenter import SolverConfig  # noqa: E402
from raybary.storage.generate import random_columns, tutorial_problems  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN, END = "<!-- bench_speed:begin -->", "<!-- bench_speed:end -->"
LABELS = {  # case names as printed -> as in docs/performance.md
    "tutorial, epsilon=0.1": "tutorial family, `epsilon=0.1`",
    "tutorial, default epsilon": "tutorial family, default epsilon",
    "tutorial, epsilon=0.1, Sinkhorn plans": "tutorial family, `epsilon=0.1`, Sinkhorn plans",
    "ragged mix, epsilon=0.1, first call (compiles)":
        "ragged mix (d 1-5, J 1-6, K 1-8), `epsilon=0.1`, first call (compiles; "
        "persistent cache {jax_cache})",
    "ragged mix, epsilon=0.1": "ragged mix, `epsilon=0.1`",
}


def floors(width: int, dtype=np.float32, iterations: int = 200) -> dict[str, float]:
    """Microseconds per problem of one plain Sinkhorn iteration and one bare
    Newton step, on a batch of ``width`` tutorial-sized problems; with numba
    (float32 only), also the machine floor (:func:`machine_floors`)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    cost = jnp.asarray(rng.uniform(0, 1, (width, 6, 10)), dtype)
    eps = 1e-2

    @jax.jit
    def plain(c):
        log_a = jnp.log(jnp.full((6,), 1 / 6, dtype))
        log_b = jnp.log(jnp.full((10,), 1 / 10, dtype))

        def one(c):
            def body(_, fg):
                f, g = fg
                g = eps * log_b - eps * jax.nn.logsumexp((f[:, None] - c) / eps, axis=0)
                f = eps * log_a - eps * jax.nn.logsumexp((g[None, :] - c) / eps, axis=1)
                return f, g
            return jax.lax.fori_loop(0, iterations, body, (jnp.zeros(6, dtype), jnp.zeros(10, dtype)))
        return jax.vmap(one)(c)

    jax.block_until_ready(plain(cost))
    t = time.perf_counter()
    jax.block_until_ready(plain(cost))
    out = {"sinkhorn": (time.perf_counter() - t) / iterations / width * 1e6,
           "newton": newton_floor((2, 3, 5), width, pad_to=12, dtype=dtype,
                                  iterations=iterations)}
    if np.dtype(dtype) == np.float32:
        out.update(machine_floors(width, iterations))
    return out


def machine_floors(width: int, iterations: int = 200) -> dict[str, float]:
    """The machine's floor: microseconds per problem of the solver's Newton step
    as a plain compiled loop over problems (``floor_numba.py``), on the batch
    of :func:`newton_floor`, on one core (``numba``) and on numba's threads
    (``numba_parallel``, ``numba_threads`` of them). Empty without numba."""
    try:
        import floor_numba  # same folder
    except ImportError:  # numba is not installed
        return {}
    kw = dict(ks=(2, 3, 5), width=width, pad_to=12, iterations=iterations)
    return {"numba": floor_numba.numba_floor(**kw),
            "numba_parallel": floor_numba.numba_floor(parallel=True, **kw),
            "numba_threads": floor_numba.threads()}


def machine_floor_text(fl: dict) -> str:
    """The machine floor as a sentence's part, or why there is none."""
    if "numba" not in fl:
        return "no machine floor (numba is not installed)"
    t = fl["numba_threads"]
    return (f"a plain compiled Newton step (numba, one core) {fl['numba']:.2f} us per problem, "
            f"({'both cores' if t == 2 else f'{t} threads'}) {fl['numba_parallel']:.2f} us")


def newton_floor(ks: tuple[int, ...], width: int, pad_to: int | None = None, n: int = 6,
                 dtype=np.float32, iterations: int = 200) -> float:
    """Microseconds per problem of one bare Newton step of the plan solver
    (``raybary.solvers.plans.newton_step`` in a ``fori_loop``) on a batch
    of ``width`` problems with ``n`` atoms and GMMs of ``ks`` components,
    padded with masked components to ``pad_to`` (the solver's layout)."""
    import jax
    import jax.numpy as jnp

    from raybary.solvers import plans as pl

    J, L = len(ks), sum(ks)
    slots = pad_to or L
    index = np.concatenate([np.repeat(np.arange(J), ks), np.zeros(slots - L, int)])
    gmm_index = jnp.asarray(index, jnp.int32)
    comp = jnp.arange(slots) < L
    member = (gmm_index[None, :] == jnp.arange(J)[:, None]) & comp[None, :]
    cost = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (width, n, slots)), dtype)
    options = pl.PlanOptions(tol=0.0, max_iterations=iterations)
    eps = 1e-2

    @jax.jit
    def newton(c):
        def one(c):
            log_b = jnp.where(comp, jnp.log(1.0 / jnp.sum(member, axis=1)[gmm_index]), 0.0)
            geo = pl.plan_geometry(jnp.full((n,), -np.log(n), dtype), log_b.astype(dtype),
                                   gmm_index, member, jnp.ones(J, dtype), jnp.ones(n, bool))
            state = pl.init_state(c, jnp.zeros((J, n), dtype), jnp.zeros(slots, dtype),
                                  geo.log_a, gmm_index)
            loop = pl.newton_init(state, geo, eps, eps, options)
            loop = jax.lax.fori_loop(0, iterations, lambda _, s: pl.newton_step(s, geo, eps, options), loop)
            return loop.error
        return jax.vmap(one)(c)

    jax.block_until_ready(newton(cost))
    t = time.perf_counter()
    jax.block_until_ready(newton(cost))
    return (time.perf_counter() - t) / iterations / width * 1e6


def exact_shape_floor(problems, results, width: int = 256) -> float:
    """Microseconds per needed plan iteration if every problem ran at the bare
    Newton step of its own shape (no padding, no idle slots, no calls):
    ``sum_i iterations_i * newton_floor(K_i) / sum_i iterations_i``, with the
    floor measured once per (J, L) class (one representative K_j each)."""
    its = np.array([r.extra["plan_iterations"] for r in results], float)
    classes: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(problems):
        classes.setdefault((p.n_gmms, p.n_components), []).append(i)
    total = 0.0
    for idx in classes.values():
        ks = tuple(sorted(g.n_components for g in problems[idx[0]].gmms))
        total += its[idx].sum() * newton_floor(ks, width, iterations=100)
    return total / its.sum()


def run_case(name, problems, n, **kw):
    print(f"{name}: {len(problems)} problems ...", file=sys.stderr, flush=True)
    raybary.solve(problems, bar_size=n, **kw)  # compile these shapes
    stats: dict = {}
    c0 = os.times()
    t = time.perf_counter()
    results = raybary.solve(problems, bar_size=n, stats=stats, **kw)
    wall = time.perf_counter() - t
    cpu = os.times().user - c0.user
    return summarise(name, problems, results, wall, stats, cpu)


def summarise(name, problems, results, wall, stats, cpu=float("nan")):
    it = np.array([r.extra["plan_iterations"] for r in results], float)
    slot_it = stats.get("slot_blocks", 0) * stats.get("plan_block", 1)
    return {
        "case": name,
        "problems": len(problems),
        "rate": len(problems) / wall,
        "converged": float(np.mean([r.converged for r in results])),
        "it_mean": it.mean(),
        "it_p99": np.percentile(it, 99),
        "it_max": it.max(),
        "us_per_it": wall / it.sum() * 1e6,
        "idle": 1 - it.sum() / slot_it if slot_it else float("nan"),
        "cpu": cpu / wall,
        "results": results,
    }


def ott_rate(problems, count: int):
    import reference as ref

    rng = np.random.default_rng(0)
    fn = ref.ott_solve_fn(problems[0].dim, epsilon=0.1)
    inits = [shared_init(p, 6, rng) for p in problems[:count]]
    ref.ott_solve(problems[0], *inits[0], fn=fn)
    t = time.perf_counter()
    for p, i in zip(problems[:count], inits):
        ref.ott_solve(p, *i, fn=fn)
    return count / (time.perf_counter() - t)


def pot_gaps(problems, sample: int, **kw):
    """Exact MW2 gap (relative) of raybary vs POT's fixed point, same init."""
    import reference as ref

    rng = np.random.default_rng(1)
    probs = problems[:sample]
    inits = [shared_init(p, 6, rng) for p in probs]
    ours = raybary.solve(probs, bar_size=6, init=inits, **kw)
    gaps = []
    for p, i, r in zip(probs, inits, ours):
        pot = ref.exact_objective(p, *ref.pot_fixed_point(p, *[x.copy() for x in i]))
        mine = ref.exact_objective(p, r.weights, r.means, r.covs)
        gaps.append((mine - pot) / max(pot, 1e-12))
    return np.array(gaps)


def _digits(x: float, significant: int) -> str:
    """``x`` with at least ``significant`` significant digits, no exponent: 5.90, 89.8, 143."""
    if not np.isfinite(x) or x == 0:
        return f"{x:.0f}"
    decimals = max(0, significant - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def render_row(row: dict, newton_floor: float, jax_cache: str = "present",
               machine_floor: float | None = None) -> str:
    """One Markdown table row of a case (a :func:`summarise` dict); the
    ``/ machine floor`` cell only with ``machine_floor``."""
    label = LABELS.get(row["case"], row["case"]).format(jax_cache=jax_cache)
    converged = f"{math.floor(row['converged'] * 1000) / 10:g}%"
    its = " / ".join(f"{row[k]:,.0f}" for k in ("it_mean", "it_p99", "it_max"))
    ratios = f"{_digits(row['us_per_it'] / newton_floor, 2)}x | "
    if machine_floor is not None:
        ratios += f"{_digits(row['us_per_it'] / machine_floor, 2)}x | "
    return (f"| {label} | {row['problems']} | {row['rate']:,.0f} | {converged} | {its} | "
            f"{_digits(row['us_per_it'], 3)} us | {ratios}{row['idle']:.2f} |")


def render_docs(run: dict) -> str:
    """The Markdown that goes between the markers of docs/performance.md.

    ``run`` holds ``date`` (str), ``machine`` (str), ``rows`` (the
    :func:`summarise` dicts, the first at ``epsilon=0.1``), ``floors``
    (:func:`floors`), ``ott`` (problems/s, NaN if skipped), ``gaps`` (label ->
    array of relative gaps, may be empty), ``jax_cache`` ("present"/"empty").
    """
    fl = run["floors"]
    machine = fl.get("numba")
    lines = [f"_{run['date']}, {run['machine']}; float32; times after compilation unless "
             "marked; every row from the same run of `python benchmarks/bench_speed.py`._", "",
             "| case | problems | problems/s | converged | plan iterations per problem: "
             "mean / p99 / max | wall per needed iteration | / Newton-step floor | "
             + ("/ machine floor | " if machine else "") + "idle slot share |",
             "|---|---:|---:|---:|---|---:|---:|" + ("---:|" if machine else "") + "---:|"]
    lines += [render_row(r, fl["newton"], run.get("jax_cache", "present"), machine)
              for r in run["rows"]]
    text = "Same run: "
    if np.isfinite(run["ott"]):
        text += (f"OTT-JAX's jitted solver in a loop, {run['ott']:.1f} problems/s (raybary is "
                 f"{run['rows'][0]['rate'] / run['ott']:.0f}x faster at the same epsilon); ")
    text += (f"floors on a batch of 1024: a bare Newton step of the solver {fl['newton']:.2f} us "
             f"per problem, a plain log-domain Sinkhorn iteration (no masks, no schedule) "
             f"{fl['sinkhorn']:.2f} us; {machine_floor_text(fl)}.")
    if machine:
        text += (" The machine floor is the solver's Newton step written as a plain loop over "
                 "problems (`benchmarks/floor_numba.py`); `/ machine floor` divides by its "
                 "one-core time.")
    if "ragged_exact" in fl:
        text += (" The ragged mix's floor at its problems' own shapes (a bare Newton step of each "
                 "problem's own size, no padding, no idle slots), weighted by the iterations they "
                 f"needed: {fl['ragged_exact']:.2f} us per needed iteration, "
                 f"{fl['ragged_exact'] / fl['newton']:.1f}x the tutorial's.")
    if run["gaps"]:
        n = len(next(iter(run["gaps"].values())))
        parts = [f"{label.replace('epsilon=0.1', '`epsilon=0.1`').replace(', ', ' ')} median "
                 f"{np.median(g):.1e} (max {np.max(g):.1e})" for label, g in run["gaps"].items()]
        text += (" Exact MW2 objective (POT's `gmm_ot_loss`) relative to POT's exact fixed "
                 f"point from the same initialisation, {n} problems: {', '.join(parts)}.")
    return "\n".join(lines) + "\n\n" + text + "\n"


def split_docs(path: str | Path) -> tuple[str, str]:
    """The text of ``path`` before its ``bench_speed`` begin marker and from its end marker."""
    text = Path(path).read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: needs one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    return head, rest.split(END)[1]


def write_docs(path: str | Path, block: str) -> None:
    """Replace the text between the ``bench_speed`` markers of ``path`` by ``block``."""
    head, tail = split_docs(path)
    Path(path).write_text(f"{head}{BEGIN}\n{block}{END}{tail}", encoding="utf-8")


def print_floors(fl: dict) -> None:
    """The floors of :func:`floors`, one line each."""
    print(f"floor, same run, batch 1024: plain Sinkhorn iteration {fl['sinkhorn']:.2f} us/problem, "
          f"bare Newton step (XLA) {fl['newton']:.2f} us/problem")
    print(f"machine floor: {machine_floor_text(fl)}")


def machine() -> str:
    """Cores, platform, JAX version and backend, and the load when the run started."""
    import jax

    return (f"{os.cpu_count()} cores, {platform.platform()}, JAX {jax.__version__} "
            f"({jax.default_backend()} backend), load average {os.getloadavg()[0]:.1f} at start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=4096, help="tutorial problems per case")
    ap.add_argument("--ragged", type=int, default=1024, help="ragged problems (0: skip)")
    ap.add_argument("--sample", type=int, default=12, help="problems compared with POT (0: skip)")
    ap.add_argument("--ott", type=int, default=20, help="problems solved by OTT-JAX (0: skip)")
    ap.add_argument("--sinkhorn", action="store_true", help="also the old Sinkhorn plan solver")
    ap.add_argument("--exact-floor", action="store_true",
                    help="also the ragged mix's floor at its problems' own shapes (~100 small "
                         "compiles, a few minutes)")
    ap.add_argument("--floors-only", action="store_true",
                    help="measure and print the floors only (~30 s), no cases")
    ap.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, metavar="PATH",
                    help="write this run's table between the bench_speed markers of PATH "
                         f"(default {DOCS.relative_to(DOCS.parents[1])})")
    args = ap.parse_args()
    if args.floors_only:
        print(f"floors, batch 1024, {machine()}:", flush=True)
        print_floors(floors(1024))
        return
    if args.write_docs:
        split_docs(args.write_docs)  # a missing marker fails now, not after ten minutes
    cache = os.environ.get("RAYBARY_JAX_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "raybary", "jax"))
    jax_cache = "present" if os.path.isdir(cache) and any(os.scandir(cache)) else "empty"
    started, where = datetime.date.today().isoformat(), machine()

    tut = tutorial_problems(args.problems, seed=0)
    rows = [run_case("tutorial, epsilon=0.1", tut, 6, epsilon=0.1),
            run_case("tutorial, default epsilon", tut, 6)]
    if args.sinkhorn:
        old = SolverConfig(plan_solver="sinkhorn")
        k = min(args.problems, 1024)
        rows.append(run_case("tutorial, epsilon=0.1, Sinkhorn plans", tut[:k], 6, epsilon=0.1,
                             config=old))
    print("floors ...", file=sys.stderr, flush=True)
    fl = floors(1024)
    ott = ott_rate(tut, args.ott) if args.ott else float("nan")
    if args.ragged:
        rag, _ = random_columns(args.ragged, seed=2).to_problems()
        stats: dict = {}
        print("ragged mix, first call ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        first = raybary.solve(rag, bar_size=6, epsilon=0.1, stats=stats)
        first_wall = time.perf_counter() - t
        r = summarise("ragged mix, epsilon=0.1, first call (compiles)", rag, first, first_wall, stats)
        rows.append(r)
        rows.append(run_case("ragged mix, epsilon=0.1", rag, 6, epsilon=0.1))
        if args.exact_floor:
            print("ragged mix, floor at its own shapes ...", file=sys.stderr, flush=True)
            fl["ragged_exact"] = exact_shape_floor(rag, rows[-1]["results"])

    print()
    print_floors(fl)
    if "ragged_exact" in fl:
        print(f"ragged mix at its problems' own shapes: bare Newton step {fl['ragged_exact']:.2f} us "
              f"per needed iteration, {fl['ragged_exact'] / fl['newton']:.1f}x the tutorial's")
    if np.isfinite(ott):
        print(f"OTT-JAX (jitted, looped, epsilon=0.1): {ott:.1f} problems/s")
    machine_col = "numba" in fl
    print("\n| case | problems | problems/s | converged | iterations mean / p99 / max "
          "| wall per needed iteration | / Newton floor | "
          + ("/ machine floor | " if machine_col else "") + "idle slot share | CPU cores busy |")
    print("|---|---:|---:|---:|---|---:|---:|" + ("---:|" if machine_col else "") + "---:|---:|")
    for r in rows:
        ratio = f"{r['us_per_it'] / fl['newton']:.1f}x | "
        if machine_col:
            ratio += f"{r['us_per_it'] / fl['numba']:.1f}x | "
        print(f"| {r['case']} | {r['problems']} | {r['rate']:,.0f} | {r['converged']:.3f} | "
              f"{r['it_mean']:.0f} / {r['it_p99']:.0f} / {r['it_max']:.0f} | {r['us_per_it']:.2f} us | "
              f"{ratio}{r['idle']:.2f} | {r['cpu']:.2f} |")
    if not machine_col:
        print("(no / machine floor column: numba is not installed)")
    if np.isfinite(ott):
        print(f"\ntutorial at epsilon=0.1 against OTT-JAX in the same run: "
              f"{rows[0]['rate'] / ott:.0f}x")
    gaps = {}
    if args.sample:
        for label, kw in (("epsilon=0.1, float32", dict(epsilon=0.1)),
                          ("epsilon=0.1, float64", dict(epsilon=0.1, dtype="float64")),
                          ("default epsilon, float32", {})):
            g = gaps[label] = pot_gaps(tut, args.sample, **kw)
            print(f"exact MW2 gap vs POT's fixed point (same init, {len(g)} problems, {label}): "
                  f"median {np.median(g):.2e}, max {g.max():.2e}")
    if args.write_docs:
        write_docs(args.write_docs, render_docs(dict(
            date=started, machine=where, rows=rows, floors=fl, ott=ott, gaps=gaps,
            jax_cache=jax_cache)))
        print(f"\nwrote the table to {args.write_docs}", file=sys.stderr)


if __name__ == "__main__":
    main()
