"""raybary.plot and `raybary plot`: figures from stored results (no Ray needed).

Results are written the way the runner writes them (ResultWriter.commit_shard)
from a real solve of small problems: the tutorial family (with and without
stored grids, one problem marked failed) and a ragged random family (d = 1 and
d = 5, i.e. curves and 2-D marginals).
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

import raybary  # noqa: E402
from raybary import plot as rp  # noqa: E402
from raybary.cli import main  # noqa: E402
from raybary.density import default_bounds, log_density, log_density_grid  # noqa: E402
from raybary.storage.generate import generate  # noqa: E402
from raybary.storage.results import ResultWriter  # noqa: E402

GRID = (48, 40)  # H != W, so a transposed grid cannot pass


def _write_results(out, store, results, *, grids: bool, failed: set[int] = frozenset(),
                   shard_size: int = 2, input_gmms: int = 3):
    n = store.n_problems
    shard = store.read(0, n)
    writer = ResultWriter(out, n_problems=n, shard_size=shard_size,
                          grid_shape=GRID if grids else None,
                          input_grid_gmms=input_gmms if grids else 0,
                          options={"bar_size": 4, "grid_dims": [0, 1]}, input_url=store.url)
    writer.prepare(overwrite=True)
    for i in range(writer.n_shards):
        s, e = writer.shard_range(i)
        statuses, errors, rows = [], [], []
        for k in range(s, e):
            bad = k in failed or shard.problems[k] is None
            statuses.append("failed" if bad else "ok")
            errors.append("solver produced NaN (test)" if bad else None)
            rows.append(None if bad else results[k])
        kw = {}
        if grids:
            probs = shard.problems[s:e]
            ext = np.stack([default_bounds(np.concatenate([g.means for g in p.gmms]),
                                           np.concatenate([g.covs for g in p.gmms]))
                            for p in probs])
            kw["grid_extents"] = ext
            kw["grids"] = np.stack([
                np.full(GRID, np.nan) if r is None else log_density_grid(r.gmm(), GRID, x)[0]
                for r, x in zip(rows, ext)])
            if input_gmms:
                kw["input_grids"] = np.stack([
                    np.stack([log_density_grid(g, GRID, x)[0] for g in p.gmms[:input_gmms]])
                    for p, x in zip(probs, ext)])
        writer.commit_shard(i, s, e, shard.problem_ids[s:e], statuses, errors, rows, 0.01, **kw)
    writer.finalize({})
    return out


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    store = generate(str(root / "in.parquet"), 4, family="tutorial", seed=1)
    problems = store.read(0, 4).problems
    results = raybary.solve(problems, bar_size=4, epsilon=0.1)
    return {
        "root": root,
        "store": store,
        "results": results,
        "grids": _write_results(str(root / "out-grids"), store, results, grids=True, failed={3}),
        "nogrids": _write_results(str(root / "out-nogrids"), store, results, grids=False,
                                  failed={3}),
        "some": _write_results(str(root / "out-some"), store, results, grids=True,
                               input_gmms=2),
        "bary-only": _write_results(str(root / "out-bary-only"), store, results, grids=True,
                                    input_gmms=0),
    }


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot-ragged")
    store = generate(str(root / "in.parquet"), 6, family="random", seed=3)
    problems = store.read(0, 6).problems
    results = raybary.solve(problems, bar_size=3)
    return _write_results(str(root / "out"), store, results, grids=False, shard_size=3)


def _contour_sets(ax):
    from matplotlib.contour import ContourSet

    return [c for c in ax.collections if isinstance(c, ContourSet)]


@pytest.mark.parametrize("which", ["grids", "nogrids"])
def test_single_problem_figure(tutorial, which, tmp_path):
    fig = rp.plot_problem(tutorial[which], 0)
    ax = fig.axes[0]
    sets = _contour_sets(ax)
    assert len(sets) == 4  # three input GMMs and the barycenter
    for cs in sets:  # the tutorial's levels and norm
        np.testing.assert_allclose(cs.levels, np.logspace(0, 1, 10))
        assert (cs.norm.vmin, cs.norm.vmax) == (1.0, 10.0)
        assert type(cs.norm).__name__ == "LogNorm"
    assert ax.get_title() == "Problem 0: 3 GMMs and their barycenter"
    assert ax.get_xlabel() and ax.get_ylabel()
    texts = {t.get_text() for t in ax.texts}
    assert {"GMM 1", "GMM 2", "GMM 3", "Barycenter"} <= texts
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[-1] == "Barycenter (n=4)" and labels[0].startswith("GMM 1 (λ=")
    # one colour map per GMM, the barycenter's distinct
    assert len({cs.cmap.name for cs in sets}) == 4
    # the barycenter's innermost contour surrounds its densest grid point
    g = rp.problem_grids(tutorial[which], 0)
    h, w = g.barycenter.shape
    r, c = np.unravel_index(np.argmax(g.barycenter), (h, w))
    mode = (g.extent[0] + (g.extent[1] - g.extent[0]) * c / (w - 1),
            g.extent[2] + (g.extent[3] - g.extent[2]) * r / (h - 1))
    from matplotlib.path import Path

    inner = next(segs for segs in sets[-1].allsegs if any(len(s) for s in segs))
    assert any(Path(seg).contains_point(mode) for seg in inner if len(seg) > 2)

    out = rp.save_figure(fig, str(tmp_path / "fig.png"))
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[:2] == (1000, 1000)  # 10 x 10 inches at 100 dpi
    assert (tmp_path / "fig.png").stat().st_size > 20_000
    assert img[..., :3].std() > 0.02  # not a blank page


def test_stored_and_computed_grids_agree(tutorial):
    """Same extent and shape: the stored grid equals the one computed from the stored
    barycenter, which pins the orientation (rows = y, columns = x) and the extent."""
    stored = rp.problem_grids(tutorial["grids"], 1)
    assert stored.source == "stored"
    assert stored.inputs.shape == (3, *GRID) and stored.barycenter.shape == GRID
    computed = rp.problem_grids(tutorial["grids"], 1, source="computed",
                                bounds=stored.extent, shape=GRID)
    assert computed.source == "computed"
    np.testing.assert_allclose(computed.barycenter, stored.barycenter, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(computed.inputs, stored.inputs, rtol=1e-4, atol=1e-3)
    # the barycenter's densest grid point is where its log-density is highest
    xmin, xmax, ymin, ymax = stored.extent
    r, c = np.unravel_index(np.argmax(stored.barycenter), GRID)
    x = xmin + (xmax - xmin) * c / (GRID[1] - 1)
    y = ymin + (ymax - ymin) * r / (GRID[0] - 1)
    best = tutorial["results"][1]
    at = log_density(best.gmm(), np.array([[x, y]]))[0]
    assert at == pytest.approx(stored.barycenter.max(), abs=1e-3)


@pytest.mark.parametrize("which", ["some", "bary-only"])
def test_partly_stored_grids_are_completed(tutorial, which):
    """The run stored the barycenter's grid and fewer input grids than GMMs: the
    others are computed on the stored extent, and match what a full run stores."""
    full = rp.problem_grids(tutorial["grids"], 1)
    part = rp.problem_grids(tutorial[which], 1)
    assert part.source == "mixed" and part.inputs.shape == (3, *GRID)
    np.testing.assert_allclose(part.extent, full.extent)
    np.testing.assert_allclose(part.inputs, full.inputs, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(part.barycenter, full.barycenter)


def test_computed_window_covers_all_components(tutorial):
    g = rp.problem_grids(tutorial["nogrids"], 0)
    assert g.source == "computed" and g.inputs.shape == (3, *rp.DEFAULT_SHAPE)
    means = np.concatenate([x.means for x in tutorial["store"].read(0, 1).problems[0].gmms])
    assert (means[:, 0] > g.extent[0]).all() and (means[:, 0] < g.extent[1]).all()
    assert (means[:, 1] > g.extent[2]).all() and (means[:, 1] < g.extent[3]).all()


def test_gallery(tutorial, tmp_path):
    fig = rp.plot_gallery(tutorial["nogrids"], n=4)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 4
    titles = [ax.get_title() for ax in panels]
    assert titles[-1] == "Problem 3 (failed)"  # picked last: ok ones first
    failed = panels[-1]
    assert len(_contour_sets(failed)) == 3  # inputs only
    assert any("solver produced NaN" in t.get_text() for t in failed.texts)
    assert all(len(_contour_sets(ax)) == 4 for ax in panels[:3])
    assert "4 problems" in fig._suptitle.get_text()
    rp.save_figure(fig, str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 20_000


def test_ragged_dimensions(ragged, tmp_path):
    """d = 1 problems are curves of -log p, d = 5 problems 2-D marginals."""
    dims = {}
    for pid in range(6):
        g = rp.problem_grids(ragged, pid)
        dims[pid] = g.dim
    assert {1, 5} <= set(dims.values())
    one = next(p for p, d in dims.items() if d == 1)
    five = next(p for p, d in dims.items() if d == 5)
    fig = rp.plot_problem(ragged, one)
    assert len(fig.axes[0].lines) >= 2
    assert fig.axes[0].get_ylabel() == r"$-\log p(x)$"
    fig = rp.plot_problem(ragged, five)
    assert _contour_sets(fig.axes[0])
    fig = rp.plot_gallery(ragged, list(range(6)), ncols=3)
    rp.save_figure(fig, str(tmp_path / "ragged.png"))


def test_marginal_window_of_a_d5_problem(ragged):
    """The computed window of a d > 2 problem covers the 2-D marginal (raybary.density's
    marginal_components) of every input and barycenter component, +- 3 sd, widened 8 %."""
    from raybary.density import marginal_components

    res = raybary.read_results(ragged)
    five = next(p for p in range(6) if rp.problem_grids(ragged, p).dim == 5)
    g = rp.problem_grids(ragged, five)
    problem = open_problem(res, five)
    bary = res.barycenters[res.barycenters.problem_id == five].sort_values("component")
    means = np.concatenate([x.means for x in problem.gmms]
                           + [np.stack([np.asarray(m) for m in bary["mean"]])])
    covs = np.concatenate([x.covs for x in problem.gmms]
                          + [np.stack([np.asarray(c).reshape(5, 5) for c in bary["cov"]])])
    m, c = marginal_components(means, covs, g.dims)
    assert m.shape == (len(means), 2) and c.shape == (len(means), 2, 2)
    np.testing.assert_allclose(c[:, 0, 1], covs[:, g.dims[0], g.dims[1]])
    want = default_bounds(m, c)
    pad = 0.08 * np.array([-(want[1] - want[0]), want[1] - want[0],
                           -(want[3] - want[2]), want[3] - want[2]])
    np.testing.assert_allclose(g.extent, want + pad)


def open_problem(res, problem_id: int):
    from raybary.storage import open_store

    row = res.problems[res.problems.problem_id == problem_id].iloc[0]
    return open_store(res.layout["input_url"]).read(int(row.position), int(row.position) + 1) \
        .problems[0]


def test_errors(tutorial, tmp_path):
    with pytest.raises(rp.PlotError, match="problem 99 is not in"):
        rp.plot_problem(tutorial["nogrids"], 99)
    with pytest.raises(rp.PlotError, match="not a raybary results directory"):
        rp.plot_problem(str(tmp_path / "nothing"), 0)
    with pytest.raises(rp.PlotError, match="no stored grids"):
        rp.plot_problem(tutorial["nogrids"], 0, source="stored")


def test_moved_input_store(tutorial, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(tutorial["nogrids"], out)
    moved = tmp_path / "moved.parquet"
    src = tutorial["root"] / "in.parquet"
    (shutil.copytree if src.is_dir() else shutil.copy)(src, moved)
    layout = out + "/_layout.json"
    import json

    with open(layout) as f:
        lay = json.load(f)
    lay["input_url"] = str(tmp_path / "gone.parquet")
    with open(layout, "w") as f:
        json.dump(lay, f)
    with pytest.raises(rp.PlotError, match="cannot read the input store"):
        rp.plot_problem(out, 0)
    assert len(_contour_sets(rp.plot_problem(out, 0, input_url=str(moved)).axes[0])) == 4


# ------------------------------------------------------------------ CLI
def test_cli_single_and_gallery(tutorial, tmp_path):
    runner = CliRunner()
    fig = tmp_path / "fig.png"
    r = runner.invoke(main, ["plot", tutorial["grids"], "--problem", "2", "-o", str(fig)])
    assert r.exit_code == 0, r.output
    assert fig.stat().st_size > 20_000
    gal = tmp_path / "gal.png"
    r = runner.invoke(main, ["plot", tutorial["grids"], "-p", "0,1", "-p", "3", "-o", str(gal),
                             "--dpi", "50"])
    assert r.exit_code == 0, r.output
    from matplotlib.image import imread

    h, w = imread(str(gal)).shape[:2]
    # 3 problems: 2 columns x 2 rows of 4.5 in panels + 0.6 in of title, at 50 dpi
    assert (w, h) == (450, 480)


def test_cli_errors(tutorial, tmp_path, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(main, ["plot", tutorial["grids"], "--problem", "42", "-o",
                             str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "problem 42 is not in" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(main, ["plot", tutorial["grids"], "--problem", "abc"])
    assert r.exit_code == 2 and "integers" in r.output
    r = runner.invoke(main, ["plot", tutorial["grids"], "-p", "1", "--bounds", "1,0,0,1"])
    assert r.exit_code == 2 and "xmin,xmax,ymin,ymax" in r.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    r = runner.invoke(main, ["plot", tutorial["grids"], "-p", "1", "-o", str(tmp_path / "y.png")])
    assert r.exit_code == 1 and "raybary[plot]" in r.output
    assert not (tmp_path / "y.png").exists()
