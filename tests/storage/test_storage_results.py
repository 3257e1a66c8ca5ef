"""ResultWriter / read_results: atomic shard commits, rewrites, read-back with three tools."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

import raybary
from raybary.cli import main
from raybary.storage import ResultsConflictError, ResultWriter, read_results
from raybary.storage.results import OutputLease, ShardGrids
from raybary.types import BatchOutcome, Result

H, W = 6, 5
OPTIONS = {"epsilon": 0.1, "n": 3, "scale_free": False, "init": "kmeans", "tol": [1e-6, 1e-9]}


SIZES = (2, 3)  # the components of a fake result's two input GMMs


def fake_plans(pid: int, n: int, shift: float) -> list[np.ndarray]:
    """Distinct values per problem, gmm, row and column (read back exactly)."""
    return [np.arange(n * k, dtype=float).reshape(n, k) / 100 + j + pid + shift
            for j, k in enumerate(SIZES)]


def fake_result(pid: int, n: int = 3, d: int = 2, shift: float = 0.0) -> Result:
    return Result(
        weights=np.full(n, 1.0 / n),
        means=np.arange(n * d, dtype=float).reshape(n, d) + pid + shift,
        covs=np.tile(np.eye(d), (n, 1, 1)) * (1 + pid),
        objective=10.0 + pid + shift,
        converged=pid % 2 == 0,
        iterations=5 + pid,
        marginal_error=1e-7,
        costs=np.array([4.0, 16.0]) + pid + shift,
        plans=fake_plans(pid, n, shift),
    )


def make_writer(url: str, n_problems: int = 25, shard_size: int = 10, **kw) -> ResultWriter:
    args = dict(n_problems=n_problems, shard_size=shard_size, grid_shape=(H, W),
                input_grid_gmms=3, options=OPTIONS, input_url="memory://in.zarr")
    args.update(kw)
    return ResultWriter(url, **args)


def commit(writer, shard: int, *, shift: float = 0.0, with_grids: bool = True):
    """Commit shard ``shard`` with ``writer`` (a ResultWriter, or a ShardCommitter
    as an actor has it): fake results, and invalid and failed problems."""
    committer = getattr(writer, "committer", writer)
    start, stop = committer.shard_range(shard)
    ids = np.arange(start, stop) * 10
    statuses, errors, results = [], [], []
    for pid in ids:
        if pid % 70 == 30:
            statuses.append("invalid")
            errors.append(f"problem {pid}, gmm 0, component 0: weight is negative (-1.0)")
            results.append(None)
        elif pid % 70 == 60:
            statuses.append("failed")
            errors.append("solver produced NaN")
            results.append(None)
        else:
            statuses.append("ok")
            errors.append(None)
            results.append(fake_result(int(pid), shift=shift))
    n = stop - start
    grids = (np.arange(n * H * W, dtype=np.float32).reshape(n, H, W) + start + shift
             if with_grids else None)
    extents = np.tile([-30.0, 90.0, -30.0, 90.0], (n, 1))
    inputs = np.ones((n, 2, H, W), dtype=np.float32) * (start + shift)
    outcome = BatchOutcome(ids, statuses, errors, results, np.linspace(0.1, 1.0, n))
    return committer.commit_shard(
        shard, outcome, ShardGrids(barycenter=grids, extent=extents, inputs=inputs))


def test_full_run_and_read_back_with_pyarrow_pandas_duckdb(tmp_path):
    out = str(tmp_path / "out")
    writer = make_writer(out)
    assert writer.prepare() == set()
    for shard in range(writer.n_shards):
        info = commit(writer, shard)
        assert info["shard"] == shard
    manifest = writer.finalize({"wall_seconds": 1.5})
    assert manifest["complete"] and manifest["counts"] == {"ok": 18, "invalid": 4, "failed": 3}
    assert manifest["options"] == json.loads(json.dumps(OPTIONS))

    res = read_results(out, as_="pyarrow")
    assert res.problems.num_rows == 25 and res.complete
    assert res.problems.column("problem_id").to_pylist() == list(range(0, 250, 10))
    assert res.barycenters.num_rows == 18 * 3
    assert res.problems.schema.field("opt_epsilon").type == "double"

    df = raybary.read_results(out).problems  # the public, lazily wired entry point
    row = df.set_index("problem_id").loc[30]
    assert row.status == "invalid" and row.error.startswith("problem 30, gmm 0")
    assert np.isnan(row.objective)
    ok = df[df.status == "ok"].set_index("problem_id")
    assert ok.loc[40, "objective"] == 50.0 and ok.loc[40, "iterations"] == 45
    assert set(df.opt_init) == {"kmeans"} and set(df.opt_tol) == {"[1e-06, 1e-09]"}

    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    counts = dict(con.sql(f"SELECT status, count(*) FROM '{out}/problems/*.parquet' "
                          "GROUP BY status").fetchall())
    assert counts == {"ok": 18, "invalid": 4, "failed": 3}
    n, = con.sql(f"SELECT count(*) FROM '{out}/barycenters/*.parquet' WHERE len(cov) = 4").fetchall()[0]
    assert n == 54
    mean, = con.sql(f"SELECT mean FROM '{out}/barycenters/*.parquet' "
                    "WHERE problem_id = 20 AND component = 1").fetchall()[0]
    assert mean == [22.0, 23.0]

    bary = pq.read_table(f"{out}/barycenters").to_pandas()
    assert len(bary) == 54


def test_costs_column_and_schemas():
    """``costs`` is a list<double> column after ``objective``; ``plans/`` has
    the long format of docs/storage.md."""
    from raybary.storage.results import plans_schema, problems_schema

    schema = problems_schema({})
    assert schema.names.index("costs") == schema.names.index("objective") + 1
    assert schema.field("costs").type == pa.list_(pa.float64())
    assert [(f.name, str(f.type)) for f in plans_schema()] == [
        ("problem_id", "int64"), ("gmm", "int32"), ("bar_component", "int32"),
        ("component", "int32"), ("mass", "double")]


def _plan_rows(pid: int, shift: float = 0.0) -> list[tuple]:
    """The rows ``plans/`` should hold for ``fake_result(pid, shift=shift)``."""
    return [(pid, j, i, k, float(p[i, k])) for j, p in enumerate(fake_plans(pid, 3, shift))
            for i in range(p.shape[0]) for k in range(p.shape[1])]


def test_plans_are_committed_with_their_shard_and_read_back(tmp_path):
    """With plans, each commit writes ``plans/shard-*.parquet`` under the
    shard's commit id: read back entry for entry, one copy per problem after
    rewrites, costs null where the problem is not ok."""
    out = str(tmp_path / "out")
    writer = make_writer(out, plans=True)
    writer.prepare()
    for shard in range(writer.n_shards):
        info = commit(writer, shard)
        assert info["plan_rows"] == sum(15 for pid in range(shard * 100, min(shard * 100 + 100,
                                                                            250), 10)
                                        if pid % 70 not in (30, 60))
    commit(writer, 1, shift=100.0)  # rewritten: only the new plans count
    writer.finalize()
    res = read_results(out)
    assert res.layout["plans"] is True
    costs = res.problems.set_index("problem_id").costs
    assert costs.loc[40].tolist() == [44.0, 56.0] and costs.loc[110].tolist() == [214.0, 226.0]
    assert costs.loc[[30, 60]].isna().all()  # invalid, failed
    plans = res.plans()
    assert list(plans.columns) == ["problem_id", "gmm", "bar_component", "component", "mass"]
    ok = res.problems.problem_id[res.problems.status == "ok"].tolist()
    want = [row for pid in ok for row in _plan_rows(pid, 100.0 if 100 <= pid < 200 else 0.0)]
    assert sorted(map(tuple, plans.itertuples(index=False))) == sorted(want)
    some = res.plans([40, 110, 30])  # 30 is invalid: no rows
    assert sorted(set(some.problem_id)) == [40, 110] and len(some) == 30
    arrow = read_results(out, as_="pyarrow").plans([40])
    assert arrow.num_rows == 15 and arrow.schema.field("mass").type == pa.float64()
    assert len(list((tmp_path / "out" / "plans").iterdir())) == 3


def test_plans_follow_the_commit_protocol(tmp_path):
    """A plans table of another attempt than the marker's leaves the shard out
    (and a resume redoes it); a shard rewritten after the results were read
    leaves its plans out with a warning; a resume must keep the plans choice."""
    out = tmp_path / "out"
    writer = make_writer(str(out), plans=True)
    writer.prepare()
    for shard in range(writer.n_shards):
        commit(writer, shard)
    stale = read_results(str(out))
    marker_a = (out / "_commits" / "shard-000001.json").read_bytes()
    commit(writer, 0, shift=50.0)  # after `stale` was read
    with pytest.warns(UserWarning, match="plans of shard 0 are left out: was rewritten"):
        assert set(stale.plans().problem_id) == set(stale.problems.problem_id[
            (stale.problems.status == "ok") & (stale.problems.shard > 0)])
    # writer B wrote every table of shard 1, A's late marker names A's commit
    commit(writer, 1, shift=100.0)
    (out / "_commits" / "shard-000001.json").write_bytes(marker_a)
    with pytest.warns(UserWarning, match="shard 1 is being rewritten"):
        assert read_results(str(out)).committed_shards == [0, 2]
    # only the plans table of another commit: the same
    commit(writer, 1, shift=100.0)
    plans_b = (out / "plans" / "shard-000001.parquet").read_bytes()
    commit(writer, 1, shift=200.0)
    (out / "plans" / "shard-000001.parquet").write_bytes(plans_b)
    with pytest.warns(UserWarning, match="shard 1 is being rewritten"):
        assert read_results(str(out)).committed_shards == [0, 2]
    assert make_writer(str(out), plans=True).prepare() == {0, 2}  # a resume redoes shard 1
    # resuming without plans (or plans on a run without) is refused
    with pytest.raises(ResultsConflictError, match=r"plans: True \(existing\) vs None \(now\)"):
        make_writer(str(out)).prepare()
    plain = make_writer(str(tmp_path / "plain"))
    plain.prepare()
    assert "plans" not in json.loads((tmp_path / "plain" / "_layout.json").read_text())
    assert not (tmp_path / "plain" / "plans").exists()
    with pytest.raises(ResultsConflictError, match=r"plans: None \(existing\) vs True \(now\)"):
        make_writer(str(tmp_path / "plain"), plans=True).prepare()
    commit(plain, 0)
    with pytest.raises(ValueError, match="has no plans: the run did not store them"):
        read_results(str(tmp_path / "plain")).plans()
    # a shard without an ok problem (given up, all invalid) commits an empty plans table
    ids = np.arange(20, 25) * 10  # positions 20..24
    info = writer.committer.commit_shard(2, BatchOutcome(ids, ["failed"] * 5, ["gave up"] * 5,
                                                         [None] * 5, np.nan), gave_up="gave up")
    assert info["plan_rows"] == 0
    res = read_results(str(out))
    assert 2 in res.committed_shards and res.plans(ids).empty
    assert res.problems.set_index("problem_id").costs.loc[ids].isna().all()
    # finalize removes the plans of shards without a marker
    (out / "_commits" / "shard-000002.json").unlink()
    writer.finalize()
    assert sorted(p.name for p in (out / "plans").iterdir()) == ["shard-000000.parquet"]


def test_grids_rows_are_store_positions_and_chunks_align(tmp_path):
    out = str(tmp_path / "out")
    writer = make_writer(out)
    writer.prepare()
    info = commit(writer, 1)
    root = zarr.open_group(f"{out}/grids.zarr", mode="r")
    assert root.attrs["format"] == "raybary.grids" and root.attrs["format_version"] == 3
    assert info["grids"] == f"shard-000001-{info['commit']}"  # the marker names its grids
    group = zarr.open_group(f"{out}/grids.zarr/{info['grids']}", mode="r")
    assert group.attrs["start"] == 10 and group.attrs["commit"] == info["commit"]
    assert group["barycenter"].chunks == (10, H, W)
    assert group["inputs"].shape == (10, 3, H, W)
    assert group["barycenter"].dtype == np.float32
    res = read_results(out)
    g = res.grids(5, 25, inputs=True)
    assert g.problem_id.tolist() == [-1] * 5 + list(range(100, 200, 10)) + [-1] * 5
    assert np.isnan(g.barycenter[:5]).all() and np.isnan(g.barycenter[15:]).all()
    assert g.barycenter[5, 0, 0] == 10.0
    assert g.extent[5].tolist() == [-30.0, 90.0, -30.0, 90.0]
    assert (g.inputs[5:15, :2] == 10.0).all() and np.isnan(g.inputs[5:15, 2]).all()


def test_shard_rewritten_twice_leaves_no_duplicates(tmp_path):
    out = str(tmp_path / "out")
    writer = make_writer(out)
    writer.prepare()
    for shard in range(writer.n_shards):
        commit(writer, shard)
    commit(writer, 1, shift=100.0)
    commit(writer, 1, shift=200.0)
    writer.finalize()
    res = read_results(out)
    assert len(res.problems) == 25 and res.problems.problem_id.is_unique
    assert len(res.barycenters) == 54
    assert not res.barycenters.duplicated(["problem_id", "component"]).any()
    assert res.problems.set_index("problem_id").loc[110, "objective"] == 320.0
    assert res.grids(10, 11).barycenter[0, 0, 0] == 210.0
    assert len(list((tmp_path / "out" / "problems").iterdir())) == 3
    assert not (tmp_path / "out" / "_tmp").exists()


def test_uncommitted_shard_is_invisible(tmp_path):
    out = str(tmp_path / "out")
    writer = make_writer(out)
    writer.prepare()
    commit(writer, 0)
    commit(writer, 2)
    (tmp_path / "out" / "_commits" / "shard-000002.json").unlink()  # as if it died before
    res = read_results(out)
    assert res.committed_shards == [0] and len(res.problems) == 10
    assert res.manifest is None and not res.complete
    assert writer.committed_shards() == {0}
    manifest = writer.finalize()
    assert manifest["missing_shards"] == [1, 2] and not manifest["complete"]
    assert not (tmp_path / "out" / "problems" / "shard-000002.parquet").exists()


def test_unreadable_marker_or_table_means_not_committed(tmp_path):
    """A marker cut to 0 bytes (power loss) or a damaged table: that shard is
    not committed; reading warns in one line and goes on, a resume redoes it."""
    out = str(tmp_path / "out")
    writer = make_writer(out)
    writer.prepare()
    for shard in (0, 1, 2):
        commit(writer, shard)
    (tmp_path / "out" / "_commits" / "shard-000001.json").write_bytes(b"")
    table = tmp_path / "out" / "problems" / "shard-000002.parquet"
    table.write_bytes(table.read_bytes()[:40])
    with pytest.warns(UserWarning) as caught:
        res = read_results(out)
    assert res.committed_shards == [0] and len(res.problems) == 10
    text = " | ".join(str(w.message) for w in caught)
    assert "shard-000001.json cannot be read" in text and "shard 1 is not committed" in text
    assert "shard-000002.parquet cannot be read" in text
    # the CLI says it in one line each, without a traceback
    r = subprocess.run([sys.executable, "-m", "raybary", "show", out], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "cannot be read" in ln]
    assert len(lines) == 2 and all(ln.startswith("raybary: warning: ") for ln in lines), r.stderr
    with pytest.warns(UserWarning, match="redone by this run"):
        assert make_writer(out).prepare() == {0}
    assert not (tmp_path / "out" / "_commits" / "shard-000001.json").exists()
    commit(writer, 1)
    commit(writer, 2)
    assert read_results(out).committed_shards == [0, 1, 2]


def test_racing_writers_of_one_shard_count_as_missing_not_as_committed(tmp_path):
    """Writer A's marker lands after writer B's tables: the shard is redone, never half read."""
    out = tmp_path / "out"
    writer = make_writer(str(out))
    writer.prepare()
    for shard in range(writer.n_shards):
        commit(writer, shard)
    marker_a = (out / "_commits" / "shard-000001.json").read_bytes()
    commit(writer, 1, shift=100.0)                              # writer B
    (out / "_commits" / "shard-000001.json").write_bytes(marker_a)  # A's late marker
    with pytest.warns(UserWarning, match="shard 1 is being rewritten"):
        assert read_results(str(out)).committed_shards == [0, 2]
    assert make_writer(str(out)).prepare() == {0, 2}            # a resumed run redoes shard 1
    commit(writer, 1, shift=100.0)
    manifest = writer.finalize()
    assert manifest["complete"] and read_results(str(out)).committed_shards == [0, 1, 2]
    # and a finalize that meets the race reports the shard missing
    commit(writer, 1, shift=200.0)
    (out / "_commits" / "shard-000001.json").write_bytes(marker_a)
    manifest = writer.finalize()
    assert manifest["missing_shards"] == [1] and not manifest["complete"]


def test_prepare_resumes_or_refuses(tmp_path):
    out = str(tmp_path / "out")
    writer = make_writer(out)
    writer.prepare()
    commit(writer, 0)
    commit(writer, 2)
    writer.finalize()
    again = make_writer(out)
    assert again.prepare() == {0, 2}
    assert not (tmp_path / "out" / "_manifest.json").exists()
    changed = make_writer(out, options={**OPTIONS, "epsilon": 0.05})
    with pytest.raises(ResultsConflictError) as e:
        changed.prepare()
    assert "options.epsilon: 0.1 (existing) vs 0.05 (now)" in str(e.value)
    with pytest.raises(ResultsConflictError, match=r"shard_size: 10 \(existing\) vs 5 \(now\)"):
        make_writer(out, shard_size=5).prepare()
    assert changed.prepare(overwrite=True) == set()
    assert read_results(out).problems.empty


def test_prepare_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite never deletes what is not ours
        with pytest.raises(ResultsConflictError, match="not a raybary results directory"):
            make_writer(str(tmp_path / "out")).prepare(overwrite=overwrite)
    assert (tmp_path / "out" / "notes.txt").exists()


def test_prepare_refuses_an_output_that_overlaps_the_input(tmp_path):
    d = tmp_path / "d"
    (d / "in.parquet").mkdir(parents=True)
    (d / "in.parquet" / "part-0.parquet").write_bytes(b"data")
    inp = str(d / "in.parquet")
    for out, where in ((str(d), "contains"), (inp, "is"), (inp + "/out", "is inside"),
                       (str(tmp_path / "link" / "in.parquet"), "is")):
        if "link" in out:
            (tmp_path / "link").symlink_to(d)
        for overwrite in (False, True):
            with pytest.raises(ResultsConflictError, match=f"{where} the input store"):
                make_writer(out, input_url=inp).prepare(overwrite=overwrite)
    assert (d / "in.parquet" / "part-0.parquet").read_bytes() == b"data"
    # a sibling is fine
    assert make_writer(str(d / "out"), input_url=inp).prepare() == set()


def test_commit_checks_its_inputs(tmp_path):
    writer = make_writer(str(tmp_path / "out"))
    writer.prepare()
    ids = np.arange(10)
    ok = ["ok"] * 10
    res = [fake_result(i) for i in range(10)]
    good = BatchOutcome(ids, ok, [None] * 10, res, 0.0)
    with pytest.raises(ValueError, match=r"shard 2 has 5 problems \(positions 20:25\), "
                                          "the outcome 10"):
        writer.committer.commit_shard(2, good)
    with pytest.raises(IndexError, match="shard 3 is outside 0..2"):
        writer.committer.commit_shard(3, good)
    with pytest.raises(ValueError, match="statuses has 9 entries for 10 problem ids"):
        BatchOutcome(ids, ok[:9], [None] * 10, res, 0.0)
    with pytest.raises(ValueError, match="unknown statuses"):
        BatchOutcome(ids, ["done"] * 10, [None] * 10, res, 0.0)
    with pytest.raises(ValueError, match="status 'ok' but no result"):
        BatchOutcome(ids, ok, [None] * 10, [None] * 10, 0.0)
    with pytest.raises(ValueError, match=r"grids.barycenter must have shape \(10, 6, 5\)"):
        writer.committer.commit_shard(0, good, ShardGrids(barycenter=np.zeros((10, 5, 5))))
    with pytest.raises(ValueError, match=r"grids.inputs must have shape \(10, J <= 3, 6, 5\)"):
        writer.committer.commit_shard(0, good, ShardGrids(inputs=np.zeros((10, 4, 6, 5))))
    assert writer.committed_shards() == set()


def test_memory_url_without_grids_and_pickled_committer(mem_url):
    out = f"{mem_url}/out"
    writer = ResultWriter(out, n_problems=12, shard_size=5, options={"eps": 1})
    writer.lease.acquire()
    writer.prepare()
    clone = pickle.loads(pickle.dumps(writer.committer))  # as sent to a Ray actor
    assert clone == writer.committer and not hasattr(clone, "lease")
    for shard in range(3):
        start, stop = clone.shard_range(shard)
        ids = np.arange(start, stop)
        clone.commit_shard(shard, BatchOutcome(ids, ["ok"] * len(ids), [None] * len(ids),
                                               [fake_result(int(i), n=2, d=1) for i in ids], 0.01))
    writer.lease.release()
    writer.finalize()
    res = read_results(out, as_="pyarrow")
    assert res.problems.num_rows == 12 and res.barycenters.num_rows == 24
    assert res.barycenters.column("cov").to_pylist()[0] == [1.0]
    with pytest.raises(ValueError, match="has no grids"):
        res.grids()


def test_show_prints_a_summary(tmp_path):
    out = str(tmp_path / "out")
    writer = make_writer(out)
    writer.prepare()
    for shard in range(writer.n_shards):
        commit(writer, shard)
    writer.finalize()
    result = CliRunner().invoke(main, ["show", out, "--top", "2"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "status: ok 18, invalid 4, failed 3" in text
    assert "objective quantiles: min 10.0" in text or "objective quantiles: min 10," in text
    assert "slowest 2 (" in text and "problem 90: 1.0000 s, status ok, iterations 95" in text
    assert "failed (3; first 3):" in text and "problem 60: solver produced NaN" in text
    assert "invalid (4" in text
    assert "\n    problem 30, gmm 0, component 0: weight is negative (-1.0)\n" in text


def test_run_overwrite_into_the_inputs_folder_is_refused_and_keeps_the_input(tmp_path):
    """The reproduction from the issue: ``raybary run d/in.parquet d --overwrite``."""
    from raybary.storage.generate import generate

    d = tmp_path / "d"
    d.mkdir()
    generate(str(d / "in.parquet"), 3, family="tutorial", seed=0)
    before = sorted(p.name for p in d.rglob("*"))
    r = CliRunner().invoke(main, ["run", str(d / "in.parquet"), str(d), "--overwrite", "-q"])
    assert r.exit_code != 0
    assert "contains the input store" in r.output, r.output
    assert "Traceback" not in r.output
    assert sorted(p.name for p in d.rglob("*")) == before


def test_one_writer_per_output_lease(tmp_path):
    """Two runs on one OUTPUT: the second is refused while the first heartbeats;
    a lease gone silent is taken over; each run cleans only its own temporary files."""
    import time

    from raybary.storage import results as rs

    out = str(tmp_path / "out")
    first, second = make_writer(out), make_writer(out)
    first.lease.acquire()
    assert first.prepare() == set()
    with pytest.raises(ResultsConflictError, match="another run is writing .*last heartbeat"):
        second.lease.acquire()
    assert first.lease.heartbeat()
    commit(first, 0)
    other_tmp = tmp_path / "out" / "_tmp" / "someone-else"
    other_tmp.mkdir(parents=True)
    (other_tmp / "part").write_text("theirs")
    first.finalize()
    assert (other_tmp / "part").read_text() == "theirs"
    assert not (tmp_path / "out" / "_tmp" / first.run_id).exists()
    first.lease.release()
    assert not (tmp_path / "out" / "_lease.json").exists()
    second.lease.acquire()  # free now
    assert second.prepare() == {0}
    second.lease.release()
    # a lease whose heartbeat stopped long ago is taken over, with a warning
    lease = {"run_id": "dead", "host": "h", "pid": 1, "heartbeat": time.time() - 10 * rs.LEASE_STALE_S}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(lease))
    third = make_writer(out)
    with pytest.warns(UserWarning, match="taking over .* from run dead"):
        third.lease.acquire()
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["run_id"] == third.run_id
    third.lease.release()
    # a fresh lease of a driver on this machine that has exited: taken over at once
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lease = {"run_id": "killed", "host": socket.gethostname(), "pid": int(dead),
             "heartbeat": time.time()}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(lease))
    with pytest.warns(UserWarning, match="from run killed"):
        third.lease.acquire()
    # ... and the silent run, if it comes back, learns that it lost the lease
    zombie = OutputLease(third.url, "dead")
    zombie.held = True
    assert zombie.heartbeat() is False and not zombie.held
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["run_id"] == third.run_id


def test_run_refuses_an_output_another_run_is_writing(tmp_path):
    """``raybary run`` on an OUTPUT whose lease is alive: refused, nothing touched."""
    import time

    from raybary.storage.generate import generate

    generate(str(tmp_path / "in.parquet"), 3, family="tutorial", seed=0)
    out = tmp_path / "out"
    out.mkdir()
    lease = {"run_id": "busy", "host": "elsewhere", "pid": 42, "heartbeat": time.time()}
    (out / "_lease.json").write_text(json.dumps(lease))
    for extra in ([], ["--overwrite"]):
        r = CliRunner().invoke(main, ["run", str(tmp_path / "in.parquet"), str(out), "-q", *extra])
        assert r.exit_code != 0 and "another run is writing" in r.output, r.output
        assert "run busy on elsewhere (pid 42)" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in out.iterdir()) == ["_lease.json"]


def test_credentials_in_urls_are_never_recorded(tmp_path):
    from raybary.storage._fs import redact_url

    assert redact_url("s3://AKIA:s3cret@bucket/in.zarr") == "s3://***@bucket/in.zarr"
    assert redact_url("https://user:pw@host:9000/x") == "https://***@host:9000/x"
    assert redact_url("/data/a@b/in.parquet") == "/data/a@b/in.parquet"
    assert redact_url("gs://bucket/we@ird") == "gs://bucket/we@ird"
    writer = make_writer(str(tmp_path / "out"), input_url="s3://AKIA:s3cret@bucket/in.zarr")
    writer.prepare()
    layout = (tmp_path / "out" / "_layout.json").read_text()
    assert "s3cret" not in layout and "s3://***@bucket/in.zarr" in layout


def _shard_files(out, shard: int) -> dict:
    name = f"shard-{shard:06d}"
    paths = [out / "problems" / f"{name}.parquet", out / "barycenters" / f"{name}.parquet",
             out / "_commits" / f"{name}.json"]
    return {p: p.read_bytes() for p in paths}


def test_zombie_grids_never_replace_the_committed_attempts(tmp_path):
    """Attempt A of shard 1 commits; a zombie attempt B of the same shard (a
    presumed-dead actor) writes other grids, tables and marker, and A's tables
    and marker land last. The reader takes A's rows and A's grids, never B's
    grids under A's rows; finalize removes B's grids."""
    out = tmp_path / "out"
    writer = make_writer(str(out))
    writer.prepare()
    for shard in range(writer.n_shards):
        commit(writer, shard)                           # attempt A of every shard
    attempt_a = _shard_files(out, 1)
    zombie = pickle.loads(pickle.dumps(writer.committer))  # the same committer, in another actor
    commit(zombie, 1, shift=100.0)                      # attempt B: grids, tables, marker
    for path, data in attempt_a.items():                # A's tables and marker land last
        path.write_bytes(data)

    res = read_results(str(out))
    assert res.committed_shards == [0, 1, 2]
    rows = res.problems[res.problems["shard"] == 1]
    assert rows.set_index("problem_id").loc[110, "objective"] == 120.0   # A's table rows
    g = res.grids(10, 20, inputs=True)
    assert g.problem_id.tolist() == rows.problem_id.tolist()
    want = np.arange(10 * H * W, dtype=np.float32).reshape(10, H, W) + 10  # A's grids (shift 0)
    np.testing.assert_array_equal(g.barycenter, want)
    assert (g.inputs[:, :2] == 10.0).all()

    manifest = writer.finalize()
    assert manifest["complete"] and manifest["missing_shards"] == []
    after = read_results(str(out))
    np.testing.assert_array_equal(after.grids(10, 20).barycenter, want)
    markers = [json.loads(p.read_text()) for p in sorted((out / "_commits").iterdir())]
    groups = sorted(p.name for p in (out / "grids.zarr").iterdir() if p.is_dir())
    assert groups == sorted(m["grids"] for m in markers)   # B's grids are gone


def test_zombie_that_stops_after_its_grids_leaves_the_shard_committed(tmp_path):
    """A zombie that writes its grids and is then stopped (before it touches the
    shard's marker or tables) changes nothing a reader sees: the shard stays
    committed with A's grids. One stopped while writing its tables leaves the
    shard not committed (redone), never A's rows with B's grids."""
    out = tmp_path / "out"
    writer = make_writer(str(out))
    writer.prepare()
    commit(writer, 0)
    before = read_results(str(out)).grids(0, 10, inputs=True)
    zombie = pickle.loads(pickle.dumps(writer.committer))
    n = 10
    outcome = BatchOutcome(np.arange(n) * 10, ["ok"] * n, [None] * n,
                           [fake_result(i) for i in range(n)], 0.0)
    block = zombie._grid_block(outcome, ShardGrids(np.full((n, H, W), 7.0), np.zeros((n, 4)),
                                                   np.full((n, 2, H, W), 7.0)))
    zombie._write_grids(0, 0, n, uuid.uuid4().hex, block)   # the step it got through
    res = read_results(str(out))
    assert res.committed_shards == [0]
    for a, b in zip(res.grids(0, 10, inputs=True), before):
        np.testing.assert_array_equal(a, b)

    blocked = out / "_tmp" / zombie.run_id
    shutil.rmtree(blocked, ignore_errors=True)
    blocked.write_text("not a folder")                      # its tables cannot be written
    with pytest.raises(OSError):
        commit(zombie, 0, shift=100.0)
    blocked.unlink()
    res = read_results(str(out))
    assert res.committed_shards == [] and np.isnan(res.grids(0, 10).barycenter).all()
    assert len([p for p in (out / "grids.zarr").iterdir() if p.is_dir()]) == 3
    assert writer.finalize()["missing_shards"] == [0, 1, 2]
    assert [p for p in (out / "grids.zarr").iterdir() if p.is_dir()] == []


def test_committed_shard_whose_grids_are_gone_is_redone(tmp_path):
    """A marker naming a grids group that is not there (removed by hand, a
    damaged disk): its rows read as NaN with a warning, and a resume redoes it."""
    out = tmp_path / "out"
    writer = make_writer(str(out))
    writer.prepare()
    infos = [commit(writer, shard) for shard in range(writer.n_shards)]
    shutil.rmtree(out / "grids.zarr" / infos[1]["grids"])
    res = read_results(str(out))
    with pytest.warns(UserWarning, match="the grids of shard 1 .* are missing"):
        g = res.grids(0, 25)
    assert np.isnan(g.barycenter[10:20]).all() and (g.problem_id[10:20] == -1).all()
    assert g.barycenter[0, 0, 0] == 0.0 and g.barycenter[20, 0, 0] == 20.0
    with pytest.warns(UserWarning, match="shard 1 is not committed; redone by this run"):
        assert make_writer(str(out)).prepare() == {0, 2}


def test_curves_of_d1_problems_are_stored_beside_the_grids(tmp_path):
    """d = 1 problems' log-density curves (max(H, W) points) go into the same
    grids group as the grids (curve, curve_extent, curve_inputs); Results.curves
    stitches them like Results.grids; shards without curves and uncommitted
    shards read as NaN / -1."""
    from raybary.storage.results.layout import curve_length

    out = tmp_path / "out"
    writer = make_writer(str(out))
    writer.prepare()
    length = writer.curve_length
    assert length == curve_length((H, W)) == max(H, W)
    start, stop = writer.shard_range(1)
    n = stop - start
    curves = np.arange(n * length, dtype=np.float32).reshape(n, length) - 100.0
    curves[3] = np.nan  # a d = 2 problem of the shard: no curve
    curve_ext = np.tile([-2.0, 5.0], (n, 1))
    curve_ext[3] = np.nan
    inputs = np.full((n, 2, length), -7.0, dtype=np.float32)
    outcome = BatchOutcome(np.arange(start, stop) * 10, ["ok"] * n, [None] * n,
                           [fake_result(i) for i in range(n)], 0.0)
    with pytest.raises(ValueError, match=r"grids.curve must have shape"):
        writer.committer.commit_shard(1, outcome, ShardGrids(curve=curves[:, :-1]))
    with pytest.raises(ValueError, match=r"grids.curve_inputs must have shape \(10, J <= 3, 6\)"):
        writer.committer.commit_shard(1, outcome, ShardGrids(curve_inputs=inputs[..., :2]))
    assert writer.committed_shards() == set()
    info = writer.committer.commit_shard(1, outcome, ShardGrids(
        curve=curves, curve_extent=curve_ext, curve_inputs=inputs))
    commit(writer, 0)  # grids only: its curve rows are NaN
    root = zarr.open_group(str(out / "grids.zarr"), mode="r")
    assert root.attrs["curve_length"] == length
    group = zarr.open_group(str(out / "grids.zarr" / info["grids"]), mode="r")
    assert group["curve"].shape == (n, length) and group["curve"].dtype == np.float32
    assert group["curve_extent"].shape == (n, 2) and group["curve_inputs"].shape == (n, 3, length)
    assert group["curve"].metadata.dimension_names == ("problem", "x")

    res = read_results(str(out))
    c = res.curves(5, 25, inputs=True)
    assert c.curve.shape == (20, length) and c.inputs.shape == (20, 3, length)
    np.testing.assert_array_equal(c.curve[5:15], curves)
    np.testing.assert_array_equal(c.extent[5:15], curve_ext)
    np.testing.assert_array_equal(c.inputs[5:15, :2], inputs)
    assert np.isnan(c.inputs[5:15, 2]).all()
    assert np.isnan(c.curve[:5]).all() and np.isnan(c.curve[15:]).all()  # grids only; not committed
    assert c.problem_id[5:15].tolist() == list(range(100, 200, 10))
    assert (c.problem_id[15:] == -1).all()
    assert res.curves(10, 12).inputs is None
    assert np.isnan(res.grids(10, 20).barycenter).all()  # no grids given for shard 1
    nogrids = make_writer(str(tmp_path / "none"), grid_shape=None, input_grid_gmms=0)
    nogrids.prepare()
    assert nogrids.curve_length is None
    with pytest.raises(ValueError, match="has no grids"):
        read_results(str(tmp_path / "none")).curves()
