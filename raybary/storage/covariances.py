"""Covariance forms of a store: ``full``, ``diag``, ``spherical`` (scikit-learn's names).

A store keeps each covariance in one form, named by its column (see
:data:`~raybary.storage.columns.COVARIANCE_FIELDS`); a
:class:`~raybary.storage.columns.ProblemColumns` batch always holds full
``d x d`` matrices. :func:`expand_covariances` reads a form into full
matrices; :func:`stored_covariances` writes full matrices in a form, refusing
to drop anything (off-diagonal entries, unequal variances).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from raybary.storage import arrow
from raybary.storage.columns import (
    COVARIANCE_FIELDS,
    ProblemColumns,
    check_covariance_type,
    segment_indices,
)
from raybary.storage.errors import StoreDataError
from raybary.validation import fmt_number

__all__ = ["expand_covariances", "stored_covariances"]


def expand_covariances(cols: ProblemColumns, covariance_type: str, values: np.ndarray,
                       offsets: np.ndarray | None = None) -> ProblemColumns:
    """``cols`` with its covariances taken from a store's ``covariance_type`` form.

    ``full``: ``offsets (N+1,)`` and flat ``values``, ``d*d`` per component,
    row-major, kept as they are. ``diag``: ``offsets`` and flat ``values``,
    the ``d`` variances of each component. ``spherical``: ``values (N,)``,
    one variance each. Diagonal and spherical ones become full ``d x d``
    matrices (``diag(v)``, ``v * I``), with ``d`` the problem's dimension
    (the length of its first mean); a ``cov_diag`` of another length is
    reported as an issue of its problem (and expanded to NaN).
    """
    check_covariance_type(covariance_type)
    values = np.asarray(values, dtype=np.float64)
    if covariance_type == "full":
        return replace(cols, cov_offset=np.asarray(offsets, dtype=np.int64), cov_values=values,
                       covariance_type="full")
    owners = cols.component_owners()
    comp_problem = owners[0]
    d = cols.problem_dims()[comp_problem]
    issues = {k: list(v) for k, v in cols.issues.items()}
    if covariance_type == "diag":
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        ok = lengths == d
        # a wrong mean is reported by shape_messages; one message per component
        for c in np.flatnonzero(~ok & (d > 0) & (cols.mean_lengths() == d)):
            full = " (d*d values: a full covariance goes in column 'cov')" \
                if lengths[c] == d[c] * d[c] else ""
            issues.setdefault(int(comp_problem[c]), []).append(
                f"{cols.where(c, owners)}: cov_diag has {lengths[c]} values, expected {d[c]} "
                f"(d: one variance per coordinate, for d={d[c]}){full}")
        source = offsets[:-1]
        step = 1
    else:
        ok = np.ones(len(d), dtype=bool)
        source = np.arange(len(d), dtype=np.int64)
        step = 0
    cov_offset = arrow.offsets(d * d)
    cov_values = np.zeros(int(cov_offset[-1]))
    cov_values[segment_indices(cov_offset, np.flatnonzero(~ok))[0]] = np.nan
    comps = np.flatnonzero(ok)
    c = np.repeat(comps, d[comps])
    i = np.arange(len(c)) - np.repeat(np.cumsum(d[comps]) - d[comps], d[comps])
    cov_values[cov_offset[c] + i * (d[c] + 1)] = values[source[c] + step * i]
    return replace(cols, cov_offset=cov_offset, cov_values=cov_values, issues=issues,
                   covariance_type=covariance_type)


def stored_covariances(cols: ProblemColumns,
                       covariance_type: str) -> tuple[np.ndarray | None, np.ndarray]:
    """The covariances of ``cols`` in a store's ``covariance_type`` form: ``(offsets, values)``.

    ``full``: the flat ``d*d`` values; ``diag``: the diagonals (``d``
    values each); ``spherical``: ``offsets`` is ``None`` and ``values``
    one variance per component. Nothing is dropped silently: a covariance
    with a non-zero (or NaN) off-diagonal entry cannot be diagonal, nor
    one whose variances differ spherical, and the first such component is
    named in the :class:`StoreDataError`.
    """
    check_covariance_type(covariance_type)
    if covariance_type == "full":
        return cols.cov_offset, cols.cov_values
    lengths = cols.cov_lengths()
    d = np.rint(np.sqrt(lengths)).astype(np.int64)
    if np.any(d * d != lengths):
        c = int(np.flatnonzero(d * d != lengths)[0])
        raise StoreDataError(f"{cols.where(c)}: cov has {lengths[c]} values, not d*d for any d")
    field = COVARIANCE_FIELDS[covariance_type]
    on_diagonal = np.zeros(len(cols.cov_values), dtype=bool)
    c = np.repeat(np.arange(len(d)), d)
    i = np.arange(len(c)) - np.repeat(np.cumsum(d) - d, d)
    on_diagonal[cols.cov_offset[c] + i * (d[c] + 1)] = True
    diag = cols.cov_values[on_diagonal]
    off = np.flatnonzero(~on_diagonal & (cols.cov_values != 0))
    if len(off):
        k = int(np.searchsorted(cols.cov_offset, off[0], side="right") - 1)
        row, col = divmod(int(off[0] - cols.cov_offset[k]), int(d[k]))
        n_bad = len(np.unique(np.searchsorted(cols.cov_offset, off, side="right")))
        raise StoreDataError(
            f"cannot store the covariances as {field} ({covariance_type}): {cols.where(k)} "
            f"has the off-diagonal entry {fmt_number(cols.cov_values[off[0]])} at row {row}, "
            f"column {col} ({n_bad} of the {len(d)} components of this batch have non-zero "
            "off-diagonal entries); nothing is dropped silently: keep them with "
            "covariance_type='full' (--covariance-type full)")
    diag_offset = arrow.offsets(d)
    if covariance_type == "diag":
        return diag_offset, diag
    if np.any(d == 0):
        k = int(np.flatnonzero(d == 0)[0])
        raise StoreDataError(f"cannot store {cols.where(k)} as cov_spherical: its covariance is empty")
    first = np.repeat(diag[diag_offset[:-1]], d)
    differs = (diag != first) & ~(np.isnan(diag) & np.isnan(first))
    if differs.any():
        k = int(c[np.flatnonzero(differs)[0]])
        j = int(np.flatnonzero(differs)[0] - diag_offset[k])
        n_bad = len(np.unique(c[differs]))
        raise StoreDataError(
            f"cannot store the covariances as cov_spherical (spherical): {cols.where(k)} is "
            f"not isotropic (variance {fmt_number(diag[diag_offset[k]])} on coordinate 0, "
            f"{fmt_number(diag[diag_offset[k] + j])} on coordinate {j}; {n_bad} of the {len(d)} "
            "components of this batch are not); nothing is dropped silently: keep them with "
            "covariance_type='diag' or 'full' (--covariance-type diag|full)")
    return None, diag[diag_offset[:-1]]
