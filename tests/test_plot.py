"""raybary.plot and `raybary plot`: figures from stored results (no Ray needed).

Results are written the way the runner writes them (ShardCommitter.commit_shard)
from a real solve of small problems: the tutorial family (with and without
stored grids, one problem marked failed), a ragged random family (d = 1 and
d = 5, i.e. curves and 2-D marginals) and d = 1 tutorial problems whose curves
are stored by the runner's own code (runner.shard.shard_grids).
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
from raybary.density import (  # noqa: E402
    OUTER_LEVEL,
    covering_extent,
    default_bounds,
    log_density,
    log_density_grid,
    marginal_components,
)
from raybary.storage.generate import generate  # noqa: E402
from raybary.storage.results import ResultWriter, ShardGrids  # noqa: E402
from raybary.types import BatchOutcome  # noqa: E402

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
            kw["extent"] = ext
            kw["barycenter"] = np.stack([
                np.full(GRID, np.nan) if r is None else log_density_grid(r.gmm(), GRID, x)[0]
                for r, x in zip(rows, ext)])
            if input_gmms:
                kw["inputs"] = np.stack([
                    np.stack([log_density_grid(g, GRID, x)[0] for g in p.gmms[:input_gmms]])
                    for p, x in zip(probs, ext)])
        outcome = BatchOutcome(shard.problem_ids[s:e], statuses, errors, rows, 0.01)
        writer.committer.commit_shard(i, outcome, ShardGrids(**kw) if kw else None)
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
    stored = rp.problem_grids(tutorial["grids"], 1, source="stored")
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
    full = rp.problem_grids(tutorial["grids"], 1, source="stored")
    part = rp.problem_grids(tutorial[which], 1, source="stored")
    assert part.source == "mixed" and part.inputs.shape == (3, *GRID)
    np.testing.assert_allclose(part.extent, full.extent)
    np.testing.assert_allclose(part.inputs, full.inputs, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(part.barycenter, full.barycenter)


def _components(res, problem, problem_id, dims=(0, 1)):
    """Means and covariances of every input and barycenter component, marginalised on dims."""
    b = res.barycenters
    b = b[b.problem_id == problem_id].sort_values("component")
    d = problem.dim
    means = np.concatenate([x.means for x in problem.gmms]
                           + [np.stack([np.asarray(m) for m in b["mean"]])])
    covs = np.concatenate([x.covs for x in problem.gmms]
                          + [np.stack([np.asarray(c).reshape(d, d) for c in b["cov"]])])
    return marginal_components(means, covs, dims)


def _inside(lo, hi, means, sds):
    return bool(((means - 3 * sds) > lo).all() and ((means + 3 * sds) < hi).all())


@pytest.mark.parametrize("which", ["grids", "nogrids"])
def test_default_window_holds_every_component_and_is_smooth(tutorial, which):
    """By default the densities are computed here (the input store is readable), on a
    fine grid (smooth contours at 10 inches) over a window that holds every input and
    barycenter component's mean +- 3 sd; the figure's axes show all of that window."""
    res = raybary.read_results(tutorial[which])
    for pid in range(3):
        g = rp.problem_grids(tutorial[which], pid)
        assert g.source == "computed" and g.inputs.shape == (3, *rp.DEFAULT_SHAPE)
        assert min(g.barycenter.shape) >= 200
        m, c = _components(res, open_problem(res, pid), pid)
        sd = np.sqrt(np.diagonal(c, axis1=1, axis2=2))
        assert _inside(g.extent[0], g.extent[1], m[:, 0], sd[:, 0])
        assert _inside(g.extent[2], g.extent[3], m[:, 1], sd[:, 1])
        ax = rp.plot_problem(tutorial[which], pid).axes[0]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert _inside(x0, x1, m[:, 0], sd[:, 0]) and _inside(y0, y1, m[:, 1], sd[:, 1])
        # the outermost contour (-log p = 10) is nowhere cut by the frame
        for neg in [-x for x in (*g.inputs, g.barycenter)]:
            edge = np.concatenate([neg[0], neg[-1], neg[:, 0], neg[:, -1]])
            assert (edge > rp.LEVELS[-1]).all()
    assert rp.LEVELS[-1] == OUTER_LEVEL


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
    """The computed window of a d > 2 problem is density.covering_extent of the 2-D
    marginals (raybary.density's marginal_components) of every input and barycenter
    component: it holds their means +- 3 sd."""
    res = raybary.read_results(ragged)
    five = next(p for p in range(6) if rp.problem_grids(ragged, p).dim == 5)
    g = rp.problem_grids(ragged, five)
    problem = open_problem(res, five)
    m, c = _components(res, problem, five, g.dims)
    assert m.shape[1:] == (2,) and c.shape[1:] == (2, 2)
    bary = res.barycenters[res.barycenters.problem_id == five]
    gmms = [*problem.gmms, raybary.GMM(bary.weight.to_numpy(),
                                       np.stack([np.asarray(x) for x in bary["mean"]]),
                                       np.stack([np.asarray(x).reshape(5, 5) for x in bary["cov"]]))]
    np.testing.assert_allclose(g.extent, covering_extent(gmms, g.dims))
    sd = np.sqrt(np.diagonal(c, axis1=1, axis2=2))
    assert _inside(g.extent[0], g.extent[1], m[:, 0], sd[:, 0])
    assert _inside(g.extent[2], g.extent[3], m[:, 1], sd[:, 1])


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


def test_stored_grids_when_the_input_store_is_gone(tutorial, tmp_path):
    """source='auto' draws the run's stored grids (with a warning) when the input
    store cannot be read; with a readable one it computes them."""
    import json

    out = str(tmp_path / "out")
    shutil.copytree(tutorial["grids"], out)
    with open(out + "/_layout.json") as f:
        lay = json.load(f)
    lay["input_url"] = str(tmp_path / "gone.parquet")
    with open(out + "/_layout.json", "w") as f:
        json.dump(lay, f)
    with pytest.warns(UserWarning, match="drawing the grids the run stored"):
        g = rp.problem_grids(out, 1)
    assert g.source == "stored" and g.barycenter.shape == GRID and g.inputs.shape == (3, *GRID)
    assert rp.problem_grids(tutorial["grids"], 1).source == "computed"


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


# ------------------------------------------------------------------ d = 1
def _numpy_log_density_1d(gmm, x):
    w, m, v = gmm.weights, gmm.means[:, 0], gmm.covs[:, 0, 0]
    comp = (np.log(w)[:, None] - 0.5 * np.log(2 * np.pi * v)[:, None]
            - 0.5 * (x[None, :] - m[:, None]) ** 2 / v[:, None])
    top = comp.max(axis=0)
    return top + np.log(np.exp(comp - top).sum(axis=0))


@pytest.fixture(scope="module")
def one_d(tmp_path_factory):
    """d = 1 tutorial problems, solved, committed with the curves the runner computes."""
    from raybary.runner.options import GridOptions
    from raybary.runner.shard import shard_grids
    from raybary.storage import write_problems
    from raybary.storage.generate import tutorial_problems

    root = tmp_path_factory.mktemp("plot-1d")
    problems = tutorial_problems(3, dim=1, seed=4)
    store = write_problems(str(root / "in.parquet"), problems)
    results = raybary.solve(problems, bar_size=3)
    writer = ResultWriter(str(root / "out"), n_problems=3, shard_size=3, grid_shape=GRID,
                          input_grid_gmms=3, options={"bar_size": 3, "grid_dims": [0, 1]},
                          input_url=store.url)
    writer.prepare(overwrite=True)
    grids = shard_grids(problems, results, ["ok"] * 3, GridOptions(shape=GRID, input_gmms=3),
                        writer.curve_length)
    writer.committer.commit_shard(
        0, BatchOutcome(store.problem_ids(), ["ok"] * 3, [None] * 3, results, 0.01), grids)
    writer.finalize({})
    return {"out": writer.url, "problems": problems, "results": results}


@pytest.mark.parametrize("source", ["auto", "stored"])
def test_d1_figure_draws_the_curves(one_d, source, tmp_path):
    """A d = 1 problem: the barycenter's curve and the inputs' on one axis; the data
    drawn are -log p at the curve's points (computed: max(H, W) of the default grid;
    stored: the run's curve of max(H, W) = 48 points), and the window holds every
    component's mean +- 3 sd."""
    pid = 1
    fig = rp.plot_problem(one_d["out"], pid, source=source)
    ax = fig.axes[0]
    assert ax.get_ylabel() == r"$-\log p(x)$"
    labels = [line.get_label() for line in ax.lines]
    assert labels[:3] == [f"GMM {j + 1} (λ={one_d['problems'][pid].lambdas[j]:.2f})"
                          for j in range(3)]
    assert labels[3] == "Barycenter (n=3)"
    points = max(rp.DEFAULT_SHAPE) if source == "auto" else max(GRID)
    gmms = [*one_d["problems"][pid].gmms, one_d["results"][pid].gmm()]
    for line, gmm in zip(ax.lines, gmms):
        x, y = line.get_xdata(), line.get_ydata()
        assert len(x) == points
        np.testing.assert_allclose(y, -_numpy_log_density_1d(gmm, x), rtol=1e-4, atol=1e-4)
    x0, x1 = ax.get_xlim()
    for gmm in gmms:
        assert _inside(x0, x1, gmm.means[:, 0], np.sqrt(gmm.covs[:, 0, 0]))
    g = rp.problem_grids(one_d["out"], pid, source=source)
    assert g.dim == 1 and g.source == ("computed" if source == "auto" else "stored")
    assert np.isnan(g.extent[2:]).all()
    out = rp.save_figure(fig, str(tmp_path / "curve.png"))
    from matplotlib.image import imread

    assert imread(out)[..., :3].std() > 0.02


def test_cli_plots_a_d1_problem(one_d, tmp_path):
    out = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["plot", one_d["out"], "--problem", "0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
