"""Several Ray nodes (``ray.cluster_utils.Cluster``): shards spread over two
worker nodes, one node is removed mid-run, the job still completes.

The cluster runs in a subprocess (its own Ray, temp dir and GCS port), so it
neither disturbs the session's local Ray nor other Ray clusters on this
machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from raybary.storage import read_results
from raybary.storage.generate import generate

SCRIPT = textwrap.dedent("""
    import json, logging, os, signal, sys
    import ray
    from ray.cluster_utils import Cluster
    from raybary.runner import ExecOptions, GridOptions, SolverOptions, run

    inp, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "gcs_server_port": port,
                                      "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    seen, removed, at_removal = {}, [], {}

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
        report = run(inp, out, SolverOptions(bar_size=3), GridOptions(shape=(8, 8)),
                     ExecOptions(actors=2, shard_size=40), stream=None, on_shard=on_shard)
        print("REPORT " + json.dumps({
            "report": report.to_dict(), "removed": removed, "seen_before_removal": list(at_removal),
            "workers": [w.node_id for w in workers],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_worker_nodes_and_a_node_lost_mid_run(tmp_path):
    n = 600
    store = generate(str(tmp_path / "tut.parquet"), n, family="tutorial", seed=11)
    out = str(tmp_path / "out")
    script = tmp_path / "cluster_run.py"
    script.write_text(SCRIPT)
    tmpdir = f"/tmp/rbc{os.getpid()}"
    os.makedirs(tmpdir, exist_ok=True)
    env = {**os.environ, "RAY_TMPDIR": tmpdir}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(script), store.url, out, "6391"], env=env,
                          capture_output=True, text=True, timeout=420)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    info = json.loads(lines[-1][len("REPORT "):])
    report = info["report"]
    # one node was removed after its first shard; shards ran on both worker nodes
    assert len(info["removed"]) == 1 and info["seen_before_removal"] == info["removed"]
    assert set(report["shards_by_node"]) == set(info["workers"])
    assert report["actor_replacements"] >= 1 and report["retries"] >= 1, json.dumps(info)[-1500:]
    assert report["complete"] and report["counts"]["ok"] == n
    res = read_results(out)
    ids = res.problems.problem_id.tolist()
    assert len(ids) == n and len(set(ids)) == n and res.complete
    assert np.isfinite(res.problems.objective).all()
    assert res.barycenters.groupby("problem_id").size().eq(3).all()
