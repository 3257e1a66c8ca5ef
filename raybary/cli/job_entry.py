"""What a raybary job runs on the cluster: ``raybary run`` joined to the job's Ray.

    python -m raybary.cli.job_entry INPUT OUTPUT [raybary run options]
    python -m raybary.cli.job_entry distances INPUT OUTPUT [raybary distances options]

It prints a short header (versions, host) to the job's log and runs
``raybary run`` with ``--address auto`` unless an address is given, exiting
with its status: 0 when every problem is accounted for, 1 when the run could
not complete (e.g. an unreadable input, reported as ``Error: ...``), 2 for
bad options.

Inside a job Ray sets ``RAY_ADDRESS`` to the job's cluster, which a plain
``raybary run`` joins too (``ray job submit -- raybary run IN OUT`` works
alike); ``--address auto`` adds only that, outside a job, the entry point
fails where it finds no cluster instead of starting a private Ray.

It lives with the CLI, whose ``run`` it runs: :mod:`raybary.jobs` only
builds this command (:func:`raybary.jobs.runtime.entrypoint_command`), so no
layer below the CLI imports it.
"""

from __future__ import annotations

import os
import platform
import sys

#: Commands other than ``run`` a job runs, named first (a submitted INPUT is an
#: absolute path or a URL, never one of these words).
COMMANDS = ("distances",)


def _header(argv: list[str], command: str = "run") -> str:
    import ray

    import raybary

    where = os.path.dirname(os.path.abspath(raybary.__file__))
    return (f"raybary job: raybary {raybary.__version__} ({where}), ray {ray.__version__}, "
            f"python {platform.python_version()} on {platform.node()}\n"
            f"raybary {command} {' '.join(argv)}")


def with_address(argv: list[str]) -> list[str]:
    """``argv`` plus ``--address auto`` unless it names an address."""
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        return list(argv)
    return [*argv, "--address", "auto"]


def main(argv: list[str] | None = None) -> None:
    """Print the header, then run ``raybary run ARGV --address auto`` (``raybary
    distances`` where ARGV starts with ``distances``); exits with its status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    argv = with_address(argv)
    print(_header(argv, command), flush=True)
    from raybary.cli import main as cli

    cli.main(args=[command, *argv], prog_name="raybary")


if __name__ == "__main__":
    main()
