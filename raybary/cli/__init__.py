"""Command-line interface: a thin click group; each command lives in its own module.

Every command reports the errors a user can act on the same way
(:mod:`raybary.cli.errors`); a Ray job runs ``raybary run`` through
:mod:`raybary.cli.job_entry`.
"""

from __future__ import annotations

import warnings

import click

from raybary import __version__


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"raybary: warning: {message}\n"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raybary")
def main() -> None:
    """raybary: Wasserstein barycenters of Gaussian mixtures, in batches, on Ray."""
    warnings.formatwarning = _one_line_warning  # what users see: one line, no source


def _register() -> None:
    from raybary.cli import (
        distances_cmds,
        plot_cmds,
        run_cmds,
        solve_cmds,
        storage_cmds,
        submit_cmds,
    )

    solve_cmds.register(main)
    storage_cmds.register(main)
    run_cmds.register(main)
    distances_cmds.register(main)
    plot_cmds.register(main)
    submit_cmds.register(main)


_register()
