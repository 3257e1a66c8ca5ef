"""Plain NumPy containers shared by every layer: GMMs, problems and results.

This module imports NumPy only, so storage, validation and the CLI can use it
without pulling in JAX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GMM", "Problem", "Result", "BatchOutcome", "STATUSES"]

#: What became of a problem: solved, rejected by validation, or not solved.
STATUSES = ("ok", "invalid", "failed")


def _as_float_array(x, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


@dataclass(frozen=True, eq=False)
class GMM:
    r"""A Gaussian mixture :math:`\sum_k w_k \mathcal{N}(m_k, C_k)` in :math:`\mathbb{R}^d`.

    Args:
      weights: component weights ``(K,)``, non-negative, summing to one.
      means: component means ``(K, d)``.
      covs: component covariances ``(K, d, d)``, symmetric positive definite.

    Only shapes are checked here; values (finiteness, symmetry, definiteness,
    normalisation) are checked by :mod:`raybary.validation`.
    """

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray

    def __post_init__(self) -> None:
        w = _as_float_array(self.weights, "weights", 1)
        m = _as_float_array(self.means, "means", 2)
        c = _as_float_array(self.covs, "covs", 3)
        k, d = m.shape
        if w.shape[0] != k:
            raise ValueError(f"weights has {w.shape[0]} entries but means has {k} rows")
        if c.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}), got {c.shape}")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "covs", c)

    @property
    def n_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    # Conversions to and from other libraries (raybary.interop; each library is
    # imported only when its conversion is called, see docs/interop.md).
    @classmethod
    def from_sklearn(cls, gm: Any) -> GMM:
        """The GMM of a fitted ``sklearn.mixture.GaussianMixture`` or
        ``BayesianGaussianMixture``, of any ``covariance_type`` (full, tied, diag,
        spherical: expanded to ``(K, d, d)``). Needs scikit-learn."""
        from raybary.interop.sklearn import from_sklearn

        return from_sklearn(gm)

    def to_sklearn(self, **params: Any) -> Any:
        """A fitted-looking ``sklearn.mixture.GaussianMixture(covariance_type="full")``
        (``score_samples``, ``predict_proba``, ``sample`` work); ``params`` go to its
        constructor, e.g. ``random_state``. Needs scikit-learn."""
        from raybary.interop.sklearn import to_sklearn

        return to_sklearn(self, **params)

    @classmethod
    def from_pot(cls, means: Any, covs: Any, weights: Any) -> GMM:
        """The GMM of POT's ``ot.gmm`` arrays ``(means (K, d), covs (K, d, d), weights (K,))``."""
        from raybary.interop.pot import from_pot

        return from_pot(means, covs, weights)

    def to_pot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(means, covs, weights)``, the order of POT's ``ot.gmm`` functions' arguments."""
        from raybary.interop.pot import to_pot

        return to_pot(self)

    @classmethod
    def from_ott(cls, gm: Any) -> GMM:
        """The GMM of an OTT-JAX ``ott.tools.gaussian_mixture.gaussian_mixture.GaussianMixture``.
        Needs OTT-JAX."""
        from raybary.interop.ott import from_ott

        return from_ott(gm)

    def to_ott(self) -> Any:
        """OTT-JAX's ``GaussianMixture`` of this GMM (components of weight 0 left out).
        Needs OTT-JAX."""
        from raybary.interop.ott import to_ott

        return to_ott(self)


@dataclass(frozen=True, eq=False)
class Problem:
    r"""One barycenter problem: J GMMs in the same dimension and barycentric weights.

    The barycenter minimises :math:`\sum_j \lambda_j MW_2^2(\mu, \mathrm{GMM}_j)`.
    """

    gmms: tuple[GMM, ...]
    lambdas: np.ndarray

    def __post_init__(self) -> None:
        gmms = tuple(self.gmms)
        for j, g in enumerate(gmms):
            if not isinstance(g, GMM):
                raise TypeError(f"gmms[{j}] must be a raybary.GMM, got {type(g).__name__}")
        lam = _as_float_array(self.lambdas, "lambdas", 1)
        if lam.shape[0] != len(gmms):
            raise ValueError(f"lambdas has {lam.shape[0]} entries but there are {len(gmms)} GMMs")
        dims = {g.dim for g in gmms}
        if len(dims) > 1:
            raise ValueError(f"all GMMs of a problem must share one dimension, got {sorted(dims)}")
        object.__setattr__(self, "gmms", gmms)
        object.__setattr__(self, "lambdas", lam)

    @property
    def dim(self) -> int:
        return self.gmms[0].dim if self.gmms else 0

    @property
    def n_gmms(self) -> int:
        return len(self.gmms)

    @property
    def n_components(self) -> int:
        """Total number of components over all GMMs."""
        return sum(g.n_components for g in self.gmms)


@dataclass(eq=False)
class Result:
    """The barycenter of one problem and how the solver got there.

    Attributes:
      weights, means, covs: the barycenter GMM, ``(n,)``, ``(n, d)``, ``(n, d, d)``.
      objective: transport objective ``sum_j lambda_j <P_j, C_j>`` of the final
        plans against the returned atoms, without the entropy term:
        ``sum_j lambdas[j] * costs[j]`` (lambdas normalised to sum to one).
      converged: whether the stopping criteria were met before ``max_iterations``.
      iterations: outer (plan / atom) iterations done.
      marginal_error: largest L1 error of the plans' marginals.
      restart: which initialisation gave this result (0 when ``restarts=1``).
      status: ``"ok"``, or ``"failed"`` when the solver produced non-finite values.
      error: what went wrong when ``status`` is not ``"ok"``.
      extra: solver diagnostics (Sinkhorn iterations, epsilon used, ...).
      costs: ``float64 (J,)``, each input GMM's transport cost to the
        barycenter, ``<P_j, C_j>`` under the squared Bures cost between
        components (the convention of :func:`raybary.mw2`; an upper bound of
        the exact MW2^2 of the pair, close to it at small epsilon), in input
        order; NaN for a GMM of lambda 0 (it takes no part). ``None`` where
        the solver gave none (a failed problem).
      plans: one ``float64 (n, K_j)`` plan per input GMM, in input order
        (``None`` for a GMM of lambda 0): ``plans[j][i, k]`` is the mass
        moved between barycenter component ``i`` and component ``k`` of GMM
        ``j``; rows sum to ``weights``, columns to the GMM's weights
        (normalised), and ``(plans[j] * C_j).sum() == costs[j]``.
    """

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    objective: float
    converged: bool
    iterations: int
    marginal_error: float
    restart: int = 0
    status: str = "ok"
    error: str | None = None
    extra: dict = field(default_factory=dict)
    costs: np.ndarray | None = None
    plans: list[np.ndarray | None] | None = None

    def gmm(self) -> GMM:
        return GMM(self.weights, self.means, self.covs)


@dataclass(eq=False)
class BatchOutcome:
    """What became of each problem of a batch (a shard of a run, a Ray Data
    batch), in the batch's order; :func:`raybary.batch.outcome.solve_outcome`
    fills it, the results writer and Ray Data's rows read it.

    Attributes:
      problem_ids: ``int64 (n,)``, the problems' ids.
      statuses: :data:`STATUSES`, one per problem.
      errors: the message of each ``invalid`` or ``failed`` problem (``None``
        for ``ok`` ones).
      results: the :class:`Result` of each problem the solver ran on (a
        ``failed`` one may have one), ``None`` for the others.
      seconds: each solved problem's share of the batch's solver time, NaN
        where none.
    """

    problem_ids: np.ndarray
    statuses: list[str]
    errors: list[str | None]
    results: list[Result | None]
    seconds: np.ndarray

    def __post_init__(self) -> None:
        self.problem_ids = np.asarray(self.problem_ids, dtype=np.int64).reshape(-1)
        self.statuses, self.errors = list(self.statuses), list(self.errors)
        self.results = list(self.results)
        n = len(self.problem_ids)
        self.seconds = np.broadcast_to(np.asarray(self.seconds, dtype=np.float64), (n,)).copy()
        for name in ("statuses", "errors", "results"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for "
                                 f"{n} problem ids")
        bad = sorted({s for s in self.statuses if s not in STATUSES})
        if bad:
            raise ValueError(f"unknown statuses {bad}; expected one of {STATUSES}")
        for i, (s, r) in enumerate(zip(self.statuses, self.results)):
            if s == "ok" and r is None:
                raise ValueError(f"problem {self.problem_ids[i]} has status 'ok' but no result")
            self.errors[i] = None if s == "ok" else (self.errors[i] or f"{s} (no message given)")

    def __len__(self) -> int:
        return len(self.problem_ids)

    def counts(self) -> dict[str, int]:
        """Problems by status."""
        return {s: self.statuses.count(s) for s in STATUSES}
