"""The worked examples of ``examples/`` run end to end at a small size: real
scikit-learn data (bundled with scikit-learn, nothing downloaded), a real
subprocess running the script as a reader would, real Ray (the session's
``ray_local``, joined with ``--address`` so no second Ray is started), real files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reference as ref

import raybary
from raybary.storage import open_store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPLITS = 2  # 20 problems: one shard, one actor, one compiled shape


@pytest.fixture(scope="module")
def federated(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("federated_digits")
    figure = out / "figure.png"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "federated_digits.py"), "--out", str(out),
         "--figure", str(figure), "--splits", str(SPLITS), "--actors", "1",
         "--address", ray_local],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "figure": figure, "stdout": proc.stdout}


def test_every_problem_is_solved(federated):
    res = raybary.read_results(str(federated["out"] / "results"))
    ids = [10 * split + digit for split in range(SPLITS) for digit in range(10)]
    assert res.complete
    assert res.problems.problem_id.tolist() == ids
    assert (res.problems.status == "ok").all()
    assert f"{len(ids)} problems: {{'ok': {len(ids)}}}" in federated["stdout"]


def test_barycenters_beat_every_site_as_a_candidate(federated):
    """Exact MW2 objective (POT's LP): each barycenter is below every one of its
    input GMMs taken as the barycenter (with uniform weights it is not, on
    problems 1 and 9: the learned weights are what makes it so)."""
    res = raybary.read_results(str(federated["out"] / "results"))
    assert res.problems.opt_learn_weights.all()
    store = open_store(str(federated["out"] / "digits.parquet"))
    shard = store.read(0, store.n_problems)
    spreads = []
    for pid, problem in zip(shard.problem_ids, shard.problems):
        bary = res.barycenter(int(pid))
        assert problem.n_gmms == 4 and bary.n_components == 3
        assert np.isclose(bary.weights.sum(), 1.0)
        spreads.append(np.ptp(bary.weights))
        ours = ref.exact_objective(problem, bary.weights, bary.means, bary.covs)
        best_site = min(ref.exact_objective(problem, g.weights, g.means, g.covs)
                        for g in problem.gmms)
        assert ours < best_site, (pid, ours, best_site)
    assert np.median(spreads) > 0.1  # learned, not left uniform


def test_scores_and_figure(federated):
    scores = pd.read_csv(federated["out"] / "scores.csv")
    assert len(scores) == 10 * SPLITS and scores.notna().all().all()
    # the story of the example: merging the sites' GMMs generalises better than they do
    assert (scores.barycenter - scores.sites).mean() > 0
    assert (scores.barycenter > scores.sites).mean() >= 0.7
    assert str(federated["figure"]) in federated["stdout"]

    from matplotlib.image import imread

    image = imread(federated["figure"])
    assert image.shape[:2] == (950, 1400)
    ink = (image[..., :3] < 0.9).any(axis=-1).mean()  # share of pixels that are not white
    assert 0.03 < ink < 0.6
    assert federated["figure"].stat().st_size > 50_000


@pytest.fixture(scope="module")
def clustered(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("cluster_digits")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "cluster_digits.py"), "--out", str(out),
         "--parts", "3", "--actors", "1", "--address", ray_local],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "figure": out / "cluster_digits.png", "stdout": proc.stdout}


def test_clusters_are_the_digits(clustered):
    """30 GMMs (3 per digit) in 4-D: every pair's distance computed once by the
    job, and MW2 alone puts each digit's GMMs in a cluster of their own."""
    table = pd.read_csv(clustered["out"] / "clusters.csv")
    assert len(table) == 30 and (table.groupby("digit").size() == 3).all()
    assert table.groupby("digit").cluster.nunique().eq(1).all()  # a digit in one cluster
    assert table.groupby("cluster").digit.nunique().eq(1).all()  # a cluster of one digit
    assert "adjusted Rand index of the 10 clusters vs the digits: 1.000" in clustered["stdout"]
    dist = raybary.read_distances(str(clustered["out"] / "distances"))
    assert dist.complete and len(dist.table) == 30 * 29 // 2
    mw2, ids = dist.matrix()
    assert ids.tolist() == list(range(30)) and np.allclose(mw2, mw2.T)
    same = table.digit.to_numpy()[:, None] == table.digit.to_numpy()[None, :]
    off = ~np.eye(30, dtype=bool)
    # every GMM is nearer to the other GMMs of its digit than to any of another digit
    assert (np.where(same & off, mw2, -np.inf).max(axis=1)
            < np.where(same, np.inf, mw2).min(axis=1)).all()


def test_cluster_figure(clustered):
    from matplotlib.image import imread

    image = imread(clustered["figure"])
    assert image.shape[:2] == (650, 1400)
    ink = (image[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.05 < ink < 0.7
    assert str(clustered["figure"]) in clustered["stdout"]
