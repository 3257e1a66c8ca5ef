"""Jobs: `raybary submit | status | logs | stop` against a real Ray head on loopback.

The head is started once for the module with ``ray start --head --block`` in a
process group we own (own ports, own --temp-dir, token authentication on:
``RAY_AUTH_MODE=token`` with a random ``RAY_AUTH_TOKEN``), and terminated at
the end; no other Ray on the machine is touched. It runs this venv's Python,
so jobs import raybary without any pip install.

The first part needs no Ray: token resolution, runtime environments, the
jobs/ files, argument handling and error messages.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from metrics_scrape import wait_for

from raybary.cli import main
from raybary.cli.job_entry import with_address
from raybary.jobs import auth, runtime
from raybary.jobs.client import (
    JobsError,
    describe,
    environment_hint,
    failure_reason,
    insecure_token_warning,
    normalize_address,
)

ROOT = Path(__file__).resolve().parents[2]
# Ray's log-streaming client (not ours) uses a deprecated aiohttp argument.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")


# ------------------------------------------------------------------ no Ray needed
def test_token_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    env: dict[str, str] = {}
    assert auth.resolve_token(env=env) is None  # nothing anywhere: no header
    assert auth.auth_headers(None) == {}
    default = tmp_path / ".ray" / "auth_token"
    default.parent.mkdir()
    default.write_text("from-default\n")
    assert auth.resolve_token(env=env).value == "from-default"
    f = tmp_path / "tok"
    f.write_text("  from-path \n")
    env["RAY_AUTH_TOKEN_PATH"] = str(f)
    assert auth.resolve_token(env=env).value == "from-path"
    assert auth.resolve_token(token_file=str(default), env=env).value == "from-default"
    env["RAY_AUTH_TOKEN"] = "from-env"
    assert auth.resolve_token(env=env).value == "from-env"
    tok = auth.resolve_token("explicit", env=env)
    assert (tok.value, tok.source) == ("explicit", "--token")
    assert auth.auth_headers(tok) == {"Authorization": "Bearer explicit"}
    # a named token file that cannot be used is an error, as in Ray
    with pytest.raises(auth.TokenError, match="cannot read"):
        auth.resolve_token(token_file=str(tmp_path / "missing"), env={})
    (tmp_path / "empty").write_text("")
    with pytest.raises(auth.TokenError, match="empty"):
        auth.resolve_token(env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


def test_runtime_env_defaults_and_merging():
    env = runtime.build_runtime_env()
    assert env == {"env_vars": runtime.DEFAULT_ENV_VARS}
    assert env["env_vars"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    env = runtime.build_runtime_env(
        base={"env_vars": {"A": "base", "PYTHONUNBUFFERED": "0"}, "pip": ["zarr"]},
        env_vars={"A": "cli"}, pip=["s3fs", "zarr"], ship_source=True)
    assert env["env_vars"]["A"] == "cli" and env["env_vars"]["PYTHONUNBUFFERED"] == "0"
    assert env["env_vars"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["pip"] == ["zarr", "s3fs"]
    assert env["py_modules"] == [str(runtime.raybary_package_dir())]
    assert "__pycache__" in env["excludes"]
    # a shipped working directory never takes secrets along
    env = runtime.build_runtime_env(working_dir=".")
    assert env["working_dir"] == "."
    for secret in (".env", "*.pem", ".aws/", ".ssh/", ".netrc", "auth_token", "*token*.txt"):
        assert secret in env["excludes"], secret
    with pytest.raises(ValueError, match="conda"):
        runtime.build_runtime_env(base={"conda": {"dependencies": []}}, pip=["x"])


def test_jobs_dir_matches_code_and_pyproject():
    """jobs/*.yaml must not drift from the code's defaults or from pyproject's dependencies."""
    plain = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert plain == {"env_vars": runtime.DEFAULT_ENV_VARS}
    source = yaml.safe_load((ROOT / "jobs" / "runtime_env.source.yaml").read_text())
    assert source["env_vars"] == runtime.DEFAULT_ENV_VARS
    assert source["py_modules"] == ["./raybary"] and (ROOT / "raybary" / "__init__.py").exists()

    def name(req: str) -> str:
        return re.split(r"[\[<>=!~ ;@]", req, maxsplit=1)[0].strip().lower()

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    shipped = {name(r) for r in source["pip"]}
    missing = {name(d) for d in deps} - shipped - {"ray"}  # Ray comes from the cluster
    assert not missing, f"jobs/runtime_env.source.yaml lacks {missing}"
    assert any(r.startswith("jax[cuda12]") for r in source["pip"])
    assert "main()" in (ROOT / "jobs" / "barycenters.py").read_text()


def test_a_token_over_plain_http_to_another_host_is_warned_about():
    tok = auth.Token("secret", "--token")
    msg = insecure_token_warning("http://10.0.0.5:8265", tok)
    assert msg and "unencrypted over http:// to 10.0.0.5" in msg and "secret" not in msg
    assert "--token" in msg
    for quiet in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265",
                  "https://ray.example.org"):
        assert insecure_token_warning(quiet, tok) is None, quiet
    assert insecure_token_warning("http://10.0.0.5:8265", None) is None


def test_entrypoint_joins_the_jobs_cluster():
    assert with_address(["in", "out", "-n", "3"]) == ["in", "out", "-n", "3", "--address", "auto"]
    assert with_address(["in", "out", "--address=h:1"]) == ["in", "out", "--address=h:1"]
    cmd = runtime.entrypoint_command("s3://b/in x.zarr", "out", ["--bar-size", "3"])
    assert cmd == "python -m raybary.cli.job_entry 's3://b/in x.zarr' out --bar-size 3"


def test_address_normalisation(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert normalize_address(None) == "http://127.0.0.1:8265"
    assert normalize_address("head:8265/") == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.com")
    assert normalize_address(None) == "https://ray.example.com"
    with pytest.raises(JobsError, match="dashboard"):
        normalize_address("ray://head:10001")


def _dry_run(*args: str) -> dict:
    """``raybary submit ARGS --dry-run`` (``--dry-run`` first if ARGS has a ``--``)."""
    r = CliRunner().invoke(main, ["submit", "--dry-run", *args] if "--" in args
                           else ["submit", *args, "--dry-run"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):])


def test_submit_passes_run_options_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _dry_run("--bar-size", "3", "in.parquet", "--grid", "20x30", "s3://b/out",
                   "--learn-weights", "--gpus-per-actor", "0.5", "--env", "K=V",
                   "--address", "headnode:8265")
    want = (f"python -m raybary.cli.job_entry {tmp_path}/in.parquet s3://b/out "
            "--bar-size 3 --grid 20x30 --learn-weights --gpus-per-actor 0.5")
    assert out["entrypoint"] == want
    assert out["address"] == "http://headnode:8265"
    assert out["runtime_env"]["env_vars"]["K"] == "V"
    assert "py_modules" not in out["runtime_env"]  # nothing shipped unless asked


def test_submit_distances_runs_the_distance_job_entrypoint(tmp_path, monkeypatch):
    from raybary.cli.distances_cmds import distances_cmd

    monkeypatch.chdir(tmp_path)
    out = _dry_run("--distances", "g.parquet", "s3://b/d", "--pairs", "all", "--tile", "50",
                   "--relative-epsilon", "1e-3")
    want = (f"python -m raybary.cli.job_entry distances {tmp_path}/g.parquet s3://b/d "
            "--pairs all --tile 50 --relative-epsilon 1e-3")
    assert out["entrypoint"] == want
    entry = shlex.split(out["entrypoint"])
    assert distances_cmd.make_context("distances", entry[4:]).params["tile"] == 50
    r = CliRunner().invoke(main, ["submit", "--distances", "g.parquet", "o", "--bar-size", "3",
                                  "--dry-run"])
    assert r.exit_code == 2 and "options of `raybary distances`" in r.output, r.output


def test_submit_sends_storage_options_in_the_runtime_env_never_the_entrypoint(tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAYBARY_STORAGE_OPTIONS", raising=False)
    out = _dry_run("in.zarr", "s3://b/out", "--storage-option", "endpoint_url=http://h:9000",
                   "-n", "3", "--storage-option", "secret=TOPSECRET-1",
                   "--output-storage-option", "secret=TOPSECRET-2", "--env", "K=V")
    shown = json.dumps(out)
    assert "TOPSECRET" not in shown and "h:9000" not in shown
    assert out["entrypoint"] == (f"python -m raybary.cli.job_entry {tmp_path}/in.zarr "
                                 "s3://b/out --bar-size 3")
    env = out["runtime_env"]["env_vars"]
    assert json.loads(env["RAYBARY_STORAGE_OPTIONS"]) == {"endpoint_url": "***", "secret": "***"}
    assert json.loads(env["RAYBARY_OUTPUT_STORAGE_OPTIONS"]) == {"secret": "***"}
    assert env["K"] == "V"
    # what the job gets, and its `raybary run` reads back from its environment
    real = runtime.with_storage_env({"env_vars": {"K": "V"}},
                                    {"endpoint_url": "http://h:9000", "secret": "TOPSECRET-1"},
                                    {"secret": "TOPSECRET-2"})["env_vars"]
    for name in ("RAYBARY_STORAGE_OPTIONS", "RAYBARY_OUTPUT_STORAGE_OPTIONS"):
        monkeypatch.setenv(name, real[name])
    from raybary.cli.run_cmds import run_cmd

    params = run_cmd.make_context("run", ["in.zarr", "s3://b/out"]).params
    assert dict(params["storage_options"]) == {"endpoint_url": "http://h:9000",
                                               "secret": "TOPSECRET-1"}
    assert dict(params["output_storage_options"]) == {"secret": "TOPSECRET-2"}
    assert runtime.storage_env_vars({}, None) == {}  # none given: the cluster's own config


@pytest.mark.parametrize("args", [
    ["in.parquet", "s3://b/out", "-qn", "3"],  # combined short flags, as `raybary run` takes them
    ["in.parquet", "s3://b/out", "-qn3"],
    ["-n3", "in.parquet", "-q", "s3://b/out"],  # options before, between and after
    ["in.parquet", "--bar-size=3", "s3://b/out", "--quiet"],
    ["-q", "--bar-size", "3", "--", "in.parquet", "s3://b/out"],  # run's `--`
    ["in.parquet", "s3://b/out", "-n", "3", "--uniform-weights", "--learn-weights", "--seed",
     "-4", "--grid-bounds=-1,1,-2,2", "-q"],
])
def test_submit_parses_run_options_as_run_does(args, tmp_path, monkeypatch):
    """The job's entrypoint parses back to what `raybary run ARGS` parses to
    (INPUT made absolute), whatever spelling of the options click accepts."""
    from raybary.cli.run_cmds import run_cmd

    monkeypatch.chdir(tmp_path)
    local = [str(tmp_path / a) if a == "in.parquet" else a for a in args]
    want = run_cmd.make_context("run", local).params
    assert want["bar_size"] == 3 and want["quiet"] is True
    # as typed (submit takes a `--` itself), and after submit's `--` (all of ARGS is run's)
    for submit_args in (args, ["--", *args]):
        entry = shlex.split(_dry_run(*submit_args)["entrypoint"])
        assert entry[:3] == ["python", "-m", "raybary.cli.job_entry"]
        assert entry[3:5] == [str(tmp_path / "in.parquet"), "s3://b/out"]
        assert run_cmd.make_context("run", entry[3:]).params == want, submit_args


def test_submit_entrypoint_spells_run_options_in_long_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _dry_run("in.parquet", "s3://b/out", "-qn", "3")
    assert out["entrypoint"] == (f"python -m raybary.cli.job_entry {tmp_path}/in.parquet "
                                 "s3://b/out --quiet --bar-size 3")
    odd = _dry_run("--", "-qn3", "--", "-in.parquet", "s3://b/out")  # an INPUT named like an option
    assert odd["entrypoint"] == (f"python -m raybary.cli.job_entry {tmp_path}/-in.parquet "
                                 "s3://b/out --quiet --bar-size 3")


@pytest.mark.parametrize("args", [["in", "out", "--address", "h:1"], ["in", "out", "--address=h:1"],
                                  ["in", "--address", "h:1", "out"]])
def test_submit_refuses_an_address_among_the_run_options(args):
    """(``--address`` before a ``--`` is submit's own: the dashboard.)"""
    r = CliRunner().invoke(main, ["submit", "--dry-run", "--", *args])
    assert r.exit_code == 2 and "--address is the dashboard of the cluster" in r.output, r.output


@pytest.mark.parametrize("args,message", [
    (["in"], "Missing argument 'OUTPUT'"),
    (["in", "out", "--bar-sise", "3"], "No such option '--bar-sise'"),
    (["in", "out", "--bar-size", "zero"], "'zero' is not a valid integer"),
    (["in", "out", "--env", "NOVALUE"], "KEY=VALUE"),
])
def test_submit_usage_errors(args, message):
    r = CliRunner().invoke(main, ["submit", *args, "--dry-run"])
    assert r.exit_code == 2 and message in r.output, r.output


def test_unreachable_address_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    for cmd in (["submit", "in", "out"], ["status", "x"], ["logs", "x"], ["stop", "x"]):
        r = CliRunner().invoke(main, [*cmd, "--address", f"127.0.0.1:{port}"])
        assert r.exit_code == 1, r.output
        assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in r.output
        assert "Traceback" not in r.output


def test_failure_reason_from_logs():
    class Info:
        status = "FAILED"
        message = "Job entrypoint command failed with exit code 1, last available logs:"

    clean = "raybary job: ...\nError: no problem store at /x.parquet\n"
    assert failure_reason(Info, clean) == "no problem store at /x.parquet"
    trace = ("Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n"
             "    f()\n    ^^^\npyarrow.lib.ArrowInvalid: Parquet magic bytes not found\n")
    assert failure_reason(Info, trace) == "pyarrow.lib.ArrowInvalid: Parquet magic bytes not found"
    assert failure_reason(Info, "") == Info.message
    Info.status = "SUCCEEDED"
    assert failure_reason(Info, clean) is None


def test_status_shows_how_far_a_job_got():
    info = types.SimpleNamespace(
        status="RUNNING", message="", submission_id="j1", job_id=None, metadata={},
        entrypoint="python -m ...", start_time=None, end_time=None)
    logs = ("raybary job: ...\n[raybary] 100/4000 problems (  2.5%) | 9.0 problems/s\n"
            "\r[raybary] 300/4000 problems (  7.5%) |    10.0 problems/s | ETA 06:10   \n")
    for status in ("RUNNING", "STOPPED", "FAILED"):
        info.status = status
        text = describe(info, logs)
        assert "  progress:   300/4000 problems (  7.5%) |    10.0 problems/s | ETA 06:10\n" \
            in text + "\n", (status, text)
    assert "progress:" not in describe(info, "raybary job: ...\n")


_NO_RAYBARY = ("/usr/bin/python3: Error while finding module specification for "
               "'raybary.cli.job_entry' (ModuleNotFoundError: No module named 'raybary')\n")


def _words(text: str) -> str:
    return " ".join(text.split())


def test_a_job_under_a_python_without_ray_or_raybary_is_explained():
    no_ray = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "ModuleNotFoundError: No module named 'ray'\n")
    for logs, module in ((no_ray, "ray"), (_NO_RAYBARY, "raybary"),
                         ("/venv/bin/python: No module named raybary\n", "raybary")):
        hint = environment_hint(logs)
        assert hint and f"ran under a Python without {module}:" in hint, logs
        assert "virtual environment that is not on its PATH" in hint
        assert "`PATH=/path/venv/bin:$PATH ray start --head ...`" in hint
        assert "activated" in hint and "--python /path/venv/bin/python" in hint
        assert "runtime environment" in hint and "--pip" in hint
    old = environment_hint("/venv/bin/python: No module named raybary.cli.job_entry\n")
    assert "older than this one" in old and "--ship-source" in old
    for fine in (None, "", "No module named 'ray_tpu'", "No module named 'ray._private.x'",
                 "Error: no problem store at /x.parquet"):
        assert environment_hint(fine) is None, fine
    info = types.SimpleNamespace(
        status="FAILED", message="Job entrypoint command failed with exit code 1, last ...",
        submission_id="j1", job_id=None, metadata={}, entrypoint="python -m ...",
        start_time=None, end_time=None)
    # python -m prints no traceback: the reason is its one line, not Ray's message
    assert failure_reason(info, _NO_RAYBARY) == _NO_RAYBARY.strip()
    text = describe(info, _NO_RAYBARY)
    assert "  hint:       the job ran under a Python without raybary" in text
    fix = [line for line in text.splitlines() if line.startswith(("  hint:", " " * 14))]
    assert len(fix) > 1 and max(map(len, fix)) <= 100  # a wrapped paragraph
    assert "PATH=/path/venv/bin:$PATH" in text
    info.status = "SUCCEEDED"
    assert "hint:" not in describe(info, _NO_RAYBARY)


# ------------------------------------------------------------------ a real head node
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_head(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops its processes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of this head's group still alive
    except ProcessLookupError:
        pass


_GCS: dict = {}  # the head's GCS address (for `raybary run --address`) and metrics URL


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with dashboard and token auth; yields (address, token, tmp dir)."""
    ports = _free_ports(9)
    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rbjobs", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k in ("RAY_USAGE_STATS_ENABLED",)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [
        "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={ports[0]}", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}",
        "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
        f"--dashboard-agent-grpc-port={ports[4]}", f"--metrics-export-port={ports[5]}",
        f"--runtime-env-agent-port={ports[6]}", f"--node-manager-port={ports[7]}",
        f"--object-manager-port={ports[8]}", "--disable-usage-stats",
    ]
    log = tmp_path_factory.mktemp("head") / "head.log"
    with open(log, "w") as out:
        # cwd: not the checkout, which would shadow a shipped raybary (`python -m` puts
        # the cwd first on sys.path, and jobs inherit the head's cwd)
        proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), *cmd[1:]], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=temp_dir)
    address = f"http://127.0.0.1:{ports[1]}"
    _GCS["address"] = f"127.0.0.1:{ports[0]}"
    _GCS["metrics"] = f"http://127.0.0.1:{ports[5]}/metrics"  # the head's Prometheus endpoint
    try:
        deadline = time.monotonic() + 120
        while True:
            req = urllib.request.Request(address + "/api/version",
                                         headers={"Authorization": f"Bearer {token}"})
            try:
                urllib.request.urlopen(req, timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        data = tmp_path_factory.mktemp("jobs-data")
        from raybary.storage.generate import generate

        generate(str(data / "in.parquet"), 6, family="tutorial", seed=2)
        generate(str(data / "big.parquet"), 4000, family="tutorial", seed=2)
        (data / "corrupt.parquet").write_bytes(b"this is not parquet")
        yield address, token, data
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(args, *, token=None, home=None, env=None):
    """Run the CLI in-process with a clean token environment (HOME without a token file)."""
    e = {"RAY_AUTH_TOKEN": token, "RAY_AUTH_TOKEN_PATH": None, "RAY_AUTH_MODE": None,
         "RAY_API_SERVER_ADDRESS": None, "HOME": str(home) if home else None}
    e.update(env or {})
    return CliRunner().invoke(main, args, env=e)


@pytest.fixture()
def home(tmp_path):
    return tmp_path  # a HOME without ~/.ray/auth_token


def test_token_is_required(head, home):
    address, token, data = head
    args = ["submit", str(data / "in.parquet"), str(data / "x"), "--address", address]
    r = _cli(args, home=home)
    assert r.exit_code == 1
    assert "requires an authentication token and none was sent" in r.output
    assert "--token" in r.output and "Traceback" not in r.output
    r = _cli([*args, "--token", "not-the-token"], home=home)
    assert r.exit_code == 1 and "refused the token from --token" in r.output
    r = _cli(["status", "--address", address], home=home)
    assert r.exit_code == 1 and "authentication token" in r.output


#: Ray's own settings: one try at the GCS, 3 s to wait for it (not 20 tries of 30 s).
_RAY_CONNECT_ONCE = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "3"}

#: What ray.init(address=...) raises in Ray 2.60 (a ConnectionError, "Failed to
#: connect to Ray cluster at ...", from a RuntimeError with the last traceback of
#: its retry loop): against a token-auth head without the token, and against a
#: port where nothing listens. Texts as Ray wrote them (the tracebacks shortened).
_RAY_REFUSED = (
    "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
    '  File "python/ray/includes/common.pxi", line 119, in ray._raylet.check_status\n'
    "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is "
    "missing or incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token'). Ensure "
    "that the token for the cluster is available in a local file\n")
_RAY_UNREACHABLE = (
    "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
    '  File "python/ray/includes/common.pxi", line 144, in '
    "ray._raylet.check_status_timeout_as_rpc_error\n"
    "ray.exceptions.RpcError: Timed out while waiting for GCS to become available.\n")


def _raised_by_ray_init(text: str) -> ConnectionError:
    try:
        try:
            raise RuntimeError(text)
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1") from e
    except ConnectionError as e:
        return e


def test_a_failed_login_is_told_from_an_unreachable_cluster():
    from ray._private.authentication.authentication_constants import (
        TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE,
    )
    from ray.exceptions import AuthenticationError

    from raybary.runner.join import login_failed

    # raised by ray.init itself in token mode without a token
    assert login_failed(AuthenticationError(TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE))
    assert login_failed(_raised_by_ray_init(_RAY_REFUSED))  # the cluster refused the login
    assert not login_failed(_raised_by_ray_init(_RAY_UNREACHABLE))
    assert not login_failed(ConnectionError("Connection refused"))
    assert not login_failed(RuntimeError("Authentication is not the point here"))


def test_run_against_an_unreachable_address_says_so(tmp_path):
    from raybary.storage.generate import generate

    generate(str(tmp_path / "in.parquet"), 2, family="tutorial", seed=2)
    port = _free_ports(1)[0]  # closed again: nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(_RAY_CONNECT_ONCE, HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "raybary", "run", str(tmp_path / "in.parquet"),
                        str(tmp_path / "out"), "--address", f"127.0.0.1:{port}", "-q"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"could not join the Ray cluster at 127.0.0.1:{port} (--address). Is it up and " \
        "reachable?" in r.stderr, r.stderr[-2000:]
    assert "token" not in r.stderr and "Traceback" not in r.stderr


def test_run_joins_a_token_cluster_with_the_token_it_finds(head, home):
    """``raybary run`` in a shell where ``RAY_ADDRESS`` names a token cluster (as
    in a job's driver) finds the token as submit does (no RAY_AUTH_MODE needed),
    and says which; without the right one it says so in one line, at once."""
    import raybary

    _, token, data = head
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_ADDRESS=_GCS["address"])
    out = data / "run-out"
    cmd = [sys.executable, "-m", "raybary", "run", str(data / "in.parquet"), str(out),
           "--bar-size", "3", "--grid", "none", "--actors", "1"]
    start = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=home)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"Error: could not join the Ray cluster at {_GCS['address']} ($RAY_ADDRESS): it " \
        "uses token authentication and no token was found (raybary looks in $RAY_AUTH_TOKEN, " \
        "$RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token" in _words(r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "actors keep failing" not in r.stderr
    # the wrong token, named by where it came from
    r = subprocess.run([*cmd, "--address", _GCS["address"]],
                       env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
                       capture_output=True, text=True, timeout=300, cwd=home)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "(--address): it uses token authentication and refused the token from " \
        "$RAY_AUTH_TOKEN; is it this cluster's?" in _words(r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # a token file named but not there (as Ray does, an error; only where a token is wanted)
    missing = home / "no-such-token"
    r = subprocess.run(cmd, env={**env, "RAY_AUTH_TOKEN_PATH": str(missing)},
                       capture_output=True, text=True, timeout=300, cwd=home)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"Error: cannot read the Ray token file {missing} ($RAY_AUTH_TOKEN_PATH)" in r.stderr
    # none of these was sent to Ray, whose client retries a refused login for ~20 s
    assert time.monotonic() - start < 60
    # the right token, from ~/.ray/auth_token
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token + "\n")
    r = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=300,
                       cwd=home)
    assert r.returncode == 0, r.stderr[-3000:]
    first = next(ln for ln in r.stderr.splitlines() if ln.startswith("[raybary]"))
    assert first == (f"[raybary] Ray: joined the cluster at {_GCS['address']} ($RAY_ADDRESS; "
                     f"token from {home / '.ray' / 'auth_token'}): 1 node, 2 CPUs"), r.stderr
    assert json.loads(r.stdout)["cluster"]["token_from"] == str(home / ".ray" / "auth_token")
    assert raybary.read_results(str(out)).complete


#: Asks a token cluster whether it wants a token, then joins it as Ray would
#: (token mode as RAY_AUTH_MODE says: unset), so the login fails and is tried
#: again in token mode, in the same process; prints what happened as JSON.
_JOIN_SCRIPT = """
import json, os, sys
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from raybary.jobs.auth import Token
from raybary.runner import join

address, token = sys.argv[1], sys.argv[2]
said = {"refused": [join.refused(address), join.refused(address, Token(token, "t")),
                    join.refused(address, Token("not-it", "t")), join.refused("127.0.0.1:1")]}
with join.auth_env_restored():
    sent = join._join_as_ray_would(address, "a test")
    said["sent"] = sent.source
    said["nodes"] = len(ray.nodes())
    said["mode_during"] = os.environ.get("RAY_AUTH_MODE")
    ray.shutdown()
said["mode_after"] = [os.environ.get("RAY_AUTH_MODE"),
                      get_authentication_mode() == AuthenticationMode.TOKEN]
print("SAID " + json.dumps(said))
"""


def test_a_cluster_is_asked_whether_it_wants_a_token_and_a_refused_login_retried(head, home):
    """:func:`raybary.runner.join.refused` tells a token cluster's refusal from an
    answer and from no answer; where there is no answer, a login refused without
    a token is tried again with one, in the same process; the run's token mode
    does not outlive it."""
    _, token, _ = head
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(_RAY_CONNECT_ONCE, HOME=str(home))
    r = subprocess.run([sys.executable, "-c", _JOIN_SCRIPT, _GCS["address"], token], env=env,
                       capture_output=True, text=True, timeout=300, cwd=home)
    said = [ln for ln in r.stdout.splitlines() if ln.startswith("SAID ")]
    assert r.returncode == 0 and said, r.stderr[-3000:]
    said = json.loads(said[0][len("SAID "):])
    assert said["refused"] == [True, False, True, None]
    assert said["sent"] == str(home / ".ray" / "auth_token") and said["nodes"] == 1
    assert said["mode_during"] == "token" and said["mode_after"] == [None, False]


def test_submit_wait_and_read_results(head, home):
    import pandas as pd

    import raybary

    address, token, data = head
    out = data / "out"
    r = _cli(["submit", str(data / "in.parquet"), str(out), "--address", address,
              "--bar-size", "3", "--grid", "24x24", "--actors", "1", "--shard-size", "4",
              "--wait"], token=token, home=home)
    assert r.exit_code == 0, r.output
    job_id = r.stdout.splitlines()[0]
    assert job_id.startswith("raybary-")
    assert "6/6 problems" in r.stdout  # the run's progress, streamed from the job's logs
    assert "[raybary] Ray: joined the cluster at" in r.stdout  # the job's, not a private one
    assert f"job {job_id}: SUCCEEDED" in r.output

    res = raybary.read_results(str(out))
    assert res.complete and len(res.problems) == 6
    assert (res.problems["status"] == "ok").all()
    assert len(res.barycenters) == 6 * 3
    direct = pd.read_parquet(out / "problems")  # plain Parquet readers work too
    assert sorted(direct["problem_id"]) == list(range(6))
    assert res.grids().barycenter.shape == (6, 24, 24)

    # the run's metrics, on the head's Prometheus endpoint (the driver's are sent as it ends)
    want = {("ray_raybary_problems_total", "ok"): 6.0,
            ("ray_raybary_shards_committed_total", "solved"): 2.0,
            ("ray_raybary_solve_seconds_per_problem_count",): 2.0}
    got = wait_for(_GCS["metrics"], res.manifest["summary"]["run_id"],
                   lambda got: all(got.get(k) == v for k, v in want.items()))
    assert {k: got.get(k) for k in want} == want, got
    assert got[("ray_raybary_actor_seconds_total", "solve")] > 0

    r = _cli(["status", job_id, "--address", address], token=token, home=home)
    assert r.exit_code == 0 and f"job {job_id}: SUCCEEDED" in r.output
    assert f"output:     {out}" in r.output and "error:" not in r.output
    r = _cli(["status", "--address", address], token=token, home=home)  # the job list
    assert re.search(rf"^{job_id}\s+SUCCEEDED", r.output, re.MULTILINE)
    r = _cli(["logs", job_id, "--address", address], token=token, home=home)
    assert r.exit_code == 0 and "raybary run: 6 problems" in r.output

    # the figure from the job's stored results
    fig = data / "fig.png"
    r = _cli(["plot", str(out), "--problem", "2", "-o", str(fig)])
    assert r.exit_code == 0, r.output
    assert fig.stat().st_size > 20_000


def test_submit_distances_wait_and_read_the_matrix(head, home):
    import raybary
    from raybary.storage.gmm_store import generate_gmms

    address, token, data = head
    store = generate_gmms(str(data / "gmms.parquet"), 5, seed=1)
    out = data / "distances"
    r = _cli(["submit", "--distances", store.url, str(out), "--address", address, "--tile", "3",
              "--actors", "1", "--wait"], token=token, home=home)
    assert r.exit_code == 0, r.output
    assert "10/10 pairs" in r.stdout and "[raybary] Ray: joined the cluster at" in r.stdout
    assert "raybary distances: 10 pairs in 3 shards (complete)" in r.stdout
    matrix, ids = raybary.read_distances(str(out)).matrix()
    assert ids.tolist() == list(range(5)) and not np.isnan(matrix).any()
    gmms = store.read_gmms(0, 5).gmms
    assert matrix[1, 4] == pytest.approx(raybary.mw2(gmms[1], gmms[4]), rel=1e-4)


def test_a_job_that_runs_raybary_run_joins_its_cluster(head, home):
    """``ray job submit -- raybary run IN OUT``: Ray sets ``RAY_ADDRESS`` for the
    job's driver, and the run joins the job's cluster, with the cluster's token,
    instead of starting a private Ray."""
    from raybary.jobs.client import connect

    address, token, data = head
    out = data / "plain-run-out"
    client = connect(address, token=token)
    job_id = client._client.submit_job(  # Ray's own client, Ray's own entrypoint rules
        entrypoint=f"raybary run {data / 'in.parquet'} {out} --bar-size 3 --grid none "
                   "--actors 1")
    deadline = time.monotonic() + 240
    while (status := client.status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, client.logs(job_id)
        time.sleep(1)
    logs = client.logs(job_id)
    assert status == "SUCCEEDED", logs
    assert re.search(r"^\[raybary\] Ray: joined the cluster at \S+ \(\$RAY_ADDRESS; token from "
                     r"\$RAY_AUTH_TOKEN\): 1 node, 2 CPUs$", logs, re.MULTILINE), logs
    from raybary import read_results

    assert read_results(str(out)).complete


def test_submit_with_storage_options_on_s3(head, home, s3):
    """A job reads and writes S3 (moto on loopback, one key pair accepted) with
    --storage-option only: they reach the job's run and its actors, and no
    command shows them."""
    import raybary
    from raybary.storage.generate import generate

    address, token, _ = head
    server, root = s3
    generate(f"{root}/in.parquet", 6, family="tutorial", seed=2, storage_options=server.options)
    flags = [a for k, v in server.options.items() for a in ("--storage-option", f"{k}={v}")]
    job_id = f"s3-{secrets.token_hex(3)}"
    r = _cli(["submit", f"{root}/in.parquet", f"{root}/out", "--address", address, "--job-id",
              job_id, "--bar-size", "3", "--grid", "24x24", "--actors", "1", "--shard-size", "4",
              *flags, "--wait"], token=token, home=home)
    assert r.exit_code == 0, r.output
    assert f"job {job_id}: SUCCEEDED" in r.output and server.secret not in r.output
    res = raybary.read_results(f"{root}/out", storage_options=server.options)
    assert res.complete and (res.problems["status"] == "ok").sum() == 6
    for cmd in (["status", job_id], ["logs", job_id], ["status"]):
        r = _cli([*cmd, "--address", address], token=token, home=home)
        assert r.exit_code == 0 and server.secret not in r.output and server.key not in r.output


@pytest.mark.parametrize("which,reason", [
    ("missing.parquet", "no problem store at"),
    ("corrupt.parquet", "parquet"),
])
def test_unreadable_input_fails_clearly(head, home, which, reason):
    address, token, data = head
    job_id = f"bad-{which.split('.')[0]}-{secrets.token_hex(3)}"
    r = _cli(["submit", str(data / which), str(data / f"out-{job_id}"), "--address", address,
              "--job-id", job_id, "--wait"], token=token, home=home)
    assert r.exit_code == 1, r.output
    assert f"job {job_id} failed:" in r.output and reason in r.output.lower()
    r = _cli(["status", job_id, "--address", address], token=token, home=home)
    assert r.exit_code == 0 and f"job {job_id}: FAILED" in r.output
    error = next(line for line in r.output.splitlines() if line.strip().startswith("error:"))
    assert reason in error.lower() and str(data / which) in r.output
    r = _cli(["logs", job_id, "--address", address], token=token, home=home)
    assert reason in r.output.lower()
    r = _cli(["stop", job_id, "--address", address], token=token, home=home)
    assert r.exit_code == 0 and "already ended: FAILED" in r.output


def test_a_job_under_another_python_says_why_and_what_to_do(head, home, tmp_path):
    """The job's Python has neither ray nor raybary (as under a head started from a
    venv that is not on its PATH): submit --wait and status say so, and what to do."""
    address, token, data = head
    other = tmp_path / "python"  # this Python without site-packages: no ray, no raybary
    other.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S \"$@\"\n")
    other.chmod(0o755)
    job_id = f"nopy-{secrets.token_hex(3)}"
    r = _cli(["submit", str(data / "in.parquet"), str(data / f"out-{job_id}"), "--address",
              address, "--job-id", job_id, "--python", str(other), "--wait"],
             token=token, home=home)
    assert r.exit_code == 1, r.output
    assert f"job {job_id} failed:" in r.output and "No module named 'raybary'" in r.output
    said = _words(r.output)
    assert "hint: the job ran under a Python without raybary" in said, r.output
    assert "PATH=/path/venv/bin:$PATH ray start --head" in said and "runtime environment" in said
    r = _cli(["status", job_id, "--address", address], token=token, home=home)
    assert r.exit_code == 0 and f"job {job_id}: FAILED" in r.output
    assert "hint: the job ran under a Python without raybary" in _words(r.output)


def test_unknown_job_id(head, home):
    address, token, _ = head
    for cmd in ("status", "logs", "stop"):
        r = _cli([cmd, "no-such-job", "--address", address], token=token, home=home)
        assert r.exit_code == 1 and "no job 'no-such-job'" in r.output, r.output


def test_ship_source_and_stop(head, home, tmp_path):
    """--ship-source uploads this raybary (the job imports it from py_modules); a
    running job stops on request. The token comes from a file this time."""
    address, token, data = head
    tok = tmp_path / "token"
    tok.write_text(token)
    job_id = f"ship-{secrets.token_hex(3)}"
    r = _cli(["submit", str(data / "big.parquet"), str(data / f"out-{job_id}"), "--address",
              address, "--token-file", str(tok), "--job-id", job_id, "--ship-source",
              "--actors", "1", "--shard-size", "50", "--grid", "none", "--wait", "--timeout", "2"],
             home=home)
    assert r.exit_code == 3, r.output  # --timeout: stopped waiting, the job goes on
    assert r.stdout.splitlines()[0] == job_id
    assert re.search(r"still (PENDING|RUNNING) after 2 s", r.output), r.output
    args = ["--address", address, "--token-file", str(tok)]
    deadline = time.monotonic() + 180  # slow when other test suites share the cores
    while "problems (" not in (logs := _cli(["logs", job_id, *args], home=home).output):
        status = _cli(["status", job_id, *args], home=home).output
        assert "RUNNING" in status or "PENDING" in status, status + logs
        assert time.monotonic() < deadline, logs
        time.sleep(1)
    assert re.search(r"raybary job: raybary \S+ \(\S*py_modules\S*\)", logs), logs
    status = _cli(["status", job_id, *args], home=home).output
    assert re.search(r"progress:   \d+/4000 problems", status) or "SUCCEEDED" in status, status
    r = _cli(["stop", job_id, *args, "--wait", "30"], home=home)
    assert r.exit_code == 0 and f"job {job_id}: STOPPED" in r.output, r.output
    r = _cli(["status", job_id, *args], home=home)
    assert f"job {job_id}: STOPPED" in r.output
    assert re.search(r"progress:   \d+/4000 problems", r.output), r.output  # how far it got
