"""Shared pytest fixtures."""

from __future__ import annotations

import uuid

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
