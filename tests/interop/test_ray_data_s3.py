"""Ray Data on object storage: ``read_problems_dataset(url, storage_options=...)``
against the S3-protocol server on loopback (fixture ``s3``, one key pair accepted).
The read tasks run in Ray workers, which get the options with the store."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raybary.interop import read_problems_dataset
from raybary.interop.ray_data import decode_problems
from raybary.storage import open_store
from raybary.storage.generate import generate


@pytest.mark.usefixtures("ray_local")
def test_a_store_on_s3_reads_as_rows_with_storage_options(s3):
    server, root = s3
    url = f"{root}/in.zarr"
    generate(url, 23, family="tutorial", seed=4, storage_options=server.options)
    ds = read_problems_dataset(url, shard_size=10, storage_options=server.options)
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    table = table.sort_by("problem_id")
    assert table.num_rows == 23 and table.column("error").null_count == 23
    problems, errors = decode_problems(table).to_problems()
    want, _ = open_store(url, storage_options=server.options).read_columns(0, 23).to_problems()
    assert errors == [None] * 23
    assert [p.lambdas.tolist() for p in problems] == [q.lambdas.tolist() for q in want]
    with pytest.raises(PermissionError):  # the options are needed: the server checks them
        read_problems_dataset(url, storage_options={**server.options, "secret": "wrong"})
