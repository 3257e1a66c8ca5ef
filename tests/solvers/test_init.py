"""raybary.solvers.init, tested directly: k-means++ and mass draws of the
initial atoms (what they may draw, determinism, spread, the jitter of repeated
draws) and :func:`~raybary.solvers.barycenter.init_one`'s choice between them.

One shape for every draw (L = 12 flat components in d = 2, n = 6 atoms, ten
keys at once under ``vmap``), in float64, so the file compiles three small
programs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raybary.batch.padding import bucket_of, pad_problems
from raybary.geometry.bures import bures_cost
from raybary.solvers import barycenter as bc
from raybary.solvers.init import kmeanspp_init, mass_init
from raybary.storage.generate import tutorial_problems

L, J, D, N, KEYS = 12, 3, 2, 6, 10
MAX_NORMAL = 6.0  # a standard normal draw beyond this is a ~1e-9 event


def _draw(fn):
    return jax.jit(jax.vmap(fn, in_axes=(0, None, None, None, None, None, None)),
                   static_argnums=6)


KMEANSPP, MASS = _draw(kmeanspp_init), _draw(mass_init)


def keys(seed, count=KEYS):
    """``count`` threefry key data ``(count, 2)`` uint32."""
    return np.stack([np.array([seed, 1000 + i], np.uint32) for i in range(count)])


def draw(fn, comps, key_data, n=N):
    """Atoms ``(means (k, n, d), covs (k, n, d, d))`` for each of the keys."""
    weights, means, covs, lambdas, gmm_index = comps
    with jax.enable_x64(True):
        k = jax.random.wrap_key_data(jnp.asarray(key_data))
        m, c = fn(k, jnp.asarray(weights), jnp.asarray(means), jnp.asarray(covs),
                  jnp.asarray(lambdas), jnp.asarray(gmm_index), n)
        return np.asarray(m), np.asarray(c)


def spd(rng, scale=1.0):
    a = rng.normal(size=(D, D))
    return scale * (a @ a.T + 0.3 * np.eye(D))


def flat(groups, lambdas, seed=0):
    """Flat components of GMMs given as lists of ``(weight, centre, cov scale)``,
    padded to ``L`` (weight 0, mean 0, identity covariance, as padding does)
    and ``J`` GMMs (lambda 0).
    Every covariance is random, so an atom's covariance names its component."""
    rng = np.random.default_rng(seed)
    weights, means, covs = np.zeros(L), np.zeros((L, D)), np.tile(np.eye(D), (L, 1, 1))
    gmm_index = np.zeros(L, np.int32)
    i = 0
    for j, group in enumerate(groups):
        for w, centre, s in group:
            weights[i], means[i], covs[i], gmm_index[i] = w, centre, spd(rng, s), j
            i += 1
    lam = np.zeros(J)
    lam[: len(lambdas)] = lambdas
    return weights, means, covs, lam, gmm_index


def component_of(comps, cov):
    """The one component whose covariance is exactly ``cov``."""
    (hits,) = np.nonzero(np.all(comps[2] == cov, axis=(1, 2)))
    assert len(hits) == 1, hits
    return int(hits[0])


def mass(comps):
    weights, _, _, lambdas, gmm_index = comps
    return weights * lambdas[gmm_index]


# Two GMMs with mass, one with lambda 0 (in its own region), two padded components.
MIXED = flat(
    [
        [(0.4, (10.0, 0.0), 1.0), (0.3, (0.0, 12.0), 2.0), (0.2, (-9.0, 3.0), 0.5),
         (0.1, (4.0, -8.0), 1.0)],
        [(0.5, (8.0, 8.0), 1.5), (0.3, (-6.0, -6.0), 1.0), (0.2, (1.0, 1.0), 0.7)],
        [(0.5, (30.0, 30.0), 1.0), (0.3, (31.0, 29.0), 1.0), (0.2, (29.0, 31.0), 1.0)],
    ],
    [0.5, 0.5, 0.0],
)


def sd(cov):
    return np.sqrt(np.trace(cov) / D)


@pytest.mark.parametrize("fn, jitter", [(KMEANSPP, 0.0), (MASS, 0.5)], ids=["kmeanspp", "mass"])
def test_atoms_are_real_components_with_mass(fn, jitter):
    """Each atom's covariance is a component's, never a padded one's nor one of
    the lambda-0 GMM's, and its mean is that component's (k-means++ with fewer
    atoms than components: exactly; mass draws: within their jitter of half a
    standard deviation, never exactly)."""
    means, covs = draw(fn, MIXED, keys(1))
    has_mass = mass(MIXED) > 0
    assert has_mass.sum() == 7 and N < 7
    for k in range(KEYS):
        picked = [component_of(MIXED, c) for c in covs[k]]
        assert all(has_mass[picked]), picked
        shift = means[k] - MIXED[1][picked]
        bound = MAX_NORMAL * jitter * np.array([sd(MIXED[2][i]) for i in picked])
        assert np.all(np.abs(shift) <= bound[:, None]), shift
        if jitter:
            assert np.all(np.any(shift != 0, axis=1))
        else:
            assert len(set(picked)) == N  # no component twice while others are left


@pytest.mark.parametrize("fn", [KMEANSPP, MASS], ids=["kmeanspp", "mass"])
def test_same_key_same_atoms_other_keys_differ(fn):
    data = keys(2)
    data[5] = data[0]
    means, covs = draw(fn, MIXED, data)
    np.testing.assert_array_equal(means[5], means[0])
    np.testing.assert_array_equal(covs[5], covs[0])
    distinct = {means[k].tobytes() for k in range(KEYS)}
    assert len(distinct) == KEYS - 1  # every key but the repeated one draws its own atoms
    again, _ = draw(fn, MIXED, data)
    np.testing.assert_array_equal(again, means)


# Six clusters of two components, 100 apart, each component within 1 of its
# cluster's centre; equal masses (two GMMs of three clusters each).
CENTRES = 100.0 * np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]], float)
CLUSTERS = flat(
    [[(1 / 6, c + (0.5, 0.0), 0.3) for c in half] + [(1 / 6, c - (0.0, 0.5), 0.3) for c in half]
     for half in (CENTRES[:3], CENTRES[3:])],
    [0.5, 0.5],
    seed=1,
)


def clusters_hit(means):
    """The cluster of each atom, ``(keys, n)``."""
    dist = np.linalg.norm(means[:, :, None, :] - CENTRES[None, None], axis=-1)
    assert np.all(dist.min(axis=-1) < 2.0)
    return dist.argmin(axis=-1)


def test_kmeanspp_puts_one_atom_in_each_separated_cluster():
    """With as many atoms as well-separated clusters, k-means++ seeds each
    cluster once for every key (a second atom in a cluster has probability
    ~1e-4 per draw); mass draws do not (all six clusters hit has probability
    6!/6^6 ~ 1.5% per key)."""
    hit = clusters_hit(draw(KMEANSPP, CLUSTERS, keys(3))[0])
    for k in range(KEYS):
        assert sorted(hit[k]) == list(range(6)), hit[k]
    by_mass = clusters_hit(draw(MASS, CLUSTERS, keys(3))[0])
    spread = sum(len(set(by_mass[k])) == 6 for k in range(KEYS))
    assert spread <= 2, by_mass


# One component with ~96% of the mass.
HEAVY = flat(
    [
        [(0.97, (0.0, 0.0), 1.0), (0.01, (10.0, 0.0), 1.0), (0.01, (0.0, 10.0), 1.0),
         (0.01, (-10.0, 0.0), 1.0)],
        [(0.5, (20.0, 20.0), 1.0), (0.3, (-20.0, 20.0), 1.0), (0.2, (20.0, -20.0), 1.0)],
    ],
    [0.99, 0.01],
    seed=2,
)


def test_mass_draws_pile_on_a_heavy_component_kmeanspp_does_not():
    heavy = int(np.argmax(mass(HEAVY)))
    assert mass(HEAVY)[heavy] / mass(HEAVY).sum() > 0.95
    _, covs = draw(MASS, HEAVY, keys(4))
    on_heavy = [sum(component_of(HEAVY, c) == heavy for c in covs[k]) for k in range(KEYS)]
    assert min(on_heavy) >= 4, on_heavy  # P(at most 3 of 6 on it) ~ 1e-3 per key
    _, covs = draw(KMEANSPP, HEAVY, keys(4))
    on_heavy = [sum(component_of(HEAVY, c) == heavy for c in covs[k]) for k in range(KEYS)]
    assert on_heavy == [1] * KEYS, on_heavy


# Three components with mass and a lambda-0 GMM: six atoms must repeat
# components. The first component's Bures cost to itself rounds to a few ulps
# above 0 (as it does for about one random 2x2 covariance in eight).
FEW = flat(
    [
        [(0.5, (3.0, 1.0), 1.0), (0.3, (-2.0, 4.0), 2.0), (0.2, (0.0, -5.0), 0.5)],
        [(0.4, (40.0, 0.0), 1.0), (0.3, (41.0, 0.0), 1.0), (0.3, (40.0, 1.0), 1.0)],
    ],
    [1.0, 0.0],
    seed=1,
)


@pytest.mark.parametrize("fn, jitter", [(KMEANSPP, 0.1), (MASS, 0.5)], ids=["kmeanspp", "mass"])
def test_repeated_components_are_jittered(fn, jitter):
    """More atoms than components with mass: every component of the lambda-0
    GMM stays out, and no two atoms are equal (exact copies would get
    identical plans and stay copies); k-means++ draws each component once
    before it repeats one, and jitters only the repeats, by a tenth of a
    standard deviation."""
    with jax.enable_x64(True):
        m, c = jnp.asarray(FEW[1][:3]), jnp.asarray(FEW[2][:3])
        assert np.asarray(bures_cost(m, c, m, c))[0] > 0
    means, covs = draw(fn, FEW, keys(5))
    for k in range(KEYS):
        picked = np.array([component_of(FEW, c) for c in covs[k]])
        assert np.all(picked < 3), picked
        assert len({m.tobytes() for m in means[k]}) == N, means[k]
        shift = means[k] - FEW[1][picked]
        bound = MAX_NORMAL * jitter * np.array([sd(FEW[2][i]) for i in picked])
        assert np.all(np.abs(shift) <= bound[:, None]), shift
        if fn is KMEANSPP:
            assert sorted(picked[:3]) == [0, 1, 2]
            np.testing.assert_array_equal(shift[:3], 0.0)
            assert np.all(np.any(shift[3:] != 0, axis=1))


# --------------------------------------------------------------------------- init_one


def test_init_one_uses_the_given_atoms_else_kmeanspp_or_mass_by_restart():
    """Rows of one tutorial problem (5 atoms in a bucket of 6): a given init is
    used whatever the restart; without one, even restarts draw by k-means++ and
    odd ones by mass, with the row's key."""
    problem = tutorial_problems(1, seed=0)[0]
    rng = np.random.default_rng(0)
    init = (rng.normal(size=(5, D)) * 10,
            np.stack([spd(rng, 5.0) for _ in range(5)]))
    bucket = bucket_of(problem, 5)
    assert (bucket.n, bucket.L, bucket.d) == (N, L, D)
    row_key = np.array([7, 11], np.uint32)
    arrays, _ = pad_problems([problem] * 4, [5] * 4, bucket, 4, epsilons=[3e-4] * 4,
                             relative_epsilon=True, inits=[init, None, None, init],
                             keys=np.tile(row_key, (4, 1)), dtype=np.dtype("float64"),
                             restarts=[0, 0, 1, 1])
    with jax.enable_x64(True):
        batch = bc.PaddedProblem(**{k: jnp.asarray(v) for k, v in arrays.items()})
        state = bc.init_batch(batch, bc.SolverConfig.for_dtype("float64"))
        lambdas = np.asarray(bc.problem_masks(jax.tree_util.tree_map(lambda x: x[1], batch))
                             .lambdas)
    means, covs = np.asarray(state.means), np.asarray(state.covs)
    comps = (arrays["weights"][1], arrays["means"][1], arrays["covs"][1], lambdas,
             arrays["gmm_index"][1])
    ten = np.tile(row_key, (KEYS, 1))
    expected = {1: draw(KMEANSPP, comps, ten), 2: draw(MASS, comps, ten)}
    for row in (0, 3):
        np.testing.assert_array_equal(means[row, :5], arrays["init_means"][row, :5])
        np.testing.assert_array_equal(covs[row, :5], arrays["init_covs"][row, :5])
    for row, (m, c) in expected.items():
        np.testing.assert_allclose(means[row, :5], m[0, :5], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(covs[row, :5], c[0, :5])
    assert not np.allclose(means[1, :5], means[2, :5])
    # The padded atom: mean 0, identity covariance.
    np.testing.assert_array_equal(means[:, 5], 0.0)
    np.testing.assert_array_equal(covs[:, 5], np.tile(np.eye(D), (4, 1, 1)))
