"""Results.barycenter / iter_barycenters / barycenter_arrays: the GMMs written come back."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import raybary
from raybary import GMM, RaybaryError
from raybary.storage.results import BarycenterNotFoundError, ResultWriter, read_results
from raybary.types import BatchOutcome, Result

N_PROBLEMS, SHARD = 11, 4
IDS = [1000 - 7 * i for i in range(N_PROBLEMS)]  # descending: store order is not id order
STATUS = {i: ("invalid" if i % 5 == 3 else "failed" if i % 5 == 4 else "ok")
          for i in range(N_PROBLEMS)}


def result(pos: int) -> Result:
    """Problem ``pos``'s barycenter: its own size n, dimension d and values."""
    rng = np.random.default_rng(pos)
    n, d = 1 + pos % 3, 2 + pos % 2
    a = rng.normal(size=(n, d, d))
    w = rng.uniform(0.1, 1.0, n)
    return Result(w / w.sum(), rng.normal(size=(n, d)), a @ np.swapaxes(a, 1, 2) + np.eye(d),
                  objective=1.0 + pos, converged=True, iterations=3, marginal_error=0.0)


def written() -> dict[int, Result]:
    return {IDS[p]: result(p) for p in range(N_PROBLEMS) if STATUS[p] == "ok"}


def write(out: str, shards: list[int] | None = None) -> None:
    writer = ResultWriter(out, n_problems=N_PROBLEMS, shard_size=SHARD, options={"n": 3})
    writer.prepare()
    for shard in range(writer.n_shards) if shards is None else shards:
        start, stop = writer.shard_range(shard)
        pos = range(start, stop)
        writer.committer.commit_shard(shard, BatchOutcome(
            [IDS[p] for p in pos], [STATUS[p] for p in pos],
            [None if STATUS[p] == "ok" else f"problem {IDS[p]}: {STATUS[p]} on purpose" for p in pos],
            [result(p) if STATUS[p] == "ok" else None for p in pos], 0.1))
    if shards is None:
        writer.finalize({})


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("res") / "out")
    write(path)
    return path


def assert_same(g: GMM, r: Result) -> None:
    assert isinstance(g, GMM)
    np.testing.assert_array_equal(g.weights, r.weights)
    np.testing.assert_array_equal(g.means, r.means)
    np.testing.assert_array_equal(g.covs, r.covs)


@pytest.mark.parametrize("as_", ["pandas", "pyarrow"])
def test_barycenter_equals_what_was_written(out, as_):
    res = read_results(out, as_=as_)
    for pid, r in written().items():
        assert_same(res.barycenter(pid), r)
        w, m, c = res.barycenter_arrays(np.int64(pid))
        assert w.shape == (len(r.weights),) and m.shape == r.means.shape and c.shape == r.covs.shape
        np.testing.assert_array_equal(c, r.covs)


@pytest.mark.parametrize("as_", ["pandas", "pyarrow"])
def test_iter_barycenters_every_ok_problem_in_id_order(out, as_):
    res = read_results(out, as_=as_)
    got = list(res.iter_barycenters())
    expected = written()
    assert [pid for pid, _ in got] == sorted(expected)
    assert all(type(pid) is int for pid, _ in got)
    for pid, g in got:
        assert_same(g, expected[pid])


def test_rows_in_any_order_and_sliced_chunks(out):
    """Shuffled rows and chunks that are slices of larger arrays (nonzero list offsets)."""
    res = read_results(out, as_="pyarrow")
    table = res.barycenters
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    res.barycenters = pa.concat_tables([table.slice(0, 5), table.slice(5, 3), table.slice(8)])
    assert res.barycenters.column("mean").num_chunks == 3
    for pid, g in res.iter_barycenters():
        assert_same(g, written()[pid])
        assert_same(res.barycenter(pid), written()[pid])


def test_unknown_or_not_ok_ids_raise_clear_errors(out):
    res = read_results(out)
    invalid, failed = IDS[3], IDS[4]
    with pytest.raises(BarycenterNotFoundError, match=f"problem {invalid} has no barycenter: "
                       f"its status is 'invalid': problem {invalid}: invalid on purpose"):
        res.barycenter(invalid)
    with pytest.raises(BarycenterNotFoundError, match="its status is 'failed'"):
        res.barycenter_arrays(failed)
    with pytest.raises(KeyError) as info:  # also a KeyError, and a RaybaryError
        res.barycenter(12345)
    assert isinstance(info.value, RaybaryError)
    assert str(info.value).startswith("problem 12345 is not in the results at ")
    with pytest.raises(TypeError):
        res.barycenter("1000")


def test_unfinished_run_says_the_problem_may_come(tmp_path):
    path = str(tmp_path / "out")
    write(path, shards=[1])
    res = read_results(path)
    assert [pid for pid, _ in res.iter_barycenters()] == sorted(
        IDS[p] for p in range(4, 8) if STATUS[p] == "ok")
    with pytest.raises(BarycenterNotFoundError, match="the run is not finished"):
        res.barycenter(IDS[0])


def test_empty_results(tmp_path):
    path = str(tmp_path / "out")
    write(path, shards=[])
    assert list(read_results(path).iter_barycenters()) == []
    assert list(read_results(path, as_="pyarrow").iter_barycenters()) == []


def test_reading_barycenters_imports_no_jax(out):
    code = ("import sys; from raybary.storage.results import read_results; "
            f"res = read_results({out!r}); g = res.barycenter({IDS[0]}); "
            "n = sum(1 for _ in res.iter_barycenters()); "
            "print(type(g).__name__, n, 'jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["GMM", str(len(written())), "False"]


def test_one_line_into_sklearn(out):
    pytest.importorskip("sklearn")
    res = raybary.read_results(out)
    pid = IDS[0]
    gm = res.barycenter(pid).to_sklearn()
    x = np.random.default_rng(1).normal(size=(20, gm.means_.shape[1]))
    np.testing.assert_allclose(gm.score_samples(x), raybary.log_density(res.barycenter(pid), x),
                               rtol=1e-10)
