"""The Zarr v3 format, ``raybary.problems.zarr/1``: ragged CSR arrays, no padding.

Layout (every array chunked along its first axis only)::

    STORE.zarr/                     group attributes:
                                      format = "raybary.problems.zarr", format_version = 1, dim = d
      problems/id        int64   [P]      problem ids, strictly ascending
      problems/offset    int64   [P+1]    problem p owns GMMs offset[p]:offset[p+1]
      gmms/offset        int64   [G+1]    GMM g owns components offset[g]:offset[g+1]
      gmms/lambda        float64 [G]
      gmms/label         int32   [G]      (optional) the GMM numbers used in messages
      components/weight  float64 [N]
      components/mean    float64 [N, d]
      and exactly one covariance array, whose name says the form:
      components/cov            float64 [N, d, d]   full covariances
      components/cov_diag       float64 [N, d]      diagonal ones (the variances)
      components/cov_spherical  float64 [N]         spherical ones (C = v * I)

The covariance array follows the Parquet columns' rule (scikit-learn's
``covariance_type``: full, diag, spherical); readers expand diagonal and
spherical covariances to full matrices. A raybary that predates the forms
refuses a diagonal or spherical store (``components/cov`` is missing).

One dimension ``d`` per store (mixed-dimension batches stay in Parquet, or
are split by ``d``). Chunks hold about ``chunk_problems`` problems (8192 by
default) on every level, so a contiguous range of problems is a read of a few
chunks of each array: memory and time are proportional to the range, never to
the store. Any integer/floating dtypes are accepted on reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from raybary.storage import _fs
from raybary.storage.base import ProblemStore
from raybary.storage.columns import (
    COVARIANCE_FIELDS,
    COVARIANCE_TYPES,
    ProblemColumns,
    check_covariance_type,
)
from raybary.storage.errors import StoreDataError, StoreFormatError
from raybary.storage.options import StorageOptions

__all__ = [
    "ZarrLayout",
    "PROBLEM_LAYOUT",
    "COMPONENT_ARRAYS",
    "COMPONENTS_EXPECTED",
    "ZARR_FORMAT",
    "ZARR_VERSION",
    "ZARR_FORMAT_ID",
    "ZarrProblemStore",
    "ZarrProblemWriter",
]

ZARR_FORMAT = "raybary.problems.zarr"
ZARR_VERSION = 1
ZARR_FORMAT_ID = f"{ZARR_FORMAT}/{ZARR_VERSION}"
#: Default number of problems per chunk.
CHUNK_PROBLEMS = 8192
#: The components level in words (every Zarr layout of this module ends with it).
COMPONENTS_EXPECTED = (
    "components/weight float64[N], components/mean float64[N,d] and one covariance array: "
    "components/cov float64[N,d,d] (full), components/cov_diag float64[N,d] (diagonal) or "
    "components/cov_spherical float64[N] (spherical)"
)
EXPECTED = (
    "expected a Zarr v3 group with attributes format='raybary.problems.zarr', "
    "format_version=1, dim=d and arrays problems/id int64[P], problems/offset int64[P+1], "
    "gmms/offset int64[G+1], gmms/lambda float64[G], " + COMPONENTS_EXPECTED
)

# name: (dtype kind, shape as a function of (P, G, N, d), optional)
_ARRAYS = {
    "problems/id": ("i", lambda P, G, N, d: (P,), False),
    "problems/offset": ("i", lambda P, G, N, d: (P + 1,), False),
    "gmms/offset": ("i", lambda P, G, N, d: (G + 1,), False),
    "gmms/lambda": ("f", lambda P, G, N, d: (G,), False),
    "gmms/label": ("i", lambda P, G, N, d: (G,), True),
    "components/weight": ("f", lambda P, G, N, d: (N,), False),
    "components/mean": ("f", lambda P, G, N, d: (N, d), False),
}
# the covariance arrays: exactly one is present (checked apart)
_COV_ARRAYS = {
    "full": ("f", lambda P, G, N, d: (N, d, d), True),
    "diag": ("f", lambda P, G, N, d: (N, d), True),
    "spherical": ("f", lambda P, G, N, d: (N,), True),
}
_COV_KEYS = {f"components/{COVARIANCE_FIELDS[t]}": t for t in COVARIANCE_TYPES}
_ARRAYS.update({k: _COV_ARRAYS[t] for k, t in _COV_KEYS.items()})
#: The components level's arrays (every Zarr layout of this module has them).
COMPONENT_ARRAYS = {k: v for k, v in _ARRAYS.items() if k.startswith("components/")}


@dataclass(frozen=True)
class ZarrLayout:
    """What a Zarr format of this module's kind is, for checking and writing it.

    The problem store and the GMM store (:mod:`~raybary.storage.gmm_store`)
    share the components level and differ above it; one reader, one checker
    and one writer serve both, told apart by their layout.

    Attributes:
      format, version: the group attributes ``format`` and ``format_version``.
      kind: what a store of it holds, for messages (``"problem"``, ``"GMM"``).
      arrays: ``name: (dtype kind, shape as a function of (P, G, N, d), optional)``.
      id_array: the ids, strictly ascending, one per position (``P`` of them).
      size_arrays: the arrays whose lengths are ``P``, ``G`` and ``N``.
      offsets: ``(array, i)``: an offset array, ending at size ``i`` of ``(P, G, N)``.
      expected: the layout, in words, ending every refusal.
      hints: ``(array, text)``: ``text`` is added to a refusal where ``array``
        is there (a store of the other kind given by mistake).
    """

    format: str
    version: int
    kind: str
    arrays: Mapping[str, tuple]
    id_array: str
    size_arrays: tuple[str, str, str]
    offsets: tuple[tuple[str, int], ...]
    expected: str
    hints: tuple[tuple[str, str], ...] = ()

    @property
    def format_id(self) -> str:
        return f"{self.format}/{self.version}"


#: The problem store's layout (the module docstring).
PROBLEM_LAYOUT = ZarrLayout(
    ZARR_FORMAT, ZARR_VERSION, "problem", _ARRAYS, "problems/id",
    ("problems/id", "gmms/lambda", "components/weight"),
    (("problems/offset", 1), ("gmms/offset", 2)), EXPECTED,
    (("gmms/id", "this looks like a GMM store (raybary.gmms.zarr): it is the input of "
      "`raybary distances`, not of a barycenter run"),))


def _kind_ok(dtype: np.dtype, kind: str) -> bool:
    if kind == "i":
        return np.dtype(dtype).kind in "iu"
    return np.dtype(dtype).kind in "fiu"


class ZarrProblemStore(ProblemStore):
    """A store in the ``raybary.problems.zarr/1`` layout (see the module docstring).

    Opening reads the group's metadata and two elements of each offset array;
    the arrays are opened lazily (and not pickled).
    """

    format = ZARR_FORMAT_ID
    #: The arrays and attributes read (a GMM store's differ above the components).
    layout = PROBLEM_LAYOUT

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = StorageOptions.of(storage_options)
        self._group = None
        self._arrays: dict = {}
        group = self._open()
        (self.dim, self.n_problems, self.n_gmms, self.n_components,
         self.covariance_type) = _check_layout(url, group, self.layout)
        self._cov_key = f"components/{COVARIANCE_FIELDS[self.covariance_type]}"
        self._has_label = "label" in group["gmms"]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_group"] = None
        state["_arrays"] = {}
        return state

    def _open(self):
        if self._group is None:
            try:
                self._group = _fs.open_zarr_group(self.url, "r", self.storage_options)
            except (FileNotFoundError, zarr.errors.NodeNotFoundError) as e:
                raise StoreFormatError(f"{self.url} is not a Zarr group ({e}); "
                                       f"{self.layout.expected}") from e
        return self._group

    def _array(self, name: str):
        """The array ``name``, opened once per process (one metadata read, not one per shard)."""
        if name not in self._arrays:
            self._arrays[name] = self._open()[name]
        return self._arrays[name]

    def problem_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_problems if stop is None else stop
        start, stop = self._check_range(start, stop)
        return np.asarray(self._array(self.layout.id_array)[start:stop], dtype=np.int64)

    # the levels above the components: a GMM store (one GMM a position) overrides these
    def _problem_offsets(self, start: int, stop: int) -> np.ndarray:
        """The GMM offsets of positions ``start:stop`` (``stop - start + 1`` of them)."""
        po = np.asarray(self._array("problems/offset")[start:stop + 1], dtype=np.int64)
        _check_offsets(self.url, "problems/offset", po, self.n_gmms)
        return po

    def _gmm_fields(self, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The lambdas and labels (``None``: numbered in order) of GMMs ``g0:g1``."""
        label = self._array("gmms/label")[g0:g1] if self._has_label else None
        return self._array("gmms/lambda")[g0:g1], label

    def read_columns(self, start: int, stop: int) -> ProblemColumns:
        start, stop = self._check_range(start, stop)
        po = self._problem_offsets(start, stop)
        g0, g1 = int(po[0]), int(po[-1])
        go = np.asarray(self._array("gmms/offset")[g0:g1 + 1], dtype=np.int64)
        _check_offsets(self.url, "gmms/offset", go, self.n_components)
        c0, c1 = int(go[0]), int(go[-1])
        lambdas, label = self._gmm_fields(g0, g1)
        ids = self.problem_ids(start, stop)
        if np.any(np.diff(ids) <= 0):
            raise StoreDataError(f"{self.url}: {self.layout.id_array} is not strictly ascending "
                                 f"in {start}:{stop}")
        cov = np.asarray(self._array(self._cov_key)[c0:c1], dtype=np.float64)
        if self.covariance_type != "full":  # diag(v) or v * I
            stored, d = cov, self.dim
            cov = np.zeros((len(stored), d, d))
            cov[:, np.arange(d), np.arange(d)] = stored if stored.ndim == 2 else stored[:, None]
        cols = ProblemColumns.from_dense(
            problem_id=ids,
            gmm_offset=po - g0,
            lambdas=lambdas,
            comp_offset=go - c0,
            weight=self._array("components/weight")[c0:c1],
            mean=np.asarray(self._array("components/mean")[c0:c1], dtype=np.float64),
            cov=cov,
            gmm_label=label,
        )
        cols.covariance_type = self.covariance_type
        return cols

    def max_gmms(self, block_problems: int = 1 << 20) -> int:
        """The largest number of GMMs of a problem (reads ``problems/offset`` in blocks)."""
        best, arr = 0, self._array("problems/offset")
        for start in range(0, self.n_problems, block_problems):
            po = arr[start:min(start + block_problems, self.n_problems) + 1]
            best = max(best, int(np.diff(po).max()))
        return best

    def describe(self) -> dict:
        out = super().describe()
        out.update(n_gmms=self.n_gmms, n_components=self.n_components,
                   chunk_problems=int(self._array(self.layout.id_array).chunks[0]))
        return out


def _check_offsets(url: str, name: str, offsets: np.ndarray, end: int) -> None:
    if len(offsets) and (np.any(np.diff(offsets) < 0) or offsets[0] < 0 or offsets[-1] > end):
        raise StoreDataError(f"{url}: {name} is corrupt (not ascending, or out of 0..{end})")


def _check_layout(url: str, group, layout: ZarrLayout) -> tuple[int, int, int, int, str]:
    """Check format attributes and arrays against ``layout``; return
    ``(d, P, G, N, covariance_type)`` or raise, listing every problem found."""
    problems: list[str] = []
    if group.metadata.zarr_format != 3:
        problems.append(f"the group is Zarr v{group.metadata.zarr_format}, expected Zarr v3")
    attrs = group.attrs.asdict()
    name, version, dim = attrs.get("format"), attrs.get("format_version"), attrs.get("dim")
    if name != layout.format or version != layout.version:
        problems.append(
            f"attributes say format {name!r} version {version!r}, expected "
            f"{layout.format!r} version {layout.version}"
        )
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        problems.append(f"attribute dim is {dim!r}, expected a positive integer")
        dim = None
    arrays = {}
    for key, (kind, _, optional) in layout.arrays.items():
        try:
            arr = group[key]
        except KeyError:
            if not optional:
                problems.append(f"array {key} is missing")
            continue
        if not isinstance(arr, zarr.Array):
            problems.append(f"{key} is a group, expected an array")
        elif not _kind_ok(arr.dtype, kind):
            want = "an integer" if kind == "i" else "a floating"
            problems.append(f"array {key} has dtype {arr.dtype}, expected {want} dtype")
        else:
            arrays[key] = arr
    problems += _covariance_problems(group, arrays)
    if not problems:
        problems += _shape_problems(arrays, dim, layout)
    if problems:
        problems += [text for key, text in layout.hints if _member(group, key)]
        lines = "\n".join(f"  - {p}" for p in problems)
        raise StoreFormatError(
            f"{url} is not a valid raybary Zarr {layout.kind} store ({layout.format_id}):\n"
            f"{lines}\n{layout.expected}"
        )
    P, G, N = (arrays[k].shape[0] for k in layout.size_arrays)
    return dim, P, G, N, next(t for k, t in _COV_KEYS.items() if k in arrays)


def _covariance_problems(group, arrays: dict) -> list[str]:
    """Exactly one covariance array must be there (a mistyped one is reported already)."""
    there = [k for k in _COV_KEYS if k in arrays or _member(group, k)]
    if not there:
        return ["array components/cov is missing (a store has exactly one covariance array, "
                "whose name says the form: components/cov for full covariances, "
                "components/cov_diag for diagonal ones, components/cov_spherical for spherical "
                "ones)"]
    if len(there) > 1:
        return [f"arrays {' and '.join(there)} are both present: a store has exactly one "
                "covariance array, whose name says the form; keep one"]
    return []


def _member(group, key: str) -> bool:
    try:
        group[key]
    except KeyError:
        return False
    return True


def _shape_problems(arrays: dict, d: int, layout: ZarrLayout) -> list[str]:
    sizes = tuple(arrays[k].shape[0] for k in layout.size_arrays)
    problems = []
    for key, arr in arrays.items():
        want = layout.arrays[key][1](*sizes, d)
        if tuple(arr.shape) != want:
            problems.append(f"array {key} has shape {tuple(arr.shape)}, expected {want}")
    if problems:
        return problems
    for key, level in layout.offsets:
        arr, end = arrays[key], sizes[level]
        first, last = int(arr[0]), int(arr[arr.shape[0] - 1])
        if first != 0 or last != end:
            problems.append(f"array {key} runs from {first} to {last}, expected 0 to {end}")
    return problems


class ZarrProblemWriter:
    """Write batches to a new ``raybary.problems.zarr/1`` store, in order.

    Arrays are created on the first batch (chunks sized from its problems per
    GMM and components per problem ratios) and grown with ``append``; the
    format attributes are written last, by :meth:`close`, so a half-written
    store is refused by :func:`~raybary.storage.open_store`.

    Args:
      url: where to write (replaced if it exists).
      dim: the dimension; taken from the first batch if ``None``.
      chunk_problems: problems per chunk.
      covariance_type: ``"full"``, ``"diag"`` or ``"spherical"``: which
        covariance array is written (``components/cov``, ``cov_diag``,
        ``cov_spherical``); a batch whose covariances that form cannot hold
        is refused (:meth:`ProblemColumns.stored_covariances`).
    """

    #: The format written (a GMM store's writer overrides it, :meth:`_spec` and
    #: :meth:`_append_levels`).
    layout = PROBLEM_LAYOUT

    def __init__(self, url: str, *, dim: int | None = None,
                 chunk_problems: int = CHUNK_PROBLEMS, covariance_type: str = "full",
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.dim = dim
        self.covariance_type = check_covariance_type(covariance_type)
        self._cov_key = f"components/{COVARIANCE_FIELDS[covariance_type]}"
        self.chunk_problems = int(chunk_problems)
        self._group = _fs.open_zarr_group(url, "w", storage_options)
        self._arrays: dict[str, zarr.Array] | None = None
        self._sizes = [0, 0, 0]  # P, G, N written
        self._last_id: int | None = None

    def _spec(self, cp: int, cg: int, cc: int) -> dict[str, tuple]:
        """``name: (initial shape, chunks, dtype)`` of the arrays, for ``cp``
        positions, ``cg`` GMMs and ``cc`` components per chunk."""
        return {
            "problems/id": ((0,), (cp,), "int64"),
            "problems/offset": ((1,), (cp,), "int64"),
            "gmms/offset": ((1,), (cg,), "int64"),
            "gmms/lambda": ((0,), (cg,), "float64"),
            "gmms/label": ((0,), (cg,), "int32"),
            **self._component_spec(cc),
        }

    def _component_spec(self, cc: int) -> dict[str, tuple]:
        """The components level's part of :meth:`_spec` (every layout has it)."""
        d = self.dim
        return {
            "components/weight": ((0,), (cc,), "float64"),
            "components/mean": ((0, d), (cc, d), "float64"),
            self._cov_key: {"full": ((0, d, d), (cc, d, d), "float64"),
                            "diag": ((0, d), (cc, d), "float64"),
                            "spherical": ((0,), (cc,), "float64")}[self.covariance_type],
        }

    def _create(self, gpp: float, cpp: float) -> None:
        cp = self.chunk_problems
        spec = self._spec(cp, max(1, round(cp * gpp)), max(1, round(cp * cpp)))
        self._arrays = {}
        for key, (shape, chunks, dtype) in spec.items():
            arr = self._group.create_array(key, shape=shape, chunks=chunks, dtype=dtype,
                                           fill_value=0)
            self._arrays[key] = arr
        for key, _ in self.layout.offsets:
            self._arrays[key][0:1] = 0

    def _append_levels(self, cols: ProblemColumns, P: int, G: int, N: int) -> None:
        """Append the arrays above the components (``P``, ``G``, ``N`` written so far)."""
        a = self._arrays
        a["problems/id"].append(cols.problem_id)
        a["problems/offset"].append(cols.gmm_offset[1:] + G)
        a["gmms/offset"].append(cols.comp_offset[1:] + N)
        a["gmms/lambda"].append(cols.lambdas)
        a["gmms/label"].append(cols.gmm_label.astype(np.int32))

    def write(self, cols: ProblemColumns) -> None:
        """Append a batch (one dimension, ids ascending)."""
        if cols.n_problems == 0:
            return
        d = cols.uniform_dim()
        if d is None or (self.dim is not None and d != self.dim):
            found = cols.dims() if d is None else [d]
            raise StoreDataError(
                f"a Zarr {self.layout.kind} store holds one dimension d (format "
                f"{self.layout.format_id}); this batch "
                f"has mean lengths {found}" + (f", the store has d={self.dim}" if self.dim else "")
                + ". Keep mixed dimensions in Parquet, or write one store per d"
            )
        ids = cols.problem_id
        if np.any(np.diff(ids) <= 0) or (self._last_id is not None and ids[0] <= self._last_id):
            raise StoreDataError("problems must be written in strictly ascending problem_id order")
        mean, _ = cols.dense()
        _, cov = cols.stored_covariances(self.covariance_type)  # refused before any write
        cov = cov.reshape({"full": (-1, d, d), "diag": (-1, d), "spherical": (-1,)}
                          [self.covariance_type])
        self.dim = d
        if self._arrays is None:
            self._create(cols.n_gmms / cols.n_problems, cols.n_components / cols.n_problems)
        P, G, N = self._sizes
        self._append_levels(cols, P, G, N)
        self._arrays["components/weight"].append(cols.weight)
        self._arrays["components/mean"].append(mean)
        self._arrays[self._cov_key].append(cov)
        self._sizes = [P + cols.n_problems, G + cols.n_gmms, N + cols.n_components]
        self._last_id = int(ids[-1])

    def close(self) -> None:
        """Create the arrays if no batch came, then write the format attributes."""
        if self._arrays is None:
            self.dim = self.dim or 1
            self._create(1.0, 1.0)
        self._group.attrs.update({"format": self.layout.format,
                                  "format_version": self.layout.version, "dim": int(self.dim)})

    def abort(self) -> None:
        """Give up after a failure: the format attributes are not written, so
        what was written is refused by :func:`~raybary.storage.open_store`."""

    def __enter__(self) -> ZarrProblemWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
