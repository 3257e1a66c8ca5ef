"""The solver's static options: :class:`SolverConfig` (the barycenter loop) and
:class:`PlanOptions` (the plan solver it derives).

Both are frozen and hashable because they are part of a compiled program
(``jax.jit`` static arguments): one compile per distinct value. Stdlib only,
so :mod:`raybary.options` can build a config without importing JAX.

What a solve computes (the regularisation and its kind, the barycenter's
size, the precision) is decided by :class:`raybary.options.SolverOptions`;
this module says how: tolerances, iteration caps and the plan solver's
schedule.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

__all__ = ["SolverConfig", "PlanOptions", "RENAMED_KEYWORDS"]

#: Keywords of :class:`SolverConfig` renamed when the plan solver stopped being
#: Sinkhorn only; the old names still work, with a ``DeprecationWarning``.
RENAMED_KEYWORDS = {"sinkhorn_tol": "plan_tol", "sinkhorn_max_iterations": "plan_max_iterations"}


@dataclass(frozen=True)
class PlanOptions:
    """Static options of the plan solver (:mod:`raybary.solvers.plans`).

    Attributes:
      method: ``"newton"`` (default, :func:`~raybary.solvers.plans.newton_step`)
        or ``"sinkhorn"`` (:func:`~raybary.solvers.plans.sinkhorn_step`).
      tol: L1 marginal error at which the solver stops (at the target epsilon).
      max_iterations: iterations at most per solve.
      decay: factor of the epsilon-scaling schedule.
      level_tol: marginal error at which epsilon-scaling goes down a level.
      relaxation: over-relaxation of the Sinkhorn updates (1 is plain Sinkhorn).
      damping: smallest Levenberg–Marquardt damping of the Newton steps.
      armijo: sufficient-increase fraction of the Newton step test.
    """

    method: str = "newton"
    tol: float = 1e-5
    max_iterations: int = 300
    decay: float = 0.3
    level_tol: float = 1e-3
    relaxation: float = 1.5
    damping: float = 1e-6
    armijo: float = 0.1


def _renamed(cls):
    """Let ``cls(...)`` take the keywords of :data:`RENAMED_KEYWORDS` (with a
    ``DeprecationWarning``) and ``relative_epsilon`` (ignored, with one): code
    written against the old names keeps working."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for old, new in RENAMED_KEYWORDS.items():
            if old in kwargs:
                warnings.warn(f"SolverConfig({old}=...) is deprecated; use {new}=...",
                              DeprecationWarning, stacklevel=2)
                if new in kwargs:
                    raise TypeError(f"SolverConfig got both {old} and {new}")
                kwargs[new] = kwargs.pop(old)
        if "relative_epsilon" in kwargs:
            kwargs.pop("relative_epsilon")
            warnings.warn("SolverConfig(relative_epsilon=...) is ignored: whether epsilon is "
                          "relative is said by raybary.solve's epsilon / relative_epsilon "
                          "arguments (raybary.SolverOptions)", DeprecationWarning, stacklevel=2)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_renamed
@dataclass(frozen=True)
class SolverConfig:
    """Static options of the barycenter solver.

    Attributes:
      max_iterations: outer (plans / atoms) iterations at most.
      tol: converged when the change of the objective between two outer
        iterations is at most ``tol * objective + e * scale``, where ``e`` is
        the plans' L1 marginal error (the second term is the noise floor of
        such plans; ``scale`` is the mean initial cost), and ``e`` is at most
        ``max(10 * plan_tol, 1e-3)``.
      plan_solver: ``"newton"`` (damped Newton on the semi-dual,
        :func:`raybary.solvers.plans.newton_step`; default) or ``"sinkhorn"``
        (over-relaxed Sinkhorn). Both solve the same entropic problem.
      plan_tol: L1 marginal error at which the plan solver stops
        (formerly ``sinkhorn_tol``).
      plan_max_iterations: plan-solver iterations at most per outer iteration
        (formerly ``sinkhorn_max_iterations``).
      epsilon_decay: factor of the epsilon-scaling schedule (``None``: 0.2
        for Newton, 0.6 for Sinkhorn).
      warm_epsilon_factor: from the second outer iteration on, the plan
        solver's epsilon-scaling restarts (warm) at this factor times the
        largest change of a cost entry since the previous plans, clipped to
        ``[epsilon, scale]`` (``None``: 0.05 for Newton, whose line search
        moves the potentials by as much as the cost changed in a few steps,
        so its warm solves mostly start at epsilon itself; 2.0 for Sinkhorn,
        which moves them by about epsilon per iteration).
      fixed_point_steps: covariance fixed-point steps per atom update.
      learn_weights: also optimise the barycenter's component weights.
      weight_step: first log-step of the weight updates, relative to the
        spread of the gradient (adapted: x1.5 on success, /2 on failure).
      level_tol: marginal error at which epsilon-scaling goes down a level
        (``None``: 0.1 for Newton, which recovers from a coarse level in a
        few steps, 1e-3 for Sinkhorn, which loses small plan entries if it
        goes down too early).
      relaxation: over-relaxation factor of the Sinkhorn updates (1 is plain
        Sinkhorn; Thibault et al. 2017).
      newton_damping, newton_armijo: smallest Levenberg–Marquardt damping and
        sufficient-increase fraction of the Newton plan solver.
      plan_block: plan-solver iterations between two looks at whether a
        problem's plans are solved. The barycenter update runs under a mask
        once per block, so its cost is shared by this many iterations, and a
        problem waits at most this many iterations for it.

    :meth:`for_dtype` gives the defaults of a precision.
    """

    max_iterations: int = 100
    tol: float = 1e-6
    plan_solver: str = "newton"
    plan_tol: float = 1e-5
    plan_max_iterations: int = 300
    epsilon_decay: float | None = None
    warm_epsilon_factor: float | None = None
    fixed_point_steps: int = 1
    learn_weights: bool = False
    weight_step: float = 0.5
    level_tol: float | None = None
    relaxation: float = 1.5
    newton_damping: float = 1e-6
    newton_armijo: float = 0.1
    plan_block: int = 2

    @classmethod
    def for_dtype(cls, dtype: str) -> SolverConfig:
        """The defaults for ``dtype``: float64 resolves tighter tolerances
        (``tol=1e-9``, ``plan_tol=1e-8``, up to 1,000 plan iterations), which
        float32's rounding could not reach."""
        if dtype == "float64":
            return cls(tol=1e-9, plan_tol=1e-8, plan_max_iterations=1000)
        return cls()

    @property
    def sinkhorn_tol(self) -> float:
        """Deprecated name of :attr:`plan_tol`."""
        warnings.warn("SolverConfig.sinkhorn_tol is deprecated; use plan_tol",
                      DeprecationWarning, stacklevel=2)
        return self.plan_tol

    @property
    def sinkhorn_max_iterations(self) -> int:
        """Deprecated name of :attr:`plan_max_iterations`."""
        warnings.warn("SolverConfig.sinkhorn_max_iterations is deprecated; use "
                      "plan_max_iterations", DeprecationWarning, stacklevel=2)
        return self.plan_max_iterations

    def warm_factor(self) -> float:
        """``warm_epsilon_factor``, its default resolved for the plan solver."""
        if self.warm_epsilon_factor is not None:
            return self.warm_epsilon_factor
        return 0.05 if self.plan_solver == "newton" else 2.0

    def plan_options(self) -> PlanOptions:
        """The options of the plan solver (:class:`PlanOptions`)."""
        newton = self.plan_solver == "newton"
        decay = self.epsilon_decay
        if decay is None:
            decay = 0.2 if newton else 0.6
        level_tol = self.level_tol
        if level_tol is None:
            level_tol = 0.1 if newton else 1e-3
        return PlanOptions(
            method=self.plan_solver,
            tol=self.plan_tol,
            max_iterations=self.plan_max_iterations,
            decay=decay,
            level_tol=level_tol,
            relaxation=self.relaxation,
            damping=self.newton_damping,
            armijo=self.newton_armijo,
        )
