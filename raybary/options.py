"""What a solve computes: :class:`SolverOptions`, checked once, used everywhere.

The CLI, :func:`raybary.solve`, ``raybary run`` (recorded with the results and
compared on a re-run) and :class:`raybary.interop.BarycenterSolver` all build
one :class:`SolverOptions`; :meth:`SolverOptions.config` turns it into the
solver's jit-static :class:`~raybary.solvers.config.SolverConfig`. Each
default is written here once. Stdlib only (no NumPy, no JAX), so the CLI can
check options before anything heavy is imported. Bad options raise
:class:`~raybary.errors.OptionsError` (a ``ValueError``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from raybary.errors import OptionsError
from raybary.solvers.config import SolverConfig

__all__ = ["SolverOptions", "DEFAULT_RELATIVE_EPSILON", "DTYPES"]

#: The regularisation when neither ``epsilon`` nor ``relative_epsilon`` is
#: given: scale-free, and small enough that the barycenter's exact objective
#: matches POT's exact fixed point to a few 1e-5 (docs/solver.md).
DEFAULT_RELATIVE_EPSILON = 3e-4
DTYPES = ("float32", "float64")


def _positive_finite(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                  and value > 0):
        raise OptionsError(f"{name} must be a positive finite number, got {value}")


@dataclass(frozen=True)
class SolverOptions:
    """What the solver computes for each problem (the arguments of
    :func:`raybary.solve`).

    Attributes:
      bar_size: barycenter components ``n`` (an int; :func:`raybary.solve`
        also takes one per problem).
      epsilon: absolute entropic regularisation, in squared units of the data.
      relative_epsilon: regularisation relative to the mean initial cost
        (scale-free). Give at most one of the two; with neither,
        :data:`DEFAULT_RELATIVE_EPSILON` (:meth:`resolved` fills it in).
      restarts: initialisations per problem; the lowest objective wins.
      learn_weights: also optimise the barycenter's component weights.
      dtype: ``"float32"`` or ``"float64"``.
      seed: seed of the initialisations' draws.
      max_iterations, tol: outer iterations and relative objective tolerance
        (``None``: :meth:`SolverConfig.for_dtype`'s).

    ``raybary run`` records these with its results (unset ones left out), so
    a re-run with other options is refused.
    """

    bar_size: int = 6
    epsilon: float | None = None
    relative_epsilon: float | None = None
    restarts: int = 1
    learn_weights: bool = False
    dtype: str = "float32"
    seed: int = 0
    max_iterations: int | None = None
    tol: float | None = None

    def __post_init__(self) -> None:
        sizes = self.bar_size if isinstance(self.bar_size, tuple) else (self.bar_size,)
        if not sizes or min(sizes) < 1:
            raise OptionsError(f"bar_size must be at least 1, got {min(sizes, default=None)}")
        if self.epsilon is not None and self.relative_epsilon is not None:
            raise OptionsError("give epsilon (--epsilon, absolute) or relative_epsilon "
                               "(--relative-epsilon), not both")
        _positive_finite("epsilon", self.epsilon)
        _positive_finite("relative_epsilon", self.relative_epsilon)
        _positive_finite("tol", self.tol)
        if self.restarts < 1:
            raise OptionsError(f"restarts must be at least 1, got {self.restarts}")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise OptionsError(f"max_iterations must be at least 1, got {self.max_iterations}")
        if self.dtype not in DTYPES:
            raise OptionsError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @classmethod
    def build(cls, **kwargs) -> SolverOptions:
        """Options from loosely typed values (sequences of sizes, NumPy scalars,
        dtype objects): normalised, then checked."""
        size = kwargs.get("bar_size", cls.bar_size)
        kwargs["bar_size"] = (tuple(int(s) for s in size) if isinstance(size, (list, tuple))
                              or hasattr(size, "__len__") else int(size))
        if "dtype" in kwargs:
            kwargs["dtype"] = _dtype_name(kwargs["dtype"])
        for name in ("epsilon", "relative_epsilon", "tol"):
            if kwargs.get(name) is not None:
                kwargs[name] = float(kwargs[name])
        for name in ("restarts", "seed", "max_iterations"):
            if kwargs.get(name) is not None:
                kwargs[name] = int(kwargs[name])
        return cls(**kwargs)

    @property
    def is_relative(self) -> bool:
        """Whether the regularisation is relative (the default) or absolute."""
        return self.epsilon is None

    @property
    def epsilon_value(self) -> float:
        """The regularisation's value, relative or absolute (:attr:`is_relative`)."""
        if self.epsilon is not None:
            return self.epsilon
        return DEFAULT_RELATIVE_EPSILON if self.relative_epsilon is None else self.relative_epsilon

    def resolved(self) -> SolverOptions:
        """These options with the default regularisation filled in, so the value
        used is recorded (and a re-run after a change of default is refused)."""
        if self.epsilon is None and self.relative_epsilon is None:
            return replace(self, relative_epsilon=float(DEFAULT_RELATIVE_EPSILON))
        return self

    def config(self, base: SolverConfig | None = None) -> SolverConfig:
        """The jit-static config of these options: ``base`` (default:
        :meth:`SolverConfig.for_dtype`) with ``learn_weights``,
        ``max_iterations`` and ``tol`` replaced where these options set them."""
        config = SolverConfig.for_dtype(self.dtype) if base is None else base
        changes: dict = {}
        if self.learn_weights:
            changes["learn_weights"] = True
        if self.max_iterations is not None:
            changes["max_iterations"] = self.max_iterations
        if self.tol is not None:
            changes["tol"] = self.tol
        return replace(config, **changes) if changes else config

    def recorded(self) -> dict:
        """The options as recorded with results (``None`` ones left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _dtype_name(dtype) -> str:
    """``"float32"`` for ``np.float32``, ``np.dtype("float32")`` or the string."""
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    return {"f4": "float32", "f8": "float64", "single": "float32",
            "double": "float64"}.get(name, name)
