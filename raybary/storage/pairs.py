"""The pairs of a distance job, shard by shard: :class:`AllPairs` and :class:`PairsFile`.

A distance job (``raybary distances``) computes one value per pair of GMMs of
a :class:`~raybary.storage.gmm_store.GMMStore`. Its pairs are numbered
``0..n_pairs-1`` and cut into shards of consecutive numbers (the unit of
work, commit and resume, as a barycenter run's problems); each shard says
which store positions it needs, so it reads each of its GMMs once.

* :class:`AllPairs`: every ``i < j``, in square tiles of ``tile x tile``
  store positions over the upper triangle (tile ``(a, b)``, ``a <= b``, holds
  the pairs of rows ``a*tile ..`` and columns ``b*tile ..``; a diagonal tile
  only those with ``i < j``): a shard reads ``2 * tile`` GMMs at most for up
  to ``tile**2`` pairs. Tiles are numbered row by row, pairs in a tile row-major.
* :class:`PairsFile`: the rows of a Parquet file with integer columns ``i``
  and ``j`` (GMM ids; other columns are ignored), ``shard_size`` rows a
  shard, read one row group at a time. An id that is not in the store, or a
  null, makes that pair ``invalid`` with a message; the rest is computed.

No JAX and no Ray here; the shards are solved by :mod:`raybary.runner.distances`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raybary.storage import _fs
from raybary.storage.base import _stamp
from raybary.storage.errors import StoreFormatError
from raybary.storage.options import StorageOptions

__all__ = ["ShardPairs", "AllPairs", "PairsFile", "DEFAULT_TILE", "open_pairs"]

#: GMMs per side of a tile of ``--pairs all`` (a shard: up to 100 x 100 pairs).
DEFAULT_TILE = 100


@dataclass
class ShardPairs:
    """The pairs of one shard.

    ``left`` and ``right``: the store positions of each pair's GMMs (-1 where
    the id is not in the store); ``left_id`` and ``right_id``: the ids as
    given (``None`` for :class:`AllPairs`, whose ids are read from the store);
    ``errors``: a message per pair that cannot be computed whatever its GMMs
    (an unknown id, a null), else ``None``.
    """

    left: np.ndarray
    right: np.ndarray
    left_id: np.ndarray | None = None
    right_id: np.ndarray | None = None
    errors: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.left)

    def positions(self) -> np.ndarray:
        """The distinct store positions the shard needs, ascending."""
        both = np.concatenate([self.left, self.right])
        return np.unique(both[both >= 0])


@dataclass(frozen=True)
class AllPairs:
    """Every pair ``i < j`` of ``n_gmms`` store positions, tiled (module docstring)."""

    n_gmms: int
    tile: int = DEFAULT_TILE

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ValueError(f"tile must be at least 1, got {self.tile}")

    @property
    def blocks(self) -> int:
        """Tiles per side."""
        return math.ceil(self.n_gmms / self.tile)

    @property
    def n_pairs(self) -> int:
        return self.n_gmms * (self.n_gmms - 1) // 2

    def describe(self) -> str:
        return "all"

    def _tile(self, k: int) -> tuple[int, int]:
        """Tile ``k`` as ``(a, b)``: row ``a`` holds tiles ``(a, a) .. (a, blocks-1)``."""
        nb = self.blocks
        row_starts = np.concatenate([[0], np.cumsum(np.arange(nb, 0, -1))])
        if not 0 <= k < int(row_starts[-1]):
            raise IndexError(f"tile {k} is outside 0..{int(row_starts[-1]) - 1}")
        a = int(np.searchsorted(row_starts, k, side="right") - 1)
        return a, a + k - int(row_starts[a])

    def _block(self, a: int) -> np.ndarray:
        return np.arange(a * self.tile, min((a + 1) * self.tile, self.n_gmms), dtype=np.int64)

    def shard_stops(self) -> list[int]:
        """Each tile's stop in pair numbers (cumulative pair counts, row by row)."""
        sizes = np.array([len(self._block(a)) for a in range(self.blocks)], dtype=np.int64)
        counts = []
        for a in range(self.blocks):
            counts.append([sizes[a] * (sizes[a] - 1) // 2])
            counts.append(sizes[a] * sizes[a + 1:])
        flat = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        return np.cumsum(flat).astype(int).tolist()

    def shard(self, k: int, store=None) -> ShardPairs:
        """The pairs of tile ``k`` (``store`` unused: positions are the tile's)."""
        a, b = self._tile(k)
        rows, cols = self._block(a), self._block(b)
        if a == b:
            r, c = np.triu_indices(len(rows), 1)
        else:
            r, c = (x.reshape(-1) for x in np.meshgrid(np.arange(len(rows)),
                                                       np.arange(len(cols)), indexing="ij"))
        return ShardPairs(rows[r], cols[c])


class PairsFile:
    """The pairs listed in a Parquet file (module docstring), ``shard_size`` rows a shard.

    Opening checks the columns and reads the row counts of the row groups;
    the file is read a shard (its row groups) at a time.
    """

    def __init__(self, url: str, shard_size: int,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.url = _fs.strip_url(str(url))
        self.shard_size = int(shard_size)
        self.storage_options = StorageOptions.of(storage_options)
        fs, path = _fs.url_to_fs(self.url, self.storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"no pairs file at {_fs.redact_url(self.url)}")
        if fs.isdir(path):
            raise StoreFormatError(f"{_fs.redact_url(self.url)}: --pairs takes one Parquet "
                                   "file with integer columns i and j, not a directory")
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        wrong = [f"column {n!r} is missing" if n not in schema.names else
                 f"column {n!r} has type {schema.field(n).type}, expected an integer type"
                 for n in ("i", "j")
                 if n not in schema.names or not pa.types.is_integer(schema.field(n).type)]
        if wrong:
            raise StoreFormatError(f"{_fs.redact_url(self.url)} is not a pairs file: "
                                   + "; ".join(wrong) + " (expected integer columns i and j, "
                                   "the gmm_id of each pair's GMMs, one row per pair)")
        self._group_rows = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
        self.n_pairs = int(sum(self._group_rows))
        self._stamp = [int(fs.info(path).get("size") or 0), _stamp(fs.info(path))]

    def describe(self) -> str:
        return _fs.redact_url(self.url)

    def fingerprint_entry(self) -> list:
        """``[name, size, stamp]`` of the file, for the job's input fingerprint."""
        return [f"pairs:{_fs.redact_url(self.url)}", *self._stamp]

    def shard_stops(self) -> list[int]:
        n, s = self.n_pairs, self.shard_size
        return [min((k + 1) * s, n) for k in range(math.ceil(n / s))]

    def rows(self, start: int, stop: int) -> pa.Table:
        """Columns ``i`` and ``j`` of rows ``start:stop`` (only their row groups are read)."""
        fs, path = _fs.url_to_fs(self.url, self.storage_options)
        bounds = np.concatenate([[0], np.cumsum(self._group_rows)]).astype(int)
        groups = [g for g in range(len(self._group_rows))
                  if bounds[g] < stop and bounds[g + 1] > start]
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_groups(groups, columns=["i", "j"])
        first = int(bounds[groups[0]]) if groups else 0
        return table.slice(start - first, stop - start)

    def shard(self, k: int, store) -> ShardPairs:
        """The pairs of shard ``k``, their ids looked up in ``store`` (a
        :class:`~raybary.storage.gmm_store.GMMStore`)."""
        start = k * self.shard_size
        if not 0 <= start < self.n_pairs:
            raise IndexError(f"shard {k} is outside the pairs file's shards")
        table = self.rows(start, min(start + self.shard_size, self.n_pairs))
        null = np.zeros(table.num_rows, bool)
        ids = []
        for name in ("i", "j"):
            col = table.column(name)
            null |= col.is_null().to_numpy(zero_copy_only=False)
            ids.append(pc.cast(col.fill_null(-1), pa.int64()).to_numpy())
        left, right = store.positions(ids[0]), store.positions(ids[1])
        errors: list[str | None] = [None] * table.num_rows
        for r in np.flatnonzero(null | (left < 0) | (right < 0)):
            errors[r] = _pair_error(start + int(r), bool(null[r]), ids[0][r], ids[1][r],
                                    left[r] >= 0, right[r] >= 0)
        return ShardPairs(left, right, ids[0], ids[1], errors)


def _pair_error(row: int, null: bool, i: int, j: int, i_found: bool, j_found: bool) -> str:
    """The message of a pair that cannot be computed: a null, or ids not in the store."""
    if null:
        return f"pairs row {row}: i or j is missing (null)"
    missing = [f"gmm {g}" for g, found in ((i, i_found), (j, j_found)) if not found]
    return f"pairs row {row}: {' and '.join(missing)} not in the GMM store"


def open_pairs(pairs: str, n_gmms: int, *, tile: int = DEFAULT_TILE, shard_size: int = 1000,
               storage_options: Mapping[str, Any] | None = None) -> AllPairs | PairsFile:
    """``"all"``: :class:`AllPairs` of ``n_gmms`` in tiles of ``tile``; else the
    URL of a :class:`PairsFile`, in shards of ``shard_size`` rows."""
    if pairs == "all":
        return AllPairs(int(n_gmms), int(tile))
    return PairsFile(pairs, shard_size, storage_options)
