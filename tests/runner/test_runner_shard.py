"""Runner pieces that need no Ray: options, one shard end to end, failure isolation, CLI refusal."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

import raybary
from raybary.batch.outcome import solve_isolated
from raybary.cli import main
from raybary.runner.options import (
    ExecOptions,
    GridOptions,
    SolverOptions,
    parse_bounds,
    parse_dims,
    parse_grid,
    recorded_options,
)
from raybary.runner.shard import fail_shard, problem_extents, process_shard
from raybary.storage import ResultsConflictError, ResultWriter, open_store, read_results
from raybary.storage.generate import generate, tutorial_problems
from raybary.types import Result


def test_option_parsing():
    assert parse_grid("50") == (50, 50)
    assert parse_grid("40x60") == (40, 60)
    assert parse_grid("none") is None
    with pytest.raises(ValueError):
        parse_grid("4x")
    assert parse_bounds("-1,2,-3,4.5") == (-1.0, 2.0, -3.0, 4.5)
    assert parse_bounds(None) is None and parse_bounds("auto") is None
    with pytest.raises(ValueError):
        parse_bounds("1,2,3")
    assert parse_dims("0,2") == (0, 2)
    with pytest.raises(ValueError):
        GridOptions(dims=(1, 1))
    with pytest.raises(ValueError):
        SolverOptions(epsilon=0.1, relative_epsilon=1e-3)
    with pytest.raises(ValueError):
        ExecOptions(shard_size=0)
    rec = recorded_options(SolverOptions(bar_size=3, epsilon=0.1), GridOptions(bounds=(0, 1, 0, 1)))
    assert rec["bar_size"] == 3 and rec["epsilon"] == 0.1 and "relative_epsilon" not in rec
    assert rec["grid_bounds"] == [0.0, 1.0, 0.0, 1.0] and rec["grid_dims"] == [0, 1]


# -------------------------------------------------------------- fake solver
POISON = 0.123456  # lambdas[0] of the problem that makes the fake solver raise
NAN_PROBLEM = 0.654321  # lambdas[0] of the problem the fake solver returns as 'failed'


def fake_solve(problems, options, ids):
    """A stand-in for the solver: barycenter = the first GMM (2 components)."""
    assert options.bar_size == 2 and len(ids) == len(problems)
    if any(abs(p.lambdas[0] - POISON) < 1e-12 for p in problems):
        raise FloatingPointError("poisoned batch")
    out = []
    for p in problems:
        g = p.gmms[0]
        bad = abs(p.lambdas[0] - NAN_PROBLEM) < 1e-12
        out.append(Result(weights=g.weights, means=g.means, covs=g.covs,
                          objective=float("nan") if bad else float(g.means.sum()),
                          converged=True, iterations=3, marginal_error=0.0,
                          status="failed" if bad else "ok",
                          error="solver produced non-finite values" if bad else None))
    return out


def test_solve_isolated_bisects_to_the_poison_problem():
    probs = tutorial_problems(9)
    calls = []

    def counting(ps, options, ids):
        calls.append(len(ps))
        return fake_solve(ps, options, ids)

    probs[5] = raybary.Problem(probs[5].gmms, np.r_[POISON, probs[5].lambdas[1:]])
    out = solve_isolated(probs, SolverOptions(bar_size=2), counting)
    assert [r.status for r in out] == ["ok"] * 5 + ["failed"] + ["ok"] * 3
    assert "FloatingPointError: poisoned batch" in out[5].error
    assert out[0].objective == probs[0].gmms[0].means.sum()
    assert len(calls) <= 2 * int(np.ceil(np.log2(9))) + 1  # bisection, not one by one


@pytest.fixture
def small_store(tmp_path):
    return generate(str(tmp_path / "p.parquet"), 12, family="tutorial", seed=3)


def test_process_shard_isolates_failures_and_writes_grids(tmp_path, small_store, monkeypatch):
    store = small_store
    shard0 = store.read(0, 6)
    poison_id, nan_id = int(shard0.problem_ids[2]), int(shard0.problem_ids[4])
    real_read = type(store).read

    def read(self, start, stop, **kw):  # inject a poison and a non-finite problem
        s = real_read(self, start, stop, **kw)
        for i, pid in enumerate(s.problem_ids):
            if pid in (poison_id, nan_id):
                p = s.problems[i]
                lam = POISON if pid == poison_id else NAN_PROBLEM
                s.problems[i] = raybary.Problem(p.gmms, np.r_[lam, p.lambdas[1:]])
        return s

    monkeypatch.setattr(type(store), "read", read)
    solver, grid = SolverOptions(bar_size=2), GridOptions(shape=(6, 7), input_gmms=3)
    writer = ResultWriter(str(tmp_path / "out"), n_problems=store.n_problems, shard_size=6,
                          grid_shape=grid.shape, input_grid_gmms=3,
                          options=recorded_options(solver, grid), input_url=store.url)
    writer.prepare()
    summ = process_shard(store, writer.committer, 0, solver, grid, solve_fn=fake_solve)
    assert summ.counts == {"ok": 4, "invalid": 0, "failed": 2}
    res = read_results(writer.url)
    df = res.problems.set_index("problem_id")
    assert df.loc[poison_id, "status"] == "failed"
    assert "poisoned batch" in df.loc[poison_id, "error"]
    assert df.loc[nan_id, "status"] == "failed" and "non-finite" in df.loc[nan_id, "error"]
    ok_ids = [int(i) for i in shard0.problem_ids if i not in (poison_id, nan_id)]
    assert sorted(df.index[df.status == "ok"]) == sorted(ok_ids)
    assert set(res.barycenters.problem_id) == set(ok_ids)
    g = res.grids(0, 6, inputs=True)
    for row, pid in enumerate(shard0.problem_ids):
        p = shard0.problems[row]
        ext = problem_extents(p)
        np.testing.assert_allclose(g.extent[row], ext)
        # extents cover every input mean +- 3 sd
        means = np.concatenate([q.means for q in p.gmms])
        assert np.all(means[:, 0] > ext[0]) and np.all(means[:, 0] < ext[1])
        for j in range(3):
            want, _ = raybary.log_density_grid(p.gmms[j], shape=(6, 7), bounds=ext)
            np.testing.assert_allclose(g.inputs[row, j], want, rtol=1e-4, atol=1e-3)
        if pid in (poison_id, nan_id):
            assert np.isnan(g.barycenter[row]).all()
        else:
            want, _ = raybary.log_density_grid(p.gmms[0], shape=(6, 7), bounds=ext)
            np.testing.assert_allclose(g.barycenter[row], want, rtol=1e-4, atol=1e-3)


def test_cli_refuses_output_of_other_options(tmp_path, small_store):
    out = str(tmp_path / "out")
    writer = ResultWriter(out, n_problems=small_store.n_problems, shard_size=6, grid_shape=(8, 8),
                          options=recorded_options(SolverOptions(bar_size=2),
                                                   GridOptions(shape=(8, 8))),
                          input_url=small_store.url)
    writer.prepare()
    # refused before Ray is started: --bar-size differs
    r = CliRunner().invoke(main, ["run", small_store.url, out, "--bar-size", "3", "--grid", "8",
                                  "--shard-size", "6", "-q"])
    assert r.exit_code == 1, r.output
    assert "bar_size: 2 (existing) vs 3 (now)" in r.output
    # the Python API raises the storage layer's error
    from raybary.runner import run

    with pytest.raises(ResultsConflictError, match="grid_shape"):
        run(small_store.url, out, SolverOptions(bar_size=2), GridOptions(shape=(9, 9)),
            ExecOptions(shard_size=6), stream=None)
    assert json.load(open(f"{out}/_layout.json"))["options"]["bar_size"] == 2


def test_cli_usage_errors():
    r = CliRunner().invoke(main, ["run", "in.parquet", "out", "--grid", "8xx"])
    assert r.exit_code == 2 and "--grid" in r.output
    r = CliRunner().invoke(main, ["run", "in.parquet", "out", "--epsilon", "0.1",
                                  "--relative-epsilon", "0.01"])
    assert r.exit_code == 2 and "not both" in r.output


def test_grid_extents_of_a_marginal_and_the_shard_summary(tmp_path):
    """problem_extents: every input component's mean +- 3 sd on coordinates ``dims``
    (density.marginal_components) and more (density.covering_extent); fail_shard's
    summary is a ShardSummary."""
    from raybary.density import covering_extent, marginal_components
    from raybary.runner.shard import ShardSummary

    store = generate(str(tmp_path / "r.parquet"), 12, family="random", dim=3, seed=4)
    p = store.read(0, 1).problems[0]
    means = np.concatenate([g.means for g in p.gmms])
    sd = np.sqrt(np.concatenate([np.diagonal(g.covs, axis1=1, axis2=2) for g in p.gmms]))
    ext = problem_extents(p, (0, 2))
    np.testing.assert_allclose(ext, covering_extent(p.gmms, (0, 2)))
    assert (means[:, 0] - 3 * sd[:, 0] > ext[0]).all() and (means[:, 0] + 3 * sd[:, 0] < ext[1]).all()
    assert (means[:, 2] - 3 * sd[:, 2] > ext[2]).all() and (means[:, 2] + 3 * sd[:, 2] < ext[3]).all()
    m, c = marginal_components(means, np.concatenate([g.covs for g in p.gmms]), (2, 0))
    np.testing.assert_array_equal(m, means[:, [2, 0]])
    assert c.shape == (len(means), 2, 2) and np.allclose(c[:, 0, 0], sd[:, 2] ** 2)

    writer = ResultWriter(str(tmp_path / "out"), n_problems=12, shard_size=6, grid_shape=None,
                          input_url=store.url)
    writer.prepare()
    out = fail_shard(store, writer.committer, 1, SolverOptions(), "gave up (test)")
    assert isinstance(out, ShardSummary) and out.gave_up and out.n_problems == 6
    assert (out.shard, out.start, out.stop) == (1, 6, 12) and out.counts["failed"] == 6
    assert out.peak_rss_mb > 0 and out.pid > 0


def test_open_store_of_missing_input_is_an_error(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)):
        open_store(str(tmp_path / "nope.parquet"))


def test_a_covariance_float32_cannot_hold_is_invalid_in_float32_runs_only(tmp_path):
    from raybary.storage import write_problems

    probs = tutorial_problems(3)
    g = probs[1].gmms[0]
    ill = raybary.GMM(g.weights, g.means, np.stack([np.diag([1.0, 1e-8])] * len(g.weights)))
    probs[1] = raybary.Problem((ill, *probs[1].gmms[1:]), probs[1].lambdas)
    store = write_problems(str(tmp_path / "ill.parquet"), probs)
    counts = {}
    for dtype in ("float32", "float64"):
        solver, grid = SolverOptions(bar_size=2, dtype=dtype), GridOptions(shape=None)
        writer = ResultWriter(str(tmp_path / dtype), n_problems=3, shard_size=3, grid_shape=None,
                              options=recorded_options(solver, grid), input_url=store.url)
        writer.prepare()
        counts[dtype] = process_shard(store, writer.committer, 0, solver, grid, solve_fn=fake_solve).counts
        df = read_results(writer.url).problems.set_index("position")
        if dtype == "float32":
            assert df.loc[1, "status"] == "invalid"
            assert "numerically singular" in df.loc[1, "error"] and "float64" in df.loc[1, "error"]
    assert counts == {"float32": {"ok": 2, "invalid": 1, "failed": 0},
                      "float64": {"ok": 3, "invalid": 0, "failed": 0}}
    # a shard given up in a float32 run reads the problems as the run does: the
    # problem float32 cannot hold stays invalid, with its message, not failed
    solver = SolverOptions(bar_size=2, dtype="float32")
    writer = ResultWriter(str(tmp_path / "gave-up"), n_problems=3, shard_size=3, grid_shape=None,
                          options=recorded_options(solver, GridOptions(shape=None)),
                          input_url=store.url)
    writer.prepare()
    out = fail_shard(store, writer.committer, 0, solver, "not solved (test)")
    assert out.counts == {"ok": 0, "invalid": 1, "failed": 2}
    df = read_results(writer.url).problems.set_index("position")
    assert df.loc[1, "status"] == "invalid" and "numerically singular" in df.loc[1, "error"]
    assert (df.loc[[0, 2], "error"] == "not solved (test)").all()


# -------------------------------------------------------------- extents and curves
def far_solve(problems, options, ids):
    """A stand-in for the solver whose barycenter (the first GMM, moved by +200 on
    every coordinate and widened) lies outside every input: the extent must follow it."""
    out = fake_solve(problems, options, ids)
    return [Result(weights=r.weights, means=r.means + 200.0, covs=4.0 * r.covs,
                   objective=r.objective, converged=True, iterations=3, marginal_error=0.0)
            for r in out]


def _inside(ext, means, covs, axes):
    """Every component's mean +- 3 sd on ``axes`` lies strictly inside ``ext``."""
    sd = np.sqrt(np.diagonal(covs, axis1=1, axis2=2))
    for k, a in enumerate(axes):
        lo, hi = ext[2 * k], ext[2 * k + 1]
        if not ((means[:, a] - 3 * sd[:, a] > lo).all() and (means[:, a] + 3 * sd[:, a] < hi).all()):
            return False
    return True


def test_grid_extents_hold_every_input_and_the_barycenter(tmp_path):
    """On generated tutorial problems, the stored extent of each problem holds every
    input component's and every barycenter component's mean +- 3 sd (the barycenter,
    known after solving, lies far outside the inputs here), with a margin."""
    store = generate(str(tmp_path / "t.parquet"), 6, family="tutorial", seed=5)
    solver, grid = SolverOptions(bar_size=2), GridOptions(shape=(5, 6))
    writer = ResultWriter(str(tmp_path / "out"), n_problems=6, shard_size=6,
                          grid_shape=grid.shape, options=recorded_options(solver, grid),
                          input_url=store.url)
    writer.prepare()
    process_shard(store, writer.committer, 0, solver, grid, solve_fn=far_solve)
    res = read_results(writer.url)
    g = res.grids(0, 6)
    shard = store.read(0, 6)
    bary = res.barycenters
    for row, p in enumerate(shard.problems):
        b = bary[bary.problem_id == shard.problem_ids[row]].sort_values("component")
        bm = np.stack(b["mean"].to_numpy())
        bc = np.stack(b["cov"].to_numpy()).reshape(-1, 2, 2)
        ext = g.extent[row]
        for means, covs in [(q.means, q.covs) for q in p.gmms] + [(bm, bc)]:
            assert _inside(ext, means, covs, (0, 1)), (row, ext)
        result = Result(b.weight.to_numpy(), bm, bc, 0.0, True, 1, 0.0)
        np.testing.assert_allclose(ext, problem_extents(p, (0, 1), result), rtol=1e-6, atol=1e-5)
        # inputs only would cut the barycenter off
        assert not _inside(problem_extents(p), bm, bc, (0, 1))


def _numpy_log_density_1d(weights, means, variances, x):
    """log sum_k w_k N(x; m_k, v_k) in NumPy (float64)."""
    comp = (np.log(weights)[:, None] - 0.5 * np.log(2 * np.pi * variances)[:, None]
            - 0.5 * (x[None, :] - means[:, None]) ** 2 / variances[:, None])
    top = comp.max(axis=0)
    return top + np.log(np.exp(comp - top).sum(axis=0))


def test_d1_problems_get_curves(tmp_path):
    """A shard with d = 1 and d = 2 problems: the d = 1 ones get curves of max(H, W)
    points (the barycenter's and the inputs'), the d = 2 ones grids; each has NaN in
    the other's arrays."""
    from raybary.storage import write_problems

    probs = tutorial_problems(3, dim=1, seed=2) + tutorial_problems(2, dim=2, seed=2)
    store = write_problems(str(tmp_path / "mixed.parquet"), probs)
    solver, grid = SolverOptions(bar_size=2), GridOptions(shape=(6, 9), input_gmms=2)
    writer = ResultWriter(str(tmp_path / "out"), n_problems=5, shard_size=5,
                          grid_shape=grid.shape, input_grid_gmms=2,
                          options=recorded_options(solver, grid), input_url=store.url)
    writer.prepare()
    assert writer.curve_length == 9
    process_shard(store, writer.committer, 0, solver, grid, solve_fn=far_solve)
    res = read_results(writer.url)
    assert (res.problems.status == "ok").all()
    curves, grids = res.curves(0, 5, inputs=True), res.grids(0, 5, inputs=True)
    assert curves.curve.shape == (5, 9) and curves.inputs.shape == (5, 2, 9)
    assert curves.extent.shape == (5, 2) and curves.curve.dtype == np.float32
    bary = res.barycenters
    for row, p in enumerate(probs):
        if p.dim == 2:
            assert np.isnan(curves.curve[row]).all() and np.isnan(curves.extent[row]).all()
            assert np.isfinite(grids.barycenter[row]).all()
            continue
        assert np.isnan(grids.barycenter[row]).all() and np.isnan(grids.extent[row]).all()
        assert curves.problem_id[row] == res.problems.problem_id[row]
        b = bary[bary.problem_id == res.problems.problem_id[row]].sort_values("component")
        w = b.weight.to_numpy()
        m = np.array([x[0] for x in b["mean"]])
        v = np.array([x[0] for x in b["cov"]])
        lo, hi = curves.extent[row]
        x = np.linspace(lo, hi, 9)
        np.testing.assert_allclose(curves.curve[row], _numpy_log_density_1d(w, m, v, x),
                                   rtol=1e-4, atol=1e-4)
        for j in range(2):
            g = p.gmms[j]
            want = _numpy_log_density_1d(g.weights, g.means[:, 0], g.covs[:, 0, 0], x)
            np.testing.assert_allclose(curves.inputs[row, j], want, rtol=1e-4, atol=1e-4)
        # the curve's window holds every input and barycenter component's mean +- 3 sd
        for means, covs in [(q.means, q.covs) for q in p.gmms] + [(m[:, None], v[:, None, None])]:
            assert _inside(curves.extent[row], means, covs, (0,))


def test_run_report_records_rate_and_memory_as_the_run_grows():
    from raybary.runner.driver import MILESTONES, RunReport
    from raybary.runner.shard import ShardSummary, current_rss_mb, peak_rss_mb

    report = RunReport(input="in", output="out", n_problems=100, n_shards=10, shard_size=10,
                       shards_skipped=2, problems_skipped=20)
    t0 = time.perf_counter() - 1.0
    for shard in range(2, 10):
        report.add_shard(ShardSummary(shard, 10 * shard, 10 * shard + 10, {"ok": 10},
                                      peak_rss_mb=100.0 + shard, pid=1, node="n"), t0)
    marks = report.milestones
    assert [m["fraction"] for m in marks] == list(MILESTONES)
    assert [m["problems"] for m in marks] == [10, 40, 80]  # 10%, 50%, 100% of the 80 to run
    assert all(m["problems_per_s"] > 0 and m["driver_rss_mb"] > 0 for m in marks)
    assert marks[-1]["actor_peak_rss_mb"] == 109.0 and marks[0]["actor_peak_rss_mb"] == 102.0
    assert 0 < current_rss_mb() <= peak_rss_mb() + 1  # now, at most the peak so far
