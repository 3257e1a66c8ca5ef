"""Conversions between :class:`raybary.GMM` and other libraries' Gaussian mixtures.

One module per library; each converts both ways and imports its library only
inside the conversion functions, so ``import raybary.interop`` (and
``import raybary``) needs none of them. A missing library raises
:class:`ImportError` saying which extra installs it.

* :mod:`~raybary.interop.sklearn`: ``sklearn.mixture.GaussianMixture`` and
  ``BayesianGaussianMixture`` (every ``covariance_type`` in; ``"full"`` out)
  -- extra ``raybary[sklearn]``;
* :mod:`~raybary.interop.pot`: the ``(means, covs, weights)`` arrays of POT's
  ``ot.gmm`` functions -- extra ``raybary[pot]`` (only needed for arrays of
  POT's other backends);
* :mod:`~raybary.interop.ott`: OTT-JAX's
  ``ott.tools.gaussian_mixture.gaussian_mixture.GaussianMixture`` -- extra
  ``raybary[ott]``;
* :mod:`~raybary.interop.ray_data`: Ray Data -- :class:`BarycenterSolver` for
  ``ds.map_batches``, :func:`read_problems_dataset` (a problem store as a
  dataset of one row per problem), :func:`problems_to_table` and
  :func:`results_to_gmms` (no extra: Ray is a dependency; see ``docs/ray_data.md``).
  Imported on first use, so the other conversions do not load PyArrow.

The usual entry points are the methods of :class:`raybary.GMM`, which call
these functions: ``GMM.from_sklearn(gm)`` / ``gmm.to_sklearn()``,
``GMM.from_pot(m, C, w)`` / ``gmm.to_pot()``, ``GMM.from_ott(gm)`` /
``gmm.to_ott()``. See ``docs/interop.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from raybary.interop.ott import from_ott, to_ott
from raybary.interop.pot import from_pot, to_pot
from raybary.interop.sklearn import expand_covariances, from_sklearn, to_sklearn

_RAY_DATA = ("BarycenterSolver", "read_problems_dataset", "problems_to_table", "results_to_gmms")

__all__ = [
    "from_sklearn",
    "to_sklearn",
    "expand_covariances",
    "from_pot",
    "to_pot",
    "from_ott",
    "to_ott",
    "BarycenterSolver",
    "read_problems_dataset",
    "problems_to_table",
    "results_to_gmms",
]

if TYPE_CHECKING:  # pragma: no cover
    from raybary.interop.ray_data import (
        BarycenterSolver,
        problems_to_table,
        read_problems_dataset,
        results_to_gmms,
    )


def __getattr__(name: str):
    if name in _RAY_DATA:
        return getattr(importlib.import_module("raybary.interop.ray_data"), name)
    raise AttributeError(f"module 'raybary.interop' has no attribute {name!r}")

