"""The runner's whole-shard grids (raybary/runner/grids.py) against the implementation
before it (kept in benchmarks/bench_grids.py as ``old_shard_grids``), against
float64 log-densities and against scipy: d = 1 curves, d = 2 grids and d = 3
marginals in one shard, with invalid (``None``), failed and ok rows mixed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import raybary
from raybary.runner import grids
from raybary.runner.options import GridOptions
from raybary.runner.shard import problem_extents, shard_grids
from raybary.storage.generate import tutorial_problems
from raybary.types import Result

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_grids.py as a module (the old implementation, the stand-ins)."""
    spec = importlib.util.spec_from_file_location("bench_grids", ROOT / "benchmarks" / "bench_grids.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mixed_shard(bench):
    """A shard of d = 1, 2 and 3 problems; rows 2 and 9 invalid (``None``), rows 1, 6
    and 11 failed (their results all NaN: never used), the rest ok (a barycenter of
    3 components)."""
    problems = (tutorial_problems(4, dim=1, seed=1) + tutorial_problems(5, dim=2, seed=2)
                + tutorial_problems(4, dim=3, seed=3))
    results = [bench.stand_in(p, 3) for p in problems]
    statuses = ["ok"] * len(problems)
    for i in (2, 9):
        problems[i], results[i], statuses[i] = None, None, "invalid"
    for i in (1, 6, 11):
        r = results[i]
        results[i] = Result(r.weights * np.nan, r.means * np.nan, r.covs * np.nan, np.nan,
                            False, 1, np.nan, status="failed", error="test")
        statuses[i] = "failed"
    return problems, results, statuses


GRIDS = [GridOptions(shape=(6, 7)),
         GridOptions(shape=(5, 4), dims=(2, 0), input_gmms=2),
         GridOptions(shape=(8, 9), dims=(1, 0), input_gmms=3),
         GridOptions(shape=(6, 5), bounds=(-30.0, 30.0, -40.0, 40.0), input_gmms=3)]


def _float64_rows(problems, results, statuses, grid, new):
    """Each stored row recomputed in float64 by the public functions, at the stored extent."""
    ref = {k: np.full(getattr(new, k).shape, np.nan) for k in ("barycenter", "inputs",
                                                               "curve", "curve_inputs")
           if getattr(new, k) is not None}
    for i, p in enumerate(problems):
        if p is None:
            continue
        gmms = {"bary": results[i].gmm()} if statuses[i] == "ok" else {}
        gmms.update({j: g for j, g in enumerate(p.gmms[: grid.input_gmms])})
        for key, g in gmms.items():
            if p.dim == 1:
                lo, hi = new.curve_extent[i]
                x = np.linspace(lo, hi, new.curve.shape[1])[:, None]
                value, field = raybary.log_density(g, x), "curve"
            elif max(grid.dims) < p.dim:
                value, _ = raybary.log_density_grid(g, grid.shape, new.extent[i], dims=grid.dims,
                                                    dtype="float64")
                field = "barycenter"
            else:
                continue
            if key == "bary":
                ref[field][i] = value
            else:
                ref[field + "_inputs" if field == "curve" else "inputs"][i, key] = value
    return ref


@pytest.mark.parametrize("grid", GRIDS, ids=["d2", "marginal-2-0-J2", "swapped-J3", "fixed-J3"])
def test_shard_grids_match_the_old_path_and_float64(bench, mixed_shard, grid):
    problems, results, statuses = mixed_shard
    new = shard_grids(problems, results, statuses, grid, 11)
    old = bench.old_shard_grids(problems, results, statuses, grid, 11)
    ref = _float64_rows(problems, results, statuses, grid, new)
    for field in new._fields:
        a, b = getattr(old, field), getattr(new, field)
        if a is None:
            assert b is None, field
            continue
        assert b.shape == a.shape and b.dtype == a.dtype, field
        # NaN rows exactly as before: invalid problems, dims outside d, not-ok barycenters
        np.testing.assert_array_equal(np.isnan(b), np.isnan(a), err_msg=field)
        if "extent" in field:
            np.testing.assert_array_equal(b, a, err_msg=field)  # bit for bit
        else:
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3, err_msg=field)
            np.testing.assert_allclose(b, ref[field], rtol=2e-5, atol=1e-4, err_msg=field)
    # which rows hold what
    assert np.isnan(new.barycenter[[1, 2, 6, 9, 11]]).all()
    assert np.isfinite(new.curve[[0, 3]]).all() and np.isnan(new.curve[4:]).all()
    d2 = [4, 5, 7, 8]
    assert np.isfinite(new.extent[[10, 11, 12]]).all() and np.isfinite(new.barycenter[[10, 12]]).all()
    if max(grid.dims) >= 2:  # dims outside d = 2: no grid
        assert np.isnan(new.extent[d2]).all() and np.isnan(new.barycenter[d2]).all()
    else:
        assert np.isfinite(new.extent[d2]).all() and np.isfinite(new.barycenter[d2]).all()
    if grid.bounds is None:
        for i in (10, 11):  # ok (inputs and barycenter) and failed (inputs alone)
            want = problem_extents(problems[i], grid.dims,
                                   results[i] if statuses[i] == "ok" else None)
            np.testing.assert_array_equal(new.extent[i], want)


def _grid_points(extent, shape):
    h, w = shape
    gx, gy = np.meshgrid(np.linspace(extent[0], extent[1], w), np.linspace(extent[2], extent[3], h))
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def test_blocks_padding_and_many_components_against_scipy(monkeypatch):
    """log_density_blocks in blocks of 4 GMMs (padded last blocks), GMMs of 1 to 20
    components (the loop past UNROLL), a component of weight 0 and a GMM of none:
    the same as scipy's mixture log-density (a GMM of no component: -inf)."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal as mvn

    monkeypatch.setattr(grids, "BLOCK", 4)
    rng = np.random.default_rng(7)
    sizes = np.array([1, 2, 5, 3, 20, 2, 5, 0, 17, 2, 2, 1])
    gmms, extents = [], []
    for k in sizes:
        a = rng.normal(size=(k, 2, 2))
        w = rng.random(k)
        if k == 5:
            w[1] = 0.0
        gmms.append((w / max(w.sum(), 1e-300), rng.normal(scale=3, size=(k, 2)),
                     a @ a.transpose(0, 2, 1) + 0.2 * np.eye(2)))
        extents.append([-6 - rng.random(), 5 + rng.random(), -7 + rng.random(), 6])
    st = grids.stack_gmms(gmms, 2, (0, 1))
    extents = np.array(extents)
    coef = grids.grid_coefficients(st, np.repeat(extents, sizes, axis=0))
    shape = (7, 5)
    out = grids.log_density_blocks(coef, st.sizes, shape)
    assert out.shape == (len(sizes), *shape) and out.dtype == np.float32
    for (w, m, c), ext, got in zip(gmms, extents, out):
        if not len(w):
            assert np.all(got == -np.inf)
            continue
        x = _grid_points(ext, shape)
        with np.errstate(divide="ignore"):
            comp = [np.log(wk) + mvn(mk, ck).logpdf(x) for wk, mk, ck in zip(w, m, c)]
        want = logsumexp(np.stack(comp), axis=0).reshape(shape)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)


def test_curves_against_numpy_and_stacked_extents_against_covering_extent():
    """d = 1: the curves' values are the mixture's log-density at linspace(lo, hi, L);
    stacked_extents of several problems at once equals covering_extent of each,
    bit for bit, on one or two coordinates of d = 3 problems."""
    from raybary.density import covering_extent

    problems = tutorial_problems(5, dim=3, seed=9)
    for dims in [(0,), (2, 1)]:
        gmms = [(g.weights, g.means, g.covs) for p in problems for g in p.gmms]
        st = grids.stack_gmms(gmms, 3, dims)
        per_problem = [sum(g.n_components for g in p.gmms) for p in problems]
        got = grids.stacked_extents(st, np.cumsum(per_problem) - per_problem)
        want = np.stack([covering_extent(p.gmms, dims) for p in problems])
        np.testing.assert_array_equal(got, want)
    one_d = tutorial_problems(3, dim=1, seed=9)
    curves = shard_grids(one_d, [None] * 3, ["failed"] * 3, GridOptions(shape=(4, 4), input_gmms=3),
                         33)
    assert np.isnan(curves.curve).all() and np.isnan(curves.barycenter).all()
    for i, p in enumerate(one_d):
        lo, hi = curves.curve_extent[i]
        x = np.linspace(lo, hi, 33)
        for j, g in enumerate(p.gmms):
            comp = (np.log(g.weights)[:, None] - 0.5 * np.log(2 * np.pi * g.covs[:, 0, 0])[:, None]
                    - 0.5 * (x - g.means[:, :1]) ** 2 / g.covs[:, 0, :1])
            want = np.logaddexp.reduce(comp, axis=0)
            np.testing.assert_allclose(curves.curve_inputs[i, j], want, rtol=2e-6, atol=2e-5)
