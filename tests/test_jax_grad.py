"""raybary.jax: values as raybary.mw2's; jit and vmap; gradients against central
finite differences and against POT's exact gradients (torch backend).

Float64 throughout. Few compiled shapes: pairs (3, 4) in d = 2, (2, 3) in
d = 1 and 3, a vmapped batch of four (4, 4) pairs in d = 2, two barycenter
objectives (n = 3 atoms, J = 3 inputs of K = 4, d = 2; the tutorial's), and
raybary.solve's float64 program for one tutorial problem (the one slow test).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import raybary
from raybary import GMM
from raybary.jax import barycenter_objective, mw2_loss

REL_EPS = 1e-6  # small enough that the entropic blur is far below the checks' tolerances
SHAPES = {1: (2, 3), 2: (3, 4), 3: (2, 3)}  # d -> (Ka, Kb)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def random_side(rng, k: int, d: int, shift: float = 0.0):
    a = rng.normal(size=(k, d, d))
    return (rng.normal(size=(k, d)) * 3.0 + shift, a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d),
            rng.dirichlet(np.ones(k)))


def random_pair(seed: int, d: int):
    rng = np.random.default_rng(seed)
    ka, kb = SHAPES[d]
    return (*random_side(rng, ka, d), *random_side(rng, kb, d, shift=1.0))


@functools.cache
def value_and_grads():
    """The jitted value and gradients in all six arguments (one program per shape)."""
    loss = functools.partial(mw2_loss, relative_epsilon=REL_EPS)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))


def direction(rng, arg: int, shape):
    """A random perturbation: symmetric for covariances, summing to 0 for weights."""
    e = rng.normal(size=shape)
    if arg % 3 == 1:
        e = e + np.swapaxes(e, -1, -2)
    if arg % 3 == 2:
        e = e - e.mean()
    return e


@pytest.mark.parametrize("d", [1, 2, 3])
def test_value_is_mw2_and_gradients_match_finite_differences(d):
    args = random_pair(10 + d, d)
    value, grads = value_and_grads()(*args)
    a, b = GMM(args[2], args[0], args[1]), GMM(args[5], args[3], args[4])
    # same plan problem; mw2_batch's continuous batching checks convergence every
    # few iterations, so its plan may take a few more steps past the tolerance
    assert float(value) == pytest.approx(
        raybary.mw2(a, b, relative_epsilon=REL_EPS, dtype="float64"), rel=1e-7)
    for g in grads[1], grads[4]:  # covariance gradients are symmetric
        np.testing.assert_allclose(g, np.swapaxes(g, -1, -2), atol=1e-12)
    rng = np.random.default_rng(d)
    h = 1e-5
    for arg in range(6):
        e = direction(rng, arg, args[arg].shape)
        plus, minus = list(args), list(args)
        plus[arg], minus[arg] = args[arg] + h * e, args[arg] - h * e
        fd = (float(value_and_grads()(*plus)[0]) - float(value_and_grads()(*minus)[0])) / (2 * h)
        analytic = float(np.sum(np.asarray(grads[arg]) * e))
        # Means and covariances: the plan's support does not move, so FD's
        # truncation (h^2) and rounding (1e-16 / h) are all that is left.
        # Weights: the value is the plan's transport cost while the gradient
        # is the entropic objective's (the potentials): they differ by the
        # blur, a relative O(epsilon) = O(1e-6) here.
        tol = 1e-6 if arg % 3 != 2 else 1e-4
        assert analytic == pytest.approx(fd, rel=tol, abs=tol), (d, arg)


@pytest.mark.parametrize("d", [2, 3])
def test_gradients_match_pots_exact_gradients_through_torch(d):
    torch = pytest.importorskip("torch")
    ot = pytest.importorskip("ot")
    args = random_pair(20 + d, d)
    ma, ca, wa, mb, cb, wb = (torch.tensor(x, requires_grad=True) for x in args)
    loss = ot.gmm.gmm_ot_loss(ma, mb, ca, cb, wa, wb)  # POT's exact LP (emd2)
    loss.backward()
    pot = [t.grad.numpy() for t in (ma, ca, wa, mb, cb, wb)]
    value, grads = value_and_grads()(*args)
    assert float(value) == pytest.approx(float(loss.detach()), rel=1e-8)
    costs = ot.gmm.dist_bures_squared(*(np.asarray(x) for x in (args[0], args[3], args[1], args[4])))
    eps = REL_EPS * float(args[2] @ costs @ args[5])  # the absolute epsilon of the solve
    for arg in range(6):
        want = pot[arg]
        if arg % 3 == 1:  # torch's eigh backward may leave an antisymmetric part; the
            want = 0.5 * (want + np.swapaxes(want, -1, -2))  # cost only sees sym(C)
        if arg % 3 == 2:
            # POT's emd2 returns centred potentials, as raybary.jax does. The entropic
            # potentials are within a few epsilon of the exact ones (measured: 1.3
            # epsilon); the plans agree to exp(-gap / epsilon), i.e. exactly.
            np.testing.assert_allclose(grads[arg], want, atol=10 * eps, rtol=0)
        else:
            np.testing.assert_allclose(grads[arg], want, rtol=1e-7, atol=1e-9)


def padded(args, k: int):
    """The pair with k components a side; padding: weight 0, mean 7, covariance 0."""
    out = []
    for m, c, w in (args[:3], args[3:]):
        n = k - len(w)
        out += [np.concatenate([m, np.full((n, m.shape[1]), 7.0)]),
                np.concatenate([c, np.zeros((n, *c.shape[1:]))]),
                np.concatenate([w, np.zeros(n)])]
    return out


def test_jit_and_vmap_over_padded_pairs():
    pairs = [random_pair(30 + i, 2) for i in range(4)]
    batch = [np.stack(x) for x in zip(*(padded(p, 4) for p in pairs))]
    loss = functools.partial(mw2_loss, relative_epsilon=REL_EPS)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=tuple(range(6)))))(*batch)
    want = raybary.mw2_batch([(GMM(p[2], p[0], p[1]), GMM(p[5], p[3], p[4])) for p in pairs],
                             relative_epsilon=REL_EPS, dtype="float64")
    np.testing.assert_allclose(values, want, rtol=1e-7)  # see the first test's comment
    ka, kb = SHAPES[2]
    for i, p in enumerate(pairs):
        _, single = value_and_grads()(*p)
        for arg, n in zip(range(6), (ka, ka, ka, kb, kb, kb)):
            np.testing.assert_allclose(grads[arg][i][:n], single[arg], rtol=1e-6, atol=1e-8)
            assert np.all(np.asarray(grads[arg][i][n:]) == 0.0)  # padding: no gradient
            assert np.all(np.isfinite(grads[arg][i]))


def test_options_and_shape_errors():
    args = random_pair(40, 2)
    with pytest.raises(ValueError, match="at most one of epsilon and relative_epsilon"):
        mw2_loss(*args, epsilon=0.1, relative_epsilon=1e-3)
    with pytest.raises(ValueError, match="differ in dimension"):
        mw2_loss(*args[:3], *random_pair(41, 3)[3:])
    with pytest.raises(ValueError, match=r"GMM b: means must be \(K, d\)"):
        mw2_loss(*args[:5], args[5][:2])
    with pytest.raises(ValueError, match="barycenter_objective: inputs must be"):
        barycenter_objective(*args[:3], args[3], args[4], args[5], np.ones(1))


def bar_problem():
    """A barycenter (3 atoms) and two d = 2 inputs padded to 4 components, plus a
    third of lambda 0 that is all padding."""
    rng = np.random.default_rng(50)
    bar = random_side(rng, 3, 2)
    inputs = [padded((*random_side(rng, k, 2), *random_side(rng, 1, 2)), 4)[:3] for k in (4, 2)]
    empty = [np.zeros((4, 2)), np.zeros((4, 2, 2)), np.zeros(4)]
    means, covs, weights = (np.stack(x) for x in zip(*inputs, empty))
    return bar, (means, covs, weights, np.array([0.3, 0.7, 0.0]))


def test_barycenter_objective_sums_the_losses_and_has_the_right_gradient():
    bar, inputs = bar_problem()
    fn = jax.jit(jax.value_and_grad(
        functools.partial(barycenter_objective, relative_epsilon=REL_EPS), argnums=tuple(range(7))))
    value, grads = fn(*bar, *inputs)
    means, covs, weights, lambdas = inputs
    terms = raybary.mw2_batch([(GMM(bar[2], bar[0], bar[1]),
                                GMM(weights[j][weights[j] > 0], means[j][weights[j] > 0],
                                    covs[j][weights[j] > 0])) for j in range(2)],
                              relative_epsilon=REL_EPS, dtype="float64")
    assert float(value) == pytest.approx(lambdas[:2] @ terms, rel=1e-7)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[3][2]) == 0) and np.all(np.asarray(grads[5][2]) == 0)
    np.testing.assert_allclose(grads[6][:2], terms, rtol=1e-7)  # d/d lambda_j = MW2^2_j
    rng, h, args = np.random.default_rng(51), 1e-5, [*bar, *inputs]
    for arg in range(3):
        e = direction(rng, arg, bar[arg].shape)
        plus, minus = list(args), list(args)
        plus[arg], minus[arg] = args[arg] + h * e, args[arg] - h * e
        fd = (float(fn(*plus)[0]) - float(fn(*minus)[0])) / (2 * h)
        tol = 1e-6 if arg != 2 else 1e-4
        assert float(np.sum(np.asarray(grads[arg]) * e)) == pytest.approx(fd, rel=tol, abs=tol)


def test_float32_inputs_give_float32_values():
    with jax.enable_x64(False):
        args = [jnp.asarray(x, jnp.float32) for x in random_pair(60, 2)]
        value = jax.jit(mw2_loss)(*args)
        assert value.dtype == jnp.float32
        a = GMM(*(np.asarray(args[i], np.float64) for i in (2, 0, 1)))
        b = GMM(*(np.asarray(args[i], np.float64) for i in (5, 3, 4)))
        assert float(value) == pytest.approx(raybary.mw2(a, b), rel=1e-5)


@pytest.mark.slow  # compiles raybary.solve's float64 program for one tutorial problem
def test_gradient_vanishes_at_a_solved_barycenter():
    """At raybary.solve's barycenter of the tutorial (weights fixed), the
    gradients in the atoms' means and covariances are ~0: a few 1e-3 of their
    size at the initial atoms, the solver's stopping tolerance (its default
    options; a tighter solve, relative_epsilon=1e-5 and tol=1e-10, gave 2e-12
    and 1e-6, but compiles another program). The weights get no such check: the
    objective is piecewise linear in them, and a minimum sits on a kink where
    the potentials are one subgradient, not zero (measured on this problem
    with learn_weights=True: one-sided derivatives 0.7 and 7.1)."""
    problem, init = ref.tutorial_problem()
    [result] = raybary.solve(problem, bar_size=6, init=[init], dtype="float64")
    k = max(g.n_components for g in problem.gmms)
    means, covs, weights = (np.stack(x) for x in zip(*(
        padded((g.means, g.covs, g.weights, g.means, g.covs, g.weights), k)[:3]
        for g in problem.gmms)))
    fn = jax.jit(jax.grad(functools.partial(barycenter_objective, relative_epsilon=REL_EPS),
                          argnums=(0, 1)))
    at_init = fn(init[0], init[1], np.full(6, 1 / 6), means, covs, weights, problem.lambdas)
    at_bar = fn(result.means, result.covs, result.weights, means, covs, weights, problem.lambdas)
    for start, end in zip(at_init, at_bar):
        assert np.max(np.abs(end)) < 2e-2 * np.max(np.abs(start))
