"""Storage benchmark: generation time, and peak memory of reading a store shard by shard.

For each store size and format this script

1. generates a tutorial store (``raybary.storage.generate.generate``) in a
   child process, and reports its time and peak RSS;
2. in a *fresh* Python process (so that peak RSS belongs to the read alone),
   opens the store and reads every shard of ``--shard`` problems with
   ``store.read(start, stop)`` -- decoded and validated, exactly what a runner
   actor does -- keeping nothing between shards; it reports the time, the peak
   RSS (``VmHWM`` of /proc/self/status) and the RSS after
   imports and after opening the store, so the growth due to reading is visible;
3. deletes the store (unless ``--keep``).

Peak RSS must not grow with the store: a 1,000,000-problem store should read
with the same peak as a 100,000-problem one.

Usage::

    python benchmarks/bench_storage.py --problems 100000 1000000 --dir /tmp/raybary-bench

Prints one line per run and a JSON summary at the end (``--json FILE`` saves it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def _rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    """Peak resident set size of this process, MiB: ``VmHWM`` from /proc/self/status.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that survives ``execve``,
    so a child started by ``subprocess`` would report its parent's peak if
    larger (which the first version of this script did).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def generate_one(url: str, n: int) -> dict:
    """Generate a tutorial store; runs in its own child process."""
    from raybary.storage.generate import generate

    t0 = time.perf_counter()
    generate(url, n, family="tutorial", seed=0, overwrite=True)
    return {"generate_s": round(time.perf_counter() - t0, 2),
            "generate_peak_rss_mib": round(_peak_mib(), 1)}


def read_all(url: str, shard: int) -> dict:
    """Read every shard of ``url``; runs in the child process."""
    import numpy as np  # noqa: F401  (imports counted in the baseline)
    import pyarrow.parquet  # noqa: F401
    import zarr  # noqa: F401

    from raybary.storage import open_store

    after_imports = _rss_mib()
    t0 = time.perf_counter()
    store = open_store(url)
    t_open = time.perf_counter() - t0
    after_open = _rss_mib()
    n_seen = n_invalid = 0
    t0 = time.perf_counter()
    for start, stop in store.shards(shard):
        s = store.read(start, stop)
        n_seen += len(s)
        n_invalid += s.n_invalid
        del s
    t_read = time.perf_counter() - t0
    return {
        "n_problems": store.n_problems,
        "read_problems": n_seen,
        "invalid": n_invalid,
        "open_s": round(t_open, 2),
        "read_s": round(t_read, 2),
        "problems_per_s": round(n_seen / t_read) if t_read else None,
        "rss_after_imports_mib": round(after_imports, 1),
        "rss_after_open_mib": round(after_open, 1),
        "peak_rss_mib": round(_peak_mib(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--formats", nargs="+", default=["parquet", "zarr"], choices=["parquet", "zarr"])
    ap.add_argument("--shard", type=int, default=10_000, help="problems per shard read")
    ap.add_argument("--dir", default="/tmp/raybary-bench", help="where to write the stores")
    ap.add_argument("--keep", action="store_true", help="keep the generated stores")
    ap.add_argument("--json", default=None, help="also write the summary to this file")
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "URL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        what, url, n = args.child
        out = generate_one(url, int(n)) if what == "generate" else read_all(url, int(n))
        print(json.dumps(out))
        return

    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for n in args.problems:
        for fmt in args.formats:
            url = os.path.join(args.dir, f"tutorial-{n}.{fmt}")
            gen = _child("generate", url, n)
            size = subprocess.run(["du", "-sm", url], capture_output=True, text=True).stdout.split()[0]
            row = {"format": fmt, "problems": n, "shard": args.shard, **gen,
                   "size_mib": int(size), **_child("read", url, args.shard)}
            rows.append(row)
            print(f"{fmt:8s} {n:>9,d} problems: generate {row['generate_s']:6.1f} s "
                  f"(peak RSS {row['generate_peak_rss_mib']} MiB), "
                  f"{row['size_mib']} MiB on disk; read {row['read_s']:6.1f} s "
                  f"({row['problems_per_s']:,} problems/s) in shards of {args.shard:,}; "
                  f"RSS after imports {row['rss_after_imports_mib']} MiB, after open "
                  f"{row['rss_after_open_mib']} MiB, peak {row['peak_rss_mib']} MiB", flush=True)
            if not args.keep:
                shutil.rmtree(url, ignore_errors=True) if os.path.isdir(url) else os.remove(url)
    summary = {"machine": {"cpus": os.cpu_count()}, "runs": rows}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


def _child(what: str, url: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, url, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
