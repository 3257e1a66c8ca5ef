"""Stores with a wrong schema are refused before any work starts, and nothing is written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from raybary.cli import main
from raybary.storage import (
    StoreDataError,
    StoreFormatError,
    convert,
    open_store,
    write_store,
)
from raybary.storage.generate import tutorial_columns
from raybary.storage.parquet_store import columns_to_table


def good_table() -> pa.Table:
    return columns_to_table(tutorial_columns(3))


def test_parquet_missing_and_mistyped_columns(tmp_path):
    t = good_table().drop_columns(["cov"])
    t = t.set_column(t.schema.get_field_index("weight"), "weight",
                     pa.array([str(x) for x in t.column("weight").to_pylist()]))
    pq.write_table(t, tmp_path / "bad.parquet")
    with pytest.raises(StoreFormatError) as e:
        open_store(str(tmp_path / "bad.parquet"))
    msg = str(e.value)
    assert "is not a valid raybary Parquet problem store (raybary.problems.parquet/1)" in msg
    assert "column 'cov' is missing" in msg
    assert "column 'weight' has type string, expected float64" in msg
    assert "expected columns: problem_id int64, gmm int32, lambda float64" in msg


def test_parquet_list_of_strings_and_duplicate_column(tmp_path):
    t = good_table()
    t = t.set_column(t.schema.get_field_index("mean"), "mean",
                     pa.array([["a", "b"]] * t.num_rows))
    t = t.append_column("gmm", pa.array([0] * t.num_rows))
    pq.write_table(t, tmp_path / "bad.parquet")
    with pytest.raises(StoreFormatError) as e:
        open_store(str(tmp_path / "bad.parquet"))
    assert "column 'mean' has type list<element: string>" in str(e.value) or \
        "column 'mean' has type list<item: string>" in str(e.value)
    assert "column 'gmm' appears 2 times" in str(e.value)


def test_parquet_unknown_columns_are_refused(tmp_path):
    t = good_table().append_column("weights", pa.array([1.0] * 30))
    t = t.append_column("note", pa.array(["x"] * 30))
    pq.write_table(t, tmp_path / "extra.parquet")
    with pytest.raises(StoreFormatError) as e:
        open_store(str(tmp_path / "extra.parquet"))
    msg = str(e.value)
    assert "unknown columns 'weights', 'note' (only the six columns below are allowed" in msg
    assert "'__index_level_0__' is ignored" in msg
    assert "expected columns: problem_id int64, gmm int32" in msg


def test_parquet_wrong_format_metadata(tmp_path):
    t = good_table().replace_schema_metadata(
        {b"raybary.format": b"raybary.problems.parquet", b"raybary.format_version": b"2"})
    pq.write_table(t, tmp_path / "v2.parquet")
    with pytest.raises(StoreFormatError, match="metadata says format 'raybary.problems.parquet' "
                                               "version 2, expected 'raybary.problems.parquet' version 1"):
        open_store(str(tmp_path / "v2.parquet"))


def test_dataset_names_the_bad_file(tmp_path):
    d = tmp_path / "ds.parquet"
    d.mkdir()
    pq.write_table(good_table(), d / "a.parquet")
    pq.write_table(good_table().drop_columns(["lambda"]), d / "b.parquet")
    with pytest.raises(StoreFormatError, match=r"b\.parquet: column 'lambda' is missing"):
        open_store(str(d))


def test_empty_dataset_and_null_ids(tmp_path):
    (tmp_path / "empty.parquet").mkdir()
    with pytest.raises(StoreFormatError, match="no Parquet files"):
        open_store(str(tmp_path / "empty.parquet"))
    t = good_table()
    ids = t.column("problem_id").to_pylist()
    ids[2] = None
    pq.write_table(t.set_column(0, "problem_id", pa.array(ids, pa.int64())), tmp_path / "n.parquet")
    with pytest.raises(StoreDataError, match="'problem_id' has 1 null values"):
        open_store(str(tmp_path / "n.parquet"))


def _zarr_store(path) -> str:
    write_store(str(path), [tutorial_columns(5)])
    return str(path)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"format": "raybary.problems.parquet"},
         "attributes say format 'raybary.problems.parquet' version 1, expected 'raybary.problems.zarr' version 1"),
        ({"format_version": 2}, "attributes say format 'raybary.problems.zarr' version 2"),
        ({"dim": "two"}, "attribute dim is 'two', expected a positive integer"),
    ],
)
def test_zarr_wrong_attributes(tmp_path, attrs, message):
    url = _zarr_store(tmp_path / "s.zarr")
    zarr.open_group(url, mode="r+").attrs.update(attrs)
    with pytest.raises(StoreFormatError) as e:
        open_store(url)
    assert message in str(e.value)
    assert "expected a Zarr v3 group with attributes format='raybary.problems.zarr'" in str(e.value)


def test_zarr_missing_and_mistyped_arrays(tmp_path):
    url = _zarr_store(tmp_path / "s.zarr")
    g = zarr.open_group(url, mode="r+")
    del g["components/cov"]
    g["gmms"].create_array("lambda", shape=(15,), dtype="bool", overwrite=True)
    with pytest.raises(StoreFormatError) as e:
        open_store(url)
    assert "array components/cov is missing" in str(e.value)
    assert "array gmms/lambda has dtype bool, expected a floating dtype" in str(e.value)


def test_zarr_wrong_shape_and_offsets(tmp_path):
    url = _zarr_store(tmp_path / "s.zarr")
    g = zarr.open_group(url, mode="r+")
    g["components"].create_array("mean", shape=(50, 3), dtype="float64", overwrite=True)
    with pytest.raises(StoreFormatError, match=r"array components/mean has shape \(50, 3\), expected \(50, 2\)"):
        open_store(url)
    url = _zarr_store(tmp_path / "t.zarr")
    g = zarr.open_group(url, mode="r+")
    g["gmms/offset"][15] = 49
    with pytest.raises(StoreFormatError, match="array gmms/offset runs from 0 to 49, expected 0 to 50"):
        open_store(url)


def test_zarr_v2_group_is_refused(tmp_path):
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    g.attrs.update({"format": "raybary.problems.zarr", "format_version": 1, "dim": 2})
    with pytest.raises(StoreFormatError, match="the group is Zarr v2, expected Zarr v3"):
        open_store(str(tmp_path / "old.zarr"))


def test_unknown_suffix_and_missing_store(tmp_path):
    (tmp_path / "what.csv").write_text("a,b\n")
    with pytest.raises(StoreFormatError, match="cannot tell the format"):
        open_store(str(tmp_path / "what.csv"))
    with pytest.raises(FileNotFoundError, match="no problem store at"):
        open_store(str(tmp_path / "nothing.zarr"))


def test_refused_before_any_output_is_written(tmp_path):
    t = good_table().drop_columns(["weight"])
    pq.write_table(t, tmp_path / "bad.parquet")
    out = tmp_path / "out.zarr"
    with pytest.raises(StoreFormatError):
        convert(str(tmp_path / "bad.parquet"), str(out))
    assert not out.exists()
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "bad.parquet"), str(out)])
    assert result.exit_code == 1
    assert "column 'weight' is missing" in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]


def test_convert_refuses_what_zarr_cannot_hold(tmp_path):
    cols = tutorial_columns(4)
    mixed = columns_to_table(cols)
    means = mixed.column("mean").to_pylist()
    covs = mixed.column("cov").to_pylist()
    means[-1], covs[-1] = [0.0, 0.0, 0.0], np.eye(3).reshape(-1).tolist()
    t = mixed.set_column(4, "mean", pa.array(means)).set_column(5, "cov", pa.array(covs))
    pq.write_table(t, tmp_path / "shape.parquet")
    with pytest.raises(StoreDataError, match="problem 3, gmm 2, component 4: mean has 3 values"):
        convert(str(tmp_path / "shape.parquet"), str(tmp_path / "o.zarr"))
    assert not (tmp_path / "o.zarr").exists()
    # a problem of another dimension is fine in Parquet, but not in one Zarr store
    other = columns_to_table(tutorial_columns(1, dim=3, start=4))
    pq.write_table(pa.concat_tables([columns_to_table(cols), other]), tmp_path / "mixed.parquet")
    with pytest.raises(StoreDataError, match=r"holds one dimension d .* mean lengths \[2, 3\]"):
        convert(str(tmp_path / "mixed.parquet"), str(tmp_path / "o.zarr"))
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("suffix", [".zarr", ".parquet"])
def test_failed_write_leaves_nothing_not_even_a_temporary(tmp_path, suffix):
    def batches():
        yield tutorial_columns(3)
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError, match="crash in the middle"):
        write_store(str(tmp_path / f"o{suffix}"), batches())
    assert list(tmp_path.iterdir()) == []


def test_unreadable_parquet_file_is_named(tmp_path):
    d = tmp_path / "ds.parquet"
    d.mkdir()
    pq.write_table(good_table(), d / "a.parquet")
    (d / "b.parquet").write_text("not parquet")
    with pytest.raises(StoreFormatError, match=r"b\.parquet: not a readable Parquet file"):
        open_store(str(d))
