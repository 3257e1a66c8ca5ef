"""GPU check of ``raybary.solve``: throughput at 2^14 ... 2^20 problems, and why.

Run on a machine with a GPU by ``bash benchmarks/gpu_check.sh`` (which puts
the repository on ``PYTHONPATH``, bounds the run to 8 minutes and keeps the
output), or directly; needs JAX and NumPy (pyarrow for the problem
generator), not Ray, Zarr or fsspec. On tutorial-family problems (J=3 GMMs of
2, 3 and 5 components, d=2, barycenters of n=6, ``epsilon=0.1``, float32) it
prints:

- the device, JAX's version and the engine's lane rule
  (:func:`raybary.batch.engine.lane_rule`), and the memory a problem takes;
- for each batch size ``2^k`` (``raybary.solve(problems, batch_size=2^k)``,
  one chunk): problems/s after compilation (JAX's compile events are timed
  and taken off), the engine's share (the device loop, transfers included)
  and the host's (validation, padding, results), the plan iterations per
  problem, the wall time per lane iteration and per needed problem-iteration,
  the host round trips (``run_batch`` calls) per lane iteration, the idle
  slot share, and the peak device memory;
- the XLA kernels (fusions, custom calls, copies... launched) per loop
  block, per update chunk and, estimated, per plan iteration, counted in the
  compiled HLO of ``run_batch`` (:func:`loop_kernels`);
- one correctness line: the objectives of the first problems against the
  same problems solved on JAX's CPU backend in the same run (and, unless
  ``--quick``, against float64 on the device).

Sizes stop early, saying why, when the next one would not fit the time
budget (``--budget-s``), the device's memory or the host's. Each size's
numbers are also printed as one ``RESULT {json}`` line; ``--json PATH``
writes them all. A CPU smoke test (what ``tests/test_gpu_check.py`` runs)::

    python benchmarks/gpu_check.py --sizes 10 11 --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The tutorial family as raybary.solve sees it: epsilon 0.1, bar size 6, float32.
EPSILON, BAR_SIZE, DTYPE = 0.1, 6, "float32"
CHECK_TOLERANCE = 1e-3  # relative objective difference counted as a mismatch
CHECK_MISMATCH_SHARE = 0.01  # ... allowed in this share of the checked problems
CHECK_MEDIAN = 1e-5  # and the median relative difference at most this
F64_MEDIAN, F64_MISMATCH_SHARE = 1e-4, 0.05  # the same against float64 (float32's tolerances)

# ----------------------------------------------------------------------------
# Kernels per loop iteration, from the compiled HLO text.

#: HLO opcodes that launch nothing themselves (views, tuples, control flow:
#: the computations of ``while``, ``conditional`` and ``call`` are counted).
NO_KERNEL = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain",
    "while", "conditional", "call", "get-dimension-size", "copy-done", "send-done",
    "recv-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
})
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_COMPUTATION = r"%?([\w.\-]+)"


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str]]], str | None]:
    """The computations of an HLO module's text: name -> its instructions as
    ``(opcode, rest of the line)``; and the entry computation's name."""
    computations: dict[str, list[tuple[str, str]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith((" ", "HloModule")):
                current = computations.setdefault(m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        op = _opcode(line)
        if op is not None:
            current.append(op)
    return computations, entry


def _opcode(line: str) -> tuple[str, str] | None:
    """``(opcode, rest)`` of one instruction line (``%x = TYPE opcode(...), ...``)."""
    _, eq, rhs = line.partition("=")
    if not eq:
        return None
    rhs = rhs.lstrip()
    if rhs.startswith("("):  # a tuple type: skip its balanced parentheses
        depth = 0
        for i, c in enumerate(rhs):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                rhs = rhs[i + 1:].lstrip()
                break
    else:
        rhs = rhs.partition(" ")[2]
    m = re.match(r"([\w\-]+)\(", rhs)
    return (m.group(1), rhs[m.end():]) if m else None


def _attr(rest: str, name: str) -> list[str]:
    m = re.search(name + r"=\{([^}]*)\}", rest)
    if m:
        return [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
    m = re.search(name + "=" + _COMPUTATION, rest)
    return [m.group(1)] if m else []


def _trip_count(rest: str) -> int | None:
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', rest)
    return int(m.group(1)) if m else None


def count_kernels(computations, name: str, dynamic: list[int] | None = None,
                  depth: int = 0) -> int:
    """Kernels one run of computation ``name`` launches: every instruction
    but those of :data:`NO_KERNEL`; a ``while`` counts its condition and
    body times its known trip count (one condition when the trip count is
    not known: its per-trip kernels are appended to ``dynamic``); a
    ``conditional`` its largest branch; a ``call`` its computation."""
    if depth > 50 or name not in computations:
        return 0
    total = 0
    for op, rest in computations[name]:
        if op == "while":
            [cond] = _attr(rest, "condition") or [""]
            [body] = _attr(rest, "body") or [""]
            trip = _trip_count(rest)
            c = count_kernels(computations, cond, dynamic, depth + 1)
            b = count_kernels(computations, body, dynamic, depth + 1)
            if trip is None:
                total += c
                if dynamic is not None:
                    dynamic.append(b + c)
            else:
                total += trip * (b + c) + c
        elif op == "conditional":
            branches = (_attr(rest, "branch_computations")
                        or _attr(rest, "true_computation") + _attr(rest, "false_computation"))
            total += max((count_kernels(computations, b, dynamic, depth + 1)
                          for b in branches), default=0)
        elif op == "call":
            for callee in _attr(rest, "to_apply"):
                total += count_kernels(computations, callee, dynamic, depth + 1)
        elif op not in NO_KERNEL:
            total += 1
    return total


def loop_kernels(text: str) -> dict:
    """Kernels of ``run_batch``'s main loop from its compiled HLO text.

    ``block``: kernels per loop block (its condition and body, inner loops
    of known trip count included, an inner loop of unknown trip count
    counted by its condition only); ``update_chunk``: kernels per trip of
    the inner loop of unknown trip count (``run_batch``'s barycenter update
    chunks, 0 to ``UPDATE_CHUNKS / UPDATE_DIVISOR`` per block); ``per_call``:
    the kernels outside the loop, once per call. The main loop is the entry
    computation's ``while`` with the most kernels.
    """
    computations, entry = parse_hlo(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    loops = []
    outside = 0
    for op, rest in computations[entry]:
        if op == "while":
            dynamic: list[int] = []
            [cond] = _attr(rest, "condition") or [""]
            [body] = _attr(rest, "body") or [""]
            block = (count_kernels(computations, body, dynamic)
                     + count_kernels(computations, cond, dynamic))
            loops.append((block, dynamic))
        elif op not in NO_KERNEL:
            outside += 1
    if not loops:
        raise ValueError("no while loop in the entry computation")
    block, dynamic = max(loops, key=lambda x: x[0])
    return {"block": block, "update_chunk": max(dynamic, default=0),
            "dynamic_loops": len(dynamic), "per_call": outside,
            "instructions": sum(len(v) for v in computations.values())}


# ----------------------------------------------------------------------------
# The measurements.


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (its monitoring
    events), in all and per function (``fun_name``, where JAX gives it)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax.monitoring

        self.total = 0.0
        self.by_function: dict[str, float] = defaultdict(float)
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, *args, **kwargs):
        if event in self.EVENTS:
            self.total += duration
            name = str(kwargs.get("fun_name", "?"))
            self.by_function[re.sub(r"^jit_?", "", re.sub(r"[()]", "", name))] += duration
            self.compiles += event == self.EVENTS[-1]

    def snapshot(self) -> tuple[float, dict, int]:
        return self.total, dict(self.by_function), self.compiles

    def since(self, snap) -> tuple[float, dict, int]:
        total, by, count = snap
        return (self.total - total,
                {k: v - by.get(k, 0.0) for k, v in self.by_function.items()
                 if v - by.get(k, 0.0) > 0}, self.compiles - count)


def timed_engine(**kwargs):
    """A :class:`raybary.Engine` that also times its ``solve_arrays`` calls
    (``engine.seconds``)."""
    from raybary.batch.engine import Engine

    class TimedEngine(Engine):
        seconds = 0.0

        def solve_arrays(self, *args, **kw):
            started = time.perf_counter()
            try:
                return super().solve_arrays(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - started

    return TimedEngine(**kwargs)


class Problems:
    """Tutorial-family problems 0..n-1, generated once and extended as needed."""

    def __init__(self, seed: int = 0):
        self.seed, self.items, self.seconds = seed, [], 0.0

    def first(self, n: int) -> list:
        from raybary.storage.generate import tutorial_columns

        if n > len(self.items):
            started = time.perf_counter()
            problems, errors = tutorial_columns(n - len(self.items), seed=self.seed,
                                                start=len(self.items)).to_problems()
            if any(e is not None for e in errors):
                raise RuntimeError(f"the generator made invalid problems: {errors[:3]}")
            self.items.extend(problems)
            self.seconds += time.perf_counter() - started
        return self.items[:n]


def sizes_of(problems, dtype: str = DTYPE) -> dict:
    """Bytes per problem of the padded problem and of the solver's state,
    from the solver's own shapes (``jax.eval_shape``, nothing runs)."""
    import jax

    from raybary.batch.padding import bucket_of, pad_problems
    from raybary.options import SolverOptions
    from raybary.solvers import barycenter as bc

    p = problems[0]
    arrays, _ = pad_problems([p], [BAR_SIZE], bucket_of(p, BAR_SIZE), 1, epsilons=[EPSILON],
                             relative_epsilon=False, inits=[None], keys=np.zeros((1, 2), np.uint32),
                             dtype=np.dtype(dtype))
    config = SolverOptions.build(bar_size=BAR_SIZE, epsilon=EPSILON, dtype=dtype).config()
    batch = bc.PaddedProblem(**arrays)
    state = jax.eval_shape(lambda b: bc.init_batch(b, config), batch)
    out = jax.eval_shape(bc.finish_batch, state, batch)

    def nbytes(tree):
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree))

    return {"problem": nbytes(batch), "state": nbytes(state), "output": nbytes(out),
            "arrays": arrays, "config": config}


def memory_estimate(n: int, sizes: dict, slots: int) -> dict:
    """Bytes a solve of ``n`` problems needs, roughly: on the device, the
    padded batch, its states and outputs (``finish_batch`` runs on the
    whole batch) and one lane's working copy; on the host, the initial and
    final states, the padded arrays, and the Problem and Result objects
    (about 2 KB each, measured on CPython)."""
    lane = min(n, slots)
    device = n * (sizes["problem"] + sizes["state"] + sizes["output"]) + 3 * lane * (
        sizes["problem"] + sizes["state"])
    host = n * (2 * sizes["state"] + 3 * sizes["problem"] + 4096)
    return {"device": device, "host": host}


def device_memory(device) -> dict:
    """``memory_stats`` of a device (GPU: bytes_limit, peak_bytes_in_use...), or {}."""
    try:
        return dict(device.memory_stats() or {})
    except Exception:  # noqa: BLE001  (CPU devices have none)
        return {}


def host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_size(n: int, problems: Problems, engine, clock: CompileClock, batch_size: int) -> dict:
    """Solve the first ``n`` problems in one ``raybary.solve`` call; its numbers."""
    import raybary

    items = problems.first(n)
    stats: dict = {}
    snap = clock.snapshot()
    engine_before = engine.seconds
    started = time.perf_counter()
    results = raybary.solve(items, bar_size=BAR_SIZE, epsilon=EPSILON, dtype=DTYPE,
                            batch_size=batch_size, stats=stats, engine=engine)
    wall = time.perf_counter() - started
    compile_s, by_function, compiles = clock.since(snap)
    engine_s = engine.seconds - engine_before
    plan = np.array([r.extra["plan_iterations"] for r in results], np.int64)
    outer = np.array([r.iterations for r in results], np.int64)
    converged = float(np.mean([r.converged for r in results]))
    failed = sum(r.status != "ok" for r in results)
    objectives = np.array([r.objective for r in results])
    needed = int(plan.sum())
    plan_block = int(stats["plan_block"])
    lane_iterations = int(stats["blocks"]) * plan_block
    run_compile = sum(v for k, v in by_function.items() if "run_batch" in k)
    run_s = max(float(stats["run_seconds"]) - run_compile, 1e-9)
    solve_s = max(wall - compile_s, 1e-9)
    device_s = max(engine_s - compile_s, 1e-9)
    width = min(n, engine.slots)
    # update chunks per block, estimated: a full lane updates width * outer / plan
    # iterations problems per plan iteration, in chunks of width / 32, at most 8
    from raybary.solvers import barycenter as bc

    chunks = min(bc.UPDATE_CHUNKS // bc.UPDATE_DIVISOR,
                 bc.UPDATE_CHUNKS * plan_block * outer.mean() / max(plan.mean(), 1.0))
    return {
        "size_log2": int(round(math.log2(n))), "problems": n, "lane_slots": width,
        "wall_s": wall, "compile_s": compile_s, "compile_events": compiles,
        "compile_by_function": {k: round(v, 3) for k, v in by_function.items()},
        "engine_s": engine_s, "run_batch_s": run_s, "host_s": wall - engine_s,
        "problems_per_s": n / solve_s, "engine_problems_per_s": n / device_s,
        "plan_iterations_mean": float(plan.mean()),
        "plan_iterations_p99": float(np.percentile(plan, 99)),
        "plan_iterations_max": int(plan.max()), "outer_iterations_mean": float(outer.mean()),
        "converged": converged, "failed": int(failed),
        "objective_finite": bool(np.all(np.isfinite(objectives))),
        "calls": int(stats["calls"]), "blocks": int(stats["blocks"]),
        "plan_block": plan_block, "lane_iterations": lane_iterations,
        "slot_blocks": int(stats["slot_blocks"]),
        "idle_share": 1.0 - needed / max(int(stats["slot_blocks"]) * plan_block, 1),
        "wall_per_lane_iteration_us": run_s / max(lane_iterations, 1) * 1e6,
        "wall_per_needed_iteration_us": solve_s / max(plan.mean(), 1e-9) * 1e6,
        "wall_per_problem_iteration_us": solve_s / max(needed, 1) * 1e6,
        "engine_per_problem_iteration_us": device_s / max(needed, 1) * 1e6,
        "round_trips_per_lane_iteration": int(stats["calls"]) / max(lane_iterations, 1),
        "round_trips_per_1k_problem_iterations": int(stats["calls"]) / max(needed, 1) * 1e3,
        "update_chunks_per_block_est": float(chunks),
        "results": results,
    }


def kernel_counts(sizes: dict, width: int) -> dict:
    """:func:`loop_kernels` of ``run_batch`` at ``width`` slots, for the
    tutorial's shape and config (the program the solve ran: JAX's caches
    make this lowering and compile free after it)."""
    import jax

    from raybary.solvers import barycenter as bc

    def wide(x):
        return jax.ShapeDtypeStruct((width,) + tuple(x.shape[1:]), x.dtype)

    config = sizes["config"]
    with jax.enable_x64(False):
        batch = jax.tree_util.tree_map(wide, bc.PaddedProblem(**sizes["arrays"]))
        state = jax.eval_shape(lambda b: bc.init_batch(b, config), batch)
        text = bc.run_batch.lower(state, batch, 4, config).compile().as_text()
    return loop_kernels(text)


def reference_objectives(items, *, backend: str | None, dtype: str) -> np.ndarray:
    """Objectives of ``items`` solved on JAX's ``backend`` (``None``: the
    default device) in ``dtype``, by an engine of its own with the CPU's
    lane rule on the CPU."""
    import jax

    import raybary
    from raybary.batch.engine import CPU_LANES, Engine

    if backend is None:
        results = raybary.solve(items, bar_size=BAR_SIZE, epsilon=EPSILON, dtype=dtype,
                                batch_size=len(items), engine=Engine())
    else:
        with jax.default_device(jax.devices(backend)[0]):
            results = raybary.solve(items, bar_size=BAR_SIZE, epsilon=EPSILON, dtype=dtype,
                                    batch_size=len(items), engine=Engine(lanes=CPU_LANES))
    return np.array([r.objective for r in results])


def compare(measured: np.ndarray, reference: np.ndarray, *, median: float = CHECK_MEDIAN,
            share: float = CHECK_MISMATCH_SHARE) -> dict:
    """Relative differences of objectives; ``ok`` when their median is at
    most ``median`` and at most ``share`` of them exceed :data:`CHECK_TOLERANCE`."""
    rel = np.abs(measured - reference) / np.maximum(np.abs(reference), 1e-30)
    rel = np.where(np.isfinite(rel), rel, np.inf)
    mismatched = int(np.sum(rel > CHECK_TOLERANCE))
    ok = float(np.median(rel)) <= median and mismatched <= share * len(rel)
    return {"problems": len(rel), "median": float(np.median(rel)),
            "p99": float(np.percentile(rel, 99)), "max": float(np.max(rel)),
            "mismatched": mismatched, "ok": bool(ok), "ok_median": median, "ok_share": share}


def correctness(results, problems: Problems, count: int, backend: str, say) -> dict:
    """The CHECK line: the objectives of the first ``count`` of ``results``
    against the same problems solved on JAX's CPU backend (float32; where
    there is none, float64 on the device, 64 problems)."""
    started = time.perf_counter()
    measured = np.array([x.objective for x in results[:count]])
    try:
        ref = reference_objectives(problems.first(count), backend="cpu", dtype=DTYPE)
        check = compare(measured, ref)
        check["reference"] = "cpu backend, float32"
    except Exception as e:  # noqa: BLE001  (no CPU backend: float64 on the device)
        say(f"(no CPU reference: {type(e).__name__}: {e}; float64 on the device instead)")
        ref = reference_objectives(problems.first(min(count, 64)), backend=None, dtype="float64")
        # float32 against float64 differs by float32's tolerances (median ~2e-5 on a CPU)
        check = compare(measured[:len(ref)], ref, median=F64_MEDIAN, share=F64_MISMATCH_SHARE)
        check["reference"] = "float64 on the device"
    check["seconds"] = time.perf_counter() - started
    same = " (the measured device is the CPU too)" if backend == "cpu" else ""
    say(f"CHECK {'OK' if check['ok'] else 'MISMATCH'}: objectives of the first "
        f"{check['problems']} problems against the {check['reference']}{same}: relative "
        f"difference median {check['median']:.1e}, p99 {check['p99']:.1e}, max "
        f"{check['max']:.1e}; {check['mismatched']} above {CHECK_TOLERANCE:g} (OK: median <= "
        f"{check['ok_median']:g} and at most {100 * check['ok_share']:g}% above; took "
        f"{check['seconds']:.1f} s)")
    return check


# ----------------------------------------------------------------------------
# Output.


class Printer:
    """Prints and flushes (the shell script tees it to a file)."""

    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB" if x < 2**30 else f"{x / 2**30:,.2f} GiB"


def describe_size(r: dict) -> list[str]:
    k = r["size_log2"]
    return [
        f"2^{k} = {r['problems']:,} problems (lane of {r['lane_slots']:,} slots): "
        f"{r['problems_per_s']:,.0f} problems/s after compilation "
        f"(solve {r['wall_s']:.1f} s, of which compiling {r['compile_s']:.1f} s in "
        f"{r['compile_events']} compile events; engine {r['engine_problems_per_s']:,.0f} problems/s)",
        f"  time: engine {r['engine_s'] - r['compile_s']:.2f} s after compiles (run_batch calls "
        f"{r['run_batch_s']:.2f} s, transfers included), host {r['host_s']:.2f} s "
        f"(validation, padding, results)",
        f"  plan iterations per problem: mean {r['plan_iterations_mean']:.1f}, "
        f"p99 {r['plan_iterations_p99']:.0f}, max {r['plan_iterations_max']}; outer "
        f"iterations mean {r['outer_iterations_mean']:.1f}; converged "
        f"{100 * r['converged']:.1f}%, failed {r['failed']}",
        f"  wall per needed iteration {r['wall_per_needed_iteration_us']:,.1f} us "
        f"(solve after compiles / mean plan iterations); per problem-iteration "
        f"{r['wall_per_problem_iteration_us']:.4f} us (engine "
        f"{r['engine_per_problem_iteration_us']:.4f} us); per lane iteration "
        f"{r['wall_per_lane_iteration_us']:,.1f} us (run_batch time / "
        f"{r['lane_iterations']:,} lane iterations)",
        f"  host round trips: {r['calls']} run_batch calls, "
        f"{r['round_trips_per_lane_iteration']:.4f} per lane iteration "
        f"(1 per {1 / max(r['round_trips_per_lane_iteration'], 1e-12):.0f}), "
        f"{r['round_trips_per_1k_problem_iterations']:.5f} per 1,000 problem-iterations; "
        f"idle slot share {r['idle_share']:.2f}",
    ]


MW2_RESERVE_S = 45  # of the budget, kept for mw2_section


def mw2_section(n: int, say) -> dict | None:
    """``mw2_batch``'s engine (checks and solve) on ``n`` tutorial-sized pairs
    (d = 2, K 2 to 5; benchmarks/bench_mw2_speed.py's): a first call compiles,
    the second is timed. ``None`` if interrupted (the time limit)."""
    from bench_mw2_speed import raybary_run, tutorial_pairs

    try:
        pairs = tutorial_pairs(n, seed=0)
        first = raybary_run(pairs, workers=None)
        r = raybary_run(pairs, workers=None)
    except KeyboardInterrupt:
        say("mw2: interrupted (time limit)")
        return None
    out = {"pairs": n, "pairs_per_s": n / r["wall"], "wall_s": r["wall"],
           "first_call_s": first["wall"], "plan_iterations_mean": float(r["iterations"]),
           "converged": float(r["converged"])}
    say(f"mw2: {n} tutorial-sized pairs in {r['wall']:.2f} s = {out['pairs_per_s']:,.0f} "
        f"pairs/s (first call, compiling: {first['wall']:.1f} s); plan iterations "
        f"{out['plan_iterations_mean']:.1f}; converged {out['converged']:.4f}")
    say("MW2 " + json.dumps(out))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run on a GPU machine as `bash benchmarks/gpu_check.sh` (same options).")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(range(14, 21)),
                        metavar="K", help="batch sizes as powers of two, 2^K problems each, "
                        "solved in one raybary.solve call with batch_size=2^K "
                        "(default: 14 15 ... 20)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop before a size predicted to end past this many seconds "
                        "from the start (default: 420; 240 with --quick)")
    parser.add_argument("--check", type=int, default=1024, metavar="N",
                        help="problems in the correctness check: the first N of the first "
                        "size, solved again on JAX's CPU backend (default: 1024)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test (CPU-sized): a 240 s budget and no float64 check")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems (default 0)")
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON here")
    parser.add_argument("--mw2-pairs", type=int, default=None, metavar="N",
                        help="also time raybary's MW2 distances (mw2_batch's engine) on N "
                        "tutorial-sized pairs, last; MW2_RESERVE_S of the budget is kept for "
                        "it (default: 65536; 512 with --quick; 0: skip)")
    args = parser.parse_args(argv)
    if args.mw2_pairs is None:
        args.mw2_pairs = 512 if args.quick else 65536
    budget = args.budget_s if args.budget_s is not None else (240.0 if args.quick else 420.0)
    sizes_log2 = sorted(set(args.sizes))
    if not sizes_log2 or min(sizes_log2) < 7 or max(sizes_log2) > 24:
        parser.error("--sizes: powers between 7 and 24")
    say = Printer()

    import jax

    import raybary
    from raybary.batch.engine import lane_rule
    from raybary.solvers import barycenter as bc

    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = "?"

    device = jax.devices()[0]
    backend = jax.default_backend()
    say(f"raybary GPU check, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"host {platform.node()} ({os.cpu_count()} cores, {platform.platform()}), "
        f"Python {platform.python_version()}",
        f"device: {jax.devices()} (backend {backend}, {getattr(device, 'device_kind', '?')}); "
        f"JAX {jax.__version__}, jaxlib {jaxlib_version}; "
        f"raybary {raybary.__version__} from {Path(raybary.__file__).parent}")
    if backend == "cpu":
        say("WARNING: JAX sees no GPU (backend cpu): the numbers below are CPU numbers")
    clock = CompileClock()
    engine = timed_engine()
    engine.setup()
    say(f"engine: {engine.lanes} (lane_rule({backend!r}): {lane_rule(backend) == engine.lanes}); "
        f"JAX compilation cache {jax.config.jax_compilation_cache_dir or 'off'}")
    problems = Problems(args.seed)
    sizes = sizes_of(problems.first(1))
    limit = device_memory(device).get("bytes_limit")
    biggest = memory_estimate(1 << max(sizes_log2), sizes, engine.slots)
    say(f"problems: tutorial family (J=3, K=2,3,5, d=2), bar size {BAR_SIZE}, "
        f"epsilon={EPSILON}, {DTYPE}; per problem: padded problem {sizes['problem']:,} B, "
        f"solver state {sizes['state']:,} B, output {sizes['output']:,} B",
        f"memory estimate at 2^{max(sizes_log2)}: device {_mb(biggest['device'])} "
        f"(limit {_mb(limit) if limit else 'unknown'}), host {_mb(biggest['host'])} "
        f"(available {_mb(host_available() or 0)})")

    run: dict = {"device": str(jax.devices()), "backend": backend, "jax": jax.__version__,
                 "lanes": str(engine.lanes), "sizes": [], "check": None, "kernels": None,
                 "stopped": None}
    previous = None
    for k in sizes_log2:
        n = 1 << k
        left = budget - say.elapsed() - (MW2_RESERVE_S if args.mw2_pairs else 0)
        reason = None
        if previous is not None:
            scale = n / previous["problems"]
            predicted = (scale * (previous["wall_s"] - previous["compile_s"])
                         + previous["compile_s"] + 1.2 * scale * previous["generate_s"])
            if predicted > left:
                reason = (f"2^{k} would take about {predicted:.0f} s "
                          f"(2^{previous['size_log2']} took "
                          f"{previous['wall_s']:.0f} s, {previous['compile_s']:.0f} s of it "
                          f"compiling), {max(left, 0):.0f} s are left of the {budget:.0f} s budget")
        need = memory_estimate(n, sizes, engine.slots)
        available = host_available()
        if reason is None and limit and need["device"] > 0.9 * limit:
            reason = (f"2^{k} needs about {_mb(need['device'])} of device memory, "
                      f"the device has {_mb(limit)}")
        if reason is None and available and need["host"] > 0.8 * available:
            reason = (f"2^{k} needs about {_mb(need['host'])} of host memory, "
                      f"{_mb(available)} are available")
        if reason is not None:
            say(f"STOP before 2^{k}: {reason}")
            run["stopped"] = reason
            break
        generated = problems.seconds
        problems.first(n)
        try:
            r = run_size(n, problems, engine, clock, n)
        except KeyboardInterrupt:  # the shell script's hard time limit
            run["stopped"] = f"interrupted during 2^{k} (time limit)"
            say(f"STOP at 2^{k}: {run['stopped']}")
            break
        except Exception as e:  # noqa: BLE001  (out of memory: say so, keep what was measured)
            text = f"{type(e).__name__}: {str(e)[:400]}"
            memory = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "OOM",
                                             "out of memory", "MemoryError"))
            run["stopped"] = f"2^{k} failed ({'memory' if memory else 'error'}): {text}"
            if not memory:
                traceback.print_exc()
            say(f"STOP at 2^{k}: {run['stopped']}")
            break
        r["generate_s"] = problems.seconds - generated
        stats = device_memory(device)
        r["device_peak_bytes"] = stats.get("peak_bytes_in_use")
        r["host_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results = r.pop("results")
        say(*describe_size(r))
        say(f"  memory: device peak {_mb(r['device_peak_bytes']) if r['device_peak_bytes'] else 'n/a'}"
            f", host max RSS {_mb(r['host_max_rss_bytes'])}; generating the problems took "
            f"{r['generate_s']:.1f} s (not in the solve's time)")
        if run["kernels"] is None:
            started = time.perf_counter()
            try:
                kernels = kernel_counts(sizes, r["lane_slots"])
                kernels["seconds"] = time.perf_counter() - started
            except Exception as e:  # noqa: BLE001  (an HLO this parser does not know)
                kernels = {"error": f"{type(e).__name__}: {e}"}
            kernels["width"] = r["lane_slots"]
            run["kernels"] = kernels
            if "error" in kernels:
                say(f"kernels: not counted ({kernels['error']})")
            else:
                per_iteration = ((kernels["block"] + r["update_chunks_per_block_est"]
                                  * kernels["update_chunk"]) / r["plan_block"])
                kernels["per_plan_iteration_est"] = per_iteration
                say(f"kernels (compiled HLO of run_batch, {kernels['width']:,} slots): "
                    f"{kernels['block']} per loop block of {r['plan_block']} plan iterations "
                    f"(with no barycenter update), +{kernels['update_chunk']} per update chunk "
                    f"(0-{bc.UPDATE_CHUNKS // bc.UPDATE_DIVISOR} a block; about {r['update_chunks_per_block_est']:.1f} here), "
                    f"{kernels['per_call']} per call outside the loop: about "
                    f"{per_iteration:.0f} kernels per plan iteration (counted in "
                    f"{kernels['seconds']:.1f} s)")
        say("RESULT " + json.dumps({**r, "kernels_per_plan_iteration_est":
                                    (run["kernels"] or {}).get("per_plan_iteration_est")}))
        run["sizes"].append(r)
        if run["check"] is None:
            try:
                run["check"] = correctness(results, problems, min(args.check, n), backend, say)
            except KeyboardInterrupt:
                run["stopped"] = "interrupted during the correctness check (time limit)"
                say(f"STOP: {run['stopped']}")
                break
        del results
        previous = r
    if not args.quick and run["sizes"]:
        if budget - say.elapsed() > 60:
            count = 64
            try:
                ref = reference_objectives(problems.first(count), backend=None, dtype="float64")
                mine = reference_objectives(problems.first(count), backend=None, dtype=DTYPE)
                f64 = compare(mine, ref, median=F64_MEDIAN, share=F64_MISMATCH_SHARE)
                run["float64"] = f64
                say(f"float64: objectives of the first {count} problems in {DTYPE} against "
                    f"float64, both on {backend}: relative difference median "
                    f"{f64['median']:.1e}, max {f64['max']:.1e} (float32's own accuracy; "
                    f"{'as expected' if f64['ok'] else 'WORSE than on a CPU'}: median <= "
                    f"{F64_MEDIAN:g} expected)")
            except KeyboardInterrupt:
                say("float64: interrupted (time limit)")
        else:
            say("float64: skipped (less than 60 s left of the budget)")
    if args.mw2_pairs:
        run["mw2"] = mw2_section(args.mw2_pairs, say)
    say("", "summary (problems/s after compilation; us per needed iteration; round trips "
        "per lane iteration):")
    for r in run["sizes"]:
        say(f"  2^{r['size_log2']}: {r['problems_per_s']:>12,.0f} problems/s  engine "
            f"{r['engine_problems_per_s']:>12,.0f}/s  plan iterations {r['plan_iterations_mean']:6.1f}"
            f"  {r['wall_per_needed_iteration_us']:>10,.1f} us/iteration  "
            f"{r['wall_per_problem_iteration_us']:.4f} us/problem-iteration  "
            f"round trips {r['round_trips_per_lane_iteration']:.4f}")
    if run["kernels"] and "per_plan_iteration_est" in run["kernels"]:
        say(f"  kernels per plan iteration: about {run['kernels']['per_plan_iteration_est']:.0f}")
    if run.get("mw2"):
        say(f"  mw2: {run['mw2']['pairs_per_s']:,.0f} pairs/s ({run['mw2']['pairs']} pairs)")
    if run["check"]:
        say(f"  check: {'OK' if run['check']['ok'] else 'MISMATCH'}")
    if run["stopped"]:
        say(f"  stopped: {run['stopped']}")
    say(f"done in {say.elapsed():.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1, default=str))
    return 0 if run["check"] is None or run["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
