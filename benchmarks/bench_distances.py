"""The distance job end to end: every pair of a generated GMM store, on Ray.

What ``raybary generate OUT --gmms N`` then ``raybary distances OUT DIST``
do, timed step by step in one process: writing the GMM store, the job
(Ray's start included, as a user's command pays it), reading the output
back and building the square matrix. Prints a Markdown table
(docs/performance.md, "The distance job"); ``--json`` also writes the numbers.

    python benchmarks/bench_distances.py --gmms 2000          # 1,999,000 pairs
    python benchmarks/bench_distances.py --gmms 60 --address auto
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import raybary
from raybary.runner import ExecOptions, run_distances
from raybary.storage import generate_gmms


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gmms", type=int, default=2000, help="GMMs in the store [%(default)s]")
    p.add_argument("--tile", type=int, default=100, help="tile side, in GMMs [%(default)s]")
    p.add_argument("--actors", type=int, help="Ray actors [one per CPU]")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--out", type=Path, help="folder for the store and the output [a temporary one]")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, folder: Path) -> dict:
    """Run the four steps in ``folder``; return their numbers."""
    t0 = time.perf_counter()
    store = generate_gmms(str(folder / "gmms.parquet"), args.gmms, overwrite=True)
    t1 = time.perf_counter()
    report = run_distances(store.url, str(folder / "dist"),
                           exe=ExecOptions(address=args.address, actors=args.actors,
                                           overwrite=True, progress=False),
                           tile=args.tile, stream=None)
    t2 = time.perf_counter()
    dist = raybary.read_distances(str(folder / "dist"))
    t3 = time.perf_counter()
    matrix, ids = dist.matrix(max_gmms=max(args.gmms, 1))
    t4 = time.perf_counter()
    table = dist.to_pandas()
    n_pairs = args.gmms * (args.gmms - 1) // 2
    return {
        "gmms": args.gmms, "pairs": n_pairs, "rows": len(table), "shards": report.n_shards,
        "actors": report.actors, "complete": report.complete,
        "ok": int((table.status == "ok").sum()),
        "not_converged": int((~table.converged & (table.status == "ok")).sum()),
        "generate_s": t1 - t0, "job_s": t2 - t1, "run_s": report.wall_s,
        "pairs_per_s": n_pairs / (t2 - t1), "read_s": t3 - t2, "matrix_s": t4 - t3,
        "matrix_nan": int(np.isnan(matrix).sum()), "ids": len(ids),
        "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_mb": sum(f.stat().st_size for f in (folder / "dist").rglob("*")
                         if f.is_file()) / 2**20,
    }


def table_text(m: dict) -> str:
    """The numbers as docs/performance.md's Markdown table."""
    return "\n".join([
        "| | |", "|---|---|",
        f"| pairs | {m['pairs']:,} in {m['shards']} tiles ({m['ok']:,} `ok`; "
        f"{m['not_converged']} with `converged = false`) |",
        f"| the job, call to return (Ray's start included) | {m['job_s']:.1f} s = "
        f"{m['pairs_per_s']:,.0f} pairs/s on {m['actors']} actors |",
        f"| the run itself (its report) | {m['run_s']:.1f} s |",
        f"| writing the GMM store | {m['generate_s']:.2f} s |",
        f"| `read_distances(url)` / `.matrix()` | {m['read_s']:.2f} s / {m['matrix_s']:.2f} s |",
        f"| output | {m['output_mb']:.1f} MB of Parquet |",
        f"| driver memory (max RSS) | {m['driver_rss_mb']:.0f} MB |",
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        m = measure(args, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            m = measure(args, Path(tmp))
    print(table_text(m))
    if args.json:
        args.json.write_text(json.dumps(m, indent=2))
    if not (m["complete"] and m["rows"] == m["pairs"] and m["matrix_nan"] == 0):
        sys.exit(f"incomplete: {m}")
    return m


if __name__ == "__main__":
    main()
