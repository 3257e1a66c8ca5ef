"""Lazy imports of the optional libraries, with a message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_PACKAGES = {"sklearn": "scikit-learn", "pot": "POT", "ott": "OTT-JAX"}


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise :class:`ImportError`: "``what`` needs <package>:
    pip install 'raybary[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {_PACKAGES[extra]}: pip install 'raybary[{extra}]'") from e
