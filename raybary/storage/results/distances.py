"""Reading a distance job's output: :func:`read_distances` -> :class:`Distances`.

The output of ``raybary distances`` is a results directory
(:mod:`~raybary.storage.results.layout`) whose shards each hold one table,
``distances/shard-NNNNNN.parquet``: one row per pair, ``i, j`` (gmm ids),
``mw2`` (NaN unless ``ok``), ``converged``, ``status``, ``error``. Only
committed shards are read, each file checked against its marker's commit id,
so a reader never sees half a shard or a pair twice.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raybary.storage import _fs
from raybary.storage.options import StorageOptions
from raybary.storage.results.layout import LAYOUT_FILE, MANIFEST_FILE, read_markers
from raybary.storage.results.reader import _concat, _read_shard

__all__ = ["Distances", "read_distances", "distances_schema", "DISTANCES_TABLE",
           "MATRIX_MAX_GMMS", "is_distances", "summarize_distances"]

#: :meth:`Distances.matrix` refuses more GMMs than this (an N x N float64
#: matrix of 10,000 GMMs is 800 MB).
MATRIX_MAX_GMMS = 10_000
#: The table of a distance job's shards (``OUT/distances/shard-NNNNNN.parquet``).
DISTANCES_TABLE = "distances"


def distances_schema() -> pa.Schema:
    """Schema of ``distances/``: one row per pair."""
    return pa.schema([("i", pa.int64()), ("j", pa.int64()), ("mw2", pa.float64()),
                      ("converged", pa.bool_()), ("status", pa.string()),
                      ("error", pa.string())])


@dataclass
class Distances:
    """What :func:`read_distances` returns: ``table`` (a ``pyarrow.Table``, one
    row per pair of the committed shards, in shard order), the run's ``layout``
    and ``manifest`` (``None`` while it is not finished), the ``url`` and the
    ``committed_shards`` read."""

    url: str
    table: pa.Table
    layout: dict
    manifest: dict | None
    committed_shards: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether the job finished with every shard committed."""
        return bool(self.manifest and self.manifest.get("complete"))

    def to_pandas(self):
        """The pairs as a DataFrame (long form: ``i, j, mw2, converged, status, error``)."""
        return self.table.to_pandas()

    def matrix(self, max_gmms: int = MATRIX_MAX_GMMS) -> tuple[np.ndarray, np.ndarray]:
        """``(D, ids)``: the square symmetric matrix of :math:`MW_2^2`, ``D[a, b]`` for
        GMMs ``ids[a]`` and ``ids[b]`` (the ids found in the pairs, ascending),
        0 on the diagonal, NaN where a pair is missing or not ``ok``.

        Refused above ``max_gmms`` GMMs (``N x N`` float64 is ``8 N**2``
        bytes): read the long form (:attr:`table`, :meth:`to_pandas`) instead.
        """
        i = self.table.column("i").to_numpy(zero_copy_only=False)
        j = self.table.column("j").to_numpy(zero_copy_only=False)
        ids = np.union1d(i, j).astype(np.int64)
        if len(ids) > max_gmms:
            raise ValueError(
                f"{_fs.redact_url(self.url)} has pairs of {len(ids)} GMMs: a {len(ids)} x "
                f"{len(ids)} matrix ({8 * len(ids) ** 2 / 2**30:.1f} GiB) is more than "
                f"matrix() builds (max_gmms={max_gmms}); read the long form "
                "(.table, .to_pandas()) or raise max_gmms")
        ok = pc.equal(self.table.column("status"), "ok").to_numpy(zero_copy_only=False)
        values = self.table.column("mw2").to_numpy(zero_copy_only=False)
        a, b = np.searchsorted(ids, i[ok]), np.searchsorted(ids, j[ok])
        out = np.full((len(ids), len(ids)), np.nan)
        out[a, b] = values[ok]
        out[b, a] = values[ok]
        np.fill_diagonal(out, 0.0)
        return out, ids


def read_distances(url: str, *, storage_options: Mapping[str, Any] | None = None) -> Distances:
    """Read the committed shards of a distance job's OUTPUT (``raybary distances``).

    Raises ``FileNotFoundError`` if ``url`` is not a results directory and
    ``ValueError`` if it holds barycenters (read those with
    :func:`raybary.read_results`).
    """
    url = _fs.strip_url(str(url))
    fs, root = _fs.url_to_fs(url, StorageOptions.of(storage_options))
    layout_path = posixpath.join(root, LAYOUT_FILE)
    if not fs.exists(layout_path):
        raise FileNotFoundError(f"{_fs.redact_url(url)} is not a raybary distance job's "
                                f"output (no {LAYOUT_FILE})")
    layout = _fs.read_json(fs, layout_path)
    if list(layout.get("tables") or []) != [DISTANCES_TABLE]:
        raise ValueError(f"{_fs.redact_url(url)} holds barycenters, not distances: read it "
                         "with raybary.read_results")
    manifest_path = posixpath.join(root, MANIFEST_FILE)
    manifest = _fs.read_json(fs, manifest_path) if fs.exists(manifest_path) else None
    tables, shards = [], []
    for shard, info in sorted(read_markers(fs, root).items()):
        got = _read_shard(fs, root, shard, info, (DISTANCES_TABLE,))
        if got is not None:
            tables.append(got[0])
            shards.append(shard)
    return Distances(url, _concat(tables, distances_schema()), layout, manifest, shards)


def is_distances(url: str, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the results directory ``url`` is a distance job's output (its
    layout's tables are ``distances``)."""
    url = _fs.strip_url(str(url))
    fs, root = _fs.url_to_fs(url, StorageOptions.of(storage_options))
    layout = _fs.read_json(fs, posixpath.join(root, LAYOUT_FILE))
    return list(layout.get("tables") or []) == [DISTANCES_TABLE]


def summarize_distances(url: str, *, top: int = 5,
                        storage_options: Mapping[str, Any] | None = None) -> str:
    """A text summary of a distance job's output (what ``raybary show`` prints):
    progress, statuses, the MW2^2 quantiles, the nearest pairs and the first
    messages of the pairs not ``ok``."""
    d = read_distances(url, storage_options=storage_options)
    df = d.to_pandas()
    lay = d.layout
    state = "finished" if d.manifest else "not finished (no manifest)"
    lines = [f"distances {_fs.redact_url(d.url)}",
             f"  input: {lay.get('input_url')}  pairs: {lay.get('n_problems')}  shards: "
             f"{len(d.committed_shards)}/{lay.get('n_shards')} committed, {state}"]
    counts = df["status"].value_counts().to_dict()
    lines.append("  status: " + ", ".join(f"{s} {counts.get(s, 0)}"
                                          for s in ("ok", "invalid", "failed")))
    ok = df[df["status"] == "ok"]
    if len(ok):
        qs = ok["mw2"].quantile([0.0, 0.05, 0.5, 0.95, 1.0])
        lines.append("  mw2 quantiles: " + ", ".join(
            f"{label} {v:.6g}" for label, v in zip(["min", "5%", "50%", "95%", "max"], qs)))
        lines.append(f"  converged: {int(ok['converged'].sum())} of {len(ok)} ok")
        lines.append(f"  nearest {min(top, len(ok))} pairs:")
        for _, r in ok.nsmallest(top, "mw2").iterrows():
            lines.append(f"    ({r.i}, {r.j}): {r.mw2:.6g}")
    for status in ("failed", "invalid"):
        bad = df[df["status"] == status]
        if len(bad):
            lines.append(f"  {status} ({len(bad)}; first {min(len(bad), 2 * top)}):")
            lines += [f"    ({r.i}, {r.j}): {r.error}" for _, r in bad.head(2 * top).iterrows()]
    return "\n".join(lines)
