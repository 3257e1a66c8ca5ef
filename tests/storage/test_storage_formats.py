"""Problem stores: round trips of both formats, range reads, conversion, fsspec paths."""

from __future__ import annotations

import pickle
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raybary.storage import ProblemColumns, convert, open_store, write_problems, write_store
from raybary.storage.generate import tutorial_columns
from raybary.storage.parquet_store import ParquetProblemWriter, table_to_columns
from raybary.storage.results import ShardGrids
from raybary.storage.zarr_store import ZarrProblemWriter
from raybary.types import GMM, BatchOutcome, Problem

VALUES = st.floats(width=64, allow_nan=True, allow_infinity=True)


@st.composite
def batches(draw, mixed_dims: bool = False) -> ProblemColumns:
    """Ragged batches: 1-7 problems, 1-4 GMMs, 1-4 components, any float values."""
    n = draw(st.integers(1, 7))
    ids = sorted(draw(st.sets(st.integers(-(2**62), 2**62), min_size=n, max_size=n)))
    d_store = draw(st.integers(1, 3))
    problems = []
    for _ in range(n):
        d = draw(st.integers(1, 3)) if mixed_dims else d_store
        n_gmms = draw(st.integers(1, 4))
        gmms = []
        for _ in range(n_gmms):
            k = draw(st.integers(1, 4))
            gmms.append(GMM(draw(arrays(np.float64, k, elements=VALUES)),
                            draw(arrays(np.float64, (k, d), elements=VALUES)),
                            draw(arrays(np.float64, (k, d, d), elements=VALUES))))
        problems.append(Problem(tuple(gmms), draw(arrays(np.float64, n_gmms, elements=VALUES))))
    return ProblemColumns.from_problems(problems, ids)


def assert_same(a: ProblemColumns, b: ProblemColumns) -> None:
    for name in ("problem_id", "gmm_offset", "gmm_label", "comp_offset", "mean_offset",
                 "cov_offset", "lambdas", "weight", "mean_values", "cov_values"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def mem(suffix: str) -> str:
    return f"memory://roundtrip-{uuid.uuid4().hex}{suffix}"


def write_parquet(url: str, cols: ProblemColumns, row_group_rows: int, pieces: int = 2) -> None:
    with ParquetProblemWriter(url, row_group_rows=row_group_rows) as w:
        cut = cols.n_problems // pieces
        w.write(cols.slice(0, cut))
        w.write(cols.slice(cut, cols.n_problems))


FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(cols=batches(mixed_dims=True), rg=st.integers(1, 9), data=st.data())
def test_parquet_round_trip_any_range(cols, rg, data):
    url = mem(".parquet")
    write_parquet(url, cols, rg)
    store = open_store(url)
    assert store.n_problems == cols.n_problems
    assert_same(store.read_columns(0, cols.n_problems), cols)
    a = data.draw(st.integers(0, cols.n_problems))
    b = data.draw(st.integers(a, cols.n_problems))
    assert_same(store.read_columns(a, b), cols.slice(a, b))
    np.testing.assert_array_equal(store.problem_ids(a, b), cols.problem_id[a:b])


@FAST
@given(cols=batches(), chunk=st.integers(1, 5), data=st.data())
def test_zarr_round_trip_any_range(cols, chunk, data):
    url = mem(".zarr")
    with ZarrProblemWriter(url, chunk_problems=chunk) as w:
        w.write(cols.slice(0, 2))
        w.write(cols.slice(2, cols.n_problems))
    store = open_store(url)
    assert (store.n_problems, store.dim) == (cols.n_problems, cols.uniform_dim())
    a = data.draw(st.integers(0, cols.n_problems))
    b = data.draw(st.integers(a, cols.n_problems))
    assert_same(store.read_columns(a, b), cols.slice(a, b))


@FAST
@given(cols=batches())
def test_convert_both_ways_is_lossless(cols):
    src = mem(".parquet")
    write_parquet(src, cols, 3)
    z = convert(src, mem(".zarr"))
    back = convert(z.url, mem(".parquet"))
    assert z.format == "raybary.problems.zarr/1"
    assert back.format == "raybary.problems.parquet/1"
    assert_same(z.read_columns(0, z.n_problems), cols)
    assert_same(back.read_columns(0, back.n_problems), cols)


def test_read_validates_and_returns_problems(tmp_path):
    cols = tutorial_columns(50, seed=3)
    problems, _ = cols.to_problems()
    for suffix in (".parquet", ".zarr"):
        store = write_problems(str(tmp_path / f"t{suffix}"), problems, cols.problem_id)
        shard = store.read(10, 20)
        assert shard.problem_ids.tolist() == list(range(10, 20))
        assert shard.errors == [None] * 10 and shard.n_invalid == 0
        for got, want in zip(shard.problems, problems[10:20]):
            for g, h in zip(got.gmms, want.gmms):
                np.testing.assert_allclose(g.covs, h.covs)
                np.testing.assert_allclose(g.weights, h.weights)
            np.testing.assert_allclose(got.lambdas, want.lambdas)


def _rows(problem_id, gmm, lam, weight, mean, cov):
    return {"problem_id": problem_id, "gmm": gmm, "lambda": lam, "weight": weight,
            "mean": mean, "cov": cov}


def _pandas_rows(n_problems: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(n_problems):
        for g in (1, 2):  # 1-based GMM numbers, as users write them
            k = int(rng.integers(1, 4))
            w = rng.dirichlet(np.ones(k))
            for c in range(k):
                rows.append(_rows(pid * 10, g, 0.5, w[c], rng.normal(size=2).tolist(),
                                  (np.eye(2) * (c + 1)).reshape(-1).tolist()))
    return pd.DataFrame(rows)


def test_pandas_written_dataset_unsorted_across_files(tmp_path):
    df = _pandas_rows(40)
    shuffled = df.sample(frac=1.0, random_state=1)
    out = tmp_path / "batch.parquet"
    out.mkdir()
    parts = [shuffled.iloc[k::3] for k in range(3)]
    for i, part in enumerate(parts):
        part.to_parquet(out / f"part-{i}.parquet", index=False)  # gmm is int64 here
    (out / "_SUCCESS").write_text("")
    store = open_store(str(out))
    assert store.describe()["sorted_by_problem_id"] is False
    assert store.n_problems == 40
    # a GMM's components are its rows in file order, then row order
    expected = table_to_columns(pa.Table.from_pandas(pd.concat(parts), preserve_index=False))
    assert_same(store.read_columns(0, 40), expected)
    assert_same(store.read_columns(7, 23), expected.slice(7, 23))
    assert store.read(7, 23).n_invalid == 0
    clone = pickle.loads(pickle.dumps(store))
    assert clone._unique is None  # the O(P) id list is not pickled
    assert_same(clone.read_columns(30, 40), expected.slice(30, 40))


def test_component_order_is_row_order_within_a_gmm(tmp_path):
    rows = [
        _rows(5, 1, 0.5, 0.25, [1.0], [1.0]),
        _rows(5, 0, 0.5, 1.0, [9.0], [9.0]),
        _rows(5, 1, 0.5, 0.75, [2.0], [2.0]),
    ]
    path = tmp_path / "x.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    cols = open_store(str(path)).read_columns(0, 1)
    assert cols.gmm_label.tolist() == [0, 1]
    np.testing.assert_array_equal(cols.mean_values, [9.0, 1.0, 2.0])
    np.testing.assert_array_equal(cols.weight, [1.0, 0.25, 0.75])


def test_accepted_column_types(tmp_path):
    table = pa.table({
        "problem_id": pa.array([3, 3], pa.int32()),
        "gmm": pa.array([0, 0], pa.uint8()),
        "lambda": pa.array([1, 1], pa.int64()),
        "weight": pa.array([0.5, 0.5], pa.float32()),
        "mean": pa.array([[0.0, 1.0], [1.0, 0.0]], pa.list_(pa.float32(), 2)),
        "cov": pa.array([[1.0, 0.0, 0.0, 1.0]] * 2, pa.large_list(pa.float64())),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    shard = open_store(str(tmp_path / "t.parquet")).read(0, 1)
    assert shard.errors == [None]
    assert shard.problems[0].dim == 2


def test_pandas_index_is_ignored(tmp_path):
    df = _pandas_rows(6).set_index("problem_id", drop=False)
    df.index.name = None
    df.to_parquet(tmp_path / "indexed.parquet")  # writes __index_level_0__
    assert "__index_level_0__" in pq.read_schema(tmp_path / "indexed.parquet").names
    df.set_index(pd.Index(np.arange(len(df)), name="row")).to_parquet(tmp_path / "named.parquet")
    for name in ("indexed.parquet", "named.parquet"):
        shard = open_store(str(tmp_path / name)).read(0, 6)
        assert shard.n_invalid == 0 and shard.problem_ids.tolist() == [0, 10, 20, 30, 40, 50]


def test_rows_of_a_problem_straddle_row_groups_and_files(tmp_path):
    cols = tutorial_columns(30, seed=1)
    out = tmp_path / "ds.parquet"
    out.mkdir()
    write_parquet(str(out / "a.parquet"), cols.slice(0, 13), row_group_rows=7, pieces=1)
    write_parquet(str(out / "b.parquet"), cols.slice(13, 30), row_group_rows=4, pieces=1)
    store = open_store(str(out))
    assert store.describe()["sorted_by_problem_id"] is True
    for a, b in [(0, 30), (12, 14), (13, 13), (5, 6), (29, 30)]:
        assert_same(store.read_columns(a, b), cols.slice(a, b))


def test_gmm_labels_survive_zarr(tmp_path):
    df = _pandas_rows(5)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "in.parquet")
    z = convert(str(tmp_path / "in.parquet"), str(tmp_path / "z.zarr"))
    back = convert(z, str(tmp_path / "back.parquet"))
    assert back.read_columns(0, 5).gmm_label.tolist() == [1, 2] * 5


def test_memory_urls_and_pickling(mem_url):
    cols = tutorial_columns(100, seed=2)
    problems, _ = cols.to_problems()
    for suffix in (".parquet", ".zarr"):
        store = write_problems(f"{mem_url}/p{suffix}", problems)
        again = open_store(f"{mem_url}/p{suffix}/")  # a trailing slash is fine
        blob = pickle.dumps(again)
        assert len(blob) < 5000
        clone = pickle.loads(blob)
        assert clone.read(40, 60).problem_ids.tolist() == list(range(40, 60))
        assert store.max_gmms() == 3


def test_iter_and_shards():
    url = mem(".zarr")
    cols = tutorial_columns(25)
    with ZarrProblemWriter(url, chunk_problems=4) as w:
        w.write(cols)
    store = open_store(url)
    assert store.shards(10) == [(0, 10), (10, 20), (20, 25)]
    got = ProblemColumns.concat([c for _, _, c in store.iter_columns(7)])
    assert_same(got, cols)
    with pytest.raises(IndexError, match="outside the store's positions 0:25"):
        store.read(20, 26)


def test_memory_urls_never_touch_the_local_disk(tmp_path, monkeypatch, mem_url):
    """memory:// stores (top level and nested, via temporary siblings) stay in memory."""
    import posixpath

    from raybary.storage import ResultWriter, _fs, read_results
    from raybary.types import Result

    monkeypatch.chdir(tmp_path)
    # the original bug: path arithmetic on the URL string (posixpath.dirname("memory://x.zarr")
    # is "memory:"), giving memory:/.x.zarr.tmp-..., which fsspec and zarr take for a local path
    assert _fs._sibling_tmp("memory://x.zarr").startswith("memory:///.x.zarr.tmp-")
    with pytest.raises(ValueError, match="lost a slash"):
        _fs.url_to_fs(posixpath.join(posixpath.dirname("memory://x.zarr"), ".x.zarr.tmp"))
    cols = tutorial_columns(30, seed=4)
    top = mem(".zarr")  # memory://roundtrip-<hex>.zarr: its temporary is memory:///.roundtrip-...
    for url in (top, f"{mem_url}/a.zarr", f"{mem_url}/a.parquet"):
        store = write_store(url, [cols])
        assert_same(store.read_columns(0, 30), cols)
    z = convert(f"{mem_url}/a.parquet", mem(".zarr"))
    back = convert(z, mem(".parquet"))
    assert_same(back.read_columns(5, 25), cols.slice(5, 25))
    writer = ResultWriter(f"{mem_url}/out", n_problems=30, shard_size=10, grid_shape=(4, 3))
    writer.prepare()
    res = Result(np.ones(1), np.zeros((1, 2)), np.eye(2)[None], 1.0, True, 3, 0.0)
    for shard in range(3):
        start, stop = writer.shard_range(shard)
        writer.committer.commit_shard(
            shard, BatchOutcome(np.arange(start, stop), ["ok"] * 10, [None] * 10, [res] * 10, 0.0),
            ShardGrids(barycenter=np.zeros((10, 4, 3))))
    writer.finalize()
    assert read_results(f"{mem_url}/out").grids(0, 30).barycenter.shape == (30, 4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not (tmp_path / "memory:").exists()


@pytest.mark.parametrize("url", ["memory:/lost.zarr", "memory:/lost.parquet", "s3:/bucket/x.zarr"])
def test_url_that_lost_a_slash_is_refused(tmp_path, monkeypatch, url):
    """``pathlib.Path('memory://x')`` gives ``memory:/x``: refused, not written locally."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="looks like a URL that lost a slash"):
        write_store(url, [tutorial_columns(3)])
    with pytest.raises(ValueError, match="lost a slash"):
        open_store(url)
    assert list(tmp_path.iterdir()) == []


def test_directory_without_suffix_as_written_by_spark(tmp_path):
    from click.testing import CliRunner

    from raybary.cli import main

    out = tmp_path / "spark_out"
    (out / "_temporary").mkdir(parents=True)
    cols = tutorial_columns(20, seed=5)
    write_parquet(str(out / "part-00000-abc.snappy.parquet"), cols.slice(0, 9), 50, pieces=1)
    write_parquet(str(out / "part-00001-abc.snappy.parquet"), cols.slice(9, 20), 50, pieces=1)
    (out / "_SUCCESS").write_text("")
    (out / ".part-00000-abc.snappy.parquet.crc").write_text("crc")
    assert_same(open_store(str(out)).read_columns(0, 20), cols)
    r = CliRunner().invoke(main, ["convert", str(out), str(tmp_path / "z.zarr")])
    assert r.exit_code == 0, r.output
    assert_same(open_store(str(tmp_path / "z.zarr")).read_columns(0, 20), cols)


def test_format_table_covers_both_formats_and_both_entry_points_use_it(tmp_path, monkeypatch):
    """One table (raybary.storage.formats) says which class opens and which
    writer writes a format: open_store and write_store / convert both use it,
    and an unknown format gets the same message from both."""
    import dataclasses

    from raybary.storage import StoreFormatError, detect_format, formats
    from raybary.storage.conversion import output_format
    from raybary.storage.parquet_store import ParquetProblemStore

    assert sorted(formats.FORMATS) == ["parquet", "zarr"]
    cols = tutorial_columns(3, seed=1)
    for name, fmt in formats.FORMATS.items():
        url = str(tmp_path / f"t{fmt.suffixes[0]}")
        written = write_store(url, [cols])
        assert type(written) is fmt.store and type(open_store(url)) is fmt.store
        assert written.format == fmt.format_id
        assert detect_format(url) == output_format(url) == name

    hint = formats.naming_hint()
    assert "name it *.parquet or *.zarr" in hint
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StoreFormatError) as opened:
        open_store(str(tmp_path / "x.csv"))
    with pytest.raises(StoreFormatError) as written:
        write_store(str(tmp_path / "y.csv"), [cols])
    with pytest.raises(StoreFormatError) as converted:
        convert(str(tmp_path / "t.zarr"), str(tmp_path / "z.csv"))
    for e in (opened, written, converted):
        assert str(e.value).endswith(hint), str(e.value)
    assert not (tmp_path / "y.csv").exists() and not (tmp_path / "z.csv").exists()
    with pytest.raises(StoreFormatError, match="unknown problem-store format 'csv'.*parquet, zarr"):
        formats.store_format("csv")

    # a format added to the table is written, recognised and opened by both
    extra = dataclasses.replace(formats.FORMATS["parquet"], name="pqt", suffixes=(".pqt",))
    monkeypatch.setitem(formats.FORMATS, "pqt", extra)
    url = str(tmp_path / "more.pqt")
    assert isinstance(convert(str(tmp_path / "t.zarr"), url), ParquetProblemStore)
    assert detect_format(url) == "pqt"
    assert_same(open_store(url).read_columns(0, 3), cols)


def test_store_modules_never_import_the_code_that_opens_them():
    """Imports run one way: base <- parquet_store, zarr_store <- formats <- store, conversion."""
    import ast
    from pathlib import Path

    import raybary.storage

    here = Path(raybary.storage.__file__).parent

    def imports(module: str) -> set[str]:
        tree = ast.parse((here / f"{module}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    opening = {"raybary.storage.store", "raybary.storage.formats", "raybary.storage.conversion"}
    for module in ("base", "parquet_store", "zarr_store"):
        assert not imports(module) & opening, module
    assert not imports("store") & {"raybary.storage.parquet_store", "raybary.storage.zarr_store"}
    assert "raybary.storage.formats" in imports("store") & imports("conversion")
