"""Submit, follow, inspect and stop raybary jobs through Ray's Jobs API.

:func:`connect` returns a :class:`JobsClient` (a ``JobSubmissionClient`` that
sends the Ray token, see :mod:`raybary.jobs.auth`). Every failure a user can
cause or fix — unreachable dashboard, missing or wrong token, unknown job id —
comes out as a :class:`JobsError` whose message says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import os
import re
import textwrap
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from raybary.errors import RaybaryError
from raybary.jobs.auth import Token, TokenError, auth_headers, resolve_token
from raybary.jobs.runtime import build_runtime_env, entrypoint_command, with_storage_env

__all__ = ["JobsError", "JobsClient", "connect", "DEFAULT_ADDRESS", "TERMINAL",
           "failure_reason", "environment_hint", "describe", "new_job_id"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_TOKEN_HELP = ("pass --token TOKEN, set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH to a file "
               "holding it), or save it as ~/.ray/auth_token; `ray get-auth-token` prints it "
               "on the head node")


class JobsError(RaybaryError):
    """A job operation failed for a reason the user can act on (the message says how)."""


def normalize_address(address: str | None) -> str:
    """``http://HOST:PORT`` of the dashboard: the argument, ``$RAY_API_SERVER_ADDRESS``,
    or :data:`DEFAULT_ADDRESS`; ``HOST:PORT`` gets ``http://``."""
    address = (address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS).strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address must be the dashboard's http(s)://HOST:PORT (port 8265 by "
                        f"default), got {address!r}")
    return address


def new_job_id() -> str:
    """A readable, unique submission id: ``raybary-YYYYmmdd-HHMMSS-xxxxxx``."""
    now = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"raybary-{now}-{uuid.uuid4().hex[:6]}"


class JobsClient:
    """Ray's ``JobSubmissionClient`` with raybary's entrypoint, defaults and error messages."""

    def __init__(self, client, address: str, token: Token | None) -> None:
        self._client = client
        self.address = address
        self.token = token

    # ------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        try:
            yield
        except JobsError:
            raise
        except Exception as e:  # Ray raises RuntimeError / ConnectionError / AuthenticationError
            raise _translate(e, self.address, self.token, job_id) from e

    # ------------------------------------------------------------ submit
    def submit(
        self,
        input_url: str,
        output_url: str,
        run_args: Sequence[str] = (),
        *,
        runtime_env: Mapping[str, Any] | None = None,
        job_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
        python: str = "python",
        storage_options: Mapping[str, Any] | None = None,
        output_storage_options: Mapping[str, Any] | None = None,
        command: str = "run",
    ) -> str:
        """Submit ``raybary run INPUT OUTPUT RUN_ARGS`` as a job; return its id
        (``command="distances"``: ``raybary distances INPUT OUTPUT ARGS``).

        ``runtime_env`` defaults to :func:`~raybary.jobs.runtime.build_runtime_env` ``()``.
        Local directories in it (``py_modules``, ``working_dir``) are uploaded
        by Ray to the cluster. ``storage_options`` (and ``output_storage_options``,
        the output's instead) go to the job's run through its runtime
        environment (:func:`~raybary.jobs.runtime.storage_env_vars`), never
        through the entrypoint.
        """
        from raybary import __version__

        job_id = job_id or new_job_id()
        from raybary.storage._fs import has_credentials, redact_url

        meta = {"raybary_version": __version__, "raybary_command": command,
                "input": redact_url(input_url), "output": redact_url(output_url)}
        for url in (input_url, output_url):
            if has_credentials(url):
                warnings.warn(f"{redact_url(url)}: credentials in a URL are visible in the job's "
                              "entrypoint on the cluster (dashboard, job list); give them to the "
                              "storage's own credential chain instead (environment, instance "
                              "role, config file)", stacklevel=2)
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        env = with_storage_env(runtime_env if runtime_env is not None else build_runtime_env(),
                               storage_options, output_storage_options)
        with self._errors(job_id):
            return self._client.submit_job(
                entrypoint=entrypoint_command(input_url, output_url, run_args, python=python,
                                              command=command),
                submission_id=job_id,
                runtime_env=env,
                metadata=meta,
                entrypoint_num_cpus=entrypoint_num_cpus,
            )

    # ------------------------------------------------------------ inspect
    def info(self, job_id: str):
        """Ray's ``JobDetails`` of ``job_id`` (status, message, times, metadata, ...)."""
        with self._errors(job_id):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        return str(_status_name(self.info(job_id).status))

    def logs(self, job_id: str) -> str:
        """Everything the job's driver wrote so far (stdout and stderr)."""
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def list(self) -> list:
        """All jobs of the cluster, oldest first."""
        with self._errors():
            jobs = self._client.list_jobs()
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def stop(self, job_id: str, *, wait_s: float = 0.0) -> str:
        """Ask Ray to stop ``job_id``; return its status afterwards (waiting up to ``wait_s``)."""
        info = self.info(job_id)
        if _status_name(info.status) in TERMINAL:
            return _status_name(info.status)
        with self._errors(job_id):
            self._client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while True:
            status = self.status(job_id)
            if status in TERMINAL or time.monotonic() >= deadline:
                return status
            time.sleep(0.5)

    def follow(self, job_id: str, write: Callable[[str], Any], *, poll_s: float = 1.0,
               timeout_s: float | None = None):
        """Stream the job's logs to ``write`` until it ends; return its final ``JobDetails``.

        Uses Ray's log stream (a websocket); if that is unavailable (a proxy,
        an old server), polls the logs instead. ``timeout_s``: give up waiting
        (the job keeps running) and return the details as they are.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen = 0
        streamed = False

        def counted(text: str) -> None:
            nonlocal seen
            seen += len(text)
            write(text)

        if deadline is None:
            try:
                asyncio.run(self._tail(job_id, counted))
                streamed = True
            except JobsError:
                raise
            except Exception:  # no log stream (proxy, old server): poll from where it broke
                streamed = False
        while True:
            info = self.info(job_id)
            done = _status_name(info.status) in TERMINAL
            if not streamed or done:
                text = self.logs(job_id)
                if not streamed and len(text) > seen:
                    write(text[seen:])
                    seen = len(text)
            if done or (deadline is not None and time.monotonic() >= deadline):
                return info
            time.sleep(poll_s)

    async def _tail(self, job_id: str, write: Callable[[str], Any]) -> None:
        import logging

        # Ray logs "WebSocket closed ..." at INFO when the stream ends.
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
        with self._errors(job_id):
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)


def _status_name(status) -> str:
    return getattr(status, "value", None) or str(status)


def _translate(e: Exception, address: str, token: Token | None, job_id: str | None) -> JobsError:
    text = str(e)
    name = type(e).__name__
    if name == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
        if token is None or "Authentication required" in text or "401" in text:
            return JobsError(f"the Ray cluster at {address} requires an authentication token "
                             f"and none was sent: {_TOKEN_HELP}")
        return JobsError(f"the Ray cluster at {address} refused the token from {token.source}; "
                         f"{_TOKEN_HELP}")
    if isinstance(e, ConnectionError) or name in ("ConnectionError", "ClientConnectorError") or \
            "Failed to connect" in text or "Connection refused" in text:
        return JobsError(f"cannot reach the Ray dashboard at {address}: is the head node up with "
                         "its dashboard (ray start --head --include-dashboard=true), and is the "
                         "port reachable from here (for cluster.yaml: `ray dashboard "
                         "cluster.yaml`, then --address http://localhost:8265)?")
    if job_id and ("404" in text or "does not exist" in text):
        return JobsError(f"no job {job_id!r} on {address} (`raybary status --address {address}` "
                         "lists the jobs)")
    if "already exists" in text and job_id:
        return JobsError(f"a job with id {job_id!r} already exists on {address}; choose another "
                         "--job-id")
    return JobsError(f"{name} from the Ray Jobs API at {address}: {text}")


def insecure_token_warning(address: str, token: Token | None) -> str | None:
    """A warning when a token would cross the network unencrypted: plain
    ``http://`` to a host that is not this machine's loopback."""
    import ipaddress
    from urllib.parse import urlsplit

    if token is None:
        return None
    parts = urlsplit(address)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local:
        return None
    return (f"the Ray token (from {token.source}) is sent unencrypted over http:// to {host}; "
            "anyone on the path can read it. Use https:// (a TLS proxy in front of the "
            "dashboard) or an SSH tunnel to localhost.")


def connect(address: str | None = None, *, token: str | None = None,
            token_file: str | None = None) -> JobsClient:
    """A :class:`JobsClient` for the dashboard at ``address`` (see :func:`normalize_address`).

    The token is resolved by :func:`raybary.jobs.auth.resolve_token`.
    """
    address = normalize_address(address)
    try:
        tok = resolve_token(token, token_file)
    except TokenError as e:
        raise JobsError(str(e)) from None
    insecure = insecure_token_warning(address, tok)
    if insecure:
        warnings.warn(insecure, stacklevel=2)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - ray[default] is a dependency
        raise JobsError(f"submitting jobs needs ray[default] ({e})") from None
    try:
        client = JobSubmissionClient(address, headers=auth_headers(tok))
    except Exception as e:
        raise _translate(e, address, tok, None) from e
    return JobsClient(client, address, tok)


# ------------------------------------------------------------------ reporting
def _exception_line(logs: str) -> str | None:
    """The ``module.Class: message`` line closing the last traceback in ``logs``."""
    start = logs.rfind("Traceback (most recent call last):")
    if start < 0:
        return None
    for line in logs[start:].splitlines()[1:]:
        if line and not line[0].isspace() and not line.startswith("^"):
            return line.strip()
    return None


def failure_reason(info, logs: str | None) -> str | None:
    """Why a job failed, in one line: the last ``Error: ...`` line of its logs (how
    raybary's CLI reports a failure), else the exception that ended the last
    traceback, else the last line saying that Python found no module (``python
    -m`` prints no traceback for that), else the first line of Ray's message;
    ``None`` unless the job failed or was stopped."""
    status = _status_name(info.status)
    if status not in ("FAILED", "STOPPED"):
        return None
    if logs:
        own = re.findall(r"^Error: (.+)$", logs, flags=re.MULTILINE)
        if own:
            return own[-1].strip()
        exc = _exception_line(logs)
        if exc:
            return exc
        missing = re.findall(r"^.*No module named .*$", logs, flags=re.MULTILINE)
        if missing:
            return missing[-1].strip()
    message = (info.message or "").strip()
    return message.splitlines()[0] if message else status.lower()


# ``No module named 'ray'`` (an import) or ``No module named raybary`` (``python -m``),
# not a submodule: the job's Python lacks the package itself.
_NO_PACKAGE = re.compile(r"No module named '?(raybary|ray)'?(?![\w.])")
# The package is there but has no job entry module: an older raybary.
_NO_ENTRY = re.compile(r"No module named '?raybary\.cli(?:\.job_entry)?'?(?![\w.])")


def environment_hint(logs: str | None) -> str | None:
    """What to do when a job's logs show that it ran under a Python without ray or
    raybary (or with a raybary older than this one), else ``None``.

    The usual cause: the head was started from a virtual environment that is
    not on its ``PATH`` (``/path/venv/bin/ray start --head`` without activating
    it), so the job's ``python`` is another one.
    """
    if not logs:
        return None
    found = _NO_PACKAGE.search(logs)
    if found:
        return (f"the job ran under a Python without {found.group(1)}: the head runs a job's "
                "entrypoint with the `python` found on the PATH the head was started with, "
                "so a head started from a virtual environment that is not on its PATH runs "
                "jobs under another Python. Fix: start the head with that environment "
                "activated (`source /path/venv/bin/activate && ray start --head ...`, or "
                "`PATH=/path/venv/bin:$PATH ray start --head ...`), or name the Python "
                "(`raybary submit ... --python /path/venv/bin/python`), or give the job "
                "its packages with a runtime environment (`--runtime-env "
                "jobs/runtime_env.source.yaml`, or `--pip PACKAGE`).")
    if _NO_ENTRY.search(logs):
        from raybary import __version__

        return (f"the raybary on the cluster is older than this one ({__version__}) and has no "
                "raybary.cli.job_entry: ship this one with the job (`--ship-source`, or "
                "`--runtime-env jobs/runtime_env.source.yaml`), or upgrade raybary on the "
                "cluster's nodes.")
    return None


def last_progress(logs: str | None) -> str | None:
    """The runner's last progress line (``[raybary] 300/4000 problems ...``) in ``logs``."""
    if not logs:
        return None
    found = re.findall(r"^\[raybary\] (.+?)\s*$", logs.replace("\r", "\n"), flags=re.MULTILINE)
    return found[-1] if found else None


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def duration_s(info) -> float | None:
    if not info.start_time:
        return None
    end = info.end_time or time.time() * 1000
    return (end - info.start_time) / 1000.0


def describe(info, logs: str | None = None) -> str:
    """A few lines about a job (what ``raybary status JOB_ID`` prints): with
    ``logs``, also why it failed and the run's last progress line (how far a
    running, failed or stopped job got)."""
    status = _status_name(info.status)
    meta = info.metadata or {}
    lines = [f"job {info.submission_id or info.job_id}: {status}"]
    if meta.get("input") or meta.get("output"):
        lines.append(f"  input:      {meta.get('input', '-')}")
        lines.append(f"  output:     {meta.get('output', '-')}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    dur = duration_s(info)
    lines.append(f"  started:    {_when(info.start_time)}   ended: {_when(info.end_time)}"
                 + (f"   ({dur:.1f} s)" if dur is not None else ""))
    reason = failure_reason(info, logs)
    if reason:
        lines.append(f"  error:      {reason}")
    hint = environment_hint(logs) if status in ("FAILED", "STOPPED") else None
    if hint:
        lines.append(textwrap.fill(hint, width=100, initial_indent="  hint:       ",
                                   subsequent_indent=" " * 14, break_on_hyphens=False,
                                   break_long_words=False))
    progress = last_progress(logs)  # a running job's, or where a stopped one got to
    if progress:
        lines.append(f"  progress:   {progress}")
    message = (info.message or "").strip()
    if message:
        first = message.splitlines()[0]
        lines.append(f"  ray:        {first[:300]}")
    if status == "SUCCEEDED" and meta.get("output"):
        lines.append(f"  results:    raybary show {meta['output']}   |   "
                     f"raybary.read_results({meta['output']!r})")
    elif status not in TERMINAL:
        lines.append(f"  follow:     raybary logs {info.submission_id} --follow")
    return "\n".join(lines)
