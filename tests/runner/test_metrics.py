"""Run metrics on Ray's metrics export: read back from the node's Prometheus
endpoint of the session's local Ray, they say what the run report says.

Two runs of a small store with two invalid problems: one whose actors die on
shard 2 until it is given up (retries, replacements, failed problems), one
without faults (every actor ends normally, so the actors' own metrics are
complete). Both are read back in one wait: Ray exports a process's metrics
every few seconds.
"""

from __future__ import annotations

import logging
import os

import pytest
from metrics_scrape import node_metrics_url, wait_for
from stores import write_broken_copy

from raybary.runner import ExecOptions, GridOptions, SolverOptions, run
from raybary.runner.actor import actor_env
from raybary.runner.metrics import DriverMetrics, ShardMetrics, metrics_enabled, run_tags
from raybary.runner.shard import ShardSummary
from raybary.storage.generate import generate

N, SHARD = 40, 10
SOLVER = SolverOptions(bar_size=3)
BAD = {11: "weight", 14: "cov"}  # two invalid problems, in shard 1

pytestmark = pytest.mark.usefixtures("ray_local")


def test_the_switch_and_the_tags(monkeypatch):
    assert metrics_enabled({}) and metrics_enabled({"RAYBARY_METRICS": "1"})
    for off in ("0", "false", "No", " off "):
        assert not metrics_enabled({"RAYBARY_METRICS": off}), off
    assert run_tags("ab12", "s3://key:secret@bucket/out") == {"run": "ab12",
                                                               "output": "s3://***@bucket/out"}
    monkeypatch.setenv("RAYBARY_METRICS", "0")
    assert not DriverMetrics({"run": "x", "output": "y"}, report=None).enabled
    assert not ShardMetrics({"run": "x", "output": "y"}).enabled
    assert actor_env(ExecOptions())["RAYBARY_METRICS"] == "0"  # the actors do as the driver
    monkeypatch.delenv("RAYBARY_METRICS")
    assert "RAYBARY_METRICS" not in actor_env(ExecOptions())
    assert ShardMetrics({"run": "x", "output": "y"}).enabled  # Ray is up in this process


def test_a_failing_metric_call_turns_metrics_off_not_the_run(caplog):
    """Ray refuses a record without all of a metric's tags (a ValueError): the
    recorder warns once and records nothing more, without raising."""
    m = ShardMetrics({"run": "x"})  # no "output" tag
    assert m.enabled
    summary = ShardSummary(0, 0, 10, {"ok": 10}, solve_s=1.0)
    with caplog.at_level(logging.WARNING, logger="raybary.runner.metrics"):
        m.shard_done(summary)
        m.shard_done(summary)
    assert not m.enabled
    warned = [r for r in caplog.records if "metrics are off" in r.getMessage()]
    assert len(warned) == 1 and "Missing value for tag key(s): output" in warned[0].getMessage()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    clean = generate(str(root / "in.parquet"), N, family="tutorial", seed=7)
    return root, write_broken_copy(clean, root / "bad.parquet", BAD)


def test_run_metrics_reach_the_nodes_prometheus_endpoint(store):
    from raybary.runner.actor import ShardWorker

    class DiesOnShard2(ShardWorker):  # in the test: Ray ships it by value
        def run_shard(self, shard_index: int):
            if shard_index == 2:
                os._exit(70)
            return super().run_shard(shard_index)

    root, bad = store
    grid = GridOptions(shape=None)
    faulty = run(bad, str(root / "faulty"), SOLVER, grid,
                 ExecOptions(actors=1, shard_size=SHARD, max_attempts=2), stream=None,
                 _worker=DiesOnShard2)
    clean = run(bad, str(root / "clean"), SOLVER, grid,
                ExecOptions(actors=2, shard_size=SHARD), stream=None)
    assert faulty.counts_run == {"ok": 28, "invalid": 2, "failed": 10}, faulty
    assert faulty.shards_given_up == 1 and faulty.retries == 1, faulty
    assert faulty.actor_replacements >= 2, faulty
    assert clean.counts_run == {"ok": 38, "invalid": 2, "failed": 0}, clean
    assert faulty.run_id and clean.run_id and faulty.run_id != clean.run_id

    url = node_metrics_url()
    want_faulty = {
        ("ray_raybary_problems_total", "ok"): 28.0,
        ("ray_raybary_problems_total", "invalid"): 2.0,
        ("ray_raybary_problems_total", "failed"): 10.0,
        ("ray_raybary_shards_committed_total", "solved"): 3.0,
        ("ray_raybary_shards_committed_total", "gave_up"): 1.0,
        ("ray_raybary_retries_total",): 1.0,
        ("ray_raybary_actors_replaced_total",): float(faulty.actor_replacements),
        ("ray_raybary_problems_done",): float(N),
        ("ray_raybary_problems_in_input",): float(N),
    }
    want_clean = {
        ("ray_raybary_problems_total", "ok"): 38.0,
        ("ray_raybary_problems_total", "invalid"): 2.0,
        ("ray_raybary_shards_committed_total", "solved"): 4.0,
        ("ray_raybary_problems_done",): float(N),
        # the actors' own: one observation per solved shard
        ("ray_raybary_solve_seconds_per_problem_count",): 4.0,
    }

    def has(want):
        return lambda got: all(got.get(k) == v for k, v in want.items())

    got = wait_for(url, faulty.run_id, has(want_faulty))
    assert {k: got.get(k) for k in want_faulty} == want_faulty, got
    assert 0 < got[("ray_raybary_problems_per_second",)] <= N
    got = wait_for(url, clean.run_id, has(want_clean))
    assert {k: got.get(k) for k in want_clean} == want_clean, got
    # a counter appears with its first count
    assert ("ray_raybary_retries_total",) not in got
    assert ("ray_raybary_problems_total", "failed") not in got
    # the actors' solve seconds are the report's (the same numbers, summed in float32 or not)
    assert got[("ray_raybary_actor_seconds_total", "solve")] == \
        pytest.approx(clean.step_seconds["solve_s"], rel=1e-3)
    per_problem = got[("ray_raybary_solve_seconds_per_problem_sum",)]
    assert per_problem == pytest.approx(clean.step_seconds["solve_s"] / SHARD, rel=0.5)
    assert got[("ray_raybary_solve_seconds_per_problem_bucket", "+Inf")] == 4.0
