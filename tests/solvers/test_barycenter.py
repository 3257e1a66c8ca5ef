"""The outer loop of raybary.solvers.barycenter, tested directly (not through
raybary.solve): closed forms, what each outer iteration does to the
objective, the batched loop against the single-problem one, the stopping
flags and padding invariance.

Everything is float64 (``jax.enable_x64``), so results agree to rounding.
Compiles are slow on small machines, so the file keeps to one padded shape
for most tests (the tutorial's bucket, 8 rows) and a few small programs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import ortho_group

from raybary import GMM, Problem
from raybary.batch.padding import Bucket, bucket_of, pad_problems
from raybary.solvers import barycenter as bc
from raybary.storage.generate import tutorial_problems

CONFIG = bc.SolverConfig.for_dtype("float64")
TUTORIAL_BUCKET = Bucket(d=2, n=6, J=3, L=12, K=8)
EPSILON = 3e-4  # relative: raybary.solve's default
INIT = jax.jit(bc.init_one, static_argnames="config")
RUN = jax.jit(bc.run_one, static_argnames=("config", "blocks"))
SOLVE = jax.jit(bc.solve_one, static_argnames="config")


def pad(problems, sizes, bucket, rows, inits=None, restarts=None):
    """Padded float64 arrays (NumPy) of ``problems``; problem i gets key ``[0, i]``."""
    arrays, norm = pad_problems(
        problems, sizes, bucket, rows, epsilons=[EPSILON] * len(problems), relative_epsilon=True,
        inits=inits or [None] * len(problems),
        keys=np.array([[0, i] for i in range(len(problems))], np.uint32),
        dtype=np.dtype("float64"), restarts=restarts)
    return arrays, norm


def device(arrays) -> bc.PaddedProblem:
    """The arrays as a :class:`PaddedProblem` of JAX arrays (call under x64)."""
    return bc.PaddedProblem(**{k: jnp.asarray(v) for k, v in arrays.items()})


def row(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def psd_sqrt(c):
    lam, v = np.linalg.eigh(c)
    return (v * np.sqrt(lam)) @ v.T


def commuting_problem(rng, d):
    """Three single Gaussians whose covariances share eigenvectors."""
    u = ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))
    gmms = [GMM([1.0], rng.normal(size=(1, d)) * 3,
                ((u * rng.uniform(0.2, 5.0, size=d)) @ u.T)[None]) for _ in range(3)]
    return Problem(gmms, rng.dirichlet(np.ones(3) * 2))


def given_init(problem, n, seed):
    """Atoms on randomly picked components, moved by half a unit of their scale."""
    rng = np.random.default_rng(seed)
    means = np.concatenate([g.means for g in problem.gmms])
    covs = np.concatenate([g.covs for g in problem.gmms])
    pick = rng.choice(len(means), size=n, replace=False)
    return means[pick] + rng.normal(size=(n, 2)) * 2.0, covs[pick]


# Rows of the shared batch: tutorial problems 0-3 (k-means++ draws), two
# closed-form problems (one atom) and tutorial problems 4-5 with given atoms.
DRAWN, CLOSED, GIVEN = [0, 1, 2, 3], [4, 5], [6, 7]
OFFSET = np.array([0.75, -0.5])


@pytest.fixture(scope="module")
def problems():
    tut = tutorial_problems(6, seed=0)
    rng = np.random.default_rng(0)
    closed = [commuting_problem(rng, 2) for _ in CLOSED]
    items = [tut[0], tut[1], tut[2], tut[3], *closed, tut[4], tut[5]]
    sizes = [6, 6, 6, 6, 1, 1, 6, 6]
    inits = [None] * 6 + [given_init(tut[4], 6, 1), given_init(tut[5], 6, 2)]
    return items, sizes, inits


@pytest.fixture(scope="module")
def padded(problems):
    items, sizes, inits = problems
    arrays, _ = pad(items, sizes, TUTORIAL_BUCKET, 8, inits=inits)
    # Padding centres each problem (the closed-form barycenter's mean would be
    # 0): move the closed-form rows off the origin, in solver coordinates.
    for i in CLOSED:
        arrays["means"][i, :3] += OFFSET
    return arrays


@pytest.fixture(scope="module")
def batched(padded):
    """The whole batch by run_batch from init_one's states, to the end."""
    with jax.enable_x64(True):
        batch = device(padded)
        start = stack([INIT(row(batch, i), CONFIG) for i in range(8)])
        state = bc.run_batch(start, batch, 1 << 30, CONFIG)
        out = bc.finish_batch(state, batch)
        return (start, jax.tree_util.tree_map(np.asarray, state),
                {k: np.asarray(v) for k, v in out._asdict().items()})


def entropic_terms(arrays, i, before, after):
    """For the plans solved in the step ``before -> after`` (their potentials
    are ``after.f, after.g``; their cost ``before.cost``), in NumPy: the
    transport objective ``T``, the entropic objective ``E = T + eps KL(P | a x b)``
    (lambda-weighted over the GMMs) and ``A``, the transport cost of the same
    plans against the moved atoms (``after.cost``)."""
    weights, gi = arrays["weights"][i], arrays["gmm_index"][i]
    comp, atoms = weights > 0, arrays["atom_mask"][i]
    lam = arrays["lambdas"][i] / arrays["lambdas"][i].sum()
    lam_l = np.where(comp, lam[gi], 0.0)
    eps = float(after.epsilon)
    cost = np.asarray(before.cost)
    mask = atoms[:, None] & comp[None, :]
    log_p = np.where(mask, (np.asarray(after.f)[gi].T + np.asarray(after.g)[None] - cost) / eps,
                     0.0)
    plan = np.where(mask, np.exp(log_p), 0.0)
    log_ab = np.asarray(after.log_a)[:, None] + np.log(np.where(comp, weights, 1.0))[None]
    transport = np.sum(lam_l * plan * cost)
    kl = np.sum(lam_l * np.where(mask, plan * (log_p - log_ab), 0.0))
    return transport, transport + eps * kl, np.sum(lam_l * plan * np.asarray(after.cost))


@pytest.fixture(scope="module")
def stepped(padded):
    """Rows ``DRAWN`` by run_one, one block per call, to the end; per outer
    iteration the objective and :func:`entropic_terms`."""
    traces = {}
    with jax.enable_x64(True):
        batch = device(padded)
        for i in DRAWN:
            p = row(batch, i)
            state = INIT(p, CONFIG)
            trace = []
            while not bool(state.done):
                nxt = RUN(state, p, CONFIG, blocks=1)
                assert int(nxt.blocks) == int(state.blocks) + 1
                if int(nxt.iteration) > int(state.iteration):
                    assert int(nxt.iteration) == int(state.iteration) + 1
                    trace.append((float(nxt.objective), float(nxt.error),
                                  *entropic_terms(padded, i, state, nxt)))
                state = nxt
            traces[i] = (np.array(trace), jax.tree_util.tree_map(np.asarray, state))
    return traces


# --------------------------------------------------------------------------- closed forms


def test_closed_form_commuting_gaussians_d2(padded, batched):
    """One Gaussian per input, commuting covariances, one atom: the barycenter
    has mean sum lambda_j m_j and covariance root sum lambda_j C_j^(1/2)
    (in solver coordinates; padded atoms stay out)."""
    _, _, out = batched
    for i in CLOSED:
        lam = padded["lambdas"][i]
        means, covs = padded["means"][i, :3], padded["covs"][i, :3]
        assert np.linalg.norm(lam @ means - OFFSET) < 1e-12
        roots = np.stack([psd_sqrt(c) for c in covs])
        mean = lam @ means
        root = np.einsum("j,jab->ab", lam, roots)
        np.testing.assert_allclose(out["means"][i, 0], mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out["covs"][i, 0], root @ root, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(out["weights"][i], [1.0, 0, 0, 0, 0, 0])
        # Commuting: W2^2 = |m - m_j|^2 + |S^(1/2) - C_j^(1/2)|_F^2.
        want = sum(lam[j] * (np.sum((mean - means[j]) ** 2) + np.sum((root - roots[j]) ** 2))
                   for j in range(3))
        assert float(out["objective"][i]) == pytest.approx(want, rel=1e-9)
        assert bool(out["converged"][i])


def test_closed_form_d1():
    """d = 1 (its own closed forms): W2^2 = (m1 - m2)^2 + (s1 - s2)^2 and the
    barycenter has mean and standard deviation the lambda-averages."""
    problem = Problem([GMM([1.0], [[0.0]], [[[1.0]]]), GMM([1.0], [[4.0]], [[[9.0]]]),
                       GMM([1.0], [[-2.0]], [[[0.25]]])], np.array([0.25, 0.5, 0.25]))
    arrays, norm = pad([problem], [1], bucket_of(problem, 1), 1)
    arrays["means"][0, :3] += 0.5  # off the origin (padding centred it)
    with jax.enable_x64(True):
        out = SOLVE(row(device(arrays), 0), CONFIG)
    c, s = norm.center[0, 0] - 0.5 * norm.scale[0], norm.scale[0]
    m = 0.25 * 0.0 + 0.5 * 4.0 + 0.25 * -2.0
    sd = 0.25 * 1.0 + 0.5 * 3.0 + 0.25 * 0.5
    assert float(out.means[0, 0]) * s + c == pytest.approx(m, rel=1e-9)
    assert float(out.covs[0, 0, 0]) * s**2 == pytest.approx(sd**2, rel=1e-9)
    want = sum(lam * ((m - mj) ** 2 + (sd - sj) ** 2)
               for lam, mj, sj in ((0.25, 0.0, 1.0), (0.5, 4.0, 3.0), (0.25, -2.0, 0.5)))
    assert float(out.objective) * s**2 == pytest.approx(want, rel=1e-9)
    assert bool(out.converged) and 1 <= int(out.iterations) < CONFIG.max_iterations


# --------------------------------------------------------------------------- one outer iteration


def test_each_iteration_lowers_the_entropic_objective(padded, stepped):
    """Block-coordinate descent on ``E = sum_j lambda_j (<P_j, C_j> + eps KL(P_j | a x w_j))``:
    the atom update does not raise the transport cost of the plans it was
    computed from (``A <= T``), the next entropic plans minimise ``E`` for the
    new atoms, so ``E`` goes down at every outer iteration (up to the plans'
    marginal error). The transport objective ``T`` itself (``state.objective``)
    need not: the next plans trade transport for entropy, up to ``eps KL``."""
    for i, (trace, final) in stepped.items():
        objective, error, transport, entropic, moved = trace.T
        assert len(trace) == int(final.iteration) >= 3
        # The plans rebuilt from the potentials are the ones the loop measured.
        np.testing.assert_allclose(transport, objective, rtol=1e-9)
        assert np.all(moved <= transport * (1 + 1e-12)), (i, np.max(moved / transport - 1))
        # Plans solved to an L1 marginal error e move E by about e times the
        # costs, which are O(1) in solver coordinates.
        rise = np.diff(entropic) / entropic[1:]
        assert np.all(rise <= 1e-9 + 10 * error[1:]), (i, rise.max())
        # T can rise, but by less than eps * KL, and it ends below where it started.
        # (KL(P | a x w_j) <= H(a) = log n, and eps KL is all that E gives T.)
        eps, n = float(final.epsilon), int(padded["atom_mask"][i].sum())
        assert np.all(np.diff(objective) <= eps * np.log(n)), (i, np.diff(objective).max())
        assert objective[-1] < objective[0]


def test_max_iterations_stops_unconverged(padded, stepped):
    """Two outer iterations at most: stopped after exactly two, not converged,
    with the same objective as the first two iterations of an uncapped run."""
    capped = dataclasses.replace(CONFIG, max_iterations=2)
    i = DRAWN[0]
    with jax.enable_x64(True):
        p = row(device(padded), i)
        state = RUN(INIT(p, CONFIG), p, capped)  # init_one does not read max_iterations
    assert bool(state.done) and not bool(state.converged)
    assert int(state.iteration) == 2
    trace, final = stepped[i]
    assert int(final.iteration) > 2 and bool(final.converged)
    assert float(state.objective) == pytest.approx(trace[1, 0], rel=1e-12)


def test_default_config_converges_before_the_cap(batched):
    """Every tutorial row ends either converged before max_iterations or at the
    cap, unconverged (no other way out: the plans never stall in float64),
    and most converge."""
    _, state, out = batched
    rows = DRAWN + GIVEN
    iterations, converged = out["iterations"][rows], out["converged"][rows]
    assert np.all(state.done[rows]) and np.all(state.stalled[rows] == 0)
    assert np.all(np.where(converged, iterations < CONFIG.max_iterations,
                           iterations == CONFIG.max_iterations)), (iterations, converged)
    assert np.sum(converged) >= len(rows) - 1, (iterations, converged)


# --------------------------------------------------------------------------- batch and padding


def test_run_batch_reaches_run_one_barycenter(stepped, batched):
    """The batched loop only changes when the updates happen (between blocks):
    each problem's arithmetic is the same, so the same barycenter."""
    _, state, out = batched
    for i, (_, final) in stepped.items():
        assert int(out["iterations"][i]) == int(final.iteration), i
        assert bool(out["converged"][i]) == bool(final.converged), i
        np.testing.assert_allclose(out["objective"][i], final.objective, rtol=1e-10)
        np.testing.assert_allclose(out["means"][i], final.means, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(out["covs"][i], final.covs, rtol=1e-8, atol=1e-10)


def test_padding_to_a_larger_bucket_changes_nothing(problems, batched):
    """The same problems (given atoms) in a bucket with more components, GMMs
    and atoms (masked off), and per-GMM Newton blocks (L > 12): the same
    barycenter on the real atoms."""
    items, sizes, inits = problems
    _, _, out = batched
    big = Bucket(d=2, n=8, J=6, L=24, K=16)
    arrays, _ = pad([items[i] for i in GIVEN], [6, 6], big, 2, inits=[inits[i] for i in GIVEN])
    assert arrays["atom_mask"].sum(axis=1).tolist() == [6, 6]
    with jax.enable_x64(True):
        batch = device(arrays)
        for k, i in enumerate(GIVEN):
            res = SOLVE(row(batch, k), CONFIG)
            assert int(res.iterations) == int(out["iterations"][i]), i
            assert float(res.objective) == pytest.approx(float(out["objective"][i]), rel=1e-9)
            np.testing.assert_allclose(res.means[:6], out["means"][i], rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(res.covs[:6], out["covs"][i], rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(res.weights[:6], out["weights"][i], rtol=1e-12)
            np.testing.assert_array_equal(res.weights[6:], 0.0)
