"""``raybary run``'s options come from raybary/runner/options.py: defaults, choices,
parsers and the words for --max-attempts cannot drift from the dataclasses."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from raybary.cli import main
from raybary.cli.run_cmds import build_options, run_cmd
from raybary.runner import driver, options
from raybary.runner.options import ExecOptions, GridOptions, SolverOptions


def _params(*args: str) -> dict:
    """``raybary run IN OUT ARGS`` parsed by click (defaults filled in, callbacks run)."""
    ctx = run_cmd.make_context("run", ["in.parquet", "out", *args])
    params = dict(ctx.params)
    for name in ("input_url", "output_url", "as_json", "storage_options",
                 "output_storage_options"):  # the storage options go to run() itself
        params.pop(name)
    return params


def test_cli_defaults_are_the_options_defaults():
    assert build_options(**_params()) == (SolverOptions(), GridOptions(), ExecOptions())


def test_every_options_field_a_user_sets_has_its_cli_default():
    by_dest = {p.name: p for p in run_cmd.params if isinstance(p, click.Option)}
    renamed = {"shape": "grid_shape", "bounds": "grid_bounds", "dims": "grid_dims",
               "input_gmms": "input_grids"}
    internal = {"progress", "actor_env", "resources"}  # --quiet, Python API only
    for cls in (SolverOptions, GridOptions, ExecOptions):
        for f in fields(cls):
            if f.name in internal:
                continue
            param = by_dest[renamed.get(f.name, f.name)]
            value = param.default
            if param.callback is not None:  # text parsed by options.py's parser
                value = param.callback(None, param, value)
            assert value == f.default, (cls.__name__, f.name, param.default, f.default)
    assert tuple(by_dest["dtype"].type.choices) == options.DTYPES


def test_options_are_parsed_by_options_py():
    solver, grid, exe = build_options(**_params(
        "--grid", "40x60", "--grid-bounds", "-1,2,-3,4", "--grid-dims", "0,2", "-n", "3",
        "--max-attempts", "5", "--placement-timeout", "7", "--plans", "-q"))
    assert grid.shape == options.parse_grid("40x60") == (40, 60)
    assert grid.bounds == (-1.0, 2.0, -3.0, 4.0) and grid.dims == (0, 2) and grid.plans
    assert solver.bar_size == 3 and exe.max_attempts == 5 and exe.placement_timeout_s == 7.0
    assert exe.progress is False
    assert options.format_grid((40, 60)) == "40x60" and options.format_grid(None) == "none"
    assert options.parse_grid(options.format_grid(options.DEFAULT_GRID)) == options.DEFAULT_GRID


@pytest.mark.parametrize("args,exit_code,message", [
    (["--grid", "8xx"], 2, "Invalid value for --grid: grid must be H or HxW"),
    (["--grid-dims", "a,b"], 2, "Invalid value for --grid-dims: grid dims must be i,j"),
    (["--epsilon", "0.1", "--relative-epsilon", "0.01"], 2,
     "give epsilon (--epsilon, absolute) or relative_epsilon (--relative-epsilon), not both"),
    (["--address", "http://h:8265"], 2, "--address http://h:8265 is a Ray dashboard URL"),
])
def test_bad_options_are_usage_errors(args, exit_code, message):
    r = CliRunner().invoke(main, ["run", "in.parquet", "out", *args])
    assert r.exit_code == exit_code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert sum(line.startswith("Error: ") for line in r.output.splitlines()) == 1


def test_max_attempts_is_described_once_and_truly():
    """The CLI's help is options.py's text; the driver's policy is options.py's numbers."""
    param = next(p for p in run_cmd.params if p.name == "max_attempts")
    assert param.help == options.MAX_ATTEMPTS_HELP
    text = " ".join(options.MAX_ATTEMPTS_HELP.split())
    assert f"max(this, {options.FAULT_ATTEMPTS})" in text and "at most 30 s" in text
    assert "dead actor or node" in text and "re-queued at once" in text
    assert "one total per shard" in text
    assert driver.FAULT_ATTEMPTS is options.FAULT_ATTEMPTS
    assert driver.RETRY_BACKOFF_S == options.RETRY_BACKOFF_S == 1.0
    assert driver.MAX_BACKOFF_S == options.MAX_BACKOFF_S == 30.0
    doc = " ".join(driver.__doc__.split())
    assert "up to ``max_attempts`` lost attempts" in doc
    assert "up to ``max(max_attempts, FAULT_ATTEMPTS)`` lost attempts" in doc
    assert "both kinds count toward one total per shard" in doc


def test_address_is_described_once():
    """``--address``'s help is options.py's text, which names every form it takes."""
    param = next(p for p in run_cmd.params if p.name == "address")
    assert param.help == options.ADDRESS_HELP
    text = " ".join(options.ADDRESS_HELP.split())
    for words in ("$RAY_ADDRESS", "'local'", "'auto'", "HOST:PORT",
                  "A token is sent only to a cluster that wants one"):
        assert words in text, words


def test_n_is_the_bar_size_wherever_it_exists(tmp_path):
    """``-n`` is the barycenter's component count n in every command that has
    it; ``generate`` counts problems with ``--problems`` only."""
    with_n = {name: p.name for name, cmd in main.commands.items() for p in cmd.params
              if isinstance(p, click.Option) and "-n" in (*p.opts, *p.secondary_opts)}
    assert {"run", "tutorial"} <= set(with_n) and set(with_n.values()) == {"bar_size"}, with_n
    assert _params("-n", "4")["bar_size"] == 4
    assert main.commands["tutorial"].make_context("tutorial", ["-n", "4"]).params["bar_size"] == 4
    out = tmp_path / "g.parquet"
    r = CliRunner().invoke(main, ["generate", str(out), "-n", "3"])
    assert r.exit_code == 2 and "No such option '-n'" in r.output and not out.exists(), r.output
