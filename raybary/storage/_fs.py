"""Small fsspec helpers shared by the readers and writers.

Every URL handled by the storage layer goes through :func:`url_to_fs`, so a
local path, ``file://``, ``memory://`` or ``s3://`` all work the same way,
with the URL's storage options (:class:`~raybary.storage.options.StorageOptions`)
handed to its filesystem.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from raybary.storage.options import StorageOptions

__all__ = [
    "url_to_fs",
    "is_local",
    "zarr_store",
    "open_zarr_group",
    "join_url",
    "strip_url",
    "absolute_local",
    "atomic_output",
    "write_bytes_atomic",
    "write_bytes_exclusive",
    "write_json_atomic",
    "read_json",
]


#: ``scheme:/path``: a URL that lost a slash (``pathlib.Path("memory://x")`` gives
#: ``memory:/x``). fsspec and zarr would both take it for a *local* path and create a
#: directory named ``memory:`` in the working directory, so it is refused.
_LOST_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None,
              **fs_kwargs: Any) -> tuple[AbstractFileSystem, str]:
    """Return the fsspec filesystem and the filesystem path of ``url``.

    ``storage_options`` are the filesystem's keyword arguments; fsspec's own
    configuration (``fsspec.config.conf``: its config files and
    ``FSSPEC_<PROTOCOL>_<KEY>`` variables) is applied under them, so an
    option given here wins and the others still count. Raises
    ``ValueError`` for ``scheme:/path`` (one slash), which would silently
    become a local directory named ``scheme:``, and for options the
    filesystem refuses (the message names the keys, never the values).
    """
    url = str(url)
    m = _LOST_SLASH.match(url)
    if m:
        fixed = f"{m.group(1)}://{url[len(m.group(0)):]}"
        raise ValueError(
            f"{url!r} looks like a URL that lost a slash (it would be a local directory "
            f"named {m.group(1) + ':'!r}); write {fixed!r}, or ./{url} for a local path"
        )
    opts = StorageOptions.of(storage_options)
    if not opts:
        return fsspec.core.url_to_fs(url, **fs_kwargs)
    try:
        return fsspec.core.url_to_fs(url, **opts.kwargs(), **fs_kwargs)
    except (TypeError, ValueError) as e:  # e.g. an option the filesystem does not take
        raise ValueError(f"cannot open {redact_url(url)} with the storage options given "
                         f"({opts.keys_text()}): {opts.redact(str(e))}") from None


def zarr_store(url: str, *, read_only: bool, storage_options: Mapping[str, Any] | None = None):
    """A zarr ``Store`` for ``url``, resolved the same way as every other path here.

    zarr must never be handed a URL *string*: it has its own rules for telling
    URLs from local paths, and wherever they differ from fsspec's, a store
    meant for ``memory://`` or ``s3://`` lands on the local disk. Here the
    filesystem comes from :func:`url_to_fs`: a local path gives a
    ``LocalStore``, anything else an ``FsspecStore`` on the same filesystem
    (with the same ``storage_options``).
    """
    from zarr.storage import FsspecStore, LocalStore

    fs, path = url_to_fs(url, storage_options)
    if is_local(fs):
        return LocalStore(path, read_only=read_only)
    if fs.async_impl:
        afs, path = url_to_fs(str(url), storage_options, asynchronous=True)
    else:
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        afs = AsyncFileSystemWrapper(fs, asynchronous=True)
    return FsspecStore(afs, path=path, read_only=read_only)


def open_zarr_group(url: str, mode: str, storage_options: Mapping[str, Any] | None = None):
    """``zarr.open_group`` on :func:`zarr_store` (``mode`` ``"r"`` opens it read-only)."""
    import zarr

    return zarr.open_group(zarr_store(url, read_only=mode == "r",
                                      storage_options=storage_options), mode=mode)


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (native pyarrow I/O can be used)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def fs_protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    """The protocols of a filesystem, as a tuple (``("file", "local")``, ``("s3", "s3a")``)."""
    proto = fs.protocol
    return tuple(sorted([proto] if isinstance(proto, str) else proto))


def canonical_path(fs: AbstractFileSystem, path: str) -> str:
    """``path`` made comparable: absolute with symlinks resolved on local
    disks, without a trailing slash elsewhere."""
    if is_local(fs):
        return os.path.realpath(path)
    return strip_url(path)


_CREDENTIALS = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@]+)@")


def redact_url(url: str) -> str:
    """``url`` with credentials (``scheme://user:secret@host/...``) replaced by
    ``***``: what is recorded in layouts, reports, logs and job metadata."""
    return _CREDENTIALS.sub(r"\1***@", str(url))


def has_credentials(url: str) -> bool:
    return bool(_CREDENTIALS.match(str(url)))


def absolute_local(url: str) -> str:
    """``url`` with a local path made absolute (``~`` expanded); URLs with a
    scheme unchanged. Ray workers have their own working directory, so what
    is handed to them must not depend on the caller's."""
    url = str(url)
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


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


def _sibling_tmp(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A hidden temporary URL next to ``url`` (same directory, same filesystem).

    Built on the filesystem path and turned back into a URL of the same
    filesystem; :func:`url_to_fs` of the result is checked to give the same
    filesystem, so a temporary output can never end up somewhere else (such as
    a local directory named ``memory:``).
    """
    fs, path = url_to_fs(strip_url(url), storage_options)
    head, tail = posixpath.split(path)
    tmp = posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")
    if is_local(fs):
        return tmp
    tmp_url = fs.unstrip_protocol(tmp)
    tmp_fs, tmp_path = url_to_fs(tmp_url, storage_options)
    if type(tmp_fs) is not type(fs) or tmp_path != tmp:
        raise RuntimeError(f"temporary URL {redact_url(tmp_url)} for {redact_url(url)} does not "
                           "resolve to the same filesystem")
    return tmp_url


@contextlib.contextmanager
def atomic_output(url: str, *, overwrite: bool = False,
                  storage_options: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Yield a temporary sibling URL; move it onto ``url`` when the block succeeds.

    On failure the temporary output is removed and ``url`` is untouched, so a
    refused or crashed conversion never leaves a half-written store behind.
    Raises ``FileExistsError`` if ``url`` exists and ``overwrite`` is false
    (checked before the block runs). On object stores, which cannot rename,
    the move is a copy of each object (:func:`_move_into_place`).
    """
    fs, path = url_to_fs(url, storage_options)
    if fs.exists(path) and not overwrite:
        raise FileExistsError(f"{redact_url(url)} already exists (pass overwrite=True / "
                              "--overwrite to replace it)")
    tmp_url = _sibling_tmp(url, storage_options)
    _, tmp_path = url_to_fs(tmp_url, storage_options)
    try:
        yield tmp_url
        if fs.exists(path):
            fs.rm(path, recursive=True)
        _move_into_place(fs, tmp_path, path)
    finally:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)


def _move_into_place(fs: AbstractFileSystem, src: str, dst: str) -> None:
    """Move ``src`` (a file or a folder) onto ``dst``.

    A local disk renames. An object store has no rename: each object is
    copied, then ``src`` removed; a folder's top-level objects (a Zarr
    store's root ``zarr.json``) are copied last, so a move cut short leaves
    a folder without them, which :func:`~raybary.storage.open_store` refuses
    rather than reading a store with chunks missing.
    """
    if is_local(fs) or not fs.isdir(src):
        fs.mv(src, dst, recursive=fs.isdir(src))
        return
    src = strip_url(src)
    files = [strip_url(p) for p in fs.find(src)]
    nested = sorted(p for p in files if "/" in p[len(src) + 1:])
    top = sorted(p for p in files if "/" not in p[len(src) + 1:])
    for p in nested + top:
        target = posixpath.join(dst, p[len(src) + 1:])
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.copy(p, target)
    fs.rm(src, recursive=True)


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes, tmp_dir: str) -> None:
    """Write ``data`` to ``tmp_dir`` and rename it onto ``path`` (replacing it).

    On a local disk the data is fsynced before the rename and the folder
    after it, so that after a power loss ``path`` holds either the old or the
    new bytes, never an empty or cut-short file.
    """
    tmp = posixpath.join(tmp_dir, f"{posixpath.basename(path)}.{uuid.uuid4().hex}")
    fs.makedirs(tmp_dir, exist_ok=True)
    if is_local(fs):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # not every platform can fsync a folder
            fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.mv(tmp, path)


def write_bytes_exclusive(fs: AbstractFileSystem, path: str, data: bytes, tmp_dir: str) -> bool:
    """Create ``path`` holding ``data`` unless it exists; return whether this call created it.

    A conditional write where the store has one: a local disk links a
    finished temporary file onto ``path`` (``link`` fails if ``path``
    exists); other filesystems get fsspec's ``pipe_file(mode="create")``,
    which s3fs sends as ``If-None-Match: *`` (honoured by AWS S3 and by
    S3-compatible servers that implement conditional writes) and which
    fsspec's default implements as check-then-write (not atomic). Callers
    that need certainty read back what they wrote.
    """
    if is_local(fs):
        tmp = posixpath.join(tmp_dir, f"{posixpath.basename(path)}.{uuid.uuid4().hex}")
        fs.makedirs(tmp_dir, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network file systems): check, then rename
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not _takes_mode(fs):  # an fsspec filesystem older than exclusive writes: check, then write
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _takes_mode(fs: AbstractFileSystem) -> bool:
    """Whether ``fs.pipe_file`` takes ``mode=`` (fsspec's exclusive writes, late 2024 on);
    older ones would hand it on to the store as an unknown parameter."""
    method = getattr(type(fs), "_pipe_file" if fs.async_impl else "pipe_file", None)
    try:
        return method is not None and "mode" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


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
