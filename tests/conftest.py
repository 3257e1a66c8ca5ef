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
