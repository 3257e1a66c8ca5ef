"""Small fsspec helpers shared by the readers and writers.

Every URL handled by the storage layer goes through :func:`url_to_fs`, so a
local path, ``file://``, ``memory://`` or ``s3://`` all work the same way.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

__all__ = [
    "url_to_fs",
    "is_local",
    "join_url",
    "strip_url",
    "atomic_output",
    "write_bytes_atomic",
    "write_json_atomic",
    "read_json",
]


def url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """Return the fsspec filesystem and the filesystem path of ``url``."""
    return fsspec.core.url_to_fs(str(url))


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (native pyarrow I/O can be used)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def strip_url(url: str) -> str:
    """``url`` without a trailing slash."""
    url = str(url)
    while url.endswith("/") and not url.endswith("://"):
        url = url[:-1]
    return url


def join_url(url: str, *parts: str) -> str:
    """Join path components onto a URL or path with ``/``."""
    out = strip_url(url)
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def _sibling_tmp(url: str) -> str:
    """A hidden temporary URL next to ``url`` (same directory, same filesystem)."""
    fs, path = url_to_fs(strip_url(url))
    head, tail = posixpath.split(path)
    tmp = posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")
    return tmp if is_local(fs) else fs.unstrip_protocol(tmp)


@contextlib.contextmanager
def atomic_output(url: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling URL; move it onto ``url`` when the block succeeds.

    On failure the temporary output is removed and ``url`` is untouched, so a
    refused or crashed conversion never leaves a half-written store behind.
    Raises ``FileExistsError`` if ``url`` exists and ``overwrite`` is false
    (checked before the block runs).
    """
    fs, path = url_to_fs(url)
    if fs.exists(path) and not overwrite:
        raise FileExistsError(f"{url} already exists (pass overwrite=True / --overwrite to replace it)")
    tmp_url = _sibling_tmp(url)
    _, tmp_path = url_to_fs(tmp_url)
    try:
        yield tmp_url
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.mv(tmp_path, path, recursive=fs.isdir(tmp_path))
    finally:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes, tmp_dir: str) -> None:
    """Write ``data`` to ``tmp_dir`` and rename it onto ``path`` (replacing it)."""
    tmp = posixpath.join(tmp_dir, f"{posixpath.basename(path)}.{uuid.uuid4().hex}")
    fs.makedirs(tmp_dir, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.mv(tmp, path)


def write_json_atomic(fs: AbstractFileSystem, path: str, obj: Any, tmp_dir: str) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes_atomic`)."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode()
    write_bytes_atomic(fs, path, data, tmp_dir)


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    """Read a JSON file."""
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)
