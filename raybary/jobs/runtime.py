"""A raybary job's runtime environment and entrypoint command.

The defaults suit a cluster where raybary is installed on every node (as
``cluster.yaml`` does): only environment variables are set. For a cluster
without raybary, :func:`build_runtime_env` can ship this machine's raybary
package (``py_modules``) and add pip requirements, or take a whole runtime
environment from a YAML/JSON file (``jobs/runtime_env*.yaml``).

The environment variables (:data:`DEFAULT_ENV_VARS`) apply to the job's driver
and, by Ray's runtime-env inheritance, to its actors (the runner adds its own
per-actor settings on top, e.g. ``XLA_PYTHON_CLIENT_MEM_FRACTION`` for
fractional GPUs):

* ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` — JAX would otherwise take 75 % of
  a GPU's memory in every process that touches it;
* ``RAYBARY_JAX_CACHE`` — JAX's persistent compilation cache, node-local, so a
  new actor (or the next job) on a node does not recompile the solver;
* ``PYTHONUNBUFFERED=1`` — logs (and the runner's progress) reach
  ``raybary logs`` / ``--wait`` as they are written.

Storage options (``raybary submit --storage-option KEY=VALUE``) reach the job
as JSON in ``RAYBARY_STORAGE_OPTIONS`` / ``RAYBARY_OUTPUT_STORAGE_OPTIONS``
(:func:`storage_env_vars`), which the job's ``raybary run`` reads: never in
the entrypoint (shown by ``raybary status``, ``ray job list``, the
dashboard's job table). :func:`redacted_runtime_env` is what may be printed.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_ENV_VARS",
    "SOURCE_EXCLUDES",
    "ENTRYPOINT_MODULE",
    "build_runtime_env",
    "load_runtime_env",
    "entrypoint_command",
    "raybary_package_dir",
    "storage_env_vars",
    "with_storage_env",
    "redacted_runtime_env",
]

DEFAULT_ENV_VARS: dict[str, str] = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "RAYBARY_JAX_CACHE": "/tmp/raybary-jax-cache",
    "PYTHONUNBUFFERED": "1",
}

#: Secrets that must never be uploaded to a cluster (gitignore syntax).
SECRET_EXCLUDES = [
    ".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "*.p12", "*.pfx",
    ".aws/", ".ssh/", ".gcloud/", ".config/gcloud/", ".azure/", ".kube/", ".docker/config.json",
    ".netrc", ".pypirc", ".git-credentials", "auth_token", "*token*.txt", "*.token",
    "credentials*.json", "service-account*.json",
]

#: Never shipped with ``py_modules`` / ``working_dir`` (gitignore syntax, as Ray uses).
SOURCE_EXCLUDES = [
    "__pycache__", "*.pyc", ".git", ".venv", ".pytest_cache", ".ruff_cache", ".hypothesis",
    ".jax_cache", "*.egg-info", "/build", "/dist", "/data", "/out*", "*.parquet", "*.zarr",
    *SECRET_EXCLUDES,
]

#: The module a job runs (it lives with the CLI: a job runs ``raybary run``).
ENTRYPOINT_MODULE = "raybary.cli.job_entry"


def raybary_package_dir() -> Path:
    """The directory of the ``raybary`` package this process imports."""
    import raybary

    return Path(raybary.__file__).resolve().parent


def load_runtime_env(path: str | Path) -> dict:
    """A runtime environment from a YAML (``.yaml``/``.yml``) or JSON file.

    As with ``ray job submit --runtime-env``, relative local paths in it
    (``working_dir``, ``py_modules``) are relative to the current directory.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a runtime environment must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, extra: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if key == "env_vars":
            out.setdefault("env_vars", {}).update({str(k): str(v) for k, v in value.items()})
        elif key in ("pip", "py_modules") and isinstance(value, list) and \
                isinstance(out.get(key), list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        elif key == "excludes" and isinstance(value, list):
            out[key] = sorted(set(out.get(key, [])) | set(value))
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_runtime_env(
    *,
    env_vars: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    ship_source: bool = False,
    pip: Sequence[str] = (),
    working_dir: str | None = None,
) -> dict:
    """The job's runtime environment.

    Args:
      env_vars: added to (and overriding) :data:`DEFAULT_ENV_VARS`.
      base: a runtime environment to start from (e.g. :func:`load_runtime_env`);
        its ``env_vars`` override the defaults, ``env_vars`` override both.
      ship_source: ship this machine's ``raybary`` package (``py_modules``); it
        shadows any raybary installed on the cluster. Its dependencies must
        be there already, or be listed in ``pip``.
      pip: pip requirements installed for the job (in a virtualenv Ray caches
        per requirement set on each node; needs the nodes to reach PyPI).
      working_dir: a local directory (or remote URI) to ship as the job's
        working directory, without :data:`SOURCE_EXCLUDES`.
    """
    env: dict[str, Any] = {"env_vars": dict(DEFAULT_ENV_VARS)}
    if base:
        env = _merge(env, base)
    if ship_source:
        env = _merge(env, {"py_modules": [str(raybary_package_dir())]})
        env = _merge(env, {"excludes": SOURCE_EXCLUDES})
    if pip:
        if "conda" in env:
            raise ValueError("the runtime environment has 'conda'; Ray does not allow 'pip' with it")
        current = env.get("pip")
        if isinstance(current, dict):
            packages = list(current.get("packages", []))
            env["pip"] = {**current, "packages": packages + [p for p in pip if p not in packages]}
        else:
            env = _merge(env, {"pip": list(current or [])})
            env["pip"] = env["pip"] + [p for p in pip if p not in env["pip"]]
    if working_dir:
        env["working_dir"] = working_dir
        env = _merge(env, {"excludes": SOURCE_EXCLUDES})
    if env_vars:
        env = _merge(env, {"env_vars": dict(env_vars)})
    return env


def storage_env_vars(storage_options: Mapping[str, Any] | None = None,
                     output_storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The job's environment variables that carry storage options: JSON objects in
    ``RAYBARY_STORAGE_OPTIONS`` (input and output) and, if given,
    ``RAYBARY_OUTPUT_STORAGE_OPTIONS`` (the output's instead). Empty options
    set nothing (the cluster's own configuration applies)."""
    from raybary.storage.options import ENV_VAR, OUTPUT_ENV_VAR, StorageOptions

    out = {}
    if storage_options:
        out[ENV_VAR] = StorageOptions.of(storage_options).to_json()
    if output_storage_options is not None:
        out[OUTPUT_ENV_VAR] = StorageOptions.of(output_storage_options).to_json()
    return out


def with_storage_env(runtime_env: Mapping[str, Any],
                     storage_options: Mapping[str, Any] | None = None,
                     output_storage_options: Mapping[str, Any] | None = None) -> dict:
    """``runtime_env`` with :func:`storage_env_vars` added to its ``env_vars``
    (over any it sets: the options given win)."""
    out = copy.deepcopy(dict(runtime_env))
    extra = storage_env_vars(storage_options, output_storage_options)
    if extra:
        out["env_vars"] = {**(out.get("env_vars") or {}), **extra}
    return out


def redacted_runtime_env(runtime_env: Mapping[str, Any]) -> dict:
    """``runtime_env`` as it may be printed: the storage-option variables show
    their keys with ``***`` for every value."""
    from raybary.storage.options import ENV_VAR, INPUT_ENV_VAR, OUTPUT_ENV_VAR

    out = copy.deepcopy(dict(runtime_env))
    env = out.get("env_vars") or {}
    for name in (ENV_VAR, OUTPUT_ENV_VAR, INPUT_ENV_VAR):
        if name in env:
            try:
                keys = sorted(json.loads(env[name]))
            except (ValueError, TypeError):
                keys = []
            env[name] = json.dumps({k: "***" for k in keys}) if keys else "***"
    return out


def entrypoint_command(input_url: str, output_url: str, run_args: Iterable[str] = (),
                       *, python: str = "python", command: str = "run") -> str:
    """The shell command the job runs: ``python -m raybary.cli.job_entry INPUT OUTPUT ARGS``
    for ``raybary run``; ``... job_entry distances INPUT OUTPUT ARGS`` for
    ``command="distances"`` (``raybary distances``).

    ``run_args`` are options of that command (passed through unchanged; the
    entrypoint adds ``--address auto`` so the run joins the job's cluster).
    """
    named = [] if command == "run" else [command]
    parts = [python, "-m", ENTRYPOINT_MODULE, *named, input_url, output_url, *run_args]
    return " ".join(shlex.quote(str(p)) for p in parts)
