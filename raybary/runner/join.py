"""Which Ray a run uses, and joining a cluster with a token only where it wants one.

Which Ray (:meth:`~raybary.runner.options.ExecOptions.join_address` decides,
:data:`~raybary.runner.options.ADDRESS_HELP` says it for ``--address``):

* a Ray already initialised in this process is used as it is (tests, scripts
  that call ``ray.init`` themselves);
* ``--address HOST:PORT``, else ``$RAY_ADDRESS`` (Ray sets it for a job's
  driver, KubeRay in its pods): that cluster is joined;
* ``--address auto``: as Ray's ``address="auto"``: ``$RAY_ADDRESS``, else the
  cluster ``ray start`` started on this machine; an error if there is none;
* otherwise, or with ``--address local``: a private local Ray, started for
  the run and stopped after it.

Tokens, as Ray does them: a token is sent only to a cluster that wants one.
Before joining, raybary asks the cluster's GCS one question without a token
(:func:`refused`, the gRPC call ``GetClusterId`` that every Ray client makes
first). Refused: the cluster uses token authentication, so raybary finds the
token as ``raybary submit`` does (:func:`raybary.jobs.auth.resolve_token`),
checks it with the same question, and joins with Ray's token mode on.
Answered: the cluster has no token authentication, so raybary joins with
token mode off, whatever ``RAY_AUTH_MODE`` or ``~/.ray/auth_token`` say here.
Reason: a driver in token mode makes the cluster's processes authenticate
when they call it back, which a cluster without tokens cannot: its actors
are cancelled before they start (a stale ``~/.ray/auth_token`` used to break
such clusters this way). No answer (nothing listening yet, TLS, a ``ray://``
address): Ray's own rule, token mode as ``RAY_AUTH_MODE`` says, and if the
login fails while a token is found, one more try with token mode on. Token
mode is this process's only for the run (:func:`auth_env_restored`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from raybary.errors import RaybaryError

if TYPE_CHECKING:
    from raybary.jobs.auth import Token
    from raybary.runner.options import ExecOptions

__all__ = ["connect", "RayUsed", "JoinError", "refused", "login_failed", "auth_env_restored"]

AUTH_MODE_ENV = "RAY_AUTH_MODE"
#: What joining may set in ``os.environ`` (and Ray's own ``ray.init()`` too).
AUTH_ENV = (AUTH_MODE_ENV, "RAY_AUTH_TOKEN")
PROBE_TIMEOUT_S = 10.0  # to answer the one question of :func:`refused`
TOKEN_LOOKUP = "raybary looks in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token"


class JoinError(RaybaryError, ConnectionError):
    """A Ray cluster that could not be joined (exit status 1); ``login_failed``:
    it uses token authentication and refused the login."""

    def __init__(self, message: str, login_failed: bool = False) -> None:
        super().__init__(message)
        self.login_failed = login_failed


@dataclass
class RayUsed:
    """The Ray a run used (the run report's ``cluster``): ``how`` it got it
    (``joined``, ``private``: started for the run, ``in-process``: already
    running here), its GCS ``address``, what ``named_by`` it, where the token
    came from (None: none sent), and the cluster's alive nodes, CPUs and GPUs
    when the run began."""

    how: str
    address: str
    named_by: str
    token_from: str | None = None
    nodes: int = 0
    cpus: float = 0.0
    gpus: float = 0.0

    @property
    def started(self) -> bool:
        """Whether this run started or joined Ray (and so must shut it down)."""
        return self.how != "in-process"

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """The run's first progress line: which Ray, how big."""
        size = ", ".join(f"{n:g} {what}{'s' if n != 1 else ''}" for n, what in (
            (self.nodes, "node"), (self.cpus, "CPU"), (self.gpus, "GPU")) if n or what != "GPU")
        if self.how == "joined":
            token = f"; token from {self.token_from}" if self.token_from else ""
            return (f"[raybary] Ray: joined the cluster at {self.address} "
                    f"({self.named_by}{token}): {size}")
        if self.how == "private":
            return f"[raybary] Ray: a private local Ray ({self.named_by}): {size}"
        return f"[raybary] Ray: the one this process already runs, at {self.address}: {size}"


def connect(exe: ExecOptions) -> RayUsed:
    """Use, join or start Ray for a run, following the module docstring's rules;
    raises :class:`JoinError` for a cluster that cannot be joined."""
    import ray

    if ray.is_initialized():
        return _measured(RayUsed("in-process", _gcs_address(), "this process"))
    address, named_by = exe.join_address()
    if address is None:
        # a fresh Ray of our own, never one found via RAY_ADDRESS or /tmp/ray.
        # worker_niceness 0: Ray starts workers at nice 15 by default, which on a
        # busy laptop hands the solver's CPU to anything else running.
        ray.init(address="local", num_cpus=exe.local_cpus(), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False,
                 _system_config={"worker_niceness": 0})
        return _measured(RayUsed("private", _gcs_address(), named_by))
    if address == "auto":
        address = _found_here()
    token = _join(address, named_by)
    return _measured(RayUsed("joined", address, named_by,
                             token.source if token is not None else None))


def _gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def _measured(used: RayUsed) -> RayUsed:
    """``used`` with the cluster's alive nodes and total CPUs / GPUs."""
    import ray

    used.nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    res = ray.cluster_resources()
    used.cpus, used.gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    return used


def _found_here() -> str:
    """The GCS address ``--address auto`` names when ``$RAY_ADDRESS`` does not.

    Rule: the cluster ``ray start`` last started on this machine (Ray records
    it in ``/tmp/ray/ray_current_cluster``), else the one GCS running here;
    none, or several, is an error. Reason: Ray's own ``auto`` then takes any
    of several running clusters, which on a shared machine may be another
    user's.
    """
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    recorded = find_bootstrap_address(None)
    if recorded:
        return recorded
    running = sorted(find_gcs_addresses())
    if len(running) == 1:
        return running[0]
    found = (f"several are running ({', '.join(running)}) and none was started here with "
             "`ray start`: name one with --address HOST:PORT" if running else
             "$RAY_ADDRESS is not set and no Ray runs on this machine")
    raise JoinError(f"--address auto found no Ray cluster to join: {found}. Leave --address "
                    "out (or give --address local) to run on a private local Ray.")


def _join(address: str, named_by: str) -> Token | None:
    """Join the cluster at ``address`` with a token exactly when it wants one;
    return the token sent (None: none)."""
    from raybary.jobs.auth import resolve_token

    wants = refused(address)
    if wants is None:  # no answer: Ray's own rule, and one more try with a token
        return _join_as_ray_would(address, named_by)
    token = None
    if wants:
        token = resolve_token()
        if token is None:
            raise JoinError(join_failure(address, named_by, None, login_failed=True), True)
        if refused(address, token):
            raise JoinError(join_failure(address, named_by, token, login_failed=True), True)
    _token_mode(token)
    _ray_init(address, named_by, token)
    return token


def _join_as_ray_would(address: str, named_by: str) -> Token | None:
    """Join with token mode as ``RAY_AUTH_MODE`` says; after a failed login,
    try once more in token mode if a token is found and the mode was not set."""
    from raybary.jobs.auth import resolve_token

    mode_set = os.environ.get(AUTH_MODE_ENV, "").strip().lower() == "token"
    sent = resolve_token() if mode_set else None
    try:
        _ray_init(address, named_by, sent)
        return sent
    except JoinError as e:
        token = None if mode_set or not e.login_failed else resolve_token()
        if token is None:
            raise
    _token_mode(token)
    _ray_init(address, named_by, token)
    return token


def _ray_init(address: str, named_by: str, token: Token | None) -> None:
    """``ray.init(address)``; a failure to join becomes a :class:`JoinError`
    (``token``: the one sent, named in its message)."""
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, AuthenticationError) as e:
        failed = login_failed(e)
        raise JoinError(join_failure(address, named_by, token, failed), failed) from None


def refused(address: str, token: Token | None = None) -> bool | None:
    """Whether the GCS at ``address`` refuses a request without ``token`` (or
    with it) as unauthenticated: True, False (answered), None (no answer).

    Rule: one ``NodeInfoGcsService.GetClusterId`` call over plain gRPC, the
    token as Ray sends it (``authorization: Bearer ...``); gRPC's
    ``UNAUTHENTICATED`` is a refusal, any other failure no answer (nothing
    listening, TLS, a Ray without this call), as is a ``ray://`` address.
    Reason: Ray's client reads the token mode once per process and retries a
    refused login for ~20 s; the answer is needed before ``ray.init``, in
    milliseconds.
    """
    if "://" in address:
        return None
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return None
    metadata = [("authorization", f"Bearer {token.value}")] if token is not None else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata,
                              timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as e:
            return True if e.code() == grpc.StatusCode.UNAUTHENTICATED else None
    return False


def login_failed(error: BaseException) -> bool:
    """Whether ``error``, raised by ``ray.init(address=...)``, says that token
    authentication failed (no token, or not the cluster's), not that the
    cluster could not be reached.

    Rule: a :class:`ray.exceptions.AuthenticationError` in the chain of causes
    (Ray raises one itself in token mode without a token), or that class's
    full name in a message of the chain. Reason: when the cluster refuses the
    login, Ray's GCS client raises it inside a retry loop that passes on only
    the traceback's text, in the RuntimeError under ray.init's ConnectionError.
    """
    from ray.exceptions import AuthenticationError

    name = f"{AuthenticationError.__module__}.{AuthenticationError.__qualname__}"
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, AuthenticationError) or name in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def join_failure(address: str, named_by: str, token: Token | None, login_failed: bool) -> str:
    """The one-line error of a cluster that could not be joined: which cluster
    and what named it, whether the login failed, and the token sent (where it
    came from) or where raybary looked for one."""
    where = f"the Ray cluster at {address} ({named_by})"
    if login_failed and token is not None:
        return (f"could not join {where}: it uses token authentication and refused the "
                f"token from {token.source}; is it this cluster's? (`ray get-auth-token` on "
                "the head node prints the right one)")
    if login_failed:
        return (f"could not join {where}: it uses token authentication and no token was "
                f"found ({TOKEN_LOOKUP}; `ray get-auth-token` on the head node prints it)")
    return f"could not join {where}. Is it up and reachable?"


def _token_mode(token: Token | None) -> None:
    """Turn Ray's token mode on in this process, sending ``token``, or off
    (``token`` None), until :func:`auth_env_restored`'s block ends."""
    os.environ[AUTH_MODE_ENV] = "token" if token is not None else "disabled"
    if token is not None:
        os.environ["RAY_AUTH_TOKEN"] = token.value
    _refresh_ray_auth()


def _refresh_ray_auth() -> None:
    """Make Ray read ``RAY_AUTH_MODE`` and the token again (it caches both),
    as Ray's own ``ray.init`` does when it turns token mode on."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication (before 2.52)
        return
    Config.initialize("")  # the mode first: a token dropped while in token mode is fatal
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def auth_env_restored() -> Iterator[None]:
    """Put ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` back as they were (unset, or
    their old values) when the block ends, returning or raising, and make a
    Ray no longer running in this process read them again.

    Reason: token mode is the run's (:func:`connect` and Ray's own
    ``ray.init()``, which turns it on for a new local Ray, may set it); a later
    run to another cluster, and processes this one starts, must not inherit it.
    """
    saved = {name: os.environ.get(name) for name in AUTH_ENV}
    try:
        yield
    finally:
        changed = [name for name, value in saved.items() if os.environ.get(name) != value]
        for name in changed:
            if saved[name] is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved[name]
        ray = sys.modules.get("ray")
        if changed and ray is not None and not ray.is_initialized():
            _refresh_ray_auth()
