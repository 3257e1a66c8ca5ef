"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest


@pytest.fixture
def mem_url():
    """A fresh ``memory://`` prefix (fsspec's in-memory filesystem), removed afterwards."""
    import fsspec

    root = f"memory://raybary-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://"):]
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs, no dashboard), started
    lazily by the first test that asks for it; yields its GCS address.

    ``address="local"`` always starts a private instance, never one found via
    ``RAY_ADDRESS`` or ``/tmp/ray`` (other Ray clusters may run on this machine).
    """
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                   log_to_driver=False, logging_level=logging.WARNING)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@dataclass(frozen=True)
class S3Server:
    """An S3-protocol server on loopback that accepts one key pair only.

    ``options``: the fsspec storage options that reach it (``endpoint_url``,
    ``key``, ``secret``); ``env``: the same as AWS environment variables."""

    endpoint: str
    key: str
    secret: str
    bucket: str

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    @property
    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}


#: The AWS variables a test clears to be sure S3 is reached through storage options alone.
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
           "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's ``ThreadedMotoServer``) on 127.0.0.1, for the
    session, with authentication on: only the IAM key pair it yields is accepted
    (a wrong secret gets 403), so a test whose actors lacked the storage options
    would fail. One bucket; tests write under their own prefixes."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import json
    import logging

    import boto3
    from moto import settings

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
             "aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="raybary-test")
    iam.put_user_policy(UserName="raybary-test", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    pair = iam.create_access_key(UserName="raybary-test")["AccessKey"]
    bucket = "raybary-test"
    boto3.client("s3", **admin).create_bucket(Bucket=bucket)
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated
    try:
        yield S3Server(endpoint, pair["AccessKeyId"], pair["SecretAccessKey"], bucket)
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """``(server, prefix)``: the session's S3 server and a fresh ``s3://bucket/<id>``
    prefix, with no AWS variable in this process's environment and no cached
    S3 filesystem (fsspec caches them by their options, which the environment
    does not enter)."""
    import s3fs

    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # not the user's ~/.aws
        monkeypatch.setenv(name, "/nonexistent/raybary-test-aws")
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server, f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem.clear_instance_cache()
