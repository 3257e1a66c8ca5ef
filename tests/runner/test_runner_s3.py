"""The runner on object storage: a real S3-protocol server on loopback (moto, fixture
``s3``, which accepts one key pair only), the session's local Ray (``ray_local``).

Two ways to reach the store, both end to end (generate, run with 2 actors,
read_results, show, plot): storage options alone (no AWS variable in the
driver; the actors' environment even points elsewhere, so only options that
reach them as arguments work), and the AWS environment alone.

Small stores and the shapes of tests/runner/test_runner.py (tutorial problems,
shards of 10, 8x8 grids, 3 components): few JAX compiles.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from raybary.cli import main
from raybary.runner import ExecOptions, GridOptions, SolverOptions, run
from raybary.runner.actor import ShardWorker
from raybary.storage import ResultsConflictError, _fs, read_results
from raybary.storage.generate import generate

SHARD, GRID = 10, (8, 8)
SOLVER = SolverOptions(bar_size=3)
GRIDS = GridOptions(shape=GRID, input_gmms=3)

pytestmark = pytest.mark.usefixtures("ray_local")


def exe(**kw) -> ExecOptions:
    kw.setdefault("actors", 2)
    return ExecOptions(shard_size=SHARD, **kw)


#: The actors' environment in the storage-options test: AWS variables that lead nowhere
#: (a closed port, an unknown key), so a shard succeeds only with the options.
WRONG_AWS_ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "AKIANOWHERE",
                 "AWS_SECRET_ACCESS_KEY": "nowhere", "AWS_DEFAULT_REGION": "us-east-1"}


def dies_mid_commit_once() -> type[ShardWorker]:
    """A worker whose first attempt at shard 2 writes the shard's problems table,
    then dies before the marker (as an actor killed mid-commit). "First" across
    processes: whoever creates the flag object on the store (a conditional
    write). Defined in a function: Ray ships it by value."""

    class DiesMidCommitOnce(ShardWorker):
        def run_shard(self, shard_index: int):
            if shard_index == 2:
                fs, root = self.committer.filesystem()
                if _fs.write_bytes_exclusive(fs, root + "-kill/flag", b"1", root + "-kill/_tmp"):
                    fs.pipe_file(root + "/problems/shard-000002.parquet", b"half a commit")
                    os._exit(70)
            return super().run_shard(shard_index)

    return DiesMidCommitOnce


def check_exactly_once(res, n: int) -> None:
    ids = res.problems.problem_id.tolist()
    assert len(ids) == n and len(set(ids)) == n
    assert res.problems.position.tolist() == list(range(n))
    assert res.complete and (res.problems.status == "ok").all()
    assert res.barycenters.groupby("problem_id").size().eq(3).all()


def _flags(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in ("--storage-option", f"{k}={v}")]


def test_run_with_storage_options_kill_resume_read_show_plot(s3, tmp_path):
    server, root = s3
    opts, n = server.options, 40
    src, out = f"{root}/in.zarr", f"{root}/out"
    generate(src, n, family="tutorial", seed=7, storage_options=opts)

    report = run(src, out, SOLVER, GRIDS, exe(actor_env=WRONG_AWS_ENV), storage_options=opts,
                 stream=None, _worker=dies_mid_commit_once())
    assert report.complete and report.counts == {"ok": n, "invalid": 0, "failed": 0}
    assert report.actor_replacements >= 1 and report.retries >= 1, report
    assert server.secret not in json.dumps(report.to_dict(), default=str)
    res = read_results(out, storage_options=opts)
    check_exactly_once(res, n)
    fs, path = _fs.url_to_fs(out, opts)
    for name in ("_layout.json", "_manifest.json"):
        text = fs.cat_file(f"{path}/{name}").decode()
        assert server.secret not in text and server.key not in text

    # resume: as after a run stopped before committing shards 0 and 3
    before = res.problems.set_index("position").objective
    commits = {i: json.loads(fs.cat_file(f"{path}/_commits/shard-{i:06d}.json"))["commit"]
               for i in (1, 2)}
    for i in (0, 3):
        fs.rm(f"{path}/_commits/shard-{i:06d}.json")
    fs.rm(f"{path}/_manifest.json")
    partial = read_results(out, storage_options=opts)
    assert partial.committed_shards == [1, 2] and not partial.complete
    r = CliRunner().invoke(main, ["run", src, out, "--bar-size", "3", "--grid", "8x8",
                                  "--input-grids", "3", "--shard-size", str(SHARD),
                                  "--actors", "2", "-q", "--json", *_flags(opts)])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["shards_run"] == 2 and again["shards_skipped"] == 2, again
    assert server.secret not in r.output
    res = read_results(out, storage_options=opts)
    check_exactly_once(res, n)
    np.testing.assert_allclose(res.problems.set_index("position").objective, before, rtol=1e-9)
    for i, commit in commits.items():  # committed shards were kept as they were
        assert json.loads(fs.cat_file(f"{path}/_commits/shard-{i:06d}.json"))["commit"] == commit

    r = CliRunner().invoke(main, ["show", out, *_flags(opts)])
    assert r.exit_code == 0 and f"status: ok {n}, invalid 0, failed 0" in r.output, r.output
    assert "shards: 4/4 committed, finished" in r.output and server.secret not in r.output
    pytest.importorskip("matplotlib")
    fig = tmp_path / "fig.png"
    r = CliRunner().invoke(main, ["plot", out, "--problem", "12", "--source", "stored",
                                  "-o", str(fig), *_flags(opts)])
    assert r.exit_code == 0, r.output
    assert fig.stat().st_size > 10_000


def test_a_second_run_is_refused_while_the_first_holds_the_output(s3):
    import socket
    import time

    server, root = s3
    opts = server.options
    src, out = f"{root}/in.parquet", f"{root}/out"
    generate(src, 20, family="tutorial", seed=7, storage_options=opts)
    fs, path = _fs.url_to_fs(out, opts)
    lease = {"run_id": "busy", "host": socket.gethostname() + "-elsewhere", "pid": 42,
             "heartbeat": time.time()}
    fs.pipe_file(f"{path}/_lease.json", json.dumps(lease).encode())
    with pytest.raises(ResultsConflictError, match="another run is writing .* run busy"):
        run(src, out, SOLVER, GRIDS, exe(), storage_options=opts, stream=None)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True)] == ["_lease.json"]


def test_run_configured_by_the_environment(s3, monkeypatch, tmp_path):
    """AWS_* variables only (AWS_ENDPOINT_URL included): the driver's own, and the
    actors' through their runtime environment (Ray's workers do not see variables
    the driver sets after Ray started; ``raybary submit --env`` or an embedded
    Ray started afterwards gives them the same way)."""
    server, root = s3
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    src, out, n = f"{root}/in.parquet", f"{root}/out", 20
    generate(src, n, family="tutorial", seed=7)
    report = run(src, out, SOLVER, GRIDS, exe(actor_env=server.env), stream=None)
    assert report.complete and report.actors == 2
    check_exactly_once(read_results(out), n)
    r = CliRunner().invoke(main, ["show", out])
    assert r.exit_code == 0 and f"status: ok {n}, invalid 0, failed 0" in r.output, r.output
    pytest.importorskip("matplotlib")
    fig = tmp_path / "gallery.png"
    r = CliRunner().invoke(main, ["plot", out, "--gallery", "2", "--source", "stored",
                                  "-o", str(fig)])
    assert r.exit_code == 0, r.output
    assert fig.stat().st_size > 10_000
