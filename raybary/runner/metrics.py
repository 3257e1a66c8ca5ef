"""A run's metrics on Ray's metrics export (Prometheus text, scraped per node).

Two recorders, both made of :mod:`ray.util.metrics` counters, gauges and a
histogram, all tagged ``run`` (the run's id, as in ``RunReport.run_id`` and
the manifest's ``summary``) and ``output`` (the output URL, credentials
redacted):

* :class:`DriverMetrics`, in the driver: what the run report counts — problems
  by status, shards committed (solved or given up), retries, actors replaced —
  and the progress line's numbers as gauges (problems done, problems in the
  input, problems/s). The driver sees every committed shard, including those
  whose actor died before replying, so these counters equal the report's.
* :class:`ShardMetrics`, in each actor: seconds per step and solve seconds per
  problem of the shards that actor solved (per process: Ray adds the node's
  address and the worker's id as labels). An actor killed by the system
  (``SIGKILL``, out of memory) loses what it recorded since its last export.

Ray exports a process's metrics to its node's metrics agent every
``metrics_report_interval_ms`` (``RAY_metrics_report_interval_ms``, 10 s by
default, at least 1 s) and when the process shuts down; the agent serves them
at ``http://NODE:METRICS_EXPORT_PORT/metrics`` as ``ray_`` + the name below
(+ ``_total`` for counters). docs/runner.md ("Metrics") lists them.

Metrics never stop a run: where Ray is not initialised in the process, where
``RAYBARY_METRICS=0``, or once a metric call has raised, the recorders do
nothing. Ray is imported by the methods that use it, not by this module (the
driver imports this before it sets ``RAY_AUTH_MODE``, which Ray reads once).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from raybary.storage._fs import redact_url

if TYPE_CHECKING:
    from raybary.runner.shard import ShardSummary

__all__ = ["METRICS_ENV", "TAG_KEYS", "metrics_enabled", "run_tags", "DriverMetrics",
           "ShardMetrics", "SOLVE_S_BOUNDARIES"]

log = logging.getLogger(__name__)

#: ``RAYBARY_METRICS=0`` (or ``false``, ``no``, ``off``) turns the metrics off.
METRICS_ENV = "RAYBARY_METRICS"
#: The tags of every raybary metric (besides a metric's own: ``status``, ``outcome``, ``step``).
TAG_KEYS = ("run", "output")
#: Buckets (seconds) of ``raybary_solve_seconds_per_problem``.
SOLVE_S_BOUNDARIES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
STEPS = ("read", "solve", "grid", "commit")


def metrics_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``RAYBARY_METRICS`` (in ``env``, default ``os.environ``) leaves the metrics on."""
    value = (os.environ if env is None else env).get(METRICS_ENV, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def run_tags(run_id: str, output_url: str) -> dict[str, str]:
    """The tags of a run's metrics: its id and its output URL (credentials redacted).

    One series per run and label value, not per shard or problem: the number of
    series grows with the number of runs only.
    """
    return {"run": str(run_id), "output": redact_url(output_url)}


class _Metrics:
    """A set of Ray metrics recorded through :meth:`_put`, which turns the
    whole set off (one warning) the first time a metric call raises.

    Reason: metrics are an aid; a Ray without its metrics agent, or a change
    in Ray's metrics API, must not stop a run.
    """

    def __init__(self, tags: Mapping[str, str], enabled: bool | None = None,
                 make: Callable[[], dict[str, Any]] | None = None) -> None:
        self.tags = dict(tags)
        self.metrics: dict[str, Any] = {}
        if enabled is None:
            enabled = metrics_enabled()
        if enabled and make is not None:
            try:
                import ray

                if ray.is_initialized():
                    self.metrics = make()
            except Exception as e:  # noqa: BLE001 - no metrics is not an error
                self._off(e)

    @property
    def enabled(self) -> bool:
        return bool(self.metrics)

    def _off(self, error: BaseException) -> None:
        log.warning("raybary metrics are off in this process (%s: %s)",
                    type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
        self.metrics = {}

    def _put(self, name: str, method: str, value: float, **tags: str) -> None:
        """``metrics[name].method(value)`` with the run's tags and ``tags``."""
        metric = self.metrics.get(name)
        if metric is None:
            return
        try:
            getattr(metric, method)(value, tags={**self.tags, **tags})
        except Exception as e:  # noqa: BLE001 - see the class docstring
            self._off(e)


def _driver_metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge

    return {
        "problems": Counter("raybary_problems", "Problems committed by the run, by status "
                            "(ok, invalid, failed)", tag_keys=(*TAG_KEYS, "status")),
        "shards": Counter("raybary_shards_committed", "Shards committed by the run, by outcome "
                          "(solved, gave_up)", tag_keys=(*TAG_KEYS, "outcome")),
        "retries": Counter("raybary_retries", "Lost shard attempts that were tried again",
                           tag_keys=TAG_KEYS),
        "replaced": Counter("raybary_actors_replaced", "Actors replaced after they died or "
                            "could not start", tag_keys=TAG_KEYS),
        "done": Gauge("raybary_problems_done", "Problems of the input committed (this run's "
                      "and earlier runs')", tag_keys=TAG_KEYS),
        "total": Gauge("raybary_problems_in_input", "Problems in the run's input",
                       tag_keys=TAG_KEYS),
        "rate": Gauge("raybary_problems_per_second", "Problems committed per second since the "
                      "run started (the progress line's rate)", tag_keys=TAG_KEYS),
    }


class DriverMetrics(_Metrics):
    """The driver's metrics of one run, updated from its report and progress.

    :meth:`observe` sets the gauges and adds to each counter what the report
    counts beyond what was already added, so it may be called as often as the
    progress line updates (a few microseconds a call).
    """

    def __init__(self, tags: Mapping[str, str], report, enabled: bool | None = None) -> None:
        super().__init__(tags, enabled, _driver_metrics)
        self.report = report
        self.seen: dict[tuple[str, str], float] = {}  # counter, tag value -> added so far

    def observe(self, done: int, total: int, rate: float) -> None:
        """Gauges: ``done`` of ``total`` problems, ``rate`` problems/s; counters:
        the report's counts so far."""
        if not self.enabled:
            return
        r = self.report
        for status, n in r.counts_run.items():
            self._add("problems", n, status=status)
        self._add("shards", r.shards_run - r.shards_given_up, outcome="solved")
        self._add("shards", r.shards_given_up, outcome="gave_up")
        self._add("retries", r.retries)
        self._add("replaced", r.actor_replacements)
        self._put("done", "set", float(done))
        self._put("total", "set", float(total))
        self._put("rate", "set", float(rate))

    def _add(self, name: str, count: float, **tags: str) -> None:
        key = (name, ",".join(tags.values()))
        delta = count - self.seen.get(key, 0)
        if delta > 0:  # Ray's counters take positive increments only
            self.seen[key] = count
            self._put(name, "inc", delta, **tags)


def _shard_metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Histogram

    return {
        "seconds": Counter("raybary_actor_seconds", "Seconds the actors spent on shards, by "
                           "step (read, solve, grid, commit)", tag_keys=(*TAG_KEYS, "step")),
        "per_problem": Histogram("raybary_solve_seconds_per_problem", "Solve seconds per "
                                 "problem, one observation per solved shard (its solve "
                                 "seconds over its valid problems)",
                                 boundaries=SOLVE_S_BOUNDARIES, tag_keys=TAG_KEYS),
    }


class ShardMetrics(_Metrics):
    """An actor's metrics: what each shard it solved cost."""

    def __init__(self, tags: Mapping[str, str], enabled: bool | None = None) -> None:
        super().__init__(tags, enabled, _shard_metrics)

    def shard_done(self, out: ShardSummary) -> None:
        """Record the step seconds of ``out`` and, for a solved shard with valid
        problems, its solve seconds per valid problem."""
        if not self.enabled:
            return
        for step in STEPS:
            seconds = float(getattr(out, f"{step}_s"))
            if seconds > 0:
                self._put("seconds", "inc", seconds, step=step)
        valid = out.n_problems - int(out.counts.get("invalid", 0))
        if not out.gave_up and valid > 0:
            self._put("per_problem", "observe", out.solve_s / valid)
