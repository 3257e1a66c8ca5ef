"""Options of a run: what the solver computes (:class:`~raybary.options.SolverOptions`,
re-exported here) and the grids (both recorded with the results, and compared
on a re-run), and how the work is spread (free to change between runs).

No Ray or JAX here, so the CLI can build and check options before either is
imported; the CLI takes its defaults, choices and parsers from here. Bad
options raise :class:`~raybary.errors.OptionsError` (a ``ValueError``; exit
status 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from raybary.errors import OptionsError
from raybary.options import DTYPES, SolverOptions
from raybary.storage.base import DEFAULT_SHARD_SIZE

__all__ = ["SolverOptions", "GridOptions", "ExecOptions", "parse_grid", "parse_bounds",
           "parse_dims", "format_grid", "DEFAULT_SHARD_SIZE", "DEFAULT_GRID", "DTYPES",
           "FAULT_ATTEMPTS", "RETRY_BACKOFF_S", "MAX_BACKOFF_S", "MAX_ATTEMPTS_HELP",
           "ADDRESS_HELP", "OptionsError"]

DEFAULT_GRID = (50, 50)

# Retries (the driver's policy, stated here so that the CLI's help says the same).
RETRY_BACKOFF_S = 1.0  # first wait before a shard whose task raised is tried again
MAX_BACKOFF_S = 30.0  # longest wait between two tries of a shard
FAULT_ATTEMPTS = 6  # attempts at a shard whose task raises, at least (waits 1+2+4+8+16 s)

#: What ``max_attempts`` (``--max-attempts``) means; :mod:`raybary.runner.driver` does this.
MAX_ATTEMPTS_HELP = (
    "Lost attempts at a shard before its valid problems are committed as failed: an "
    "attempt lost to a dead actor or node is re-queued at once, up to this many; a task "
    "that raised (e.g. a storage fault) is retried after waits of 1, 2, 4, ... s (at most "
    f"{MAX_BACKOFF_S:g} s), up to max(this, {FAULT_ATTEMPTS}). Both kinds count toward one "
    "total per shard. A re-run solves such shards again.")


#: What ``address`` (``--address``) means; :mod:`raybary.runner.join` does this.
ADDRESS_HELP = (
    "The Ray to run on. Not given: the cluster named by $RAY_ADDRESS (set by Ray in a "
    "job's driver, by KubeRay in its pods), else a private local Ray. 'local': a private "
    "local Ray, whatever $RAY_ADDRESS says. 'auto': as Ray's address='auto': $RAY_ADDRESS, "
    "else the cluster `ray start` started on this machine; an error if there is none. "
    "HOST:PORT: that cluster's GCS (port 6379 by default). A token is sent only to a "
    "cluster that wants one.")

RAY_ADDRESS_ENV = "RAY_ADDRESS"


def _check_address(address: str, where: str) -> None:
    """A dashboard URL (the Jobs API) is not a cluster to join: say what is."""
    if address.lower().startswith(("http://", "https://")):
        raise OptionsError(
            f"{where} {address} is a Ray dashboard URL (the Jobs API, what `raybary submit` "
            "and `ray job submit` use), not a cluster to join: give the cluster's GCS as "
            "HOST:PORT (port 6379 by default), `raybary submit` the run as a job, or run on "
            "a private local Ray with --address local")


@dataclass(frozen=True)
class GridOptions:
    """Log-density grids: ``shape`` ``(H, W)`` or ``None`` (no grids; ``d = 1``
    problems get curves of ``max(H, W)`` points); ``bounds``
    ``(xmin, xmax, ymin, ymax)`` for every problem (``xmin, xmax`` for curves),
    or ``None`` for extents from each problem's input and barycenter
    components (shared by the barycenter and the input grids of that problem);
    ``dims`` the two coordinates shown when ``d > 2``; ``input_gmms`` how many
    input GMMs' grids to store too.

    The other per-problem output stored beside the grids: ``plans``, each
    problem's transport plans (``plans/`` of the results, one row per plan
    entry; ``raybary run --plans``). Recorded with the results like the grids:
    a resume with the other choice is refused."""

    shape: tuple[int, int] | None = DEFAULT_GRID
    bounds: tuple[float, float, float, float] | None = None
    dims: tuple[int, int] = (0, 1)
    input_gmms: int = 0
    plans: bool = False

    def __post_init__(self) -> None:
        if self.shape is not None and (len(self.shape) != 2 or min(self.shape) < 1):
            raise OptionsError(f"grid shape must be two positive sizes, got {self.shape}")
        if self.bounds is not None:
            b = self.bounds
            if len(b) != 4 or not (b[0] < b[1] and b[2] < b[3]):
                raise OptionsError(f"grid bounds must be xmin<xmax, ymin<ymax, got {b}")
        if len(self.dims) != 2 or self.dims[0] == self.dims[1] or min(self.dims) < 0:
            raise OptionsError(f"grid dims must be two distinct coordinates, got {self.dims}")
        if self.input_gmms < 0:
            raise OptionsError("input_gmms must be >= 0")
        if self.input_gmms and self.shape is None:
            raise OptionsError("input grids need a grid shape")


@dataclass(frozen=True)
class ExecOptions:
    """How the run is spread over Ray; not part of the results' identity."""

    address: str | None = None  # None: $RAY_ADDRESS, else a private local Ray (ADDRESS_HELP)
    actors: int | None = None  # None: one per CPU (local) / per GPU
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    shard_size: int = DEFAULT_SHARD_SIZE
    in_flight: int = 2  # shards queued per actor
    max_attempts: int = 3  # lost attempts at a shard, then it is committed failed: MAX_ATTEMPTS_HELP
    overwrite: bool = False
    progress: bool = True
    num_cpus: int | None = None  # embedded Ray's CPUs (default: os.cpu_count())
    actor_env: dict = field(default_factory=dict)  # extra env vars for the actors
    resources: dict = field(default_factory=dict)  # custom Ray resources per actor
    # Fail when no actor is running for this long (None: 60 s on the embedded
    # local Ray, which cannot grow; 900 s on a cluster, where an autoscaler may
    # take minutes to start a node).
    placement_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise OptionsError("shard_size must be at least 1")
        if self.actors is not None and self.actors < 1:
            raise OptionsError("actors must be at least 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise OptionsError("resources per actor must be >= 0")
        if self.in_flight < 1 or self.max_attempts < 1:
            raise OptionsError("in_flight and max_attempts must be at least 1")
        if self.placement_timeout_s is not None and not self.placement_timeout_s > 0:
            raise OptionsError("placement_timeout_s must be positive")
        if self.address:
            _check_address(self.address.strip(), "--address")

    def join_address(self, env: dict | None = None) -> tuple[str | None, str]:
        """The cluster the run joins and what named it, or ``(None, why)`` for
        a private local Ray (``env``: default ``os.environ``).

        Rule (:data:`ADDRESS_HELP`): ``address`` ``"local"`` -> private;
        ``HOST:PORT`` (or ``ray://...``) -> that one; otherwise a non-empty
        ``$RAY_ADDRESS`` (``local`` in it -> private); otherwise ``"auto"`` ->
        ``"auto"`` (found on this machine by :mod:`raybary.runner.join`), and
        no address -> private. Reason: Ray's convention, under which a job's
        driver (where Ray sets ``RAY_ADDRESS``) joins the job's cluster, while
        a cluster merely running on this machine is joined only when asked
        for (``auto``): another user's, or one left running, must not take a
        run silently.
        """
        env = os.environ if env is None else env
        given = (self.address or "").strip()
        named = (env.get(RAY_ADDRESS_ENV) or "").strip()
        if given == "local":
            return None, "--address local"
        if given and given != "auto":
            return given, "--address"
        if named and named != "auto":
            if named == "local":
                return None, f"${RAY_ADDRESS_ENV}=local"
            _check_address(named, f"${RAY_ADDRESS_ENV}")
            return named, f"${RAY_ADDRESS_ENV}"
        if given or named:
            return "auto", "--address auto" if given else f"${RAY_ADDRESS_ENV}=auto"
        return None, f"no --address, no ${RAY_ADDRESS_ENV}"

    def placement_timeout(self) -> float:
        if self.placement_timeout_s is not None:
            return float(self.placement_timeout_s)
        return 900.0 if self.join_address()[0] is not None else 60.0

    def actor_request(self) -> str:
        """What one actor asks for, in words."""
        parts = [f"{self.cpus_per_actor:g} CPU"]
        if self.gpus_per_actor:
            parts.append(f"{self.gpus_per_actor:g} GPU")
        parts += [f"{v:g} {k}" for k, v in sorted(self.resources.items())]
        return ", ".join(parts)

    def local_cpus(self) -> int:
        return int(self.num_cpus or os.cpu_count() or 1)


def recorded_options(solver: SolverOptions, grid: GridOptions) -> dict:
    """What is written to the results' layout and compared on a re-run (options
    left at ``None`` are left out, so they read back as unset)."""
    out = solver.recorded()
    if grid.bounds is not None:
        out["grid_bounds"] = [float(x) for x in grid.bounds]
    out["grid_dims"] = [int(x) for x in grid.dims]
    return out


def parse_grid(text: str) -> tuple[int, int] | None:
    """``"50"`` -> (50, 50); ``"40x60"`` -> H=40, W=60; ``"none"``/``"0"`` -> no grids."""
    t = text.strip().lower()
    if t in ("none", "0", "off", ""):
        return None
    parts = t.split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise OptionsError(f"grid must be H or HxW (e.g. 50x50), got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise OptionsError(f"grid must be H or HxW with positive sizes, got {text!r}")
    return sizes[0], sizes[1]


def format_grid(shape: tuple[int, int] | None) -> str:
    """The text :func:`parse_grid` reads back as ``shape``: ``"50x50"``, or ``"none"``."""
    return "none" if shape is None else f"{shape[0]}x{shape[1]}"


def parse_bounds(text: str | None) -> tuple[float, float, float, float] | None:
    """``"xmin,xmax,ymin,ymax"`` -> a tuple; ``None``/``"auto"`` -> per-problem extents."""
    if text is None or text.strip().lower() in ("auto", ""):
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptionsError(f"grid bounds must be xmin,xmax,ymin,ymax, got {text!r}") from None
    if len(vals) != 4:
        raise OptionsError(f"grid bounds must be 4 numbers xmin,xmax,ymin,ymax, got {text!r}")
    return vals  # type: ignore[return-value]


def parse_dims(text: str) -> tuple[int, int]:
    """``"0,2"`` -> (0, 2)."""
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise OptionsError(f"grid dims must be i,j (e.g. 0,1), got {text!r}") from None
    if len(vals) != 2:
        raise OptionsError(f"grid dims must be two coordinates i,j, got {text!r}")
    return vals  # type: ignore[return-value]
