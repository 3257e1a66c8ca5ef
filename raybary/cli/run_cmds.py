"""CLI command ``raybary run``: a thin layer over :func:`raybary.runner.run`.

Exit status: 0 when every problem is accounted for (even if some are
``invalid`` or ``failed``); 1 when the job could not complete (shards left
uncommitted, results of other options in OUTPUT, unreadable input, Ray not
reachable); 2 for bad command-line usage; 130 when interrupted.
"""

from __future__ import annotations

import json
import sys

import click


def _parse(fn, value, param):
    try:
        return fn(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=param) from None


@click.command("run")
@click.argument("input_url", metavar="INPUT")
@click.argument("output_url", metavar="OUTPUT")
@click.option("--bar-size", "-n", type=click.IntRange(min=1), default=6, show_default=True,
              help="Components of each barycenter.")
@click.option("--epsilon", type=float, default=None,
              help="Absolute entropic regularisation (squared data units, e.g. the tutorial's 0.1).")
@click.option("--relative-epsilon", type=float, default=None,
              help="Regularisation relative to the mean cost (scale-free). Default when neither "
                   "is given: the solver's default relative epsilon.")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Initialisations per problem; the lowest objective wins.")
@click.option("--learn-weights/--uniform-weights", default=False, show_default=True,
              help="Also optimise the barycenter's component weights.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initialisation.")
@click.option("--grid", "grid_text", default="50x50", show_default=True,
              help="Log-density grid H or HxW per problem; 'none' for no grids.")
@click.option("--grid-bounds", default=None,
              help="xmin,xmax,ymin,ymax for every grid; default: each problem's extent from its "
                   "input components (mean +- 3 sd), shared by barycenter and input grids.")
@click.option("--grid-dims", default="0,1", show_default=True,
              help="The two coordinates i,j shown on the grids when d > 2 (a 2-D marginal).")
@click.option("--input-grids", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also store the grids of the first J input GMMs of each problem.")
@click.option("--address", default=None,
              help="Join a Ray cluster ('auto' or HEAD:PORT). Default: start a local Ray.")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="Actors (solver processes). Default: one per CPU (per GPU with "
                   "--gpus-per-actor).")
@click.option("--cpus-per-actor", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs per actor; fractions (e.g. 0.25) put several actors on one GPU.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Problems per shard (the unit of work, commit and resume).")
@click.option("--in-flight", type=click.IntRange(min=1), default=2, show_default=True,
              help="Shards queued per actor.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Attempts at a shard lost to dead actors or nodes before its problems are "
                   "committed failed (errors raised by the task, e.g. storage faults, get at "
                   "least 6, with waits of 1, 2, 4, ... s); a re-run solves such shards again.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the embedded local Ray (default: all).")
@click.option("--placement-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fail when no actor has started for this many seconds (default: 60 on "
                   "the embedded local Ray, 900 on a cluster, where nodes may take minutes "
                   "to start). Actors that cannot be placed while others run get no work.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUTPUT even if it holds results of other options.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON on stdout.")
def run_cmd(input_url, output_url, bar_size, epsilon, relative_epsilon, restarts, learn_weights,
            dtype, seed, grid_text, grid_bounds, grid_dims, input_grids, address, actors,
            cpus_per_actor, gpus_per_actor, shard_size, in_flight, max_attempts, num_cpus,
            placement_timeout, overwrite, quiet, as_json) -> None:
    """Solve every problem of INPUT (Parquet or Zarr store) on Ray, into OUTPUT.

    Re-running the same command on the same OUTPUT resumes: committed shards
    are kept and only the rest is solved. Different solver or grid options
    against an existing OUTPUT are refused unless --overwrite.
    """
    from raybary.runner.options import (
        ExecOptions,
        GridOptions,
        SolverOptions,
        parse_bounds,
        parse_dims,
        parse_grid,
    )

    try:
        solver = SolverOptions(bar_size=bar_size, epsilon=epsilon,
                               relative_epsilon=relative_epsilon, restarts=restarts,
                               learn_weights=learn_weights, dtype=dtype, seed=seed)
        grid = GridOptions(shape=_parse(parse_grid, grid_text, "--grid"),
                           bounds=_parse(parse_bounds, grid_bounds, "--grid-bounds"),
                           dims=_parse(parse_dims, grid_dims, "--grid-dims"),
                           input_gmms=input_grids)
        exe = ExecOptions(address=address, actors=actors, cpus_per_actor=cpus_per_actor,
                          gpus_per_actor=gpus_per_actor, shard_size=shard_size,
                          in_flight=in_flight, max_attempts=max_attempts, overwrite=overwrite,
                          progress=not quiet, num_cpus=num_cpus,
                          placement_timeout_s=placement_timeout)
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    from raybary.runner.driver import JobIncomplete, run
    from raybary.storage.errors import ResultsConflictError, StoreDataError, StoreFormatError

    try:
        report = run(input_url, output_url, solver, grid, exe,
                     stream=None if quiet else sys.stderr)
    except KeyboardInterrupt:
        click.echo("\ninterrupted; committed shards are kept, run the same command to resume",
                   err=True)
        sys.exit(130)
    except (JobIncomplete, ResultsConflictError, StoreDataError, StoreFormatError,
            FileNotFoundError, ConnectionError) as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    if not quiet:
        click.echo(summary_text(report), err=as_json)


def summary_text(report) -> str:
    """The end-of-run summary: counts, throughput, where the results are."""
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
        f"(one row per component), {out}/grids.zarr (log-density grids)",
        f"  read them    raybary show {out}   |   python: raybary.read_results({out!r})",
        f"               duckdb: SELECT status, count(*) FROM '{out}/problems/*.parquet' "
        "GROUP BY status",
    ]
    return "\n".join(lines)


def register(group: click.Group) -> None:
    """Add ``run`` to ``group``."""
    group.add_command(run_cmd)
