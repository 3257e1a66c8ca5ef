"""CLI command ``raybary run``: a thin layer over :func:`raybary.runner.run`.

Exit status: 0 when every problem is accounted for (even if some are
``invalid`` or ``failed``); 1 when the job could not complete (shards left
uncommitted, results of other options in OUTPUT, unreadable input, a Ray
cluster that cannot be joined); 2 for bad command-line usage; 130 when interrupted (see
:mod:`raybary.cli.errors`). Defaults, choices and parsers of the options are
those of :mod:`raybary.runner.options`, so the two cannot drift apart.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import fields

import click

from raybary.cli.errors import user_errors
from raybary.cli.storage_flags import output_storage_options_flag, storage_options_flag
from raybary.runner.options import (
    ADDRESS_HELP,
    DTYPES,
    MAX_ATTEMPTS_HELP,
    ExecOptions,
    GridOptions,
    SolverOptions,
    format_grid,
    parse_bounds,
    parse_dims,
    parse_grid,
)


def _default(cls, name: str):
    """The default of field ``name`` of options dataclass ``cls`` (the CLI's default too)."""
    field = next(f for f in fields(cls) if f.name == name)
    return field.default


def _parsed_by(parse, param_hint: str):
    """A click callback: ``parse`` the option's text (an options.py parser), its
    error a usage error that names the option."""
    def callback(ctx, param, value):
        try:
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=param_hint) from None

    return callback


def _options(*decorators):
    """One decorator applying ``decorators`` in order (the first is the outermost)."""
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


_S, _G, _E = SolverOptions, GridOptions, ExecOptions  # short names for the options below

#: ``--epsilon`` and ``--relative-epsilon``, shared with ``raybary distances``.
epsilon_options = _options(
    click.option("--epsilon", type=float, default=_default(_S, "epsilon"),
                 help="Absolute entropic regularisation (squared data units, e.g. the tutorial's 0.1)."),
    click.option("--relative-epsilon", type=float, default=_default(_S, "relative_epsilon"),
                 help="Regularisation relative to the mean cost (scale-free). Default when neither "
                      "is given: the solver's default relative epsilon."),
)

#: Where and how the work runs (Ray, actors, shards, retries), shared with
#: ``raybary distances``: :class:`ExecOptions`' fields.
exec_options = _options(
    click.option("--address", default=_default(_E, "address"), metavar="HOST:PORT|auto|local",
                 help=ADDRESS_HELP),
    click.option("--actors", type=click.IntRange(min=1), default=_default(_E, "actors"),
                 help="Actors (solver processes). Default: one per CPU (per GPU with "
                      "--gpus-per-actor)."),
    click.option("--cpus-per-actor", type=click.FloatRange(min=0),
                 default=_default(_E, "cpus_per_actor"), show_default=True),
    click.option("--gpus-per-actor", type=click.FloatRange(min=0),
                 default=_default(_E, "gpus_per_actor"), show_default=True,
                 help="GPUs per actor; fractions (e.g. 0.25) put several actors on one GPU."),
    click.option("--shard-size", type=click.IntRange(min=1), default=_default(_E, "shard_size"),
                 show_default=True, help="Problems per shard (the unit of work, commit and resume)."),
    click.option("--in-flight", type=click.IntRange(min=1), default=_default(_E, "in_flight"),
                 show_default=True, help="Shards queued per actor."),
    click.option("--max-attempts", type=click.IntRange(min=1), default=_default(_E, "max_attempts"),
                 show_default=True, help=MAX_ATTEMPTS_HELP),
    click.option("--num-cpus", type=click.IntRange(min=1), default=_default(_E, "num_cpus"),
                 help="CPUs of a private local Ray (default: all)."),
    click.option("--placement-timeout", "placement_timeout_s", type=click.FloatRange(min=0, min_open=True),
                 default=_default(_E, "placement_timeout_s"),
                 help="Fail when no actor has started for this many seconds (default: 60 on "
                      "the embedded local Ray, 900 on a cluster, where nodes may take minutes "
                      "to start). Actors that cannot be placed while others run get no work."),
    click.option("--overwrite", is_flag=True, default=_default(_E, "overwrite"),
                 help="Replace OUTPUT even if it holds results of other options."),
)


@click.command("run")
@click.argument("input_url", metavar="INPUT")
@click.argument("output_url", metavar="OUTPUT")
@click.option("--bar-size", "-n", type=click.IntRange(min=1), default=_default(_S, "bar_size"),
              show_default=True, help="Components of each barycenter.")
@epsilon_options
@click.option("--restarts", type=click.IntRange(min=1), default=_default(_S, "restarts"),
              show_default=True, help="Initialisations per problem; the lowest objective wins.")
@click.option("--learn-weights/--uniform-weights", default=_default(_S, "learn_weights"),
              show_default=True, help="Also optimise the barycenter's component weights.")
@click.option("--dtype", type=click.Choice(DTYPES), default=_default(_S, "dtype"),
              show_default=True)
@click.option("--seed", type=int, default=_default(_S, "seed"), show_default=True,
              help="Seed of the initialisation.")
@click.option("--max-iterations", type=click.IntRange(min=1), default=_default(_S, "max_iterations"),
              help="Outer iterations at most per problem (default: the solver's for the dtype).")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=_default(_S, "tol"),
              help="Relative objective tolerance (default: the solver's for the dtype).")
@click.option("--grid", "grid_shape", default=format_grid(_default(_G, "shape")),
              show_default=True, callback=_parsed_by(parse_grid, "--grid"),
              help="Log-density grid H or HxW per problem (d = 1: a curve of max(H, W) "
                   "points); 'none' for no grids.")
@click.option("--grid-bounds", default=_default(_G, "bounds"),
              callback=_parsed_by(parse_bounds, "--grid-bounds"),
              help="xmin,xmax,ymin,ymax for every grid (d = 1: xmin,xmax); default: each "
                   "problem's window showing its inputs and barycenter whole (every "
                   "component's mean +- 3 sd, and more), shared by barycenter and input grids.")
@click.option("--grid-dims", default=",".join(map(str, _default(_G, "dims"))), show_default=True,
              callback=_parsed_by(parse_dims, "--grid-dims"),
              help="The two coordinates i,j shown on the grids when d > 2 (a 2-D marginal).")
@click.option("--input-grids", type=click.IntRange(min=0), default=_default(_G, "input_gmms"),
              show_default=True,
              help="Also store the grids of the first J input GMMs of each problem.")
@click.option("--plans/--no-plans", default=_default(_G, "plans"), show_default=True,
              help="Also store each problem's transport plans in OUTPUT/plans/ (long "
                   "format: problem_id, gmm, bar_component, component, mass).")
@exec_options
@click.option("--quiet", "-q", is_flag=True, default=not _default(_E, "progress"),
              help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON on stdout.")
@storage_options_flag
@output_storage_options_flag
@user_errors(FileNotFoundError, ConnectionError)
def run_cmd(input_url, output_url, quiet, as_json, storage_options, output_storage_options,
            **params) -> None:
    """Solve every problem of INPUT (Parquet or Zarr store) on Ray, into OUTPUT.

    Re-running the same command on the same OUTPUT resumes: committed shards
    are kept and only the rest is solved. Different solver or grid options
    against an existing OUTPUT are refused unless --overwrite. INPUT and
    OUTPUT may be URLs (s3://, gs://, az://, ...); --storage-option gives
    their fsspec options (endpoint, credentials) to the driver and actors.
    """
    solver, grid, exe = build_options(quiet=quiet, **params)

    from raybary.runner.driver import run

    report_run(lambda: run(input_url, output_url, solver, grid, exe,
                           storage_options=storage_options,
                           output_storage_options=output_storage_options,
                           stream=None if quiet else sys.stderr),
               quiet, as_json, functools.partial(summary_text, plans=grid.plans))


def report_run(start, quiet: bool, as_json: bool, summary) -> None:
    """Run ``start()`` (a run, or a distance job) and print its report: as JSON on
    stdout with ``as_json``, ``summary(report)`` unless ``quiet``. Ctrl-C exits
    130, saying that committed shards are kept."""
    try:
        report = start()
    except KeyboardInterrupt:
        click.echo("\ninterrupted; committed shards are kept, run the same command to resume",
                   err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    if not quiet:
        click.echo(summary(report), err=as_json)


def build_options(*, quiet: bool = False, **params) -> tuple[SolverOptions, GridOptions,
                                                            ExecOptions]:
    """The run's options from ``raybary run``'s parameters (named as the options'
    fields, except ``grid_*``, ``input_grids``, ``plans`` and ``quiet``); raises
    :class:`~raybary.errors.OptionsError` for options that do not go together."""
    grid = GridOptions(shape=params.pop("grid_shape"), bounds=params.pop("grid_bounds"),
                       dims=params.pop("grid_dims"), input_gmms=params.pop("input_grids"),
                       plans=params.pop("plans", False))
    solver = SolverOptions(**{f.name: params.pop(f.name) for f in fields(SolverOptions)})
    exe = ExecOptions(progress=not quiet, **params)
    return solver, grid, exe


def summary_text(report, *, plans: bool = False) -> str:
    """The end-of-run summary: counts, throughput, where the results are
    (``plans``: the run stored plans too)."""
    c = report.counts
    lines = [
        f"raybary run: {report.n_problems} problems in {report.n_shards} shards "
        f"({'complete' if report.complete else 'INCOMPLETE'})",
        f"  status       ok {c.get('ok', 0)}, invalid {c.get('invalid', 0)}, "
        f"failed {c.get('failed', 0)}",
        f"  this run     {report.problems_run} problems ({report.shards_run} shards) in "
        f"{report.wall_s:.1f} s = {report.problems_per_s:.1f} problems/s on {report.actors} actors"
        + (f"; {report.shards_skipped} shards committed earlier were kept"
           if report.shards_skipped else ""),
    ]
    if report.retries or report.actor_replacements:
        lines.append(f"  recovered    {report.retries} lost shard attempts re-run, "
                     f"{report.actor_replacements} actors replaced")
    out = report.output
    lines += [
        f"  results      {out}/problems/ (one row per problem), {out}/barycenters/ "
        f"(one row per component), {out}/grids.zarr (log-density grids)"
        + (f", {out}/plans/ (one row per plan entry)" if plans else ""),
        f"  read them    raybary show {out}   |   python: raybary.read_results({out!r})",
        f"               duckdb: SELECT status, count(*) FROM '{out}/problems/*.parquet' "
        "GROUP BY status",
    ]
    return "\n".join(lines)


def register(group: click.Group) -> None:
    """Add ``run`` to ``group``."""
    group.add_command(run_cmd)
