r"""scikit-learn: ``sklearn.mixture.GaussianMixture`` / ``BayesianGaussianMixture`` <-> :class:`~raybary.GMM`.

scikit-learn stores a mixture's covariances in one of four shapes, by
``covariance_type``; :func:`expand_covariances` turns each into the full
``(K, d, d)`` stack of a :class:`~raybary.GMM`:

==============  =============  ==============================================
type            stored shape   component ``k``'s covariance :math:`C_k`
==============  =============  ==============================================
``"full"``      ``(K, d, d)``  ``covariances_[k]``
``"tied"``      ``(d, d)``     ``covariances_`` (one matrix shared by all)
``"diag"``      ``(K, d)``     :math:`\operatorname{diag}(\text{covariances\_}[k])`
``"spherical"`` ``(K,)``       :math:`\text{covariances\_}[k]\, I_d`
==============  =============  ==============================================

:func:`to_sklearn` goes back with ``covariance_type="full"`` and sets the
fitted attributes as ``GaussianMixture.fit`` does, so ``score_samples``,
``predict_proba``, ``predict`` and ``sample`` work without fitting.

scikit-learn is imported only inside the functions (extra ``raybary[sklearn]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raybary.interop._lazy import require
from raybary.types import GMM

__all__ = ["from_sklearn", "to_sklearn", "expand_covariances", "precisions_cholesky"]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def expand_covariances(covariances: Any, covariance_type: str, n_components: int,
                       dim: int) -> np.ndarray:
    r"""scikit-learn's ``covariances_`` of type ``covariance_type`` as a ``(K, d, d)`` stack.

    ``full``: :math:`C_k` as stored; ``tied``: :math:`C_k = C` for every k;
    ``diag``: :math:`C_k = \operatorname{diag}(v_k)`; ``spherical``:
    :math:`C_k = s_k I_d` (see the module's table).
    """
    c = np.asarray(covariances, dtype=np.float64)
    k, d = int(n_components), int(dim)
    expected = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
    if covariance_type not in expected:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, "
                         f"got {covariance_type!r}")
    if c.shape != expected[covariance_type]:
        raise ValueError(f"covariances of type {covariance_type!r} must have shape "
                         f"{expected[covariance_type]}, got {c.shape}")
    if covariance_type == "full":
        return c.copy()
    if covariance_type == "tied":
        return np.broadcast_to(c, (k, d, d)).copy()
    if covariance_type == "diag":
        return c[:, :, None] * np.eye(d)
    return c[:, None, None] * np.eye(d)


def precisions_cholesky(covs: np.ndarray) -> np.ndarray:
    r"""scikit-learn's ``precisions_cholesky_`` of ``"full"`` covariances ``(K, d, d)``.

    With the Cholesky factor :math:`C_k = L_k L_k^T`, it is the upper-triangular
    :math:`U_k = L_k^{-T}`, so that :math:`U_k U_k^T = C_k^{-1}` (as
    ``sklearn.mixture._gaussian_mixture._compute_precision_cholesky``).
    Raises :class:`ValueError` naming the first component whose covariance
    is not positive definite.
    """
    covs = np.asarray(covs, dtype=np.float64)
    try:
        chol = np.linalg.cholesky(covs)
    except np.linalg.LinAlgError:
        for k, c in enumerate(covs):
            try:
                np.linalg.cholesky(c)
            except np.linalg.LinAlgError:
                raise ValueError(f"component {k}'s covariance is not positive definite: "
                                 "scikit-learn cannot use it") from None
        raise
    eye = np.broadcast_to(np.eye(covs.shape[-1]), covs.shape)
    return np.swapaxes(np.linalg.solve(chol, eye), -1, -2)


def from_sklearn(gm: Any) -> GMM:
    """The :class:`~raybary.GMM` of a fitted ``GaussianMixture`` or ``BayesianGaussianMixture``.

    Weights ``weights_`` and means ``means_`` are taken as they are; the
    covariances ``covariances_`` of any ``covariance_type`` are expanded to
    ``(K, d, d)`` by :func:`expand_covariances`. Raises ``TypeError`` for
    another estimator and scikit-learn's ``NotFittedError`` (a ``ValueError``)
    for an unfitted one.
    """
    mixture = require("sklearn.mixture", "sklearn", "GMM.from_sklearn")
    validation = require("sklearn.utils.validation", "sklearn", "GMM.from_sklearn")
    if not isinstance(gm, (mixture.GaussianMixture, mixture.BayesianGaussianMixture)):
        raise TypeError("GMM.from_sklearn takes a sklearn.mixture.GaussianMixture or "
                        f"BayesianGaussianMixture, got {type(gm).__name__}")
    validation.check_is_fitted(gm)
    means = np.asarray(gm.means_, dtype=np.float64)
    k, d = means.shape
    covs = expand_covariances(gm.covariances_, gm.covariance_type, k, d)
    return GMM(np.asarray(gm.weights_, dtype=np.float64), means, covs)


def to_sklearn(gmm: GMM, **params: Any):
    """A ``GaussianMixture(covariance_type="full")`` holding ``gmm``, ready to use unfitted.

    The fitted attributes are set as ``fit`` sets them: ``weights_``,
    ``means_``, ``covariances_``, ``precisions_cholesky_`` (see
    :func:`precisions_cholesky`), ``precisions_`` :math:`= U_k U_k^T`,
    ``converged_ = True``, ``n_iter_ = 0``, ``lower_bound_ = -inf``,
    ``n_features_in_ = d``. ``params`` go to the constructor (for instance
    ``random_state`` for ``sample``); ``n_components`` and ``covariance_type``
    are set from ``gmm``.
    """
    mixture = require("sklearn.mixture", "sklearn", "GMM.to_sklearn")
    for name in ("n_components", "covariance_type"):
        if name in params:
            raise TypeError(f"to_sklearn sets {name} itself (from the GMM); do not pass it")
    weights = np.array(gmm.weights, dtype=np.float64)
    means = np.array(gmm.means, dtype=np.float64)
    covs = np.array(gmm.covs, dtype=np.float64)
    prec_chol = precisions_cholesky(covs)
    gm = mixture.GaussianMixture(n_components=len(weights), covariance_type="full", **params)
    gm.weights_, gm.means_, gm.covariances_ = weights, means, covs
    gm.precisions_cholesky_ = prec_chol
    gm.precisions_ = prec_chol @ np.swapaxes(prec_chol, -1, -2)
    gm.converged_, gm.n_iter_ = True, 0
    gm.lower_bound_, gm.lower_bounds_ = -np.inf, []
    gm.n_features_in_ = means.shape[1]
    return gm
