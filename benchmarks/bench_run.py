"""End-to-end benchmark of ``raybary run`` against the solver alone.

Generates tutorial-sized problems (Parquet and Zarr, same seed) under a
scratch directory, runs ``python -m raybary run`` on each (embedded local Ray,
50x50 grids) and ``raybary.solve`` in a separate process on the same problems,
and prints a table: problems/s and its share of the solver-only ceiling (the
larger of one process solving with a lane per core and two one-lane processes
solving halves at once, measured in the same run), wall time, time to the
first committed shard, driver and actor peak RSS, the actors' time by step,
and, as the run grows (at 10%, 50% and 100% of its problems), problems/s so
far and memory (the run report's ``milestones``).

    python benchmarks/bench_run.py --problems 100000            # the issue's size
    python benchmarks/bench_run.py --problems 4000 --actors 1 2  # quick, compare actor counts

Every run is a separate process, so peak RSS is per process; the JAX
compilation cache is warmed first (one small run) so no run pays for a cold
compile that the others do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SOLVER_ALONE = r"""
import json, resource, sys, time
import raybary
from raybary.batch.api import configure_jax
from raybary.storage import open_store
configure_jax()
url, bar_size, shard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lo, hi = int(sys.argv[4]), int(sys.argv[5])
store = open_store(url)
hi = min(hi, store.n_problems)
t_read = time.perf_counter()
problems = [p for i in range(lo, hi, shard)
            for p in store.read(i, min(i + shard, hi)).problems]
t0 = time.perf_counter()
raybary.solve(problems[:shard], bar_size=bar_size, validate=False)   # compile / cache load
t1 = time.perf_counter()
out = []
for i in range(0, len(problems), shard):   # same batches as the runner's shards
    out += raybary.solve(problems[i:i + shard], bar_size=bar_size, validate=False)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"n": len(out), "read_s": t0 - t_read, "warmup_s": t1 - t0,
      "solve_s": t2 - t1, "ok": sum(r.status == "ok" for r in out), "start": t1, "end": t2,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def run_job(inp: str, out: str, args, actors: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "raybary", "run", inp, out, "--bar-size", str(args.bar_size),
           "--grid", args.grid, "--shard-size", str(args.shard_size), "--actors", str(actors),
           "--cpus-per-actor", str(args.cpus_per_actor), "--json", "-q"]
    t0 = time.perf_counter()
    p = sh(cmd)
    wall = time.perf_counter() - t0
    rep = json.loads(p.stdout)
    rep["process_wall_s"] = wall
    return rep


def _solver_cmd(inp: str, args, lo: int, hi: int) -> list[str]:
    return [sys.executable, "-c", SOLVER_ALONE, inp, str(args.bar_size), str(args.shard_size),
            str(lo), str(hi)]


def _result(stdout: str) -> dict:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def solver_alone(inp: str, args) -> dict:
    """``raybary.solve`` in one process (a lane per core) on the whole store."""
    p = sh(_solver_cmd(inp, args, 0, args.problems), env={**os.environ, "JAX_PLATFORMS": "cpu"})
    out = _result(p.stdout)
    out["problems_per_s"] = out["n"] / out["solve_s"]
    return out


def solver_pair(inp: str, args) -> dict:
    """Two processes of one lane each, solving the two halves of the store at once:
    problems/s from the later start of solving to the later end (both busy)."""
    half = args.problems // 2
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RAYBARY_SOLVER_THREADS": "1"}
    procs = [subprocess.Popen(_solver_cmd(inp, args, lo, hi), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for lo, hi in ((0, half), (half, args.problems))]
    outs = [_result(p.communicate()[0]) for p in procs]
    span = max(o["end"] for o in outs) - max(o["start"] for o in outs)
    n = sum(o["n"] for o in outs)
    return {"n": n, "solve_s": span, "problems_per_s": n / span,
            "per_process": [o["n"] / o["solve_s"] for o in outs]}


def _row(fmt: str, actors: int, rep: dict, base: dict | None) -> dict:
    steps = rep["step_seconds"]
    row = {
        "format": fmt, "actors": actors, "problems": rep["problems_run"],
        "wall_s": rep["wall_s"], "process_wall_s": rep["process_wall_s"],
        "problems_per_s": rep["problems_per_s"],
        "first_shard_s": rep["time_to_first_shard_s"],
        "driver_peak_rss_mb": rep["driver_peak_rss_mb"],
        "actor_peak_rss_mb": rep["actor_peak_rss_mb"],
        "actor_read_s": steps["read_s"], "actor_solve_s": steps["solve_s"],
        "actor_grid_s": steps["grid_s"], "actor_commit_s": steps["commit_s"],
        "counts": rep["counts"], "milestones": rep.get("milestones", []),
    }
    if base:
        row["of_ceiling"] = rep["problems_per_s"] / base["problems_per_s"]
    return row


def _print_tables(args, base: dict | None, rows: list[dict]) -> None:
    print(f"\n{args.problems} tutorial problems, bar size {args.bar_size}, grid {args.grid}, "
          f"shards of {args.shard_size}, {args.cpus_per_actor:g} CPU per actor, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    if base:
        solo, pair = base["one_process"], base["two_processes"]
        print(f"solver-only ceiling: {base['problems_per_s']:.1f} problems/s (one process, a lane "
              f"per core: {solo['problems_per_s']:.1f}; two one-lane processes at once: "
              f"{pair['problems_per_s']:.1f})")
    print("| input | actors | problems/s | of the ceiling | wall s | first shard s | driver RSS MB "
          "| actor RSS MB | actor read/solve/grid/commit s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['of_ceiling']:.2f}" if "of_ceiling" in r else "-"
        print(f"| {r['format']} | {r['actors']} | {r['problems_per_s']:.1f} | {ratio} | "
              f"{r['wall_s']:.1f} | {r['first_shard_s']:.1f} | {r['driver_peak_rss_mb']:.0f} | "
              f"{r['actor_peak_rss_mb']:.0f} | {r['actor_read_s']:.1f}/{r['actor_solve_s']:.1f}/"
              f"{r['actor_grid_s']:.1f}/{r['actor_commit_s']:.1f} |")
    print("\nas the run grew (problems/s so far, driver RSS now, actors' peak RSS):")
    for r in rows:
        marks = ", ".join(f"{m['fraction']:.0%}: {m['problems_per_s']:.0f}/s, driver "
                          f"{m['driver_rss_mb']:.0f} MB, actors {m['actor_peak_rss_mb']:.0f} MB"
                          for m in r["milestones"])
        print(f"  {r['format']}, {r['actors']} actors: {marks}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--bar-size", type=int, default=6)
    ap.add_argument("--grid", default="50x50")
    ap.add_argument("--actors", type=int, nargs="+", default=[2])
    ap.add_argument("--cpus-per-actor", type=float, default=1.0,
                    help="CPUs (and solver lanes) per actor.")
    ap.add_argument("--formats", nargs="+", default=["parquet", "zarr"])
    ap.add_argument("--dir", default="/tmp/raybary-bench")
    ap.add_argument("--no-solver", action="store_true",
                    help="Skip the solver-only ceiling (one process, and two at once).")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    stores = {}
    for fmt in args.formats:
        url = os.path.join(args.dir, f"tut{args.problems}.{fmt}")
        if not os.path.exists(url):
            t0 = time.perf_counter()
            sh([sys.executable, "-m", "raybary", "generate", url, "--problems",
                str(args.problems), "--family", "tutorial", "--seed", "0"])
            print(f"generated {url} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        stores[fmt] = url

    # warm the persistent JAX compilation cache (shapes of a full shard and of the tail)
    warm = os.path.join(args.dir, "warm.parquet")
    if not os.path.exists(warm):
        sh([sys.executable, "-m", "raybary", "generate", warm, "--problems",
            str(args.shard_size + 7), "--family", "tutorial", "--seed", "1"])
    run_job(warm, os.path.join(args.dir, "warm-out"), args, 1)

    rows = []
    base = None
    if not args.no_solver:
        first = stores[args.formats[0]]
        solo, pair = solver_alone(first, args), solver_pair(first, args)
        base = {"one_process": solo, "two_processes": pair,
                "problems_per_s": max(solo["problems_per_s"], pair["problems_per_s"])}
        print(f"solver alone: {base}", file=sys.stderr)
    for fmt, url in stores.items():
        for actors in args.actors:
            rep = run_job(url, os.path.join(args.dir, f"out-{fmt}-{actors}"), args, actors)
            rows.append(_row(fmt, actors, rep, base))
            print(json.dumps(rows[-1]), file=sys.stderr)
    _print_tables(args, base, rows)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"solver_alone": base, "runs": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
