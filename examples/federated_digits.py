"""Federated Gaussian mixtures of handwritten digits, merged by Wasserstein barycenters.

scikit-learn's digits (1,797 images of 8x8 pixels, shipped inside scikit-learn)
are embedded in 2-D by PCA. For each digit, its training images are split at
random between ``--sites`` sites (hospitals, phones, ...) that do not share
data: each site fits its own ``GaussianMixture``, and only the fitted mixtures
nu_j leave the sites. Their barycenter argmin_mu sum_j lambda_j MW2^2(mu, nu_j),
with lambda_j proportional to the sites' sample sizes, is one mixture of as
many components that summarises them; its component weights are learned too
(``learn_weights``), since the sites' mixtures weigh their components unequally.

Is it a good model? 50 images of each digit are kept aside; the barycenter's
held-out log-likelihood (``to_sklearn().score``) is compared with the sites'
own mixtures' and with that of one mixture fitted to all the training images
(what pooling the data would give). ``--splits`` random splits per digit give
10 x splits problems (1,000 by default), solved as one batch on Ray.

Steps: fit (scikit-learn) -> write a Parquet problem store (``write_problems``)
-> solve it on Ray (``raybary.runner.run``, what ``raybary run`` does) -> read
the barycenters back (``raybary.read_results``) -> score them -> figure
(``raybary.plot``). Needs the extras: ``pip install -e '.[sklearn,plot]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
except ImportError as e:
    sys.exit(f"this example needs scikit-learn and matplotlib ({e}): "
             "pip install 'raybary[sklearn,plot]'")

import raybary
from raybary import GMM, Problem
from raybary.plot import draw_problem, problem_grids
from raybary.runner import ExecOptions, GridOptions, SolverOptions, run
from raybary.storage import write_problems

HELD_OUT = 50  # images of each digit kept aside for scoring
MIN_SITE = 15  # images per site, at least
SHOWN = (0, 1, 3, 4, 7)  # digits drawn, from the first split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/federated_digits"),
                   help="folder for the store, the results and scores.csv [%(default)s]")
    p.add_argument("--figure", type=Path, help="PNG of the figure [OUT/federated_digits.png]")
    p.add_argument("--splits", type=int, default=100,
                   help="random splits per digit: 10 x SPLITS problems [%(default)s]")
    p.add_argument("--sites", type=int, default=4, help="sites per split [%(default)s]")
    p.add_argument("--components", type=int, default=3,
                   help="components of each GMM and barycenter [%(default)s]")
    p.add_argument("--actors", type=int, help="Ray actors [one per CPU]")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with threadpool_limits(1):  # thousands of tiny fits: BLAS threads would only contend
        problems, ids, held_out = site_problems(*embed_digits(), args)
    res = solve_on_ray(problems, ids, args)
    with threadpool_limits(1):
        scores = score(res, problems, ids, held_out)
    scores.to_csv(args.out / "scores.csv", index=False)
    figure = draw(res, scores, args, args.figure or args.out / "federated_digits.png")
    better = (scores.barycenter > scores.sites).mean()
    print(f"{len(ids)} problems: {res.problems.status.value_counts().to_dict()}\n"
          "held-out log-likelihood per image, mean over problems:\n"
          f"  each site's own GMM (lambda-weighted)  {scores.sites.mean():8.3f}\n"
          f"  barycenter of the sites' GMMs          {scores.barycenter.mean():8.3f}"
          f"   (better than the sites' in {better:.0%} of problems)\n"
          f"  one GMM fitted to the pooled images    {scores.pooled.mean():8.3f}"
          "   (needs all the data in one place)\n"
          f"figure: {figure}")


def embed_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as points of R^2 (first two principal components) and their labels."""
    x, y = load_digits(return_X_y=True)
    return PCA(2, random_state=0).fit_transform(x), y


def site_problems(z, y, args):
    """One problem per (split, digit), id ``10 * split + digit``: the sites' GMMs with
    lambda_j = n_j / n; and per problem (held-out points, sites' GMMs, pooled GMM)."""
    def fit(points, seed):  # reg_covar: a component on a few images stays non-singular
        return GaussianMixture(args.components, reg_covar=1.0, random_state=seed).fit(points)

    problems, ids, held_out = [], [], []
    for split in range(args.splits):
        rng = np.random.default_rng([args.seed, split])
        for digit in range(10):
            idx = rng.permutation(np.flatnonzero(y == digit))
            test, train = idx[:HELD_OUT], idx[HELD_OUT:]
            sizes = MIN_SITE + rng.multinomial(len(train) - MIN_SITE * args.sites,
                                               rng.dirichlet(np.full(args.sites, 2.0)))
            sites = [fit(z[s], split) for s in np.split(train, np.cumsum(sizes)[:-1])]
            problems.append(Problem([GMM.from_sklearn(g) for g in sites], sizes / sizes.sum()))
            ids.append(10 * split + digit)
            held_out.append((z[test], sites, fit(z[train], split)))
    return problems, ids, held_out


def solve_on_ray(problems, ids, args):
    """Write the problem store, solve it on Ray, return the results (``Results``)."""
    store = write_problems(str(args.out / "digits.parquet"), problems, ids, overwrite=True)
    run(store.url, str(args.out / "results"),
        SolverOptions(bar_size=args.components, learn_weights=True),
        GridOptions(shape=None),  # no stored grids: the figure is computed from the barycenters
        ExecOptions(address=args.address, actors=args.actors, shard_size=250, overwrite=True))
    return raybary.read_results(str(args.out / "results"))


def score(res, problems, ids, held_out) -> pd.DataFrame:
    """Held-out mean log-likelihood per image: each problem's barycenter, its sites'
    GMMs (lambda-weighted mean) and the GMM of the pooled training images."""
    rows = []
    for pid, problem, (test, sites, pooled) in zip(ids, problems, held_out):
        bary = res.barycenter(pid).to_sklearn()  # a fitted sklearn GaussianMixture
        own = float(np.dot(problem.lambdas, [g.score(test) for g in sites]))
        rows.append((pid, pid % 10, bary.score(test), own, pooled.score(test)))
    return pd.DataFrame(rows, columns=["problem_id", "digit", "barycenter", "sites", "pooled"])


def draw(res, scores, args, path: Path) -> Path:
    """Five digits' site GMMs and barycenters (contours of -log p), and the scores."""
    fig = Figure(figsize=(14, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flat
    for i, (ax, digit) in enumerate(zip(axes, SHOWN)):
        draw_problem(ax, problem_grids(res, digit, shape=(150, 150)), fontsize=9,
                     annotate=False, legend=i == 0,
                     title=f"digit {digit}: {args.sites} sites' GMMs and their barycenter")
    ax = axes[5]
    ax.scatter(scores.sites, scores.barycenter, c=scores.digit, cmap="tab10", s=10)
    low, high = scores[["sites", "barycenter"]].min().min(), scores.barycenter.max()
    ax.plot([low, high], [low, high], color="gray", lw=1, ls="--")
    ax.set(xlabel="sites' own GMMs (lambda-weighted)", ylabel="barycenter",
           title="held-out log-likelihood per image\n(one point per problem, colour = digit)")
    fig.suptitle(f"Digits in 2-D (PCA): {len(scores)} federated problems of "
                 f"{args.sites} sites, solved by raybary")
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    main()
