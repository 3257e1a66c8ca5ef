"""How close raybary.mw2_batch is to POT's exact MW2 (ot.gmm.gmm_ot_loss), by epsilon.

Prints the table of docs/distances.md: the largest relative error over each
kind of pair (random ragged pairs in d = 1, 2, 3, 5 with K in 1..8; "near"
pairs, b = a moved a little; the tutorial's three inputs, pairwise) for each
relative epsilon and precision. Needs POT (the ``test`` extra) and, for the
tutorial pairs, OTT-JAX::

    python benchmarks/bench_mw2.py --pairs 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raybary import GMM  # noqa: E402
from raybary.batch.distances import mw2_batch  # noqa: E402

DIMS = (1, 2, 3, 5)


def random_gmm(rng, d: int, k: int, shift: float = 0.0) -> GMM:
    """Dirichlet weights, means spread by 3, covariances ``A A^T / d + 0.3 I``."""
    w = rng.dirichlet(np.ones(k))
    m = rng.normal(size=(k, d)) * 3.0 + shift
    a = rng.normal(size=(k, d, d))
    return GMM(w, m, a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d))


def kinds(n: int, seed: int, tutorial: bool) -> dict[str, list[tuple[GMM, GMM]]]:
    """The pairs of each kind."""
    rng = np.random.default_rng(seed)
    out = {"random": [(random_gmm(rng, DIMS[i % 4], int(rng.integers(1, 9))),
                       random_gmm(rng, DIMS[i % 4], int(rng.integers(1, 9)), 1.0))
                      for i in range(n)]}
    near = []
    for i in range(n):
        a = random_gmm(rng, DIMS[i % 4], int(rng.integers(2, 9)))
        near.append((a, GMM(a.weights, a.means + 0.1 * rng.normal(size=a.means.shape),
                            a.covs * 1.1)))
    out["near"] = near
    if tutorial:
        from tests.reference import tutorial_problem

        g = tutorial_problem()[0].gmms
        out["tutorial"] = [(g[0], g[1]), (g[1], g[2]), (g[0], g[2])]
    return out


def main(argv: list[str] | None = None) -> None:
    """Print one Markdown row per relative epsilon: max relative error per kind and dtype."""
    import ot

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="pairs of each random kind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eps", type=float, nargs="+",
                        default=[1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--no-tutorial", action="store_true", help="skip (needs OTT-JAX)")
    args = parser.parse_args(argv)
    pairs = kinds(args.pairs, args.seed, not args.no_tutorial)
    exact = {k: np.array([ot.gmm.gmm_ot_loss(a.means, b.means, a.covs, b.covs, a.weights,
                                             b.weights) for a, b in v])
             for k, v in pairs.items()}
    cols = [f"{k} {dt}" for k in pairs for dt in args.dtypes]
    print("| relative_epsilon | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for eps in args.eps:
        row = []
        for k, v in pairs.items():
            for dt in args.dtypes:
                got = mw2_batch(v, relative_epsilon=eps, dtype=dt)
                row.append(f"{np.max(np.abs(got - exact[k]) / exact[k]):.1e}")
        print(f"| {eps:g} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
