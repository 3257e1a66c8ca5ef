"""Problem stores for tests: a copy of a store with some problems broken."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

#: column -> the bad value a test puts there (validation catches the first
#: three, the reader the null)
BREAKS = {"weight": {"weight": -0.5}, "cov": {"cov": [1.0, 3.0, 3.0, 1.0]},
          "mean": {"mean": [float("nan"), 0.0]}, "lambda": {"lambda": None}}


def write_broken_copy(store, path, broken: dict[int, str]) -> str:
    """Write Parquet ``store`` (a d = 2 store from ``raybary.storage.generate``) to
    ``path`` with, for each ``position: column`` of ``broken``, the first row of
    the problem at that store position given the bad value ``BREAKS[column]``;
    returns ``str(path)``."""
    rows = pq.read_table(store.url).to_pylist()
    ids = store.problem_ids()
    for pos, column in broken.items():
        next(r for r in rows if r["problem_id"] == ids[pos]).update(BREAKS[column])
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(store.url)), path)
    return str(path)
