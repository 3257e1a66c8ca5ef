"""Runner pieces that need no Ray: options, one shard end to end, failure isolation, CLI refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import raybary
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
from raybary.runner.shard import problem_extents, process_shard, solve_isolated
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


def fake_solve(problems, *, bar_size, validate, **kw):
    """A stand-in for raybary.solve: barycenter = the first GMM (2 components)."""
    assert validate is False and bar_size == 2
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

    def counting(ps, **kw):
        calls.append(len(ps))
        return fake_solve(ps, **kw)

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
    summ = process_shard(store, writer, 0, solver, grid, solve_fn=fake_solve)
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
    (density.marginal_components); fail_shard's summary is a ShardSummary."""
    from raybary.density import marginal_components
    from raybary.runner.shard import ShardSummary, fail_shard

    store = generate(str(tmp_path / "r.parquet"), 12, family="random", dim=3, seed=4)
    p = store.read(0, 1).problems[0]
    means = np.concatenate([g.means for g in p.gmms])
    sd = np.sqrt(np.concatenate([np.diagonal(g.covs, axis1=1, axis2=2) for g in p.gmms]))
    want = [(means[:, 0] - 3 * sd[:, 0]).min(), (means[:, 0] + 3 * sd[:, 0]).max(),
            (means[:, 2] - 3 * sd[:, 2]).min(), (means[:, 2] + 3 * sd[:, 2]).max()]
    np.testing.assert_allclose(problem_extents(p, (0, 2)), want)
    m, c = marginal_components(means, np.concatenate([g.covs for g in p.gmms]), (2, 0))
    np.testing.assert_array_equal(m, means[:, [2, 0]])
    assert c.shape == (len(means), 2, 2) and np.allclose(c[:, 0, 0], sd[:, 2] ** 2)

    writer = ResultWriter(str(tmp_path / "out"), n_problems=12, shard_size=6, grid_shape=None,
                          input_url=store.url)
    writer.prepare()
    out = fail_shard(store, writer, 1, "gave up (test)")
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
        counts[dtype] = process_shard(store, writer, 0, solver, grid, solve_fn=fake_solve).counts
        df = read_results(writer.url).problems.set_index("position")
        if dtype == "float32":
            assert df.loc[1, "status"] == "invalid"
            assert "numerically singular" in df.loc[1, "error"] and "float64" in df.loc[1, "error"]
    assert counts == {"float32": {"ok": 2, "invalid": 1, "failed": 0},
                      "float64": {"ok": 3, "invalid": 0, "failed": 0}}
