"""The problem-store interface: :class:`ProblemStore` and :class:`ShardInput`.

This module owns what every format shares (range reads, validation on
reading, shards, fingerprints). The formats themselves live in
:mod:`~raybary.storage.parquet_store` and :mod:`~raybary.storage.zarr_store`,
which subclass :class:`ProblemStore`; :mod:`~raybary.storage.formats` maps a
format name to them, and :func:`~raybary.storage.store.open_store` opens a
URL through that table. Nothing here imports a format module, so the
dependencies run one way: base <- format modules <- formats <- store.
"""

from __future__ import annotations

import math
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from raybary.storage import _fs
from raybary.storage.columns import ProblemColumns
from raybary.storage.options import StorageOptions
from raybary.types import Problem

__all__ = ["ShardInput", "ProblemStore", "DEFAULT_SHARD_SIZE", "shard_count", "shard_bounds"]

#: Problems per shard, the unit of reading, solving, committing and resuming.
DEFAULT_SHARD_SIZE = 1000


def shard_count(n_problems: int, shard_size: int) -> int:
    """Shards of ``shard_size`` consecutive problems covering ``n_problems``."""
    return math.ceil(int(n_problems) / int(shard_size))


def shard_bounds(shard: int, n_problems: int, shard_size: int) -> tuple[int, int]:
    """Positions ``(start, stop)`` of shard ``shard``: ``shard * shard_size`` up to
    ``shard_size`` problems, the last one shorter; ``IndexError`` outside."""
    count = shard_count(n_problems, shard_size)
    if not 0 <= shard < count:
        raise IndexError(f"shard {shard} is outside 0..{count - 1}")
    start = shard * int(shard_size)
    return start, min(start + int(shard_size), int(n_problems))


@dataclass
class ShardInput:
    """The problems of positions ``start:stop`` of a store, validated.

    Attributes:
      start, stop: the range of store positions.
      problem_ids: ``int64 (stop - start,)``, the ids in store order.
      problems: the validated (cleaned) :class:`Problem`, or ``None`` where invalid.
      errors: ``None``, or the message of an invalid problem (it names the
        problem id, the GMM, the component and the field).
    """

    start: int
    stop: int
    problem_ids: np.ndarray
    problems: list[Problem | None]
    errors: list[str | None]

    def __len__(self) -> int:
        return len(self.problems)

    @property
    def n_invalid(self) -> int:
        return sum(e is not None for e in self.errors)

    def valid(self) -> list[int]:
        """Indices (within the shard) of the valid problems."""
        return [i for i, p in enumerate(self.problems) if p is not None]


class ProblemStore(ABC):
    """A read-only store of problems; positions ``0..n_problems-1`` index them in store order.

    Attributes:
      url: the store's URL or path.
      format: the format id, ``raybary.problems.parquet/1`` or ``raybary.problems.zarr/1``.
      n_problems: number of problems.
      dim: the dimension ``d`` if the store has a single one (always for Zarr),
        else ``None``.
      covariance_type: the form the covariances are stored in, ``"full"``,
        ``"diag"`` or ``"spherical"`` (the name of the covariance column or
        array says it); :meth:`read` and :meth:`read_columns` give full
        covariances whatever it is.
      storage_options: the fsspec options the store was opened with (kept,
        and pickled with it: an actor that gets the store reads with them;
        shown by key only).
    """

    url: str
    format: str
    n_problems: int
    dim: int | None
    covariance_type: str = "full"
    storage_options: StorageOptions = StorageOptions()

    def filesystem(self):
        """``(fs, path)`` of the store: its URL resolved with its storage options."""
        return _fs.url_to_fs(self.url, self.storage_options)

    @abstractmethod
    def read_columns(self, start: int, stop: int) -> ProblemColumns:
        """Problems ``start:stop`` as raw (unvalidated) :class:`ProblemColumns`."""

    @abstractmethod
    def problem_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The ids of the problems at positions ``start:stop`` (``int64``)."""

    def read(self, start: int, stop: int, *, renormalize: bool = False,
             dtype: str = "float64") -> ShardInput:
        """Read and validate the problems at positions ``start:stop``.

        Memory is proportional to the shard (plus, for Parquet, a row group),
        never to the store. Invalid problems come back as ``None`` with a
        message; ``renormalize=True`` rescales weights that do not sum to one;
        ``dtype`` is the precision the problems will be solved in (it sets the
        conditioning a covariance needs, :func:`raybary.validation.pd_rtol`).
        """
        start, stop = self._check_range(start, stop)
        cols = self.read_columns(start, stop)
        problems, errors = cols.to_problems(renormalize=renormalize, dtype=dtype)
        return ShardInput(start, stop, cols.problem_id, problems, errors)

    def iter_columns(self, block_problems: int = 65536) -> Iterator[tuple[int, int, ProblemColumns]]:
        """Yield ``(start, stop, columns)`` over the whole store in blocks."""
        for start in range(0, self.n_problems, block_problems):
            stop = min(start + block_problems, self.n_problems)
            yield start, stop, self.read_columns(start, stop)

    def shards(self, shard_size: int) -> list[tuple[int, int]]:
        """The ranges ``(start, stop)`` of consecutive shards of ``shard_size`` problems."""
        return [shard_bounds(i, self.n_problems, shard_size)
                for i in range(shard_count(self.n_problems, shard_size))]

    def max_gmms(self, block_problems: int = 65536) -> int:
        """The largest number of GMMs of a problem (a scan in blocks; memory stays bounded)."""
        best = 0
        for _, _, cols in self.iter_columns(block_problems):
            if cols.n_problems:
                best = max(best, int(np.diff(cols.gmm_offset).max()))
        return best

    def fingerprint(self) -> dict:
        """What identifies the store's content without reading it: the problem
        count and every file's path (relative to the store), size and
        modification stamp (mtime, or the object store's etag / last-modified).
        Recorded with the results, so that a resume against a changed input
        is refused (:meth:`raybary.storage.ResultWriter.prepare`)."""
        fs, root = self.filesystem()
        root = _fs.strip_url(root)
        if fs.isdir(root):
            entries = fs.find(root, detail=True)
        else:
            entries = {root: fs.info(root)}
        files = []
        for path, info in sorted(entries.items()):
            path = _fs.strip_url(path)
            rel = path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)
            files.append([rel, int(info.get("size") or 0), _stamp(info)])
        return {"n_problems": int(self.n_problems), "files": files}

    def describe(self) -> dict:
        """Small JSON-able facts about the store (used by ``raybary show``)."""
        return {"url": self.url, "format": self.format, "n_problems": self.n_problems,
                "dim": self.dim, "covariance_type": self.covariance_type}

    def __len__(self) -> int:
        return self.n_problems

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, n_problems={self.n_problems}, dim={self.dim})"

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_problems:
            raise IndexError(
                f"range {start}:{stop} is outside the store's positions 0:{self.n_problems}"
            )
        return start, stop


def _stamp(info: dict) -> str:
    """A file's modification stamp from fsspec's ``info`` (etag where there is one)."""
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified",
                "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""
