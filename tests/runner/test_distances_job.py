"""The distance job (``raybary distances``) end to end on the session's local Ray.

Stores are tiny (d = 2, the tutorial family's K of 2, 3 and 5, a few single
Gaussians) so that the compiled shapes are those of tests/test_distances.py.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import raybary
from raybary import GMM
from raybary.cli import main
from raybary.runner import ExecOptions
from raybary.runner.distances import run_distances
from raybary.storage import read_results
from raybary.storage.gmm_store import convert_gmms, generate_gmms, write_gmms

N, TILE = 9, 4  # 3 x 3 tiles over the upper triangle: 6 shards, 36 pairs

pytestmark = pytest.mark.usefixtures("ray_local")


def exe(**kw) -> ExecOptions:
    kw.setdefault("actors", 1)
    return ExecOptions(**kw)


def gaussian(mean, cov) -> GMM:
    return GMM(np.ones(1), np.asarray([mean], float), np.asarray([cov], float))


def w2_squared(a: GMM, b: GMM) -> float:
    """W2^2 between two Gaussians (closed form)."""
    from scipy.linalg import sqrtm

    ca, cb = a.covs[0], b.covs[0]
    root = sqrtm(ca)
    cross = np.real(sqrtm(root @ cb @ root))
    return float(np.sum((a.means[0] - b.means[0]) ** 2) + np.trace(ca + cb - 2 * cross))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distances")
    store = generate_gmms(str(root / "gmms.parquet"), N, seed=3)
    singles = [gaussian([0, 0], [[1, 0.3], [0.3, 2]]), gaussian([3, -1], [[0.5, 0], [0, 0.5]]),
               gaussian([-2, 4], [[2, -0.5], [-0.5, 1]])]
    bad = GMM(np.array([1.5, -0.5]), np.zeros((2, 2)), np.stack([np.eye(2)] * 2))
    mixed = write_gmms(str(root / "mixed.parquet"), [*singles, bad], ids=[10, 20, 30, 40])
    return {"root": root, "store": store.url, "mixed": mixed.url, "singles": singles}


@pytest.fixture(scope="module")
def reference(data):
    out = str(data["root"] / "ref")
    report = run_distances(data["store"], out, exe=exe(), tile=TILE, stream=None)
    return out, report


def check_all_pairs_once(dist, n=N, ids=None):
    df = dist.to_pandas()
    ids = list(range(n)) if ids is None else ids
    want = {(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]}
    got = list(zip(df.i.tolist(), df.j.tolist()))
    assert len(got) == len(want) == n * (n - 1) // 2 and set(got) == want
    assert dist.complete


def test_all_pairs_equal_mw2_batch_each_once(data, reference):
    out, report = reference
    assert report.complete and report.n_shards == 6 and report.counts == {
        "ok": 36, "invalid": 0, "failed": 0}
    dist = raybary.read_distances(out)
    check_all_pairs_once(dist)
    df = dist.to_pandas()
    assert (df.status == "ok").all() and df.converged.all() and df.error.isna().all()
    gmms = raybary.storage.open_gmm_store(data["store"]).read_gmms(0, N).gmms
    want = raybary.mw2_batch([(gmms[i], gmms[j]) for i, j in zip(df.i, df.j)])
    np.testing.assert_allclose(df.mw2.to_numpy(), want, rtol=1e-4)
    matrix, ids = dist.matrix()
    assert ids.tolist() == list(range(N)) and matrix.shape == (N, N)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 0.0)
    assert matrix[2, 7] == df[(df.i == 2) & (df.j == 7)].mw2.item() and not np.isnan(matrix).any()
    with pytest.raises(ValueError, match="read the long form"):
        dist.matrix(max_gmms=5)
    with pytest.raises(ValueError, match="read_distances"):
        read_results(out)


def test_a_bad_gmm_gives_invalid_rows_and_single_gaussians_their_w2(data):
    out = str(data["root"] / "mixed-out")
    report = run_distances(data["mixed"], out, exe=exe(), tile=2, stream=None)
    assert report.counts == {"ok": 3, "invalid": 3, "failed": 0}
    dist = raybary.read_distances(out)
    check_all_pairs_once(dist, 4, [10, 20, 30, 40])
    df = dist.to_pandas().set_index(["i", "j"])
    bad = df[df.status == "invalid"]
    assert sorted(bad.index) == [(10, 40), (20, 40), (30, 40)]
    assert bad.error.str.startswith("gmm 40, component 1: weight").all(), bad.error.tolist()
    assert bad.mw2.isna().all() and bad.converged.isna().all()
    a, b, c = data["singles"]
    for (i, j), (x, y) in {(10, 20): (a, b), (10, 30): (a, c), (20, 30): (b, c)}.items():
        assert df.loc[(i, j), "mw2"] == pytest.approx(w2_squared(x, y), rel=1e-4)
    matrix, ids = dist.matrix()
    assert ids.tolist() == [10, 20, 30, 40]
    assert np.isnan(matrix[3, :3]).all() and np.isnan(matrix[:3, 3]).all()


def test_show_summarises_a_distance_output_and_a_gmm_store(data):
    """`raybary show` on the job's output: statuses, the nearest pair (the two
    closest single Gaussians, by their closed-form W2^2) and the bad GMM's
    message; on the GMM store: its size and the bad GMM, named."""
    from click.testing import CliRunner

    from raybary.cli import main

    out = str(data["root"] / "show-out")
    run_distances(data["mixed"], out, exe=exe(), tile=2, stream=None)
    r = CliRunner().invoke(main, ["show", out, "--top", "1"])
    assert r.exit_code == 0, r.output
    a, b, c = data["singles"]
    (i, j), w2 = min({(10, 20): w2_squared(a, b), (10, 30): w2_squared(a, c),
                      (20, 30): w2_squared(b, c)}.items(), key=lambda kv: kv[1])
    assert "status: ok 3, invalid 3, failed 0" in r.output
    nearest = r.output.split("nearest 1 pairs:\n")[1].splitlines()[0].split(": ")
    assert nearest[0].strip() == f"({i}, {j})" and float(nearest[1]) == pytest.approx(w2, 1e-4)
    assert "(10, 40): gmm 40, component 1: weight" in r.output
    r = CliRunner().invoke(main, ["show", data["mixed"]])
    assert r.exit_code == 0, r.output
    assert "GMM store" in r.output and "n_gmms: 4" in r.output
    assert "all 4 GMMs: 1 invalid" in r.output and "    gmm 40, component 1: weight" in r.output


def test_zarr_gmm_stores_give_the_parquet_stores_rows(data, reference):
    """The same GMMs in Zarr (chunks of 4 GMMs, so tiles span chunks), through the
    CLI: the same pairs, the same values, and the bad GMM named as in Parquet."""
    store = convert_gmms(data["store"], str(data["root"] / "gmms.zarr"), chunk_gmms=4)
    mixed = convert_gmms(data["mixed"], str(data["root"] / "mixed.zarr"), chunk_gmms=3)
    assert store.format == mixed.format == "raybary.gmms.zarr/1"
    for src, tile, want in ((store.url, TILE, reference[0]),
                            (mixed.url, 2, str(data["root"] / "mixed-out"))):
        out = str(data["root"] / (src.rsplit("/", 1)[1] + "-out"))
        r = CliRunner().invoke(main, ["distances", src, out, "--tile", str(tile), "--actors", "1",
                                      "-q"])
        assert r.exit_code == 0, r.output
        if not os.path.exists(want):  # the Parquet run of the mixed store
            run_distances(data["mixed"], want, exe=exe(), tile=tile, stream=None)
        got = raybary.read_distances(out).to_pandas().sort_values(["i", "j"])
        ref = raybary.read_distances(want).to_pandas().sort_values(["i", "j"])
        assert got[["i", "j", "status"]].values.tolist() == ref[["i", "j", "status"]].values.tolist()
        np.testing.assert_allclose(got.mw2.to_numpy(), ref.mw2.to_numpy(), rtol=1e-12)
        assert got.error.fillna("").tolist() == ref.error.fillna("").tolist()
    assert "gmm 40, component 1: weight" in got.error.fillna("").str.cat()


def test_pairs_file_with_an_unknown_id_through_the_cli(data):
    pairs = data["root"] / "pairs.parquet"
    pq.write_table(pa.table({"i": [10, 30, 20, 10], "j": [20, 99, 10, 10]}), pairs)
    out = str(data["root"] / "pairs-out")
    r = CliRunner().invoke(main, ["distances", data["mixed"], out, "--pairs", str(pairs),
                                  "--shard-size", "3", "-q"])
    assert r.exit_code == 0, r.output
    df = raybary.read_distances(out).to_pandas()
    assert list(zip(df.i, df.j)) == [(10, 20), (30, 99), (20, 10), (10, 10)]
    assert df.status.tolist() == ["ok", "invalid", "ok", "ok"]
    assert df.error[1] == "pairs row 1: gmm 99 not in the GMM store"
    a, b, _ = data["singles"]
    np.testing.assert_allclose(df.mw2[[0, 2]], w2_squared(a, b), rtol=1e-4)
    assert df.mw2[3] == pytest.approx(0.0, abs=1e-6)


def test_killed_actor_is_replaced_and_every_pair_computed_once(data, reference):
    out = str(data["root"] / "actor-kill")
    killed = []

    def on_shard(summary):
        if not killed:  # the actor has its next shard in flight: kill it mid-run
            killed.append(summary.pid)
            os.kill(summary.pid, signal.SIGKILL)

    report = run_distances(data["store"], out, exe=exe(), tile=TILE, stream=None,
                           on_shard=on_shard)
    assert killed and report.complete and report.actor_replacements == 1, report
    assert report.retries + report.replies_lost >= 1 and len(report.pids) == 2, report
    dist = raybary.read_distances(out)
    check_all_pairs_once(dist)
    ref = raybary.read_distances(reference[0]).to_pandas()
    np.testing.assert_allclose(dist.to_pandas().mw2, ref.mw2, rtol=1e-9)


def test_interrupted_job_resumes_and_computes_every_pair_once(data, reference):
    out = str(data["root"] / "interrupted")
    seen = []

    def interrupt(summary):
        seen.append(summary.shard)
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the driver, two shards in

    with pytest.raises(KeyboardInterrupt):
        run_distances(data["store"], out, exe=exe(), tile=TILE, stream=None, on_shard=interrupt)
    partial = raybary.read_distances(out)
    assert not partial.complete and 2 <= len(partial.table) < 36
    report = run_distances(data["store"], out, exe=exe(), tile=TILE, stream=None)
    assert report.complete and report.shards_skipped >= 2
    assert report.shards_skipped + report.shards_run == 6
    dist = raybary.read_distances(out)
    check_all_pairs_once(dist)
    ref = raybary.read_distances(reference[0]).to_pandas()
    np.testing.assert_allclose(dist.to_pandas().mw2, ref.mw2, rtol=1e-9)
    again = run_distances(data["store"], out, exe=exe(), tile=TILE, stream=None)
    assert again.shards_skipped == 6 and again.shards_run == 0


def test_a_shard_that_kills_its_actor_is_committed_failed_then_solved_on_rerun(data):
    from raybary.runner.actor import DistanceWorker

    class DiesOnShard1(DistanceWorker):  # in the test: Ray ships it by value
        def run_shard(self, shard_index: int):
            if shard_index == 1:
                os._exit(70)
            return super().run_shard(shard_index)

    out = str(data["root"] / "give-up")
    report = run_distances(data["store"], out, exe=exe(max_attempts=1), tile=TILE, stream=None,
                           _worker=DiesOnShard1)
    assert report.complete and report.shards_given_up == 1, report
    df = raybary.read_distances(out).to_pandas()
    lost = df[df.status == "failed"]
    assert len(lost) == 16 and lost.error.str.startswith("not solved: 1 attempts").all()
    again = run_distances(data["store"], out, exe=exe(), tile=TILE, stream=None)
    assert again.shards_run == 1 and again.counts == {"ok": 36, "invalid": 0, "failed": 0}
    check_all_pairs_once(raybary.read_distances(out))


def test_other_options_on_the_same_output_are_refused(data, reference):
    from raybary.storage import ResultsConflictError

    with pytest.raises(ResultsConflictError, match="options.relative_epsilon"):
        run_distances(data["store"], reference[0],
                      raybary.SolverOptions(relative_epsilon=1e-2), exe=exe(), tile=TILE,
                      stream=None)


def test_the_distance_job_section_of_the_docs_runs(data, tmp_path, monkeypatch):
    """docs/distances.md's ``job`` blocks: every ``raybary`` command parses (submit
    with --dry-run); the first two run at a small size; the python blocks run."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from docs_blocks import ROOT, blocks, shell_commands

    monkeypatch.chdir(tmp_path)
    found = {info: [c for i, c in blocks(ROOT / "docs" / "distances.md") if i == info]
             for info in ("bash job", "python job")}
    commands = [c for code in found["bash job"] for c in shell_commands(code)]
    assert [c[:2] for c in commands] == [["raybary", "generate"], ["raybary", "distances"],
                                         ["raybary", "distances"], ["raybary", "submit"]]
    small = [["generate", "gmms.parquet", "--gmms", "6"], [*commands[1][1:], "--tile", "3", "-q"]]
    for args in small:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, [*commands[3][1:], "--dry-run"]).exit_code == 0
    from raybary.cli.distances_cmds import distances_cmd

    distances_cmd.make_context("distances", commands[2][2:])
    namespace: dict = {}
    for code in found["python job"]:
        exec(compile(code, "docs/distances.md", "exec"), namespace)
    assert namespace["ids"].tolist() == list(range(6)) and namespace["df"].shape == (15, 6)
    assert raybary.storage.open_gmm_store("sklearn-gmms.parquet").n_gmms == 3
