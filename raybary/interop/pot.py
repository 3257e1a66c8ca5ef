r"""POT (Python Optimal Transport): the arrays of ``ot.gmm`` <-> :class:`~raybary.GMM`.

POT's GMM functions take a mixture as three arrays, in this order:
means ``m`` ``(K, d)``, covariances ``C`` ``(K, d, d)`` and weights ``w`` ``(K,)``,
e.g. ``ot.gmm.gmm_pdf(x, m, C, w)`` and
``ot.gmm.gmm_ot_loss(m_s, m_t, C_s, C_t, w_s, w_t)`` (the mixture-Wasserstein
distance :math:`MW_2^2` of Delon & Desolneux, the cost raybary's barycenters
minimise). :func:`to_pot` gives these arrays (NumPy, which POT takes as they
are) and :func:`from_pot` takes them back, from NumPy or from any other POT
backend (PyTorch, JAX, ...; POT is imported only for those, extra
``raybary[pot]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raybary.interop._lazy import require
from raybary.types import GMM

__all__ = ["to_pot", "from_pot"]


def to_pot(gmm: GMM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(means (K, d), covs (K, d, d), weights (K,))``: POT's argument order, float64 copies."""
    return gmm.means.copy(), gmm.covs.copy(), gmm.weights.copy()


def from_pot(means: Any, covs: Any, weights: Any) -> GMM:
    """The :class:`~raybary.GMM` of POT's ``(m (K, d), C (K, d, d), w (K,))`` arrays.

    NumPy arrays (and lists) are used as they are; arrays of POT's other
    backends are converted with that backend's ``to_numpy``.
    """
    return GMM(_numpy(weights), _numpy(means), _numpy(covs))


def _numpy(x: Any) -> np.ndarray:
    """``x`` as a float64 NumPy array (via POT's backend when ``x`` is not NumPy)."""
    if not isinstance(x, (np.ndarray, list, tuple, float, int)):
        backend = require("ot.backend", "pot", "GMM.from_pot with non-NumPy arrays")
        x = backend.get_backend(x).to_numpy(x)
    return np.asarray(x, dtype=np.float64)
