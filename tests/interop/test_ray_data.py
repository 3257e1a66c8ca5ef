"""Ray Data: a real pipeline (read a store, map_batches(BarycenterSolver), write
Parquet) on the session Ray, compared with ``raybary.solve``; the row layout,
its messages and batch formats without Ray; docs/ray_data.md runs as written.

Shapes are the runner tests' (tutorial family, d=2, bar_size 3, batches that
pad to 16), so the compiled programs come from the persistent cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from docs_blocks import fenced
from stores import write_broken_copy

import raybary
from raybary.errors import OptionsError
from raybary.interop import BarycenterSolver, problems_to_table, read_problems_dataset
from raybary.interop.ray_data import decode_problems, result_row_schema, results_to_gmms
from raybary.storage import open_store
from raybary.storage.generate import generate, tutorial_problems

N, BATCH, BAR = 32, 16, 3
#: store position -> how it is broken: a value validation catches, a null the reader catches
BAD = {3: "weight", 20: "lambda"}
DOC = Path(__file__).resolve().parents[2] / "docs" / "ray_data.md"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_data")
    clean = generate(str(root / "tut.parquet"), N, family="tutorial", seed=5)
    zarr = generate(str(root / "tut.zarr"), N, family="tutorial", seed=5)
    return {"root": root, "parquet": clean.url, "zarr": zarr.url,
            "bad": write_broken_copy(clean, root / "bad.parquet", BAD)}


def _close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


def _by_id(table: pa.Table) -> dict[int, dict]:
    return {row["problem_id"]: row for row in table.to_pylist()}


# ------------------------------------------------------------------ the pipeline
@pytest.mark.usefixtures("ray_local")
def test_pipeline_matches_solve_and_reports_invalid_rows(stores, tmp_path):
    import ray

    ds = read_problems_dataset(stores["bad"], shard_size=BATCH)
    out = ds.map_batches(BarycenterSolver, fn_constructor_kwargs={"bar_size": BAR},
                         batch_format="pyarrow", batch_size=BATCH,
                         compute=ray.data.ActorPoolStrategy(size=1))
    out.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out")
    for name in result_row_schema().names:
        assert table.schema.field(name).type.equals(result_row_schema().field(name).type), name
    rows = _by_id(table)
    # the product's messages: what raybary run writes for these problems
    shard = open_store(stores["bad"]).read(0, N, dtype="float32")
    assert sorted(rows) == sorted(shard.problem_ids.tolist())
    bad_ids = {int(shard.problem_ids[p]) for p in BAD}
    for pid, err in zip(shard.problem_ids.tolist(), shard.errors):
        assert (rows[pid]["status"] == "invalid") == (pid in bad_ids) == (err is not None)
        assert rows[pid]["error"] == err
    assert "weight is negative (-0.5)" in rows[int(shard.problem_ids[3])]["error"]
    assert "lambda is missing (null)" in rows[int(shard.problem_ids[20])]["error"]
    for pid in bad_ids:
        assert rows[pid]["weights"] is None and rows[pid]["objective"] is None
    # the valid ones: raybary.solve with the same options, ids and batch size
    valid = shard.valid()
    want = raybary.solve([shard.problems[i] for i in valid], bar_size=BAR, batch_size=BATCH,
                         ids=[shard.problem_ids[i] for i in valid])
    for i, r in zip(valid, want):
        got = rows[int(shard.problem_ids[i])]
        assert got["status"] == "ok" and got["error"] is None
        assert got["n_components"] == BAR and got["converged"] == r.converged
        _close(got["weights"], r.weights)
        _close(got["means"], r.means)
        _close(got["covs"], r.covs)
        _close(got["objective"], r.objective)
        assert got["iterations"] > 0 and got["marginal_error"] < 1e-2
    gmms = results_to_gmms(table)
    assert sum(g is None for g in gmms) == len(BAD)


@pytest.mark.usefixtures("ray_local")
def test_zarr_and_parquet_stores_read_as_the_same_rows(stores):
    def rows(url):
        ds = read_problems_dataset(url, shard_size=10)
        t = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
        return t.sort_by("problem_id")

    a, b = rows(stores["parquet"]), rows(stores["zarr"])
    assert a.num_rows == N and a.equals(b)
    assert a.column("error").null_count == N
    problems, errors = decode_problems(a).to_problems()
    assert errors == [None] * N
    want, _ = open_store(stores["parquet"]).read_columns(0, N).to_problems()
    for p, q in zip(problems, want):
        np.testing.assert_array_equal(p.lambdas, q.lambdas)
        for g, h in zip(p.gmms, q.gmms):
            np.testing.assert_array_equal(g.covs, h.covs)


@pytest.mark.usefixtures("ray_local")
def test_in_memory_problems_default_batch_format_and_kept_columns():
    import ray

    problems = tutorial_problems(BATCH, seed=11)
    ids = list(range(500, 500 + BATCH))
    table = problems_to_table(problems, ids).append_column(
        "pixel", pa.array([f"px-{i}" for i in ids]))
    ds = ray.data.from_arrow(table)
    out = ds.map_batches(BarycenterSolver, batch_size=BATCH,  # NumPy batches: Ray's default
                         fn_constructor_kwargs={"bar_size": BAR, "keep_columns": ["pixel"]},
                         compute=ray.data.ActorPoolStrategy(size=1))
    rows = sorted(out.take_all(), key=lambda r: r["problem_id"])
    assert [r["pixel"] for r in rows] == [f"px-{i}" for i in ids]
    want = raybary.solve(problems, bar_size=BAR, ids=ids, batch_size=BATCH)
    for g, r in zip(results_to_gmms(rows), want):
        _close(g.means, r.means)
        _close(g.covs, r.covs)
        _close(g.weights, r.weights)


#: docs/ray_data.md's CPU settings on a 2-CPU Ray: a pool of one actor per CPU
#: (each num_cpus=1, so the pool holds every CPU), the write with no CPU.
POOL_SCRIPT = """
import json, logging, sys
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
         logging_level=logging.WARNING)
import pyarrow.parquet as pq
import ray.data
from raybary.interop import BarycenterSolver, read_problems_dataset

store, out = sys.argv[1:3]
ds = read_problems_dataset(store, shard_size=8)
results = ds.map_batches(BarycenterSolver, fn_constructor_kwargs={"bar_size": 3},
                         batch_format="pyarrow", batch_size=16, num_cpus=1,
                         compute=ray.data.ActorPoolStrategy(size=2))
results.write_parquet(out, ray_remote_args={"num_cpus": 0}, concurrency=2)
t = pq.read_table(out)
print(json.dumps({"cpus": ray.cluster_resources()["CPU"],
                  "ids": sorted(t.column("problem_id").to_pylist()),
                  "status": t.column("status").to_pylist()}))
"""


def _run_with_deadline(args: list[str], timeout: float) -> str:
    """Run ``args`` in a process group of its own; kill the group (the driver
    and the Ray it started) if it is not done in ``timeout`` seconds."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the pipeline did not finish in {timeout:.0f} s (deadlock?); its last "
                    f"log lines:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out


def test_pool_as_large_as_the_cpus_does_not_hang(stores, tmp_path):
    """Two solver actors of one CPU each on a 2-CPU Ray hold every CPU: the read
    tasks (no CPU) and the write (docs/ray_data.md's settings) must still run.
    With the reads of a whole CPU this waited forever ("ReadRange: 0/1 ...
    backpressured"); the deadline turns that into a failure."""
    out = _run_with_deadline([sys.executable, "-c", POOL_SCRIPT, stores["bad"],
                              str(tmp_path / "out")], timeout=300)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["cpus"] == 2
    shard = open_store(stores["bad"]).read(0, N, dtype="float32")
    assert got["ids"] == sorted(shard.problem_ids.tolist())
    assert sorted(got["status"]) == sorted(["invalid"] * len(BAD) + ["ok"] * (N - len(BAD)))


def test_read_options_are_checked(stores):
    with pytest.raises(ValueError, match="num_cpus must be at least 0"):
        read_problems_dataset(stores["parquet"], num_cpus=-1)
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        read_problems_dataset(stores["parquet"], concurrency=0)
    with pytest.raises(ValueError, match="shard_size must be at least 1"):
        read_problems_dataset(stores["parquet"], shard_size=0)


# ------------------------------------------------------------------ without Ray
@pytest.fixture(scope="module")
def solved():
    problems = tutorial_problems(BATCH, seed=3)
    ids = list(range(100, 100 + BATCH))
    table = problems_to_table(problems, ids)
    return problems, ids, table, BarycenterSolver(bar_size=BAR)(table)


def test_every_batch_format_gives_the_same_rows(solved):
    problems, ids, table, out = solved
    solver = BarycenterSolver(bar_size=BAR)
    flat = problems_to_table(problems, ids, flat_covs=True)
    as_numpy = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
    for batch in (flat, as_numpy, table.to_pandas(), table.to_pandas(types_mapper=pd.ArrowDtype),
                  table.to_pylist()):
        assert solver(batch).equals(out)
    # a float32 / large_list / fixed_size_list encoding casts to the same problems
    odd = table.set_column(3, "means", table.column("means").cast(
        pa.large_list(pa.list_(pa.list_(pa.float32(), 2)))))
    got = solver(odd)
    _close(got.column("objective").to_numpy(), out.column("objective").to_numpy(), 1e-4)
    want = raybary.solve(problems, bar_size=BAR, ids=ids)
    for g, r in zip(results_to_gmms(out), want):
        _close(g.covs, r.covs)


def test_tensor_columns_decode_to_the_same_problems():
    """Problems of one shape (J GMMs of K components each) as Ray makes them of
    NumPy cells: tensors in NumPy batches, tensor extension columns in Arrow ones."""
    from ray.data.extensions import ArrowTensorArray

    problems = []
    for p in tutorial_problems(4, seed=9):
        gmms = [raybary.GMM(g.weights[:2] / g.weights[:2].sum(), g.means[:2], g.covs[:2])
                for g in p.gmms]
        problems.append(raybary.Problem(gmms, p.lambdas))
    dense = {"problem_id": np.arange(4, dtype=np.int64),
             "lambdas": np.stack([p.lambdas for p in problems]),
             "weights": np.stack([[g.weights for g in p.gmms] for p in problems]),
             "means": np.stack([[g.means for g in p.gmms] for p in problems]),
             "covs": np.stack([[g.covs for g in p.gmms] for p in problems])}
    tensors = pa.table({k: v if k == "problem_id" else ArrowTensorArray.from_numpy(v)
                        for k, v in dense.items()})
    assert isinstance(tensors.column("covs").type, pa.ExtensionType)
    for batch in (dense, tensors):
        got, errors = decode_problems(batch).to_problems()
        assert errors == [None] * 4
        for p, q in zip(got, problems):
            for g, h in zip(p.gmms, q.gmms):
                np.testing.assert_allclose(g.covs, h.covs, rtol=1e-15)
                np.testing.assert_allclose(g.means, h.means, rtol=1e-15)


def test_rows_that_cannot_be_decoded_are_invalid_with_a_located_message(solved):
    problems, ids, table, _ = solved
    rows = problems_to_table(problems[:10]).to_pylist()
    rows[0]["weights"] = rows[0]["weights"][:2]
    rows[1]["means"] = None
    rows[2]["covs"][1] = rows[2]["covs"][1][:2]
    rows[3]["covs"][0][1] = [[1.0, 0.0, 0.0], [0.0]]
    rows[4]["lambdas"][2] = None
    rows[5]["means"][2][0] = [1.0, 2.0, 3.0]
    rows[6]["error"] = "problem 6: told by an earlier step"
    for k in ("lambdas", "weights", "means", "covs"):
        rows[7][k] = []
    rows[8]["weights"][1][0] = -0.5
    rows[9]["covs"][0][0][0][1] = None
    bad = pa.Table.from_pylist(rows, schema=problems_to_table(problems[:1]).schema)
    _, errors = decode_problems(bad).to_problems(dtype="float32")
    assert errors == [
        "problem 0: lambdas has 3 entries, weights 2, means 3, covs 3 (each needs one per GMM)",
        "problem 1: means is missing (null)",
        "problem 2, gmm 1: weights has 3 entries, means 3, covs 2 (each needs one per component)",
        "problem 3, gmm 0, component 1: cov is not a square matrix (its rows have different "
        "lengths, or not as many values as there are rows)",
        "problem 4, gmm 2: lambda is missing (null)",
        "problem 5, gmm 2, component 0: mean has 3 values, expected 2 (the length of the "
        "problem's first mean)",
        "problem 6: told by an earlier step",
        "problem 7: has no GMM",
        errors[8],
        "problem 9, gmm 0, component 0: cov contains a missing (null) value",
    ]
    # value errors: the message raybary.solve's validation gives for the same problem
    broken = problems[8].gmms[1]
    w = broken.weights.copy()
    w[0] = -0.5
    gmms = list(problems[8].gmms)
    gmms[1] = raybary.GMM(w, broken.means, broken.covs)
    with pytest.raises(ValueError) as e:
        raybary.solve(raybary.Problem(gmms, problems[8].lambdas), bar_size=BAR, ids=[8])
    assert errors[8].startswith("problem 8, gmm 1, component 0: weight is negative (-0.5)")
    assert errors[8].replace("problem 8", "problem 0") in str(e.value)


def test_a_batch_with_bad_rows_solves_the_others(solved):
    problems, ids, table, out = solved
    rows = table.to_pylist()
    rows[5]["covs"][0][0] = [[1.0, 3.0], [3.0, 1.0]]  # not positive definite
    got = BarycenterSolver(bar_size=BAR)(pa.Table.from_pylist(rows, schema=table.schema))
    status = got.column("status").to_pylist()
    assert status == ["ok"] * 5 + ["invalid"] + ["ok"] * (BATCH - 6)
    assert "covariance is not positive definite" in got.column("error")[5].as_py()
    keep = [i for i in range(BATCH) if i != 5]
    _close(got.column("objective").take(keep).to_numpy(),
           out.column("objective").take(keep).to_numpy())


def test_refusals():
    with pytest.raises(OptionsError, match="bar_size must be at least 1"):
        BarycenterSolver(bar_size=0)
    with pytest.raises(OptionsError, match="not both"):
        BarycenterSolver(epsilon=0.1, relative_epsilon=1e-3)
    with pytest.raises(ValueError, match="would overwrite"):
        BarycenterSolver(keep_columns=["status"])
    table = problems_to_table(tutorial_problems(2))
    with pytest.raises(ValueError, match="no column 'covs'"):
        decode_problems(table.drop_columns(["covs"]))
    with pytest.raises(ValueError, match="column 'weights' has type"):
        decode_problems(table.set_column(2, "weights", pa.array(["x", "y"])))


# ------------------------------------------------------------------ docs/ray_data.md
@pytest.mark.usefixtures("ray_local")
def test_doc_examples_run(tmp_path, monkeypatch, capsys):
    """Every ```python block runs, in order, in one namespace; ```python notest
    blocks (snippets, GPU and cluster settings) compile."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_ray_data"}
    ran = 0
    for block in fenced(DOC):
        assert block.lang in ("python", "text"), block.where(DOC)
        code = compile(block.code, block.where(DOC), "exec")
        if block.lang == "python" and not block.tags:
            exec(code, namespace)
            ran += 1
        else:
            assert block.tags == ("notest",) or block.lang == "text", block.where(DOC)
    assert ran >= 2
    out = capsys.readouterr().out
    assert "32 {'ok': 32}" in out


def test_doc_says_when_to_use_raybary_run():
    text = DOC.read_text()
    for phrase in ("raybary run", "exactly once", "resume", "grids", "num_gpus=1",
                   "raybary[gpu]", "batch_format=\"pyarrow\"", "BarycenterSolver",
                   "read_problems_dataset", "problems_to_table", "results_to_gmms"):
        assert phrase in text, phrase
