"""Several Ray nodes (``ray.cluster_utils.Cluster``: a head without CPUs, two
worker nodes of 1 CPU), joined the way a Ray job's driver joins its cluster:
``RAY_ADDRESS`` names it, nothing else does.

* ``raybary run IN OUT`` (no ``--address``) joins it, says so in its first
  line, and runs every shard on its worker nodes, exactly once; a stale
  ``~/.ray/auth_token`` (this cluster has no token authentication) changes
  nothing (it used to turn token mode on and cancel every actor);
* ``raybary.runner.run`` joins it the same way; one worker node is removed
  after its first shard, and the job still completes, exactly once, with
  shards committed on both nodes.

The cluster runs in a subprocess (its own Ray, temp dir and GCS port), so it
neither disturbs the session's local Ray nor other Ray clusters on this
machine. The rules themselves (no Ray) are tested first: ``--address local``
runs on a private Ray whatever ``RAY_ADDRESS`` says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from raybary.errors import OptionsError
from raybary.runner.options import ExecOptions
from raybary.storage import read_results
from raybary.storage.generate import generate


@pytest.mark.parametrize("address,env,expected", [
    (None, {}, (None, "no --address, no $RAY_ADDRESS")),
    (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, ("10.0.0.1:6379", "$RAY_ADDRESS")),
    (None, {"RAY_ADDRESS": " "}, (None, "no --address, no $RAY_ADDRESS")),
    (None, {"RAY_ADDRESS": "local"}, (None, "$RAY_ADDRESS=local")),
    (None, {"RAY_ADDRESS": "auto"}, ("auto", "$RAY_ADDRESS=auto")),
    ("local", {"RAY_ADDRESS": "10.0.0.1:6379"}, (None, "--address local")),
    ("h:1", {"RAY_ADDRESS": "10.0.0.1:6379"}, ("h:1", "--address")),
    ("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}, ("10.0.0.1:6379", "$RAY_ADDRESS")),
    ("auto", {}, ("auto", "--address auto")),
])
def test_which_ray_a_run_uses(address, env, expected):
    exe = ExecOptions(address=address)
    assert exe.join_address(env) == expected


def test_a_dashboard_url_is_not_a_cluster_to_join():
    with pytest.raises(OptionsError, match=r"--address http://h:8265 is a Ray dashboard URL"):
        ExecOptions(address="http://h:8265")
    with pytest.raises(OptionsError, match=r"\$RAY_ADDRESS https://h is a Ray dashboard.*"
                                           r"--address local"):
        ExecOptions().join_address({"RAY_ADDRESS": "https://h"})


SCRIPT = textwrap.dedent("""
    import json, logging, os, signal, subprocess, sys
    from ray.cluster_utils import Cluster
    from raybary.runner import ExecOptions, GridOptions, SolverOptions, run
    from raybary.runner.join import refused

    inp, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "gcs_server_port": port,
                                      "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # as Ray sets it for a job's driver
    seen, removed, at_removal = {}, [], {}

    def cli(output, *args):
        r = subprocess.run([sys.executable, "-m", "raybary", "run", inp, output, "--bar-size",
                            "3", "--grid", "8", "--shard-size", "20", "--json", *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return {"report": json.loads(r.stdout), "stderr": r.stderr}

    def on_shard(summary):
        seen[summary.node] = seen.get(summary.node, 0) + 1
        if not removed:
            # take away the node that reported first, at once: most shards are still
            # waiting (one more is queued on its actor), so the driver has to notice
            # the dead actor, replace it on the other node and move its shards. (Waiting
            # for both nodes to report is a race: once compiled, one node may solve
            # every remaining shard before the other has finished compiling.)
            node = next(w for w in workers if w.node_id == summary.node)
            cluster.remove_node(node, allow_graceful=False)
            try:  # its actor would notice only after a while, and finish shards meanwhile
                os.kill(summary.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            removed.append(node.node_id)
            at_removal.update(seen)

    try:
        info = {"address": cluster.address, "workers": [w.node_id for w in workers],
                "refused": refused(cluster.address)}
        info["cli"] = cli(out + "-cli")
        report = run(inp, out, SolverOptions(bar_size=3), GridOptions(shape=(8, 8)),
                     ExecOptions(actors=2, shard_size=20), stream=None, on_shard=on_shard)
        info.update(report=report.to_dict(), removed=removed,
                    seen_before_removal=list(at_removal))
        print("REPORT " + json.dumps(info))
    finally:
        cluster.shutdown()
""")


def _exactly_once(out: str, n: int) -> None:
    res = read_results(out)
    ids = res.problems.problem_id.tolist()
    assert len(ids) == n and len(set(ids)) == n and res.complete
    assert np.isfinite(res.problems.objective).all()
    assert res.barycenters.groupby("problem_id").size().eq(3).all()


def test_ray_address_joins_two_worker_nodes_and_a_node_lost_mid_run(tmp_path):
    n = 240  # 12 shards of 20
    store = generate(str(tmp_path / "tut.parquet"), n, family="tutorial", seed=11)
    out = str(tmp_path / "out")
    script = tmp_path / "cluster_run.py"
    script.write_text(SCRIPT)
    tmpdir = f"/tmp/rbc{os.getpid()}"
    os.makedirs(tmpdir, exist_ok=True)
    home = tmp_path / "home"  # a token left over from another cluster
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-stale-token-of-another-cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=tmpdir, HOME=str(home))
    try:
        proc = subprocess.run([sys.executable, str(script), store.url, out, "6391"], env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    info = json.loads(lines[-1][len("REPORT "):])
    workers = set(info["workers"])
    assert info["refused"] is False  # the cluster has no token authentication

    # the CLI without --address joined the cluster RAY_ADDRESS names, and said so first
    cli = info["cli"]["report"]
    first = next(ln for ln in info["cli"]["stderr"].splitlines() if ln.startswith("[raybary]"))
    assert first == (f"[raybary] Ray: joined the cluster at {info['address']} ($RAY_ADDRESS): "
                     "3 nodes, 2 CPUs"), info["cli"]["stderr"][-2000:]
    assert cli["cluster"] == {"how": "joined", "address": info["address"],
                              "named_by": "$RAY_ADDRESS", "token_from": None, "nodes": 3,
                              "cpus": 2.0, "gpus": 0.0}
    assert cli["actors"] == 2 and set(cli["shards_by_node"]) <= workers
    assert sum(cli["shards_by_node"].values()) == cli["n_shards"] == 12
    _exactly_once(out + "-cli", n)

    # run() joined through RAY_ADDRESS too; one node was removed after its first shard
    report = info["report"]
    assert report["cluster"]["how"] == "joined" and report["cluster"]["nodes"] == 3
    assert len(info["removed"]) == 1 and info["seen_before_removal"] == info["removed"]
    assert set(report["shards_by_node"]) == workers  # both nodes committed shards
    assert report["actor_replacements"] >= 1 and report["retries"] >= 1, json.dumps(info)[-1500:]
    assert report["complete"] and report["counts"]["ok"] == n
    _exactly_once(out, n)
