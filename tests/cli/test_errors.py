"""Every user-facing error is a ``raybary.RaybaryError`` and reaches the user through
one path (:mod:`raybary.cli.errors`): ``Error: <message>`` without a traceback, and
its exit code (1 for a run or its data, 2 for options).

Each error type is raised for real by a real command (click's CliRunner, real
files; the runs that need Ray use the session's local Ray).
"""

from __future__ import annotations

import io
import os
import threading
import time

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from click.testing import CliRunner

import raybary
from raybary.cli import main
from raybary.errors import OptionsError, RaybaryError
from raybary.jobs.auth import TokenError
from raybary.jobs.client import JobsError
from raybary.plot import PlotError
from raybary.runner.driver import JobIncomplete
from raybary.runner.options import GridOptions, SolverOptions, recorded_options
from raybary.storage.errors import (
    InputChangedError,
    ResultsConflictError,
    StoreDataError,
    StoreFormatError,
)

_CLEAN_ENV = {"RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None, "RAY_AUTH_MODE": None,
              "RAY_API_SERVER_ADDRESS": None}


def _fail(args: list[str], env: dict | None = None) -> tuple[BaseException, int, str]:
    """Run a command that must fail; return (the error it raised, exit code, what it prints).

    The command runs as the real CLI does; only click's last step (print and
    exit, ``standalone_mode``) is done here, so that the original error is seen.
    """
    r = CliRunner().invoke(main, args, env={**_CLEAN_ENV, **(env or {})},
                           standalone_mode=False)
    exc = r.exception
    assert isinstance(exc, click.ClickException), (r.output, exc)
    shown = io.StringIO()
    exc.show(file=shown)
    return exc.__cause__, exc.exit_code, shown.getvalue()


def _check(text: str, message: str) -> None:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, text
    assert message in errors[0], text


def test_one_base_class_keeps_the_old_ones():
    assert raybary.RaybaryError is RaybaryError
    for cls in (StoreFormatError, StoreDataError, ResultsConflictError, InputChangedError,
                TokenError, PlotError, OptionsError):
        assert issubclass(cls, RaybaryError) and issubclass(cls, ValueError), cls
    assert issubclass(JobsError, RaybaryError)
    assert issubclass(JobIncomplete, RaybaryError) and issubclass(JobIncomplete, RuntimeError)
    assert OptionsError.exit_code == 2
    for cls in (StoreFormatError, StoreDataError, ResultsConflictError, InputChangedError,
                TokenError, PlotError, JobsError, JobIncomplete):
        assert cls.exit_code == 1, cls


def test_every_command_goes_through_the_one_error_path():
    assert set(main.commands) >= {"run", "submit", "status", "logs", "stop", "plot", "show",
                                  "generate", "convert", "tutorial"}
    for name, cmd in main.commands.items():
        assert getattr(cmd.callback, "handles_user_errors", False), name


def test_standalone_output_is_what_the_error_path_shows(tmp_path):
    r = CliRunner().invoke(main, ["plot", str(tmp_path), "--problem", "1"])
    err, code, text = _fail(["plot", str(tmp_path), "--problem", "1"])
    assert r.exit_code == code == 1 and r.output == text


# ------------------------------------------------------------------ no Ray
def test_store_format_error(tmp_path):
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "bad.parquet")
    err, code, text = _fail(["show", str(tmp_path / "bad.parquet")])
    assert type(err) is StoreFormatError and code == 1
    _check(text, "bad.parquet")
    assert "column 'mean' is missing" in text


def test_store_data_error(tmp_path):
    from raybary.storage.generate import generate

    generate(str(tmp_path / "mixed.parquet"), 20, family="random", seed=1)
    err, code, text = _fail(["convert", str(tmp_path / "mixed.parquet"),
                             str(tmp_path / "m.zarr")])
    assert type(err) is StoreDataError and code == 1
    _check(text, "a Zarr problem store holds one dimension d")


def test_results_conflict_error(tmp_path):
    from raybary.storage import ResultWriter
    from raybary.storage.generate import generate

    store = generate(str(tmp_path / "p.parquet"), 12, family="tutorial", seed=3)
    out = str(tmp_path / "out")
    ResultWriter(out, n_problems=12, shard_size=6, grid_shape=(8, 8),
                 options=recorded_options(SolverOptions(bar_size=2), GridOptions(shape=(8, 8))),
                 input_url=store.url).prepare()
    err, code, text = _fail(["run", store.url, out, "--bar-size", "3", "--grid", "8",
                             "--shard-size", "6", "-q"])
    assert type(err) is ResultsConflictError and code == 1
    _check(text, "holds results written with different settings")
    assert "bar_size: 2 (existing) vs 3 (now)" in text


def test_plot_error(tmp_path):
    from raybary.storage import ResultWriter

    out = str(tmp_path / "out")
    ResultWriter(out, n_problems=4, shard_size=4, grid_shape=None, input_url="x").prepare()
    err, code, text = _fail(["plot", out, "--problem", "99"])
    assert type(err) is PlotError and code == 1
    _check(text, "problem 99 is not in")


def test_jobs_error():
    err, code, text = _fail(["status", "x", "--address", "127.0.0.1:9"])
    assert type(err) is JobsError and code == 1
    _check(text, "cannot reach the Ray dashboard at http://127.0.0.1:9")


def test_token_error(tmp_path):
    """A token file that is named but not there: refused before the dashboard is
    asked (the jobs client passes the :class:`TokenError`'s message on). The
    TokenError itself reaches the user from ``raybary run`` joining a cluster
    that wants a token (looked for only then): tests/jobs/test_jobs.py."""
    missing = str(tmp_path / "no-token")
    err, code, text = _fail(["status", "--address", "http://127.0.0.1:9"],
                            env={"RAY_AUTH_TOKEN_PATH": missing})
    assert type(err) is JobsError and code == 1
    _check(text, f"cannot read the Ray token file {missing} ($RAY_AUTH_TOKEN_PATH)")


def test_options_error_exits_2_with_the_usage_hint():
    err, code, text = _fail(["run", "in.parquet", "out", "--epsilon", "0.1",
                             "--relative-epsilon", "0.01"])
    assert type(err) is OptionsError and code == 2
    _check(text, "give epsilon (--epsilon, absolute) or relative_epsilon (--relative-epsilon), not both")
    assert text.startswith("Usage: ") and "--help" in text


def test_builtin_errors_a_command_names_exit_1(tmp_path):
    err, code, text = _fail(["run", str(tmp_path / "missing.parquet"), str(tmp_path / "out")])
    assert isinstance(err, FileNotFoundError) and code == 1
    _check(text, "no problem store at")


# ------------------------------------------------------------------ with Ray
def test_job_incomplete(tmp_path, ray_local):
    from raybary.storage.generate import generate

    store = generate(str(tmp_path / "p.parquet"), 8, family="tutorial", seed=3)
    err, code, text = _fail(["run", store.url, str(tmp_path / "out"), "--grid", "none",
                             "--actors", "1", "--cpus-per-actor", "64",
                             "--placement-timeout", "1", "-q"])
    assert type(err) is JobIncomplete and code == 1
    _check(text, "no actor could be started in")
    assert "1 actors asked for 64 CPU each" in text


def _rewrite_when_committed(inp, out, done: threading.Event) -> None:
    """Once OUTPUT has a commit, replace INPUT by the same problems with other ids."""
    commits = out / "_commits"
    while not done.is_set():
        if commits.exists() and any(commits.glob("*.json")):
            table = pq.read_table(inp)
            ids = pc.add(table["problem_id"], 5000)
            table = table.set_column(table.schema.get_field_index("problem_id"), "problem_id", ids)
            pq.write_table(table, str(inp) + ".tmp")
            os.replace(str(inp) + ".tmp", inp)
            return
        time.sleep(0.02)


def test_input_changed_error(tmp_path, ray_local):
    from raybary.storage.generate import generate

    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    generate(str(inp), 60, family="tutorial", seed=5)
    done = threading.Event()
    watcher = threading.Thread(target=_rewrite_when_committed, args=(inp, out, done), daemon=True)
    watcher.start()
    try:
        err, code, text = _fail(["run", str(inp), str(out), "--bar-size", "2", "--grid", "none",
                                 "--shard-size", "10", "--actors", "1", "--in-flight", "1",
                                 "-q"])
    finally:
        done.set()
        watcher.join(timeout=10)
    assert type(err) is InputChangedError and code == 1
    _check(text, f"the input {inp} changed during the run")
