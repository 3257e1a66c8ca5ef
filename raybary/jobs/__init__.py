"""Running raybary as Ray jobs: submit, follow, inspect and stop them.

A *job* runs ``raybary run INPUT OUTPUT ... --address auto`` (through
:mod:`raybary.cli.job_entry`) on a Ray cluster, submitted over HTTP to the
head node's dashboard with Ray's Jobs API (``JobSubmissionClient``). Data
never pass through the submitting machine: the job's driver and actors read
the input store and write the results themselves, so the cluster must reach
the storage (``s3://``, ``gs://``, or a shared file system).

* :mod:`raybary.jobs.auth` — the Ray token sent with every request
  (``--token`` / ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``);
* :mod:`raybary.jobs.runtime` — the job's runtime environment (env vars such
  as JAX's GPU memory settings, optional shipped source and pip requirements)
  and its entrypoint command; ``jobs/*.yaml`` in the repository are the same
  environments for use with ``ray job submit``;
* :mod:`raybary.jobs.client` — submit / status / logs / stop / follow, with
  clear :class:`JobsError` messages.

What runs on the cluster, :mod:`raybary.cli.job_entry`, lives with the CLI
whose ``raybary run`` it runs (nothing here imports the CLI).

The CLI (``raybary submit | status | logs | stop``) is a thin layer over
these; see ``docs/cluster.md``.
"""

from __future__ import annotations

from raybary.jobs.client import (
    JobsClient,
    JobsError,
    connect,
)
from raybary.jobs.runtime import DEFAULT_ENV_VARS, build_runtime_env, entrypoint_command

__all__ = [
    "JobsClient",
    "JobsError",
    "connect",
    "DEFAULT_ENV_VARS",
    "build_runtime_env",
    "entrypoint_command",
]
