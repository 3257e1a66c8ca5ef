"""The solver's programs kept whole on disk (raybary.batch.programs): a new
process (here: a new :class:`Programs` on the same directory) loads a program
instead of tracing it, and gets the same numbers; a torn file is replaced; the
key covers what decides the program.

The tutorial batch of tests/batch/test_lanes.py (128 rows, float32) through
``init_batch`` and ``run_batch``: programs the test session compiles anyway."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from raybary.batch.padding import Bucket, pad_problems
from raybary.batch.programs import Programs, source_hash
from raybary.solvers import barycenter as bc
from raybary.storage.generate import tutorial_problems

COUNT, ROWS = 100, 128
CONFIG = bc.SolverConfig.for_dtype("float32")
BUCKET = Bucket(d=2, n=6, J=3, L=12, K=8)


@pytest.fixture(scope="module")
def batch():
    problems = tutorial_problems(COUNT, seed=3)
    out, _ = pad_problems(problems, [6] * COUNT, BUCKET, ROWS, epsilons=[3e-4] * COUNT,
                          relative_epsilon=True, inits=[None] * COUNT,
                          keys=np.array([[0, i] for i in range(COUNT)], np.uint32),
                          dtype=np.dtype("float32"))
    return bc.PaddedProblem(**{k: jnp.asarray(v) for k, v in out.items()})


def _solve(programs: Programs, batch) -> dict:
    state = programs.call("init_batch", bc.init_batch, (batch,), {"config": CONFIG})
    state = programs.call("run_batch", bc.run_batch, (state, batch, 40), {"config": CONFIG})
    return {k: np.asarray(v) for k, v in state._asdict().items() if not isinstance(v, tuple)}


@pytest.fixture(scope="module")
def direct(batch):
    """The same two calls, traced in this process and kept in memory only.
    (That these programs give jax.jit's numbers row by row is
    tests/batch/test_lanes.py's first test: the engine runs them.)"""
    return _solve(Programs(None), batch)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_saved_program_loads_in_a_new_table_with_the_same_numbers(tmp_path, batch, direct):
    assert not (tmp_path / "raybary-programs").exists()  # direct: no directory, no file
    first = Programs(str(tmp_path))
    _same(_solve(first, batch), direct)
    assert (first.saved, first.loaded) == (2, 0)
    files = sorted(p.name for p in (tmp_path / "raybary-programs").iterdir())
    assert [f.split("-")[0] for f in files] == ["init_batch", "run_batch"]

    second = Programs(str(tmp_path))
    _same(_solve(second, batch), direct)
    assert (second.saved, second.loaded) == (0, 2)


def test_a_torn_file_is_traced_again_and_replaced(tmp_path, batch, direct):
    _solve(Programs(str(tmp_path)), batch)
    torn = next((tmp_path / "raybary-programs").glob("run_batch-*.bin"))
    torn.write_bytes(torn.read_bytes()[:100])
    again = Programs(str(tmp_path))
    _same(_solve(again, batch), direct)
    assert (again.saved, again.loaded) == (1, 1)
    assert torn.stat().st_size > 100


def test_the_key_covers_shapes_static_arguments_and_the_environment(tmp_path, monkeypatch):
    programs = Programs(str(tmp_path))
    key = ("run_batch", ("tree", (((128,), "float32"),)), (("config", "A"),), False)
    path = programs._path(key)
    assert programs._path(key) == path
    for other in [("run_batch", ("tree", (((64,), "float32"),)), (("config", "A"),), False),
                  ("run_batch", ("tree", (((128,), "float32"),)), (("config", "B"),), False),
                  ("run_batch", ("tree", (((128,), "float32"),)), (("config", "A"),), True)]:
        assert programs._path(other) != path
    monkeypatch.setenv("XLA_FLAGS", "--xla_some_other_flag=true")
    assert Programs(str(tmp_path))._path(key) != path  # XLA_FLAGS is in the environment
    assert len(source_hash()) == 24
