"""End-to-end benchmark of ``raybary run`` against the solver alone.

Generates tutorial-sized problems (Parquet and Zarr, same seed) under a
scratch directory, runs ``python -m raybary run`` on each (embedded local Ray,
50x50 grids) and ``raybary.solve`` in a separate process on the same problems,
and prints a table: problems/s, wall time, time to the first committed shard,
driver and actor peak RSS, and the runner's time over the solver's.

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
store = open_store(url)
t_read = time.perf_counter()
problems = [p for i in range(0, store.n_problems, shard)
            for p in store.read(i, min(i + shard, store.n_problems)).problems]
t0 = time.perf_counter()
raybary.solve(problems[:shard], bar_size=bar_size, validate=False)   # compile / cache load
t1 = time.perf_counter()
out = []
for i in range(0, len(problems), shard):   # same batches as the runner's shards
    out += raybary.solve(problems[i:i + shard], bar_size=bar_size, validate=False)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"n": len(out), "read_s": t0 - t_read, "warmup_s": t1 - t0,
      "solve_s": t2 - t1, "ok": sum(r.status == "ok" for r in out),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def run_job(inp: str, out: str, args, actors: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "raybary", "run", inp, out, "--bar-size", str(args.bar_size),
           "--grid", args.grid, "--shard-size", str(args.shard_size), "--actors", str(actors),
           "--json", "-q"]
    t0 = time.perf_counter()
    p = sh(cmd)
    wall = time.perf_counter() - t0
    rep = json.loads(p.stdout)
    rep["process_wall_s"] = wall
    return rep


def solver_alone(inp: str, args) -> dict:
    p = sh([sys.executable, "-c", SOLVER_ALONE, inp, str(args.bar_size), str(args.shard_size)],
           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--bar-size", type=int, default=6)
    ap.add_argument("--grid", default="50x50")
    ap.add_argument("--actors", type=int, nargs="+", default=[2])
    ap.add_argument("--formats", nargs="+", default=["parquet", "zarr"])
    ap.add_argument("--dir", default="/tmp/raybary-bench")
    ap.add_argument("--no-solver", action="store_true", help="Skip the solver-alone baseline.")
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
        base = solver_alone(stores[args.formats[0]], args)
        base["problems_per_s"] = base["n"] / base["solve_s"]
        print(f"solver alone: {base}", file=sys.stderr)
    for fmt, url in stores.items():
        for actors in args.actors:
            rep = run_job(url, os.path.join(args.dir, f"out-{fmt}-{actors}"), args, actors)
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
                "counts": rep["counts"],
            }
            if base:
                row["ratio_to_solver"] = base["problems_per_s"] / rep["problems_per_s"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    print(f"\n{args.problems} tutorial problems, bar size {args.bar_size}, grid {args.grid}, "
          f"shards of {args.shard_size}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    if base:
        print(f"solver alone (one process, same batches): {base['problems_per_s']:.1f} problems/s "
              f"({base['solve_s']:.1f} s; peak RSS {base['peak_rss_mb']:.0f} MB)")
    print("| input | actors | problems/s | wall s | first shard s | driver RSS MB | actor RSS MB "
          "| actor read/solve/grid/commit s | solver-alone time / runner time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{1 / r['ratio_to_solver']:.2f}" if "ratio_to_solver" in r else "-"
        print(f"| {r['format']} | {r['actors']} | {r['problems_per_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['first_shard_s']:.1f} | {r['driver_peak_rss_mb']:.0f} | "
              f"{r['actor_peak_rss_mb']:.0f} | {r['actor_read_s']:.1f}/{r['actor_solve_s']:.1f}/"
              f"{r['actor_grid_s']:.1f}/{r['actor_commit_s']:.1f} | {ratio} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"solver_alone": base, "runs": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
