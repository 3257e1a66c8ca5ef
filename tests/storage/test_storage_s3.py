"""The storage layer on a real S3-protocol server (moto on loopback, fixture ``s3``),
reached through s3fs: storage options at every entry point, fsspec's own
configuration, the environment, the lease and commit markers on an object store.

No Ray and no JAX here (results are written with stand-in outcomes);
``tests/runner/test_runner_s3.py`` runs the solver on the same server.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raybary.cli import main
from raybary.storage import ResultsConflictError, ResultWriter, _fs, open_store, read_results
from raybary.storage.conversion import convert, write_problems
from raybary.storage.generate import generate, tutorial_problems
from raybary.storage.options import StorageOptions, parse_storage_option, storage_options_from
from raybary.storage.results import OutputLease, summarize
from raybary.types import BatchOutcome, Result

pytestmark = pytest.mark.usefixtures("s3")
N, SHARD = 25, 10


def _results(url: str, options, n_shards_committed: int | None = None) -> ResultWriter:
    """A results directory at ``url`` with stand-in results; all shards committed
    unless ``n_shards_committed``. Returns its writer (finalised)."""
    writer = ResultWriter(url, n_problems=N, shard_size=SHARD, grid_shape=(4, 3),
                          options={"bar_size": 2}, input_url="s3://elsewhere/in.zarr",
                          storage_options=options)
    writer.lease.acquire()
    writer.prepare()
    for shard in range(writer.n_shards if n_shards_committed is None else n_shards_committed):
        start, stop = writer.shard_range(shard)
        ids = np.arange(start, stop) * 10
        results = [Result(np.full(2, 0.5), np.eye(2) + pid, np.tile(np.eye(2), (2, 1, 1)),
                          objective=float(pid), converged=True, iterations=3,
                          marginal_error=0.0) for pid in ids]
        outcome = BatchOutcome(ids, ["ok"] * len(ids), [None] * len(ids), results,
                               np.ones(len(ids)))
        writer.committer.commit_shard(shard, outcome)
    writer.finalize({})
    writer.lease.release()
    return writer


def test_every_entry_point_takes_storage_options(s3):
    server, root = s3
    opts = server.options
    zarr_url, pq_url = f"{root}/in.zarr", f"{root}/in.parquet"
    store = generate(zarr_url, 30, family="tutorial", seed=3, storage_options=opts)
    assert store.n_problems == 30 and store.storage_options == StorageOptions(opts)
    again = open_store(zarr_url, storage_options=opts)
    assert again.read(0, 30).problem_ids.tolist() == list(range(30))
    conv = convert(zarr_url, pq_url, storage_options=opts)  # S3 -> S3, same options
    assert conv.format.startswith("raybary.problems.parquet")
    a, b = open_store(pq_url, storage_options=opts).read(5, 9), again.read(5, 9)
    np.testing.assert_array_equal(a.problems[2].gmms[1].covs, b.problems[2].gmms[1].covs)
    problems = tutorial_problems(3, seed=1)
    small = write_problems(f"{root}/small.parquet", problems, storage_options=opts)
    assert small.n_problems == 3
    # an opened store pickles with its options (what Ray ships to the actors)
    clone = pickle.loads(pickle.dumps(again))
    assert clone.read(0, 2).problem_ids.tolist() == [0, 1]

    _results(f"{root}/out", opts)
    res = read_results(f"{root}/out", storage_options=opts)
    assert res.complete and res.problems.problem_id.tolist() == list(range(0, 250, 10))
    assert res.grids(0, 3).barycenter.shape == (3, 4, 3)  # grids read with the same options
    assert "shards: 3/3 committed, finished" in summarize(f"{root}/out", storage_options=opts)


def test_without_the_options_the_server_refuses_and_no_value_is_shown(s3):
    server, root = s3
    generate(f"{root}/in.parquet", 4, storage_options=server.options)
    wrong = {**server.options, "secret": "not-the-secret-at-all"}
    with pytest.raises(PermissionError) as e:
        open_store(f"{root}/in.parquet", storage_options=wrong)
    assert "not-the-secret-at-all" not in str(e.value)
    # an option s3fs does not take: refused (at the first request) by name, not by value
    with pytest.raises(TypeError, match="unexpected keyword argument 'unknown'") as e:
        open_store(f"{root}/in.parquet", storage_options={**server.options, "unknown": "sEcReT-vAlUe"})
    assert "sEcReT-vAlUe" not in str(e.value) and server.secret not in str(e.value)


def test_options_a_filesystem_refuses_when_it_is_made_are_named_not_shown():
    with pytest.raises(ValueError, match=r"cannot open dir://x with the storage options given "
                                         r"\(path, target_protocol\): Protocol not known: \*\*\*") as e:
        _fs.url_to_fs("dir://x", {"path": "/tmp", "target_protocol": "sEcReT-protocol"})
    assert "sEcReT" not in str(e.value)


def test_storage_options_never_show_their_values(s3):
    server, root = s3
    opts = StorageOptions(server.options)
    assert repr(opts) == "StorageOptions(endpoint_url=***, key=***, secret=***)"
    assert str(opts) == repr(opts) and server.secret not in f"{opts}"
    writer = _results(f"{root}/out", server.options)
    store = generate(f"{root}/in.zarr", 5, storage_options=server.options)
    res = read_results(f"{root}/out", storage_options=server.options)
    for obj in (writer.committer, store, res, opts):
        assert server.secret not in repr(obj) and server.key not in repr(obj), type(obj)
    fs, path = _fs.url_to_fs(f"{root}/out", opts)
    for name in ("_layout.json", "_manifest.json"):
        text = fs.cat_file(f"{path}/{name}").decode()
        assert server.secret not in text and server.key not in text and server.endpoint not in text
    assert opts.redact(f"secret {server.secret} in a message") == "secret *** in a message"


def test_parse_storage_option():
    assert parse_storage_option("endpoint_url=http://h:9000") == ("endpoint_url", "http://h:9000")
    assert parse_storage_option("anon=true") == ("anon", True)
    assert parse_storage_option("client_kwargs={\"region_name\": \"auto\"}") == \
        ("client_kwargs", {"region_name": "auto"})
    assert parse_storage_option("key=\"1234\"") == ("key", "1234")  # quoted: stays a string
    assert parse_storage_option("token=a=b==") == ("token", "a=b==")  # the first '=' splits
    with pytest.raises(ValueError, match="KEY=VALUE") as e:
        parse_storage_option("s3cr3t-without-a-key")
    assert "s3cr3t" not in str(e.value)
    env = {"RAYBARY_STORAGE_OPTIONS": '{"key": "a", "secret": "b"}'}
    got = storage_options_from(["secret=c", "anon=false"], environ=env)
    assert dict(got) == {"key": "a", "secret": "c", "anon": False}  # flags over the variable
    with pytest.raises(ValueError, match=r"\$RAYBARY_STORAGE_OPTIONS is not valid JSON") as e:
        storage_options_from([], environ={"RAYBARY_STORAGE_OPTIONS": "{'secret': 'pw42'}"})
    assert "pw42" not in str(e.value)


def test_fsspec_configuration_still_applies_under_explicit_options(s3, monkeypatch):
    """fsspec.config.conf (its config files and FSSPEC_S3_* variables, read when fsspec
    is imported) gives the endpoint; explicit options give only the credentials."""
    import fsspec.config

    server, root = s3
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": server.endpoint})
    credentials = {"key": server.key, "secret": server.secret}
    store = generate(f"{root}/in.parquet", 4, storage_options=credentials)
    assert open_store(f"{root}/in.parquet", storage_options=credentials).n_problems == 4
    assert store.read(0, 4).n_invalid == 0


def test_fsspec_environment_variable_and_cli_flags_in_a_fresh_process(s3):
    """``FSSPEC_S3_ENDPOINT_URL`` (read by fsspec at import) with the credentials as
    ``--storage-option``: ``raybary generate`` and ``show`` in a new process, no AWS variable."""
    server, root = s3
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(FSSPEC_S3_ENDPOINT_URL=server.endpoint, AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    flags = ["--storage-option", f"key={server.key}", "--storage-option", f"secret={server.secret}"]
    url = f"{root}/in.zarr"
    for args in (["generate", url, "--problems", "7", *flags], ["show", url, *flags]):
        p = subprocess.run([sys.executable, "-m", "raybary", *args], env=env,
                           capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stderr[-2000:]
        assert server.secret not in p.stdout + p.stderr
    assert "n_problems: 7" in p.stdout and "all 7 problems: 0 invalid" in p.stdout


def test_environment_configuration(s3, monkeypatch):
    """AWS_* variables alone (AWS_ENDPOINT_URL included): no storage option at all."""
    server, root = s3
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    generate(f"{root}/in.parquet", 6)
    assert open_store(f"{root}/in.parquet").n_problems == 6
    _results(f"{root}/out", None)
    assert read_results(f"{root}/out").complete
    r = CliRunner().invoke(main, ["show", f"{root}/out"])
    assert r.exit_code == 0 and "status: ok 25, invalid 0, failed 0" in r.output, r.output


def test_cli_storage_options_and_their_variable(s3):
    server, root = s3
    flags = [f"--storage-option=endpoint_url={server.endpoint}", "--storage-option",
             f"key={server.key}", "--storage-option", f"secret={server.secret}"]
    r = CliRunner().invoke(main, ["generate", f"{root}/in.zarr", "--problems", "12", *flags])
    assert r.exit_code == 0, r.output
    # two buckets' worth of options: the output's replace the input's there
    r = CliRunner().invoke(main, ["convert", f"{root}/in.zarr", f"{root}/copy.parquet", *flags,
                                  "--output-storage-option", f"endpoint_url={server.endpoint}",
                                  "--output-storage-option", f"key={server.key}",
                                  "--output-storage-option", f"secret={server.secret}"])
    assert r.exit_code == 0, r.output
    env = {"RAYBARY_STORAGE_OPTIONS": json.dumps(server.options)}
    r = CliRunner().invoke(main, ["show", f"{root}/copy.parquet"], env=env)
    assert r.exit_code == 0 and "n_problems: 12" in r.output, r.output
    assert server.secret not in r.output
    # a wrong secret in the output's options: refused by the server, nothing printed of it
    r = CliRunner().invoke(main, ["convert", f"{root}/in.zarr", f"{root}/copy2.parquet", *flags,
                                  "--output-storage-option", "secret=wrong-wrong-wrong"])
    assert r.exit_code != 0 and "wrong-wrong-wrong" not in r.output
    r = CliRunner().invoke(main, ["show", f"{root}/copy.parquet", "--storage-option", "nokey"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_one_writer_per_output_on_s3(s3):
    """The lease is created with a conditional write (If-None-Match): a second run
    is refused while the first holds the output, and an exclusive create loses."""
    server, root = s3
    opts = server.options
    first = OutputLease(f"{root}/out", "run-a", opts)
    first.acquire()
    second = OutputLease(f"{root}/out", "run-b", opts)
    with pytest.raises(ResultsConflictError, match="another run is writing .* run run-a"):
        second.acquire()
    fs, path = _fs.url_to_fs(f"{root}/out", opts)
    assert json.loads(fs.cat_file(f"{path}/_lease.json"))["run_id"] == "run-a"
    assert first.heartbeat() and not second.held
    # the conditional write itself: the second create of one object loses
    other = f"{path}-other/x.json"
    assert _fs.write_bytes_exclusive(fs, other, b"1", f"{path}-other/_tmp")
    assert not _fs.write_bytes_exclusive(fs, other, b"2", f"{path}-other/_tmp")
    assert fs.cat_file(other) == b"1"
    first.release()
    second.acquire()  # free now
    assert second.held and json.loads(fs.cat_file(f"{path}/_lease.json"))["run_id"] == "run-b"
    second.release()


def test_a_shard_without_its_marker_is_never_read(s3):
    """Object stores have no rename: a shard's tables may be there before its
    marker (an actor died mid-commit). Readers follow the markers only."""
    server, root = s3
    opts, out = server.options, f"{root}/out"
    writer = _results(out, opts, n_shards_committed=2)  # shards 0 and 1; shard 2 missing
    fs, path = _fs.url_to_fs(out, opts)
    # shard 2's tables written, its marker not (as by an actor that died after them)
    table = pq.read_table(fs.open(f"{path}/problems/shard-000000.parquet"))
    for sub in ("problems", "barycenters"):
        with fs.open(f"{path}/{sub}/shard-000002.parquet", "wb") as f:
            pq.write_table(table, f)
    res = read_results(out, storage_options=opts)
    assert res.committed_shards == [0, 1] and len(res.problems) == 20 and not res.complete
    assert res.problems.problem_id.is_unique
    text = summarize(out, storage_options=opts)
    assert "shards: 2/3 committed" in text and "status: ok 20, invalid 0, failed 0" in text
    # a marker whose tables carry another commit id is left out too
    marker = json.loads(fs.cat_file(f"{path}/_commits/shard-000001.json"))
    fs.pipe_file(f"{path}/_commits/shard-000001.json", json.dumps(
        {**marker, "commit": "0" * 32, "grids": f"shard-000001-{'0' * 32}"}).encode())
    with pytest.warns(UserWarning, match="shard 1 is being rewritten"):
        res = read_results(out, storage_options=opts)
    assert res.committed_shards == [0]
    # the next run's finalize drops the unverified marker and the orphan tables
    writer = ResultWriter(out, n_problems=N, shard_size=SHARD, grid_shape=(4, 3),
                          options={"bar_size": 2}, input_url="s3://elsewhere/in.zarr",
                          storage_options=opts)
    assert writer.prepare() == {0}
    manifest = writer.finalize({})
    assert manifest["missing_shards"] == [1, 2]
    assert not fs.exists(f"{path}/problems/shard-000002.parquet")


def test_a_zarr_store_moved_into_place_gets_its_root_metadata_last(s3, monkeypatch):
    """No rename on S3: the finished store is copied object by object, the root
    ``zarr.json`` last, so a copy cut short is no store rather than one with chunks missing."""
    import s3fs

    server, root = s3
    copied = []
    real = s3fs.S3FileSystem.copy

    def spy(self, path1, path2, *args, **kwargs):
        copied.append(path2)
        return real(self, path1, path2, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "copy", spy)
    store = generate(f"{root}/in.zarr", 9, storage_options=server.options)
    assert store.n_problems == 9
    assert copied[-1].endswith("/in.zarr/zarr.json") and len(copied) > 5
    assert all("/in.zarr/" in p for p in copied)
    fs, path = _fs.url_to_fs(root, server.options)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path)) == ["in.zarr"]  # no temporary left
    # cut short before the root metadata: refused, not read with chunks missing
    fs.rm(f"{path}/in.zarr/zarr.json")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ValueError, match="not a Zarr group"):
        open_store(f"{root}/in.zarr", storage_options=server.options)


def test_lease_heartbeat_stale_takeover_on_s3(s3):
    from raybary.storage.results import LEASE_STALE_S

    server, root = s3
    fs, path = _fs.url_to_fs(f"{root}/out", server.options)
    fs.pipe_file(f"{path}/_lease.json", json.dumps(
        {"run_id": "dead", "host": "elsewhere", "pid": 1,
         "heartbeat": time.time() - 2 * LEASE_STALE_S}).encode())
    lease = OutputLease(f"{root}/out", "new", server.options)
    with pytest.warns(UserWarning, match="taking over .* from run dead"):
        lease.acquire()
    assert json.loads(fs.cat_file(f"{path}/_lease.json"))["run_id"] == "new"
    lease.release()
