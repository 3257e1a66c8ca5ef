"""CSR offsets and Arrow list arrays: the one place that builds them.

Arrow's ``list`` type has int32 offsets, so a list array holds fewer than
2**31 values in all; :func:`list_array` refuses more with a message that says
what to make smaller, instead of letting the offsets wrap around.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from raybary.storage.errors import StoreDataError

__all__ = ["offsets", "list_array", "LIST_LIMIT"]

#: Values one Arrow ``list`` array can hold (its offsets are int32).
LIST_LIMIT = 2**31 - 1


def offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """CSR offsets of segments of ``lengths``: ``int64 (len + 1,)``, starting at 0."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


def list_array(offs: np.ndarray, values: pa.Array | np.ndarray, *,
               mask: np.ndarray | None = None, smaller: str = "blocks") -> pa.ListArray:
    """A list array of ``values`` cut at ``offs`` (null where ``mask``).

    Raises :class:`~raybary.storage.errors.StoreDataError` (a ``ValueError``)
    naming ``smaller`` (what the caller should make smaller: ``"blocks"``,
    ``"batches"``, ``"shards (--shard-size)"``) past :data:`LIST_LIMIT` values.
    """
    total = int(offs[-1]) if len(offs) else 0
    if total > LIST_LIMIT:
        raise StoreDataError(f"{total} values are more than one Arrow list array holds "
                             f"({LIST_LIMIT}); use smaller {smaller}")
    if not isinstance(values, pa.Array):
        values = pa.array(np.asarray(values, dtype=np.float64), pa.float64())
    return pa.ListArray.from_arrays(pa.array(np.asarray(offs, dtype=np.int32), pa.int32()),
                                    values, mask=None if mask is None else pa.array(mask))
