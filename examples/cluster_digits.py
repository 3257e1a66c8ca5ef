"""Clustering Gaussian mixtures by their MW2 distances: which digit is each mixture of?

scikit-learn's digits (1,797 images of 8x8 pixels, shipped inside scikit-learn)
are embedded in ``--dims`` dimensions by PCA. Each digit's images are split at
random into ``--parts`` groups, and each group is summarised by one fitted
``GaussianMixture``: 10 x parts mixtures, whose labels the clustering does
not see. Their pairwise squared mixture-Wasserstein distances MW2^2 (every
pair i < j) are computed as one distance job on Ray, read back as a square
matrix, and the mixtures are clustered by hierarchical clustering on MW2
(scipy, ``--linkage``), cut into 10 clusters. The adjusted Rand index against
the hidden digit labels says how well the distances separate the digits.

Steps: fit (scikit-learn) -> write a GMM store (``raybary.storage.write_gmms``)
-> all pairs' MW2^2 on Ray (``raybary.runner.distances``, what ``raybary
distances --pairs all`` does) -> the matrix (``raybary.read_distances(url).matrix()``)
-> scipy's linkage -> figure: the dendrogram and the matrix in its order.
Needs the extras: ``pip install -e '.[sklearn,plot]'``.
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
    from scipy.cluster.hierarchy import dendrogram, fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture
except ImportError as e:
    sys.exit(f"this example needs scikit-learn and matplotlib ({e}): "
             "pip install 'raybary[sklearn,plot]'")

import raybary
from raybary import GMM
from raybary.runner import ExecOptions, run_distances
from raybary.storage import write_gmms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/cluster_digits"),
                   help="folder for the GMM store, the distances and clusters.csv [%(default)s]")
    p.add_argument("--figure", type=Path, help="PNG of the figure [OUT/cluster_digits.png]")
    p.add_argument("--dims", type=int, default=4, help="PCA dimensions [%(default)s]")
    p.add_argument("--parts", type=int, default=6,
                   help="random groups per digit, one GMM each: 10 x PARTS GMMs [%(default)s]")
    p.add_argument("--components", type=int, default=3,
                   help="components of each GMM [%(default)s]")
    p.add_argument("--linkage", default="average", choices=["average", "complete", "ward"],
                   help="scipy's linkage method, on MW2 = sqrt(MW2^2) [%(default)s]")
    p.add_argument("--actors", type=int, help="Ray actors [one per CPU]")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    gmms, digits = digit_gmms(args)
    mw2 = distance_matrix(gmms, args)
    tree = linkage(squareform(np.sqrt(np.maximum(mw2, 0.0)), checks=False), args.linkage)
    clusters = fcluster(tree, 10, criterion="maxclust")
    ari = adjusted_rand_score(digits, clusters)
    table = pd.DataFrame({"gmm_id": np.arange(len(gmms)), "digit": digits,
                          "cluster": clusters})
    table.to_csv(args.out / "clusters.csv", index=False)
    figure = draw(mw2, tree, digits, ari, args, args.figure or args.out / "cluster_digits.png")
    print(f"{len(gmms)} GMMs, {len(gmms) * (len(gmms) - 1) // 2} pairs\n"
          f"adjusted Rand index of the 10 clusters vs the digits: {ari:.3f}\n"
          f"digits (rows) by cluster (columns):\n"
          f"{pd.crosstab(table.digit, table.cluster).to_string()}\n"
          f"figure: {figure}")


def digit_gmms(args) -> tuple[list[GMM], np.ndarray]:
    """One GMM per (digit, group): the digits embedded by PCA, each digit's
    images split at random into ``args.parts`` groups; and each GMM's digit."""
    x, y = load_digits(return_X_y=True)
    z = PCA(args.dims, random_state=0).fit_transform(x)
    rng = np.random.default_rng(args.seed)
    gmms, digits = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        for part in np.array_split(idx, args.parts):
            # reg_covar: a component on a few images stays non-singular
            fit = GaussianMixture(args.components, reg_covar=1.0, random_state=args.seed)
            gmms.append(GMM.from_sklearn(fit.fit(z[part])))
            digits.append(digit)
    return gmms, np.array(digits)


def distance_matrix(gmms: list[GMM], args) -> np.ndarray:
    """Every pair's MW2^2 as a square matrix (gmm ids 0..n-1 in order): a GMM
    store, one distance job on Ray over all pairs i < j, the matrix read back."""
    store = write_gmms(str(args.out / "gmms.parquet"), gmms, overwrite=True)
    output = str(args.out / "distances")
    run_distances(store.url, output, exe=ExecOptions(address=args.address, actors=args.actors,
                                                     overwrite=True), pairs="all")
    mw2, ids = raybary.read_distances(output).matrix()
    assert ids.tolist() == list(range(len(gmms))) and not np.isnan(mw2).any()
    return mw2


def draw(mw2: np.ndarray, tree: np.ndarray, digits: np.ndarray, ari: float, args,
         path: Path) -> Path:
    """The dendrogram (leaves labelled by their hidden digit) and the MW2 matrix
    with rows and columns in the dendrogram's order."""
    fig = Figure(figsize=(14, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1.4, 1])
    tree_plot = dendrogram(tree, ax=left, labels=[str(d) for d in digits],
                           color_threshold=tree[-9, 2], leaf_font_size=7)
    left.set(title=f"hierarchical clustering ({args.linkage} linkage) on MW2;\n"
                   f"leaves: the GMM's hidden digit; 10 clusters: ARI {ari:.3f}",
             ylabel="MW2")
    order = tree_plot["leaves"]
    image = right.imshow(np.sqrt(np.maximum(mw2[np.ix_(order, order)], 0.0)),
                         cmap="viridis")
    ticks = np.arange(len(order))
    right.set_xticks(ticks, [str(digits[i]) for i in order], fontsize=5, rotation=90)
    right.set_yticks(ticks, [str(digits[i]) for i in order], fontsize=5)
    right.set(title="MW2 between the GMMs, in the dendrogram's order")
    fig.colorbar(image, ax=right, shrink=0.8, label="MW2")
    fig.suptitle(f"{len(digits)} GMMs of handwritten digits ({args.dims}-D PCA, "
                 f"{args.components} components each), clustered by their MW2 distances")
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    main()
