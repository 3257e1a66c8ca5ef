r"""OTT-JAX: ``ott.tools.gaussian_mixture.gaussian_mixture.GaussianMixture`` <-> :class:`~raybary.GMM`.

OTT-JAX keeps a mixture as its means ``loc`` ``(K, d)``, the lower Cholesky
factors :math:`L_k` of the covariances :math:`C_k = L_k L_k^T` (as
``scale_params``) and the logarithms of the weights, normalised by a softmax
(:math:`w_k = e^{a_k} / \sum_j e^{a_j}`). Hence:

* weights that do not sum to one come back normalised;
* a component of weight 0 has no finite logarithm: :func:`to_ott` leaves such
  components out (the mixture is the same, with fewer components);
* arrays are JAX arrays of JAX's default dtype (float32 unless
  ``jax_enable_x64`` is on).

OTT-JAX (and JAX) are imported only inside the functions (extra ``raybary[ott]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raybary.interop._lazy import require
from raybary.types import GMM

__all__ = ["to_ott", "from_ott"]

_MODULE = "ott.tools.gaussian_mixture.gaussian_mixture"


def to_ott(gmm: GMM):
    """OTT-JAX's ``GaussianMixture`` of ``gmm``, via ``GaussianMixture.from_mean_cov_component_weights``.

    Components of weight 0 are left out (see the module's notes); a
    covariance that is not positive definite raises :class:`ValueError`
    (OTT-JAX's Cholesky would give NaN silently).
    """
    module = require(_MODULE, "ott", "GMM.to_ott")
    import jax.numpy as jnp

    keep = gmm.weights > 0
    if not keep.any():
        raise ValueError("GMM.to_ott: every component has weight 0")
    covs = gmm.covs[keep]
    for k, c in zip(np.flatnonzero(keep), covs):
        if not np.all(np.linalg.eigvalsh(0.5 * (c + c.T)) > 0):
            raise ValueError(f"component {k}'s covariance is not positive definite: "
                             "OTT-JAX cannot use it")
    return module.GaussianMixture.from_mean_cov_component_weights(
        mean=jnp.asarray(gmm.means[keep]), cov=jnp.asarray(covs),
        component_weights=jnp.asarray(gmm.weights[keep]))


def from_ott(gm: Any) -> GMM:
    r"""The :class:`~raybary.GMM` of an OTT-JAX ``GaussianMixture``: weights
    ``component_weights``, means ``loc``, covariances ``covariance``
    (:math:`L_k L_k^T`), as float64 NumPy arrays."""
    module = require(_MODULE, "ott", "GMM.from_ott")
    if not isinstance(gm, module.GaussianMixture):
        raise TypeError(f"GMM.from_ott takes an {_MODULE}.GaussianMixture, "
                        f"got {type(gm).__name__}")
    return GMM(np.asarray(gm.component_weights, dtype=np.float64),
               np.asarray(gm.loc, dtype=np.float64),
               np.asarray(gm.covariance, dtype=np.float64))
