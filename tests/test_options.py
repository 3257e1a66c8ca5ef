"""SolverOptions: one checked options object from the CLI, raybary.solve, raybary run
and Ray Data's BarycenterSolver down to the jit-static SolverConfig."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import replace

import pytest

from raybary.errors import OptionsError
from raybary.options import DEFAULT_RELATIVE_EPSILON, SolverOptions
from raybary.solvers.config import SolverConfig


def test_options_are_checked_once_with_the_field_named():
    for kwargs, message in [
        ({"bar_size": 0}, "bar_size must be at least 1"),
        ({"bar_size": (2, 0)}, "bar_size must be at least 1"),
        ({"epsilon": 0.1, "relative_epsilon": 1e-3}, "not both"),
        ({"epsilon": -1.0}, "epsilon must be a positive finite number"),
        ({"relative_epsilon": float("nan")}, "relative_epsilon must be a positive finite"),
        ({"restarts": 0}, "restarts must be at least 1"),
        ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
        ({"max_iterations": 0}, "max_iterations must be at least 1"),
        ({"tol": 0.0}, "tol must be a positive finite number"),
    ]:
        with pytest.raises(OptionsError, match=message):
            SolverOptions(**kwargs)
    assert issubclass(OptionsError, ValueError)


def test_build_normalises_loose_values():
    import numpy as np

    o = SolverOptions.build(bar_size=np.array([2, 3]), dtype=np.float64, epsilon=np.float32(0.5),
                            seed=np.int64(4))
    assert o.bar_size == (2, 3) and o.dtype == "float64" and o.epsilon == 0.5 and o.seed == 4
    assert SolverOptions.build(dtype=np.dtype("f4")).dtype == "float32"


def test_regularisation_defaults_and_recording():
    o = SolverOptions()
    assert o.is_relative and o.epsilon_value == DEFAULT_RELATIVE_EPSILON
    assert o.resolved().relative_epsilon == DEFAULT_RELATIVE_EPSILON
    a = SolverOptions(epsilon=0.1)
    assert not a.is_relative and a.epsilon_value == 0.1 and a.resolved() is a
    # unset options are not recorded, so results of older versions compare equal
    assert SolverOptions(bar_size=3).resolved().recorded() == {
        "bar_size": 3, "relative_epsilon": DEFAULT_RELATIVE_EPSILON, "restarts": 1,
        "learn_weights": False, "dtype": "float32", "seed": 0}


def test_config_of_the_options():
    assert SolverOptions().config() == SolverConfig()
    c64 = SolverOptions(dtype="float64").config()
    assert (c64.tol, c64.plan_tol, c64.plan_max_iterations) == (1e-9, 1e-8, 1000)
    c = SolverOptions(learn_weights=True, max_iterations=7, tol=1e-4).config()
    assert c.learn_weights and c.max_iterations == 7 and c.tol == 1e-4
    base = SolverConfig(plan_block=4, plan_tol=1e-6)
    assert SolverOptions(max_iterations=5).config(base) == replace(base, max_iterations=5)


def test_old_plan_keywords_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"SolverConfig\(sinkhorn_\w+=\.\.\.\) is deprecated") \
            as caught:
        c = SolverConfig(sinkhorn_tol=1e-7, sinkhorn_max_iterations=50)
    assert sorted(str(w.message).split("; ")[1] for w in caught) == [
        "use plan_max_iterations=...", "use plan_tol=..."]
    assert c == SolverConfig(plan_tol=1e-7, plan_max_iterations=50)
    with pytest.warns(DeprecationWarning, match="use plan_tol"):
        assert c.sinkhorn_tol == 1e-7
    with pytest.warns(DeprecationWarning, match="relative_epsilon=...\\) is ignored"):
        assert SolverConfig(relative_epsilon=False) == SolverConfig()
    with pytest.raises(TypeError, match="both sinkhorn_tol and plan_tol"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        SolverConfig(sinkhorn_tol=1e-7, plan_tol=1e-6)
    assert replace(c, plan_tol=1e-3).plan_tol == 1e-3


def test_the_cli_and_ray_data_take_their_defaults_from_the_options():
    from raybary.cli.run_cmds import run_cmd
    from raybary.interop.ray_data import BarycenterSolver

    defaults = {p.name: p.default for p in run_cmd.params}
    for name in ("bar_size", "epsilon", "relative_epsilon", "restarts", "learn_weights", "dtype",
                 "seed", "max_iterations", "tol"):
        assert defaults[name] == getattr(SolverOptions, name), name
    solver = BarycenterSolver(bar_size=3)
    assert solver.options == SolverOptions(bar_size=3).resolved()
    with pytest.raises(TypeError):
        BarycenterSolver(bar_sizes=3)
    with pytest.raises(OptionsError, match="restarts must be at least 1"):
        BarycenterSolver(restarts=0)


def test_solve_sets_up_jax_only_as_documented(tmp_path):
    # RAYBARY_JAX_CACHE=off and RAYBARY_XLA_FLAGS=off: raybary.solve leaves JAX's
    # configuration alone; by default it turns on the persistent cache where none
    # is set, and XLA's intra-op CPU threads off (the engine runs a lane per core)
    code = ("import os, jax, raybary; from raybary.storage.generate import tutorial_problems; "
            "raybary.solve(tutorial_problems(1), bar_size=2, epsilon=0.5, max_iterations=2); "
            "print(jax.config.jax_compilation_cache_dir); print(os.environ.get('XLA_FLAGS'))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_dump_to=/dev/null"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**env, "RAYBARY_JAX_CACHE": "off", "RAYBARY_XLA_FLAGS": "off"})
    assert off.returncode == 0, off.stderr[-2000:]
    assert off.stdout.split("\n")[:2] == ["None", "--xla_dump_to=/dev/null"]
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**env, "RAYBARY_JAX_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout.split("\n")[:2] == [
        str(tmp_path / "cache"), "--xla_dump_to=/dev/null --xla_cpu_multi_thread_eigen=false"]
