"""How fast raybary.mw2_batch is on tutorial-sized pairs, beside POT's loop.

Random pairs of GMMs in d = 2 with 2 to 5 components each side (Dirichlet
weights, means spread by 3, covariances ``A A^T / 2 + 0.3 I``), at the
default settings (relative epsilon 1e-4, float32, validation on). Each
repeat times, one after the other in the same process:

* ``mw2_batch``: the default (a thread per core, continuous batching);
* ``mw2_batch workers=1``: one thread;
* ``fixed batch``: one thread, every pair of a call in a slot of its own
  from the start (no refill: a batch runs as long as its slowest pair, as
  mw2_batch did before continuous batching);
* ``POT loop``: ``ot.gmm.gmm_ot_loss`` pair after pair (on ``--pot-pairs`` of them).

and prints one Markdown row each: pairs/s (median of the repeats, and the
range), mean plan iterations per pair, wall time per needed plan iteration,
the share of slot iterations idle, the largest relative error against POT's
exact loss, and the speed-up over POT's loop::

    python benchmarks/bench_mw2_speed.py --pairs 16384 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raybary import GMM  # noqa: E402
from raybary.batch import distances  # noqa: E402
from raybary.options import SolverOptions  # noqa: E402


def tutorial_pairs(n: int, seed: int) -> list[tuple[GMM, GMM]]:
    """``n`` random d = 2 pairs, 2 to 5 components each side."""
    rng = np.random.default_rng(seed)

    def gmm(shift: float) -> GMM:
        k = int(rng.integers(2, 6))
        a = rng.normal(size=(k, 2, 2))
        return GMM(rng.dirichlet(np.ones(k)), rng.normal(size=(k, 2)) * 3.0 + shift,
                   a @ a.transpose(0, 2, 1) / 2 + 0.3 * np.eye(2))

    return [(gmm(0.0), gmm(1.0)) for _ in range(n)]


def raybary_run(pairs, *, workers: int | None, fixed: bool = False) -> dict:
    """Time ``mw2_batch``'s work (validation, solve) once; with ``fixed``, all
    pairs of a call in slots from the start (the slot rule set to the batch)."""
    saved = distances.SLOTS
    if fixed:
        distances.SLOTS = (distances.BATCHES[-1], distances.BATCHES[-1])
    try:
        stats: dict = {}
        options = SolverOptions.build(dtype="float32")
        started = time.perf_counter()
        checked = distances._checked_pairs(pairs, options.dtype, True)
        out = distances.solve_pairs(checked, options, workers=workers, stats=stats)
        wall = time.perf_counter() - started
    finally:
        distances.SLOTS = saved
    return dict(wall=wall, values=out.values, iterations=out.iterations.mean(),
                needed=stats["needed_iterations"], slot=stats["slot_iterations"],
                converged=out.converged.mean())


def pot_run(pairs) -> dict:
    """Time POT's exact ``gmm_ot_loss``, pair after pair."""
    import ot

    started = time.perf_counter()
    values = np.array([ot.gmm.gmm_ot_loss(a.means, b.means, a.covs, b.covs, a.weights,
                                          b.weights) for a, b in pairs])
    return dict(wall=time.perf_counter() - started, values=values)


def main(argv: list[str] | None = None) -> dict:
    """Print the table; return the rows (for tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16384)
    parser.add_argument("--pot-pairs", type=int, default=2048,
                        help="pairs of the POT loop (its rate is per pair)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pairs = tutorial_pairs(args.pairs, args.seed)
    pot_pairs = pairs[:args.pot_pairs]
    runs = {"mw2_batch": dict(workers=None), "mw2_batch workers=1": dict(workers=1),
            "fixed batch, workers=1": dict(workers=1, fixed=True)}
    for kw in runs.values():  # compile (and load) every program first
        raybary_run(pairs[:min(len(pairs), 4096)], **kw)
    results: dict[str, list] = {name: [] for name in [*runs, "POT loop"]}
    for _ in range(args.repeats):  # side by side: every method in each repeat
        for name, kw in runs.items():
            results[name].append(raybary_run(pairs, **kw))
        results["POT loop"].append(pot_run(pot_pairs))
    exact = results["POT loop"][0]["values"]
    pot_rate = np.median([len(pot_pairs) / r["wall"] for r in results["POT loop"]])
    print(f"{args.pairs} pairs (POT: {len(pot_pairs)}), {args.repeats} repeats, "
          f"d = 2, K 2-5, relative epsilon 1e-4, float32\n")
    print("| method | pairs/s (median) | range | plan iterations / pair | "
          "us / needed iteration | idle slots | max rel. error vs POT | x POT |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, runs_ in results.items():
        n = len(pot_pairs) if name == "POT loop" else len(pairs)
        rates = [n / r["wall"] for r in runs_]
        row = dict(rate=float(np.median(rates)), low=min(rates), high=max(rates))
        if name == "POT loop":
            cells = ["-", "-", "-", "0 (exact)"]
        else:
            r0 = runs_[0]
            error = np.max(np.abs(r0["values"][:len(exact)] - exact) / exact)
            wall = np.median([r["wall"] for r in runs_])
            row.update(iterations=float(r0["iterations"]), idle=1 - r0["needed"] / r0["slot"],
                       error=float(error), us=1e6 * wall / r0["needed"])
            cells = [f"{row['iterations']:.1f}", f"{row['us']:.2f}", f"{row['idle']:.0%}",
                     f"{error:.1e}"]
        row["x_pot"] = row["rate"] / pot_rate
        rows[name] = row
        print(f"| {name} | {row['rate']:,.0f} | {row['low']:,.0f}-{row['high']:,.0f} | "
              + " | ".join(cells) + f" | {row['x_pot']:.1f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
