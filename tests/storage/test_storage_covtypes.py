"""Diagonal and spherical covariances in problem stores (``cov_diag``, ``cov_spherical``).

A store has exactly one covariance column (Parquet) or array (Zarr) and its
name says the form; readers expand to full covariances, so a diagonal store
and its full conversion read, solve and run the same. Real files in
``tmp_path``; the solves use the tutorial's shape (d=2, bar_size 3).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

import raybary
from raybary.cli import main
from raybary.storage import (
    ProblemColumns,
    StoreDataError,
    StoreFormatError,
    convert,
    open_store,
    read_results,
    write_problems,
    write_store,
)
from raybary.storage.generate import generate, project_covariances, tutorial_columns
from raybary.storage.results.layout import input_changes

N = 6
FORMS = ["diag", "spherical"]


def assert_same(a: ProblemColumns, b: ProblemColumns) -> None:
    for name in ("problem_id", "gmm_offset", "gmm_label", "comp_offset", "mean_offset",
                 "cov_offset", "lambdas", "weight", "mean_values", "cov_values"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def projected(form: str, n: int = N) -> ProblemColumns:
    """Tutorial problems whose covariances are diagonal (``diag``) or ``v * I`` (``spherical``)."""
    return project_covariances(tutorial_columns(n, seed=3), form)


# ------------------------------------------------------------------ raybary run
# first in the module: Ray starts before this process has initialised JAX (else os.fork warns)
@pytest.mark.usefixtures("ray_local")
def test_raybary_run_on_a_diag_store_gives_the_full_store_results(tmp_path):
    cols = projected("diag", 12)
    stores = {"full": write_store(str(tmp_path / "full.parquet"), [cols]),
              "diag": write_store(str(tmp_path / "diag.parquet"), [cols], covariance_type="diag")}
    res = {}
    for name, store in stores.items():
        out = str(tmp_path / f"out-{name}")
        r = CliRunner().invoke(main, ["run", store.url, out, "--bar-size", "3", "--grid", "none",
                                      "--shard-size", "6", "--actors", "1", "-q"])
        assert r.exit_code == 0, r.output
        res[name] = read_results(out)
    a, b = res["full"], res["diag"]
    assert a.complete and b.complete
    assert (b.problems.status == "ok").all() and len(b.problems) == 12
    np.testing.assert_array_equal(a.problems.problem_id, b.problems.problem_id)
    np.testing.assert_allclose(a.problems.objective, b.problems.objective, rtol=1e-6)
    for pid in (0, 11):
        x, y = a.barycenter(pid), b.barycenter(pid)
        np.testing.assert_allclose(x.weights, y.weights, rtol=1e-6)
        np.testing.assert_allclose(x.means, y.means, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x.covs, y.covs, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".parquet", ".zarr"])
@pytest.mark.parametrize("form", FORMS)
def test_round_trip_reads_the_same_as_the_full_store(tmp_path, suffix, form):
    cols = projected(form)
    full = write_store(str(tmp_path / f"full{suffix}"), [cols])
    compact = write_store(str(tmp_path / f"{form}{suffix}"), [cols], covariance_type=form)
    assert (full.covariance_type, compact.covariance_type) == ("full", form)
    assert compact.describe()["covariance_type"] == form
    a, b = full.read_columns(0, N), compact.read_columns(0, N)
    assert_same(a, b)  # full d x d matrices, bit for bit
    assert b.covariance_type == form
    sa, sb = full.read(0, N), compact.read(0, N)
    assert sb.n_invalid == 0
    for p, q in zip(sa.problems, sb.problems):
        for g, h in zip(p.gmms, q.gmms):
            np.testing.assert_array_equal(g.covs, h.covs)
    # what is stored is compact: d values (or one) per component instead of d*d
    if suffix == ".parquet":
        col = pq.read_table(compact.url).column(f"cov_{form}")
        if form == "diag":
            assert set(pc.list_value_length(col).to_pylist()) == {2}
        else:
            assert pa.types.is_floating(col.type)
    else:
        arr = zarr.open_group(compact.url, mode="r")[f"components/cov_{form}"]
        assert arr.shape == ((cols.n_components, 2) if form == "diag" else (cols.n_components,))
    # a run's input fingerprint tells a compact store from its full conversion
    fa, fb = full.fingerprint(), compact.fingerprint()
    assert [f[:2] for f in fa["files"]] != [f[:2] for f in fb["files"]]


def test_diag_and_spherical_stores_solve_to_the_same_barycenters(tmp_path):
    full, compact = [], []
    for form in FORMS:
        cols = projected(form, 2)
        full += write_store(str(tmp_path / f"full-{form}.parquet"), [cols]).read(0, 2).problems
        compact += write_store(str(tmp_path / f"{form}.zarr"), [cols],
                               covariance_type=form).read(0, 2).problems
    # the same problems in the same batch positions (restarts are drawn per position)
    a_res, b_res = raybary.solve(full, bar_size=3), raybary.solve(compact, bar_size=3)
    for a, b in zip(a_res, b_res):
        assert a.converged and b.converged
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-6)
        np.testing.assert_allclose(a.means, b.means, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.covs, b.covs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.objective, b.objective, rtol=1e-6)


def test_mixed_dimensions_in_one_diag_parquet_store(tmp_path):
    cols = project_covariances(
        ProblemColumns.concat([tutorial_columns(2, dim=1), tutorial_columns(2, dim=3, start=2)]),
        "diag")
    store = write_store(str(tmp_path / "mixed.parquet"), [cols], covariance_type="diag")
    assert_same(store.read_columns(0, 4), cols)
    lengths = pc.list_value_length(pq.read_table(store.url).column("cov_diag"))
    assert set(lengths.to_pylist()) == {1, 3}
    assert store.read(0, 4).n_invalid == 0


def test_convert_diag_to_full_and_back(tmp_path):
    cols = projected("diag")
    diag = write_store(str(tmp_path / "d.parquet"), [cols], covariance_type="diag")
    full = convert(diag, str(tmp_path / "f.zarr"), covariance_type="full")
    again = convert(full, str(tmp_path / "d2.parquet"), covariance_type="diag")
    same_form = convert(again, str(tmp_path / "d3.zarr"))  # default: the input's form
    assert [s.covariance_type for s in (diag, full, again, same_form)] == \
        ["diag", "full", "diag", "diag"]
    assert "cov" in zarr.open_group(full.url, mode="r")["components"]
    for s in (full, again, same_form):
        assert_same(s.read_columns(0, N), cols)
    assert pq.read_table(again.url).equals(pq.read_table(diag.url))


def test_cli_convert_generate_and_show(tmp_path):
    runner = CliRunner()
    d = str(tmp_path / "g.parquet")
    r = runner.invoke(main, ["generate", d, "--problems", "5", "--covariance-type", "diag"])
    assert r.exit_code == 0, r.output
    assert "diag covariances" in r.output
    # the same random draws as the full store, without the correlations
    full = generate(str(tmp_path / "full.parquet"), 5)
    assert_same(open_store(d).read_columns(0, 5),
                project_covariances(full.read_columns(0, 5), "diag"))
    r = runner.invoke(main, ["show", d, "--all"])
    assert r.exit_code == 0 and "covariance_type: diag" in r.output
    assert "all 5 problems: 0 invalid" in r.output
    r = runner.invoke(main, ["convert", d, str(tmp_path / "s.zarr"), "--covariance-type", "full"])
    assert r.exit_code == 0 and "diag covariances) to" in r.output
    assert open_store(str(tmp_path / "s.zarr")).covariance_type == "full"
    # full tutorial covariances are rotated: refused as diag, nothing written
    out = tmp_path / "x.zarr"
    r = runner.invoke(main, ["convert", full.url, str(out), "--covariance-type", "diag"])
    assert r.exit_code == 1
    assert "Error: cannot store the covariances as cov_diag (diag): problem 0, gmm 0, " \
           "component 0 has the off-diagonal entry" in r.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["full.parquet", "g.parquet", "s.zarr"]


# ------------------------------------------------------------------ writing refuses loss
@pytest.mark.parametrize("suffix", [".parquet", ".zarr"])
def test_writing_diag_from_correlated_covariances_is_refused(tmp_path, suffix):
    cols = projected("diag")
    k = int(cols.comp_offset[cols.gmm_offset[4] + 1]) + 1  # problem 4, gmm 1, component 1
    cols.cov_values[cols.cov_offset[k] + 2] = 0.25  # row 1, column 0
    url = str(tmp_path / f"d{suffix}")
    with pytest.raises(StoreDataError) as e:
        write_store(url, [cols], covariance_type="diag")
    msg = str(e.value)
    assert "cannot store the covariances as cov_diag (diag): problem 4, gmm 1, component 1 " \
           "has the off-diagonal entry 0.25 at row 1, column 0 (1 of the 60 components" in msg
    assert "covariance_type='full'" in msg
    assert not (tmp_path / f"d{suffix}").exists()
    cols.cov_values[cols.cov_offset[k] + 2] = np.nan  # a NaN is not dropped either
    with pytest.raises(StoreDataError, match="off-diagonal entry nan at row 1, column 0"):
        write_store(url, [cols], covariance_type="diag")


def test_writing_spherical_from_unequal_variances_is_refused(tmp_path):
    cols = projected("diag")
    with pytest.raises(StoreDataError) as e:
        write_store(str(tmp_path / "s.parquet"), [cols], covariance_type="spherical")
    assert "cannot store the covariances as cov_spherical (spherical): problem 0, gmm 0, " \
           "component 0 is not isotropic (variance" in str(e.value)
    assert not (tmp_path / "s.parquet").exists()
    with pytest.raises(ValueError, match="covariance_type must be one of 'full', 'diag', "
                                         "'spherical', got 'tied'"):
        write_store(str(tmp_path / "t.parquet"), [cols], covariance_type="tied")


def test_write_problems_as_diag(tmp_path):
    problems, _ = projected("diag").to_problems()
    store = write_problems(str(tmp_path / "p.zarr"), problems, covariance_type="diag")
    assert store.covariance_type == "diag"
    got = store.read(0, N).problems
    for p, q in zip(problems, got):
        for g, h in zip(p.gmms, q.gmms):
            np.testing.assert_array_equal(g.covs, h.covs)


# ------------------------------------------------------------------ bad values
def rows(form: str, ids=range(10, 14)) -> list[dict]:
    """Problems of two GMMs (2 and 1 components) in d=2, long format, ``form`` covariances."""
    cov = {"full": [1.0, 0.0, 0.0, 2.0], "diag": [1.0, 2.0], "spherical": 1.5}[form]
    name = {"full": "cov", "diag": "cov_diag", "spherical": "cov_spherical"}[form]
    out = []
    for pid in ids:
        for gmm, weights in ((0, [0.5, 0.5]), (1, [1.0])):
            for k, w in enumerate(weights):
                out.append({"problem_id": pid, "gmm": gmm, "lambda": 0.5, "weight": w,
                            "mean": [float(k), float(gmm)], name: cov})
    return out


def read_bad(tmp_path, table: pa.Table) -> dict:
    pq.write_table(table, tmp_path / "bad.parquet")
    store = open_store(str(tmp_path / "bad.parquet"))
    shard = store.read(0, store.n_problems)
    return dict(zip(shard.problem_ids.tolist(), shard.errors))


BAD = [
    ("diag", [1.0, 2.0, 3.0],
     "problem 11, gmm 0, component 1: cov_diag has 3 values, expected 2 (d: one variance per "
     "coordinate, for d=2)"),
    ("diag", [1.0, 0.0, 0.0, 2.0],
     "problem 11, gmm 0, component 1: cov_diag has 4 values, expected 2 (d: one variance per "
     "coordinate, for d=2) (d*d values: a full covariance goes in column 'cov')"),
    ("diag", [1.0, float("nan")], "problem 11, gmm 0, component 1: cov_diag is not finite"),
    ("diag", [float("inf"), 1.0], "problem 11, gmm 0, component 1: cov_diag is not finite"),
    ("diag", [1.0, -2.0],
     "problem 11, gmm 0, component 1: cov_diag has a non-positive variance (-2.0)"),
    ("diag", [0.0, 1.0],
     "problem 11, gmm 0, component 1: cov_diag has a non-positive variance (0.0)"),
    ("diag", [1e-15, 1.0],
     "problem 11, gmm 0, component 1: cov_diag is numerically singular (smallest variance "
     "1e-15, largest 1.0)"),
    ("diag", None,  # like a null cov, it also has no values
     "problem 11, gmm 0, component 1: cov_diag is missing (null); problem 11, gmm 0, "
     "component 1: cov_diag has 0 values, expected 2 (d: one variance per coordinate, for d=2)"),
    ("diag", [1.0, None], "problem 11, gmm 0, component 1: cov_diag contains a missing (null) value"),
    ("spherical", float("nan"), "problem 11, gmm 0, component 1: cov_spherical is not finite (nan)"),
    ("spherical", -1.0, "problem 11, gmm 0, component 1: cov_spherical is not positive (-1.0)"),
    ("spherical", None, "problem 11, gmm 0, component 1: cov_spherical is missing (null)"),
]


@pytest.mark.parametrize("form, value, message", BAD)
def test_bad_values_name_the_field_and_the_rest_is_valid(tmp_path, form, value, message):
    data = rows(form)
    data[4]["cov_diag" if form == "diag" else "cov_spherical"] = value  # problem 11, gmm 0, comp 1
    errors = read_bad(tmp_path, pa.Table.from_pylist(data))
    assert errors[11] == message
    assert [errors[i] for i in (10, 12, 13)] == [None, None, None]


def test_float32_hint_and_other_faults_of_the_same_problem(tmp_path):
    data = rows("diag")
    data[4]["cov_diag"] = [1e-7, 1.0]
    data[5]["weight"] = -1.0
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "bad.parquet")
    shard = open_store(str(tmp_path / "bad.parquet")).read(0, 4, dtype="float32")
    assert shard.errors[1] == (
        "problem 11, gmm 0, component 1: cov_diag is numerically singular (smallest variance "
        "1e-07, largest 1.0); float32 needs a ratio above 1.19209e-06: solve in float64 "
        "(dtype='float64', raybary run --dtype float64); problem 11, gmm 1, component 0: "
        "weight is negative (-1.0)")
    assert shard.n_invalid == 1


def test_integer_spherical_column_is_accepted(tmp_path):
    data = rows("spherical")
    for r in data:
        r["cov_spherical"] = 2
    errors = read_bad(tmp_path, pa.Table.from_pylist(data))
    assert set(errors.values()) == {None}
    store = open_store(str(tmp_path / "bad.parquet"))
    np.testing.assert_array_equal(store.read(0, 1).problems[0].gmms[0].covs[0], 2 * np.eye(2))


def test_bad_variance_in_a_zarr_store(tmp_path):
    cols = projected("diag")
    cols.cov_values[cols.cov_offset[7] + 3] = -0.5  # problem 0, gmm 2, component 2
    store = write_store(str(tmp_path / "d.zarr"), [cols], covariance_type="diag")
    shard = store.read(0, N)
    assert shard.errors[0] == "problem 0, gmm 2, component 2: cov_diag has a non-positive " \
                              "variance (-0.5)"
    assert shard.n_invalid == 1


# ------------------------------------------------------------------ schema
def test_two_covariance_columns_are_refused(tmp_path):
    t = pa.Table.from_pylist(rows("full"))
    t = t.append_column("cov_diag", pa.array([[1.0, 2.0]] * t.num_rows))
    pq.write_table(t, tmp_path / "two.parquet")
    with pytest.raises(StoreFormatError) as e:
        open_store(str(tmp_path / "two.parquet"))
    assert "columns 'cov' and 'cov_diag' are both present: a store has exactly one covariance " \
           "column, whose name says the form" in str(e.value)
    assert "unknown column" not in str(e.value)


def test_no_covariance_column_is_refused(tmp_path):
    t = pa.Table.from_pylist(rows("diag")).drop_columns(["cov_diag"])
    pq.write_table(t, tmp_path / "none.parquet")
    with pytest.raises(StoreFormatError) as e:
        open_store(str(tmp_path / "none.parquet"))
    assert "column 'cov' is missing (a store has exactly one covariance column, whose name " \
           "says the form: 'cov' for full covariances, 'cov_diag' for diagonal ones, " \
           "'cov_spherical' for spherical ones)" in str(e.value)
    assert "cov_diag list<float64> (d variances) or cov_spherical float64" in str(e.value)


def test_mistyped_spherical_column_is_refused(tmp_path):
    t = pa.Table.from_pylist(rows("diag")).rename_columns(
        ["problem_id", "gmm", "lambda", "weight", "mean", "cov_spherical"])
    pq.write_table(t, tmp_path / "list.parquet")
    with pytest.raises(StoreFormatError, match="column 'cov_spherical' has type list<.*>, "
                                               "expected float64"):
        open_store(str(tmp_path / "list.parquet"))


def test_dataset_mixing_covariance_forms_is_refused(tmp_path):
    ds = tmp_path / "ds.parquet"
    ds.mkdir()
    pq.write_table(pa.Table.from_pylist(rows("full", ids=[0, 1])), ds / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows("diag", ids=[2, 3])), ds / "b.parquet")
    with pytest.raises(StoreFormatError) as e:
        open_store(str(ds))
    assert "the files have different covariance columns ('cov' in" in str(e.value)
    assert "a.parquet; 'cov_diag' in" in str(e.value) and "b.parquet)" in str(e.value)


def test_zarr_with_two_or_no_covariance_arrays_is_refused(tmp_path):
    url = write_store(str(tmp_path / "d.zarr"), [projected("diag")], covariance_type="diag").url
    g = zarr.open_group(url, mode="r+")
    g["components"].create_array("cov", shape=(60, 2, 2), dtype="float64")
    with pytest.raises(StoreFormatError) as e:
        open_store(url)
    assert "arrays components/cov and components/cov_diag are both present" in str(e.value)
    del g["components/cov"]
    del g["components/cov_diag"]
    with pytest.raises(StoreFormatError) as e:
        open_store(url)
    assert "array components/cov is missing (a store has exactly one covariance array" \
           in str(e.value)
    g["components"].create_array("cov_diag", shape=(60, 3), dtype="float64")
    with pytest.raises(StoreFormatError, match=r"array components/cov_diag has shape \(60, 3\), "
                                               r"expected \(60, 2\)"):
        open_store(url)


# ------------------------------------------------------------------ fingerprint
def test_fingerprint_changes_when_a_full_store_is_replaced_by_its_diag_form(tmp_path):
    cols = projected("diag")
    for suffix in (".parquet", ".zarr"):
        url = str(tmp_path / f"s{suffix}")
        before = write_store(url, [cols]).fingerprint()
        after = write_store(url, [cols], covariance_type="diag", overwrite=True).fingerprint()
        changes = input_changes(before, after)
        assert changes, suffix
        if suffix == ".zarr":
            assert any("components/cov_diag" in c and "added" in c for c in changes)
        else:
            assert changes[0].startswith("file s.parquet: size ")
