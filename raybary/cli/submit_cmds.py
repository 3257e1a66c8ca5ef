"""``raybary submit | status | logs | stop``: raybary runs as Ray jobs.

Thin click commands over :mod:`raybary.jobs`. ``submit`` takes the same
INPUT OUTPUT and options as ``raybary run`` (parsed here by ``run``'s own
parser and passed on in long form) plus its own options for the
connection, the runtime environment and ``--wait``.
"""

from __future__ import annotations

import functools
import sys
from urllib.parse import urlparse

import click

from raybary.cli.errors import user_errors
from raybary.cli.storage_flags import FLAG_PARAMS
from raybary.storage._fs import absolute_local

_ADDRESS_HELP = ("The head node's dashboard, http://HEAD:8265 [env RAY_API_SERVER_ADDRESS; "
                 "default http://127.0.0.1:8265].")


def _connection_options(fn):
    @click.option("--address", "address", default=None, metavar="URL", help=_ADDRESS_HELP)
    @click.option("--token", "token", default=None, envvar="RAY_AUTH_TOKEN", show_envvar=True,
                  help="Ray authentication token (clusters started with RAY_AUTH_MODE=token). "
                       "Default: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or "
                       "~/.ray/auth_token.")
    @click.option("--token-file", "token_file", default=None, metavar="PATH",
                  help="Read the token from this file [env RAY_AUTH_TOKEN_PATH].")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def _client(address, token, token_file):
    from raybary.jobs.client import connect

    return connect(address, token=token, token_file=token_file)


# ------------------------------------------------------------------ run arguments
def _split_run_args(args: tuple[str, ...],
                    command: str = "run") -> tuple[str, str, list[str], dict]:
    """Check ``args`` against ``raybary run`` (or ``command``, e.g. ``distances``);
    return ``(INPUT, OUTPUT, options, storage)``.

    Rule: ``run``'s own click parser reads ``args`` (any spelling click takes:
    ``-qn 3``, ``-n3``, ``--bar-size=3``, options anywhere, ``--``) and the
    options are written back in long form, each once, in the order given.
    Reason: a second, hand-written parser would drift from click's. The
    storage options are not among them: ``storage`` holds them as ``run``
    parsed them (``storage_options``, ``output_storage_options``), for the
    job's environment (its entrypoint is shown to anyone who lists jobs).
    """
    from raybary.cli import main

    run_cmd = main.commands[command]
    try:
        ctx = run_cmd.make_context(f"raybary {command}", list(args), resilient_parsing=False)
    except click.exceptions.Exit:  # --help
        raise
    except click.UsageError as e:
        raise click.UsageError(f"{e.format_message()} (options of `raybary {command}`, see "
                               f"`raybary {command} --help`)") from None
    given, _, order = run_cmd.make_parser(ctx).parse_args(list(args))
    if "address" in given:
        raise click.UsageError("--address is the dashboard of the cluster to submit to; the job's "
                               "run always joins that cluster")
    options = []
    for param in dict.fromkeys(order):  # each parameter once, where it was first given
        if isinstance(param, click.Option) and param.name not in FLAG_PARAMS:
            options += _option_tokens(param, given[param.name])
    storage = {k: v for k, v in ctx.params.items() if k in FLAG_PARAMS}
    return given["input_url"], given["output_url"], options, storage


def _option_tokens(param: click.Option, value) -> list[str]:
    """``param`` with ``value`` (as click's parser returned it) as tokens in long form.

    Rule: a boolean flag is its on or off switch, a count repeats, a value
    option is its name and value(s). Reason: the job's ``raybary run`` parses
    these tokens back to the same value.
    """
    if param.count:
        return [_long(param.opts)] * int(value)
    if param.is_flag:
        return [_long(param.secondary_opts if not value and param.secondary_opts
                      else param.opts)]
    values = value if param.multiple else [value]
    return [tok for v in values
            for tok in (_long(param.opts), *(v if param.nargs > 1 else [v]))]


def _long(names: list[str]) -> str:
    """The longest of an option's names (``--bar-size`` over ``-n``)."""
    return max(names, key=len)


def _is_local_path(url: str) -> bool:
    return "://" not in url


def _cluster_path(url: str, address: str) -> str:
    """A local path as the cluster will see it (absolute), with a note if the cluster is remote."""
    if not _is_local_path(url):
        return url
    path = absolute_local(url)
    host = urlparse(address).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"note: {url} is a local path; the cluster's nodes must see it at {path} "
                   "(a shared file system), else use s3://, gs://, ...", err=True)
    return path


def _env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", param_hint="--env")
        k, val = v.split("=", 1)
        out[k] = val
    return out


# ------------------------------------------------------------------ submit
@click.command("submit", context_settings={"ignore_unknown_options": True,
                                           "help_option_names": ["-h", "--help"]})
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED, metavar="INPUT OUTPUT [RUN OPTIONS]")
@_connection_options
@click.option("--distances", is_flag=True,
              help="Submit `raybary distances INPUT OUTPUT [DISTANCES OPTIONS]` (a distance "
                   "job over a GMM store) instead of `raybary run`.")
@click.option("--wait", is_flag=True,
              help="Follow the job's logs (with the run's progress) until it ends; exit 0 if "
                   "it succeeded, 1 if it failed or was stopped.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="With --wait: stop waiting after this long (the job keeps running; exit 3).")
@click.option("--job-id", default=None, help="Submission id [default: raybary-DATE-TIME-xxxxxx].")
@click.option("--runtime-env", "runtime_env_file", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False),
              help="Start from this runtime environment (YAML/JSON, e.g. jobs/runtime_env.yaml).")
@click.option("--ship-source", is_flag=True,
              help="Ship this machine's raybary package with the job (py_modules), for "
                   "clusters without raybary or with an older one. Its dependencies must be "
                   "on the cluster or given with --pip.")
@click.option("--pip", "pip", multiple=True, metavar="REQUIREMENT",
              help="pip requirement installed for the job (repeatable), e.g. "
                   "--pip 'raybary[gpu] @ git+https://...' or --pip s3fs.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Environment variable for the job and its actors (repeatable).")
@click.option("--working-dir", default=None, metavar="DIR",
              help="Ship this directory as the job's working directory.")
@click.option("--entrypoint-cpus", type=click.FloatRange(min=0), default=None,
              help="CPUs reserved for the job's driver [default: 0, it only hands out shards].")
@click.option("--python", "python", default="python", show_default=True,
              help="The Python on the cluster that runs the entrypoint.")
@click.option("--dry-run", is_flag=True,
              help="Print the entrypoint and runtime environment; submit nothing.")
@user_errors()
def submit_cmd(run_args, address, token, token_file, distances, wait, timeout, job_id,
               runtime_env_file, ship_source, pip, env, working_dir, entrypoint_cpus, python,
               dry_run):
    """Submit `raybary run INPUT OUTPUT [RUN OPTIONS]` to a Ray cluster as a job.

    INPUT and OUTPUT are read and written by the cluster: use URLs (s3://,
    gs://) or paths on a file system the nodes share. Prints the job id.

    \b
      raybary submit s3://b/batch.zarr s3://b/out --address http://localhost:8265 \\
          --gpus-per-actor 1 --bar-size 6 --wait
      raybary status JOB_ID   |   raybary logs JOB_ID --follow   |   raybary stop JOB_ID

    RUN OPTIONS are those of `raybary run` (--bar-size, --epsilon,
    --relative-epsilon, --restarts, --learn-weights, --dtype, --grid,
    --grid-bounds, --grid-dims, --actors, --gpus-per-actor, --shard-size,
    --overwrite, ...); the job's run joins the cluster it runs on.
    --storage-option / --output-storage-option reach the job through its
    runtime environment (RAYBARY_STORAGE_OPTIONS), not its entrypoint.
    With --distances, INPUT is a GMM store and the options are those of
    `raybary distances` (--pairs, --tile, --epsilon, ...).
    """
    import json

    from raybary.jobs.client import (
        TERMINAL,
        JobsError,
        describe,
        failure_reason,
        normalize_address,
    )
    from raybary.jobs.runtime import (
        build_runtime_env,
        entrypoint_command,
        load_runtime_env,
        redacted_runtime_env,
        with_storage_env,
    )

    command = "distances" if distances else "run"
    input_url, output_url, rest, storage = _split_run_args(run_args, command)
    addr = normalize_address(address)
    input_url, output_url = _cluster_path(input_url, addr), _cluster_path(output_url, addr)
    try:
        base = load_runtime_env(runtime_env_file) if runtime_env_file else None
        runtime_env = build_runtime_env(env_vars=_env_pairs(env), base=base,
                                        ship_source=ship_source, pip=pip,
                                        working_dir=working_dir)
    except (OSError, ValueError) as e:
        raise JobsError(f"runtime environment: {e}") from None
    if dry_run:
        shown = with_storage_env(runtime_env, **storage)
        click.echo(json.dumps({"address": addr,
                               "entrypoint": entrypoint_command(input_url, output_url, rest,
                                                                python=python,
                                                                command=command),
                               "runtime_env": redacted_runtime_env(shown)}, indent=2))
        return
    client = _client(address, token, token_file)
    jid = client.submit(input_url, output_url, rest, runtime_env=runtime_env, job_id=job_id,
                        entrypoint_num_cpus=entrypoint_cpus, python=python,
                        command=command, **storage)
    click.echo(jid)
    where = f" --address {client.address}" if address else ""
    if not wait:
        click.echo(f"submitted to {client.address}; follow it with: raybary logs {jid} --follow"
                   f"{where}", err=True)
        return
    click.echo(f"submitted to {client.address}; following its logs (Ctrl-C stops following, "
               "not the job)", err=True)
    try:
        info = client.follow(jid, _write, timeout_s=timeout)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job goes on: raybary status {jid}{where}  "
                   f"(raybary stop {jid}{where} to stop it)", err=True)
        sys.exit(130)
    status = getattr(info.status, "value", str(info.status))
    logs = client.logs(jid) if status in ("FAILED", "STOPPED") else None
    click.echo(describe(info, logs), err=True)
    if status == "SUCCEEDED":
        return
    if status not in TERMINAL:
        click.echo(f"still {status} after {timeout:g} s", err=True)
        sys.exit(3)
    raise click.ClickException(f"job {jid} {status.lower()}: {failure_reason(info, logs)}")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ------------------------------------------------------------------ status / logs / stop
@click.command("status")
@click.argument("job_id", required=False)
@_connection_options
@user_errors()
def status_cmd(job_id, address, token, token_file):
    """Show a job's status (and why it failed); without JOB_ID, list the cluster's jobs."""
    client = _client(address, token, token_file)
    if job_id is None:
        jobs = client.list()
        if not jobs:
            click.echo(f"no jobs on {client.address}")
            return
        from raybary.jobs.client import _when

        for j in jobs:
            status = getattr(j.status, "value", str(j.status))
            entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
            click.echo(f"{j.submission_id or j.job_id:36}  {status:9}  {_when(j.start_time)}  "
                       f"{entry}")
        return
    from raybary.jobs.client import describe

    info = client.info(job_id)
    status = getattr(info.status, "value", str(info.status))
    logs = client.logs(job_id) if status != "SUCCEEDED" else None
    click.echo(describe(info, logs))


@click.command("logs")
@click.argument("job_id")
@_connection_options
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
@user_errors()
def logs_cmd(job_id, address, token, token_file, follow):
    """Print a job's logs (the driver's output, with the run's progress and errors)."""
    client = _client(address, token, token_file)
    if follow:
        try:
            client.follow(job_id, _write)
        except KeyboardInterrupt:
            sys.exit(130)
        return
    _write(client.logs(job_id))


@click.command("stop")
@click.argument("job_id")
@_connection_options
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              metavar="SECONDS", help="Wait this long for the job to stop.")
@user_errors()
def stop_cmd(job_id, address, token, token_file, wait_s):
    """Stop a running job (committed shards stay; re-submitting resumes)."""
    client = _client(address, token, token_file)
    before = client.status(job_id)
    if before in ("SUCCEEDED", "FAILED", "STOPPED"):
        click.echo(f"job {job_id} already ended: {before}")
        return
    status = client.stop(job_id, wait_s=wait_s)
    click.echo(f"job {job_id}: {status}" + ("" if status == "STOPPED" else
                                             " (stop requested; check with raybary status)"))


def register(group: click.Group) -> None:
    for cmd in (submit_cmd, status_cmd, logs_cmd, stop_cmd):
        group.add_command(cmd)
