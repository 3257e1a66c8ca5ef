"""Per-problem validation: clear messages, and nothing lost.

:func:`problem_errors` checks one :class:`raybary.types.Problem`;
:func:`problems_errors` checks many at once (``raybary.solve`` calls it on the
problems users build themselves, with the dtype it solves in), and the storage
readers call the vectorised :func:`validate_arrays` on a whole shard (the
runner passes the run's dtype). Same rules, same messages. A bad problem gets a message naming
the problem id, the GMM, the component and the field, e.g.::

    problem 17, gmm 2, component 0: covariance is not positive definite (smallest eigenvalue -2.0)

and every other problem is still solved.

Rules and tolerances (also in ``docs/storage.md``):

* the problem has at least one GMM, and the dimension ``d`` is at least 1;
* lambdas are finite and non-negative, and not all zero; they are divided by
  their sum (any positive scale is accepted);
* every GMM has at least one component and one of positive weight; weights
  are finite and non-negative, and sum to one within :data:`WEIGHT_SUM_ATOL`
  (float64 weights rounded to float32 are off by at most ~6e-8 in sum); with
  ``renormalize=True`` any positive sum is accepted. Weights are always
  divided by their sum;
* means and covariances are finite;
* covariances are symmetric within :data:`SYMMETRY_RTOL` relative to their
  largest entry (float32 rounding is ~6e-8; they are then symmetrised), and
  positive definite: the smallest eigenvalue must be positive and exceed
  :func:`pd_rtol` times the largest (else "numerically singular"). That
  ratio depends on the precision the problem is solved in: :data:`PD_RTOL`
  (1e-12) in float64, ``10 * eps`` (about 1.2e-6) in float32, where rounding
  each entry to float32 already moves the eigenvalues by about ``eps`` times
  the largest, so a smaller one has no reliable sign.

Covariances read from a diagonal or spherical store (``covariance_type``
``"diag"``/``"spherical"``, the Parquet columns ``cov_diag``/``cov_spherical``)
arrive as full matrices; the same rules then say that each variance is finite
and positive (and, for ``diag``, that the smallest exceeds :func:`pd_rtol`
times the largest), and the messages name that field, e.g.
``problem 17, gmm 2, component 0: cov_diag has a non-positive variance (-2.0)``.

Shape errors (a mean of the wrong length, ...) cannot occur in a ``Problem``
(its constructor refuses them); the storage readers report those themselves,
with :func:`where` and the same wording.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raybary.types import GMM, Problem

__all__ = [
    "WEIGHT_SUM_ATOL",
    "SYMMETRY_RTOL",
    "PD_RTOL",
    "pd_rtol",
    "MAX_MESSAGES",
    "problem_errors",
    "problems_errors",
    "validate_arrays",
    "ValidatedArrays",
    "where",
    "fmt_number",
    "join_messages",
]

#: Largest accepted ``|sum_k w_k - 1|`` for the component weights of a GMM.
WEIGHT_SUM_ATOL = 1e-6
#: Largest accepted ``max|C - C^T| / max|C|`` for a covariance.
SYMMETRY_RTOL = 1e-6
#: A covariance is positive definite when ``0 < eig_min`` and ``eig_min > PD_RTOL * eig_max``.
PD_RTOL = 1e-12


def pd_rtol(dtype: str | np.dtype = "float64") -> float:
    r"""Smallest accepted ``eig_min / eig_max`` of a covariance solved in ``dtype``.

    :math:`\max(\text{PD\_RTOL}, 10\,\varepsilon_{\text{dtype}})`: 1e-12 in float64,
    about 1.2e-6 in float32 (a covariance rounded to float32 has its
    eigenvalues moved by about :math:`\varepsilon \lambda_{max}`).
    """
    return max(PD_RTOL, 10.0 * float(np.finfo(np.dtype(dtype)).eps))


#: At most this many messages are joined (with ``"; "``) into one error string.
MAX_MESSAGES = 3


def fmt_number(x: float) -> str:
    """Format a number for a message: 6 significant digits, ``-2.0`` not ``-2``."""
    s = f"{float(x):.6g}"
    if s.lstrip("-").isdigit():
        s += ".0"
    return s


def where(problem_id: int, gmm: int | None = None, component: int | None = None) -> str:
    """The location prefix of a message: ``problem 17, gmm 2, component 0``."""
    out = f"problem {int(problem_id)}"
    if gmm is not None:
        out += f", gmm {int(gmm)}"
    if component is not None:
        out += f", component {int(component)}"
    return out


def join_messages(messages: Sequence[str], max_messages: int = MAX_MESSAGES) -> str | None:
    """Join messages with ``"; "``, keeping the first ``max_messages``."""
    if not messages:
        return None
    shown = list(messages[:max_messages])
    if len(messages) > max_messages:
        more = len(messages) - max_messages
        shown.append(f"and {more} more error{'s' if more > 1 else ''}")
    return "; ".join(shown)


def problem_errors(
    problem: Problem,
    problem_id: int,
    *,
    renormalize: bool = False,
    gmm_labels: Sequence[int] | None = None,
    max_messages: int = MAX_MESSAGES,
    dtype: str = "float64",
) -> tuple[Problem | None, str | None]:
    """Validate one problem; return ``(clean_problem, None)`` or ``(None, message)``.

    Args:
      problem: any :class:`raybary.types.Problem`.
      problem_id: the id used in messages.
      renormalize: accept component weights whose sum is positive but not one
        (they are divided by their sum) instead of reporting an error.
      gmm_labels: how to name the GMMs in messages (default ``0..J-1``); the
        Parquet reader passes the values of the ``gmm`` column.
      max_messages: at most this many messages are joined with ``"; "``
        (then ``"and N more errors"``); each starts with its location, e.g.
        ``problem 17, gmm 2, component 0: weight is negative (-0.5)``.
      dtype: the precision the problem will be solved in; it sets how
        ill-conditioned a covariance may be (:func:`pd_rtol`).

    Returns:
      For a valid problem a cleaned copy (lambdas and weights divided by their
      sums, covariances symmetrised) and ``None``; for an invalid one ``None``
      and the message.
    """
    if problem.n_gmms == 0:
        return None, f"{where(problem_id)}: has no GMM"
    checked = validate_arrays(
        **_csr_arrays([problem], [problem_id]),
        gmm_labels=None if gmm_labels is None else np.asarray(gmm_labels),
        renormalize=renormalize,
        max_messages=max_messages,
        dtype=dtype,
    )
    if checked.errors[0] is not None:
        return None, checked.errors[0]
    return checked.problem(0), None


def _csr_arrays(problems: Sequence[Problem], problem_ids: Sequence[int]) -> dict:
    """The CSR arguments of :func:`validate_arrays` for problems of one dimension."""
    d = problems[0].dim
    gmms = [g for p in problems for g in p.gmms]
    n = sum(g.n_components for g in gmms)
    return dict(
        problem_ids=np.asarray(problem_ids, dtype=np.int64),
        gmm_offset=np.concatenate([[0], np.cumsum([p.n_gmms for p in problems])]).astype(np.int64),
        lambdas=np.concatenate([p.lambdas for p in problems]),
        comp_offset=np.concatenate([[0], np.cumsum([g.n_components for g in gmms])]).astype(np.int64),
        weights=np.concatenate([g.weights for g in gmms]),
        means=np.concatenate([g.means for g in gmms]).reshape(n, d),
        covs=np.concatenate([g.covs for g in gmms]).reshape(n, d, d),
    )


def problems_errors(problems: Sequence[Problem], dtype: str = "float64") -> list[str | None]:
    """The message of each invalid problem (``None`` for a valid one), ids = positions.

    Same rules as :func:`problem_errors` (``dtype`` as there), but one vectorised
    :func:`validate_arrays` call per dimension: a per-problem loop costs about
    a millisecond each.
    """
    errors: list[str | None] = [None] * len(problems)
    by_dim: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        if p.n_gmms == 0:
            errors[i] = f"{where(i)}: has no GMM"
        else:
            by_dim[p.dim].append(i)
    for idx in by_dim.values():
        checked = validate_arrays(**_csr_arrays([problems[i] for i in idx], idx), dtype=dtype)
        for i, err in zip(idx, checked.errors):
            errors[i] = err
    return errors


@dataclass
class ValidatedArrays:
    """The outcome of :func:`validate_arrays`: one error (or ``None``) per problem.

    ``lambdas``, ``weights`` and ``covs`` are the cleaned arrays (normalised,
    symmetrised) wherever the problem is valid; use :meth:`problem` to build
    the :class:`Problem` of a valid one.
    """

    errors: list[str | None]
    gmm_offset: np.ndarray
    comp_offset: np.ndarray
    lambdas: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray

    def problem(self, i: int) -> Problem:
        """The cleaned :class:`Problem` number ``i`` (must be valid)."""
        g0, g1 = self.gmm_offset[i], self.gmm_offset[i + 1]
        gmms = []
        for g in range(g0, g1):
            c0, c1 = self.comp_offset[g], self.comp_offset[g + 1]
            gmms.append(GMM(self.weights[c0:c1], self.means[c0:c1], self.covs[c0:c1]))
        return Problem(tuple(gmms), self.lambdas[g0:g1])


def validate_arrays(
    *,
    problem_ids: np.ndarray,
    gmm_offset: np.ndarray,
    lambdas: np.ndarray,
    comp_offset: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covs: np.ndarray,
    gmm_labels: np.ndarray | None = None,
    renormalize: bool = False,
    max_messages: int = MAX_MESSAGES,
    dtype: str = "float64",
    covariance_type: str = "full",
) -> ValidatedArrays:
    """Validate many problems of one dimension ``d`` at once (CSR layout).

    Problem ``p`` owns GMMs ``gmm_offset[p]:gmm_offset[p+1]``; GMM ``g`` owns
    components ``comp_offset[g]:comp_offset[g+1]``; ``means`` is ``(N, d)``
    and ``covs`` ``(N, d, d)``. The rules are those of :func:`problem_errors`;
    the work is vectorised and messages are built only for bad problems.
    ``dtype`` is the precision the problems will be solved in (:func:`pd_rtol`).
    ``covariance_type`` is the form a store kept the covariances in
    (``"full"``, ``"diag"``, ``"spherical"``): ``covs`` are full matrices
    either way (diagonal ones unless ``"full"``: their variances are taken as
    the eigenvalues), and the messages name the stored field (``cov_diag``, ...).
    """
    if covariance_type not in _COV_WORDS:
        raise ValueError(f"covariance_type must be one of {sorted(_COV_WORDS)}, got {covariance_type!r}")
    n_gmms = len(lambdas)
    n_comp = len(weights)
    d = means.shape[1] if means.ndim == 2 else 0
    if gmm_labels is None:
        gmm_labels = np.arange(n_gmms) - np.repeat(gmm_offset[:-1], np.diff(gmm_offset))
    comp_flags = _component_flags(weights, means, covs, pd_rtol(dtype), covariance_type)
    w_ok = np.isfinite(weights) & (weights >= 0)
    w_clean = np.where(w_ok, weights, 0.0)
    w_sum = _segment_sum(w_clean, comp_offset)
    w_all_ok = _segment_sum(~w_ok, comp_offset) == 0
    gmm_flags = {
        "empty": np.diff(comp_offset) == 0,
        "no_positive": w_all_ok & (_segment_sum(w_clean > 0, comp_offset) == 0),
        "lam_nonfinite": ~np.isfinite(lambdas),
        "lam_negative": lambdas < 0,
    }
    gmm_flags["bad_sum"] = (
        w_all_ok
        & ~gmm_flags["no_positive"]
        & ~gmm_flags["empty"]
        & (np.abs(w_sum - 1.0) > WEIGHT_SUM_ATOL)
        & (not renormalize)
    )
    lam_clean = np.where(np.isfinite(lambdas) & (lambdas > 0), lambdas, 0.0)
    lam_sum = _segment_sum(lam_clean, gmm_offset)
    lam_ok = ~(gmm_flags["lam_nonfinite"] | gmm_flags["lam_negative"])
    problem_flags = {
        "no_gmm": np.diff(gmm_offset) == 0,
        "zero_dim": (d == 0) & (_segment_sum(np.diff(comp_offset), gmm_offset) > 0),
        "lam_zero": (_segment_sum(~lam_ok, gmm_offset) == 0) & (lam_sum == 0),
    }
    comp_bad = np.zeros(n_comp, dtype=bool)
    for v in comp_flags.values():
        if isinstance(v, np.ndarray) and v.dtype == bool:
            comp_bad |= v
    gmm_bad = np.zeros(n_gmms, dtype=bool)
    for v in gmm_flags.values():
        gmm_bad |= v
    gmm_bad |= _segment_sum(comp_bad, comp_offset) > 0
    bad = np.zeros(len(problem_ids), dtype=bool)
    for v in problem_flags.values():
        bad |= v
    bad |= _segment_sum(gmm_bad, gmm_offset) > 0

    errors: list[str | None] = [None] * len(problem_ids)
    for p in np.flatnonzero(bad):
        messages = _problem_messages(
            int(p), problem_ids, gmm_offset, comp_offset, gmm_labels,
            lambdas, weights, w_sum, problem_flags, gmm_flags, comp_flags,
        )
        errors[p] = join_messages(messages, max_messages)

    safe_w = np.where(w_sum > 0, w_sum, 1.0)
    safe_lam = np.where(lam_sum > 0, lam_sum, 1.0)
    return ValidatedArrays(
        errors=errors,
        gmm_offset=gmm_offset,
        comp_offset=comp_offset,
        lambdas=lambdas / np.repeat(safe_lam, np.diff(gmm_offset)),
        weights=weights / np.repeat(safe_w, np.diff(comp_offset)),
        means=means,
        covs=0.5 * (covs + np.swapaxes(covs, -1, -2)),
    )


def _segment_sum(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of ``x`` over the CSR segments ``offsets[i]:offsets[i+1]`` (empty ones give 0)."""
    x = np.asarray(x, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    return csum[offsets[1:]] - csum[offsets[:-1]]


def _component_flags(weights: np.ndarray, means: np.ndarray, covs: np.ndarray,
                     rtol: float, covariance_type: str = "full") -> dict:
    """Per-component failure flags, plus the numbers the messages quote.

    Diagonal covariances (``covariance_type`` ``diag``/``spherical``) have
    their variances as eigenvalues: no eigendecomposition is needed.
    """
    n = len(weights)
    w_nonfinite = ~np.isfinite(weights)
    w_negative = ~w_nonfinite & (weights < 0)
    mean_nonfinite = ~np.isfinite(means).all(axis=1)
    cov_nonfinite = ~np.isfinite(covs).all(axis=(1, 2))
    finite_covs = np.where(cov_nonfinite[:, None, None], 0.0, covs)
    scale = np.abs(finite_covs).max(axis=(1, 2), initial=0.0)
    asym = np.abs(finite_covs - np.swapaxes(finite_covs, -1, -2)).max(axis=(1, 2), initial=0.0)
    cov_asym = ~cov_nonfinite & (asym > SYMMETRY_RTOL * scale)
    check = ~cov_nonfinite & ~cov_asym
    d = covs.shape[-1] if covs.ndim == 3 else 0
    eig_min = np.full(n, np.nan)
    eig_max = np.full(n, np.nan)
    if d > 0 and check.any() and covariance_type != "full":
        var = np.diagonal(finite_covs[check], axis1=-2, axis2=-1)
        eig_min[check] = var.min(axis=1)
        eig_max[check] = var.max(axis=1)
    elif d > 0 and check.any():
        eig = np.linalg.eigvalsh(0.5 * (finite_covs[check] + np.swapaxes(finite_covs[check], -1, -2)))
        eig_min[check] = eig[:, 0]
        eig_max[check] = eig[:, -1]
    not_pd = check & (eig_min <= 0)
    singular = check & ~not_pd & (eig_min <= rtol * eig_max)
    return {
        "w_nonfinite": w_nonfinite,
        "w_negative": w_negative,
        "mean_nonfinite": mean_nonfinite,
        "cov_nonfinite": cov_nonfinite,
        "cov_asym": cov_asym,
        "not_pd": not_pd,
        "singular": singular,
        "asym": asym,
        "scale": scale,
        "eig_min": eig_min,
        "eig_max": eig_max,
        "rtol": np.float64(rtol),
        "words": _COV_WORDS[covariance_type],
        "first": covs[:, 0, 0] if d > 0 else np.full(n, np.nan),
    }


def _problem_messages(
    p, problem_ids, gmm_offset, comp_offset, gmm_labels, lambdas, weights, w_sum,
    problem_flags, gmm_flags, comp_flags,
) -> list[str]:
    pid = int(problem_ids[p])
    if problem_flags["no_gmm"][p]:
        return [f"{where(pid)}: has no GMM"]
    messages = []
    if problem_flags["zero_dim"][p]:
        messages.append(f"{where(pid)}: dimension d is 0 (the means are empty)")
    for g in range(gmm_offset[p], gmm_offset[p + 1]):
        loc = where(pid, gmm_labels[g])
        if gmm_flags["lam_nonfinite"][g]:
            messages.append(f"{loc}: lambda is not finite ({fmt_number(lambdas[g])})")
        elif gmm_flags["lam_negative"][g]:
            messages.append(f"{loc}: lambda is negative ({fmt_number(lambdas[g])})")
    if problem_flags["lam_zero"][p]:
        messages.append(f"{where(pid)}: lambdas are all zero")
    for g in range(gmm_offset[p], gmm_offset[p + 1]):
        messages += _gmm_messages(g, pid, gmm_labels[g], comp_offset, weights, w_sum,
                                  gmm_flags, comp_flags)
    return messages


def _gmm_messages(g, pid, label, comp_offset, weights, w_sum, gmm_flags, comp_flags) -> list[str]:
    loc = where(pid, label)
    if gmm_flags["empty"][g]:
        return [f"{loc}: has no component"]
    messages = []
    for c in range(comp_offset[g], comp_offset[g + 1]):
        messages += _component_messages(c, where(pid, label, c - comp_offset[g]), weights, comp_flags)
    if gmm_flags["no_positive"][g]:
        messages.append(f"{loc}: no component has positive weight")
    elif gmm_flags["bad_sum"][g]:
        messages.append(
            f"{loc}: weights sum to {fmt_number(w_sum[g])}, expected 1 within "
            f"{fmt_number(WEIGHT_SUM_ATOL)} (renormalize=True / --renormalize rescales them)"
        )
    return messages


def _component_messages(c: int, loc: str, weights: np.ndarray, f: dict) -> list[str]:
    messages = []
    if f["w_nonfinite"][c]:
        messages.append(f"{loc}: weight is not finite ({fmt_number(weights[c])})")
    elif f["w_negative"][c]:
        messages.append(f"{loc}: weight is negative ({fmt_number(weights[c])})")
    if f["mean_nonfinite"][c]:
        messages.append(f"{loc}: mean is not finite")
    words = f["words"]
    if f["cov_nonfinite"][c]:
        value = f" ({fmt_number(f['first'][c])})" if words["quote_value"] else ""
        messages.append(f"{loc}: {words['name']} is not finite{value}")
    elif f["cov_asym"][c]:
        messages.append(
            f"{loc}: covariance is not symmetric (largest |C - C^T| is {fmt_number(f['asym'][c])},"
            f" more than {fmt_number(SYMMETRY_RTOL)} x its largest entry {fmt_number(f['scale'][c])})"
        )
    elif f["not_pd"][c]:
        messages.append(f"{loc}: " + words["not_pd"].format(fmt_number(f["eig_min"][c])))
    elif f["singular"][c]:
        messages.append(
            f"{loc}: {words['name']} is numerically singular (smallest {words['eig']} "
            f"{fmt_number(f['eig_min'][c])}, largest {fmt_number(f['eig_max'][c])})"
            + _precision_hint(f["rtol"], f["eig_min"][c] / f["eig_max"][c])
        )
    return messages


#: How the messages name a covariance and its eigenvalues, by stored form.
_COV_WORDS = {
    "full": {"name": "covariance", "eig": "eigenvalue", "quote_value": False,
             "not_pd": "covariance is not positive definite (smallest eigenvalue {})"},
    "diag": {"name": "cov_diag", "eig": "variance", "quote_value": False,
             "not_pd": "cov_diag has a non-positive variance ({})"},
    "spherical": {"name": "cov_spherical", "eig": "variance", "quote_value": True,
                  "not_pd": "cov_spherical is not positive ({})"},
}


def _precision_hint(rtol: float, ratio: float) -> str:
    """What to do when a covariance is fine in float64 but too ill-conditioned for float32."""
    if rtol <= PD_RTOL or ratio <= PD_RTOL:
        return ""
    return (f"; float32 needs a ratio above {fmt_number(rtol)}: solve in float64 "
            "(dtype='float64', raybary run --dtype float64)")
