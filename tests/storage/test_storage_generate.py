"""The generator: seeded, reproducible whatever the chunking or format, valid problems, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from raybary.cli import main
from raybary.storage import ProblemColumns, open_store
from raybary.storage.generate import (
    SEED_BLOCK,
    family_columns,
    generate,
    random_columns,
    tutorial_columns,
)


def same(a: ProblemColumns, b: ProblemColumns) -> None:
    for name in ("problem_id", "gmm_offset", "gmm_label", "comp_offset", "mean_offset",
                 "cov_offset", "lambdas", "weight", "mean_values", "cov_values"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("family", ["tutorial", "random"])
def test_a_problem_does_not_depend_on_how_the_batch_is_cut(family):
    n = SEED_BLOCK + 300
    whole = family_columns(family, n, seed=7)
    pieces = [family_columns(family, b - a, seed=7, start=a)
              for a, b in [(0, 1000), (1000, SEED_BLOCK + 1), (SEED_BLOCK + 1, n)]]
    same(whole, ProblemColumns.concat(pieces))
    assert whole.problem_id.tolist() == list(range(n))
    other = family_columns(family, 50, seed=8)
    assert not np.array_equal(other.weight[:10], whole.weight[:10])


def test_tutorial_family_shape_and_validity():
    cols = tutorial_columns(500, seed=1)
    assert cols.uniform_dim() == 2
    assert np.diff(cols.gmm_offset).tolist() == [3] * 500
    assert np.diff(cols.comp_offset)[:3].tolist() == [2, 3, 5]
    problems, errors = cols.to_problems()
    assert errors == [None] * 500
    assert tutorial_columns(3, dim=3).uniform_dim() == 3


def test_random_family_is_ragged_mixed_and_valid():
    cols = random_columns(3000, seed=2)
    assert set(cols.dims()) == {1, 2, 3, 5}
    assert set(np.diff(cols.gmm_offset)) == set(range(1, 7))
    assert set(np.diff(cols.comp_offset)) == set(range(1, 9))
    _, errors = cols.to_problems()
    assert [e for e in errors if e] == []
    assert random_columns(10, dim=3, seed=2).uniform_dim() == 3


def test_parquet_and_zarr_hold_the_same_problems(tmp_path):
    p = generate(str(tmp_path / "g.parquet"), 5000, seed=3)
    z = generate(str(tmp_path / "g.zarr"), 5000, seed=3, chunk_problems=1000)
    assert (p.n_problems, z.n_problems) == (5000, 5000)
    same(p.read_columns(1234, 4321), z.read_columns(1234, 4321))
    same(z.read_columns(0, 5000), tutorial_columns(5000, seed=3))


def test_random_to_zarr_needs_a_dimension(tmp_path):
    with pytest.raises(ValueError, match=r"pass dim \(--dim D\)"):
        generate(str(tmp_path / "r.zarr"), 10, family="random")
    assert list(tmp_path.iterdir()) == []
    assert generate(str(tmp_path / "r.zarr"), 10, family="random", dim=5).dim == 5


def test_cli_generate(tmp_path):
    out = str(tmp_path / "cli.zarr")
    r = CliRunner().invoke(main, ["generate", out, "--problems", "300", "--seed", "4",
                                  "--chunk-problems", "64"])
    assert r.exit_code == 0, r.output
    assert "wrote 300 tutorial problems" in r.output
    same(open_store(out).read_columns(0, 300), tutorial_columns(300, seed=4))
    again = CliRunner().invoke(main, ["generate", out, "--problems", "3"])
    assert again.exit_code == 1 and "already exists" in again.output
    assert "Traceback" not in again.output
    bad = CliRunner().invoke(main, ["generate", str(tmp_path / "x.csv"), "--problems", "3"])
    assert bad.exit_code == 1 and "name it *.parquet or *.zarr" in bad.output
    mixed = CliRunner().invoke(main, ["generate", str(tmp_path / "m.zarr"), "--problems", "3",
                                      "--family", "random"])
    assert mixed.exit_code == 1 and "--dim" in mixed.output
