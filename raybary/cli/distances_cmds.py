"""CLI command ``raybary distances``: a thin layer over :func:`raybary.runner.distances.run_distances`.

Exit statuses, Ray options, resume and storage options are ``raybary run``'s
(:mod:`raybary.cli.run_cmds`, whose option decorators it shares).
"""

from __future__ import annotations

import sys

import click

from raybary.cli.errors import user_errors
from raybary.cli.run_cmds import _default, epsilon_options, exec_options, report_run
from raybary.cli.storage_flags import output_storage_options_flag, storage_options_flag
from raybary.runner.options import DTYPES, ExecOptions, SolverOptions

#: ``raybary.storage.pairs.DEFAULT_TILE``, spelt out so that ``--help`` imports no storage.
_TILE = 100


@click.command("distances")
@click.argument("input_url", metavar="INPUT")
@click.argument("output_url", metavar="OUTPUT")
@click.option("--pairs", default="all", show_default=True, metavar="all|PAIRS.parquet",
              help="'all': every pair i < j of the store's GMMs, in tiles of --tile GMMs a "
                   "side; or a Parquet file with integer columns i and j (gmm ids), "
                   "--shard-size rows a shard.")
@click.option("--tile", type=click.IntRange(min=1), default=_TILE, show_default=True,
              help="With --pairs all: GMMs a side of a shard's tile (up to tile**2 pairs, "
                   "2 * tile GMMs read).")
@epsilon_options
@click.option("--dtype", type=click.Choice(DTYPES), default=_default(SolverOptions, "dtype"),
              show_default=True)
@click.option("--max-iterations", type=click.IntRange(min=1), default=None,
              help="Plan solver iterations at most per pair (default: the solver's for the dtype).")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="L1 marginal tolerance of the plans (default: the solver's for the dtype).")
@exec_options
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON on stdout.")
@storage_options_flag
@output_storage_options_flag
@user_errors(FileNotFoundError, ConnectionError)
def distances_cmd(input_url, output_url, pairs, tile, epsilon, relative_epsilon, dtype,
                  max_iterations, tol, quiet, as_json, storage_options, output_storage_options,
                  **params) -> None:
    """MW2^2 between pairs of the GMMs of INPUT (a GMM store) on Ray, into OUTPUT.

    OUTPUT gets one row per pair (i, j, mw2, converged, status, error);
    read it with raybary.read_distances(OUTPUT) (.matrix() for a square
    matrix). A GMM that fails validation makes its pairs `invalid`, with a
    message naming it; the rest is computed. Re-running the same command
    resumes, as `raybary run` does. Write a GMM store with
    raybary.storage.write_gmms or `raybary generate OUT --gmms N`.
    """
    solver = SolverOptions(epsilon=epsilon, relative_epsilon=relative_epsilon, dtype=dtype,
                           max_iterations=max_iterations, tol=tol)
    exe = ExecOptions(progress=not quiet, **params)

    from raybary.runner.distances import run_distances

    report_run(lambda: run_distances(input_url, output_url, solver, exe, pairs=pairs, tile=tile,
                                     storage_options=storage_options,
                                     output_storage_options=output_storage_options,
                                     stream=None if quiet else sys.stderr),
               quiet, as_json, summary_text)


def summary_text(report) -> str:
    """The end-of-job summary: counts, throughput, where the distances are."""
    c = report.counts
    out = report.output
    return "\n".join([
        f"raybary distances: {report.n_problems} pairs in {report.n_shards} shards "
        f"({'complete' if report.complete else 'INCOMPLETE'})",
        f"  status       ok {c.get('ok', 0)}, invalid {c.get('invalid', 0)}, "
        f"failed {c.get('failed', 0)}",
        f"  this run     {report.problems_run} pairs ({report.shards_run} shards) in "
        f"{report.wall_s:.1f} s = {report.problems_per_s:.1f} pairs/s on {report.actors} actors"
        + (f"; {report.shards_skipped} shards committed earlier were kept"
           if report.shards_skipped else ""),
        f"  results      {out}/distances/ (one row per pair: i, j, mw2, converged, status, "
        "error)",
        f"  read them    python: raybary.read_distances({out!r}).matrix()",
    ])


def register(group: click.Group) -> None:
    """Add ``distances`` to ``group``."""
    group.add_command(distances_cmd)
