r"""Learning the barycenter's component weights: mirror descent with a kept-step rule.

With the atoms and plans fixed, the objective as a function of the weights
``a`` is :math:`\sum_j \lambda_j \mathrm{OT}_\varepsilon(a, \nu_j)`, whose
gradient in ``a`` is :math:`\sum_j \lambda_j f_j` (the plans' dual potentials
on the atoms; Cuturi & Doucet 2014, Algorithm 1). One step is exponentiated
(mirror) gradient descent,

.. math::
   \log a \leftarrow \log a - t \, \frac{g - \langle a, g\rangle}{\max g - \min g}
   + \mathrm{const}, \qquad g = \textstyle\sum_j \lambda_j f_j,

with the gradient centred and scaled by its spread, so ``t`` is scale-free.
A trial is *kept* when the objective it leads to did not go up (beyond the
tolerance), and ``t`` grows by 1.5; otherwise it is undone and ``t`` halves.
Learning stops when ``t`` falls below the tolerance.

In the spirit of optax: a small state (:class:`WeightState`), an init and an
update, all pure, jittable and vmappable. The outer loop
(:mod:`raybary.solvers.barycenter`) decides when learning starts (once the
fixed-weight iteration has converged) and moves the atoms after each kept
step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from raybary.solvers.plans import masked_logsumexp

__all__ = ["WeightState", "WeightStep", "weights_init", "weights_keep", "weights_update",
           "normalise_log", "weight_gradient"]


class WeightState(NamedTuple):
    """State of the weight learning of one problem.

    ``learning`` (bool): the weights move (else they are fixed at their
    start); ``best_log_a (n,)``: the last kept log-weights; ``direction (n,)``:
    the scaled gradient at ``best_log_a``; ``step``: the log-step ``t``.
    """

    learning: jnp.ndarray
    best_log_a: jnp.ndarray
    direction: jnp.ndarray
    step: jnp.ndarray


class WeightStep(NamedTuple):
    """What :func:`weights_update` decides: the new state, the log-weights to
    try next, whether the problem is finished and whether its loop stops."""

    state: WeightState
    log_a: jnp.ndarray
    finished: jnp.ndarray
    stop: jnp.ndarray


def normalise_log(log_a: jnp.ndarray, atom_mask: jnp.ndarray) -> jnp.ndarray:
    """``log a - log sum a`` over the real atoms (0 on padded ones); floored at -30."""
    out = log_a - masked_logsumexp(log_a, atom_mask, axis=0)
    return jnp.where(atom_mask, jnp.maximum(out, -30.0), 0.0)


def weight_gradient(f: jnp.ndarray, lambdas: jnp.ndarray, atom_mask: jnp.ndarray,
                    log_a: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    r"""Centred :math:`g = \sum_j \lambda_j f_j` (``f (J, n)``) and its spread
    :math:`\max g - \min g` over the real atoms."""
    grad = jnp.einsum("j,ji->i", lambdas, f)
    a = jnp.where(atom_mask, jnp.exp(log_a), 0.0)
    grad = jnp.where(atom_mask, grad - jnp.sum(a * grad), 0.0)
    big = jnp.max(jnp.where(atom_mask, grad, -jnp.inf))
    small = jnp.min(jnp.where(atom_mask, grad, jnp.inf))
    return grad, jnp.maximum(big - small, 0.0)


def weights_init(log_a: jnp.ndarray, step: float) -> WeightState:
    """Fixed weights ``log_a`` (not learning yet), first step ``step``."""
    return WeightState(
        learning=jnp.asarray(False),
        best_log_a=log_a,
        direction=jnp.zeros_like(log_a),
        step=jnp.asarray(step, log_a.dtype),
    )


def weights_keep(w: WeightState, objective: jnp.ndarray, reference: jnp.ndarray,
                 slack: jnp.ndarray, solved: jnp.ndarray) -> jnp.ndarray:
    """Whether the current weights are kept: always while they are fixed; while
    learning, when the objective did not go up by more than ``slack`` and the
    plans it was measured on are solved."""
    return ~w.learning | ((objective <= reference + slack) & solved)


def weights_update(
    w: WeightState,
    log_a: jnp.ndarray,
    f: jnp.ndarray,
    lambdas: jnp.ndarray,
    atom_mask: jnp.ndarray,
    *,
    keep: jnp.ndarray,
    converged: jnp.ndarray,
    last: jnp.ndarray,
    learn: bool,
    first_step: float,
    tol: float,
) -> WeightStep:
    """One decision of the weight learning after an outer iteration.

    Args:
      w: the state; ``log_a`` the log-weights the plans were solved for;
        ``f (J, n)`` their potentials on the atoms; ``lambdas (J,)``;
        ``atom_mask (n,)``.
      keep: :func:`weights_keep` of this iteration.
      converged: the objective stopped moving at kept weights.
      last: this was the last outer iteration allowed.
      learn: (static) learn the weights at all; without it the state never
        changes and ``converged`` finishes the problem.
      first_step, tol: the first log-step, and the step below which learning
        has stalled (finished).
    """
    tiny = jnp.finfo(log_a.dtype).tiny
    switch = converged & learn & ~w.learning
    if learn:  # static: no gradient in the fixed-weight program
        grad, spread = weight_gradient(f, lambdas, atom_mask, log_a)
    else:
        grad, spread = w.direction, jnp.ones((), log_a.dtype)
    step = jnp.where(
        switch, first_step,
        jnp.where(w.learning, jnp.where(keep, w.step * 1.5, w.step * 0.5), w.step),
    )
    stalled = w.learning & (step < tol)
    finished = (converged & ~switch) | stalled
    stop = finished | last
    best_log_a = jnp.where(keep, log_a, w.best_log_a)
    direction = jnp.where(keep, grad / jnp.maximum(spread, tiny), w.direction)
    trial = normalise_log(best_log_a - step * direction, atom_mask)
    next_log_a = jnp.where(switch | (w.learning & ~stop), trial, best_log_a)
    state = WeightState(learning=w.learning | switch, best_log_a=best_log_a,
                        direction=direction, step=step)
    return WeightStep(state=state, log_a=next_log_a, finished=finished, stop=stop)
