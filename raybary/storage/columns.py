"""A batch of problems in CSR layout: the common currency of readers and writers.

Readers decode a range of a store into :class:`ProblemColumns`, writers encode
one; converting between formats never builds a Python object per problem.
:meth:`ProblemColumns.to_problems` turns a batch into validated
:class:`raybary.types.Problem` objects (or messages) for the solver.

Layout (offsets start at 0 within a batch)::

    problem p   owns GMMs        gmm_offset[p]  : gmm_offset[p+1]
    GMM g       owns components  comp_offset[g] : comp_offset[g+1]
    component c has mean  mean_values[mean_offset[c] : mean_offset[c+1]]   (d values)
                and cov   cov_values[cov_offset[c] : cov_offset[c+1]]      (d*d, row-major)

Means and covariances are kept flat, like Arrow list columns, so that a
Parquet batch with mixed dimensions, or with a mean of the wrong length, can
be represented and reported rather than refused.

Covariances are always full here, whatever form a store keeps them in
(:data:`COVARIANCE_TYPES`, scikit-learn's names): readers expand a diagonal
or spherical store with :meth:`ProblemColumns.with_covariances`, writers
compact with :meth:`ProblemColumns.stored_covariances` (refusing what the
form cannot hold), so the solver and everything after it see one form.
``covariance_type`` records the stored form, for the messages of validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from raybary.storage import arrow
from raybary.types import Problem
from raybary.validation import join_messages, validate_arrays, where

__all__ = [
    "COVARIANCE_TYPES",
    "COVARIANCE_FIELDS",
    "check_covariance_type",
    "ProblemColumns",
    "segment_indices",
]

#: The forms a store may keep covariances in (scikit-learn's ``covariance_type``
#: names): ``full`` ``d*d`` values row-major, ``diag`` the ``d`` variances,
#: ``spherical`` one variance (the covariance is ``v * I``).
COVARIANCE_TYPES = ("full", "diag", "spherical")
#: The Parquet column (and Zarr array ``components/<name>``) of each form: the
#: name says the form, so it is never inferred from lengths.
COVARIANCE_FIELDS = {"full": "cov", "diag": "cov_diag", "spherical": "cov_spherical"}


def check_covariance_type(covariance_type: str) -> str:
    """``covariance_type`` if it is one of :data:`COVARIANCE_TYPES`, else ``ValueError``."""
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {', '.join(map(repr, COVARIANCE_TYPES))}, "
                         f"got {covariance_type!r}")
    return covariance_type


def segment_indices(offsets: np.ndarray, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat element indices of the CSR ``segments`` and their new offsets.

    ``offsets`` is a CSR offset array; ``segments`` lists segment numbers.
    Returns ``(indices, new_offsets)`` with ``indices`` the concatenation of
    ``arange(offsets[s], offsets[s+1])`` over ``segments``.
    """
    segments = np.asarray(segments, dtype=np.int64)
    starts = offsets[segments]
    lengths = offsets[segments + 1] - starts
    new_offsets = arrow.offsets(lengths)
    total = int(new_offsets[-1])
    shift = np.repeat(starts - new_offsets[:-1], lengths)
    return np.arange(total, dtype=np.int64) + shift, new_offsets


@dataclass
class ProblemColumns:
    """Problems in CSR layout (see the module docstring).

    ``issues`` maps a problem's index in the batch to messages found while
    decoding (nulls, inconsistent lambdas, ...): such problems are invalid.
    ``covariance_type`` is the form the covariances were stored in (they are
    full here whatever it is); validation names that field in its messages.
    """

    problem_id: np.ndarray
    gmm_offset: np.ndarray
    gmm_label: np.ndarray
    lambdas: np.ndarray
    comp_offset: np.ndarray
    weight: np.ndarray
    mean_offset: np.ndarray
    mean_values: np.ndarray
    cov_offset: np.ndarray
    cov_values: np.ndarray
    issues: dict[int, list[str]] = field(default_factory=dict)
    covariance_type: str = "full"

    # ------------------------------------------------------------------ build
    @classmethod
    def from_dense(
        cls,
        problem_id: np.ndarray,
        gmm_offset: np.ndarray,
        lambdas: np.ndarray,
        comp_offset: np.ndarray,
        weight: np.ndarray,
        mean: np.ndarray,
        cov: np.ndarray,
        gmm_label: np.ndarray | None = None,
    ) -> ProblemColumns:
        """Build from one-dimension arrays: ``mean (N, d)`` and ``cov (N, d, d)``."""
        n, d = mean.shape
        gmm_offset = np.asarray(gmm_offset, dtype=np.int64)
        if gmm_label is None:
            gmm_label = _local_index(gmm_offset)
        return cls(
            problem_id=np.asarray(problem_id, dtype=np.int64),
            gmm_offset=gmm_offset,
            gmm_label=np.asarray(gmm_label, dtype=np.int32),
            lambdas=np.asarray(lambdas, dtype=np.float64),
            comp_offset=np.asarray(comp_offset, dtype=np.int64),
            weight=np.asarray(weight, dtype=np.float64),
            mean_offset=np.arange(n + 1, dtype=np.int64) * d,
            mean_values=np.ascontiguousarray(mean, dtype=np.float64).reshape(-1),
            cov_offset=np.arange(n + 1, dtype=np.int64) * d * d,
            cov_values=np.ascontiguousarray(cov, dtype=np.float64).reshape(-1),
        )

    @classmethod
    def from_problems(
        cls, problems: Sequence[Problem], problem_ids: Sequence[int] | None = None
    ) -> ProblemColumns:
        """Build from :class:`Problem` objects (ids default to ``0..P-1``)."""
        if problem_ids is None:
            problem_ids = np.arange(len(problems))
        gmms = [g for p in problems for g in p.gmms]
        gmm_offset = arrow.offsets([p.n_gmms for p in problems])
        comp_offset = arrow.offsets([g.n_components for g in gmms])
        means = [g.means[k] for g in gmms for k in range(g.n_components)]
        covs = [g.covs[k].reshape(-1) for g in gmms for k in range(g.n_components)]
        return cls(
            problem_id=np.asarray(problem_ids, dtype=np.int64),
            gmm_offset=gmm_offset,
            gmm_label=_local_index(gmm_offset).astype(np.int32),
            lambdas=_concat([p.lambdas for p in problems]),
            comp_offset=comp_offset,
            weight=_concat([g.weights for g in gmms]),
            mean_offset=arrow.offsets([len(m) for m in means]),
            mean_values=_concat(means),
            cov_offset=arrow.offsets([len(c) for c in covs]),
            cov_values=_concat(covs),
        )

    @staticmethod
    def concat(batches: Sequence[ProblemColumns]) -> ProblemColumns:
        """Concatenate batches in order."""
        if len(batches) == 1:
            return batches[0]
        types = {b.covariance_type for b in batches}
        if len(types) > 1:
            raise ValueError(f"cannot concatenate batches of different covariance types {sorted(types)}")
        issues: dict[int, list[str]] = {}
        base = 0
        for b in batches:
            issues.update({base + k: v for k, v in b.issues.items()})
            base += b.n_problems
        return ProblemColumns(
            problem_id=_concat([b.problem_id for b in batches], np.int64),
            gmm_offset=_concat_offsets([b.gmm_offset for b in batches]),
            gmm_label=_concat([b.gmm_label for b in batches], np.int32),
            lambdas=_concat([b.lambdas for b in batches]),
            comp_offset=_concat_offsets([b.comp_offset for b in batches]),
            weight=_concat([b.weight for b in batches]),
            mean_offset=_concat_offsets([b.mean_offset for b in batches]),
            mean_values=_concat([b.mean_values for b in batches]),
            cov_offset=_concat_offsets([b.cov_offset for b in batches]),
            cov_values=_concat([b.cov_values for b in batches]),
            issues=issues,
            covariance_type=batches[0].covariance_type if batches else "full",
        )

    # ------------------------------------------------------------------ sizes
    @property
    def n_problems(self) -> int:
        return len(self.problem_id)

    @property
    def n_gmms(self) -> int:
        return len(self.lambdas)

    @property
    def n_components(self) -> int:
        return len(self.weight)

    def components_per_problem(self) -> np.ndarray:
        """Number of components of each problem."""
        return self.comp_offset[self.gmm_offset[1:]] - self.comp_offset[self.gmm_offset[:-1]]

    def mean_lengths(self) -> np.ndarray:
        return np.diff(self.mean_offset)

    def cov_lengths(self) -> np.ndarray:
        return np.diff(self.cov_offset)

    def uniform_dim(self) -> int | None:
        """The common dimension ``d`` if every mean has ``d`` and every cov ``d*d`` values."""
        ml, cl = self.mean_lengths(), self.cov_lengths()
        if len(ml) == 0:
            return None
        d = int(ml[0])
        if d > 0 and np.all(ml == d) and np.all(cl == d * d):
            return d
        return None

    def dims(self) -> list[int]:
        """The distinct mean lengths found in the batch."""
        return sorted(int(x) for x in np.unique(self.mean_lengths()))

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """``mean (N, d)`` and ``cov (N, d, d)``; requires :meth:`uniform_dim`."""
        d = self.uniform_dim()
        if d is None:
            raise ValueError(f"the batch has no single dimension (mean lengths {self.dims()})")
        n = self.n_components
        return self.mean_values.reshape(n, d), self.cov_values.reshape(n, d, d)

    # ----------------------------------------------------------------- select
    def take(self, problems: np.ndarray) -> ProblemColumns:
        """The sub-batch of the given problem indices (in that order)."""
        problems = np.asarray(problems, dtype=np.int64)
        g_idx, gmm_offset = segment_indices(self.gmm_offset, problems)
        c_idx, comp_offset = segment_indices(self.comp_offset, g_idx)
        m_idx, mean_offset = segment_indices(self.mean_offset, c_idx)
        v_idx, cov_offset = segment_indices(self.cov_offset, c_idx)
        position = {int(p): i for i, p in enumerate(problems)}
        return ProblemColumns(
            problem_id=self.problem_id[problems],
            gmm_offset=gmm_offset,
            gmm_label=self.gmm_label[g_idx],
            lambdas=self.lambdas[g_idx],
            comp_offset=comp_offset,
            weight=self.weight[c_idx],
            mean_offset=mean_offset,
            mean_values=self.mean_values[m_idx],
            cov_offset=cov_offset,
            cov_values=self.cov_values[v_idx],
            issues={position[k]: v for k, v in self.issues.items() if k in position},
            covariance_type=self.covariance_type,
        )

    def slice(self, start: int, stop: int) -> ProblemColumns:
        """Problems ``start:stop`` of the batch."""
        return self.take(np.arange(start, min(stop, self.n_problems)))

    # ----------------------------------------------------------------- decode
    def problem_dims(self) -> np.ndarray:
        """Each problem's dimension: the length of its first mean (0 without components)."""
        first = self.comp_offset[self.gmm_offset[:-1]]
        has_comp = self.components_per_problem() > 0
        d_problem = np.zeros(self.n_problems, dtype=np.int64)
        d_problem[has_comp] = self.mean_lengths()[first[has_comp]]
        return d_problem

    def component_owners(self) -> tuple[np.ndarray, np.ndarray]:
        """Each component's problem index and GMM index."""
        comp_gmm = np.repeat(np.arange(self.n_gmms), np.diff(self.comp_offset))
        gmm_problem = np.repeat(np.arange(self.n_problems), np.diff(self.gmm_offset))
        return gmm_problem[comp_gmm], comp_gmm

    def where(self, c: int, owners: tuple[np.ndarray, np.ndarray] | None = None) -> str:
        """The location of component ``c`` in messages: ``problem 17, gmm 2, component 0``."""
        p, g = (int(x[c]) for x in (owners or self.component_owners()))
        return where(self.problem_id[p], self.gmm_label[g], c - self.comp_offset[g])

    # ------------------------------------------------------------ covariances
    def with_covariances(self, covariance_type: str, values: np.ndarray,
                         offsets: np.ndarray | None = None) -> ProblemColumns:
        """This batch with its covariances taken from a store's ``covariance_type``
        form (:func:`raybary.storage.covariances.expand_covariances`)."""
        from raybary.storage.covariances import expand_covariances

        return expand_covariances(self, covariance_type, values, offsets)

    def stored_covariances(self, covariance_type: str) -> tuple[np.ndarray | None, np.ndarray]:
        """The covariances in a store's ``covariance_type`` form: ``(offsets, values)``
        (:func:`raybary.storage.covariances.stored_covariances`)."""
        from raybary.storage.covariances import stored_covariances

        return stored_covariances(self, covariance_type)

    def shape_messages(self) -> dict[int, list[str]]:
        """Messages for components whose mean or cov has the wrong length.

        A problem's dimension ``d`` is the length of its first mean; every
        mean must have ``d`` values and every cov ``d*d``.
        """
        ml, cl = self.mean_lengths(), self.cov_lengths()
        gmm_problem = np.repeat(np.arange(self.n_problems), np.diff(self.gmm_offset))
        comp_problem = np.repeat(gmm_problem, np.diff(self.comp_offset))
        d_problem = self.problem_dims()
        d_comp = d_problem[comp_problem]
        bad = (ml == 0) | (ml != d_comp) | (cl != d_comp * d_comp)
        if not bad.any():
            return {}
        comp_gmm = np.repeat(np.arange(self.n_gmms), np.diff(self.comp_offset))
        out: dict[int, list[str]] = {}
        for c in np.flatnonzero(bad):
            p, g = int(comp_problem[c]), int(comp_gmm[c])
            loc = where(self.problem_id[p], self.gmm_label[g], c - self.comp_offset[g])
            d = int(d_problem[p])
            if ml[c] == 0:
                msg = f"{loc}: mean is empty"
            elif ml[c] != d:
                msg = f"{loc}: mean has {ml[c]} values, expected {d} (the length of the problem's first mean)"
            else:
                msg = f"{loc}: cov has {cl[c]} values, expected {d * d} (d*d, row-major, for d={d})"
            out.setdefault(p, []).append(msg)
        return out

    def to_problems(
        self, *, renormalize: bool = False, dtype: str = "float64"
    ) -> tuple[list[Problem | None], list[str | None]]:
        """Validated problems, ``None`` where invalid, and the messages.

        Decoding issues and shape errors come first; the values of every other
        problem are checked by :func:`raybary.validation.validate_arrays`,
        grouped by dimension, for a solve in ``dtype``.
        """
        n = self.n_problems
        problems: list[Problem | None] = [None] * n
        errors: list[str | None] = [None] * n
        structural = self.structural_messages()
        for k, v in structural.items():
            errors[k] = join_messages(v)
        ok = np.array([i for i in range(n) if i not in structural], dtype=np.int64)
        if len(ok) == 0:
            return problems, errors
        d_problem = self.problem_dims()
        for d in np.unique(d_problem[ok]):
            members = ok[d_problem[ok] == d]
            sub = self if len(members) == n else self.take(members)
            checked = _validate(sub, int(d), renormalize, dtype)
            for i, p in enumerate(members):
                if checked.errors[i] is None:
                    problems[p] = checked.problem(i)
                else:
                    errors[p] = checked.errors[i]
        return problems, errors

    def structural_messages(self) -> dict[int, list[str]]:
        """Decoding issues plus shape errors, by problem index (empty if none)."""
        out: dict[int, list[str]] = {k: list(v) for k, v in self.issues.items()}
        for k, v in self.shape_messages().items():
            out.setdefault(k, []).extend(v)
        return out


def _validate(cols: ProblemColumns, d: int, renormalize: bool, dtype: str):
    n = cols.n_components
    return validate_arrays(
        problem_ids=cols.problem_id,
        gmm_offset=cols.gmm_offset,
        lambdas=cols.lambdas,
        comp_offset=cols.comp_offset,
        weights=cols.weight,
        means=cols.mean_values.reshape(n, d),
        covs=cols.cov_values.reshape(n, d, d),
        gmm_labels=cols.gmm_label,
        renormalize=renormalize,
        dtype=dtype,
        covariance_type=cols.covariance_type,
    )


def _local_index(offsets: np.ndarray) -> np.ndarray:
    """``0..len-1`` within each CSR segment."""
    n = int(offsets[-1])
    return np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets))


def _concat(arrays: Sequence[np.ndarray], dtype=np.float64) -> np.ndarray:
    arrays = [np.asarray(a, dtype=dtype).reshape(-1) for a in arrays]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _concat_offsets(offsets: Sequence[np.ndarray]) -> np.ndarray:
    parts = [np.zeros(1, dtype=np.int64)]
    base = 0
    for o in offsets:
        parts.append(np.asarray(o[1:], dtype=np.int64) + base)
        base += int(o[-1])
    return np.concatenate(parts)
