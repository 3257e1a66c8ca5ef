"""raybary.solvers.weights: the weight-learning rule, step by step."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from raybary.solvers.weights import (
    normalise_log,
    weight_gradient,
    weights_init,
    weights_keep,
    weights_update,
)

MASK = jnp.array([True, True, True, False])
LOG_A = normalise_log(jnp.zeros(4), MASK)
F = jnp.array([[1.0, 2.0, 4.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
LAM = jnp.array([0.5, 0.5])


def update(w, log_a, *, keep, converged=False, last=False, learn=True):
    return weights_update(w, log_a, F, LAM, MASK, keep=jnp.asarray(keep),
                          converged=jnp.asarray(converged), last=jnp.asarray(last),
                          learn=learn, first_step=0.5, tol=1e-3)


def test_normalise_and_gradient():
    np.testing.assert_allclose(np.exp(np.asarray(LOG_A))[:3].sum(), 1.0, rtol=1e-6)
    assert float(LOG_A[3]) == 0.0
    grad, spread = weight_gradient(F, LAM, MASK, LOG_A)
    a = np.exp(np.asarray(LOG_A))[:3]
    np.testing.assert_allclose(a @ np.asarray(grad)[:3], 0.0, atol=1e-6)  # centred
    np.testing.assert_allclose(float(spread), 2.0, rtol=1e-6)  # 0.5*(4+1) - 0.5*(1+0)


def test_fixed_weights_never_move():
    w = weights_init(LOG_A, 0.5)
    out = update(w, LOG_A, keep=True, converged=True, learn=False)
    assert bool(out.finished) and bool(out.stop) and not bool(out.state.learning)
    np.testing.assert_array_equal(np.asarray(out.log_a), np.asarray(LOG_A))


def test_learning_starts_on_convergence_then_keeps_or_undoes_steps():
    w = weights_init(LOG_A, 0.5)
    start = update(w, LOG_A, keep=True, converged=True)
    assert bool(start.state.learning) and not bool(start.finished)
    trial = np.exp(np.asarray(start.log_a))[:3]
    np.testing.assert_allclose(trial.sum(), 1.0, rtol=1e-6)
    assert trial[2] < trial[0]  # the atom with the largest potential loses weight
    # A kept trial: the step grows by 1.5 and the best weights become the trial.
    kept = update(start.state, start.log_a, keep=True)
    assert float(kept.state.step) == 0.75
    np.testing.assert_array_equal(np.asarray(kept.state.best_log_a), np.asarray(start.log_a))
    # A rejected one: the step halves; the next trial starts from the best weights.
    assert not bool(weights_keep(start.state, jnp.asarray(2.0), jnp.asarray(1.0),
                                 jnp.asarray(0.1), jnp.asarray(True)))
    undone = update(start.state, start.log_a, keep=False)
    assert float(undone.state.step) == 0.25
    np.testing.assert_array_equal(np.asarray(undone.state.best_log_a), np.asarray(LOG_A))
    # Steps below the tolerance: learning has stalled and the problem is finished.
    w = start.state._replace(step=jnp.asarray(1e-3))
    stalled = update(w, start.log_a, keep=False)
    assert bool(stalled.finished) and bool(stalled.stop)
    np.testing.assert_array_equal(np.asarray(stalled.log_a), np.asarray(LOG_A))
