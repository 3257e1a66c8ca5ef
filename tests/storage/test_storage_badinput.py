"""Every bad-input class read from a store: the message, and the rest of the shard survives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybary.storage import ProblemColumns, open_store, write_store
from raybary.storage.generate import tutorial_columns

EYE = [1.0, 0.0, 0.0, 1.0]


def good_rows(ids=range(15, 20)) -> pd.DataFrame:
    """Problems with 3 GMMs (2, 1 and 2 components) in d=2, long format."""
    rows = []
    for pid in ids:
        for gmm, weights in ((0, [0.5, 0.5]), (1, [1.0]), (2, [0.25, 0.75])):
            for k, w in enumerate(weights):
                rows.append({"problem_id": pid, "gmm": gmm, "lambda": 1 / 3, "weight": w,
                             "mean": [float(k), float(gmm)], "cov": EYE})
    return pd.DataFrame(rows)


def row(df: pd.DataFrame, pid: int, gmm: int, k: int) -> int:
    """Index of the row of component ``k`` of ``gmm`` in problem ``pid``."""
    hits = df.index[(df.problem_id == pid) & (df.gmm == gmm)]
    return hits[k]


def read_shard(df: pd.DataFrame, tmp_path, **kw):
    path = tmp_path / "bad.parquet"
    # from_pylist keeps NaN as NaN (pandas' to_parquet would turn it into null)
    pq.write_table(pa.Table.from_pylist(df.to_dict("records")), path)
    store = open_store(str(path))
    shard = store.read(0, store.n_problems, **kw)
    errors = dict(zip(shard.problem_ids.tolist(), shard.errors))
    problems = dict(zip(shard.problem_ids.tolist(), shard.problems))
    return errors, problems


def set_cell(df, pid, gmm, k, column, value):
    df.at[row(df, pid, gmm, k), column] = value


CASES = [
    ("cov", (2, 0), [1.0, 3.0, 3.0, 1.0],
     "problem 17, gmm 2, component 0: covariance is not positive definite (smallest eigenvalue -2.0)"),
    ("cov", (0, 1), [1.0, 0.5, 0.0, 1.0], "problem 17, gmm 0, component 1: covariance is not symmetric"),
    ("cov", (1, 0), [1.0, np.inf, np.inf, 1.0], "problem 17, gmm 1, component 0: covariance is not finite"),
    ("mean", (2, 1), [np.nan, 0.0], "problem 17, gmm 2, component 1: mean is not finite"),
    ("weight", (0, 0), np.nan, "problem 17, gmm 0, component 0: weight is not finite (nan)"),
    ("weight", (2, 1), -0.75, "problem 17, gmm 2, component 1: weight is negative (-0.75)"),
    ("weight", (2, 1), 0.5, "problem 17, gmm 2: weights sum to 0.75, expected 1 within 1e-06"),
    ("mean", (1, 0), [0.0, 1.0, 2.0],
     "problem 17, gmm 1, component 0: mean has 3 values, expected 2 (the length of the problem's first mean)"),
    ("cov", (2, 1), [1.0, 0.0, 1.0],
     "problem 17, gmm 2, component 1: cov has 3 values, expected 4 (d*d, row-major, for d=2)"),
    ("mean", (0, 1), [], "problem 17, gmm 0, component 1: mean is empty"),
    ("weight", (0, 0), None, "problem 17, gmm 0, component 0: weight is missing (null)"),
    ("mean", (2, 0), None, "problem 17, gmm 2, component 0: mean is missing (null)"),
    ("cov", (2, 0), [1.0, None, 0.0, 1.0], "problem 17, gmm 2, component 0: cov contains a missing (null) value"),
    ("lambda", (1, 0), None, "problem 17, gmm 1, component 0: lambda is missing (null)"),
]


@pytest.mark.parametrize("column, at, value, message", CASES)
def test_bad_cell(tmp_path, column, at, value, message):
    df = good_rows()
    df[column] = df[column].astype(object)
    set_cell(df, 17, *at, column, value)
    errors, problems = read_shard(df, tmp_path)
    assert errors[17].startswith(message), errors[17]
    assert problems[17] is None
    assert all(errors[p] is None and problems[p] is not None for p in (15, 16, 18, 19))


def test_renormalize_flag_rescales_weights(tmp_path):
    df = good_rows()
    set_cell(df, 17, 2, 1, "weight", 0.5)
    errors, problems = read_shard(df, tmp_path, renormalize=True)
    assert errors[17] is None
    np.testing.assert_allclose(problems[17].gmms[2].weights, [1 / 3, 2 / 3])


@pytest.mark.parametrize(
    "gmm, value, message",
    [
        (1, -0.5, "problem 17, gmm 1: lambda is negative (-0.5)"),
        (2, np.inf, "problem 17, gmm 2: lambda is not finite (inf)"),
    ],
)
def test_bad_lambda(tmp_path, gmm, value, message):
    df = good_rows()
    df.loc[(df.problem_id == 17) & (df.gmm == gmm), "lambda"] = value
    errors, _ = read_shard(df, tmp_path)
    assert errors[17] == message
    assert errors[16] is None


def test_lambdas_all_zero_and_lambda_conflict(tmp_path):
    df = good_rows()
    df.loc[df.problem_id == 17, "lambda"] = 0.0
    set_cell(df, 18, 2, 1, "lambda", 0.5)
    errors, _ = read_shard(df, tmp_path)
    assert errors[17] == "problem 17: lambdas are all zero"
    assert errors[18] == (
        "problem 18, gmm 2: lambda differs between the GMM's rows "
        "(0.333333 on component 0, 0.5 on component 1)"
    )


def test_gmm_without_positive_weight(tmp_path):
    df = good_rows()
    df.loc[(df.problem_id == 17) & (df.gmm == 0), "weight"] = 0.0
    errors, _ = read_shard(df, tmp_path)
    assert errors[17] == "problem 17, gmm 0: no component has positive weight"


def test_problem_without_gmm_and_gmm_without_component_in_zarr(tmp_path):
    cols = tutorial_columns(4)
    # problem 1 loses its GMMs, problem 2's GMM 1 loses its components
    keep_gmm = np.ones(cols.n_gmms, dtype=bool)
    keep_gmm[3:6] = False
    comp_keep = np.ones(cols.n_components, dtype=bool)
    for g in np.flatnonzero(~keep_gmm):
        comp_keep[cols.comp_offset[g]:cols.comp_offset[g + 1]] = False
    comp_keep[cols.comp_offset[7]:cols.comp_offset[8]] = False
    comp_counts = np.diff(cols.comp_offset).copy()
    comp_counts[7] = 0
    comp_counts = comp_counts[keep_gmm]
    gmm_counts = np.array([3, 0, 3, 3])
    mean, cov = cols.dense()
    broken = ProblemColumns.from_dense(
        problem_id=cols.problem_id,
        gmm_offset=np.concatenate([[0], np.cumsum(gmm_counts)]),
        lambdas=cols.lambdas[keep_gmm],
        comp_offset=np.concatenate([[0], np.cumsum(comp_counts)]),
        weight=cols.weight[comp_keep],
        mean=mean[comp_keep],
        cov=cov[comp_keep],
    )
    store = write_store(str(tmp_path / "holes.zarr"), [broken])
    shard = store.read(0, 4)
    assert shard.errors[0] is None and shard.errors[3] is None
    assert shard.errors[1] == "problem 1: has no GMM"
    assert shard.errors[2] == "problem 2, gmm 1: has no component"
