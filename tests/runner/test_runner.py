"""The Ray runner end to end on one local Ray (the session fixture ``ray_local``).

Stores are tiny (80 tutorial problems, shards of 10, 8x8 grids) so the whole
module runs in a few minutes on two cores; JAX compiles once per actor
process (the persistent compilation cache makes later actors load instead).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from stores import write_broken_copy

import raybary
from raybary.runner import ExecOptions, GridOptions, SolverOptions, run
from raybary.runner.shard import problem_extents
from raybary.storage import ResultsConflictError, open_store, read_results
from raybary.storage.generate import generate

N, SHARD, GRID = 80, 10, (8, 8)
SOLVER = SolverOptions(bar_size=3)
BAD_POSITIONS = {11: "weight", 14: "cov", 17: "mean", 18: "lambda"}  # all in shard 1

pytestmark = pytest.mark.usefixtures("ray_local")


def exe(**kw) -> ExecOptions:
    kw.setdefault("actors", 2)
    return ExecOptions(shard_size=SHARD, **kw)


def check_exactly_once(res, n=N):
    ids = res.problems.problem_id.tolist()
    assert len(ids) == n and len(set(ids)) == n
    assert res.problems.position.tolist() == list(range(n))
    assert res.complete


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    pq_store = generate(str(root / "tut.parquet"), N, family="tutorial", seed=7)
    zr_store = generate(str(root / "tut.zarr"), N, family="tutorial", seed=7)
    # a copy with four invalid problems, all in shard 1
    return {"root": root, "parquet": pq_store.url, "zarr": zr_store.url,
            "bad": write_broken_copy(pq_store, root / "bad.parquet", BAD_POSITIONS)}


@pytest.fixture(scope="module")
def reference(data):
    """A clean run of the Parquet store: the reference every other run is compared to."""
    out = str(data["root"] / "ref")
    report = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID, input_gmms=3), exe(),
                 stream=None)
    return out, report


def test_parquet_end_to_end(data, reference):
    out, report = reference
    assert report.complete and report.counts == {"ok": N, "invalid": 0, "failed": 0}
    assert report.shards_run == N // SHARD and report.actors == 2
    assert len(report.pids) == 2  # both actors worked
    res = read_results(out)
    check_exactly_once(res)
    assert (res.problems.status == "ok").all()
    assert res.barycenters.groupby("problem_id").size().eq(3).all()
    manifest = json.loads(Path(out, "_manifest.json").read_text())
    assert manifest["complete"] and manifest["options"]["bar_size"] == 3

    # grids: the barycenter and input log-densities on the problem's extent
    store = open_store(data["parquet"])
    shard = store.read(20, 30)
    g = res.grids(20, 30, inputs=True)
    assert g.problem_id.tolist() == shard.problem_ids.tolist()
    bary = res.barycenters.set_index("problem_id")
    for row in (0, 7):
        p, pid = shard.problems[row], int(shard.problem_ids[row])
        b = bary.loc[pid].sort_values("component")
        gmm = (b.weight.to_numpy(), np.stack(b["mean"].to_numpy()),
               np.stack(b["cov"].to_numpy()).reshape(-1, 2, 2))
        # the extent shows the inputs and the barycenter whole (each mean +- 3 sd, and more)
        ext = problem_extents(p, (0, 1), raybary.Result(*gmm, 0.0, True, 1, 0.0))
        np.testing.assert_allclose(g.extent[row], ext, rtol=1e-6, atol=1e-5)
        for _w, m, c in [(q.weights, q.means, q.covs) for q in p.gmms] + [gmm]:
            sd = np.sqrt(np.diagonal(c, axis1=1, axis2=2))
            assert (m - 3 * sd > ext[[0, 2]]).all() and (m + 3 * sd < ext[[1, 3]]).all()
        want, _ = raybary.log_density_grid(gmm, shape=GRID, bounds=ext)
        np.testing.assert_allclose(g.barycenter[row], want, rtol=1e-4, atol=1e-3)
        want, _ = raybary.log_density_grid(p.gmms[2], shape=GRID, bounds=ext)
        np.testing.assert_allclose(g.inputs[row, 2], want, rtol=1e-4, atol=1e-3)


def test_zarr_gives_the_same_results_as_parquet(data, reference):
    out = str(data["root"] / "zarr-out")
    report = run(data["zarr"], out, SOLVER, GridOptions(shape=GRID, input_gmms=3), exe(),
                 stream=None)
    assert report.complete
    a, b = read_results(reference[0]), read_results(out)
    check_exactly_once(b)
    np.testing.assert_array_equal(a.problems.problem_id, b.problems.problem_id)
    np.testing.assert_allclose(a.problems.objective, b.problems.objective, rtol=1e-9)
    np.testing.assert_allclose(a.grids().barycenter, b.grids().barycenter, rtol=1e-6)


@pytest.fixture(scope="module")
def bad_run(data):
    """A run of the store with four invalid problems (shard 1), with plans."""
    out = str(data["root"] / "bad-out")
    report = run(data["bad"], out, SOLVER, GridOptions(shape=GRID, plans=True), exe(),
                 stream=None)
    return out, report


def check_costs_and_plans(res, store, positions):
    """The problems at ``positions``: ``costs`` null unless ok; for ok ones, one
    cost per input GMM, ``objective = sum_j lambda_j costs[j]``, and each plan
    in ``res.plans()`` couples the barycenter's weights with the GMM's, its
    transport cost under the squared Bures cost (POT's, to the stored
    barycenter) being ``costs[j]``."""
    import ot

    df = res.problems.set_index("position")
    plans = res.plans(df.loc[positions, "problem_id"].tolist())
    checked = 0
    for pos in positions:
        row = df.loc[pos]
        if row.status != "ok":
            assert row.costs is None, (pos, row.costs)
            assert not (plans.problem_id == row.problem_id).any()
            continue
        p = store.read(pos, pos + 1).problems[0]
        bary = res.barycenter(row.problem_id)
        costs = np.asarray(row.costs)
        assert costs.shape == (p.n_gmms,) and np.all(costs > 0)
        assert row.objective == pytest.approx(float(p.lambdas @ costs), rel=1e-6)
        mine = plans[plans.problem_id == row.problem_id]
        assert len(mine) == 3 * p.n_components  # every entry, no padding
        for j, g in enumerate(p.gmms):
            e = mine[mine.gmm == j]
            plan = np.zeros((3, g.n_components))
            plan[e.bar_component, e.component] = e.mass
            assert len(e) == plan.size
            np.testing.assert_allclose(plan.sum(axis=1), bary.weights, atol=1e-5)
            np.testing.assert_allclose(plan.sum(axis=0), g.weights,
                                       atol=2 * row.marginal_error + 1e-5)
            cost = ot.gmm.dist_bures_squared(bary.means, g.means, bary.covs, g.covs)
            assert float(np.sum(plan * cost)) == pytest.approx(costs[j], rel=1e-4)
        checked += 1
    return checked


def test_invalid_problems_are_reported_and_the_rest_solved(data, reference, bad_run):
    out, report = bad_run
    assert report.complete  # invalid inputs do not make the job fail
    assert report.counts == {"ok": N - 4, "invalid": 4, "failed": 0}
    res = read_results(out)
    check_exactly_once(res)
    df = res.problems.set_index("position")
    assert sorted(df.index[df.status == "invalid"]) == sorted(BAD_POSITIONS)
    expect = {"weight": "weight is negative", "cov": "not positive definite",
              "mean": "mean is not finite", "lambda": "lambda is missing"}
    for pos, column in BAD_POSITIONS.items():
        assert f"problem {df.loc[pos, 'problem_id']}, gmm" in df.loc[pos, "error"]
        assert expect[column] in df.loc[pos, "error"], df.loc[pos, "error"]
        assert np.isnan(df.loc[pos, "objective"])
    assert not set(res.barycenters.problem_id) & set(df.loc[list(BAD_POSITIONS), "problem_id"])
    assert np.isnan(res.grids(11, 12).barycenter).all()
    # shards without invalid problems: identical to the clean run
    ref = read_results(reference[0]).problems.set_index("position")
    other = [p for p in range(N) if not 10 <= p < 20]
    np.testing.assert_allclose(df.loc[other, "objective"], ref.loc[other, "objective"], rtol=1e-9)
    # shard 1: what raybary.solve gives on its valid problems
    shard = open_store(data["bad"]).read(10, 20)
    valid = shard.valid()
    assert len(valid) == 6
    want = raybary.solve([shard.problems[i] for i in valid], bar_size=3, validate=False,
                         ids=[shard.problem_ids[i] for i in valid])
    np.testing.assert_allclose(df.loc[[10 + i for i in valid], "objective"],
                               [r.objective for r in want], rtol=1e-6)
    for i, r in zip(valid, want):
        np.testing.assert_allclose(df.loc[10 + i, "costs"], r.costs, rtol=1e-6)
    # per-input costs and plans: the invalid problems have none
    assert check_costs_and_plans(res, open_store(data["bad"]), list(range(8, 22))) == 10


def test_resumed_run_with_plans_keeps_one_copy_of_each(data, bad_run):
    """A shard redone on resume replaces its plans (same file, new commit):
    exactly one row per plan entry, the same values; a resume without
    --plans is refused."""
    out = str(data["root"] / "bad-resume")
    shutil.copytree(bad_run[0], out)
    stale = read_results(out)
    Path(out, "_commits", "shard-000001.json").unlink()
    Path(out, "_manifest.json").unlink()
    report = run(data["bad"], out, SOLVER, GridOptions(shape=GRID, plans=True), exe(actors=1),
                 stream=None)
    assert report.complete and report.shards_run == 1
    res = read_results(out)
    check_exactly_once(res)
    key = ["problem_id", "gmm", "bar_component", "component"]
    plans, old = res.plans(), read_results(bad_run[0]).plans()
    assert not plans.duplicated(key).any() and len(plans) == len(old)
    merged = plans.merge(old, on=key, suffixes=("", "_before"))
    assert len(merged) == len(old)
    np.testing.assert_allclose(merged.mass, merged.mass_before, rtol=1e-9, atol=1e-12)
    assert len(list(Path(out, "plans").iterdir())) == N // SHARD
    # results read before the resume do not mix in the new commit's plans
    with pytest.warns(UserWarning, match="plans of shard 1 are left out: was rewritten"):
        assert set(stale.plans().problem_id) == set(plans.problem_id) - set(range(10, 20))
    with pytest.raises(ResultsConflictError, match="plans: True"):
        run(data["bad"], out, SOLVER, GridOptions(shape=GRID), exe(), stream=None)


def test_d3_with_marginal_grids(data):
    store = generate(str(data["root"] / "d3.zarr"), 20, family="tutorial", dim=3, seed=1)
    out = str(data["root"] / "d3-out")
    grid = GridOptions(shape=GRID, dims=(0, 2), input_gmms=1)
    report = run(store.url, out, SolverOptions(bar_size=2), grid, exe(actors=1), stream=None)
    assert report.complete and report.counts["ok"] == 20
    res = read_results(out)
    check_exactly_once(res, 20)
    b = res.barycenters[res.barycenters.problem_id == res.problems.problem_id[13]]
    assert len(b) == 2 and all(len(m) == 3 and len(c) == 9 for m, c in zip(b["mean"], b["cov"]))
    g = res.grids(13, 14, inputs=True)
    p = store.read(13, 14).problems[0]
    gmm = (b.weight.to_numpy(), np.stack(b["mean"].to_numpy()),
           np.stack(b["cov"].to_numpy()).reshape(-1, 3, 3))
    ext = problem_extents(p, (0, 2), raybary.Result(*gmm, 0.0, True, 1, 0.0))
    np.testing.assert_allclose(g.extent[0], ext, rtol=1e-6, atol=1e-5)
    want, _ = raybary.log_density_grid(gmm, shape=GRID, bounds=ext, dims=(0, 2))
    np.testing.assert_allclose(g.barycenter[0], want, rtol=1e-4, atol=1e-3)
    want, _ = raybary.log_density_grid(p.gmms[0], shape=GRID, bounds=ext, dims=(0, 2))
    np.testing.assert_allclose(g.inputs[0, 0], want, rtol=1e-4, atol=1e-3)


def test_resume_runs_only_missing_shards(data, reference):
    out = str(data["root"] / "resume")
    shutil.copytree(reference[0], out)
    markers = {p.name: json.loads(p.read_text()) for p in Path(out, "_commits").iterdir()}
    Path(out, "_commits", "shard-000005.json").unlink()
    Path(out, "_manifest.json").unlink()
    report = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID, input_gmms=3), exe(),
                 stream=None)
    assert report.complete and report.shards_skipped == 7 and report.shards_run == 1
    after = {p.name: json.loads(p.read_text()) for p in Path(out, "_commits").iterdir()}
    assert after.keys() == markers.keys()
    for name in after:  # the other shards were not rewritten
        assert (after[name]["commit"] == markers[name]["commit"]) == (name != "shard-000005.json")
    a, b = read_results(reference[0]), read_results(out)
    check_exactly_once(b)
    np.testing.assert_allclose(a.problems.objective, b.problems.objective, rtol=1e-9)
    # nothing left to do: no actor is started
    again = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID, input_gmms=3), exe(),
                stream=None)
    assert again.shards_run == 0 and again.actors == 0 and again.complete


def _rewrite_with_other_ids(path: str, shift: int) -> None:
    table = pq.read_table(path)
    ids = pa.compute.add(table["problem_id"], shift)
    pq.write_table(table.set_column(table.schema.get_field_index("problem_id"), "problem_id", ids),
                   path)


def _stores_with_other_ids(data, root: Path) -> list:
    """The tutorial store as Parquet with ids 3*id + 5 in small row groups, sorted
    by id and not; and as Zarr."""
    table = pq.read_table(data["parquet"])
    ids = pa.compute.add(pa.compute.multiply(table["problem_id"], 3), 5)
    table = table.set_column(table.schema.get_field_index("problem_id"), "problem_id", ids)
    out = [open_store(data["zarr"])]
    for name, order in (("sorted", "ascending"), ("unsorted", "descending")):
        path = root / f"ids-{name}.parquet"
        pq.write_table(table.sort_by([("problem_id", order)]), path, row_group_size=37)
        out.append(open_store(str(path)))
    assert [s.describe().get("sorted_by_problem_id") for s in out[1:]] == [True, False]
    return out


def test_shard_boundary_ids_are_read_in_bounded_blocks(data, reference, tmp_path):
    """Each shard's first and last id, as the run records them (``input_shards``),
    are those of the whole id list, read at most ``block`` ids at a time."""
    from raybary.runner.driver import ID_BLOCK, _shard_boundary_ids

    def from_all_ids(store, shards):  # what run() computed before: every id at once
        every = store.problem_ids()
        return [[int(every[a]), int(every[b - 1])] for a, b in shards if b > a]

    layout = json.loads(Path(reference[0], "_layout.json").read_text())
    assert layout["input_shards"] == from_all_ids(open_store(data["parquet"]),
                                                  open_store(data["parquet"]).shards(SHARD))
    asked = []  # the (start, stop) of every id read
    for store in _stores_with_other_ids(data, tmp_path):
        read = store.problem_ids

        def problem_ids(start=0, stop=None, read=read):
            asked.append((start, stop))
            return read(start, stop)

        for size in (SHARD, 7, 1, N, N + 5):  # 7: a ragged last shard
            shards = store.shards(size)
            want = [tuple(ab) for ab in from_all_ids(store, shards)]
            store.problem_ids = problem_ids
            for block in (ID_BLOCK, 1, 3, 10, 64):
                asked.clear()
                assert _shard_boundary_ids(store, shards, block) == want, (store.url, size, block)
                assert asked and all(stop is not None and stop - start <= block
                                     for start, stop in asked), asked
            del store.problem_ids


def test_changed_input_is_refused_on_resume_and_stops_a_run(data):
    """The reproduction from the issue: run, rewrite the input at the same path
    with other problem ids, run again: refused, saying what changed; and an
    input rewritten during a run stops it instead of mixing two inputs."""
    from raybary.storage.errors import InputChangedError, ResultsConflictError

    inp, out = str(data["root"] / "changing.parquet"), str(data["root"] / "changing-out")
    shutil.copy(data["parquet"], inp)
    grid = GridOptions(shape=GRID, input_gmms=3)
    assert run(inp, out, SOLVER, grid, exe(), stream=None).complete
    _rewrite_with_other_ids(inp, 1000)
    with pytest.raises(ResultsConflictError, match="changed since the results") as e:
        run(inp, out, SOLVER, grid, exe(), stream=None)
    assert "file changing.parquet" in str(e.value) and "problem ids 0..9 then, 1000..1009 now" \
        in str(e.value) and "--overwrite" in str(e.value)
    assert read_results(out).problems.problem_id.max() < 1000  # nothing was mixed in

    out2 = str(data["root"] / "changing-out2")
    changed = []

    def on_shard(summary):
        if not changed:
            changed.append(summary.shard)
            _rewrite_with_other_ids(inp, 5000)

    with pytest.raises(InputChangedError, match="changed during the run"):
        run(inp, out2, SOLVER, grid, exe(actors=1, in_flight=1), stream=None, on_shard=on_shard)
    ids = read_results(out2).problems.problem_id
    assert ((ids >= 1000) & (ids < 1080)).all()  # only shards of the input the run started on


def test_more_actors_than_the_cluster_can_place(data):
    """The reproduction from the issue: 3 actors of 1 CPU on a 2-CPU Ray used to
    stop at 40/60 (shards queued on the actor that never started). Work goes
    only to running actors; with none placeable the run fails, saying why."""
    from raybary.runner.driver import JobIncomplete

    store = str(data["root"] / "sixty.parquet")
    generate(store, 60, family="tutorial", seed=3)
    out = str(data["root"] / "three-actors")
    report = run(store, out, SOLVER, GridOptions(shape=None), exe(actors=3), stream=None)
    assert report.complete and report.counts["ok"] == 60 and len(report.pids) == 2
    with pytest.raises(JobIncomplete, match=r"no actor could be started in \d+ s: 2 actors asked "
                       r"for 1 CPU, 1 GPU each; the cluster has .*2 CPU.* in all") as e:
        run(store, str(data["root"] / "gpu-actors"), SOLVER, GridOptions(shape=None),
            exe(actors=2, gpus_per_actor=1.0, placement_timeout_s=3.0), stream=None)
    assert "--gpus-per-actor" in str(e.value)
    stopped = read_results(str(data["root"] / "gpu-actors"))  # the manifest was still written
    assert stopped.manifest is not None and not stopped.complete
    assert stopped.manifest["missing_shards"] == list(range(6))
    assert any("no actor could be started" in x for x in stopped.manifest["summary"]["errors"])


def test_killed_actor_is_replaced_and_its_shards_rerun(data, reference):
    out = str(data["root"] / "actor-kill")
    killed = []

    def on_shard(summary):
        if not killed:  # the actor has its next shard in flight: kill it mid-run
            killed.append(summary.pid)
            os.kill(summary.pid, signal.SIGKILL)

    report = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID, input_gmms=3),
                 exe(actors=1), stream=None, on_shard=on_shard)
    assert killed and report.complete
    assert report.actor_replacements == 1 and report.retries >= 1
    assert killed[0] in report.pids and len(report.pids) == 2  # a new process took over
    res = read_results(out)
    check_exactly_once(res)
    ref = read_results(reference[0])
    np.testing.assert_allclose(res.problems.objective, ref.problems.objective, rtol=1e-9)
    np.testing.assert_allclose(res.grids().barycenter, ref.grids().barycenter, rtol=1e-6)


def _worker_pids() -> set[int]:
    """Process ids of live ShardWorker actor processes on this machine."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ShardWorker" in (d / "cmdline").read_bytes():
                    pids.add(int(d.name))
            except OSError:
                pass
    return pids


def test_killed_driver_leaves_commits_and_the_rerun_finishes(data, reference, ray_local):
    out = str(data["root"] / "driver-kill")
    before = _worker_pids()
    cmd = [sys.executable, "-m", "raybary", "run", data["parquet"], out, "--bar-size", "3",
           "--grid", "8x8", "--input-grids", "3", "--shard-size", str(SHARD), "--actors", "1",
           "--address", ray_local, "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    commits = Path(out, "_commits")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if commits.exists() and len(list(commits.glob("*.json"))) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the driver's actor dies with it (Ray kills actors whose owner died)
    mine = _worker_pids() - before
    deadline = time.time() + 60
    while mine & _worker_pids() and time.time() < deadline:
        time.sleep(0.2)
    assert not mine & _worker_pids()
    snapshot = {p.name: json.loads(p.read_text())["commit"] for p in commits.glob("*.json")}
    assert 2 <= len(snapshot) < N // SHARD
    partial = read_results(out)
    assert not partial.complete and len(partial.problems) == SHARD * len(snapshot)

    report = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID, input_gmms=3), exe(),
                 stream=None)
    assert report.complete and report.shards_skipped == len(snapshot)
    res = read_results(out)
    check_exactly_once(res)
    for name, commit in snapshot.items():  # committed shards were kept as they were
        assert json.loads((commits / name).read_text())["commit"] == commit
    keep = res.problems.problem_id.isin(partial.problems.problem_id)
    np.testing.assert_array_equal(res.problems[keep].objective.to_numpy(),
                                  partial.problems.objective.to_numpy())
    ref = read_results(reference[0])
    np.testing.assert_allclose(res.problems.objective, ref.problems.objective, rtol=1e-9)


def test_shard_that_always_kills_its_actor_is_committed_as_failed(data, reference):
    from raybary.runner.actor import ShardWorker

    class DiesOnShard2(ShardWorker):  # in the test: Ray ships it by value
        def run_shard(self, shard_index: int):
            if shard_index == 2:
                os._exit(70)  # the process dies on this shard, as on a segfault
            return super().run_shard(shard_index)

    out = str(data["root"] / "give-up")
    report = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID),
                 exe(actors=1, max_attempts=2), stream=None, _worker=DiesOnShard2)
    assert report.complete and report.shards_given_up == 1, report
    assert report.actor_replacements >= 2, report
    assert report.counts == {"ok": N - SHARD, "invalid": 0, "failed": SHARD}, report
    res = read_results(out)
    check_exactly_once(res)
    df = res.problems.set_index("position")
    lost = list(range(20, 30))
    assert (df.loc[lost, "status"] == "failed").all()
    assert df.loc[lost, "error"].str.startswith("not solved: 2 attempts at this shard were lost").all()
    assert df.loc[lost, "error"].str.contains("actor died").all()
    rest = [p for p in range(N) if p not in lost]
    ref = read_results(reference[0]).problems.set_index("position")
    np.testing.assert_allclose(df.loc[rest, "objective"], ref.loc[rest, "objective"], rtol=1e-9)
    # the marker and the manifest say it gave up; a re-run solves it again
    marker = json.loads(Path(out, "_commits", "shard-000002.json").read_text())
    assert marker["gave_up"].startswith("not solved: 2 attempts")
    assert res.manifest["gave_up_shards"] == [2]
    again = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID), exe(actors=1), stream=None)
    assert again.shards_run == 1 and again.shards_skipped == N // SHARD - 1
    assert again.counts == {"ok": N, "invalid": 0, "failed": 0}
    res = read_results(out)
    check_exactly_once(res)
    assert res.manifest["gave_up_shards"] == []
    np.testing.assert_allclose(res.problems.set_index("position").loc[lost, "objective"],
                               ref.loc[lost, "objective"], rtol=1e-9)


def test_shard_committed_by_an_actor_that_died_before_replying_counts_as_done(data, reference):
    """The reply of a task is sent after it returns; a process that dies just
    then (here: on purpose, right after its commit) loses the reply of a shard
    that is committed. Even with one attempt allowed, the driver must count
    that shard as committed (not charge, re-solve or give it up), and the
    shard queued behind it, which may or may not have started, goes back
    without counting."""
    from raybary.runner.actor import ShardWorker

    class DiesAfterCommitting(ShardWorker):  # in the test: Ray ships it by value
        def run_shard(self, shard_index: int):
            out = super().run_shard(shard_index)  # committed
            if shard_index in (1, 5):
                os._exit(70)  # dead before the reply
            return out

    out = str(data["root"] / "reply-lost")
    report = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID),
                 exe(actors=1, max_attempts=1), stream=None, _worker=DiesAfterCommitting)
    assert report.complete and report.shards_given_up == 0, report
    assert report.replies_lost == 2 and report.actor_replacements == 2, report
    assert report.retries == 0 and report.shards_run == N // SHARD, report
    assert report.counts == {"ok": N, "invalid": 0, "failed": 0}, report
    res = read_results(out)
    check_exactly_once(res)
    ref = read_results(reference[0]).problems
    np.testing.assert_allclose(res.problems.objective, ref.objective, rtol=1e-9)


def test_no_environment_variable_makes_an_actor_exit(tmp_path):
    """Faults are injected through run's private ``_worker`` argument only: the
    variables that were once test hooks, set for the actors, change nothing."""
    store = generate(str(tmp_path / "small.parquet"), SHARD, family="tutorial", seed=3)
    hooks = {"RAYBARY_RUNNER_CRASH_SHARDS": "0", "RAYBARY_RUNNER_CRASH_AFTER_COMMIT": "0"}
    report = run(store.url, str(tmp_path / "out"), SOLVER, GridOptions(shape=None),
                 exe(actors=1, max_attempts=1, actor_env=hooks), stream=None)
    assert report.complete and report.counts == {"ok": SHARD, "invalid": 0, "failed": 0}, report
    assert report.actor_replacements == 0 and report.replies_lost == 0, report


#: For each setting of RAY_AUTH_MODE / RAY_AUTH_TOKEN before: join's token mode
#: on (then off) inside auth_env_restored, which is left by an exception; prints
#: Ray's mode inside and the variables and Ray's mode after, as JSON.
_TOKEN_MODE_SCRIPT = """
import json, os
from ray._raylet import AuthenticationMode, get_authentication_mode
from raybary.jobs.auth import Token
from raybary.runner import join

def mode():
    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"

said = []
for before in ({}, {"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "from-the-env"},
               {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "mine"}):
    for name in join.AUTH_ENV:
        os.environ.pop(name, None)
    os.environ.update(before)
    join._refresh_ray_auth()
    env_before, inside = dict(os.environ), []
    try:
        with join.auth_env_restored():
            join._token_mode(Token("the-runs", "a test"))
            inside.append([mode(), os.environ["RAY_AUTH_TOKEN"]])
            join._token_mode(None)  # a cluster without token authentication
            inside.append([mode(), os.environ["RAY_AUTH_MODE"]])
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    said.append({"inside": inside, "env_kept": dict(os.environ) == env_before,
                 "after": mode()})
print("SAID " + json.dumps(said))
"""


def test_token_mode_is_the_runs_only(tmp_path):
    """Joining turns Ray's token mode on (a cluster that wants a token) or off
    (one that does not) for the run; when the run returns or raises,
    RAY_AUTH_MODE and RAY_AUTH_TOKEN are what they were (unset, or their
    values), and Ray in this process reads them again, so a later run to
    another cluster, and processes started later, do not inherit the token.
    (In a subprocess: Ray's settings are the process's, and the session's Ray
    runs in this one.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _TOKEN_MODE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=120)
    said = [ln for ln in r.stdout.splitlines() if ln.startswith("SAID ")]
    assert r.returncode == 0 and said, r.stderr[-3000:]
    said = json.loads(said[0][len("SAID "):])
    for case in said:
        assert case["inside"] == [["token", "the-runs"], ["disabled", "disabled"]], said
        assert case["env_kept"], said
    assert [case["after"] for case in said] == ["disabled", "disabled", "disabled", "token"]


class _BlockCommitsOnce(io.StringIO):
    """A progress stream that makes OUTPUT/_tmp a file when the run starts (every
    commit then fails with a storage error, in the actor) and clears it once the
    driver reports a retry: a transient fault."""

    def __init__(self, out: str):
        super().__init__()
        self.tmp, self.blocked, self.cleared = Path(out, "_tmp"), False, False

    def write(self, text: str) -> int:
        if not self.blocked:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.write_text("in the way")
            self.blocked = True
        elif "retried" in text and not self.cleared:
            self.tmp.unlink()
            self.cleared = True
        return super().write(text)


def test_transient_storage_fault_is_retried_with_backoff(data, reference):
    out = str(data["root"] / "transient")
    stream = _BlockCommitsOnce(out)
    report = run(data["parquet"], out, SOLVER, GridOptions(shape=GRID),
                 exe(actors=1, max_attempts=4), stream=stream)
    assert stream.blocked and stream.cleared
    assert report.retries >= 1 and report.shards_given_up == 0, report
    assert any("FileExistsError" in e or "NotADirectory" in e for e in report.errors), report.errors
    assert report.complete and report.counts == {"ok": N, "invalid": 0, "failed": 0}
    res = read_results(out)
    check_exactly_once(res)
    assert res.manifest["gave_up_shards"] == []
