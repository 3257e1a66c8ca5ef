"""What a raybary job runs on the cluster: ``raybary run`` joined to the job's Ray.

    python -m raybary.cli.job_entry INPUT OUTPUT [raybary run options]

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


def _header(argv: list[str]) -> str:
    import ray

    import raybary

    where = os.path.dirname(os.path.abspath(raybary.__file__))
    return (f"raybary job: raybary {raybary.__version__} ({where}), ray {ray.__version__}, "
            f"python {platform.python_version()} on {platform.node()}\n"
            f"raybary run {' '.join(argv)}")


def with_address(argv: list[str]) -> list[str]:
    """``argv`` plus ``--address auto`` unless it names an address."""
    if any(a == "--address" or a.startswith("--address=") for a in argv):
        return list(argv)
    return [*argv, "--address", "auto"]


def main(argv: list[str] | None = None) -> None:
    """Print the header, then run ``raybary run ARGV --address auto``; exits with its status."""
    argv = with_address(list(sys.argv[1:] if argv is None else argv))
    print(_header(argv), flush=True)
    from raybary.cli import main as cli

    cli.main(args=["run", *argv], prog_name="raybary")


if __name__ == "__main__":
    main()
