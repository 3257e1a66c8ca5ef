"""GMM stores (the distance job's input) and the pairs of a distance job: no Ray, no JAX."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from docs_blocks import ROOT, blocks, shell_commands

from raybary import GMM
from raybary.cli import main
from raybary.storage import StoreDataError, StoreFormatError, open_store
from raybary.storage.generate import generate, tutorial_columns
from raybary.storage.gmm_store import (
    convert_gmms,
    generate_gmms,
    gmm_message,
    open_gmm_store,
    write_gmms,
)
from raybary.storage.pairs import AllPairs, PairsFile


@pytest.mark.parametrize("n,tile", [(0, 3), (1, 3), (2, 1), (7, 3), (9, 3), (10, 4), (5, 10)])
def test_all_pairs_tiles_hold_every_pair_once(n, tile):
    plan = AllPairs(n, tile)
    stops = plan.shard_stops()
    assert len(stops) == plan.blocks * (plan.blocks + 1) // 2
    got = []
    for k in range(len(stops)):
        shard = plan.shard(k)
        assert len(shard) == stops[k] - (stops[k - 1] if k else 0)
        assert len(shard.positions()) <= 2 * tile and len(shard) <= tile * tile
        got += list(zip(shard.left.tolist(), shard.right.tolist()))
    assert len(got) == plan.n_pairs == n * (n - 1) // 2
    assert set(got) == {(i, j) for i in range(n) for j in range(i + 1, n)}


def test_generated_gmms_are_the_tutorial_familys(tmp_path):
    store = generate_gmms(str(tmp_path / "g.parquet"), 7, seed=5)
    shard = store.read_gmms(0, 7)
    assert store.format == "raybary.gmms.parquet/1" and store.n_gmms == 7
    assert shard.ids.tolist() == list(range(7)) and shard.errors == [None] * 7
    assert [g.n_components for g in shard.gmms] == [2, 3, 5, 2, 3, 5, 2]
    cols = tutorial_columns(3, seed=5)
    problems, _ = cols.to_problems()
    np.testing.assert_array_equal(shard.gmms[4].means, problems[1].gmms[1].means)
    np.testing.assert_allclose(shard.gmms[6].covs, problems[2].gmms[0].covs)


def test_generate_gmms_on_the_command_line(tmp_path):
    out = tmp_path / "cli.parquet"
    r = CliRunner().invoke(main, ["generate", str(out), "--gmms", "5", "--seed", "5"])
    assert r.exit_code == 0 and "wrote 5 GMMs" in r.output, r.output
    assert open_gmm_store(str(out)).read_gmms(0, 5).gmms[3].dim == 2
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "x.parquet")])
    assert r.exit_code == 2 and "--problems N" in r.output and "--gmms N" in r.output


def test_write_gmms_from_sklearn_with_ids_and_diagonal_covariances(tmp_path):
    mixture = pytest.importorskip("sklearn.mixture")
    rng = np.random.default_rng(0)
    models = [mixture.GaussianMixture(k, covariance_type="diag", random_state=0)
              .fit(rng.normal(size=(60, 2)) + 5 * k) for k in (1, 2, 3)]
    gmms = [GMM.from_sklearn(m) for m in models]
    store = write_gmms(str(tmp_path / "sk.parquet"), gmms, ids=[30, 10, 20],
                       covariance_type="diag")
    assert store.covariance_type == "diag"
    shard = store.read_gmms(0, 3)
    assert shard.ids.tolist() == [10, 20, 30]  # in id order
    np.testing.assert_allclose(shard.gmms[0].means, models[1].means_)
    np.testing.assert_allclose(np.diagonal(shard.gmms[2].covs, axis1=1, axis2=2),
                               models[0].covariances_)
    assert store.positions(np.array([20, 11, 30])).tolist() == [1, -1, 2]
    with pytest.raises(ValueError, match="distinct"):
        write_gmms(str(tmp_path / "dup.parquet"), gmms[:2], ids=[1, 1])
    with pytest.raises(FileExistsError, match="overwrite"):
        write_gmms(str(tmp_path / "sk.parquet"), gmms)


def test_a_bad_gmm_is_named_by_its_id_and_field(tmp_path):
    bad = GMM(np.array([0.5, 0.5]), np.array([[0.0, np.nan], [1.0, 1.0]]),
              np.stack([np.eye(2)] * 2))
    good = GMM(np.ones(1), np.zeros((1, 2)), np.eye(2)[None])
    shard = write_gmms(str(tmp_path / "b.parquet"), [good, bad], ids=[4, 17]).read_gmms(0, 2)
    assert shard.gmms[1] is None and shard.errors[0] is None
    assert shard.errors[1].startswith("gmm 17, component 0: mean"), shard.errors[1]
    assert gmm_message("problem 3, gmm 0, component 1: weight is negative") == \
        "gmm 3, component 1: weight is negative"


def test_a_problem_store_is_refused_with_a_hint(tmp_path):
    url = generate(str(tmp_path / "p.parquet"), 2).url
    with pytest.raises(StoreFormatError, match="looks like a problem store"):
        open_gmm_store(url)
    zarr_problems = generate(str(tmp_path / "p.zarr"), 2).url
    with pytest.raises(StoreFormatError, match=r"(?s)raybary\.gmms\.zarr/1.*array gmms/id is "
                       "missing.*looks like a problem store"):
        open_gmm_store(zarr_problems)
    zarr_gmms = generate_gmms(str(tmp_path / "g.zarr"), 2).url
    with pytest.raises(StoreFormatError, match="(?s)problems/id is missing.*looks like a GMM store"):
        open_store(zarr_gmms)
    for name in ("none.parquet", "none.zarr"):
        with pytest.raises(FileNotFoundError, match="no GMM store"):
            open_gmm_store(str(tmp_path / name))


def same_gmms(a, b) -> None:
    """Two :class:`GMMShard` hold the same ids and, exactly, the same GMMs."""
    assert a.ids.tolist() == b.ids.tolist() and a.errors == b.errors
    for x, y in zip(a.gmms, b.gmms, strict=True):
        for field in ("weights", "means", "covs"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_parquet_zarr_parquet_round_trip_keeps_every_gmm(tmp_path, covariance_type):
    parquet = generate_gmms(str(tmp_path / "g.parquet"), 11, seed=2,
                            covariance_type=covariance_type)
    zarr_store = convert_gmms(parquet, str(tmp_path / "g.zarr"), chunk_gmms=4)
    back = convert_gmms(zarr_store, str(tmp_path / "back.parquet"))
    assert (zarr_store.format, back.format) == ("raybary.gmms.zarr/1", "raybary.gmms.parquet/1")
    assert zarr_store.covariance_type == back.covariance_type == covariance_type
    assert zarr_store.n_gmms == back.n_gmms == 11 and zarr_store.dim == 2
    whole = parquet.read_gmms(0, 11)
    same_gmms(zarr_store.read_gmms(0, 11), whole)
    same_gmms(back.read_gmms(0, 11), whole)
    # ranges inside one chunk, across chunks, empty, and the generator's own Zarr output
    for start, stop in ((1, 3), (3, 9), (8, 11), (5, 5)):
        got = zarr_store.read_gmms(start, stop)
        assert got.ids.tolist() == list(range(start, stop))
        for g, w in zip(got.gmms, whole.gmms[start:stop], strict=True):
            np.testing.assert_array_equal(g.covs, w.covs)
    direct = generate_gmms(str(tmp_path / "direct.zarr"), 11, seed=2,
                           covariance_type=covariance_type, chunk_gmms=3)
    same_gmms(direct.read_gmms(0, 11), whole)
    with pytest.raises(IndexError, match="outside"):
        zarr_store.read_gmms(10, 12)


def test_zarr_gmm_store_ids_bad_gmms_and_refusals(tmp_path):
    bad = GMM(np.array([0.5, 0.5]), np.array([[0.0, np.nan], [1.0, 1.0]]),
              np.stack([np.eye(2)] * 2))
    good = GMM(np.ones(1), np.zeros((1, 2)), np.eye(2)[None])
    store = write_gmms(str(tmp_path / "b.zarr"), [bad, good, good], ids=[17, 4, 9], chunk_gmms=2)
    shard = pickle.loads(pickle.dumps(store)).read_gmms(0, 3)  # as an actor gets it
    assert shard.ids.tolist() == [4, 9, 17] and shard.gmms[2] is None
    assert shard.errors[:2] == [None, None]
    assert shard.errors[2].startswith("gmm 17, component 0: mean"), shard.errors[2]
    assert store.positions(np.array([9, 5, 17])).tolist() == [1, -1, 2]
    mixed = [good, GMM(np.ones(1), np.zeros((1, 3)), np.eye(3)[None])]
    with pytest.raises(StoreDataError, match="one dimension d"):
        write_gmms(str(tmp_path / "mixed.zarr"), mixed)
    assert not (tmp_path / "mixed.zarr").exists()  # nothing half-written is left
    with pytest.raises(FileExistsError, match="overwrite"):
        write_gmms(str(tmp_path / "b.zarr"), [good])
    with pytest.raises(StoreDataError, match="gmm 17, component 0 has the off-diagonal"):
        tilted = GMM(np.ones(1), np.zeros((1, 2)), np.array([[[1.0, 0.5], [0.5, 1.0]]]))
        convert_gmms(write_gmms(str(tmp_path / "t.zarr"), [tilted], ids=[17]),
                     str(tmp_path / "t.parquet"), covariance_type="diag")


def test_generate_and_convert_zarr_gmm_stores_on_the_command_line(tmp_path):
    zarr_url, parquet_url = str(tmp_path / "g.zarr"), str(tmp_path / "g.parquet")
    r = CliRunner().invoke(main, ["generate", zarr_url, "--gmms", "5", "--chunk-problems", "2",
                                  "--covariance-type", "diag"])
    assert r.exit_code == 0 and "wrote 5 GMMs" in r.output and "gmms.zarr/1" in r.output, r.output
    r = CliRunner().invoke(main, ["convert", zarr_url, parquet_url])
    assert r.exit_code == 0 and "converted 5 GMMs" in r.output, r.output
    assert "raybary.gmms.parquet/1, diag covariances" in r.output
    same_gmms(open_gmm_store(parquet_url).read_gmms(0, 5),
              generate_gmms(str(tmp_path / "ref.parquet"), 5, covariance_type="diag")
              .read_gmms(0, 5))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "junk.parquet"),
                                  str(tmp_path / "j.zarr")])
    assert r.exit_code != 0 and "not a valid raybary Parquet problem store" in r.output, r.output


def test_pairs_file_rows_and_unknown_ids(tmp_path):
    store = generate_gmms(str(tmp_path / "g.parquet"), 4)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"i": pa.array([0, 1, None, 3, 2], pa.int32()),
                             "j": [1, 7, 2, 3, 8], "note": list("abcde")}), path,
                   row_group_size=2)
    plan = PairsFile(str(path), 3)
    assert plan.n_pairs == 5 and plan.shard_stops() == [3, 5]
    first, second = plan.shard(0, store), plan.shard(1, store)
    assert first.left.tolist() == [0, 1, -1] and first.right.tolist() == [1, -1, 2]
    assert first.errors == [None, "pairs row 1: gmm 7 not in the GMM store",
                            "pairs row 2: i or j is missing (null)"]
    assert second.left_id.tolist() == [3, 2] and second.errors == [
        None, "pairs row 4: gmm 8 not in the GMM store"]
    pq.write_table(pa.table({"i": [0.5], "k": [1]}), tmp_path / "wrong.parquet")
    with pytest.raises(StoreFormatError, match="column 'i' has type double.*'j' is missing"):
        PairsFile(str(tmp_path / "wrong.parquet"), 3)


def test_the_zarr_commands_of_the_distances_docs_run(tmp_path, monkeypatch):
    """docs/distances.md's ``bash gmm-zarr`` block, as written (storage only: no Ray)."""
    monkeypatch.chdir(tmp_path)
    commands = [c for info, code in blocks(ROOT / "docs" / "distances.md")
                if info == "bash gmm-zarr" for c in shell_commands(code)]
    assert [c[:2] for c in commands] == [["raybary", "generate"], ["raybary", "convert"]]
    for command in commands:
        r = CliRunner().invoke(main, command[1:])
        assert r.exit_code == 0, r.output
    zarr_store, copy = open_gmm_store("gmms.zarr"), open_gmm_store("gmms-copy.parquet")
    assert zarr_store.describe()["chunk_problems"] == 50
    same_gmms(copy.read_gmms(0, 200), zarr_store.read_gmms(0, 200))
