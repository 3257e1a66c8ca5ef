"""raybary: batched Wasserstein barycenters of Gaussian mixture models.

The names below are the stable public API. Those backed by JAX are imported
lazily, so ``import raybary.storage`` (or the CLI's help) does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from raybary.errors import RaybaryError
from raybary.types import GMM, Problem, Result

__version__ = "0.1.0"

_LAZY = {
    "solve": "raybary.batch.api",
    "Engine": "raybary.batch.engine",
    "SolverOptions": "raybary.options",
    "SolverConfig": "raybary.solvers.config",
    "log_density": "raybary.density",
    "log_density_grid": "raybary.density",
    "read_results": "raybary.storage.results",
    "mw2": "raybary.batch.distances",
    "mw2_batch": "raybary.batch.distances",
    "read_distances": "raybary.storage.results.distances",
    "map_samples": "raybary.batch.maps",
}

__all__ = ["GMM", "Problem", "Result", "RaybaryError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from raybary.batch.api import solve
    from raybary.batch.distances import mw2, mw2_batch
    from raybary.batch.engine import Engine
    from raybary.batch.maps import map_samples
    from raybary.density import log_density, log_density_grid
    from raybary.options import SolverOptions
    from raybary.solvers.config import SolverConfig
    from raybary.storage.results import read_results
    from raybary.storage.results.distances import read_distances


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raybary' has no attribute {name!r}")
